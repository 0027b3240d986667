"""The UAS's transactions and dialogs (RFC 3261 §12, §13, §17), driven message by message
with a recording handler and a short T1: retransmissions, ACK, CANCEL, BYE, re-INVITE,
failures, a missing ACK and hanging up from this side."""

from __future__ import annotations

import asyncio

import pytest

from mediaserver.sip.message import SipResponse, parse_message
from mediaserver.sip.transport import Flow
from mediaserver.sip.uas import SipFailure, UserAgentServer

T1 = 0.01


class Peer:
    """The other side of a flow: what the UAS sent to it."""

    def __init__(self, transport: str = "UDP") -> None:
        self.sent: list = []
        self.flow = Flow(transport, ("127.0.0.1", 5099), ("127.0.0.1", 5060), lambda data: self.sent.append(parse_message(data)))

    def statuses(self) -> list[int]:
        return [m.status if isinstance(m, SipResponse) else m.method for m in self.sent]


class Handler:
    def __init__(self, fail: SipFailure | None = None, delay: float = 0.0) -> None:
        self.fail = fail
        self.delay = delay
        self.events: list[tuple[str, str]] = []

    async def invite(self, dialog, request):
        await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        dialog.context = "call"
        self.events.append(("invite", dialog.call_id))
        return b"v=0\r\n", "application/sdp"

    async def reinvite(self, dialog, request):
        self.events.append(("reinvite", dialog.call_id))
        return b"v=0\r\n", "application/sdp"

    def ended(self, dialog, reason):
        self.events.append(("ended", reason))


def message(method: str, *, cseq: int = 1, branch: str = "z9hG4bK-1", to_tag: str | None = None, cseq_method: str | None = None,
            body: bytes = b"", extra: str = "") -> bytes:
    to = "<sip:app1@127.0.0.1>" + (f";tag={to_tag}" if to_tag else "")
    head = (f"{method} sip:app1@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5099;branch={branch}\r\n"
            f"From: <sip:peer@127.0.0.1>;tag=peer\r\nTo: {to}\r\nCall-ID: call-1\r\nCSeq: {cseq} {cseq_method or method}\r\n"
            f"Contact: <sip:peer@127.0.0.1:5099>\r\nRecord-Route: <sip:proxy.example.com;lr>\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def settle(seconds: float = 0.0) -> None:
    await asyncio.sleep(seconds)
    for _ in range(5):
        await asyncio.sleep(0)


async def answered(uas: UserAgentServer, peer: Peer) -> str:
    """INVITE, and the To tag of its 200."""
    uas.receive(message("INVITE", body=b"v=0\r\n", extra="Content-Type: application/sdp\r\n"), peer.flow)
    await settle()
    final = [m for m in peer.sent if isinstance(m, SipResponse) and m.status == 200][-1]
    return final.address("To").tag


async def test_invite_is_answered_and_the_200_retransmitted_until_the_ack():
    handler, peer = Handler(), Peer()
    uas = UserAgentServer(handler, t1=T1)
    tag = await answered(uas, peer)
    assert peer.statuses()[:2] == [100, 200]
    ok = peer.sent[1]
    assert ok.headers.get("Contact") == "<sip:app1@127.0.0.1:5060>"
    assert ok.headers.get_all("Record-Route") == ["<sip:proxy.example.com;lr>"]
    assert ok.content_type == "application/sdp" and ok.body == b"v=0\r\n"
    await settle(4 * T1)
    assert peer.statuses().count(200) >= 3  # T1, 2T1, ... until the ACK
    uas.receive(message("ACK", branch="z9hG4bK-ack", to_tag=tag), peer.flow)
    count = peer.statuses().count(200)
    await settle(8 * T1)
    assert peer.statuses().count(200) == count
    uas.receive(message("INVITE", body=b"v=0\r\n", extra="Content-Type: application/sdp\r\n"), peer.flow)  # a late copy
    assert peer.statuses()[-1] == 200 and handler.events == [("invite", "call-1")]
    await uas.close()


async def test_no_ack_ends_the_call_with_bye():
    handler, peer = Handler(), Peer()
    uas = UserAgentServer(handler, t1=T1)
    await answered(uas, peer)
    await settle(70 * T1)
    byes = [m for m in peer.sent if getattr(m, "method", None) == "BYE"]
    assert byes and handler.events[-1] == ("ended", "no-ack")
    bye = byes[0]
    assert bye.uri == "sip:peer@127.0.0.1:5099" and bye.headers.get_all("Route") == ["<sip:proxy.example.com;lr>"]
    assert bye.address("From").tag and bye.address("To").tag == "peer" and bye.call_id == "call-1"
    await uas.close()


async def test_bye_ends_the_dialog_and_a_second_bye_is_481():
    handler, peer = Handler(), Peer()
    uas = UserAgentServer(handler, t1=T1)
    tag = await answered(uas, peer)
    uas.receive(message("ACK", branch="z9hG4bK-ack", to_tag=tag), peer.flow)
    uas.receive(message("BYE", cseq=2, branch="z9hG4bK-bye", to_tag=tag), peer.flow)
    uas.receive(message("BYE", cseq=3, branch="z9hG4bK-bye2", to_tag=tag), peer.flow)
    assert peer.statuses()[-2:] == [200, 481]
    assert handler.events == [("invite", "call-1"), ("ended", "bye")] and not uas.dialogs
    await uas.close()


async def test_cancel_while_ringing():
    handler, peer = Handler(), Peer()
    uas = UserAgentServer(handler, answer_delay_s=1.0, t1=T1)
    uas.receive(message("INVITE", body=b"v=0\r\n", extra="Content-Type: application/sdp\r\n"), peer.flow)
    await settle()
    uas.receive(message("CANCEL", cseq=1), peer.flow)
    await settle()
    assert peer.statuses() == [100, 180, 200, 487]
    cancel_ok, terminated = peer.sent[2], peer.sent[3]
    assert cancel_ok.cseq() == (1, "CANCEL") and terminated.cseq() == (1, "INVITE")
    assert cancel_ok.address("To").tag == terminated.address("To").tag == peer.sent[1].address("To").tag
    uas.receive(message("ACK", cseq=1, to_tag=terminated.address("To").tag), peer.flow)  # same branch as the INVITE
    await settle(4 * T1)
    assert peer.statuses() == [100, 180, 200, 487]  # acknowledged: not sent again
    assert handler.events == [] and not uas.dialogs  # the handler never set a call up
    await uas.close()


async def test_cancel_after_the_answer_changes_nothing():
    handler, peer = Handler(), Peer()
    uas = UserAgentServer(handler, t1=T1)
    await answered(uas, peer)
    uas.receive(message("CANCEL"), peer.flow)
    assert peer.statuses()[-1] == 200 and len(uas.dialogs) == 1
    await uas.close()


async def test_bye_while_the_invite_is_being_answered():
    handler, peer = Handler(delay=0.05), Peer()
    uas = UserAgentServer(handler, t1=T1)
    uas.receive(message("INVITE", body=b"v=0\r\n", extra="Content-Type: application/sdp\r\n"), peer.flow)
    await settle()
    dialog = next(iter(uas.dialogs.values()))
    uas.receive(message("BYE", cseq=2, branch="z9hG4bK-bye", to_tag=dialog.local_tag), peer.flow)
    await settle(0.1)
    assert peer.statuses()[:3] == [100, 200, 487]  # 200 for the BYE, 487 for the INVITE
    assert handler.events == [("invite", "call-1"), ("ended", "cancel")]  # what the handler set up is undone
    await uas.close()


async def test_a_refused_invite_is_retransmitted_until_acknowledged():
    handler, peer = Handler(SipFailure(488, "No Acceptable Audio Stream")), Peer()
    uas = UserAgentServer(handler, t1=T1)
    uas.receive(message("INVITE"), peer.flow)
    await settle(4 * T1)
    assert peer.statuses()[0] == 100 and peer.statuses().count(488) >= 3
    assert peer.sent[1].reason == "No Acceptable Audio Stream" and peer.sent[1].address("To").tag
    uas.receive(message("ACK"), peer.flow)
    count = len(peer.sent)
    await settle(8 * T1)
    assert len(peer.sent) == count and not uas.dialogs
    await uas.close()


async def test_reinvite_while_one_is_pending_is_500_and_an_old_cseq_too():
    handler, peer = Handler(), Peer()
    uas = UserAgentServer(handler, t1=T1)
    tag = await answered(uas, peer)
    uas.receive(message("ACK", branch="z9hG4bK-ack", to_tag=tag), peer.flow)
    uas.receive(message("INVITE", cseq=2, branch="z9hG4bK-re1", to_tag=tag), peer.flow)
    uas.receive(message("INVITE", cseq=3, branch="z9hG4bK-re2", to_tag=tag), peer.flow)
    await settle()
    assert [(m.status, m.reason, m.headers.get("Retry-After")) for m in peer.sent[-3:] if m.status >= 200][:1] == [
        (500, "Another INVITE Is In Progress", "1")]
    uas.receive(message("INVITE", cseq=1, branch="z9hG4bK-re3", to_tag=tag), peer.flow)
    assert (peer.sent[-1].status, peer.sent[-1].reason) == (500, "CSeq Out Of Order")
    assert handler.events == [("invite", "call-1"), ("reinvite", "call-1")]
    await uas.close()


async def test_hangup_sends_bye_until_it_is_answered():
    handler, peer = Handler(), Peer()
    uas = UserAgentServer(handler, t1=T1)
    tag = await answered(uas, peer)
    uas.receive(message("ACK", branch="z9hG4bK-ack", to_tag=tag), peer.flow)
    dialog = next(iter(uas.dialogs.values()))
    uas.hangup(dialog)
    await settle(3 * T1)
    byes = [m for m in peer.sent if getattr(m, "method", None) == "BYE"]
    assert len(byes) >= 2 and byes[0].cseq()[1] == "BYE"
    ok = SipResponse(status=200, reason="OK")
    for name in ("Via", "From", "To", "Call-ID", "CSeq"):
        ok.headers.add(name, byes[0].headers.get(name))
    uas.receive(bytes(ok), peer.flow)
    count = len(peer.sent)
    await settle(8 * T1)
    assert len(peer.sent) == count
    assert handler.events[-1] == ("ended", "hangup")
    await uas.close()


@pytest.mark.parametrize("transport", ["UDP", "TCP"])
async def test_close_hangs_up_every_call(transport):
    handler, peer = Handler(), Peer(transport)
    uas = UserAgentServer(handler, t1=T1)
    await answered(uas, peer)
    await uas.close()
    assert peer.statuses()[-1] == "BYE" and handler.events[-1] == ("ended", "shutdown")
    await uas.close()  # idempotent
