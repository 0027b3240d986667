"""Which local addresses ICE offers: the address the server listens on.

aioice gathers a host candidate on every interface address except loopback (RFC 8445
§5.1.1.1 forbids loopback candidates) and has no setting to choose the addresses
(aiortc/aioice#2). A server bound to one address must offer exactly that one: the
loopback address when it listens on 127.0.0.1, as in development and tests, where it
is the only address a client can reach (other stacks have the same knob: pion's
loopback candidates, libdatachannel's `bindAddress`). So a peer connection gathers
inside `gather_on(addresses)`: within it, and only within it (a context variable, so
other peer connections in the process keep aioice's own behaviour), aioice sees the
given addresses instead of the interface list.
"""

from __future__ import annotations

import contextlib
import contextvars
import ipaddress
import socket
from collections.abc import Iterator

import aioice.ice

ANY_HOSTS = ("", "0.0.0.0", "::")

_SCOPED: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar("mediaserver_ice_addresses", default=None)


def addresses_for(host: str) -> tuple[str, ...] | None:
    """The ICE host addresses of a server listening on `host`; None for every interface."""
    if host in ANY_HOSTS:
        return None
    try:
        return (str(ipaddress.ip_address(host)),)
    except ValueError:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
        return tuple(dict.fromkeys(str(info[4][0]) for info in infos))


@contextlib.contextmanager
def gather_on(addresses: tuple[str, ...] | None) -> Iterator[None]:
    """Within this block, ICE gathering in this task uses `addresses` (None: aioice's own)."""
    _install()
    token = _SCOPED.set(addresses)
    try:
        yield
    finally:
        _SCOPED.reset(token)


def _host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    scoped = _SCOPED.get()
    if scoped is None:
        return _host_addresses.__wrapped__(use_ipv4, use_ipv6)
    return [a for a in scoped if (use_ipv6 if ipaddress.ip_address(a).version == 6 else use_ipv4)]


def _install() -> None:
    """Put the scoped lookup in front of aioice's, once (aioice calls it by module name)."""
    current = aioice.ice.get_host_addresses
    if current is not _host_addresses:
        _host_addresses.__wrapped__ = current
        aioice.ice.get_host_addresses = _host_addresses
