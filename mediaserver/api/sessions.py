"""Sessions, the route of the gateway's recording commands (answered in `commands`), and the
live `file.wav` of a recording."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from mediaserver import ids
from mediaserver.api.auth import make_token
from mediaserver.api.commands import command
from mediaserver.api.common import iso, json_body, json_response, page, paging
from mediaserver.api.keys import CALLER, CATALOG, CLOCK, CONFIG, ENGINE, SERVICES
from mediaserver.api.telephony import leg_request
from mediaserver.encoding import wav_header
from mediaserver.errors import Conflict, Forbidden, Invalid, NotFound, ServiceError
from mediaserver.recorder.engine import Engine, LiveSession

log = logging.getLogger(__name__)

LIVE_WAV_QUEUE = 256  # blocks a slow reader may fall behind before it is cut off


def ingest_urls(request: web.Request, uuid: str, app_id: str) -> dict[str, Any]:
    config = request.app[CONFIG]
    expires = int(request.app[CLOCK].time()) + config.ingest_token_ttl_s
    token = make_token(config.secret_key, app_id, uuid, expires)
    # In a cluster the legs go straight to the node that holds the session.
    base = config.node().node_url if config.catalog == "postgres" else config.base_url
    ws = "wss" + base[5:] if base.startswith("https") else "ws" + base[4:]
    return {
        "token": token,
        "token_expires_at": iso(expires),
        "wavstream": {role: f"{ws}/ws/v1/sessions/{uuid}/legs/{role}?token={token}" for role in ("caller", "callee")},
        "twilio": f"{ws}/ws/v1/twilio?session={uuid}&token={token}",
        "whip": {role: f"{base}/whip/v1/sessions/{uuid}/legs/{role}?token={token}" for role in ("caller", "callee")},
        "rtp": f"{base}/api/v1/sessions/{uuid}/legs",
    }


async def session_view(request: web.Request, row: dict[str, Any], live: LiveSession | None) -> dict[str, Any]:
    legs = await request.app[CATALOG].legs(row["uuid"])
    return {
        "uuid": row["uuid"],
        "app_id": row["app_id"],
        "source": row["source"],
        "state": "ending" if live is not None and live.ending else row["state"],
        "created_at": iso(row["created_at"]),
        "ended_at": iso(row["ended_at"]),
        "metadata": row["meta"],
        "legs": [{"leg_id": leg["leg_id"], "role": leg["role"], "kind": leg["kind"], "created_at": iso(leg["created_at"]),
                  "ended_at": iso(leg["ended_at"])} for leg in legs],
        "recording_id": live.recording.id if live is not None and live.recording is not None else None,
        "node_id": row.get("node_id"),  # the node that holds (or held) it
    }


async def _own_row(request: web.Request, uuid: str) -> dict[str, Any]:
    row = await request.app[CATALOG].session(uuid)
    if row is None:
        raise NotFound("sessions.not_found", f"no session {uuid}")
    if row["app_id"] != request[CALLER].id:
        raise Forbidden("auth.forbidden", "this session belongs to another app")
    return row


async def create_session(request: web.Request) -> web.Response:
    body = await json_body(request) or {}
    if not isinstance(body, dict):
        raise Invalid("request.invalid_body", "the body must be a JSON object")
    unknown = set(body) - {"uuid", "metadata"}
    if unknown:
        raise Invalid("request.invalid_body", f"unknown field: {sorted(unknown)[0]}")
    uuid = body.get("uuid")
    if uuid is not None and (not isinstance(uuid, str) or not ids.is_uuid(uuid)):
        raise Invalid("sessions.invalid_uuid", "uuid must be a lower-case UUID string")
    meta = body.get("metadata") or {}
    if not isinstance(meta, dict):
        raise Invalid("request.invalid_body", "metadata must be a JSON object")
    app_id = request[CALLER].id
    live = await request.app[ENGINE].create_session(app_id, "api", uuid, meta)
    view = await session_view(request, await request.app[CATALOG].session(live.uuid), live)
    view["ingest"] = ingest_urls(request, live.uuid, app_id)
    return json_response(view, status=201, headers={"Location": f"/api/v1/sessions/{live.uuid}"})


async def list_sessions(request: web.Request) -> web.Response:
    limit, offset = paging(request)
    state = request.query.get("state")
    if state not in (None, "active", "ended"):
        raise Invalid("request.invalid_query", "state must be active or ended")
    rows, total = await request.app[CATALOG].sessions(request[CALLER].id, state, limit, offset)
    engine = request.app[ENGINE]
    views = [await session_view(request, r, engine.sessions.get(r["uuid"])) for r in rows]
    return json_response(page(views, total, limit, offset))


async def get_session(request: web.Request) -> web.Response:
    row = await _own_row(request, request.match_info["uuid"])
    return json_response(await session_view(request, row, request.app[ENGINE].sessions.get(row["uuid"])))


async def delete_session(request: web.Request) -> web.Response:
    row = await _own_row(request, request.match_info["uuid"])
    engine = request.app[ENGINE]
    live = engine.sessions.get(row["uuid"])
    if live is None:
        raise Conflict("sessions.ended", f"session {row['uuid']} has already ended")
    await engine.end_session(row["uuid"])
    return json_response(await session_view(request, row, live), status=202)


async def add_rtp_leg(request: web.Request) -> web.Response:
    body = await json_body(request, optional=False)
    engine: Engine = request.app[ENGINE]
    live = await engine.session_for(request[CALLER].id, request.match_info["uuid"])
    rtp = request.app[SERVICES].get("rtp")
    if rtp is None:
        raise ServiceError(503, "rtp.unavailable", "RTP ingest is not running on this server")
    role, offer = leg_request(body)
    leg_id, answer = await rtp.offer(live, role, offer)
    return json_response({"leg_id": leg_id, "sdp": answer}, status=201)


async def live_wav(request: web.Request) -> web.StreamResponse:
    """The recording in progress as a WAV stream that grows while it is read."""
    engine: Engine = request.app[ENGINE]
    live = await engine.session_for(request[CALLER].id, request.match_info["uuid"])
    rec = live.recording
    if rec is None or rec.state == "stopping":
        raise Conflict("recordings.not_active", "no recording is in progress in this session")
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue(LIVE_WAV_QUEUE)

    def tap(pcm) -> None:  # runs on the processing thread
        loop.call_soon_threadsafe(_offer, queue, None if pcm is None else pcm.tobytes())

    response = web.StreamResponse(headers={"Content-Type": "audio/wav", "Cache-Control": "no-store"})
    await response.prepare(request)
    engine.add_tap(live, tap)
    try:
        await response.write(wav_header(rec.options.sample_rate, rec.options.channels, 0xFFFFFFFF))
        while (chunk := await queue.get()) is not None:
            await response.write(chunk)
        await response.write_eof()
    except ConnectionError as exc:
        # A listener hanging up is how a live stream usually ends, not a server fault.
        log.warning("live WAV of session %s: reader %s went away (%s)", live.uuid, request.remote, type(exc).__name__)
    finally:
        engine.remove_tap(live, tap)
    return response


def _offer(queue: asyncio.Queue, data: bytes | None) -> None:
    try:
        queue.put_nowait(data)
    except asyncio.QueueFull:
        # A reader this far behind is cut off rather than buffered without bound.
        while not queue.empty():
            queue.get_nowait()
        queue.put_nowait(None)


def setup(app: web.Application) -> None:
    app.router.add_post("/api/v1/sessions", create_session)
    app.router.add_get("/api/v1/sessions", list_sessions)
    app.router.add_get("/api/v1/sessions/{uuid}", get_session)
    app.router.add_delete("/api/v1/sessions/{uuid}", delete_session)
    app.router.add_post("/api/v1/sessions/{uuid}/legs", add_rtp_leg)
    app.router.add_post("/api/v1/sessions/{uuid}/commands/record/{command}", command)
    app.router.add_get("/api/v1/sessions/{uuid}/recording/file.wav", live_wav)
