"""Real SIP peers for tests: SIPp scenarios from sip_fixtures/, baresip, and what the
server made of their calls (legs seen while the call ran, recordings afterwards)."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
from servers import Server, free_port

from mediaserver.api.keys import CATALOG, SERVICES

FIXTURES = Path(__file__).resolve().parent.parent / "sip_fixtures"
SCENARIOS = FIXTURES / "scenarios"
SENDER = Path(__file__).resolve().parent / "rtp_sender.py"
PCAPS = Path("/usr/share/sip-tester")


def sipp_available() -> bool:
    return shutil.which("sipp") is not None


def scenario(tmp_path: Path, name: str, **placeholders: str) -> Path:
    """A copy of a scenario with its @PLACEHOLDERS@ filled in (SIPp cannot expand
    variables everywhere, rtp_stream paths for one)."""
    text = (SCENARIOS / name).read_text()
    for key, value in placeholders.items():
        text = text.replace(f"@{key.upper()}@", str(value))
    path = tmp_path / name
    path.write_text(text)
    return path


@dataclass
class SippResult:
    returncode: int
    output: str
    seconds: float


async def run_sipp(server: Server | None, scenario_file: Path, cwd: Path, *, transport: str = "u1", calls: int = 1,
                   rate: int | None = None, sets: dict[str, object] | None = None, service: str = "app1",
                   timeout_s: int = 40, target: str | None = None, extra: tuple[str, ...] = ()) -> SippResult:
    """Run SIPp against the server's SIP port (or `target`, host:port, such as a proxy in
    front of servers) with `extra` options; returns when SIPp exits by itself."""
    kind = socket.SOCK_STREAM if transport.startswith("t") else socket.SOCK_DGRAM
    target = target or f"127.0.0.1:{server.app[SERVICES]['sip'].port}"
    args = ["sipp", target, "-sf", str(scenario_file), "-s", service,
            "-t", transport, "-i", "127.0.0.1", "-p", str(free_port(kind)), "-mi", "127.0.0.1",
            "-mp", str(free_port(socket.SOCK_DGRAM) & ~1), "-m", str(calls), "-l", str(calls), "-r", str(rate or calls),
            "-rp", "1000", "-nostdin", "-timeout", f"{timeout_s}s", "-timeout_error", "-trace_err"]
    for name, value in (sets or {}).items():
        args += ["-set", name, str(value)]
    args += extra
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(*args, cwd=cwd, stdin=subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout_s + 10)
    except asyncio.TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
    errors = "".join(path.read_text(errors="replace") for path in cwd.glob("*_errors.log"))
    return SippResult(proc.returncode, out.decode(errors="replace")[-3000:] + errors[-3000:], time.monotonic() - started)


def sender_sets(report_dir: Path | None = None, **wavs: Path) -> dict[str, object]:
    """SIPp variables for scenarios that run tests/rtp_sender.py; with `report_dir`, each
    sender writes there what it sent and when (`sender_report()` reads it)."""
    sender = f"{SENDER} --report-dir {report_dir}" if report_dir is not None else SENDER
    return {"python": sys.executable, "sender": sender, **{name: str(path) for name, path in wavs.items()}}


def sender_report(report_dir: Path, wav: Path) -> dict:
    """What tests/rtp_sender.py reported for `wav`: `first_sent` (time.monotonic(), shared by
    every process here), `lateness` per datagram and the datagrams `behind` their schedule."""
    return json.loads((report_dir / f"{wav.stem}.sent.json").read_text())


async def first_call(server: Server, timeout: float = 4.0) -> str:
    """The session UUID of the one SIP call the server has, once it has one."""
    sip = server.app[SERVICES]["sip"]
    deadline = time.monotonic() + timeout
    while not sip.calls and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    [uuid] = list(sip.calls)
    return uuid


async def leg_stats(server: Server, session_uuid: str, timeout: float = 5.0) -> list[dict]:
    """The RTP statistics the server kept with each leg of a session (packets, lost,
    reanchored, realigned, slipped_ms, ...), once the legs' sockets have closed."""
    deadline = time.monotonic() + timeout
    while True:
        legs = await server.app[CATALOG].legs(session_uuid)
        if legs and all(leg["stats"] for leg in legs):
            return [dict(leg["stats"], leg_id=leg["leg_id"]) for leg in legs]
        assert time.monotonic() < deadline, f"the legs of {session_uuid} kept no statistics: {legs}"
        await asyncio.sleep(0.02)


# Wakes every 5 ms and remembers how late it woke, until stdin closes (or 300 s pass).
_PROBE = """
import sys, threading, time
done = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
worst, deadline = 0.0, time.monotonic() + 300
while not done.is_set() and time.monotonic() < deadline:
    before = time.monotonic()
    time.sleep(0.005)
    worst = max(worst, time.monotonic() - before - 0.005)
print(worst)
"""


class SchedulingProbe:
    """A process that measures how long it waits for a CPU while the test runs: what a
    sender process on this machine (SIPp's media thread, say) may have waited too.
    `worst_s` is its longest wait, known after the block."""

    def __init__(self) -> None:
        self.worst_s: float | None = None
        self._proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> "SchedulingProbe":
        self._proc = await asyncio.create_subprocess_exec(sys.executable, "-c", _PROBE, stdin=subprocess.PIPE,
                                                          stdout=subprocess.PIPE)
        return self

    async def __aexit__(self, *exc) -> None:
        try:
            out, _ = await asyncio.wait_for(self._proc.communicate(b""), 10)
        except asyncio.TimeoutError:
            self._proc.kill()
            await self._proc.wait()
            raise
        self.worst_s = float(out)


class LegWatcher:
    """Keeps every RTP leg the server opens while it runs (legs are gone once a call ends)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.legs: dict[str, object] = {}
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> "LegWatcher":
        self._task = asyncio.create_task(self._watch(), name="leg-watcher")
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._grab()

    async def _watch(self) -> None:
        while True:
            self._grab()
            await asyncio.sleep(0.02)

    def _grab(self) -> None:
        for leg_id, leg in list(self.server.app[SERVICES]["rtp"].legs.items()):
            self.legs.setdefault(leg_id, leg)

    def key_presses(self) -> list[str]:
        return [digit for leg in self.legs.values() for digit in leg.receiver.stats.key_presses]


@dataclass
class Recorded:
    meta: dict
    audio: np.ndarray  # int16, (frames, channels)
    rate: int


async def recordings(server: Server, *, sessions: int = 1, timeout: float = 30.0) -> list[Recorded]:
    """Every recording of the app's last `sessions` sessions, once stored, with its audio."""
    deadline = time.monotonic() + timeout
    while True:
        status, data, _ = await server.api("GET", f"/api/v1/sessions?limit={sessions}")
        assert status == 200, data
        if len(data["data"]) >= sessions and all(s["state"] == "ended" for s in data["data"]):
            break
        assert time.monotonic() < deadline, f"sessions did not end: {data}"
        await asyncio.sleep(0.05)
    found = []
    for session in data["data"]:
        status, listing, _ = await server.api("GET", f"/api/v1/recordings?session_id={session['uuid']}")
        for row in listing["data"]:
            meta = await server.wait_recording(row["recording_id"], timeout=timeout)
            audio, rate = soundfile.read(io.BytesIO(await server.download(row["recording_id"])), dtype="int16", always_2d=True)
            found.append(Recorded(meta, audio, rate))
    return found


class Baresip:
    """baresip 1.0 as a headless caller: streams a WAV, takes commands over ctrl_tcp."""

    def __init__(self, tmp_path: Path, wav: Path, codecs: str = "PCMU/8000/1,PCMA/8000/1") -> None:
        self.dir = tmp_path / "baresip"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ctrl_port = free_port()
        sip_port = free_port(socket.SOCK_DGRAM)
        (self.dir / "config").write_text("\n".join([
            "poll_method epoll", f"sip_listen 127.0.0.1:{sip_port}", "net_interface 127.0.0.1",
            "audio_player alsa,null", f"audio_source aufile,{wav}", "audio_alert alsa,null",
            "ausrc_srate 8000", "auplay_srate 8000", "ausrc_channels 1", "module_path /usr/lib/baresip/modules",
            "module g711.so", "module aufile.so", "module alsa.so",
            "module_app account.so", "module_app menu.so", "module_app ctrl_tcp.so",
            f"ctrl_tcp_listen 127.0.0.1:{self.ctrl_port}", "rtp_stats no", ""]))
        (self.dir / "accounts").write_text(f"<sip:bot@127.0.0.1>;regint=0;audio_codecs={codecs};answermode=auto\n")
        (self.dir / "contacts").write_text("")
        self.proc: asyncio.subprocess.Process | None = None

    async def dial(self, uri: str, quit_after_s: int = 20) -> None:
        log = open(self.dir / "baresip.log", "wb")
        self.proc = await asyncio.create_subprocess_exec(
            "baresip", "-f", str(self.dir), "-e", f"/dial {uri}", "-t", str(quit_after_s),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir)
        log.close()

    async def command(self, command: str, params: str = "") -> dict:
        """One ctrl_tcp command (a netstring of JSON) and its answer."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.ctrl_port)
        try:
            body = json.dumps({"command": command, "params": params, "token": command}).encode()
            writer.write(str(len(body)).encode() + b":" + body + b",")
            await writer.drain()
            raw = await asyncio.wait_for(reader.read(65536), 5)
        finally:
            writer.close()
            await writer.wait_closed()
        return json.loads(raw.split(b":", 1)[1][:-1])

    async def wait(self, timeout: float) -> int:
        return await asyncio.wait_for(self.proc.wait(), timeout)

    def log(self) -> str:
        return (self.dir / "baresip.log").read_text(errors="replace")

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
