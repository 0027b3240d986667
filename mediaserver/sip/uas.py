"""The SIP user agent server (RFC 3261): transactions, dialogs, and what it answers.

A call is an INVITE dialog. The UAS answers INVITE (100 at once, 200 with the SDP answer
the `CallHandler` gives), re-INVITE, ACK, BYE, CANCEL and OPTIONS; every other method is
501. Retransmitted requests get the same response again from the server transactions
(§17.2); over UDP the 200 to an INVITE is retransmitted until its ACK (§13.3.1.4) and a
failure response until its ACK (Timer G). The UAS hangs up itself with BYE when asked
(`hangup`), or when the ACK never comes.

What a call means (a recording session) is the handler's business: `CallHandler` below.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from mediaserver.sip.message import (
    BRANCH_COOKIE,
    NameAddr,
    SipError,
    SipHeaderError,
    SipRequest,
    SipResponse,
    Via,
    parse_message,
    salvage_request,
)
from mediaserver.sip.transport import Flow
from mediaserver.tasks import TaskSet

log = logging.getLogger(__name__)

T1 = 0.5  # RFC 3261 §17.1.1.1: the round-trip estimate; T2 = 8*T1, T4 = 10*T1 (Table 4)
ALLOW = "INVITE, ACK, BYE, CANCEL, OPTIONS"
ACCEPT = "application/sdp, multipart/mixed, application/rs-metadata+xml"
SUPPORTED = ("siprec",)  # RFC 7866 §12.2; Require: of anything else is answered 420
SERVER = "mediaserver"

REASONS = {100: "Trying", 180: "Ringing", 200: "OK", 400: "Bad Request", 415: "Unsupported Media Type",
           420: "Bad Extension", 481: "Call/Transaction Does Not Exist", 486: "Busy Here", 487: "Request Terminated",
           488: "Not Acceptable Here", 491: "Request Pending", 500: "Server Internal Error", 501: "Not Implemented",
           503: "Service Unavailable"}


class SipFailure(Exception):
    """What a handler raises to refuse an INVITE: the final response to send."""

    def __init__(self, status: int, reason: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason or REASONS.get(status, "Failed"))
        self.status = status
        self.reason = reason or REASONS.get(status, "Failed")
        self.headers = headers or {}


@dataclass(slots=True, eq=False)
class Dialog:
    """An INVITE dialog seen from the UAS (§12.1.1)."""

    call_id: str
    local_tag: str
    remote_tag: str
    local: str  # our address header (the INVITE's To) with our tag
    remote: str  # the peer's (the INVITE's From)
    remote_target: str  # its Contact URI
    route_set: list[str]
    remote_cseq: int
    flow: Flow
    request_uri: str
    local_cseq: int = field(default_factory=lambda: secrets.randbelow(10_000) + 1)
    state: str = "early"  # early → confirmed → terminated
    context: Any = None  # the handler's call object
    invite_pending: bool = True  # an INVITE transaction of this dialog has no final response
    awaiting_ack: int | None = None  # CSeq of a 200 not yet acknowledged

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.call_id, self.local_tag, self.remote_tag)


class CallHandler(Protocol):
    """What a call means. `invite`/`reinvite` return (body, content type) of the 200, or
    raise SipFailure; `ended(dialog, reason)` is called once when the call is over
    (reason: bye, cancel, no-ack, hangup, shutdown), unless `invite` failed."""

    def invite(self, dialog: Dialog, request: SipRequest) -> Awaitable[tuple[bytes, str]]: ...

    def reinvite(self, dialog: Dialog, request: SipRequest) -> Awaitable[tuple[bytes, str]]: ...

    def ended(self, dialog: Dialog, reason: str) -> None: ...


@dataclass(slots=True, eq=False)
class _Transaction:
    """A server transaction: the request, its flow and its latest response."""

    key: tuple
    request: SipRequest
    flow: Flow
    dialog: Dialog | None = None
    response: bytes | None = None
    status: int = 0
    ringing: bool = False  # an INVITE waiting for its answer delay (CANCEL stops it)
    cancelled: bool = False
    task: asyncio.Task | None = None
    timers: list[asyncio.TimerHandle] = field(default_factory=list)


@dataclass(slots=True)
class UasStats:
    """Counters of what the UAS received and how it fared."""

    requests: int = 0
    responses: int = 0
    malformed: int = 0  # answered 400
    unanswerable: int = 0  # not a request we could answer at all
    retransmissions: int = 0
    handler_errors: int = 0


class UserAgentServer:
    """Receives SIP messages from `SipTransports` and keeps transactions and dialogs."""

    def __init__(self, handler: CallHandler, answer_delay_s: float = 0.0, t1: float = T1) -> None:
        self.handler = handler
        self.answer_delay_s = answer_delay_s
        # RFC 3261 Table 4. Timers B, F, H and J (how long a transaction lasts over UDP)
        # are all 64*T1. §17.1.1.1 lets T1 be larger on slow links; tests make it smaller.
        self.t1, self.t2, self.t4, self.timer_b = t1, 8 * t1, 10 * t1, 64 * t1
        self.stats = UasStats()
        self.dialogs: dict[tuple[str, str, str], Dialog] = {}
        self._transactions: dict[tuple, _Transaction] = {}
        self._clients: dict[str, list[asyncio.TimerHandle]] = {}  # branch of a request we sent -> its timers
        self._tasks = TaskSet("sip")
        self._closed = False

    # -- entry points ------------------------------------------------------------------

    def receive(self, data: bytes, flow: Flow) -> None:
        """One message from the network; never raises."""
        try:
            message = parse_message(data)
        except SipError as exc:
            self.unframed(data, flow, str(exc))
            return
        if isinstance(message, SipResponse):
            self.stats.responses += 1
            self._client_response(message)
            return
        self.stats.requests += 1
        try:
            message.validate()
        except SipError as exc:
            self.stats.malformed += 1
            self._send(flow, self.response(message, exc.status, str(exc)))
            return
        try:
            self._dispatch(message, flow)
        except SipError as exc:  # a header only this method needs (a Contact, say)
            self.stats.malformed += 1
            self._send(flow, self.response(message, exc.status, str(exc)))
        except Exception:  # a bug must cost one request, not the listener
            log.exception("handling a %s request failed", message.method)
            self.stats.handler_errors += 1
            self._send(flow, self.response(message, 500))

    def unframed(self, data: bytes, flow: Flow, reason: str) -> None:
        """A message that could not be parsed: 400 when it is a request we can address."""
        request = salvage_request(data)
        if request is None or request.method == "ACK":
            self.stats.unanswerable += 1
            return
        self.stats.malformed += 1
        self._send(flow, self.response(request, 400, reason))

    def hangup(self, dialog: Dialog, reason: str = "hangup") -> None:
        """End a call from this side: BYE when answered, 480 while not yet answered."""
        if dialog.state == "terminated":
            return
        if dialog.state == "early":
            txn = self._invite_of(dialog)
            if txn is not None and txn.status < 200:
                txn.cancelled = True
                self._final(txn, 480, "Temporarily Unavailable")
        else:
            self._send_bye(dialog)
        self._terminate(dialog, reason)

    async def close(self) -> None:
        """Hang up every call, stop every timer and task; idempotent."""
        if self._closed:
            return
        self._closed = True
        for dialog in list(self.dialogs.values()):
            self.hangup(dialog, "shutdown")
        for txn in self._transactions.values():
            _cancel(txn.timers)
        self._transactions.clear()
        for timers in self._clients.values():
            _cancel(timers)
        self._clients.clear()
        await self._tasks.close()

    # -- requests ----------------------------------------------------------------------

    def _dispatch(self, request: SipRequest, flow: Flow) -> None:
        method = request.method
        if method == "ACK":
            self._ack(request)
            return
        key = _key(request)
        known = self._transactions.get(key)
        if known is not None:
            self.stats.retransmissions += 1
            if known.response is not None:
                known.flow.send(known.response)
            return
        if method == "CANCEL":
            self._cancel(request, flow)
        elif method not in ("INVITE", "BYE", "OPTIONS"):
            self._answer(request, flow, 501, extra={"Allow": ALLOW})
        elif self._unsupported(request, flow):
            pass
        elif method == "OPTIONS":
            self._answer(request, flow, 200, extra={"Allow": ALLOW, "Accept": ACCEPT, "Supported": ", ".join(SUPPORTED)})
        elif method == "BYE":
            self._bye(request, flow)
        elif request.address("To").tag:
            self._reinvite(request, flow)
        else:
            self._invite(request, flow)

    def _unsupported(self, request: SipRequest, flow: Flow) -> bool:
        """420 for a Require: naming an extension this UAS lacks (§8.2.2.3)."""
        missing = [tag for tag in request.headers.get_all("Require") if tag.lower() not in SUPPORTED]
        if missing:
            self._answer(request, flow, 420, extra={"Unsupported": ", ".join(missing)})
        return bool(missing)

    def _invite(self, request: SipRequest, flow: Flow) -> None:
        contact = request.headers.get_all("Contact")
        if not contact:
            raise SipHeaderError("Missing Contact header")
        sender = request.address("From")
        dialog = Dialog(request.call_id, _tag(), sender.tag or "", "", str(request.headers.get("From")),
                        NameAddr.parse(contact[0], "Contact").uri, request.headers.get_all("Record-Route"),
                        request.cseq()[0], flow, request.uri)
        dialog.local = _with_tag(request.headers.get("To"), dialog.local_tag)
        txn = self._transaction(request, flow, dialog)
        self.dialogs[dialog.key] = dialog
        self._provisional(txn, 100)
        txn.ringing = self.answer_delay_s > 0
        txn.task = self._spawn(self._run_invite(txn, initial=True), f"sip-invite-{dialog.call_id[:32]}")

    def _reinvite(self, request: SipRequest, flow: Flow) -> None:
        dialog = self._dialog_of(request)
        if dialog is None or dialog.state == "terminated":
            self._answer(request, flow, 481)
            return
        cseq = request.cseq()[0]
        if dialog.invite_pending or cseq <= dialog.remote_cseq:
            # §14.2: an INVITE while another is unanswered (or one out of order).
            self._answer(request, flow, 500, "Another INVITE Is In Progress" if dialog.invite_pending else "CSeq Out Of Order",
                         extra={"Retry-After": "1"})
            return
        dialog.remote_cseq, dialog.invite_pending, dialog.flow = cseq, True, flow
        txn = self._transaction(request, flow, dialog)
        self._provisional(txn, 100)
        txn.task = self._spawn(self._run_invite(txn, initial=False), f"sip-reinvite-{dialog.call_id[:32]}")

    async def _run_invite(self, txn: _Transaction, initial: bool) -> None:
        dialog = txn.dialog
        if txn.ringing:
            self._provisional(txn, 180)
            await asyncio.sleep(self.answer_delay_s)
            txn.ringing = False
        handle = self.handler.invite if initial else self.handler.reinvite
        try:
            body, content_type = await handle(dialog, txn.request)
        except SipFailure as exc:
            self._refused(txn, exc.status, exc.reason, exc.headers)
            return
        except Exception:
            log.exception("handling the INVITE of call %s failed", dialog.call_id)
            self.stats.handler_errors += 1
            self._refused(txn, 500)
            return
        if txn.cancelled or dialog.state == "terminated":
            dialog.invite_pending = False
            if initial:
                self._terminate(dialog, "cancel")  # answered too late: undo what the handler set up
            return
        self._accept(txn, body, content_type)

    def _refused(self, txn: _Transaction, status: int, reason: str | None = None, headers: dict[str, str] | None = None) -> None:
        dialog = txn.dialog
        dialog.invite_pending = False
        if not txn.cancelled:
            self._final(txn, status, reason, headers)
        if dialog.state == "early":
            dialog.state, dialog.context = "terminated", None  # the handler has undone its part
            self.dialogs.pop(dialog.key, None)

    def _accept(self, txn: _Transaction, body: bytes, content_type: str) -> None:
        dialog = txn.dialog
        dialog.state, dialog.invite_pending = "confirmed", False
        dialog.awaiting_ack = txn.request.cseq()[0]
        extra = {"Contact": self._contact(dialog), "Allow": ALLOW, "Supported": ", ".join(SUPPORTED), "Content-Type": content_type}
        response = self.response(txn.request, 200, None, dialog.local_tag, extra, body)
        for route in txn.request.headers.get_all("Record-Route"):
            response.headers.add("Record-Route", route)  # §12.1.1
        txn.response, txn.status = bytes(response), 200
        txn.flow.send(txn.response)
        if not txn.flow.reliable:
            self._retransmit(txn, self.t1, lambda: dialog.awaiting_ack is not None)
        txn.timers.append(_later(self.timer_b, self._no_ack, txn))

    def _no_ack(self, txn: _Transaction) -> None:
        """64*T1 after a 200: end the transaction; without an ACK, end the call (§13.3.1.4)."""
        self._transactions.pop(txn.key, None)
        _cancel(txn.timers)
        dialog = txn.dialog
        if dialog.awaiting_ack is not None and dialog.state == "confirmed":
            dialog.awaiting_ack = None
            self._send_bye(dialog)
            self._terminate(dialog, "no-ack")

    def _ack(self, request: SipRequest) -> None:
        txn = self._transactions.get(_key(request, "INVITE"))
        if txn is not None and txn.status >= 300:
            _cancel(txn.timers)  # Timer G stops; Timer I keeps the transaction a little
            txn.timers = [_later(0 if txn.flow.reliable else self.t4, self._forget, txn)]
            return
        dialog = self._dialog_of(request)
        if dialog is not None and dialog.awaiting_ack == request.cseq()[0]:
            dialog.awaiting_ack = None

    def _bye(self, request: SipRequest, flow: Flow) -> None:
        dialog = self._dialog_of(request)
        if dialog is None or dialog.state == "terminated":
            self._answer(request, flow, 481)
            return
        self._answer(request, flow, 200)
        pending = self._invite_of(dialog)
        if pending is not None and pending.status < 200:
            pending.cancelled = True
            self._final(pending, 487)
        self._terminate(dialog, "bye")

    def _cancel(self, request: SipRequest, flow: Flow) -> None:
        """§9.2: CANCEL matches the INVITE with the same branch; it only acts before the
        final response, and is answered 200 either way."""
        txn = self._transactions.get(_key(request, "INVITE"))
        if txn is None:
            self._answer(request, flow, 481)
            return
        self._answer(request, flow, 200, to_tag=txn.dialog.local_tag if txn.dialog else None)
        if txn.status >= 200:
            return
        txn.cancelled = True
        self._final(txn, 487)
        dialog = txn.dialog
        if dialog is not None and dialog.state == "early":
            dialog.state = "terminated"
            self.dialogs.pop(dialog.key, None)
        if txn.ringing and txn.task is not None:
            txn.task.cancel()

    # -- responses ---------------------------------------------------------------------

    def response(self, request: SipRequest, status: int, reason: str | None = None, to_tag: str | None = None,
                 extra: dict[str, str] | None = None, body: bytes = b"") -> SipResponse:
        """A response to `request` (§8.2.6): its Via, From, Call-ID and CSeq, its To with
        our tag, `extra` headers and `body`."""
        response = SipResponse(status=status, reason=_reason(reason or REASONS.get(status, "Unknown")), body=body)
        for name in ("Via", "From", "To", "Call-ID", "CSeq"):
            for key, value in request.headers.items:
                if key == name:
                    if name == "To" and to_tag and "tag=" not in value:
                        value = _with_tag(value, to_tag)
                    response.headers.add(name, value)
        response.headers.add("Server", SERVER)
        for name, value in (extra or {}).items():
            response.headers.add(name, value)
        return response

    def _answer(self, request: SipRequest, flow: Flow, status: int, reason: str | None = None,
                to_tag: str | None = None, extra: dict[str, str] | None = None) -> None:
        """A final response to a non-INVITE request, kept for its retransmissions."""
        if to_tag is None and status > 100 and not request.address("To").tag:
            to_tag = _tag()
        txn = self._transaction(request, flow, None)
        txn.response, txn.status = bytes(self.response(request, status, reason, to_tag, extra)), status
        flow.send(txn.response)
        txn.timers.append(_later(0 if flow.reliable else self.timer_b, self._forget, txn))  # Timer J

    def _provisional(self, txn: _Transaction, status: int) -> None:
        to_tag = txn.dialog.local_tag if status > 100 and txn.dialog else None
        txn.response, txn.status = bytes(self.response(txn.request, status, None, to_tag)), status
        txn.flow.send(txn.response)

    def _final(self, txn: _Transaction, status: int, reason: str | None = None, headers: dict[str, str] | None = None) -> None:
        """A failure response to an INVITE, retransmitted until its ACK (Timers G and H)."""
        _cancel(txn.timers)
        to_tag = txn.dialog.local_tag if txn.dialog else _tag()
        txn.response, txn.status = bytes(self.response(txn.request, status, reason, to_tag, headers)), status
        txn.flow.send(txn.response)
        if not txn.flow.reliable:
            self._retransmit(txn, self.t1, lambda: txn.key in self._transactions and txn.status == status)
        txn.timers.append(_later(self.timer_b, self._forget, txn))

    def _retransmit(self, txn: _Transaction, interval: float, still: Callable[[], bool]) -> None:
        def again() -> None:
            if still() and not self._closed:
                txn.flow.send(txn.response)
                self._retransmit(txn, min(interval * 2, self.t2), still)

        txn.timers.append(_later(interval, again))

    # -- requests of our own -------------------------------------------------------------

    def _send_bye(self, dialog: Dialog) -> None:
        """BYE on the dialog's flow, retransmitted over UDP until answered (Timers E, F)."""
        dialog.local_cseq += 1
        branch = BRANCH_COOKIE + secrets.token_hex(8)
        via = Via(dialog.flow.transport, dialog.flow.local[0], dialog.flow.local[1], {"branch": branch, "rport": None})
        bye = SipRequest(method="BYE", uri=dialog.remote_target)
        for name, value in (("Via", str(via)), ("Max-Forwards", "70"), ("From", dialog.local), ("To", dialog.remote),
                            ("Call-ID", dialog.call_id), ("CSeq", f"{dialog.local_cseq} BYE")):
            bye.headers.add(name, value)
        for route in dialog.route_set:
            bye.headers.add("Route", route)  # §12.2.1.1: the UAS's route set is Record-Route in order
        data = bytes(bye)
        dialog.flow.send(data)
        timers = self._clients[branch] = []
        if not dialog.flow.reliable:
            self._resend_request(branch, dialog.flow, data, self.t1)
        timers.append(_later(self.timer_b, self._clients.pop, branch, None))

    def _resend_request(self, branch: str, flow: Flow, data: bytes, interval: float) -> None:
        def again() -> None:
            if branch in self._clients:
                flow.send(data)
                self._resend_request(branch, flow, data, min(interval * 2, self.t2))

        if branch in self._clients:
            self._clients[branch].append(_later(interval, again))

    def _client_response(self, response: SipResponse) -> None:
        try:
            vias = response.vias()
        except SipError:
            return
        if vias and vias[0].branch in self._clients and response.status >= 200:
            _cancel(self._clients.pop(vias[0].branch))

    # -- bookkeeping -------------------------------------------------------------------

    def _transaction(self, request: SipRequest, flow: Flow, dialog: Dialog | None) -> _Transaction:
        txn = _Transaction(_key(request), request, flow, dialog)
        self._transactions[txn.key] = txn
        return txn

    def _forget(self, txn: _Transaction) -> None:
        _cancel(txn.timers)
        if self._transactions.get(txn.key) is txn:
            del self._transactions[txn.key]

    def _invite_of(self, dialog: Dialog) -> _Transaction | None:
        for txn in self._transactions.values():
            if txn.dialog is dialog and txn.request.method == "INVITE" and txn.status < 200:
                return txn
        return None

    def _dialog_of(self, request: SipRequest) -> Dialog | None:
        to_tag = request.address("To").tag
        from_tag = request.address("From").tag
        return self.dialogs.get((request.call_id, to_tag or "", from_tag or ""))

    def _terminate(self, dialog: Dialog, reason: str) -> None:
        """The dialog is over; the handler hears of it once, if it had set a call up."""
        dialog.state, dialog.awaiting_ack = "terminated", None
        self.dialogs.pop(dialog.key, None)
        if dialog.context is None:
            return
        try:
            self.handler.ended(dialog, reason)
        except Exception:
            log.exception("ending call %s failed", dialog.call_id)
        dialog.context = None

    def _contact(self, dialog: Dialog) -> str:
        user = dialog.request_uri.split(":", 1)[-1].split("@")[0] if "@" in dialog.request_uri else "mediaserver"
        host, port = dialog.flow.local[0], dialog.flow.local[1]
        host = f"[{host}]" if ":" in host else host
        transport = ";transport=tcp" if dialog.flow.transport == "TCP" else ""
        return f"<sip:{user}@{host}:{port}{transport}>"

    def _spawn(self, coro, name: str) -> asyncio.Task:
        return self._tasks.spawn(coro, name)

    def _send(self, flow: Flow, response: SipResponse) -> None:
        flow.send(bytes(response))


def _key(request: SipRequest, method: str | None = None) -> tuple:
    """§17.2.3: a server transaction is its top Via's branch and sent-by, and the method
    (ACK and CANCEL match the INVITE's branch)."""
    via = request.vias()[0]
    branch = via.branch or ""
    if not branch.startswith(BRANCH_COOKIE):
        # An RFC 2543 peer: no unique branch, so the dialog-identifying fields stand in.
        branch = f"{request.call_id}|{request.cseq()[0]}|{request.address('From').tag}"
    return (branch, via.sent_by, method or request.method)


def _tag() -> str:
    return secrets.token_hex(6)


def _with_tag(value: str | None, tag: str) -> str:
    return f"{value or ''};tag={tag}"


def _reason(text: str) -> str:
    """A reason phrase: one line, printable, bounded."""
    clean = "".join(ch if ch.isprintable() else " " for ch in text).strip()
    return clean[:120] or "Bad Request"


def _later(delay: float, callback, *args) -> asyncio.TimerHandle:
    return asyncio.get_running_loop().call_later(delay, callback, *args)


def _cancel(timers: list[asyncio.TimerHandle]) -> None:
    for timer in timers:
        timer.cancel()
    timers.clear()
