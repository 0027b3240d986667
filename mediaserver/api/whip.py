"""WHIP (RFC 9725) over HTTP: a WebRTC leg by SDP offer/answer, and a page that publishes a microphone.

- `POST /whip/v1/sessions/{uuid}/legs/{role}` with an `application/sdp` offer → 201, the
  SDP answer (every server candidate in it: no trickle) and a `Location` naming the leg;
  an unknown session is created for the caller, as with the WebSocket ingest.
- `DELETE` on that location ends the leg → 200. The leg also ends when the client's
  stream or connection ends, and with its session; an ended leg's resource answers 404.
- `OPTIONS` on the endpoint → 204 with `Accept-Post: application/sdp`; `PATCH` on a leg →
  501: neither trickle ICE nor ICE restarts are supported (RFC 9725, "HTTP PATCH Request
  Usage"), so a client sends every candidate in its offer.
- `GET /whip/publish` (+ `publish.js`): a page that publishes the browser's microphone.

This module reads and answers the HTTP; the leg itself (its session, its peer, where its
audio goes, and failed legs reported in the recording's legs) is `mediaserver.calls.whip`.

Authentication is the ingest rule: API headers (Bearer included) or the session's
signed `?token=` from `POST /api/v1/sessions`; the token is carried over to `Location`
so that a client holding only the URL can end its leg. A body that is not SDP is 415, a
malformed offer is 400, one this server cannot record (no audio, several, no common
codec) is 406, as RFC 9725 asks.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import quote

from aiohttp import web

from mediaserver import ids
from mediaserver.api.auth import ingest_app
from mediaserver.api.keys import CLOCK, CONFIG, ENGINE, SERVICES
from mediaserver.calls import whip as calls
from mediaserver.errors import Invalid, NotSupported, Unavailable, UnsupportedMedia
from mediaserver.webrtc import WhipService
from mediaserver.webrtc.ice import addresses_for

ENDPOINT = "/whip/v1/sessions/{uuid}/legs/{role}"
RESOURCE = ENDPOINT + "/{leg_id}"
SDP = "application/sdp"
STATIC = Path(__file__).parent / "static"
SERVICE_NAME = "webrtc"
ROLE = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # caller, callee or a participant name


def make_service(app: web.Application) -> WhipService:
    """The WebRTC service, offering ICE candidates on the HTTP listener's address."""
    return WhipService(addresses_for(app[CONFIG].http_host))


def _service(request: web.Request) -> WhipService:
    service = request.app[SERVICES].get(SERVICE_NAME)
    if service is None or service.closing:
        raise Unavailable("whip.unavailable", "WebRTC ingest is not running on this server")
    return service


def _check_path(uuid: str, role: str) -> None:
    if not ids.is_uuid(uuid):
        raise Invalid("sessions.invalid_uuid", "the session id must be a lower-case UUID")
    if not ROLE.fullmatch(role):
        raise Invalid("legs.invalid_role", "role must be 1-64 letters, digits, '_' or '-'")


async def _offer(request: web.Request) -> str:
    """The request's SDP offer as text: 415 not SDP, 400 not UTF-8."""
    if request.content_type != SDP:
        raise UnsupportedMedia("whip.unsupported_media_type", f"the offer must be sent as {SDP}, not {request.content_type or 'nothing'}")
    try:
        return (await request.read()).decode("utf-8")
    except UnicodeDecodeError:
        raise Invalid("whip.invalid_sdp", "the SDP offer is not UTF-8 text") from None


async def publish(request: web.Request) -> web.Response:
    """POST an SDP offer: a new WebRTC leg, answered with the SDP answer and its Location."""
    uuid, role = request.match_info["uuid"], request.match_info["role"]
    app = request.app
    caller = ingest_app(app[CONFIG], request, uuid, app[CLOCK].time())
    _check_path(uuid, role)
    service = _service(request)
    offer = await _offer(request)
    leg_id, answer = await calls.publish(app[ENGINE], service, caller.id, uuid, role, offer)
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
    await calls.unpublish(_service(request), caller.id, uuid, role, leg_id)
    return web.Response(status=200)


async def options(request: web.Request) -> web.Response:
    """What the endpoint accepts (RFC 9725: Accept-Post); needs no credentials."""
    return web.Response(status=204, headers={"Allow": "OPTIONS, POST", "Accept-Post": SDP})


async def patch(request: web.Request) -> web.Response:
    """Trickle ICE and ICE restarts are not supported, which RFC 9725 answers with 501."""
    raise NotSupported("whip.patch_not_supported",
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
