"""Cost per call at N = 1, 10, 100, 1000 concurrent two-leg RTP calls: flat or not.

Each step is an `rtp_load` step (a fresh server, real RTP from a sender process, MP3
recordings); the server's CPU over the steady window, less what the same server burns
with no call at all, and its RSS growth, are divided by N.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks import audio, rtp_load
from benchmarks.common import fresh_work, print_table, rnd, verdict
from benchmarks.server import Server

TITLE = "Cost per call at N = 1, 10, 100, 1000 two-leg RTP calls: CPU and RSS per call, flat or not"

STEPS = (1, 10, 100, 1000)
QUICK_STEPS = (1, 10, 100)
RUN_S, QUICK_RUN_S = 15.0, 8.0
IDLE_S = 8.0
BUDGET_KIB = 256


def idle_cores(work, settings: dict[str, Any]) -> float:
    """What the server's tick loops cost with no call (subtracted from every step)."""
    server = Server(work, rtp_ports=rtp_load.RTP_PORTS, **settings)
    server.start()
    try:
        time.sleep(2.0)
        before, began = server.status(), time.monotonic()
        time.sleep(IDLE_S)
        after = server.status()
        return (after["cpu"] - before["cpu"]) / (time.monotonic() - began)
    finally:
        server.stop()


def run(quick: bool) -> dict[str, Any]:
    steps, seconds = (QUICK_STEPS, QUICK_RUN_S) if quick else (STEPS, RUN_S)
    work = fresh_work("cost_per_call")
    payload, _ = audio.speech_legs(work, 60)
    settings = rtp_load.server_settings()
    idle = idle_cores(work, settings)
    print(f"cost_per_call: the server idles at {idle:.3f} cores", flush=True)
    rows = []
    for n in steps:
        print(f"cost_per_call: {n} calls …", flush=True)
        row = rtp_load.measure(n, seconds, work, payload, settings)
        row["cpu_per_call_net_pct"] = rnd(max(row["server_cpu_cores"] - idle, 0.0) / n * 100, 4)
        row["ok"] = rtp_load.ok(row)
        rows.append(row)
    print_table("Cost per call (CPU of the server's processes less its idle cost, RSS growth, each over N)", [
        ("calls", "calls", ""), ("cores", "server_cpu_cores", ".3f"), ("CPU %/call", "cpu_per_call_net_pct", ".3f"),
        ("RSS/call KiB", "rss_per_call_kib", ".1f"), ("p99 ms", "tick_p99_ms", "g"), ("dropped", "packets_dropped", ""),
        ("send err", "send_errors", ""), ("late smp", "late_samples_dropped", ""), ("µs/packet", "cpu_us_per_packet", ".2f"),
        ("all ok", "ok", "")], rows)
    # Flat means a call costs no more among many than among few: the largest N against N = 10
    # (N = 1 is mostly the server's fixed cost). Falling is better than flat. A step that
    # dropped packets or lost samples did less work than its calls needed, so its cost per
    # call would flatter: the figures of a failing step are not verdicts' values.
    base = next((row for row in rows if row["calls"] >= 10), rows[0])
    last = rows[-1]
    failing = [row["calls"] for row in rows if not row["ok"]]
    usable = last["ok"] and base["ok"]
    growth = (last["cpu_per_call_net_pct"] / base["cpu_per_call_net_pct"]) if usable and base["cpu_per_call_net_pct"] else None
    why = "" if usable else f"N = {', '.join(map(str, failing))} did not record everything: no figure from a failing step"
    verdicts = [
        verdict("steps that record everything (nothing dropped, refused or late, all stored, p99 tick within "
                f"{rtp_load.LATENESS_MS:g} ms)", len(rows) - len(failing), len(rows), " steps",
                detail=f"failing: N = {failing}" if failing else ""),
        verdict(f"CPU per call at N = {last['calls']} over N = {base['calls']} (flat or falling)", rnd(growth, 2),
                1.0, "x", higher_is_better=False, detail=why),
        verdict(f"RSS per call at N = {last['calls']}", last["rss_per_call_kib"] if last["ok"] else None, BUDGET_KIB,
                " KiB", higher_is_better=False, detail="" if last["ok"] else why),
    ]
    cpu = ", ".join(f"{row['cpu_per_call_net_pct']} % (N = {row['calls']})" for row in rows)
    per_packet = ", ".join(f"{row['cpu_us_per_packet']} µs (N = {row['calls']})" for row in rows)
    line = (f"CPU per call {cpu} of a core; RSS per call {last['rss_per_call_kib']} KiB at N = {last['calls']}; "
            f"CPU per packet {per_packet}; failing steps: {failing or 'none'}")
    print(f"\nSUMMARY cost_per_call: {line}", flush=True)
    figures = {"idle_cores": rnd(idle, 4), "steps": rows, "cpu_growth": rnd(growth, 2), "failing_steps": failing,
               "summary": line}
    return {"settings": {"steps": list(steps), "audio_s": seconds, "server_settings": rtp_load.effective_settings(settings),
                         "record": rtp_load.RECORD},
            "figures": figures, "verdicts": verdicts}
