"""SIP over UDP and TCP (RFC 3261 §18): sockets, stream framing, and the flow a message
came in on, which is where its responses (and the dialog's later requests) go back.

Answering on the same flow (the datagram's source address, the same TCP connection) is
what RFC 3581 asks for with `rport` and what makes a peer behind NAT reachable; the Via
sent-by is not used for routing.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from mediaserver.sip.message import MAX_MESSAGE_BYTES

MAX_TCP_CONNECTIONS = 4096
MAX_ADDRESSES = 4096  # remote hosts whose facing local address is remembered
_CONTENT_LENGTH = re.compile(rb"^(?:content-length|l)[ \t]*:[ \t]*([0-9]{1,10})[ \t]*$", re.IGNORECASE | re.MULTILINE)
_KEEPALIVE = b"\r\n\r\n"  # RFC 5626 §4.4.1: a double CRLF ping, answered by one CRLF


@dataclass(slots=True, eq=False)
class Flow:
    """Where a message came from, the local address it reached, and how to answer."""

    transport: str  # "UDP" or "TCP"
    remote: tuple
    local: tuple
    send: Callable[[bytes], None] = field(repr=False)

    @property
    def reliable(self) -> bool:
        return self.transport != "UDP"


@dataclass(slots=True)
class TransportStats:
    """Counters of the SIP sockets."""

    datagrams: int = 0
    tcp_messages: int = 0
    tcp_connections: int = 0
    tcp_refused: int = 0
    framing_errors: int = 0
    send_errors: int = 0


def local_address_for(bound: str, remote_host: str) -> str:
    """The address a peer reaches us at: the bound one, or for a wildcard bind the
    address of the interface that routes to `remote_host` (no packet is sent)."""
    if bound not in ("0.0.0.0", "::", ""):
        return bound
    family = socket.AF_INET6 if ":" in remote_host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((remote_host, 9))
            return probe.getsockname()[0]
        except OSError:
            return "127.0.0.1" if family == socket.AF_INET else "::1"


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, owner: SipTransports) -> None:
        self._owner = owner
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        owner = self._owner
        owner.stats.datagrams += 1
        if not data.strip(b"\r\n"):
            return  # a keep-alive (RFC 5626 §4.4.2 uses STUN on UDP; CRLFs are just dropped)
        transport = self.transport

        def send(payload: bytes, addr=addr) -> None:
            if transport.is_closing():
                owner.stats.send_errors += 1
                return
            transport.sendto(payload, addr)

        owner.on_message(data, Flow("UDP", addr, (owner.local_address(addr[0]), owner.port), send))

    def error_received(self, exc: Exception) -> None:
        self._owner.stats.send_errors += 1  # ICMP unreachable for something we sent


class _Tcp(asyncio.Protocol):
    """One TCP connection: frames messages by Content-Length (RFC 3261 §18.3)."""

    def __init__(self, owner: SipTransports) -> None:
        self._owner = owner
        self._buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.flow: Flow | None = None

    def connection_made(self, transport) -> None:
        owner = self._owner
        if len(owner.connections) >= MAX_TCP_CONNECTIONS:
            owner.stats.tcp_refused += 1
            transport.close()
            return
        self.transport = transport
        owner.connections.add(self)
        owner.stats.tcp_connections += 1
        remote = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        self.flow = Flow("TCP", remote, (local[0], owner.port), self._send)

    def _send(self, payload: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            self._owner.stats.send_errors += 1
            return
        self.transport.write(payload)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while self.transport is not None and self._frame():
            pass

    def _frame(self) -> bool:
        """Dispatch one whole message from the buffer; False when more bytes are needed."""
        buffer = self._buffer
        if buffer.startswith(_KEEPALIVE):
            del buffer[:4]
            self._send(b"\r\n")
            return True
        while buffer[:2] == b"\r\n":
            del buffer[:2]  # §7.5: CRLFs between messages are ignored
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > MAX_MESSAGE_BYTES:
                self._fail(b"Message too large")
            return False
        match = _CONTENT_LENGTH.search(bytes(buffer[:end]))
        if match is None:
            self._fail(b"Content-Length is required over TCP")
            return False
        total = end + 4 + int(match[1])
        if total > MAX_MESSAGE_BYTES:
            self._fail(b"Message too large")
            return False
        if len(buffer) < total:
            return False
        message = bytes(buffer[:total])
        del buffer[:total]
        self._owner.stats.tcp_messages += 1
        self._owner.on_message(message, self.flow)
        return True

    def _fail(self, reason: bytes) -> None:
        """Framing is lost: tell the peer when the message is a request, then close."""
        self._owner.stats.framing_errors += 1
        self._owner.on_unframed(bytes(self._buffer[:MAX_MESSAGE_BYTES]), self.flow, reason.decode())
        self._buffer.clear()
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc) -> None:
        self._owner.connections.discard(self)
        self.transport = None


class SipTransports:
    """The UDP socket and TCP listener on one host and port.

    `on_message(data, flow)` gets every datagram and every framed TCP message;
    `on_unframed(data, flow, reason)` a TCP stream whose framing broke, just before the
    connection is closed.
    """

    def __init__(self, host: str, port: int, on_message: Callable[[bytes, Flow], None],
                 on_unframed: Callable[[bytes, Flow, str], None]) -> None:
        self.host = host
        self.port = port
        self.on_message = on_message
        self.on_unframed = on_unframed
        self.stats = TransportStats()
        self.connections: set[_Tcp] = set()
        self._addresses: dict[str, str] = {}  # remote host -> our address facing it
        self._udp: asyncio.DatagramTransport | None = None
        self._server: asyncio.Server | None = None

    def local_address(self, remote_host: str) -> str:
        """Our address as `remote_host` reaches it (looked up once per host)."""
        address = self._addresses.get(remote_host)
        if address is None:
            if len(self._addresses) >= MAX_ADDRESSES:
                self._addresses.clear()
            address = self._addresses[remote_host] = local_address_for(self.host, remote_host)
        return address

    async def start(self) -> None:
        """Bind UDP, then TCP on the same port (the port UDP got, when 0 was asked)."""
        loop = asyncio.get_running_loop()
        self._udp, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), local_addr=(self.host, self.port))
        self.port = self._udp.get_extra_info("sockname")[1]
        try:
            self._server = await loop.create_server(lambda: _Tcp(self), self.host, self.port, reuse_address=True)
        except BaseException:
            self._udp.close()
            self._udp = None
            raise

    async def close(self) -> None:
        """Stop listening and close every connection; idempotent."""
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.close()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        await asyncio.sleep(0)  # let the transports run their connection_lost callbacks
