"""Free loopback ports for a server started next to others (tests, benchmarks, tools)."""

from __future__ import annotations

import socket


def free_port(kind: int = socket.SOCK_STREAM, host: str = "127.0.0.1") -> int:
    """A port the kernel says is free now (it may be taken by the time it is used)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def free_udp_range(size: int = 40, host: str = "127.0.0.1") -> tuple[int, int]:
    """A run of `size` UDP ports, starting even, that were all free a moment ago (an RTP range)."""
    for _ in range(50):
        start = free_port(socket.SOCK_DGRAM, host) & ~1
        if start < 1024 or start + size > 65000:
            continue
        socks: list[socket.socket] = []
        try:
            for port in range(start, start + size):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(sock)
                sock.bind((host, port))
            return start, start + size - 1
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no free UDP port range")
