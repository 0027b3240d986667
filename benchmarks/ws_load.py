"""End to end: N concurrent two-leg wavstream calls over WebSocket into `mediaserver serve`.

A fresh server (2 worker processes) gets N sessions through the API, each with an MP3
recording (16 kbps, 8 kHz, mono). Sender processes (`python -m benchmarks.ws_load --sender`)
then open two wavstream sockets per call (caller and callee, PCMU 8 kHz), stream a
continuous tone on each in 20 ms frames in real time for `seconds`, the calls' starts
spread over `ramp_s`; each call then sends `stop` on both legs and hangs up at once
(DELETE), so its last audio may still be on its way through the server.

Every recording is then checked: stored; each leg's audio complete (`audio_ms`) and as
long on the timeline as it was sent (`last_ms - first_ms`); the file as long as the
recording says; and no hole inside the audio (a run of near-zero samples in a tone that
never stops). Numbers are printed, nothing is asserted.

`python -m benchmarks.ws_load [--calls N] [--seconds S] [--ramp S] [--senders K]`
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from yarl import URL

from benchmarks.audio import decode
from benchmarks.common import fresh_work
from benchmarks.server import APP, HEADERS
from mediaserver.tools.serverproc import ServerProcess

RATE = 8000
FRAME = 160  # 20 ms at 8 kHz
PTIME = 0.02
RECORD = {"format": "mp3", "bitrate": 16}
CONCURRENCY = 32
HOLE_MS = 40  # a run of near-zero samples this long inside a continuous tone is a hole
HOLE_LEVEL = 200
TONES = (400.0, 1000.0)  # caller, callee


def _tone(freq: float, seconds: float, dbfs: float = -16.0) -> np.ndarray:
    t = np.arange(round(seconds * RATE)) / RATE
    return (10 ** (dbfs / 20) * 32767 * np.sin(2 * np.pi * freq * t)).astype(np.int16)


# -- the sender process ------------------------------------------------------------------


async def _send_leg(http: aiohttp.ClientSession, url: str, payload: bytes, began: float, late: list[float]) -> int:
    async with http.ws_connect(url) as ws:  # the ingest URL carries its token
        await ws.send_json({"event": "start", "encoding": "PCMU", "sample_rate": RATE, "channels": 1})
        loop = asyncio.get_running_loop()
        frames = len(payload) // FRAME
        for i in range(frames):
            delay = began + i * PTIME - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                late.append(-delay)
            await ws.send_bytes(payload[i * FRAME:(i + 1) * FRAME])
        await ws.send_json({"event": "stop"})
        await ws.receive()
        return frames


async def _send_call(http: aiohttp.ClientSession, call: dict, payloads: list[bytes], origin: float, late: list[float],
                     headers: dict[str, str]) -> dict:
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(origin + call["offset"] - loop.time(), 0))
    began = loop.time() + 0.1  # both sockets open first, then both legs stream together
    frames = await asyncio.gather(*(_send_leg(http, url, payload, began, late) for url, payload in zip(call["urls"], payloads)))
    async with http.delete(f"/api/v1/sessions/{call['uuid']}", headers=headers) as response:
        status = response.status
    return {"uuid": call["uuid"], "frames": list(frames), "delete": status}


async def _sender(plan: dict) -> dict:
    from mediaserver.codecs.g711 import encode_ulaw

    payloads = [encode_ulaw(_tone(freq, plan["seconds"])) for freq in TONES]
    late: list[float] = []
    timeout = aiohttp.ClientTimeout(total=plan["seconds"] + 300)
    async with aiohttp.ClientSession(plan["base_url"], timeout=timeout) as http:
        origin = asyncio.get_running_loop().time()
        results = await asyncio.gather(*(_send_call(http, call, payloads, origin, late, plan["headers"]) for call in plan["calls"]),
                                       return_exceptions=True)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "calls": [r if isinstance(r, dict) else {"error": repr(r)} for r in results],
        "late_frames": len(late), "max_late_ms": round(max(late, default=0.0) * 1000, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
    }


# -- the run -----------------------------------------------------------------------------


async def _api(http: aiohttp.ClientSession, method: str, path: str, **kwargs) -> Any:
    async with http.request(method, path, headers=HEADERS, **kwargs) as response:
        body = await response.json(content_type=None)
        if response.status >= 300:
            raise RuntimeError(f"{method} {path}: {response.status} {body}")
        return body


async def _open_calls(base_url: str, n: int) -> list[dict]:
    limit = asyncio.Semaphore(CONCURRENCY)
    async with aiohttp.ClientSession(base_url) as http:
        async def one() -> dict:
            async with limit:
                session = await _api(http, "POST", "/api/v1/sessions", json={})
                rid = (await _api(http, "POST", f"/api/v1/sessions/{session['uuid']}/commands/record/start", json=RECORD))["recording_id"]
                urls = [URL(session["ingest"]["wavstream"][role]).path_qs for role in ("caller", "callee")]
                return {"uuid": session["uuid"], "rid": rid, "urls": urls}
        return await asyncio.gather(*(one() for _ in range(n)))


def _run_senders(base_url: str, calls: list[dict], senders: int, seconds: float, ramp_s: float) -> list[dict]:
    for i, call in enumerate(calls):
        call["offset"] = ramp_s * i / max(len(calls), 1)
    procs = []
    for k in range(senders):
        plan = {"base_url": base_url, "headers": HEADERS, "seconds": seconds, "calls": calls[k::senders]}
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.ws_load", "--sender"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        proc.stdin.write(json.dumps(plan))
        proc.stdin.close()
        procs.append(proc)
    return [json.loads(proc.stdout.read()) for proc in procs]


async def _collect(base_url: str, calls: list[dict], timeout: float, work: Path) -> tuple[list[dict], dict[str, float]]:
    async with aiohttp.ClientSession(base_url) as http:
        deadline = time.monotonic() + timeout
        metas: dict[str, dict] = {}
        while len(metas) < len(calls) and time.monotonic() < deadline:
            for call in calls:
                if call["rid"] not in metas:
                    meta = await _api(http, "GET", f"/api/v1/recordings/{call['rid']}")
                    if meta["state"] in ("completed", "failed"):
                        metas[call["rid"]] = meta
            await asyncio.sleep(0.5)
        rows = []
        for call in calls:
            meta = metas.get(call["rid"])
            row = {"rid": call["rid"], "state": None if meta is None else meta["state"], "meta": meta}
            if meta is not None and meta["state"] == "completed":
                async with http.get(f"/api/v1/recordings/{call['rid']}/download", headers=HEADERS, allow_redirects=False) as response:
                    location = response.headers["Location"]
                async with http.get(location) as response:
                    path = work / f"{call['rid']}.mp3"
                    path.write_bytes(await response.read())
                row["path"] = path
            rows.append(row)
        async with http.get("/metrics") as response:
            metrics = _metrics(await response.text())
    return rows, metrics


def _metrics(text: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        match = re.match(r"^([a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+)$", line)
        if match:
            values[match.group(1)] = float(match.group(2))
    return values


def _holes(pcm: np.ndarray, start: int, end: int) -> list[tuple[float, float]]:
    """(start s, length ms) of every run of near-zero samples of at least HOLE_MS in [start, end)."""
    quiet = np.abs(pcm[start:end].astype(np.int32)) < HOLE_LEVEL
    edges = np.flatnonzero(np.diff(np.concatenate(([0], quiet.view(np.int8), [0]))))
    runs = edges.reshape(-1, 2)
    return [((start + a) / RATE, (b - a) * 1000 / RATE) for a, b in runs if (b - a) * 1000 / RATE >= HOLE_MS]


def _check(row: dict, seconds: float) -> dict:
    meta = row["meta"]
    if row["state"] != "completed":
        return {"ok": False, "why": f"state {row['state']}"}
    legs = meta["legs"]
    sent_ms = seconds * 1000
    problems = []
    for leg in legs:
        if abs(leg["audio_ms"] - sent_ms) > 20:
            problems.append(f"{leg['role']} audio_ms {leg['audio_ms']}")
        if leg["first_ms"] is None or abs(leg["last_ms"] - leg["first_ms"] - sent_ms) > 20:
            problems.append(f"{leg['role']} spans {leg['first_ms']}..{leg['last_ms']}")
    first = min(leg["first_ms"] or 0 for leg in legs) / 1000
    last = max(leg["last_ms"] or 0 for leg in legs) / 1000
    pcm = decode(row["path"])
    file_s = len(pcm) / RATE
    holes = _holes(pcm, round((first + 0.05) * RATE), round((last - 0.05) * RATE))
    if holes:
        problems.append(f"holes {holes[:3]}")
    if abs(file_s - meta["duration"]) > 0.1:  # MP3 frames round the file's length
        problems.append(f"file {file_s:.2f} s, metadata {meta['duration']:.2f} s")
    return {"ok": not problems, "why": "; ".join(problems), "duration": meta["duration"], "audio_s": last - first,
            "tail_s": meta["duration"] - last, "holes": len(holes), "error": meta.get("error")}


def run(calls: int, seconds: float, ramp_s: float, senders: int, workers: int) -> dict:
    work = fresh_work("ws_load")
    server = ServerProcess(work / "data", [APP], workers=workers, log_level="warning", session_idle_s=600).start()
    try:
        opened = asyncio.run(_open_calls(server.base_url, calls))
        began = time.monotonic()
        sent = _run_senders(server.base_url, opened, senders, seconds, ramp_s)
        sending_s = time.monotonic() - began
        rows, metrics = asyncio.run(_collect(server.base_url, opened, 120.0, work))
    finally:
        server.stop()
    checks = [_check(row, seconds) for row in rows]
    good = [c for c in checks if c["ok"]]
    bad = [c for c in checks if not c["ok"]]
    durations = [c["duration"] for c in checks if "duration" in c]
    log = server.log.read_text(errors="replace")
    return {
        "calls": calls, "seconds": seconds, "workers": workers, "sending_s": round(sending_s, 1),
        "completed": sum(1 for r in rows if r["state"] == "completed"), "right": len(good), "wrong": len(bad),
        "wrong_examples": [c["why"] for c in bad[:3]],
        "duration_min_max": [round(min(durations, default=math.nan), 3), round(max(durations, default=math.nan), 3)],
        "tail_max_s": round(max((c["tail_s"] for c in checks if "tail_s" in c), default=math.nan), 3),
        "with_holes": sum(1 for c in checks if c.get("holes")),
        "processing_errors": metrics.get("mediaserver_processing_errors_total"),
        "dropped": {k: v for k, v in metrics.items() if k.startswith("mediaserver_input_dropped_total")},
        "tick_lateness_max_s": metrics.get("mediaserver_tick_lateness_max_seconds"),
        "server_log_errors": log.count(" ERROR "), "server_log_keyerrors": log.count("KeyError"),
        "senders": [{k: s[k] for k in ("late_frames", "max_late_ms", "cpu_s")} | {"failed": sum(1 for c in s["calls"] if "error" in c or c.get("delete", 500) >= 300)} for s in sent],
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ws_load", description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--ramp", type=float, default=2.0)
    parser.add_argument("--senders", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sender", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sender:
        print(json.dumps(asyncio.run(_sender(json.load(sys.stdin)))))
        return 0
    print(json.dumps(run(args.calls, args.seconds, args.ramp, args.senders, args.workers), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
