"""Every raw SIP message in sip_fixtures/messages gets the answer expected.json names,
over UDP and over TCP, and the server keeps serving afterwards."""

from __future__ import annotations

import asyncio
import json
import re
import socket

from mediaserver.api.keys import SERVICES
from mediaserver.sip.message import SipResponse, parse_message
from servers import Server
from sip_peers import FIXTURES

MESSAGES = FIXTURES / "messages"
EXPECTED = json.loads((MESSAGES / "expected.json").read_text())
# Over TCP a message is framed by its Content-Length: these cannot be framed, so they
# are tested over UDP only (a stream peer would simply be waiting for more bytes).
CALL_ID = re.compile(rb"(?im)^(?:call-id|i)[ \t]*:[ \t]*(\S+)")
UNFRAMEABLE_OVER_TCP = {"no_end_of_headers.sip", "content_length_too_long.sip", "malformed_content_length.sip"}


class UdpPeer:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)

    async def exchange(self, data: bytes, port: int, wait: float = 0.4) -> list[SipResponse]:
        """Send `data`; what comes back until its final answer, or for `wait` seconds."""
        loop = asyncio.get_running_loop()
        await loop.sock_sendto(self.sock, data, ("127.0.0.1", port))
        found = CALL_ID.search(data)
        answers = []
        try:
            while True:
                answer = parse_message(await asyncio.wait_for(loop.sock_recv(self.sock, 65536), wait))
                answers.append(answer)
                if answer.status >= 200 and found and answer.call_id == found[1].decode():
                    return answers
        except asyncio.TimeoutError:
            return answers

    def close(self) -> None:
        self.sock.close()


async def tcp_exchange(data: bytes, port: int, wait: float = 0.4, to_close: bool = False) -> tuple[list[SipResponse], bool]:
    """Send one message on a new connection; the answers (until a final one, or until the
    server closes the connection) and whether it closed it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    answers, buffer, closed = [], b"", False
    try:
        while to_close or not re.search(rb"^SIP/2\.0 [2-6]", buffer, re.MULTILINE):
            chunk = await asyncio.wait_for(reader.read(65536), wait)
            if not chunk:
                closed = True
                break
            buffer += chunk
    except asyncio.TimeoutError:
        pass
    finally:
        writer.close()
        await writer.wait_closed()
    while b"\r\n\r\n" in buffer:
        head, rest = buffer.split(b"\r\n\r\n", 1)
        length = int(next((line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), b"0"))
        answers.append(parse_message(head + b"\r\n\r\n" + rest[:length]))
        buffer = rest[length:]
    return answers, closed


def first_final(answers: list[SipResponse]) -> SipResponse | None:
    return next((answer for answer in answers if answer.status >= 200), None)


def check(name: str, answers: list[SipResponse]) -> None:
    expected = EXPECTED[name]
    found = CALL_ID.search((MESSAGES / name).read_bytes())
    if found:  # answers to earlier fixtures (retransmitted until acknowledged) are not this one's
        answers = [a for a in answers if a.call_id == found[1].decode()]
    final = first_final(answers)
    if expected["status"] is None:
        assert answers == [], name
        return
    assert final is not None, name
    assert (final.status, final.reason) == (expected["status"], expected["reason"]), name
    call_id = final.headers.get("Call-ID")
    if call_id:
        assert call_id.encode() in (MESSAGES / name).read_bytes()  # the answer is to this request


async def test_every_fixture_over_udp(tmp_path):
    async with Server(tmp_path) as server:
        port = server.app[SERVICES]["sip"].port
        peer = UdpPeer()
        try:
            for name in sorted(EXPECTED):
                check(name, await peer.exchange((MESSAGES / name).read_bytes(), port, wait=0.15))
                # Still serving: an OPTIONS is answered.
                token = f"after-{name}".encode()
                options = (MESSAGES / "options.sip").read_bytes().replace(b"options1", token)
                answers = [a for a in await peer.exchange(options, port, wait=0.1) if a.call_id == f"after-{name}@fixtures"]
                assert [a.status for a in answers] == [200], name
        finally:
            peer.close()
        assert server.app[SERVICES]["sip"].transports.stats.datagrams == 2 * len(EXPECTED)


async def test_every_fixture_over_tcp(tmp_path):
    async with Server(tmp_path) as server:
        port = server.app[SERVICES]["sip"].port
        for name in sorted(set(EXPECTED) - UNFRAMEABLE_OVER_TCP):
            answers, _ = await tcp_exchange((MESSAGES / name).read_bytes(), port)
            check(name, answers)
        # A message without Content-Length cannot be framed on a stream: 400, then the
        # connection is closed (RFC 3261 §18.3).
        bare = (MESSAGES / "options.sip").read_bytes().replace(b"Content-Length: 0\r\n", b"")
        answers, closed = await tcp_exchange(bare, port, to_close=True)
        assert [(a.status, a.reason) for a in answers] == [(400, "Content-Length is required over TCP")] and closed
        answers, _ = await tcp_exchange((MESSAGES / "options.sip").read_bytes(), port)
        assert first_final(answers).status == 200


async def test_retransmitted_requests_get_the_same_answer(tmp_path):
    async with Server(tmp_path) as server:
        port = server.app[SERVICES]["sip"].port
        sip = server.app[SERVICES]["sip"]
        peer = UdpPeer()
        try:
            invite = (MESSAGES / "invite_pcmu.sip").read_bytes()
            first = first_final(await peer.exchange(invite, port, wait=0.2))
            again = first_final(await peer.exchange(invite, port, wait=0.2))
            assert first.status == again.status == 200
            assert first.headers.get("To") == again.headers.get("To")  # the same dialog
            assert first.body == again.body  # the same answer, not a second call
            assert len(sip.calls) == 1 and sip.uas.stats.retransmissions == 1
            options = (MESSAGES / "options.sip").read_bytes()
            assert first_final(await peer.exchange(options, port, 0.1)).headers.get("To") == \
                first_final(await peer.exchange(options, port, 0.1)).headers.get("To")
        finally:
            peer.close()
