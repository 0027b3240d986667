"""A paced RTP sender in its own process: `python -m benchmarks.rtp_sender < plan.json`.

The plan is `{"targets": [port, …], "seconds": s, "payload": "<path of µ-law bytes>",
"host": "127.0.0.1", "ramp_s": r}`. Every 20 ms it sends one PCMU packet (RFC 3551 payload
type 0, 160 bytes) to each target from one socket, with each target's own SSRC, sequence
number and timestamp, for `seconds`; the targets' streams begin in order, spread over the
first `ramp_s` (default 0: all at once). Then it prints what it did as JSON on stdout: packets sent,
how late its own ticks were (a sender that falls behind would look like network jitter),
and its CPU time.

The sender shares the machine with the server it loads, so it is kept cheap: every
tick's packets are laid out in one numpy buffer (headers updated for all targets at once)
and handed to the kernel by `sendmmsg(2)` a thousand at a time, instead of a Python call
per packet. Without `sendmmsg` it falls back to one `sendto` per packet.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import resource
import socket
import sys
import time

import numpy as np

PTIME = 0.02
SAMPLES = 160
HEADER = 12  # RFC 3550 §5.1, no CSRCs
BATCH = 1024  # UIO_MAXIOV: the most messages one sendmmsg call takes


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32), ("iov", ctypes.c_void_p),
                ("iovlen", ctypes.c_size_t), ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("hdr", _Msghdr), ("len", ctypes.c_uint)]


class _SockaddrIn(ctypes.Structure):
    _fields_ = [("family", ctypes.c_ushort), ("port", ctypes.c_uint16), ("addr", ctypes.c_uint32), ("zero", ctypes.c_char * 8)]


class Packets:
    """Every target's packet for one tick, in one buffer."""

    def __init__(self, count: int) -> None:
        self.buffer = np.zeros((count, HEADER + SAMPLES), dtype=np.uint8)
        self.buffer[:, 0] = 0x80  # version 2; payload type 0 (PCMU)
        ssrc = np.arange(0x10000, 0x10000 + count, dtype=">u4")
        self.buffer[:, 8:12] = ssrc.view(np.uint8).reshape(count, 4)

    def fill(self, tick: int, chunk: bytes) -> None:
        self.buffer[:, 2:4] = np.frombuffer((tick & 0xFFFF).to_bytes(2, "big"), dtype=np.uint8)
        self.buffer[:, 4:8] = np.frombuffer(((tick * SAMPLES) & 0xFFFFFFFF).to_bytes(4, "big"), dtype=np.uint8)
        self.buffer[:, HEADER:] = np.frombuffer(chunk, dtype=np.uint8)


class MmsgSender:
    """sendmmsg(2) of a Packets buffer to fixed destinations."""

    def __init__(self, sock: socket.socket, packets: Packets, host: str, ports: list[int]) -> None:
        self._libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self._fd = sock.fileno()
        count = len(ports)
        self._addrs = (_SockaddrIn * count)()
        self._iov = (_Iovec * count)()
        self._msgs = (_Mmsghdr * count)()
        addr = int.from_bytes(socket.inet_aton(host), "little")
        base = packets.buffer.ctypes.data
        row = packets.buffer.strides[0]
        for i, port in enumerate(ports):
            self._addrs[i] = _SockaddrIn(socket.AF_INET, socket.htons(port), addr)
            self._iov[i] = _Iovec(base + i * row, HEADER + SAMPLES)
            hdr = self._msgs[i].hdr
            hdr.name = ctypes.addressof(self._addrs[i])
            hdr.namelen = ctypes.sizeof(_SockaddrIn)
            hdr.iov = ctypes.addressof(self._iov[i])
            hdr.iovlen = 1
        self._size = ctypes.sizeof(_Mmsghdr)

    def send(self, count: int | None = None) -> tuple[int, int]:
        """(sent, failed) for one tick, to the first `count` targets (all by default)."""
        sent = failed = 0
        count = len(self._msgs) if count is None else min(count, len(self._msgs))
        start = 0
        while start < count:
            n = min(BATCH, count - start)
            done = self._libc.sendmmsg(self._fd, ctypes.byref(self._msgs, start * self._size), n, 0)
            if done <= 0:
                failed += 1  # skip the message the kernel refused
                start += 1
                continue
            sent += done
            start += done
        return sent, failed


def main() -> int:
    plan = json.load(sys.stdin)
    payload = open(plan["payload"], "rb").read()
    host, targets, seconds = plan.get("host", "127.0.0.1"), plan["targets"], float(plan["seconds"])
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    packets = Packets(len(targets))
    sender = MmsgSender(sock, packets, host, targets)
    ticks = int(seconds / PTIME)
    # Streams begin one after another over the first `ramp_s`, as calls do, rather than all
    # in the same 20 ms; each stream then runs until the end.
    ramp_ticks = max(int(float(plan.get("ramp_s", 0.0)) / PTIME), 1)
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
        packets.fill(tick, payload[offset:offset + SAMPLES])
        ok, failed = sender.send(len(targets) * (tick + 1) // ramp_ticks)
        sent += ok
        errors += failed
    usage = resource.getrusage(resource.RUSAGE_SELF)
    late.sort()
    print(json.dumps({
        "packets_sent": sent, "send_errors": errors, "ticks": ticks, "wall_s": time.monotonic() - start,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "late_p50_ms": late[len(late) // 2] * 1000, "late_p99_ms": late[int(len(late) * 0.99)] * 1000,
        "late_max_ms": late[-1] * 1000,
    }))
    sock.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
