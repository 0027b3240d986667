"""UDP endpoints of RTP legs: a port pair per leg from the configured range, latching.

Each leg gets an even port for RTP and the next one for RTCP (RFC 3550 §11), or RTCP
multiplexed on the RTP port when the peer asks for it (RFC 5761); RTCP is demultiplexed
on either port by packet type, parsed and counted.

Symmetric latching: the address a leg's first packet comes from is the peer, whatever SDP
said (a peer behind NAT announces an address it cannot be reached at). Packets from
elsewhere are dropped and counted, unless the latched peer has been silent for
`RELATCH_S`, or signalling announced a new address (`relatch()` after a re-INVITE), in
which case the next source is latched instead.

The datagram callback does no logging and never raises: a malformed packet is counted
by the receiver and the loop goes on.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from mediaserver.errors import ProtocolError
from mediaserver.rtp.packet import RtcpPacket, is_rtcp

log = logging.getLogger(__name__)

RELATCH_S = 2.0
# Receive buffer of an RTP socket. The default (rmem_default, ~208 KiB) holds only ~256
# queued datagrams whatever their size (each costs its ~830-byte buffer): a worker that
# falls a few seconds behind on one leg (a burst of call set-ups, a slow disk) would lose
# packets in the kernel. The kernel caps it at rmem_max; the memory is used only while
# packets actually wait.
RTP_RCVBUF = 1 << 20


@dataclass(slots=True)
class EndpointStats:
    """What one leg's sockets saw besides RTP (which the receiver counts)."""

    rtcp_packets: int = 0  # RTCP packets (not datagrams) parsed
    rtcp_malformed: int = 0
    foreign: int = 0  # datagrams from another source than the latched peer
    relatched: int = 0
    errors: int = 0  # packets whose handling raised (a bug): dropped


class _RtcpProtocol(asyncio.DatagramProtocol):
    """The RTCP port of a leg: parse, count, drop."""

    def __init__(self, owner: RtpEndpoint) -> None:
        self._owner = owner

    def datagram_received(self, data: bytes, addr) -> None:
        self._owner.rtcp_received(data)

    def error_received(self, exc: Exception) -> None:
        pass  # an ICMP error for a datagram we never sent; nothing to do


class RtpSink(Protocol):
    """What an endpoint feeds: an `RtpReceiver`."""

    def receive(self, data: bytes, now: float) -> float | None:
        """One RTP datagram; returns when `expire` is due (packets held), or None."""

    def expire(self, now: float) -> float | None:
        """Time has passed; returns the next time it is due, or None."""


class _NoSink:
    def receive(self, data: bytes, now: float) -> None:
        return None

    def expire(self, now: float) -> None:
        return None


class RtpEndpoint(asyncio.DatagramProtocol):
    """One leg's UDP sockets; RTP datagrams go to `sink` (an RtpReceiver), which may be
    set after the ports are bound."""

    def __init__(self, now: Callable[[], float], sink: RtpSink | None = None) -> None:
        self.port = 0
        self.rtcp_port = 0
        self.stats = EndpointStats()
        self.peer: tuple | None = None
        self._latched: tuple | None = None  # the last peer latched, kept across relatch()
        self.sink: RtpSink = sink or _NoSink()
        self._now = now
        self._timer: asyncio.TimerHandle | None = None
        self._last_heard = 0.0
        self._transport: asyncio.DatagramTransport | None = None
        self._rtcp_transport: asyncio.DatagramTransport | None = None

    @property
    def closed(self) -> bool:
        return self._transport is None

    def datagram_received(self, data: bytes, addr) -> None:
        now = self._now()
        if addr != self.peer and not self._latch(addr, now):
            self.stats.foreign += 1
            return
        self._last_heard = now
        if is_rtcp(data):
            self.rtcp_received(data)
            return
        try:
            due = self.sink.receive(data, now)
        except Exception:  # a bug must cost one packet, not the leg
            self._failed()
            return
        if due is not None and self._timer is None and self._transport is not None:
            self._timer = asyncio.get_running_loop().call_later(max(due - now, 0.0), self._expire)

    def _failed(self) -> None:
        self.stats.errors += 1
        if self.stats.errors == 1:
            log.exception("handling an RTP packet on port %d failed (later failures are only counted)", self.port)

    def _expire(self) -> None:
        self._timer = None
        now = self._now()
        try:
            due = self.sink.expire(now)
        except Exception:
            self._failed()
            return
        if due is not None and self._transport is not None:
            self._timer = asyncio.get_running_loop().call_later(max(due - now, 0.001), self._expire)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP port unreachable and the like: receive-only, nothing to react to

    def rtcp_received(self, data: bytes) -> None:
        try:
            self.stats.rtcp_packets += len(RtcpPacket.parse_compound(data))
        except ProtocolError:
            self.stats.rtcp_malformed += 1

    def relatch(self) -> None:
        """Signalling moved the peer (a re-INVITE with a new address): latch afresh."""
        self.peer = None

    def _latch(self, addr, now: float) -> bool:
        if self.peer is not None and now - self._last_heard < RELATCH_S:
            return False
        if self._latched is not None and addr != self._latched:
            self.stats.relatched += 1
        self.peer = self._latched = addr
        return True

    def close(self) -> None:
        """Close both sockets; idempotent."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for transport in (self._transport, self._rtcp_transport):
            if transport is not None:
                transport.close()
        self._transport = self._rtcp_transport = None


class PortPool:
    """Hands out RTP/RTCP port pairs from [low, high] on `host`, round robin.

    Round robin rather than lowest-free keeps a port that was just released from being
    reused at once, so late packets of an ended call do not land in a new one. `low` of
    0 lets the system choose (RTCP then gets its own ephemeral port).
    """

    def __init__(self, host: str, low: int, high: int) -> None:
        self.host = host
        self.low = low + (low & 1)  # RFC 3550 §11: RTP on an even port
        self.high = high
        self._next = self.low

    async def open(self, endpoint: RtpEndpoint) -> RtpEndpoint:
        """Bind a pair for `endpoint`; OSError(EADDRINUSE) when the range is exhausted."""
        loop = asyncio.get_running_loop()
        rtp, rtcp = self._bind_pair()
        try:
            endpoint._transport, _ = await loop.create_datagram_endpoint(lambda: endpoint, sock=rtp)
            endpoint._rtcp_transport, _ = await loop.create_datagram_endpoint(lambda: _RtcpProtocol(endpoint), sock=rtcp)
        except BaseException:
            endpoint.close()
            rtp.close()
            rtcp.close()
            raise
        endpoint.port, endpoint.rtcp_port = rtp.getsockname()[1], rtcp.getsockname()[1]
        return endpoint

    def _bind_pair(self) -> tuple[socket.socket, socket.socket]:
        if self.low == 0:
            return _bind(self.host, 0, RTP_RCVBUF), _bind(self.host, 0)
        pairs = max((self.high - self.low + 1) // 2, 0)
        for _ in range(pairs):
            port = self._next
            self._next = port + 2 if port + 3 <= self.high else self.low
            try:
                rtp = _bind(self.host, port, RTP_RCVBUF)
            except OSError:
                continue
            try:
                return rtp, _bind(self.host, port + 1)
            except OSError:
                rtp.close()
        raise OSError(errno.EADDRINUSE, f"no free RTP port pair in {self.low}-{self.high} on {self.host}")


def _bind(host: str, port: int, rcvbuf: int = 0) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock
