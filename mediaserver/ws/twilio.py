"""Twilio Media Streams: the JSON messages Twilio's <Stream> sends over a WebSocket.

Route: ``GET /ws/v1/twilio``. Every message is a text frame holding one JSON object whose
``event`` names its kind (Twilio's "Media Streams - WebSocket Messages"):

``connected``  ``{"event": "connected", "protocol": "Call", "version": "1.0.0"}``, first.
``start``      ``{"event": "start", "sequenceNumber": "1", "streamSid": "MZ…",
               "start": {"streamSid", "accountSid", "callSid", "tracks": ["inbound",
               "outbound"], "customParameters": {name: value}, "mediaFormat":
               {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}``, once.
``media``      ``{"event": "media", "sequenceNumber": "3", "streamSid", "media": {"track":
               "inbound", "chunk": "1", "timestamp": "5", "payload": base64 µ-law}}``;
               ``timestamp`` is milliseconds since the stream started, ``chunk`` counts
               the track's messages from 1.
``dtmf``       ``{"event": "dtmf", "sequenceNumber", "streamSid", "dtmf": {"track":
               "inbound_track", "digit": "5"}}``.
``mark``       ``{"event": "mark", "sequenceNumber", "streamSid", "mark": {"name": "x"}}``.
``stop``       ``{"event": "stop", "sequenceNumber", "streamSid", "stop": {"accountSid",
               "callSid"}}``, last.

Twilio sends the numbers ``sequenceNumber``, ``chunk`` and ``timestamp`` as strings of
decimal digits, and this parser requires exactly that. Tracks map to roles: ``inbound``
(the caller's audio) → "caller", ``outbound`` → "callee"; the ``…_track`` spellings that
dtmf messages and the <Stream track> attribute use are accepted wherever a track is.

Choices where Twilio's description leaves room:

* ``connected`` is optional, but if sent must come once and before ``start``.
* an event kind this parser does not know is ignored (counted in ``stats.ignored``):
  Twilio adds event kinds over time, and an unknown one carries nothing we record.
* ``sequenceNumber`` is checked, not enforced: skipped numbers are added to
  ``stats.sequence_gaps`` and numbers at or below the last one seen are counted in
  ``stats.sequence_reordered``; neither is an error.
* a top-level ``streamSid`` that differs from the one in ``start`` is refused.
* media on a track that ``start.tracks`` did not list is accepted.

Close codes (RFC 6455 §7.4.1) and the reasons sent with them:

====  ==========================================================================
code  cause
====  ==========================================================================
1003  any binary frame
1007  a text frame that is not a JSON object; a missing field or a field of the
      wrong JSON type (``media.timestamp must be a string, not 5``); a number
      string that is not decimal digits; a payload that is not base64
1008  connected twice or after start; start twice; media, dtmf or mark before
      start; any frame after stop; a mediaFormat other than audio/x-mulaw, 8000 Hz,
      1 channel; an unknown track; a digit other than 0-9, *, #, A-D; a streamSid
      that differs from start's
1009  a text frame above ``max_frame_bytes`` (64 KiB by default)
====  ==========================================================================
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from mediaserver.codecs.g711 import decode_ulaw
from mediaserver.ws import (
    DEFAULT_MAX_FRAME_BYTES,
    CloseCode,
    JsonFields,
    WsProtocolError,
    describe,
    parse_dtmf_digit,
    parse_json_object,
)

TWILIO_ENCODING = "audio/x-mulaw"
TWILIO_SAMPLE_RATE = 8000
TWILIO_CHANNELS = 1
TRACK_ROLES = {"inbound": "caller", "outbound": "callee", "inbound_track": "caller", "outbound_track": "callee"}
ROLES = ("caller", "callee")

_MAX_DECIMAL_DIGITS = 18  # any count Twilio sends fits; longer is garbage, not a number


@dataclass(frozen=True, slots=True)
class Connected:
    """The socket speaks Media Streams; `protocol` and `version` are "" when absent."""

    protocol: str = ""
    version: str = ""


@dataclass(frozen=True, slots=True)
class TwilioStart:
    """The stream's identity and format, from the start message.

    `tracks` are Twilio's track names as sent ("inbound", "outbound"); `roles` are the
    same tracks as our leg roles.
    """

    stream_sid: str
    call_sid: str
    account_sid: str
    tracks: tuple[str, ...]
    custom_parameters: dict[str, str]
    encoding: str
    sample_rate: int
    channels: int

    @property
    def roles(self) -> tuple[str, ...]:
        """The announced tracks as roles, e.g. ("caller", "callee")."""
        return tuple(TRACK_ROLES[track] for track in self.tracks)


@dataclass(frozen=True, slots=True, eq=False)
class Media:
    """One media message: µ-law decoded to int16 mono at 8000 Hz.

    `timestamp_ms` is the time of the first sample, in milliseconds since the stream
    started, so audio can be placed by time even when messages went missing.
    """

    role: str
    samples: np.ndarray
    timestamp_ms: int
    chunk: int


@dataclass(frozen=True, slots=True)
class Dtmf:
    """A key pressed on the track of `role`."""

    role: str
    digit: str


@dataclass(frozen=True, slots=True)
class Mark:
    """Twilio confirming that audio sent before a mark of this name has played."""

    name: str


@dataclass(frozen=True, slots=True)
class Stopped:
    """The stream ended: a stop message, or the socket closed."""


Event = Connected | TwilioStart | Media | Dtmf | Mark | Stopped


@dataclass(slots=True)
class TrackStats:
    """Counters for one role's media: messages, decoded µ-law bytes and samples."""

    frames: int = 0
    bytes: int = 0
    samples: int = 0


@dataclass(slots=True)
class TwilioStats:
    """Counters for the stream's statistics; media counters are kept per role."""

    messages: int = 0
    ignored: int = 0
    sequence_gaps: int = 0
    sequence_reordered: int = 0
    dtmf: int = 0
    marks: int = 0
    by_role: dict[str, TrackStats] = field(default_factory=lambda: {role: TrackStats() for role in ROLES})

    @property
    def frames(self) -> int:
        """Media messages over all roles."""
        return sum(stats.frames for stats in self.by_role.values())

    @property
    def bytes(self) -> int:
        """Decoded media bytes over all roles."""
        return sum(stats.bytes for stats in self.by_role.values())

    @property
    def samples(self) -> int:
        """Media samples over all roles."""
        return sum(stats.samples for stats in self.by_role.values())


class _State(Enum):
    NEW = "new"
    CONNECTED = "connected"
    STREAMING = "streaming"
    STOPPED = "stopped"


def _policy(reason: str) -> WsProtocolError:
    return WsProtocolError(CloseCode.POLICY_VIOLATION, reason)


def _decimal(fields: JsonFields, key: str) -> int:
    """A count Twilio sends as a string of decimal digits."""
    value = fields.text(key)
    if not (value.isascii() and value.isdigit()) or len(value) > _MAX_DECIMAL_DIGITS:
        raise WsProtocolError(
            CloseCode.INVALID_PAYLOAD, f"{fields.path(key)} must be a string of decimal digits, not {describe(value)}"
        )
    return int(value)


def _role(fields: JsonFields, key: str) -> str:
    track = fields.text(key)
    try:
        return TRACK_ROLES[track]
    except KeyError:
        raise _policy(f"{fields.path(key)} {describe(track)} is not inbound or outbound") from None


def _payload(fields: JsonFields, key: str) -> bytes:
    try:
        return base64.b64decode(fields.text(key), validate=True)
    except (binascii.Error, ValueError):
        raise WsProtocolError(CloseCode.INVALID_PAYLOAD, f"{fields.path(key)} is not valid base64") from None


def _expect(fields: JsonFields, key: str, value: str | int, actual: str | int) -> None:
    if actual != value:
        raise _policy(f"{fields.path(key)} {describe(actual)} is not supported; expected {describe(value)}")


def parse_start(fields: JsonFields) -> TwilioStart:
    """The `start` object of a start message; only µ-law at 8000 Hz, mono, is supported."""
    start = fields.child("start")
    tracks = start.array("tracks")
    for index, track in enumerate(tracks):
        if not isinstance(track, str):
            raise WsProtocolError(
                CloseCode.INVALID_PAYLOAD, f"start.tracks[{index}] must be a string, not {describe(track)}"
            )
        if track not in TRACK_ROLES:
            raise _policy(f"start.tracks[{index}] {describe(track)} is not inbound or outbound")
    params = start.string_map("customParameters") if start.has("customParameters") else {}
    media_format = start.child("mediaFormat")
    encoding = media_format.text("encoding")
    _expect(media_format, "encoding", TWILIO_ENCODING, encoding)
    sample_rate = media_format.integer("sampleRate")
    _expect(media_format, "sampleRate", TWILIO_SAMPLE_RATE, sample_rate)
    channels = media_format.integer("channels")
    _expect(media_format, "channels", TWILIO_CHANNELS, channels)
    return TwilioStart(
        stream_sid=start.text("streamSid"),
        call_sid=start.text("callSid"),
        account_sid=start.text("accountSid"),
        tracks=tuple(tracks),
        custom_parameters=params,
        encoding=encoding,
        sample_rate=sample_rate,
        channels=channels,
    )


def parse_media(fields: JsonFields) -> Media:
    """The `media` object of a media message, its payload decoded from µ-law."""
    media = fields.child("media")
    role = _role(media, "track")
    chunk = _decimal(media, "chunk")
    timestamp_ms = _decimal(media, "timestamp")
    samples = decode_ulaw(_payload(media, "payload"))
    return Media(role=role, samples=samples, timestamp_ms=timestamp_ms, chunk=chunk)


class TwilioParser:
    """The state machine of one Media Streams socket: feed it every message, act on the events.

    Each `feed_*` call returns the events that message produced (possibly none) or raises
    `WsProtocolError`; after an error the socket is to be closed and the parser dropped.
    """

    def __init__(self, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        if max_frame_bytes < 1:
            raise ValueError(f"max_frame_bytes must be positive, not {max_frame_bytes}")
        self.max_frame_bytes = max_frame_bytes
        self.stream: TwilioStart | None = None
        self.stats = TwilioStats()
        self._state = _State.NEW
        self._last_sequence: int | None = None
        self._handlers: dict[str, Callable[[JsonFields], list[Event]]] = {
            "connected": self._on_connected,
            "start": self._on_start,
            "media": self._on_media,
            "dtmf": self._on_dtmf,
            "mark": self._on_mark,
            "stop": self._on_stop,
        }

    @property
    def started(self) -> bool:
        """Whether a valid start message has been received."""
        return self.stream is not None

    @property
    def stopped(self) -> bool:
        """Whether the stream has ended (stop message or `feed_close`)."""
        return self._state is _State.STOPPED

    def feed_text(self, text: str) -> list[Event]:
        """Parse one text frame; an unknown event kind yields no events."""
        self.stats.messages += 1
        if self._state is _State.STOPPED:
            raise _policy("text frame after stop")
        fields = parse_json_object(text, self.max_frame_bytes)
        event = fields.text("event")
        sequence = _decimal(fields, "sequenceNumber") if fields.has("sequenceNumber") else None
        self._check_stream_sid(fields)
        handler = self._handlers.get(event)
        if handler is None:
            self.stats.ignored += 1
            events: list[Event] = []
        else:
            events = handler(fields)
        if sequence is not None:
            self._count_sequence(sequence)
        return events

    def feed_binary(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Refuse a binary frame: Media Streams sends only JSON text."""
        self.stats.messages += 1
        raise WsProtocolError(CloseCode.UNSUPPORTED_DATA, "binary frame; Twilio Media Streams sends JSON text frames")

    def feed_close(self) -> list[Event]:
        """The socket closed: `Stopped` unless the stream had already stopped."""
        if self._state is _State.STOPPED:
            return []
        self._state = _State.STOPPED
        return [Stopped()]

    def _check_stream_sid(self, fields: JsonFields) -> None:
        if self.stream is None or not fields.has("streamSid"):
            return
        stream_sid = fields.text("streamSid")
        if stream_sid != self.stream.stream_sid:
            raise _policy(f"streamSid {describe(stream_sid)} differs from the started stream's")

    def _count_sequence(self, sequence: int) -> None:
        """Count skipped and late sequence numbers; the last one seen only moves forward."""
        last = self._last_sequence
        if last is not None and sequence <= last:
            self.stats.sequence_reordered += 1
            return
        if last is not None:
            self.stats.sequence_gaps += sequence - last - 1
        self._last_sequence = sequence

    def _require_start(self, event: str) -> None:
        if self.stream is None:
            raise _policy(f"{event} before start")

    def _on_connected(self, fields: JsonFields) -> list[Event]:
        if self._state is _State.CONNECTED:
            raise _policy("connected received twice")
        if self._state is not _State.NEW:
            raise _policy("connected after start")
        self._state = _State.CONNECTED
        return [Connected(fields.optional_text("protocol"), fields.optional_text("version"))]

    def _on_start(self, fields: JsonFields) -> list[Event]:
        if self.stream is not None:
            raise _policy("start received twice")
        self.stream = parse_start(fields)
        self._state = _State.STREAMING
        return [self.stream]

    def _on_media(self, fields: JsonFields) -> list[Event]:
        self._require_start("media")
        media = parse_media(fields)
        stats = self.stats.by_role[media.role]
        stats.frames += 1
        stats.bytes += len(media.samples)  # one µ-law byte per sample
        stats.samples += len(media.samples)
        return [media]

    def _on_dtmf(self, fields: JsonFields) -> list[Event]:
        self._require_start("dtmf")
        dtmf = fields.child("dtmf")
        role = _role(dtmf, "track")
        digit = parse_dtmf_digit(dtmf, "digit")
        self.stats.dtmf += 1
        return [Dtmf(role, digit)]

    def _on_mark(self, fields: JsonFields) -> list[Event]:
        self._require_start("mark")
        name = fields.child("mark").text("name")
        self.stats.marks += 1
        return [Mark(name)]

    def _on_stop(self, fields: JsonFields) -> list[Event]:
        self._state = _State.STOPPED
        return [Stopped()]
