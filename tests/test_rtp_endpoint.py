"""RTP endpoints on real loopback sockets: what a leg's sockets keep while the loop that
reads them is busy."""

from __future__ import annotations

import asyncio
import socket
import time

from mediaserver.codecs.registry import find_codec
from mediaserver.rtp.endpoint import PortPool, RtpEndpoint
from mediaserver.rtp.packet import RtpPacket
from mediaserver.rtp.receiver import RtpReceiver

PACKETS = 1000  # 20 s of a 20 ms stream: four times what a default receive buffer holds


def _rmem_max() -> int:
    with open("/proc/sys/net/core/rmem_max") as fh:
        return int(fh.read())


async def test_a_leg_keeps_twenty_seconds_of_packets_while_its_loop_is_busy():
    received: list[int] = []
    endpoint = RtpEndpoint(time.monotonic)
    endpoint.sink = RtpReceiver({0: find_codec("PCMU")}, time.monotonic(), lambda payload, pts, decoder: received.append(pts),
                                lambda event: None, hold_s=0.0)
    await PortPool("127.0.0.1", 0, 0).open(endpoint)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            # Sent while the loop cannot read (this coroutine does not yield): everything
            # waits in the socket's receive buffer, as when a worker falls behind.
            for seq in range(PACKETS):
                sender.sendto(bytes(RtpPacket(0, seq, seq * 160, 0x1234, bytes(160))), ("127.0.0.1", endpoint.port))
            for _ in range(200):
                if endpoint.sink.counters.packets >= PACKETS:
                    break
                await asyncio.sleep(0.01)
        assert _rmem_max() >= 1 << 20, "the machine caps receive buffers below what a leg asks for"
        assert endpoint.sink.counters.packets == PACKETS
    finally:
        endpoint.close()
