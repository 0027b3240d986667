"""Telephony ingest wired to the engine: RTP legs by SDP offer/answer, and SIP calls.

`RtpService` ("rtp") owns the UDP endpoints of RTP legs: `offer()` answers the SDP of
`POST /api/v1/sessions/{uuid}/legs`, and the SIP service opens its legs through it.
Each leg's packets go straight from the socket callback to the session's inbox as codec
payloads; decoding happens on the processing thread.

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

import asyncio
import functools
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from mediaserver.api.keys import CONFIG, ENGINE, SERVICES
from mediaserver.config import Config
from mediaserver.errors import ProtocolError, ServiceError
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
from mediaserver.sip.transport import SipTransports, local_address_for
from mediaserver.sip.uas import ACCEPT, Dialog, SipFailure, UserAgentServer

log = logging.getLogger(__name__)

ROLE = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # caller, callee or a participant name
PLAIN_ROLES = ("caller", "callee")
MAX_HEADERS, MAX_HEADER_VALUE = 20, 256  # X- headers kept in the session's metadata: how many, how long


@dataclass(eq=False)
class RtpLeg:
    """One RTP leg: its engine leg and its media path (sockets and receiver, in this
    process or in the worker that runs the session)."""

    leg_id: str
    role: str
    live: LiveSession
    media: Any  # RtpMedia, or its stand-in for a session in a worker process
    stream: AcceptedStream
    closed: bool = False

    @property
    def endpoint(self):
        return self.media.endpoint

    @property
    def receiver(self):
        return self.media.receiver


class RtpService:
    """RTP legs of live sessions, on ports from the configured range."""

    def __init__(self, engine: Engine, config: Config) -> None:
        self.engine = engine
        self.host = config.sip_host  # media and signalling face the same network
        # Packets behind a gap wait for the missing one while the mix, `jitter_ms` behind
        # real time, can still take it, with a processing tick to spare either side.
        self.hold_s = max(config.jitter_ms - 2 * config.tick_ms, config.tick_ms) / 1000
        self.legs: dict[str, RtpLeg] = {}
        self._sessions: dict[str, list[RtpLeg]] = {}
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        """Close every leg's sockets; idempotent."""
        for leg in list(self.legs.values()):
            self.close_leg(leg)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def address_for(self, remote_host: str) -> str:
        """The address to put in SDP for a peer at `remote_host`."""
        return local_address_for(self.host, remote_host)

    async def offer(self, live: LiveSession, body: Any) -> tuple[str, str]:
        """`POST /api/v1/sessions/{uuid}/legs`: a new leg for the offer's first audio
        stream that this server can receive; answers (leg_id, SDP answer)."""
        role, offer = _leg_request(body)
        accepted = accepted_streams(offer)
        first = next((stream for stream in accepted if stream is not None), None)
        if first is None:
            raise ServiceError(400, "sdp.not_acceptable", "the offer has no audio stream with a codec this server receives")
        accepted = [stream if stream is first else None for stream in accepted]
        leg = await self.open_leg(live, role, first)
        ports = [leg.media.port if stream is first else 0 for stream in accepted]
        return leg.leg_id, str(answer(offer, accepted, ports, self.address_for(first.remote[0])))

    async def open_leg(self, live: LiveSession, role: str, stream: AcceptedStream) -> RtpLeg:
        """Bind a port pair and start receiving `stream` as a new leg of `live`."""
        leg_id = self.engine.add_leg(live, role, kind="rtp")
        try:
            media = await self.engine.open_rtp(live, leg_id, stream.formats, self.hold_s)
        except OSError as exc:
            self.engine.end_leg(live, leg_id)
            raise ServiceError(503, "rtp.no_ports", f"no RTP port is free: {exc}") from None
        leg = self.legs[leg_id] = RtpLeg(leg_id, role, live, media, stream)
        if live.uuid not in self._sessions:
            self._sessions[live.uuid] = []
            live.on_end.append(functools.partial(self._session_ended, live.uuid))
        self._sessions[live.uuid].append(leg)
        return leg

    def update_leg(self, leg: RtpLeg, stream: AcceptedStream) -> None:
        """A re-offer for the leg's stream: new formats, and a new peer when it moved."""
        leg.media.set_formats(stream.formats)
        if stream.remote != leg.stream.remote and not stream.on_hold:
            leg.media.relatch()
        leg.stream = stream

    def end_leg(self, leg: RtpLeg) -> None:
        """The stream was removed (port 0 in a re-offer): the leg ends, its port closes."""
        self.engine.end_leg(leg.live, leg.leg_id)
        self.close_leg(leg)

    def close_leg(self, leg: RtpLeg) -> None:
        """Close the leg's sockets and keep its counters in the catalog; idempotent."""
        if leg.closed:
            return
        leg.closed = True
        self.legs.pop(leg.leg_id, None)
        task = asyncio.get_running_loop().create_task(self._close(leg), name=f"rtp-close-{leg.leg_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _close(self, leg: RtpLeg) -> None:
        try:
            stats = await leg.media.close()
        except Exception:
            log.exception("closing RTP leg %s failed", leg.leg_id)
            return
        for reason in ("duplicates", "stale", "unknown_payload_type", "foreign_source", "rtcp_malformed"):
            if stats.get(reason):
                self.engine.count_dropped(f"rtp_{reason}", stats[reason])
        if stats.get("malformed"):
            self.engine.count_dropped("rtp_malformed", stats["malformed"])
        try:
            self.engine.catalog.update_leg(leg.leg_id, stats=stats)
        except Exception:
            log.exception("keeping the statistics of leg %s failed", leg.leg_id)

    def _session_ended(self, uuid: str) -> None:
        for leg in self._sessions.pop(uuid, ()):
            self.close_leg(leg)


def _leg_request(body: Any) -> tuple[str, SessionDescription]:
    if not isinstance(body, dict):
        raise ServiceError(400, "request.invalid_body", "the body must be a JSON object")
    unknown = set(body) - {"role", "sdp"}
    if unknown:
        raise ServiceError(400, "request.invalid_body", f"unknown field: {sorted(unknown)[0]}")
    role = body.get("role", "caller")
    if not isinstance(role, str) or not ROLE.fullmatch(role):
        raise ServiceError(400, "legs.invalid_role", "role must be 1-64 letters, digits, '_' or '-'")
    sdp = body.get("sdp")
    if not isinstance(sdp, str) or not sdp.strip():
        raise ServiceError(400, "sdp.missing", "sdp must be the SDP offer as a string")
    try:
        return role, SessionDescription.parse(sdp)
    except SdpError as exc:
        raise ServiceError(400, "sdp.invalid", str(exc)) from None


# -- SIP ------------------------------------------------------------------------------------


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

    def __init__(self, engine: Engine, config: Config, rtp: RtpService) -> None:
        self.engine = engine
        self.config = config
        self.rtp = rtp
        self.uas = UserAgentServer(self, config.sip_answer_delay_ms / 1000)
        self.transports = SipTransports(config.sip_host, config.sip_port, self.uas.receive, self.uas.unframed)
        self.calls: dict[str, Call] = {}  # by session uuid
        self._tasks: set[asyncio.Task] = set()

    @property
    def port(self) -> int:
        return self.transports.port

    async def start(self) -> None:
        await self.transports.start()
        log.info("SIP on %s:%d (UDP and TCP)", self.config.sip_host, self.transports.port)

    async def close(self) -> None:
        """Hang up every call (BYE), stop listening, wait for the sessions to be ended."""
        await self.uas.close()
        await self.transports.close()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- CallHandler -------------------------------------------------------------------

    async def invite(self, dialog: Dialog, request: SipRequest) -> tuple[bytes, str]:
        offer, metadata = _offer(request)
        accepted = accepted_streams(offer)
        if not any(accepted):
            raise SipFailure(488, "No Acceptable Audio Stream")
        live = self.engine.create_session(self._app_for(request), "siprec" if metadata else "sip", meta=_meta(dialog, request, metadata))
        call = Call(dialog, live, metadata=metadata)
        try:
            await self._open_legs(call, accepted)
            if self.config.record_policy == "all":
                options = self.engine.defaults.merged({"channels": 2}) if metadata else self.engine.defaults
                self.engine.start_recording(live, options, None)
        except Exception as exc:
            self._end(call)  # undo what could not be answered
            raise _failure(exc) from None
        dialog.context = call
        self.calls[live.uuid] = call
        live.on_end.append(functools.partial(self._session_ended, call))
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
        except ServiceError as exc:
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
        if user and self.config.app(user) is not None:
            return user
        return self.config.apps[0].id

    def _end(self, call: Call) -> None:
        """Close the call's ports and end its session (its recording finishes: hangup)."""
        for leg in call.legs.values():
            self.rtp.close_leg(leg)
        task = asyncio.create_task(self.engine.end_session(call.live.uuid), name=f"sip-end-{call.live.uuid}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _session_ended(self, call: Call) -> None:
        """The session ended elsewhere (API, shutdown): hang the call up."""
        if not call.over:
            self.uas.hangup(call.dialog, "hangup")


def _failure(exc: Exception) -> Exception:
    """What to answer an INVITE whose call could not be set up."""
    if isinstance(exc, ServiceError) and exc.code == "rtp.no_ports":
        return SipFailure(503, "No Media Port Available")
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


def make_rtp_service(app: web.Application) -> RtpService:
    """The "rtp" service of `_service_factories`."""
    return RtpService(app[ENGINE], app[CONFIG])


def make_sip_service(app: web.Application) -> SipService:
    """The "sip" service of `_service_factories`; needs "rtp" started before it."""
    return SipService(app[ENGINE], app[CONFIG], app[SERVICES]["rtp"])
