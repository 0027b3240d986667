"""WHIP (RFC 9725): a WebRTC leg by SDP offer/answer, and a page that publishes a microphone.

- `POST /whip/v1/sessions/{uuid}/legs/{role}` with an `application/sdp` offer → 201, the
  SDP answer (every server candidate in it: no trickle) and a `Location` naming the leg;
  an unknown session is created for the caller, as with the WebSocket ingest.
- `DELETE` on that location ends the leg → 200. The leg also ends when the client's
  stream or connection ends, and with its session; an ended leg's resource answers 404.
  A leg whose ICE or DTLS failed, or that never received audio, is logged at WARNING and
  carries `error` (`ice_failed`, `dtls_failed`, `no_media`) in the recording's legs.
- `OPTIONS` on the endpoint → 204 with `Accept-Post: application/sdp`; `PATCH` on a leg →
  501: neither trickle ICE nor ICE restarts are supported (RFC 9725, "HTTP PATCH Request
  Usage"), so a client sends every candidate in its offer.
- `GET /whip/publish` (+ `publish.js`): a page that publishes the browser's microphone.

Authentication is the ingest rule: API headers (Bearer included) or the session's
signed `?token=` from `POST /api/v1/sessions`; the token is carried over to `Location`
so that a client holding only the URL can end its leg. A malformed offer is 400, one
this server cannot record (no audio, several, no common codec) is 406, as RFC 9725 asks.
"""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote

import numpy as np
from aiohttp import web

from mediaserver import ids
from mediaserver.api.auth import ingest_app
from mediaserver.api.keys import CATALOG, CLOCK, CONFIG, ENGINE, SERVICES
from mediaserver.errors import ServiceError
from mediaserver.recorder.engine import Engine, LiveSession
from mediaserver.webrtc import Offer, OfferError, WhipService
from mediaserver.webrtc.ice import addresses_for

log = logging.getLogger(__name__)

ENDPOINT = "/whip/v1/sessions/{uuid}/legs/{role}"
RESOURCE = ENDPOINT + "/{leg_id}"
SDP = "application/sdp"
STATIC = Path(__file__).parent / "static"
SERVICE_NAME = "webrtc"
ROLE = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # caller, callee or a participant name


def make_service(app: web.Application) -> WhipService:
    """The WebRTC service, offering ICE candidates on the HTTP listener's address."""
    return WhipService(addresses_for(app[CONFIG].http_host))


class _LegSink:
    """Where one WHIP leg's audio goes: the engine. Ends the session too when this offer
    created it and no other leg is left (as the WebSocket ingest does)."""

    def __init__(self, engine: Engine, live: LiveSession, leg_id: str, created: bool) -> None:
        self.engine = engine
        self.live = live
        self.leg_id = leg_id
        self.created = created
        self.counters = live.session.inputs[leg_id]  # packets and lost, shown per leg in recordings
        self.on_session_end = None  # the callback registered in live.on_end, if any

    def audio(self, samples: np.ndarray, rate: int) -> None:
        self.counters.packets += 1
        if not self.live.ending:
            self.engine.post_pcm(self.live, self.leg_id, samples, rate)

    def gap(self, count: int, rate: int, packets: int) -> None:
        self.counters.lost += packets
        if not self.live.ending:
            self.engine.post_pcm(self.live, self.leg_id, np.zeros(count, dtype=np.int16), rate)

    def dropped(self, reason: str, count: int) -> None:
        self.engine.count_dropped(reason, count)

    async def ended(self, stats: dict[str, Any]) -> None:
        if self.on_session_end in self.live.on_end:
            self.live.on_end.remove(self.on_session_end)
        self.engine.catalog.update_leg(self.leg_id, stats=stats)
        if stats.get("error"):
            log.warning("WHIP leg %s (%s) of session %s failed: %s (connection %s)", self.leg_id,
                        self.live.legs.get(self.leg_id), self.live.uuid, stats["error"], stats.get("connection"))
            self.engine.fail_leg(self.live, self.leg_id, stats["error"])
        if self.engine.sessions.get(self.live.uuid) is not self.live:
            return  # the session is over: its legs were ended with it
        self.engine.end_leg(self.live, self.leg_id)
        live = self.live
        if self.created and all(leg in live.ended_legs for leg in live.legs):
            await self.engine.end_session(live.uuid)


class LegOwner(NamedTuple):
    """Who a WHIP leg belongs to: checked before a DELETE ends it."""

    app_id: str
    session_uuid: str
    role: str


def _service(request: web.Request) -> WhipService:
    service = request.app[SERVICES].get(SERVICE_NAME)
    if service is None or service.closing:
        raise ServiceError(503, "whip.unavailable", "WebRTC ingest is not running on this server")
    return service


def _check_path(uuid: str, role: str) -> None:
    if not ids.is_uuid(uuid):
        raise ServiceError(400, "sessions.invalid_uuid", "the session id must be a lower-case UUID")
    if not ROLE.fullmatch(role):
        raise ServiceError(400, "legs.invalid_role", "role must be 1-64 letters, digits, '_' or '-'")


async def _offer(request: web.Request) -> str:
    """The request's SDP offer, checked: 415 not SDP, 400 malformed, 406 not recordable."""
    if request.content_type != SDP:
        raise ServiceError(415, "whip.unsupported_media_type", f"the offer must be sent as {SDP}, not {request.content_type or 'nothing'}")
    try:
        text = (await request.read()).decode("utf-8")
    except UnicodeDecodeError:
        raise ServiceError(400, "whip.invalid_sdp", "the SDP offer is not UTF-8 text") from None
    try:
        Offer.parse(text)
    except OfferError as exc:
        raise _refusal(exc) from None
    return text


def _refusal(exc: OfferError) -> ServiceError:
    if exc.malformed:
        return ServiceError(400, "whip.invalid_sdp", str(exc))
    return ServiceError(406, "whip.offer_not_acceptable", str(exc))


def _session(engine: Engine, app_id: str, uuid: str, catalog) -> tuple[LiveSession, bool]:
    """The live session, or a new one when `uuid` is unknown; True when created here."""
    if uuid in engine.sessions or catalog.session(uuid) is not None:
        return engine.session_for(app_id, uuid), False
    return engine.create_session(app_id, "whip", uuid), True


async def publish(request: web.Request) -> web.Response:
    """POST an SDP offer: a new WebRTC leg, answered with the SDP answer and its Location."""
    uuid, role = request.match_info["uuid"], request.match_info["role"]
    app = request.app
    caller = ingest_app(app[CONFIG], request, uuid, app[CLOCK].time())
    _check_path(uuid, role)
    service = _service(request)
    offer = await _offer(request)
    engine: Engine = app[ENGINE]
    live, created = _session(engine, caller.id, uuid, app[CATALOG])
    leg_id = engine.add_leg(live, role, "webrtc")
    sink = _LegSink(engine, live, leg_id, created)
    try:
        answer = await service.open(leg_id, offer, sink, owner=LegOwner(caller.id, uuid, role))
    except OfferError as exc:
        log.info("WHIP offer for %s/%s refused: %s", uuid, role, exc)
        raise _refusal(exc) from None
    sink.on_session_end = functools.partial(service.end_soon, leg_id)
    live.on_end.append(sink.on_session_end)
    log.info("WHIP leg %s (%s) joined session %s", leg_id, role, uuid)
    return web.Response(status=201, text=answer, content_type=SDP, headers={"Location": _location(request, leg_id)})


def _location(request: web.Request, leg_id: str) -> str:
    path = RESOURCE.format(uuid=request.match_info["uuid"], role=request.match_info["role"], leg_id=leg_id)
    token = request.query.get("token")
    return f"{path}?token={quote(token, safe='')}" if token else path


async def unpublish(request: web.Request) -> web.Response:
    """DELETE a leg's resource: its peer connection is closed and the leg ends."""
    uuid, role, leg_id = request.match_info["uuid"], request.match_info["role"], request.match_info["leg_id"]
    app = request.app
    caller = ingest_app(app[CONFIG], request, uuid, app[CLOCK].time())
    service = _service(request)
    peer = service.get(leg_id)
    if peer is None or (peer.owner.session_uuid, peer.owner.role) != (uuid, role):
        raise ServiceError(404, "whip.not_found", f"no WHIP leg {leg_id} in session {uuid} (ended, or never created)")
    if peer.owner.app_id != caller.id:
        raise ServiceError(403, "auth.forbidden", "this leg belongs to another app")
    await service.end(leg_id)
    return web.Response(status=200)


async def options(request: web.Request) -> web.Response:
    """What the endpoint accepts (RFC 9725: Accept-Post); needs no credentials."""
    return web.Response(status=204, headers={"Allow": "OPTIONS, POST", "Accept-Post": SDP})


async def patch(request: web.Request) -> web.Response:
    """Trickle ICE and ICE restarts are not supported, which RFC 9725 answers with 501."""
    raise ServiceError(501, "whip.patch_not_supported",
                       "this server supports neither trickle ICE nor ICE restarts: send every candidate in the offer")


async def page(request: web.Request) -> web.FileResponse:
    """The page that publishes the browser's microphone by WHIP."""
    return web.FileResponse(STATIC / "publish.html", headers={"Cache-Control": "no-cache"})


async def page_script(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "publish.js", headers={"Cache-Control": "no-cache"})


def setup(app: web.Application) -> None:
    app.router.add_post(ENDPOINT, publish)
    app.router.add_route("OPTIONS", ENDPOINT, options)
    app.router.add_delete(RESOURCE, unpublish)
    app.router.add_patch(RESOURCE, patch)
    app.router.add_get("/whip/publish", page)
    app.router.add_get("/whip/publish.js", page_script)
