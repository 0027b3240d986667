"""Memory against call length: one call of 1 minute and one of 60 minutes, fed faster than real time.

A real `mediaserver serve` process records one WebSocket leg (wavstream, µ-law, 20 ms
frames) to MP3, and its VmRSS is sampled from /proc every 0.2 s. The client sends at
`PACE_X` times real time, in bursts every 0.1 s: faster than any caller, so an hour takes
minutes, but slow enough that the server keeps up and nothing queues in front of it, as
with a real call. (As fast as the server takes it, a leg runs up to 2 s ahead of the mix
and the socket's receive buffers fill: a few hundred KiB that only a fast sender causes.)

A short warm-up call runs first, so what loads or allocates on first use counts once, as
process cost. Each call's figure is its peak RSS minus the RSS at rest just before it;
the peak over the rest before the first measured call (the baseline) is kept too. This is
growth above a warmed-up process, which is what "memory does not grow with call length"
is about; the footprint of many concurrent calls is measured by `cost_per_call`.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from benchmarks import audio
from benchmarks.common import WORK, fresh_work, print_table, rnd, verdict
from benchmarks.server import HEADERS, Server
from benchmarks.server import proc_status as _status

TITLE = "Memory against call length: peak RSS of a real server during one 1-minute and one 60-minute call"

RATE = audio.RATE
FRAME_BYTES = 160  # 20 ms of µ-law, as a gateway sends it
PACE_X = 8.0  # audio seconds sent per wall second (the server records one leg at ~90x)
BURST_S = 0.1
SAMPLE_EVERY_S = 0.2
WARMUP_S = 5
CALLS_MIN = (1, 60)
QUICK_CALLS_MIN = (1, 10)
REST_S = 2.0  # idle time before a call, over which its rest RSS is taken
BUDGET_KIB = 256  # per active call
FLAT_KIB = 64  # how much more a long call may take than a short one and still count as flat
RECORD = {"format": "mp3"}


# -- the server and its memory ---------------------------------------------------------------


@dataclass
class Sampler:
    """Samples a process's status every SAMPLE_EVERY_S on its own thread, with the size of the
    spool file being written (how far the server has got, whatever the client has sent)."""

    pid: int
    spool: list[Path | None] = field(default_factory=lambda: [None])
    samples: list[tuple[float, int, int, float, int]] = field(default_factory=list)  # t, rss, hwm, cpu, spool bytes
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status = _status(self.pid)
            except OSError:
                return
            self.samples.append((time.monotonic(), status["VmRSS"], status["VmHWM"], status["cpu"], self._spool_bytes()))
            self._stop.wait(SAMPLE_EVERY_S)

    def _spool_bytes(self) -> int:
        path = self.spool[0]
        try:
            return path.stat().st_size if path is not None else 0
        except OSError:
            return 0  # moved to storage once complete

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def between(self, start: float, end: float) -> list[tuple[float, int, int, float, int]]:
        return [s for s in self.samples if start <= s[0] <= end]


# -- one call --------------------------------------------------------------------------------


async def _api(http: aiohttp.ClientSession, method: str, path: str, **kwargs) -> Any:
    async with http.request(method, path, headers=HEADERS, **kwargs) as response:
        body = await response.json(content_type=None)
        if response.status >= 300:
            raise RuntimeError(f"{method} {path}: {response.status} {body}")
        return body


async def _stream(http: aiohttp.ClientSession, url: str, payload: bytes) -> None:
    """Send `payload` as 20 ms frames at PACE_X times real time, then stop."""
    burst = int(BURST_S * PACE_X * RATE) // FRAME_BYTES * FRAME_BYTES
    loop = asyncio.get_running_loop()
    async with http.ws_connect(url) as ws:
        await ws.send_json({"event": "start", "encoding": "PCMU", "sample_rate": RATE, "channels": 1})
        view = memoryview(payload)
        due = loop.time()
        for first in range(0, len(payload), burst):
            for start in range(first, min(first + burst, len(payload)), FRAME_BYTES):
                await ws.send_bytes(bytes(view[start:start + FRAME_BYTES]))
            due += BURST_S
            await asyncio.sleep(max(due - loop.time(), 0.0))
        await ws.send_json({"event": "stop"})
        await ws.receive()  # the server closes once it has taken everything


async def _wait_completed(http: aiohttp.ClientSession, rid: str, timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        meta = await _api(http, "GET", f"/api/v1/recordings/{rid}")
        if meta["state"] in ("completed", "failed"):
            return meta
        if time.monotonic() > deadline:
            raise RuntimeError(f"recording {rid} stayed {meta['state']}")
        await asyncio.sleep(0.05)


async def _call(server: Server, payload: bytes, spool: list[Path | None], out: Path) -> dict[str, Any]:
    """One recorded call: when its audio started, when the server had taken it all (closed the
    socket) and when the recording was stored, with the server's status then (before the
    file is downloaded for checking)."""
    async with aiohttp.ClientSession(server.base_url) as http:
        session = await _api(http, "POST", "/api/v1/sessions", json={})
        uuid = session["uuid"]
        started = await _api(http, "POST", f"/api/v1/sessions/{uuid}/commands/record/start", json=RECORD)
        rid = started["recording_id"]
        spool[0] = server.data_dir / "spool" / f"{rid}.{RECORD['format']}"
        began = time.monotonic()
        await _stream(http, session["ingest"]["wavstream"]["caller"], payload)
        taken = time.monotonic()
        await _api(http, "DELETE", f"/api/v1/sessions/{uuid}")
        meta = await _wait_completed(http, rid)
        stored = time.monotonic()
        status = _status(server.proc.pid)
        async with http.get(f"/api/v1/recordings/{rid}/download", headers=HEADERS) as response:
            response.raise_for_status()
            out.write_bytes(await response.read())
    return {"recording_id": rid, "began": began, "taken": taken, "stored": stored, "status": status, "meta": meta}


def _ffprobe_seconds(path: Path) -> float | None:
    """ffprobe's duration minus start_time (FFmpeg 5.1 counts the MP3 priming in both)."""
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration,start_time", "-of", "json",
                          str(path)], capture_output=True, text=True, check=True).stdout
    fmt = json.loads(out).get("format", {})
    if "duration" not in fmt:
        return None
    return float(fmt["duration"]) - float(fmt.get("start_time", 0.0))


def _measure(server: Server, sampler: Sampler, label: str, payload: bytes, out: Path) -> dict[str, Any]:
    """Rest, then one call, from record/start until the recording is stored."""
    time.sleep(REST_S)
    rest = sampler.between(time.monotonic() - REST_S, time.monotonic())
    before = _status(server.proc.pid)
    t0 = time.monotonic()
    result = asyncio.run(_call(server, payload, sampler.spool, out))
    after = result["status"]
    during = sampler.between(t0, result["stored"])
    sampler.spool[0] = None
    fed_s = len(payload) / RATE
    meta = result["meta"]
    return {
        "call": label,
        "audio_s": fed_s,
        "taken_wall_s": rnd(result["taken"] - result["began"], 2),
        "call_wall_s": rnd(result["stored"] - result["began"], 2),
        "speed_x": rnd(fed_s / (result["stored"] - result["began"]), 1),
        "rest_rss_kib": int(np.median([s[1] for s in rest])) if rest else before["VmRSS"],
        "peak_rss_kib": max([s[1] for s in during] + [after["VmRSS"]]),
        "rss_after_kib": after["VmRSS"],
        "hwm_after_kib": after["VmHWM"],
        "rest_anon_kib": before["RssAnon"],
        "anon_after_kib": after["RssAnon"],
        "rest_file_kib": before["RssFile"],
        "file_after_kib": after["RssFile"],
        "server_cpu_s": rnd(after["cpu"] - before["cpu"], 2),
        "samples": len(during),
        "state": meta["state"],
        "recording_id": result["recording_id"],
        "leg_audio_s": rnd(meta["legs"][0]["audio_ms"] / 1000, 3) if meta.get("legs") else None,
        "catalog_duration_s": rnd(meta["duration"], 3),
        "ffprobe_s": rnd(_ffprobe_seconds(out), 3),
        "decoded_s": rnd(len(audio.decode(out)) / RATE, 3),
        "file_bytes": out.stat().st_size,
        "trace": _trace(during, fed_s, meta["bitrate"] * 1000 / 8),
    }


def _trace(samples: list[tuple[float, int, int, float, int]], total: float, bytes_per_s: float,
           points: int = 11) -> list[dict[str, Any]]:
    """RSS at about every tenth of the call, by how much the server had recorded."""
    recording = [s for s in samples if s[4] > 0]  # the spool leaves for storage at the end
    trace = []
    for i in range(points):
        want = total * i / (points - 1)
        nearest = min(recording, key=lambda s: abs(s[4] / bytes_per_s - want), default=None)
        if nearest is not None:
            trace.append({"recorded_s": rnd(nearest[4] / bytes_per_s, 1), "rss_kib": nearest[1]})
    return trace


def _leg(seconds: int, quick: bool) -> bytes:
    """`seconds` of µ-law speech: the benchmark leg, repeated as needed."""
    source = audio.speech_legs(WORK / "speech", 60 if quick else 300)[0].read_bytes()
    need = seconds * RATE
    return (source * (need // len(source) + 1))[:need]


# -- the benchmark ---------------------------------------------------------------------------


def _calls(server: Server, sampler: Sampler, work: Path, calls: tuple[int, ...], quick: bool) -> list[dict[str, Any]]:
    rows = [_measure(server, sampler, f"warm-up {WARMUP_S} s", _leg(WARMUP_S, quick), work / "warmup.mp3")]
    for minutes in calls:
        rows.append(_measure(server, sampler, f"{minutes} min", _leg(minutes * 60, quick), work / f"call-{minutes}min.mp3"))
        print(f"  {rows[-1]['call']} call done: {rows[-1]['speed_x']}x real time", flush=True)
    baseline = rows[1]["rest_rss_kib"]
    for row in rows:
        row["baseline_rss_kib"] = baseline
    return rows


def run(quick: bool) -> dict[str, Any]:
    calls = QUICK_CALLS_MIN if quick else CALLS_MIN
    work = fresh_work("memory_length")
    server = Server(work)
    print(f"memory_length: server on {server.base_url}; a {WARMUP_S} s warm-up, then calls of "
          f"{', '.join(f'{m} min' for m in calls)}", flush=True)
    server.start()
    sampler = Sampler(server.proc.pid)
    sampler.start()
    try:
        started = _status(server.proc.pid)
        rows = _calls(server, sampler, work, calls, quick)
    finally:
        sampler.stop()
        server.stop()
    for row in rows:
        row["peak_over_baseline_kib"] = row["peak_rss_kib"] - row["baseline_rss_kib"]
        row["peak_over_own_rest_kib"] = row["peak_rss_kib"] - row["rest_rss_kib"]
    baseline = rows[1]["baseline_rss_kib"]
    _print(started, baseline, rows)
    short, long_ = rows[1], rows[-1]
    # A call's own memory is its peak over the rest just before it: what an earlier call
    # left behind in the process (caches, allocator pools) is not this call's.
    verdicts = [verdict(f"memory per call ({row['call']}, peak over the rest before it)", row["peak_over_own_rest_kib"],
                        BUDGET_KIB, " KiB", higher_is_better=False) for row in (short, long_)]
    verdicts.append(verdict(f"flat with call length ({long_['call']} minus {short['call']})",
                            long_["peak_over_own_rest_kib"] - short["peak_over_own_rest_kib"], FLAT_KIB, " KiB",
                            higher_is_better=False))
    # The same question asked of the long call alone: how much its RSS rose from its first
    # tenth (start-up steps done) to its end, while the audio went on.
    trace = long_["trace"]
    if len(trace) >= 3:
        verdicts.append(verdict(f"growth through the {long_['call']} call (from {trace[1]['recorded_s']:.0f} s to the end)",
                                trace[-1]["rss_kib"] - trace[1]["rss_kib"], FLAT_KIB, " KiB", higher_is_better=False))
    settings = {
        "calls_min": list(calls), "warmup_s": WARMUP_S, "frame_bytes": FRAME_BYTES, "pace_x": PACE_X, "burst_s": BURST_S, "encoding": "PCMU", "record": RECORD, "sample_every_s": SAMPLE_EVERY_S,
        "rest_s": REST_S, "budget_kib": BUDGET_KIB, "flat_kib": FLAT_KIB,
        "server": "python -m mediaserver serve (default settings, local storage)",
    }
    figures = {"process_start_rss_kib": started["VmRSS"], "baseline_rss_kib": baseline, "calls": rows}
    return {"settings": settings, "figures": figures, "verdicts": verdicts}


def _print(started: dict[str, Any], baseline: int, rows: list[dict[str, Any]]) -> None:
    print(f"\nserver RSS after start-up: {started['VmRSS']} KiB; baseline (at rest after the warm-up): {baseline} KiB")
    print_table("Memory per call (KiB; peak = highest VmRSS from record/start until the recording is stored; "
                "baseline = rest before the 1st measured call)", [
        ("call", "call", ""), ("audio s", "audio_s", ".0f"), ("speed x", "speed_x", ".1f"),
        ("taken in s", "taken_wall_s", ".2f"), ("rest RSS", "rest_rss_kib", ""), ("peak RSS", "peak_rss_kib", ""),
        ("peak-baseline", "peak_over_baseline_kib", ""), ("peak-own rest", "peak_over_own_rest_kib", ""),
        ("anon rest", "rest_anon_kib", ""), ("anon after", "anon_after_kib", ""),
        ("file rest", "rest_file_kib", ""), ("file after", "file_after_kib", ""),
        ("server CPU s", "server_cpu_s", ".2f")], rows)
    print_table("Stored recordings (seconds)", [
        ("call", "call", ""), ("fed", "audio_s", ".3f"), ("leg audio", "leg_audio_s", ".3f"),
        ("catalog", "catalog_duration_s", ".3f"), ("ffprobe dur-start", "ffprobe_s", ".3f"),
        ("decoded", "decoded_s", ".3f"), ("bytes", "file_bytes", ""), ("state", "state", "")], rows)
    long_ = rows[-1]
    print_table(f"RSS through the {long_['call']} call (KiB, by audio the server had recorded)", [
        ("recorded s", "recorded_s", ".0f"), ("RSS", "rss_kib", "")], long_["trace"])
