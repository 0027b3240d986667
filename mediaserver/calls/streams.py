"""The WebSocket stream loops: wavstream and Twilio Media Streams, with their backpressure.

The parsers in `mediaserver.ws` turn messages into events; these loops act on them through
each leg's `Leg`. Bad input closes the socket with the parser's code and reason
(1003/1007/1008/1009); everything received before it stays in the session, and the
session's other legs and its recording carry on. A stream faster than real time is read
only as fast as the engine mixes it (backpressure through TCP: `throttle`), so memory does
not grow with it. Each message that carries audio counts as one of its leg's `packets`.

A loop reads a `StreamSocket`, which the HTTP layer implements over its WebSocket: the
loops know nothing of HTTP. A Twilio stream not authenticated by its request is kept in
nothing (no session, no leg) until its start message's `customParameters` have been
checked by the `Authenticator` it was given; a refusal, or no start within its
`start_timeout_s` (the `twilio_start_timeout_s` setting), closes it with 1008 and a reason.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable, Literal, Protocol

from mediaserver.calls.sessions import session_for_ingest
from mediaserver.errors import Refused
from mediaserver.media import PcmFrame
from mediaserver.recorder.engine import Engine, LiveSession
from mediaserver.recorder.legs import Leg
from mediaserver.ws import MAX_CLOSE_REASON_BYTES, CloseCode, WsProtocolError
from mediaserver.ws import twilio, wavstream

BACKLOG_LIMIT_S = 2.0  # how far a fast stream may run ahead of the mix
THROTTLE_MAX_S = 60.0  # a stream whose mix does not move is read on after this long
MAX_FRAME_BYTES = 64 * 1024
TOKEN_PARAMETER, SESSION_PARAMETER = "token", "session"  # <Parameter> names in customParameters
NORMAL_CLOSURE = 1000  # RFC 6455 §7.4.1: the purpose of the connection has been fulfilled

MessageKind = Literal["text", "binary", "close"]


class StreamSocket(Protocol):
    """The socket a stream loop reads.

    Iterating it yields (kind, data) for each message: ("text", str), ("binary", bytes),
    and a last ("close", None) when the peer has closed or the connection failed.
    """

    @property
    def closed(self) -> bool:
        """True once a close has been sent or received."""

    def __aiter__(self) -> AsyncIterator[tuple[MessageKind, Any]]: ...

    async def close(self, code: int = NORMAL_CLOSURE, reason: str = "") -> None:
        """Close with `code` and `reason` (at most 123 UTF-8 bytes)."""


# Checks the credentials a Twilio start message carries in its customParameters:
# (app_id, session uuid), or a `Refused` that closes the stream with 1008 and its message.
Authenticator = Callable[[dict[str, str]], tuple[str, str]]


async def _refuse(socket: StreamSocket, engine: Engine, exc: WsProtocolError) -> None:
    engine.count_dropped("websocket_protocol")
    await socket.close(int(exc.close_code), exc.reason)


async def throttle(engine: Engine, live: LiveSession, legs: list[Leg]) -> None:
    """Wait while any of `legs` (one socket's) is far ahead of what the engine has mixed.

    The session is expedited (processed at once, not at its turn) and the wait ends as soon
    as a turn of it has been reported. While a turn mixes more than the time it took, the
    next follows at once, so a stream faster than real time is mixed as fast as the
    processing goes, whatever its message size; when the clock holds the mix (another leg
    sends in real time) the wait goes a tick at a time.
    """
    loop = asyncio.get_running_loop()
    tick = engine.settings.processing.tick_ms / 1000
    deadline = loop.time() + THROTTLE_MAX_S
    backlog, since = _backlog(legs), loop.time()
    while backlog > BACKLOG_LIMIT_S and not live.ending and loop.time() < deadline:
        await engine.wait_mixed(live, tick)
        was, backlog = backlog, _backlog(legs)
        if was - backlog <= loop.time() - since:
            await asyncio.sleep(tick)
        since = loop.time()


def _backlog(legs: list[Leg]) -> float:
    return max((leg.backlog_s for leg in legs), default=0.0)


def _feed(parser: wavstream.WavstreamParser | twilio.TwilioParser, kind: MessageKind, data: Any) -> list:
    if kind == "text":
        return parser.feed_text(data)
    if kind == "binary":
        return parser.feed_binary(data)
    return parser.feed_close()


# -- wavstream ---------------------------------------------------------------------------


async def run_wavstream(socket: StreamSocket, engine: Engine, live: LiveSession, role: str, created: bool) -> None:
    """One wavstream leg (two for a stereo stream) of `live`, until the stream stops. Its
    legs end with it, and the session too when this stream created it and no other leg is
    live."""
    legs: list[Leg] = []
    try:
        await _read_wavstream(socket, engine, live, role, legs)
    finally:
        for leg in legs:
            leg.end()
        if created and not _other_legs_live(live, legs):
            await engine.end_session(live.uuid)


def _other_legs_live(live: LiveSession, mine: list[Leg]) -> bool:
    own = {leg.leg_id for leg in mine}
    return any(leg_id not in own and leg_id not in live.ended_legs for leg_id in live.legs)


async def _read_wavstream(socket: StreamSocket, engine: Engine, live: LiveSession, role: str, legs: list[Leg]) -> None:
    parser = wavstream.WavstreamParser(max_frame_bytes=MAX_FRAME_BYTES)
    async for kind, data in socket:
        try:
            events = _feed(parser, kind, data)
        except WsProtocolError as exc:
            await _refuse(socket, engine, exc)
            return
        for event in events:
            if isinstance(event, wavstream.Started):
                roles = wavstream.CHANNEL_ROLES if event.channels == 2 else (role,)
                legs.extend(engine.open_leg(live, r, "websocket") for r in roles)
            elif isinstance(event, wavstream.Audio):
                arrived = engine.monotonic()  # one arrival for every channel of the frame
                for leg, samples in zip(legs, event.channels):
                    leg.push(PcmFrame(samples, event.sample_rate, None, leg.leg_id), at_mono=arrived)
                    leg.count_packets()
                await throttle(engine, live, legs)
            elif isinstance(event, wavstream.Dtmf):
                legs[0].dtmf_now(event.digit, "websocket")
            elif isinstance(event, wavstream.Stopped):
                if not socket.closed:
                    await socket.close()
                return


# -- Twilio Media Streams ----------------------------------------------------------------


class TwilioStream:
    """One Twilio Media Stream: a session (given or made at `start`), a leg per track."""

    def __init__(self, engine: Engine, app_id: str | None, uuid: str | None, authenticate: Authenticator,
                 start_timeout_s: float) -> None:
        """`app_id` None: the stream is not authenticated yet, and its start message's
        customParameters must carry credentials (checked by `authenticate`) within
        `start_timeout_s`."""
        self.engine = engine
        self.start_timeout_s = start_timeout_s
        self.app_id = app_id
        self.uuid = uuid
        self.authenticate = authenticate
        self.live: LiveSession | None = None
        self.created = False
        self.legs: dict[str, Leg] = {}  # by role
        self.origin = 0  # timeline position (8 kHz) of the stream's timestamp zero

    async def run(self, socket: StreamSocket) -> None:
        try:
            async with asyncio.timeout(None if self.app_id else self.start_timeout_s) as deadline:
                await self._read(socket, deadline)
        except TimeoutError:
            await socket.close(int(CloseCode.POLICY_VIOLATION),
                               f"no authenticated start message within {self.start_timeout_s:g} s")

    async def _read(self, socket: StreamSocket, deadline: asyncio.Timeout) -> None:
        parser = twilio.TwilioParser(max_frame_bytes=MAX_FRAME_BYTES)
        async for kind, data in socket:
            try:
                for event in _feed(parser, kind, data):
                    await self._on(event)
            except WsProtocolError as exc:
                await _refuse(socket, self.engine, exc)
                return
            except Refused as exc:
                reason = exc.message.encode()[:MAX_CLOSE_REASON_BYTES].decode("utf-8", "ignore")
                await socket.close(int(CloseCode.POLICY_VIOLATION), reason)
                return
            if self.live is not None:
                deadline.reschedule(None)
            if parser.stopped:
                await socket.close()
                return

    async def _on(self, event) -> None:
        if isinstance(event, twilio.TwilioStart):
            await self._start(event)
        elif isinstance(event, twilio.Media):
            leg = self._leg(event.role)
            leg.push(PcmFrame(event.samples, 8000, self.origin + event.timestamp_ms * 8, leg.leg_id))
            leg.count_packets()
            await throttle(self.engine, self.live, [leg])
        elif isinstance(event, twilio.Dtmf):
            self._leg(event.role).dtmf_now(event.digit, "twilio")

    async def _start(self, event: twilio.TwilioStart) -> None:
        if self.app_id is None:
            self.app_id, self.uuid = self.authenticate(event.custom_parameters)
        params = {k: v for k, v in event.custom_parameters.items() if k != TOKEN_PARAMETER}  # a secret: not kept
        meta = {"stream_sid": event.stream_sid, "call_sid": event.call_sid, "account_sid": event.account_sid,
                "custom_parameters": params}
        if self.uuid is None:
            self.live, self.created = await self.engine.create_session(self.app_id, "twilio", None, meta), True
        else:
            self.live, self.created = await session_for_ingest(self.engine, self.app_id, self.uuid, "twilio")
        self.origin = self.live.session.timeline_at(self.engine.clock.monotonic(), 8000)
        for role in event.roles:
            self._leg(role)

    def _leg(self, role: str) -> Leg:
        if role not in self.legs:
            self.legs[role] = self.engine.open_leg(self.live, role, "twilio")
        return self.legs[role]

    async def finish(self) -> None:
        """The stream is over: its legs end, and its session when the stream created it."""
        if self.live is None:
            return
        for leg in self.legs.values():
            leg.end()
        if self.created:
            await self.engine.end_session(self.live.uuid)
