"""SIP calls: every INVITE to the UAS becomes a session whose audio streams are RTP legs.

`SipService` ("sip") is the UAS on `sip_host:sip_port` (UDP and TCP). Every INVITE
becomes a session of an app: the app whose id is the Request-URI's user part
(`sip:app1@host`), else the first configured app. A plain call's audio streams are legs
by their order (caller, callee, …); a SIPREC INVITE's streams are legs named by the
recording metadata (see `mediaserver.sip.siprec`). With `record_policy = all` the
recording starts when the call is answered, with the default options, dual channel for
SIPREC; with `api` it waits for `record/start`. BYE, CANCEL or a missing ACK end the
session; a session ended through the API hangs up the call with BYE.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

from mediaserver.calls.rtp import RtpLeg, RtpService
from mediaserver.errors import ProtocolError, Refused, Unavailable
from mediaserver.recorder.engine import Engine, LiveSession
from mediaserver.sip.message import SipRequest, SipUri
from mediaserver.sip.sdp import AcceptedStream, OfferNotAcceptable, Origin, SdpError, SessionDescription, accepted_streams, answer
from mediaserver.sip.siprec import (
    METADATA_TYPE,
    SDP_TYPE,
    RecordingMetadata,
    parse_multipart,
    participant_role,
    stream_roles,
)
from mediaserver.sip.transport import SipTransports
from mediaserver.sip.uas import ACCEPT, Dialog, SipFailure, UserAgentServer
from mediaserver.tasks import TaskSet

log = logging.getLogger(__name__)

PLAIN_ROLES = ("caller", "callee")
MAX_HEADERS, MAX_HEADER_VALUE = 20, 256  # X- headers kept in the session's metadata: how many, how long


@dataclass(eq=False)
class Call:
    """A SIP call: its dialog, its session and its legs by m= line index."""

    dialog: Dialog
    live: LiveSession
    legs: dict[int, RtpLeg] = field(default_factory=dict)
    origin: Origin | None = None  # of our last answer, for the next one (RFC 3264 §8)
    answer: bytes = b""
    metadata: RecordingMetadata | None = None
    over: bool = False


class SipService:
    """The SIP UAS, turning calls into sessions with RTP legs."""

    def __init__(self, engine: Engine, rtp: RtpService, *, host: str, port: int, app_ids: Sequence[str],
                 answer_delay_s: float = 0.0, record_all: bool = False) -> None:
        """`app_ids`: the configured apps, the first taking calls that name none;
        `record_all`: start recording when a call is answered (`record_policy = all`)."""
        self.engine = engine
        self.rtp = rtp
        self.host = host
        self.app_ids = tuple(app_ids)
        self.record_all = record_all
        self.uas = UserAgentServer(self, answer_delay_s)
        self.transports = SipTransports(host, port, self.uas.receive, self.uas.unframed)
        self.calls: dict[str, Call] = {}  # by session uuid
        self._tasks = TaskSet("sip calls")
        self._watchers = TaskSet("sip sessions")  # one per session, until it is over

    @property
    def port(self) -> int:
        return self.transports.port

    async def start(self) -> None:
        await self.transports.start()
        log.info("SIP on %s:%d (UDP and TCP)", self.host, self.transports.port)

    async def close(self) -> None:
        """Hang up every call (BYE), stop listening, wait for the sessions to be ended."""
        await self.uas.close()
        await self.transports.close()
        await self._tasks.wait()
        await self._tasks.close()
        await self._watchers.close()

    # -- CallHandler -------------------------------------------------------------------

    async def invite(self, dialog: Dialog, request: SipRequest) -> tuple[bytes, str]:
        offer, metadata = _offer(request)
        accepted = accepted_streams(offer)
        if not any(accepted):
            raise SipFailure(488, "No Acceptable Audio Stream")
        try:
            live = await self.engine.create_session(self._app_for(request), "siprec" if metadata else "sip",
                                              meta=_meta(dialog, request, metadata))
        except Unavailable as exc:  # past capacity: another node may take it
            raise _failure(exc) from None
        call = Call(dialog, live, metadata=metadata)
        try:
            await self._open_legs(call, accepted)
            if self.record_all:
                options = self.engine.defaults.merged({"channels": 2}) if metadata else self.engine.defaults
                self.engine.start_recording(live, options, None)
        except Exception as exc:
            self._end(call)  # undo what could not be answered
            raise _failure(exc) from None
        dialog.context = call
        self.calls[live.uuid] = call
        self._watchers.spawn(self._hang_up_when_over(call), f"sip-session-{live.uuid}")
        return self._answer(call, offer, accepted), SDP_TYPE

    async def reinvite(self, dialog: Dialog, request: SipRequest) -> tuple[bytes, str]:
        """A new offer in the dialog: hold, a moved peer, another codec, streams added or
        removed. The session and its recording go on; only the legs change."""
        call: Call = dialog.context
        if call is None or call.over:
            raise SipFailure(481)
        if not request.body:
            return call.answer, SDP_TYPE  # an offerless re-INVITE (a refresh): our last description
        offer, metadata = _offer(request)
        accepted = accepted_streams(offer)
        if not any(accepted):
            raise SipFailure(488, "No Acceptable Audio Stream")
        if metadata is not None:
            call.metadata = metadata
        try:
            await self._open_legs(call, accepted)
        except Refused as exc:
            raise _failure(exc) from None  # the call goes on as it was (RFC 3261 §14.2)
        return self._answer(call, offer, accepted), SDP_TYPE

    def ended(self, dialog: Dialog, reason: str) -> None:
        """The dialog is over (BYE, CANCEL after the answer, no ACK, shutdown)."""
        call: Call | None = dialog.context
        if call is None or call.over:
            return
        call.over = True
        self.calls.pop(call.live.uuid, None)
        self._end(call)

    # -- internals -----------------------------------------------------------------------

    async def _open_legs(self, call: Call, accepted: list[AcceptedStream | None]) -> None:
        """Match the offer's streams to the call's legs by m= line index (RFC 3264 §8)."""
        roles = self._roles(call, accepted)
        for index, stream in enumerate(accepted):
            leg = call.legs.get(index)
            if stream is None:
                if leg is not None:
                    self.rtp.end_leg(call.legs.pop(index))
            elif leg is not None:
                self.rtp.update_leg(leg, stream)
            else:
                call.legs[index] = await self.rtp.open_leg(call.live, roles[index], stream)
        for index in [i for i in call.legs if i >= len(accepted)]:
            self.rtp.end_leg(call.legs.pop(index))

    def _roles(self, call: Call, accepted: list[AcceptedStream | None]) -> list[str]:
        if call.metadata is not None:
            return stream_roles([stream.label if stream else None for stream in accepted], call.metadata)
        roles, order = [], 0
        for stream in accepted:
            roles.append(PLAIN_ROLES[order] if order < len(PLAIN_ROLES) else f"participant{order + 1}")
            order += stream is not None
        return roles

    def _answer(self, call: Call, offer: SessionDescription, accepted: list[AcceptedStream | None]) -> bytes:
        ports = [call.legs[i].media.port if stream is not None else 0 for i, stream in enumerate(accepted)]
        description = answer(offer, accepted, ports, self.rtp.address_for(call.dialog.flow.remote[0]), call.origin)
        call.origin, call.answer = description.origin, bytes(description)
        return call.answer

    def _app_for(self, request: SipRequest) -> str:
        try:
            user = SipUri.parse(request.uri).user
        except ProtocolError:
            user = None
        if user and user in self.app_ids:
            return user
        return self.app_ids[0]

    def _end(self, call: Call) -> None:
        """Close the call's ports and end its session (its recording finishes: hangup)."""
        for leg in call.legs.values():
            self.rtp.close_leg(leg)
        self._tasks.spawn(self.engine.end_session(call.live.uuid), f"sip-end-{call.live.uuid}")

    async def _hang_up_when_over(self, call: Call) -> None:
        """Once the session has ended, the call is hung up (BYE) unless its dialog is over
        already (the BYE came from the peer): the session ended elsewhere (API, shutdown)."""
        await call.live.over.wait()
        if not call.over:
            self.uas.hangup(call.dialog, "hangup")


def _failure(exc: Exception) -> Exception:
    """What to answer an INVITE whose call could not be set up."""
    if isinstance(exc, Unavailable) and exc.code == "rtp.no_ports":
        return SipFailure(503, "No Media Port Available")
    if isinstance(exc, Unavailable):
        # RFC 3261 §21.5.4: 503 with Retry-After; a proxy tries another node meanwhile.
        headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s is not None else None
        return SipFailure(503, "Service Unavailable", headers)
    return exc


def _offer(request: SipRequest) -> tuple[SessionDescription, RecordingMetadata | None]:
    """The SDP offer of an INVITE and, for SIPREC, its recording metadata."""
    kind = request.content_type
    try:
        if kind == SDP_TYPE:
            return SessionDescription.parse(request.body), None
        if kind == "multipart/mixed":
            return _multipart_offer(request)
    except (ProtocolError, OfferNotAcceptable) as exc:
        raise SipFailure(400, str(exc)) from None
    if not request.body:
        raise SipFailure(488, "An SDP Offer Is Required")
    raise SipFailure(415, headers={"Accept": ACCEPT})


def _multipart_offer(request: SipRequest) -> tuple[SessionDescription, RecordingMetadata | None]:
    parts = parse_multipart(request.headers.get("Content-Type") or "", request.body)
    sdp = [part for part in parts if part.content_type == SDP_TYPE]
    if len(sdp) != 1:
        raise SdpError(f"multipart body has {len(sdp)} SDP parts, not one")
    metadata = [part for part in parts if part.content_type == METADATA_TYPE]
    return SessionDescription.parse(sdp[0].body), RecordingMetadata.parse(metadata[0].body) if metadata else None


def _meta(dialog: Dialog, request: SipRequest, metadata: RecordingMetadata | None) -> dict[str, Any]:
    extra = [(name, value[:MAX_HEADER_VALUE]) for name, value in request.headers.items if name.lower().startswith("x-")]
    meta: dict[str, Any] = {"sip": {
        "call_id": dialog.call_id, "from": request.headers.get("From"), "to": request.headers.get("To"),
        "request_uri": request.uri, "transport": dialog.flow.transport, "remote": f"{dialog.flow.remote[0]}:{dialog.flow.remote[1]}",
        "headers": dict(extra[:MAX_HEADERS]),
    }}
    if metadata is not None:
        meta["siprec"] = {
            "session_id": metadata.session_id,
            "participants": [{"role": participant_role(i, p), "aor": p.aor, "name": p.name} for i, p in enumerate(metadata.participants)],
        }
    return meta
