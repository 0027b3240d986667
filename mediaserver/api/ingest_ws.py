"""WebSocket ingest over HTTP: the wavstream protocol and Twilio Media Streams.

This module authenticates each stream, checks its path, finds (or makes) its session
while refusals can still be HTTP answers, and upgrades the connection; the stream loops
and their backpressure are `mediaserver.calls.streams`, which read the socket through the
`StreamSocket` that `_Socket` implements here.

A Twilio stream authenticates by API headers, by `?session=&token=` in the URL, or, as
Twilio drops a `<Stream url>`'s query string, by the `token` (and `session`) passed as
`<Parameter>`s, which arrive in the start message's `customParameters`. Such a stream is
kept in nothing (no session, no leg) until its start message has been checked; a missing
or wrong token, or no start within `twilio_start_timeout_s`, closes it with 1008
and a reason.
"""

from __future__ import annotations

import re
from typing import Any, AsyncIterator

from aiohttp import WSCloseCode, WSMsgType, web

from mediaserver import ids
from mediaserver.api.auth import app_from_headers, check_token, ingest_app
from mediaserver.api.keys import CLOCK, CONFIG, ENGINE
from mediaserver.calls.sessions import session_for_ingest
from mediaserver.calls.streams import (
    MAX_FRAME_BYTES,
    NORMAL_CLOSURE,
    SESSION_PARAMETER,
    TOKEN_PARAMETER,
    Authenticator,
    MessageKind,
    TwilioStream,
    run_wavstream,
)
from mediaserver.clock import Clock
from mediaserver.config import Config
from mediaserver.errors import Invalid, ServiceError, Unauthorized

ROLE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
# aiohttp refuses a frame by its declared length, before buffering it, above this; below
# it the parsers refuse anything over MAX_FRAME_BYTES with the frame's kind and size.
READ_LIMIT_BYTES = 4 * MAX_FRAME_BYTES


class _IngestSocket(web.WebSocketResponse):
    """A WebSocket whose every close carries a reason.

    aiohttp closes a frame above its own `max_msg_size` with 1009 and an empty reason
    before the handler sees the frame; this names the limit instead.
    """

    async def close(self, *, code: int = WSCloseCode.OK, message: bytes = b"", drain: bool = True) -> bool:
        if code == WSCloseCode.MESSAGE_TOO_BIG and not message:
            message = f"frame of {READ_LIMIT_BYTES} bytes or more exceeds the {MAX_FRAME_BYTES}-byte limit".encode()
        return await super().close(code=code, message=message, drain=drain)


class _Socket:
    """The `StreamSocket` of the stream loops over an aiohttp WebSocket."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self._ws = ws

    @property
    def closed(self) -> bool:
        return self._ws.closed

    def __aiter__(self) -> AsyncIterator[tuple[MessageKind, Any]]:
        return _messages(self._ws)

    async def close(self, code: int = NORMAL_CLOSURE, reason: str = "") -> None:
        await self._ws.close(code=code, message=reason.encode())


async def _prepare(request: web.Request) -> web.WebSocketResponse:
    ws = _IngestSocket(max_msg_size=READ_LIMIT_BYTES, heartbeat=30, autoping=True)
    await ws.prepare(request)
    return ws


async def _messages(ws: web.WebSocketResponse):
    """(kind, data) of each message until the peer closes: kind "text", "binary" or "close"."""
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            yield "text", msg.data
        elif msg.type == WSMsgType.BINARY:
            yield "binary", msg.data
        elif msg.type == WSMsgType.ERROR:
            break
    yield "close", None


# -- wavstream ---------------------------------------------------------------------------


async def wavstream_leg(request: web.Request) -> web.StreamResponse:
    uuid, role = request.match_info["uuid"], request.match_info["role"]
    app = request.app
    caller = ingest_app(app[CONFIG], request, uuid, app[CLOCK].time())
    if not ids.is_uuid(uuid):
        raise Invalid("sessions.invalid_uuid", "the session id must be a lower-case UUID")
    if not ROLE.match(role):
        raise Invalid("legs.invalid_role", "role must be 1-64 letters, digits, '_' or '-'")
    engine = app[ENGINE]
    live, created = await session_for_ingest(engine, caller.id, uuid, "websocket")
    ws = await _prepare(request)
    await run_wavstream(_Socket(ws), engine, live, role, created)
    return ws


# -- Twilio Media Streams ----------------------------------------------------------------


async def twilio_stream(request: web.Request) -> web.StreamResponse:
    app = request.app
    uuid = request.query.get("session")
    if uuid is not None and not ids.is_uuid(uuid):
        raise Invalid("sessions.invalid_uuid", "session must be a lower-case UUID")
    caller = app_from_headers(app[CONFIG], request)
    if caller is None and "token" in request.query:
        caller = ingest_app(app[CONFIG], request, uuid, app[CLOCK].time())
    engine = app[ENGINE]
    if caller is not None and uuid is not None:
        await session_for_ingest(engine, caller.id, uuid, "twilio")  # checks ownership before upgrading
    ws = await _prepare(request)
    # Without credentials in the request, the start message's customParameters must carry them.
    stream = TwilioStream(engine, caller.id if caller else None, uuid, _start_credentials(app[CONFIG], app[CLOCK], uuid),
                          app[CONFIG].twilio_start_timeout_s)
    try:
        await stream.run(_Socket(ws))
    finally:
        await stream.finish()
    return ws


def _start_credentials(config: Config, clock: Clock, query_uuid: str | None) -> Authenticator:
    """How a Twilio stream without credentials in its request is authenticated by its start
    message: the signed token (and session) in `customParameters`, bound to `?session=` when
    the URL names one."""

    def authenticate(params: dict[str, str]) -> tuple[str, str]:
        token = params.get(TOKEN_PARAMETER)
        uuid = params.get(SESSION_PARAMETER, query_uuid)
        if token is None:
            raise Unauthorized("auth.unauthorized", "credentials are required: API headers, ?token=, "
                               "or a 'token' <Parameter> in the start message's customParameters")
        if uuid is None or not ids.is_uuid(uuid):
            raise Invalid("sessions.invalid_uuid", "the 'session' <Parameter> must be a lower-case UUID")
        if query_uuid is not None and uuid != query_uuid:
            raise Invalid("sessions.invalid_uuid", "the 'session' <Parameter> differs from ?session=")
        try:
            return check_token(config, token, uuid, clock.time()).id, uuid
        except ServiceError as exc:  # 401 over HTTP; here the reason the stream is closed with
            raise Unauthorized(exc.code, exc.message) from None

    return authenticate


def setup(app: web.Application) -> None:
    app.router.add_get("/ws/v1/sessions/{uuid}/legs/{role}", wavstream_leg)
    app.router.add_get("/ws/v1/twilio", twilio_stream)
