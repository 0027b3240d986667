"""SIP call rate: SIPp places calls at a rising rate, each with 10 s of PCMU RTP, every call recorded.

For each rate of a ramp, a fresh server (`record_policy = "all"`, a worker process per
usable core, every other setting at its default) takes `rate x hold_s` calls from SIPp
(`benchmarks/sipp/uac_cps.xml`): INVITE offering PCMU, ACK, 10 s of 20 ms packets
replayed from a capture the benchmark writes (`play_pcap_audio`), BYE. The step passes
when SIPp counts no failed call and no unexpected message, every call placed has a
completed recording, and every recording lasts 10 s within `DURATION_TOLERANCE_S`. The
figure is the highest rate that passes with every lower rate passing; the ramp stops at
the first failing step.

The same UAC then calls SIPp's own UAS (`sipp -sn uas -rtp_echo`) at the same rate: what
the SIP and RTP load costs with no recording at all. Our CPU per call and p99 INVITE to
200 are printed as ratios to the UAS's.

INVITE to 200 is taken from SIPp's short message trace (`-trace_shortmsg`, microsecond
timestamps of each message as SIPp sent or read it): SIPp's own response-time counters
tick with its event loop (4 ms here), too coarse for a UAS that answers in about 1 ms.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import audio
from benchmarks.common import HERE, fresh_work, print_table, rnd, verdict
from benchmarks.server import APP, HEADERS, Server, proc_status
from mediaserver.config import Config
from mediaserver.tools.ports import free_port, free_udp_range

TITLE = ("SIP call rate: SIPp places 10 s PCMU calls at rising rates, every call recorded; failures, recordings, "
         "INVITE to 200, CPU per call, against SIPp's own UAS")

RAMP = (10, 25, 50, 100, 150, 200)
QUICK_RAMP = (10, 25)
HOLD_S, QUICK_HOLD_S = 60.0, 5.0  # how long each rate is offered
CALL_S = 10  # RTP per call, and the time from the ACK to the BYE
PTIME_MS = 20
# A recording runs from the answer to the BYE's arrival: the hold SIPp times from its ACK,
# plus the 200's trip to SIPp, SIPp's timer (10 ms resolution) and how late SIPp and the
# server are scheduled on a loaded machine. 0.3 s leaves room for those, and still catches
# a recording that lost part of its call or outlived it (a backlog that ends sessions late).
DURATION_TOLERANCE_S = 0.3
TARGET_CPS = 100
RTP_PORTS = (20000, 31999)  # below the kernel's ephemeral ports: 6,000 legs, about 3x what 200 cps holds
SETTLE_S = 2.0  # after a start, before the idle cost is measured
IDLE_S = 2.0  # each process's CPU with no call, measured before every step (`net` subtracts it)
UAC_NICE = -10  # SIPp stands for the network: run it ahead of what it loads (needs root)
SCENARIO = HERE / "sipp" / "uac_cps.xml"
SERVICE = APP["id"]  # the Request-URI's user part: the app that owns the calls
PENDING = ("initiated", "recording", "paused", "stopped", "processing")


# -- the capture SIPp replays --------------------------------------------------------------


def write_pcap(path: Path, ulaw: bytes) -> int:
    """`ulaw` as a classic pcap of Ethernet/IPv4/UDP/RTP packets (PCMU, 20 ms each).

    SIPp's `play_pcap_audio` rewrites the addresses and ports and keeps the RTP headers
    and the packets' spacing (their capture timestamps). Returns the number of packets.
    """
    size = 8000 * PTIME_MS // 1000
    count = len(ulaw) // size
    records = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]  # LINKTYPE_ETHERNET
    for index in range(count):
        marker = 0x80 if index == 0 else 0  # RFC 3551 §4.1: the first packet of a talkspurt
        rtp = struct.pack("!BBHII", 0x80, marker, index, index * size, 0x5EED5EED) + ulaw[index * size:(index + 1) * size]
        udp = struct.pack("!HHHH", 40000, 40002, 8 + len(rtp), 0) + rtp
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), index, 0, 64, 17, 0,
                         socket.inet_aton("127.0.0.1"), socket.inet_aton("127.0.0.1")) + udp
        frame = bytes(12) + b"\x08\x00" + ip
        micros = index * PTIME_MS * 1000
        records.append(struct.pack("<IIII", micros // 1_000_000, micros % 1_000_000, len(frame), len(frame)) + frame)
    path.write_bytes(b"".join(records))
    return count


def prepare(work: Path) -> tuple[Path, int]:
    """The scenario with the capture's path in it (SIPp expands no variable there), and the
    number of packets each call sends."""
    ulaw, _ = audio.speech_legs(work, CALL_S)
    pcap = work / f"call-{CALL_S}s.pcap"
    packets = write_pcap(pcap, ulaw.read_bytes())
    scenario = work / SCENARIO.name
    scenario.write_text(SCENARIO.read_text().replace("@PCAP@", str(pcap)))
    return scenario, packets


# -- SIPp as the caller --------------------------------------------------------------------


@dataclass
class UacRun:
    """What SIPp's UAC counted over one step, and what its message trace says."""

    returncode: int
    placed: int
    successful: int
    failed: int
    unexpected: int
    retransmissions: int
    peak_calls: int
    cps_achieved: float | None
    invite_200_ms: list[float]
    non_200_finals: int
    cpu_s: float
    wall_s: float
    output_tail: str = ""


def _lower_nice() -> None:
    with contextlib.suppress(OSError):
        os.nice(UAC_NICE)


def _uac_command(target: str, rate: int, calls: int, scenario: Path, timeout_s: int) -> list[str]:
    media = free_udp_range(4)[0]
    limit = 2 * rate * (CALL_S + 1) + 100  # twice the calls a rate holds: a slow answer must not throttle SIPp
    return ["sipp", target, "-sf", str(scenario), "-s", SERVICE, "-t", "u1",
            "-i", "127.0.0.1", "-p", str(free_port(socket.SOCK_DGRAM)), "-cp", str(free_port(socket.SOCK_DGRAM)),
            "-mi", "127.0.0.1", "-mp", str(media), "-r", str(rate), "-rp", "1000", "-m", str(calls), "-l", str(limit),
            "-set", "hold_ms", str(CALL_S * 1000), "-nostdin", "-timeout", f"{timeout_s}s", "-timeout_error",
            "-trace_stat", "-stf", "stat.csv", "-fd", "1", "-trace_shortmsg", "-shortmessage_file", "messages.tsv",
            "-trace_err", "-error_file", "errors.log"]


def place_calls(target: str, rate: int, hold_s: float, scenario: Path, cwd: Path,
                sample: Callable[[], None]) -> UacRun:
    """Run SIPp's UAC against `target` for `rate x hold_s` calls, calling `sample` about
    twice a second while it runs; its CPU time comes from wait4(2)."""
    cwd.mkdir(parents=True, exist_ok=True)
    calls = round(rate * hold_s)
    timeout_s = int(hold_s + CALL_S + 60)
    with open(cwd / "sipp.out", "wb") as out:
        proc = subprocess.Popen(_uac_command(target, rate, calls, scenario, timeout_s), cwd=cwd,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_lower_nice)
    returncode, usage, wall = _wait_sampling(proc, timeout_s + 30, sample)
    stats = _last_stat_row(cwd / "stat.csv")
    trace = _message_trace(cwd / "messages.tsv")
    tail = (cwd / "sipp.out").read_text(errors="replace")[-1500:] if stats["OutgoingCall(C)"] == 0 else ""
    return UacRun(returncode, stats["OutgoingCall(C)"], stats["SuccessfulCall(C)"], stats["FailedCall(C)"],
                  stats["FailedUnexpectedMessage(C)"], stats["Retransmissions(C)"], stats["peak_calls"],
                  trace["cps_achieved"], trace["invite_200_ms"], trace["non_200_finals"],
                  usage.ru_utime + usage.ru_stime, wall, tail)


def _wait_sampling(proc: subprocess.Popen, limit_s: float, sample: Callable[[], None]) -> tuple[int, Any, float]:
    """Wait for `proc` (killed past `limit_s`) with wait4(2), for its rusage, sampling meanwhile."""
    began = time.monotonic()
    try:
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                return proc.returncode, usage, time.monotonic() - began
            if time.monotonic() - began > limit_s:
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = os.waitstatus_to_exitcode(status)
                return proc.returncode, usage, time.monotonic() - began
            sample()
            time.sleep(0.5)
    finally:
        if proc.returncode is None:  # interrupted: leave no SIPp behind
            proc.kill()
            os.wait4(proc.pid, 0)
            proc.returncode = -signal.SIGKILL


def _last_stat_row(path: Path) -> dict[str, int]:
    """SIPp's cumulative counters at its exit (the last row of -trace_stat), and the most
    calls it had open at once (the largest CurrentCall of any row)."""
    names = ("OutgoingCall(C)", "SuccessfulCall(C)", "FailedCall(C)", "FailedUnexpectedMessage(C)", "Retransmissions(C)")
    try:
        lines = [line.rstrip(";\n").split(";") for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        lines = []
    if len(lines) < 2:
        return {**dict.fromkeys(names, 0), "peak_calls": 0}
    rows = [dict(zip(lines[0], row)) for row in lines[1:]]
    found = {name: int(rows[-1].get(name) or 0) for name in names}
    found["peak_calls"] = max(int(row.get("CurrentCall") or 0) for row in rows)
    return found


def _message_trace(path: Path) -> dict[str, Any]:
    """From SIPp's short message trace: each call's INVITE to 200 (the first INVITE sent to
    the first final answer read), the final answers that were not 200, and the rate the
    INVITEs actually left at (first to last, SIPp's own clock)."""
    invites: dict[str, float] = {}
    finals: dict[str, tuple[int, float]] = {}
    try:
        text = path.read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) < 7 or fields[5].replace("CSeq:", "").split() != ["1", "INVITE"]:
            continue
        at, call_id, first = float(fields[2]), fields[4], fields[6]
        if fields[3] == "S" and first.startswith("INVITE"):
            invites.setdefault(call_id, at)
        elif fields[3] == "R" and first.startswith("SIP/2.0 "):
            code = int(first.split()[1])
            if code >= 200:
                finals.setdefault(call_id, (code, at))
    latencies = sorted((at - invites[cid]) * 1000 for cid, (code, at) in finals.items() if code == 200 and cid in invites)
    sent = sorted(invites.values())
    achieved = (len(sent) - 1) / (sent[-1] - sent[0]) if len(sent) > 1 and sent[-1] > sent[0] else None
    return {"invite_200_ms": latencies, "non_200_finals": sum(code != 200 for code, _ in finals.values()),
            "cps_achieved": achieved}


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank percentile of sorted `values` (None when there are none)."""
    if not values:
        return None
    return values[min(len(values), max(1, math.ceil(q * len(values)))) - 1]


# -- the peer: SIPp's own UAS --------------------------------------------------------------


class SippUas:
    """`sipp -sn uas -rtp_echo` on free loopback ports: answers every INVITE (180, 200),
    echoes the RTP it receives, records nothing."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.port = free_port(socket.SOCK_DGRAM)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> "SippUas":
        self.cwd.mkdir(parents=True, exist_ok=True)
        cmd = ["sipp", "-sn", "uas", "-rtp_echo", "-t", "u1", "-i", "127.0.0.1", "-p", str(self.port),
               "-cp", str(free_port(socket.SOCK_DGRAM)), "-mi", "127.0.0.1", "-mp", str(free_udp_range(4)[0]), "-nostdin"]
        with open(self.cwd / "sipp-uas.out", "wb") as out:
            self.proc = subprocess.Popen(cmd, cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not _udp_bound(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"SIPp's UAS did not start: {(self.cwd / 'sipp-uas.out').read_text(errors='replace')[-1000:]}")
            time.sleep(0.05)
        return self

    def status(self) -> dict[str, Any]:
        return proc_status(self.proc.pid)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _udp_bound(port: int) -> bool:
    with open("/proc/net/udp") as fh:
        next(fh)
        return any(int(line.split()[1].rsplit(":", 1)[1], 16) == port for line in fh)


# -- one step ------------------------------------------------------------------------------


def _idle_cores(cpu: Callable[[], float]) -> float:
    """Cores a process burns with no call, over IDLE_S."""
    before, began = cpu(), time.monotonic()
    time.sleep(IDLE_S)
    return (cpu() - before) / (time.monotonic() - began)


def _udp_errors() -> dict[str, int]:
    with open("/proc/net/snmp") as fh:
        lines = [line.split() for line in fh if line.startswith("Udp:")]
    return {name: int(value) for name, value in zip(lines[0][1:], lines[1][1:])}


def _recordings(server: Server) -> list[dict[str, Any]]:
    rows, offset = [], 0
    while True:
        request = urllib.request.Request(f"{server.base_url}/api/v1/recordings?limit=500&offset={offset}", headers=HEADERS)
        with urllib.request.urlopen(request, timeout=30) as response:
            page = json.load(response)
        rows += page["data"]
        if not page["pagination"]["has_more"]:
            return rows
        offset += 500


def _settled(server: Server, placed: int, sample: Callable[[], None]) -> None:
    """Wait until every recording is stored: all `placed` calls have one in a final state,
    or none is pending and no session is left (a refused call has none), or time is up.
    Reads only /metrics, which costs the server little: listing thousands of recordings
    while its CPU is measured would bill the API's work to the calls."""
    deadline = time.monotonic() + 60 + placed / 50
    quiet = 0
    while time.monotonic() < deadline:
        metrics = server.metrics()
        states = {key.split('"')[1]: value for key, value in metrics.items() if key.startswith("mediaserver_recordings{")}
        pending = sum(states.get(state, 0) for state in PENDING)
        stored = states.get("completed", 0) + states.get("failed", 0)
        quiet = quiet + 1 if pending == 0 and metrics.get("mediaserver_sessions_active", 0.0) == 0 else 0
        if (stored >= placed and pending == 0) or quiet >= 3:
            return
        sample()
        time.sleep(0.5)


@dataclass
class Usage:
    """CPU and RSS of the process (tree) that answered a step, over the step."""

    idle_cores: float
    cpu_s: float = 0.0
    window_s: float = 0.0
    rss_start_kib: int = 0
    rss_peak_kib: int = 0


def _uac_row(rate: int, run: UacRun, usage: Usage) -> dict[str, Any]:
    """The columns both rows share: what SIPp counted and what answering cost."""
    net = max(usage.cpu_s - usage.idle_cores * usage.window_s, 0.0)
    lat = run.invite_200_ms
    return {
        "cps_offered": rate, "cps_achieved": rnd(run.cps_achieved, 2), "calls_placed": run.placed,
        "calls_ok": run.successful, "calls_failed": run.failed, "unexpected_msgs": run.unexpected,
        "non_200_finals": run.non_200_finals, "retransmissions": run.retransmissions, "peak_calls": run.peak_calls,
        "invite_200_p50_ms": rnd(percentile(lat, 0.5), 2), "invite_200_p99_ms": rnd(percentile(lat, 0.99), 2),
        "invite_200_max_ms": rnd(lat[-1] if lat else None, 2),
        "cpu_ms_per_call": rnd(usage.cpu_s / run.placed * 1000, 2) if run.placed else None,
        "cpu_ms_per_call_net": rnd(net / run.placed * 1000, 2) if run.placed else None,
        "cpu_cores": rnd(usage.cpu_s / usage.window_s, 3) if usage.window_s else None,
        "idle_cores": rnd(usage.idle_cores, 3),
        "rss_start_mib": rnd(usage.rss_start_kib / 1024, 1), "rss_peak_mib": rnd(usage.rss_peak_kib / 1024, 1),
        "uac_cpu_ms_per_call": rnd(run.cpu_s / run.placed * 1000, 2) if run.placed else None,
        "uac_cores": rnd(run.cpu_s / run.wall_s, 3) if run.wall_s else None,
        "uac_returncode": run.returncode, "window_s": rnd(usage.window_s, 1),
    }


def measure_server(rate: int, hold_s: float, work: Path, scenario: Path, packets: int,
                   settings: dict[str, Any]) -> dict[str, Any]:
    """One step against a fresh server: calls placed, recordings judged, CPU and RSS."""
    step = work / f"{rate}cps-server"
    step.mkdir(parents=True, exist_ok=True)
    server = Server(step, rtp_ports=RTP_PORTS, **settings)
    server.start()
    try:
        time.sleep(SETTLE_S)  # what starting costs (imports, first allocations) is not idle
        usage = Usage(_idle_cores(lambda: server.status()["cpu"]))
        start, udp0, began = server.status(), _udp_errors(), time.monotonic()
        usage.rss_start_kib = usage.rss_peak_kib = start["VmRSS"]

        def sample() -> None:
            usage.rss_peak_kib = max(usage.rss_peak_kib, server.status()["VmRSS"])

        run = place_calls(f"127.0.0.1:{server.env['MEDIASERVER_SIP_PORT']}", rate, hold_s, scenario, step, sample)
        _settled(server, run.placed, sample)
        end, usage.window_s = server.status(), time.monotonic() - began
        usage.cpu_s = end["cpu"] - start["cpu"]
        metrics, udp1 = server.metrics(), _udp_errors()
        rows = _recordings(server)
    finally:
        server.stop()
        # 200 cps held 60 s stores 12,000 recordings (about 2 GB of WAV): judged, they go.
        shutil.rmtree(server.data_dir, ignore_errors=True)
    row = _uac_row(rate, run, usage)
    row.update(_judge_recordings(rows, run.placed, packets))
    late = metrics.get('mediaserver_input_dropped_total{reason="late_samples"}', 0.0)
    row.update({
        "late_samples": int(late),
        "late_ms_per_call": rnd(late / 8 / run.placed, 1) if run.placed else None,
        "refused_by_server": int(sum(v for k, v in metrics.items() if k.startswith("mediaserver_calls_refused_total"))),
        "processing_errors": int(metrics.get("mediaserver_processing_errors_total", 0.0)),
        "udp_rcvbuf_errors": udp1.get("RcvbufErrors", 0) - udp0.get("RcvbufErrors", 0),
        "server_processes": end["processes"],
    })
    row["passed"] = passed(row)
    if run.output_tail:
        print(f"sip_cps: SIPp placed no call:\n{run.output_tail}", flush=True)
    return row


def _judge_recordings(rows: list[dict[str, Any]], placed: int, packets: int) -> dict[str, Any]:
    """Completed recordings against the calls placed; their durations against the call's."""
    done = [row for row in rows if row["state"] == "completed"]
    durations = sorted(float(row["duration"] or 0.0) for row in done)
    off = sum(abs(d - CALL_S) > DURATION_TOLERANCE_S for d in durations)
    received = [sum(leg.get("packets", 0) for leg in row["legs"]) for row in done]
    return {
        "recordings_completed": len(done), "recordings_failed": sum(row["state"] == "failed" for row in rows),
        "recordings_missing": max(placed - len(done), 0), "recordings_off_duration": off,
        "duration_min_s": rnd(durations[0], 3) if durations else None,
        "duration_max_s": rnd(durations[-1], 3) if durations else None,
        "packets_short": sum(max(packets - got, 0) for got in received),
    }


def passed(row: dict[str, Any]) -> bool:
    """No call failed or met an unexpected message, every call placed has a completed
    recording, and every recording lasts the call's 10 s within the tolerance."""
    return (row["calls_placed"] > 0 and row["calls_failed"] == 0 and row["unexpected_msgs"] == 0
            and row["calls_ok"] == row["calls_placed"] and row["recordings_missing"] == 0
            and row["recordings_completed"] == row["calls_placed"] and row["recordings_off_duration"] == 0)


def measure_peer(rate: int, hold_s: float, work: Path, scenario: Path) -> dict[str, Any]:
    """The same step against SIPp's own UAS: what the calls cost with nothing recorded."""
    step = work / f"{rate}cps-uas"
    uas = SippUas(step).start()
    try:
        time.sleep(SETTLE_S)
        usage = Usage(_idle_cores(lambda: uas.status()["cpu"]))
        start, began = uas.status(), time.monotonic()
        usage.rss_start_kib = usage.rss_peak_kib = start["VmRSS"]

        def sample() -> None:
            usage.rss_peak_kib = max(usage.rss_peak_kib, uas.status()["VmRSS"])

        run = place_calls(f"127.0.0.1:{uas.port}", rate, hold_s, scenario, step, sample)
        end, usage.window_s = uas.status(), time.monotonic() - began
        usage.cpu_s = end["cpu"] - start["cpu"]
    finally:
        uas.stop()
    row = _uac_row(rate, run, usage)
    row["passed"] = run.placed > 0 and run.failed == 0 and run.unexpected == 0 and run.successful == run.placed
    return row


# -- the run -------------------------------------------------------------------------------


def server_settings() -> dict[str, Any]:
    """Beyond the defaults: every call recorded (what the row measures), and a worker process
    per usable core, as rtp_load and README's performance rows run the server."""
    return {"record_policy": "all", "workers": len(os.sched_getaffinity(0))}


def effective_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings the figures depend on, defaults included, as the server reads them."""
    config = Config()
    names = ("workers", "record_policy", "default_format", "default_sample_rate", "default_channels", "jitter_ms",
             "process_ms", "max_calls", "overload_lateness_ms")
    return {**{name: settings.get(name, getattr(config, name)) for name in names}, "rtp_ports": list(RTP_PORTS),
            "overrides": dict(settings)}


def raise_open_files(needed: int) -> int:
    """Raise this process's RLIMIT_NOFILE (inherited by the server and SIPp) towards
    `needed`: a call holds two UDP sockets in the server and a raw socket in SIPp."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = needed if hard == resource.RLIM_INFINITY else min(max(soft, needed), hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _ratio(ours: float | None, peer: float | None) -> float | None:
    return rnd(ours / peer, 2) if ours is not None and peer else None


def ratios(ours: list[dict[str, Any]], peers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per rate: our CPU per call and p99 INVITE to 200 over the UAS's."""
    by_rate = {row["cps_offered"]: row for row in peers}
    return [{"cps_offered": row["cps_offered"],
             "cpu_per_call_x": _ratio(row["cpu_ms_per_call"], by_rate.get(row["cps_offered"], {}).get("cpu_ms_per_call")),
             "invite_200_p99_x": _ratio(row["invite_200_p99_ms"], by_rate.get(row["cps_offered"], {}).get("invite_200_p99_ms"))}
            for row in ours]


def best_rate(rows: list[dict[str, Any]]) -> int:
    """The highest rate that passed with every lower rate passing (0 if the first failed)."""
    best = 0
    for row in sorted(rows, key=lambda row: row["cps_offered"]):
        if not row["passed"]:
            break
        best = row["cps_offered"]
    return best


COMMON = [("cps", "cps_offered", ""), ("achieved", "cps_achieved", ".1f"), ("placed", "calls_placed", ""),
          ("failed", "calls_failed", ""), ("unexp", "unexpected_msgs", ""), ("non-200", "non_200_finals", ""),
          ("retrans", "retransmissions", ""), ("peak calls", "peak_calls", "")]
TIMES = [("p50 ms", "invite_200_p50_ms", ".2f"), ("p99 ms", "invite_200_p99_ms", ".2f"), ("max ms", "invite_200_max_ms", ".1f"),
         ("CPU ms/call", "cpu_ms_per_call", ".2f"), ("net", "cpu_ms_per_call_net", ".2f"), ("cores", "cpu_cores", ".2f"), ("idle", "idle_cores", ".3f"),
         ("RSS MiB", "rss_peak_mib", ".0f"), ("UAC ms/call", "uac_cpu_ms_per_call", ".2f"), ("UAC cores", "uac_cores", ".2f")]


def print_rows(ours: list[dict[str, Any]], peers: list[dict[str, Any]]) -> None:
    print_table("Our server, every call recorded (a fresh server per rate; INVITE to 200 from SIPp's trace; "
                "CPU of all its processes per call; net: less its idle cost)", COMMON + [
                    ("stored", "recordings_completed", ""), ("missing", "recordings_missing", ""),
                    ("off 10s", "recordings_off_duration", ""), ("min s", "duration_min_s", ".3f"),
                    ("max s", "duration_max_s", ".3f"), ("pkts short", "packets_short", ""),
                    ("late ms/call", "late_ms_per_call", ".1f"), ("refused", "refused_by_server", ""), ("proc err", "processing_errors", ""),
                    ("rcvbuf err", "udp_rcvbuf_errors", "")] + TIMES + [("pass", "passed", "")], ours)
    print_table("Peer: SIPp's own UAS (sipp -sn uas -rtp_echo), nothing recorded", COMMON + TIMES + [("pass", "passed", "")], peers)
    print_table("Ours over the peer's", [("cps", "cps_offered", ""), ("CPU/call x", "cpu_per_call_x", ".2f"),
                                          ("p99 INVITE-200 x", "invite_200_p99_x", ".2f")], ratios(ours, peers))


def summary(ours: list[dict[str, Any]], peers: list[dict[str, Any]], best: int, settings: dict[str, Any]) -> str:
    """The line README's table takes its figure from."""
    text = (f"{best} calls per second pass (workers {settings['workers']}, record_policy {settings['record_policy']}, "
            f"{settings['default_format']} {settings['default_sample_rate']} Hz)")
    row = next((r for r in ours if r["cps_offered"] == best), None)
    if row is not None:
        ratio = next(r for r in ratios(ours, peers) if r["cps_offered"] == best)
        text += (f": {row['cpu_ms_per_call']} ms CPU per call ({ratio['cpu_per_call_x']}x SIPp's UAS), "
                 f"p99 INVITE to 200 {row['invite_200_p99_ms']} ms ({ratio['invite_200_p99_x']}x), "
                 f"peak RSS {row['rss_peak_mib']} MiB")
    failing = next((r for r in ours if not r["passed"]), None)
    if failing is not None:
        text += (f"; first failing step {failing['cps_offered']} cps: {failing['calls_failed']} of "
                 f"{failing['calls_placed']} calls failed ({failing['non_200_finals']} answered non-200, "
                 f"{failing['refused_by_server']} refused by the server), {failing['recordings_missing']} recordings "
                 f"missing, {failing['recordings_off_duration']} off 10 s (min {failing['duration_min_s']}, max "
                 f"{failing['duration_max_s']} s)")
    return text


def _check_tools() -> None:
    if subprocess.run(["which", "sipp"], capture_output=True).returncode != 0:
        raise RuntimeError("sip_cps needs SIPp (apt-get install sip-tester)")
    if os.geteuid() != 0:
        raise RuntimeError("sip_cps needs root: SIPp replays the capture through a raw socket (play_pcap_audio)")


def run(quick: bool) -> dict[str, Any]:
    _check_tools()
    ramp, hold_s = (QUICK_RAMP, QUICK_HOLD_S) if quick else (RAMP, HOLD_S)
    work = fresh_work("sip_cps")
    scenario, packets = prepare(work)
    settings = server_settings()
    effective = effective_settings(settings)
    open_files = raise_open_files(8 * max(ramp) * (CALL_S + 2) + 4096)
    print(f"sip_cps: server settings {effective}; open files {open_files}"
          + ("; quick: a smoke run, short holds at low rates, not a capacity" if quick else ""), flush=True)
    ours, peers = [], []
    for rate in ramp:
        print(f"sip_cps: {rate} cps for {hold_s:.0f} s, {CALL_S} s calls, into the server …", flush=True)
        ours.append(measure_server(rate, hold_s, work, scenario, packets, settings))
        print(f"sip_cps: {rate} cps for {hold_s:.0f} s into SIPp's UAS …", flush=True)
        peers.append(measure_peer(rate, hold_s, work, scenario))
        print_rows(ours[-1:], peers[-1:])
        if not ours[-1]["passed"]:
            break  # the first failing rate ends the ramp: what lies above it is not capacity
    print_rows(ours, peers)
    best = best_rate(ours)
    line = ("quick smoke run, not a capacity: " if quick else "") + summary(ours, peers, best, effective)
    print(f"\nSUMMARY sip_cps: {line}", flush=True)
    detail = (f"held {hold_s:.0f} s per rate, {CALL_S} s calls, workers {effective['workers']}, record_policy all"
              + (f"; quick: rates up to {max(ramp)} cps, a smoke run, not a capacity" if quick else ""))
    verdicts = [verdict("calls per second sustained with none failed, every call's recording completed and "
                        f"{CALL_S} s within {DURATION_TOLERANCE_S} s, every lower rate passing", best, TARGET_CPS,
                        " cps", detail=detail)]
    figures = {"steps": ours, "peer_steps": peers, "ratios": ratios(ours, peers), "largest_ok_cps": best, "summary": line}
    settings_out = {"ramp": list(ramp), "hold_s": hold_s, "call_s": CALL_S, "codec": f"PCMU {PTIME_MS} ms",
                    "packets_per_call": packets, "media": "play_pcap_audio of a capture written by the benchmark",
                    "scenario": str(SCENARIO.relative_to(HERE.parent)), "duration_tolerance_s": DURATION_TOLERANCE_S,
                    "server_settings": effective, "peer": "sipp -sn uas -rtp_echo", "uac_nice": UAC_NICE,
                    "idle_s": IDLE_S, "open_files_limit": open_files, "target_cps": TARGET_CPS}
    return {"settings": settings_out, "figures": figures, "verdicts": verdicts}
