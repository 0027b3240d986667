"""End to end: N concurrent two-leg calls as real RTP over loopback into `mediaserver serve`.

For each N of a ramp a fresh server is started; N sessions are created through the API,
each with two RTP legs by SDP offer/answer (PCMU) and an MP3 recording (16 kbps, 8 kHz,
mono). A sender in another process (`benchmarks.rtp_sender`) then streams 20 ms packets
to all 2N legs in real time. Over a steady window the server's CPU, RSS and tick lateness
are measured; afterwards the sessions are hung up, every recording must be stored, and its
per-leg counters say how many packets arrived. The kernel's UDP receive errors count
packets the server was too slow to read.

The server runs at its defaults (`jitter_ms`, `process_ms`, ...) except `workers`, one per
usable core, as README recommends for a server that holds many calls. The figure that
matters is the largest N that passes with every smaller step passing too: nothing dropped
(every packet sent was received and mixed), no send refused by the sender's kernel, no
sample late, every recording stored, and a p99 tick lateness within 20 ms.

CPU per packet (µs of server CPU, all its processes, per RTP packet received, from the
sender's start to its end) is the hot path's cost, and the least noisy figure on a busy
machine: `--quick` runs one short step and prints it beside the last full run's figure.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks import audio
from benchmarks.common import RESULTS, fresh_work, print_table, rnd, verdict
from benchmarks.server import HEADERS, Server
from mediaserver.config import Config

TITLE = "End to end: N concurrent two-leg RTP calls recorded to MP3, ramped; drops, tick lateness, CPU and RSS per call"

RAMP = (250, 500, 750, 900, 950, 1000, 1050, 1100, 1150, 1200)
QUICK_RAMP = (250,)  # one step, the full ramp's first: its CPU per packet compares with the full run's
RUN_S, QUICK_RUN_S = 20.0, 10.0
WARMUP_S = 4.0  # after the sender starts, before the steady window
STREAM_RAMP_S = 2.0  # the calls' streams begin one after another over this, as calls do
RTP_PORTS = (30000, 39999)
RECORD = {"format": "mp3", "bitrate": 16}
TARGET_CALLS = 1000
LATENESS_MS = 20.0
CONCURRENCY = 32
SENDER_NICE = -10


def offer(port: int = 9) -> str:
    return ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            f"m=audio {port} RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\na=sendonly\r\n")


def answer_port(sdp: str) -> int:
    for line in sdp.splitlines():
        if line.startswith("m=audio "):
            return int(line.split()[1])
    raise RuntimeError(f"no audio port in the answer: {sdp!r}")


async def _api(http: aiohttp.ClientSession, method: str, path: str, **kwargs) -> Any:
    for attempt in range(5):
        async with http.request(method, path, headers=HEADERS, **kwargs) as response:
            body = await response.json(content_type=None)
            if response.status < 300:
                return body
            if response.status != 503:
                raise RuntimeError(f"{method} {path}: {response.status} {body}")
        await asyncio.sleep(0.2 * (attempt + 1))
    raise RuntimeError(f"{method} {path}: still unavailable")


async def _open_call(http: aiohttp.ClientSession, limit: asyncio.Semaphore) -> tuple[str, str, list[int]]:
    async with limit:
        uuid = (await _api(http, "POST", "/api/v1/sessions", json={}))["uuid"]
        ports = []
        for role in ("caller", "callee"):
            leg = await _api(http, "POST", f"/api/v1/sessions/{uuid}/legs", json={"role": role, "sdp": offer()})
            ports.append(answer_port(leg["sdp"]))
        rid = (await _api(http, "POST", f"/api/v1/sessions/{uuid}/commands/record/start", json=RECORD))["recording_id"]
        return uuid, rid, ports


async def _open_calls(base_url: str, n: int) -> list[tuple[str, str, list[int]]]:
    limit = asyncio.Semaphore(CONCURRENCY)
    async with aiohttp.ClientSession(base_url, timeout=aiohttp.ClientTimeout(total=120)) as http:
        return await asyncio.gather(*(_open_call(http, limit) for _ in range(n)))


async def _hang_up_and_collect(base_url: str, calls: list[tuple[str, str, list[int]]], timeout: float) -> list[dict]:
    limit = asyncio.Semaphore(CONCURRENCY)
    async with aiohttp.ClientSession(base_url, timeout=aiohttp.ClientTimeout(total=120)) as http:
        async def hang_up(uuid: str) -> None:
            async with limit:
                await _api(http, "DELETE", f"/api/v1/sessions/{uuid}")

        await asyncio.gather(*(hang_up(uuid) for uuid, _, _ in calls))
        deadline = time.monotonic() + timeout
        wanted = {rid for _, rid, _ in calls}
        while True:
            rows = await _all_recordings(http)
            done = [row for row in rows if row["recording_id"] in wanted and row["state"] in ("completed", "failed")]
            if len(done) == len(wanted) or time.monotonic() > deadline:
                return done
            await asyncio.sleep(0.5)


async def _all_recordings(http: aiohttp.ClientSession) -> list[dict]:
    rows, offset = [], 0
    while True:
        page = await _api(http, "GET", f"/api/v1/recordings?limit=500&offset={offset}")
        rows += page["data"]
        if not page["pagination"]["has_more"]:
            return rows
        offset += 500


def _udp_errors() -> dict[str, int]:
    with open("/proc/net/snmp") as fh:
        lines = [line.split() for line in fh if line.startswith("Udp:")]
    return {name: int(value) for name, value in zip(lines[0][1:], lines[1][1:])}


def _lateness(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """p50/p99 (upper bucket bounds, ms) of the ticks between two scrapes of /metrics."""
    buckets = sorted(((float(key.split('le="')[1].rstrip('"}')) if "+Inf" not in key else float("inf")), after[key] - before.get(key, 0))
                     for key in after if key.startswith("mediaserver_tick_lateness_seconds_bucket"))
    total = buckets[-1][1] if buckets else 0
    result: dict[str, float | None] = {"ticks": total}
    for name, q in (("p50_ms", 0.5), ("p99_ms", 0.99)):
        bound = next((le for le, count in buckets if count >= q * total), None) if total else None
        # Past the largest bound (+Inf) there is no figure to give: None, which fails the step.
        result[name] = None if bound is None or bound == float("inf") else bound * 1000
    return result


def _raise_priority() -> None:
    """The sender stands for the network: run it ahead of the server it shares the cores
    with, so that its own lateness does not pass for the server's (needs root; without it
    the sender runs at normal priority, and its lateness columns show what that costs)."""
    try:
        os.nice(SENDER_NICE)
    except OSError:
        pass


def _sender(plan: dict[str, Any], work: Path) -> subprocess.Popen:
    path = work / "plan.json"
    path.write_text(json.dumps(plan))
    return subprocess.Popen([sys.executable, "-m", "benchmarks.rtp_sender"], stdin=open(path), stdout=subprocess.PIPE,
                            cwd=Path(__file__).resolve().parent.parent, preexec_fn=_raise_priority)


def _rtp_queued(ports: tuple[int, int] = RTP_PORTS) -> int:
    """Bytes waiting in the receive queues of the UDP sockets bound in `ports` (/proc/net/udp)."""
    queued = 0
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(table) as fh:
                next(fh)
                for line in fh:
                    fields = line.split()
                    port = int(fields[1].rsplit(":", 1)[1], 16)
                    if ports[0] <= port <= ports[1]:
                        queued += int(fields[4].split(":")[1], 16)
        except OSError:
            continue
    return queued


def _caught_up(server: Server, limit_s: float = 30.0) -> dict[str, Any]:
    """The server's status once it has read every packet still queued in its RTP sockets
    after the sender stopped: a server behind its load reads them later, the recordings
    count them, so the CPU that reads them must be counted too."""
    deadline = time.monotonic() + limit_s
    while _rtp_queued() and time.monotonic() < deadline:
        time.sleep(0.1)
    return server.status()


def measure(n: int, seconds: float, work: Path, payload: Path, server_settings: dict[str, Any]) -> dict[str, Any]:
    """One step of the ramp: N calls on a fresh server."""
    server = Server(work, rtp_ports=RTP_PORTS, **server_settings)
    server.start()
    try:
        time.sleep(1.0)
        idle = server.status()
        calls = asyncio.run(_open_calls(server.base_url, n))
        time.sleep(0.5)
        loaded = server.status()
        targets = [port for _, _, ports in calls for port in ports]
        udp0 = _udp_errors()
        s0 = server.status()
        sender = _sender({"targets": targets, "seconds": seconds, "payload": str(payload), "ramp_s": STREAM_RAMP_S}, work)
        time.sleep(WARMUP_S)
        s1, m1, t1 = server.status(), server.metrics(), time.monotonic()
        time.sleep(max(seconds - WARMUP_S - 1.0, 1.0))
        s2, m2, t2 = server.status(), server.metrics(), time.monotonic()
        sent = json.loads(sender.communicate(timeout=seconds + 60)[0])
        s3 = _caught_up(server)
        time.sleep(0.5)
        udp1 = _udp_errors()
        rows = asyncio.run(_hang_up_and_collect(server.base_url, calls, timeout=120 + n / 10))
        m3 = server.metrics()
    finally:
        server.stop()
    row = _row(n, seconds, idle, loaded, (s1, t1), (s2, t2), m1, m2, m3, sent, rows, udp0, udp1)
    received = row["packets_received"]
    row["cpu_us_per_packet"] = rnd((s3["cpu"] - s0["cpu"]) / received * 1e6, 2) if received else None
    return row


def _row(n, seconds, idle, loaded, first, second, m1, m2, m3, sent, rows, udp0, udp1) -> dict[str, Any]:
    (s1, t1), (s2, t2) = first, second
    legs = [leg for row in rows for leg in row["legs"]]
    received = sum(leg.get("packets", 0) for leg in legs)
    late = m3.get('mediaserver_input_dropped_total{reason="late_samples"}', 0.0)
    lateness = _lateness(m1, m2)
    window = t2 - t1
    cpu = (s2["cpu"] - s1["cpu"]) / window
    return {
        "calls": n, "stored": sum(row["state"] == "completed" for row in rows), "processes": s2["processes"],
        "packets_sent": sent["packets_sent"], "packets_received": received,
        "packets_dropped": sent["packets_sent"] - received, "send_errors": sent["send_errors"],
        "late_samples_dropped": int(late),
        "udp_rcvbuf_errors": udp1.get("RcvbufErrors", 0) - udp0.get("RcvbufErrors", 0),
        "tick_p50_ms": lateness["p50_ms"], "tick_p99_ms": lateness["p99_ms"],
        "tick_max_ms": rnd(m3.get("mediaserver_tick_lateness_max_seconds", 0.0) * 1000, 1),
        "server_cpu_cores": rnd(cpu, 3), "cpu_per_call_pct": rnd(cpu / n * 100, 3),
        "rss_kib": s2["VmRSS"], "rss_per_call_kib": rnd((s2["VmRSS"] - idle["VmRSS"]) / n, 1),
        "rss_per_call_before_audio_kib": rnd((loaded["VmRSS"] - idle["VmRSS"]) / n, 1),
        "sender_cpu_pct": rnd(sent["cpu_s"] / sent["wall_s"] * 100, 1), "sender_late_p99_ms": rnd(sent["late_p99_ms"], 2),
        "sender_late_max_ms": rnd(sent["late_max_ms"], 1),
        "window_s": rnd(window, 2), "audio_s": seconds,
    }


def ok(row: dict[str, Any]) -> bool:
    """A step passes when every packet meant for the server reached it and was recorded:
    none dropped, none refused by the sender's kernel (a refused send never becomes a
    packet, so `dropped` alone would not see it), no sample late, every recording stored,
    and the p99 tick lateness within the limit."""
    return (row["packets_dropped"] == 0 and row.get("send_errors", 0) == 0 and row["late_samples_dropped"] == 0
            and row["stored"] == row["calls"] and row["tick_p99_ms"] is not None and row["tick_p99_ms"] <= LATENESS_MS)


def best_calls(rows: list[dict[str, Any]]) -> int:
    """The largest N that passed with every smaller step passing too (0 if the first failed):
    a pass above a failure is luck, not capacity."""
    best = 0
    for row in sorted(rows, key=lambda row: row["calls"]):
        if not ok(row):
            break
        best = row["calls"]
    return best


def print_rows(title: str, rows: list[dict[str, Any]]) -> None:
    print_table(title, [
        ("calls", "calls", ""), ("stored", "stored", ""), ("sent", "packets_sent", ""), ("received", "packets_received", ""),
        ("dropped", "packets_dropped", ""), ("send err", "send_errors", ""), ("late smp", "late_samples_dropped", ""), ("rcvbuf err", "udp_rcvbuf_errors", ""),
        ("p50 ms", "tick_p50_ms", "g"), ("p99 ms", "tick_p99_ms", "g"), ("max ms", "tick_max_ms", "g"),
        ("cores", "server_cpu_cores", ".2f"), ("CPU %/call", "cpu_per_call_pct", ".3f"),
        ("µs/packet", "cpu_us_per_packet", ".2f"),
        ("RSS/call KiB", "rss_per_call_kib", ".1f"), ("sender CPU %", "sender_cpu_pct", ".0f"),
        ("sender p99 ms", "sender_late_p99_ms", ".1f"), ("sender max ms", "sender_late_max_ms", ".0f")], rows)


def server_settings() -> dict[str, Any]:
    """What the server runs with here beyond its defaults: a worker process per usable core
    (README's advice for a server holding many calls). Everything else, `jitter_ms`
    included, stays at the default a deployment gets."""
    return {"workers": len(os.sched_getaffinity(0))}


def effective_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings the figures depend on, defaults included, as the server reads them."""
    config = Config()
    return {"workers": settings.get("workers", config.workers), "jitter_ms": settings.get("jitter_ms", config.jitter_ms),
            "process_ms": settings.get("process_ms", config.process_ms),
            "mp3_quality": settings.get("mp3_quality", config.mp3_quality), "overrides": dict(settings)}


def _reference(calls: int) -> dict[str, Any] | None:
    """The last full run's step at `calls`, if it measured CPU per packet."""
    try:
        last = json.loads((RESULTS / "rtp_load.json").read_text())
    except (OSError, ValueError):
        return None
    if last.get("quick"):
        return None
    step = next((row for row in last["figures"]["steps"] if row["calls"] == calls), None)
    if step is None or step.get("cpu_us_per_packet") is None:
        return None
    return {"cpu_us_per_packet": step["cpu_us_per_packet"], "commit": (last.get("source") or {}).get("commit"),
            "date_utc": last.get("date_utc")}


def _guard(row: dict[str, Any]) -> dict[str, Any]:
    """The quick run's regression guard: CPU per packet against the last full run's."""
    ref = _reference(row["calls"])
    value = row["cpu_us_per_packet"]
    print(f"\nCPU per packet: {value} µs of server CPU (all processes) per RTP packet received, "
          f"{row['calls']} calls", flush=True)
    if ref is None:
        print("  no full run with CPU per packet at this N in results/rtp_load.json to compare with", flush=True)
        return {"cpu_us_per_packet": value, "reference": None, "ratio": None}
    ratio = rnd(value / ref["cpu_us_per_packet"], 3) if value else None
    print(f"  the last full run ({ref['date_utc']}, commit {str(ref['commit'])[:10]}): {ref['cpu_us_per_packet']} µs; "
          f"this run is {ratio}x that (other work on the machine moves it by up to 20-30 %)", flush=True)
    return {"cpu_us_per_packet": value, "reference": ref, "ratio": ratio}


def summary(rows: list[dict[str, Any]], best: int, settings: dict[str, Any]) -> str:
    """The line README's table takes its figure from."""
    row = next((r for r in rows if r["calls"] == best), None)
    first_fail = next((r for r in sorted(rows, key=lambda r: r["calls"]) if not ok(r)), None)
    text = (f"{best} calls pass (workers {settings['workers']}, jitter_ms {settings['jitter_ms']}, "
            f"process_ms {settings['process_ms']})")
    if row is not None:
        text += (f": {row['server_cpu_cores']} cores, {row['cpu_per_call_pct']} % of a core and "
                 f"{row['rss_per_call_kib']} KiB per call, {row['cpu_us_per_packet']} µs CPU per packet")
    if first_fail is not None:
        text += (f"; first failing step {first_fail['calls']} calls: {first_fail['packets_dropped']} packets dropped "
                 f"({first_fail['udp_rcvbuf_errors']} kernel receive-buffer overflows), {first_fail['send_errors']} "
                 f"sends refused, {first_fail['late_samples_dropped']} samples late, p99 tick {first_fail['tick_p99_ms']} ms")
    return text


def run(quick: bool) -> dict[str, Any]:
    ramp, seconds = (QUICK_RAMP, QUICK_RUN_S) if quick else (RAMP, RUN_S)
    work = fresh_work("rtp_load")
    payload, _ = audio.speech_legs(work, 60)
    settings = server_settings()
    effective = effective_settings(settings)
    print(f"rtp_load: server settings {effective}", flush=True)
    rows = []
    for n in ramp:
        print(f"rtp_load: {n} calls for {seconds:.0f} s …", flush=True)
        rows.append(measure(n, seconds, work, payload, settings))
        print_rows("so far", rows[-1:])
        if len(rows) >= 3 and not any(ok(row) for row in rows[-3:]):
            break  # three failing steps in a row: the ramp is past what this machine holds
    print_rows("RTP load (per step: a fresh server; CPU and lateness over the steady window)", rows)
    best = best_calls(rows)
    line = summary(rows, best, effective)
    print(f"\nSUMMARY rtp_load: {line}", flush=True)
    figures: dict[str, Any] = {"steps": rows, "largest_ok_calls": best, "summary": line}
    if quick:
        figures["guard"] = _guard(rows[-1])
    verdicts = [verdict("concurrent two-leg calls at the defaults, nothing dropped, refused or late, every smaller "
                        "step passing, p99 tick lateness within 20 ms", best, TARGET_CALLS, " calls",
                        detail=f"workers {effective['workers']}, jitter_ms {effective['jitter_ms']}"
                        + ("; quick: one step only, the guard's figure, not a capacity" if quick else ""))]
    settings_out = {"ramp": list(ramp), "audio_s": seconds, "warmup_s": WARMUP_S, "record": RECORD, "codec": "PCMU 20 ms",
                    "server_settings": effective, "lateness_limit_ms": LATENESS_MS,
                    "sender_nice": SENDER_NICE, "stream_ramp_s": STREAM_RAMP_S}
    return {"settings": settings_out, "figures": figures, "verdicts": verdicts}
