"""WebSocket ingest: the wavstream protocol and Twilio Media Streams, wired to the engine.

The parsers in `mediaserver.ws` turn messages into events; this module owns the sockets.
Bad input closes the socket with the parser's code and reason (1003/1007/1008/1009);
everything received before it stays in the session, and the session's other legs and its
recording carry on. A stream faster than real time is read only as fast as the engine
mixes it (backpressure through TCP), so memory does not grow with it. Each message that
carries audio counts as one of its leg's `packets`.

A Twilio stream authenticates by API headers, by `?session=&token=` in the URL, or, as
Twilio drops a `<Stream url>`'s query string, by the `token` (and `session`) passed as
`<Parameter>`s, which arrive in the start message's `customParameters`. Such a stream is
kept in nothing (no session, no leg) until its start message has been checked; a missing
or wrong token, or no start within `START_TIMEOUT_S`, closes it with 1008 and a reason.
"""

from __future__ import annotations

import asyncio
import logging
import re

from aiohttp import WSCloseCode, WSMsgType, web

from mediaserver import ids
from mediaserver.api.auth import app_from_headers, check_token, ingest_app
from mediaserver.api.keys import CATALOG, CLOCK, CONFIG, ENGINE
from mediaserver.errors import ServiceError
from mediaserver.recorder.engine import Engine, LiveSession
from mediaserver.ws import CloseCode, WsProtocolError
from mediaserver.ws import twilio, wavstream

log = logging.getLogger(__name__)

ROLE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
BACKLOG_LIMIT_S = 2.0  # how far a fast stream may run ahead of the mix
THROTTLE_MAX_S = 60.0  # a stream whose mix does not move is read on after this long
MAX_FRAME_BYTES = 64 * 1024
# aiohttp refuses a frame by its declared length, before buffering it, above this; below
# it the parsers refuse anything over MAX_FRAME_BYTES with the frame's kind and size.
READ_LIMIT_BYTES = 4 * MAX_FRAME_BYTES
START_TIMEOUT_S = 10.0  # how long a Twilio stream not yet authenticated may wait for its start
TOKEN_PARAMETER, SESSION_PARAMETER = "token", "session"  # <Parameter> names in customParameters


def _session_for_ingest(engine: Engine, app_id: str, uuid: str, source: str, catalog) -> tuple[LiveSession, bool]:
    """The live session, or a new one when `uuid` is unknown; True when created here."""
    if uuid in engine.sessions or catalog.session(uuid) is not None:
        return engine.session_for(app_id, uuid), False
    return engine.create_session(app_id, source, uuid), True


class _IngestSocket(web.WebSocketResponse):
    """A WebSocket whose every close carries a reason.

    aiohttp closes a frame above its own `max_msg_size` with 1009 and an empty reason
    before the handler sees the frame; this names the limit instead.
    """

    async def close(self, *, code: int = WSCloseCode.OK, message: bytes = b"", drain: bool = True) -> bool:
        if code == WSCloseCode.MESSAGE_TOO_BIG and not message:
            message = f"frame of {READ_LIMIT_BYTES} bytes or more exceeds the {MAX_FRAME_BYTES}-byte limit".encode()
        return await super().close(code=code, message=message, drain=drain)


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


async def _refuse(ws: web.WebSocketResponse, engine: Engine, exc: WsProtocolError) -> None:
    engine.count_dropped("websocket_protocol")
    await ws.close(code=int(exc.close_code), message=exc.reason.encode())


async def _throttle(engine: Engine, live: LiveSession, leg_ids) -> None:
    """Wait while any leg of this socket is far ahead of what the engine has mixed.

    The session is hurried (processed at once, not at its turn) and the wait ends as soon
    as a turn of it has been reported. While a turn mixes more than the time it took, the
    next follows at once, so a stream faster than real time is mixed as fast as the
    processing goes, whatever its message size; when the clock holds the mix (another leg
    sends in real time) the wait goes a tick at a time.
    """
    loop = asyncio.get_running_loop()
    tick = engine.config.tick_ms / 1000
    deadline = loop.time() + THROTTLE_MAX_S
    backlog, since = _backlog(engine, live, leg_ids), loop.time()
    while backlog > BACKLOG_LIMIT_S and not live.ending and loop.time() < deadline:
        await engine.wait_mixed(live, tick)
        was, backlog = backlog, _backlog(engine, live, leg_ids)
        if was - backlog <= loop.time() - since:
            await asyncio.sleep(tick)
        since = loop.time()


def _backlog(engine: Engine, live: LiveSession, leg_ids) -> float:
    return max((engine.backlog_seconds(live, leg) for leg in leg_ids), default=0.0)


# -- wavstream ---------------------------------------------------------------------------


async def wavstream_leg(request: web.Request) -> web.StreamResponse:
    uuid, role = request.match_info["uuid"], request.match_info["role"]
    app = request.app
    caller = ingest_app(app[CONFIG], request, uuid, app[CLOCK].time())
    if not ids.is_uuid(uuid):
        raise ServiceError(400, "sessions.invalid_uuid", "the session id must be a lower-case UUID")
    if not ROLE.match(role):
        raise ServiceError(400, "legs.invalid_role", "role must be 1-64 letters, digits, '_' or '-'")
    engine = app[ENGINE]
    live, created = _session_for_ingest(engine, caller.id, uuid, "websocket", app[CATALOG])
    ws = await _prepare(request)
    legs: list[str] = []
    try:
        await _run_wavstream(ws, engine, live, role, legs)
    finally:
        for leg_id in legs:
            engine.end_leg(live, leg_id)
        if created and not _other_legs_live(live, legs):
            await engine.end_session(live.uuid)
    return ws


def _other_legs_live(live: LiveSession, mine: list[str]) -> bool:
    return any(leg_id not in mine and leg_id not in live.ended_legs for leg_id in live.legs)


async def _run_wavstream(ws, engine: Engine, live: LiveSession, role: str, legs: list[str]) -> None:
    parser = wavstream.WavstreamParser(max_frame_bytes=MAX_FRAME_BYTES)
    async for kind, data in _messages(ws):
        try:
            events = parser.feed_text(data) if kind == "text" else parser.feed_binary(data) if kind == "binary" else parser.feed_close()
        except WsProtocolError as exc:
            await _refuse(ws, engine, exc)
            return
        for event in events:
            if isinstance(event, wavstream.Started):
                roles = wavstream.CHANNEL_ROLES if event.channels == 2 else (role,)
                legs.extend(engine.add_leg(live, r, "websocket") for r in roles)
            elif isinstance(event, wavstream.Audio):
                arrived = engine.monotonic()
                for leg_id, samples in zip(legs, event.channels):
                    engine.post_pcm(live, leg_id, samples, event.sample_rate, at_mono=arrived)
                    engine.count_packets(live, leg_id)
                await _throttle(engine, live, legs)
            elif isinstance(event, wavstream.Dtmf):
                live.session.dtmf_now(legs[0], event.digit, "websocket")
            elif isinstance(event, wavstream.Stopped):
                if not ws.closed:
                    await ws.close()
                return


# -- Twilio Media Streams ----------------------------------------------------------------


async def twilio_stream(request: web.Request) -> web.StreamResponse:
    app = request.app
    uuid = request.query.get("session")
    if uuid is not None and not ids.is_uuid(uuid):
        raise ServiceError(400, "sessions.invalid_uuid", "session must be a lower-case UUID")
    caller = app_from_headers(app[CONFIG], request)
    if caller is None and "token" in request.query:
        caller = ingest_app(app[CONFIG], request, uuid, app[CLOCK].time())
    engine = app[ENGINE]
    if caller is not None and uuid is not None:
        _session_for_ingest(engine, caller.id, uuid, "twilio", app[CATALOG])  # checks ownership before upgrading
    ws = await _prepare(request)
    # Without credentials in the request, the start message's customParameters must carry them.
    stream = _TwilioStream(engine, caller.id if caller else None, uuid, app[CATALOG], app[CONFIG], app[CLOCK])
    try:
        await stream.run(ws)
    finally:
        await stream.finish()
    return ws


class _TwilioStream:
    """One Twilio Media Stream: a session (given or made at `start`), a leg per track."""

    def __init__(self, engine: Engine, app_id: str | None, uuid: str | None, catalog, config, clock) -> None:
        self.engine = engine
        self.app_id = app_id  # None until the start message's credentials are checked
        self.uuid = uuid
        self.catalog = catalog
        self.config = config
        self.clock = clock
        self.live: LiveSession | None = None
        self.created = False
        self.legs: dict[str, str] = {}  # role -> leg_id
        self.origin = 0  # timeline position (8 kHz) of the stream's timestamp zero

    async def run(self, ws: web.WebSocketResponse) -> None:
        try:
            async with asyncio.timeout(None if self.app_id else START_TIMEOUT_S) as deadline:
                await self._read(ws, deadline)
        except TimeoutError:
            await ws.close(code=int(CloseCode.POLICY_VIOLATION),
                           message=f"no authenticated start message within {START_TIMEOUT_S:.0f} s".encode())

    async def _read(self, ws: web.WebSocketResponse, deadline: asyncio.Timeout) -> None:
        parser = twilio.TwilioParser(max_frame_bytes=MAX_FRAME_BYTES)
        async for kind, data in _messages(ws):
            try:
                events = parser.feed_text(data) if kind == "text" else parser.feed_binary(data) if kind == "binary" else parser.feed_close()
                for event in events:
                    await self._on(event)
            except WsProtocolError as exc:
                await _refuse(ws, self.engine, exc)
                return
            except ServiceError as exc:
                await ws.close(code=int(CloseCode.POLICY_VIOLATION), message=exc.message.encode()[:123])
                return
            if self.live is not None:
                deadline.reschedule(None)
            if parser.stopped:
                await ws.close()
                return

    async def _on(self, event) -> None:
        if isinstance(event, twilio.TwilioStart):
            self._start(event)
        elif isinstance(event, twilio.Media):
            leg_id = self._leg(event.role)
            pts = self.origin + event.timestamp_ms * 8
            self.engine.post_pcm(self.live, leg_id, event.samples, 8000, pts)
            self.engine.count_packets(self.live, leg_id)
            await _throttle(self.engine, self.live, [leg_id])
        elif isinstance(event, twilio.Dtmf):
            self.live.session.dtmf_now(self._leg(event.role), event.digit, "twilio")

    def _start(self, event: twilio.TwilioStart) -> None:
        if self.app_id is None:
            self._authenticate(event.custom_parameters)
        params = {k: v for k, v in event.custom_parameters.items() if k != TOKEN_PARAMETER}  # a secret: not kept
        meta = {"stream_sid": event.stream_sid, "call_sid": event.call_sid, "account_sid": event.account_sid,
                "custom_parameters": params}
        if self.uuid is None:
            self.live, self.created = self.engine.create_session(self.app_id, "twilio", None, meta), True
        else:
            self.live, self.created = _session_for_ingest(self.engine, self.app_id, self.uuid, "twilio", self.catalog)
        self.origin = self.live.session.timeline_at(self.engine.clock.monotonic(), 8000)
        for role in event.roles:
            self._leg(role)

    def _authenticate(self, params: dict[str, str]) -> None:
        """The app of the signed token in `customParameters`; ServiceError (closed 1008) if none."""
        token = params.get(TOKEN_PARAMETER)
        uuid = params.get(SESSION_PARAMETER, self.uuid)
        if token is None:
            raise ServiceError(401, "auth.unauthorized", "credentials are required: API headers, ?token=, "
                               "or a 'token' <Parameter> in the start message's customParameters")
        if uuid is None or not ids.is_uuid(uuid):
            raise ServiceError(400, "sessions.invalid_uuid", "the 'session' <Parameter> must be a lower-case UUID")
        if self.uuid is not None and uuid != self.uuid:
            raise ServiceError(400, "sessions.invalid_uuid", "the 'session' <Parameter> differs from ?session=")
        self.app_id, self.uuid = check_token(self.config, token, uuid, self.clock.time()).id, uuid

    def _leg(self, role: str) -> str:
        if role not in self.legs:
            self.legs[role] = self.engine.add_leg(self.live, role, "twilio")
        return self.legs[role]

    async def finish(self) -> None:
        if self.live is None:
            return
        for leg_id in self.legs.values():
            self.engine.end_leg(self.live, leg_id)
        if self.created:
            await self.engine.end_session(self.live.uuid)


def setup(app: web.Application) -> None:
    app.router.add_get("/ws/v1/sessions/{uuid}/legs/{role}", wavstream_leg)
    app.router.add_get("/ws/v1/twilio", twilio_stream)
