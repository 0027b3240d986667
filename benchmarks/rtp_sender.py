"""A paced RTP sender in its own process: `python -m benchmarks.rtp_sender < plan.json`.

The plan is `{"targets": [port, …], "seconds": s, "payload": "<path of µ-law bytes>",
"host": "127.0.0.1"}`. Every 20 ms it sends one PCMU packet (RFC 3551 payload type 0, 160
bytes) to each target from one socket, with each target's own SSRC, sequence number and
timestamp, for `seconds`; then it prints what it did as JSON on stdout: packets sent,
how late its own ticks were (a sender that falls behind would look like network jitter),
and its CPU time.
"""

from __future__ import annotations

import json
import resource
import socket
import struct
import sys
import time

PTIME = 0.02
SAMPLES = 160
HEADER = struct.Struct("!BBHII")  # RFC 3550 §5.1: V=2, PT, sequence, timestamp, SSRC


def main() -> int:
    plan = json.load(sys.stdin)
    payload = open(plan["payload"], "rb").read()
    host, targets, seconds = plan.get("host", "127.0.0.1"), plan["targets"], float(plan["seconds"])
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    packets = [bytearray(HEADER.size + SAMPLES) for _ in targets]
    addresses = [(host, port) for port in targets]
    ssrcs = [0x10000 + i for i in range(len(targets))]
    ticks = int(seconds / PTIME)
    late: list[float] = []
    sent = errors = 0
    start = time.monotonic()
    for tick in range(ticks):
        due = start + tick * PTIME
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        late.append(max(time.monotonic() - due, 0.0))
        offset = (tick * SAMPLES) % (len(payload) - SAMPLES)
        chunk = payload[offset:offset + SAMPLES]
        for packet, address, ssrc in zip(packets, addresses, ssrcs):
            HEADER.pack_into(packet, 0, 0x80, 0, tick & 0xFFFF, (tick * SAMPLES) & 0xFFFFFFFF, ssrc)
            packet[HEADER.size:] = chunk
            try:
                sock.sendto(packet, address)
                sent += 1
            except OSError:
                errors += 1
    usage = resource.getrusage(resource.RUSAGE_SELF)
    late.sort()
    print(json.dumps({
        "packets_sent": sent, "send_errors": errors, "ticks": ticks, "wall_s": time.monotonic() - start,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "late_p50_ms": late[len(late) // 2] * 1000, "late_p99_ms": late[int(len(late) * 0.99)] * 1000,
        "late_max_ms": late[-1] * 1000,
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
