"""wavstream: our own WebSocket audio protocol, one leg per socket.

Route: ``GET /ws/v1/sessions/{uuid}/legs/{role}``. The client sends, in order:

1. one text frame ``{"event": "start", "encoding": "L16"|"PCMU"|"PCMA",
   "sample_rate": n, "channels": 1|2}``. L16 may run at 8000, 16000 or 48000 Hz; PCMU
   (µ-law) and PCMA (A-law) at 8000 Hz. Two channels are interleaved sample by sample,
   caller first, callee second.
2. binary frames of audio. **L16 on a WebSocket is little-endian** (the byte order most
   software produces), unlike L16 in RTP, which is big-endian (RFC 3551 §4.5.11). Every
   frame holds whole sample frames: a multiple of 2 bytes × channels for L16, of
   1 byte × channels for PCMU/PCMA. A sample split across two frames is not reassembled
   but refused (1007): senders write whole samples, and carrying a byte over would hide
   a stream that has slipped by one byte.
3. at any time after start, text ``{"event": "dtmf", "digit": "5"}`` for a key press.
4. text ``{"event": "stop"}``, or simply closing the socket, to end the leg. Nothing may
   follow stop.

Fields other than those named are ignored, so clients may add their own.

Close codes (RFC 6455 §7.4.1) and the reasons sent with them:

====  ==========================================================================
code  cause
====  ==========================================================================
1003  binary frame before start; an encoding other than L16, PCMU, PCMA
1007  a text frame that is not a JSON object; a missing field or a field of the
      wrong JSON type (``sample_rate must be an integer, not '8000'``); an audio
      frame that is not whole sample frames (odd L16 byte count, or not divisible
      by the channel count)
1008  start twice; dtmf before start; any frame after stop; an unknown event;
      a digit other than 0-9, *, #, A-D; a sample rate not allowed for the encoding;
      channels other than 1 or 2
1009  a text or binary frame above ``max_frame_bytes`` (64 KiB by default)
====  ==========================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import numpy as np

from mediaserver.codecs.g711 import decode_alaw, decode_ulaw
from mediaserver.codecs.l16 import decode_l16
from mediaserver.ws import (
    DEFAULT_MAX_FRAME_BYTES,
    CloseCode,
    JsonFields,
    WsProtocolError,
    check_frame_size,
    describe,
    parse_dtmf_digit,
    parse_json_object,
)

SAMPLE_RATES: dict[str, tuple[int, ...]] = {"L16": (8000, 16000, 48000), "PCMU": (8000,), "PCMA": (8000,)}
ENCODINGS = tuple(SAMPLE_RATES)
CHANNEL_COUNTS = (1, 2)
CHANNEL_ROLES = ("caller", "callee")  # the order of interleaved channels

_BYTES_PER_SAMPLE = {"L16": 2, "PCMU": 1, "PCMA": 1}


def _decode_l16_little(payload: bytes | bytearray | memoryview) -> np.ndarray:
    return decode_l16(payload, "little")


_DECODERS: dict[str, Callable[[bytes | bytearray | memoryview], np.ndarray]] = {
    "L16": _decode_l16_little,
    "PCMU": decode_ulaw,
    "PCMA": decode_alaw,
}


@dataclass(frozen=True, slots=True)
class Started:
    """The leg's audio format, from the start frame."""

    encoding: str
    sample_rate: int
    channels: int


@dataclass(frozen=True, slots=True, eq=False)
class Audio:
    """One binary frame decoded: one mono int16 array per channel, all the same length."""

    channels: tuple[np.ndarray, ...]
    sample_rate: int

    @property
    def samples(self) -> int:
        """Samples per channel."""
        return len(self.channels[0])


@dataclass(frozen=True, slots=True)
class Dtmf:
    """A key pressed now (at the current end of the leg's audio)."""

    digit: str


@dataclass(frozen=True, slots=True)
class Stopped:
    """The leg ended: a stop frame, or the socket closed."""


Event = Started | Audio | Dtmf | Stopped


@dataclass(slots=True)
class WavstreamStats:
    """Counters for the leg's statistics; `samples` counts samples per channel."""

    frames: int = 0
    bytes: int = 0
    samples: int = 0
    text_frames: int = 0
    dtmf: int = 0


class _State(Enum):
    AWAITING_START = "awaiting start"
    STREAMING = "streaming"
    STOPPED = "stopped"


def _choices(values: tuple[object, ...]) -> str:
    """'8000, 16000 or 48000'."""
    shown = [str(v) for v in values]
    return shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} or {shown[-1]}"


def _decode(fmt: Started, data: bytes | bytearray | memoryview, size: int) -> np.ndarray:
    """All samples of a binary frame, still interleaved; refuses a partial sample frame."""
    frame_bytes = _BYTES_PER_SAMPLE[fmt.encoding] * fmt.channels
    if size % frame_bytes:
        plural = "s" if fmt.channels > 1 else ""
        raise WsProtocolError(
            CloseCode.INVALID_PAYLOAD,
            f"binary frame of {size} bytes is not a whole number of {frame_bytes}-byte "
            f"sample frames ({fmt.encoding}, {fmt.channels} channel{plural})",
        )
    return _DECODERS[fmt.encoding](data)


def _split(samples: np.ndarray, channels: int) -> tuple[np.ndarray, ...]:
    """Interleaved samples as one contiguous mono array per channel."""
    if channels == 1:
        return (samples,)
    frames = samples.reshape(-1, channels)
    return tuple(np.ascontiguousarray(frames[:, index]) for index in range(channels))


def _policy(reason: str) -> WsProtocolError:
    return WsProtocolError(CloseCode.POLICY_VIOLATION, reason)


class WavstreamParser:
    """The state machine of one wavstream leg: feed it every message, act on the events.

    Each `feed_*` call returns the events that message produced (possibly none) or raises
    `WsProtocolError`; after an error the parser's state is unchanged, but the socket is
    to be closed and the parser dropped.
    """

    def __init__(self, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        if max_frame_bytes < 1:
            raise ValueError(f"max_frame_bytes must be positive, not {max_frame_bytes}")
        self.max_frame_bytes = max_frame_bytes
        self.format: Started | None = None
        self.stats = WavstreamStats()
        self._state = _State.AWAITING_START
        self._handlers: dict[str, Callable[[JsonFields], list[Event]]] = {
            "start": self._on_start,
            "dtmf": self._on_dtmf,
            "stop": self._on_stop,
        }

    @property
    def started(self) -> bool:
        """Whether a valid start frame has been received."""
        return self.format is not None

    @property
    def stopped(self) -> bool:
        """Whether the leg has ended (stop frame or `feed_close`)."""
        return self._state is _State.STOPPED

    def feed_text(self, text: str) -> list[Event]:
        """Parse one text frame: start, dtmf or stop."""
        self.stats.text_frames += 1
        if self._state is _State.STOPPED:
            raise _policy("text frame after stop")
        fields = parse_json_object(text, self.max_frame_bytes)
        event = fields.text("event")
        handler = self._handlers.get(event)
        if handler is None:
            raise _policy(f"unknown event {describe(event)}; expected start, dtmf or stop")
        return handler(fields)

    def feed_binary(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Parse one binary frame of audio into one `Audio` event (none for an empty frame)."""
        size = memoryview(data).nbytes
        if self._state is _State.STOPPED:
            raise _policy("binary frame after stop")
        check_frame_size("binary", size, self.max_frame_bytes)
        if self.format is None:
            raise WsProtocolError(CloseCode.UNSUPPORTED_DATA, "binary frame before start")
        samples = _decode(self.format, data, size)
        self.stats.frames += 1
        self.stats.bytes += size
        if not size:
            return []
        channels = _split(samples, self.format.channels)
        self.stats.samples += len(channels[0])
        return [Audio(channels, self.format.sample_rate)]

    def feed_close(self) -> list[Event]:
        """The socket closed: `Stopped` unless the leg had already stopped."""
        if self._state is _State.STOPPED:
            return []
        self._state = _State.STOPPED
        return [Stopped()]

    def _on_start(self, fields: JsonFields) -> list[Event]:
        if self._state is not _State.AWAITING_START:
            raise _policy("start received twice")
        encoding = fields.text("encoding")
        if encoding not in SAMPLE_RATES:
            raise WsProtocolError(
                CloseCode.UNSUPPORTED_DATA, f"unsupported encoding {describe(encoding)}; expected {_choices(ENCODINGS)}"
            )
        rate, rates = fields.integer("sample_rate"), SAMPLE_RATES[encoding]
        if rate not in rates:
            raise _policy(f"sample_rate {describe(rate)} is not supported for {encoding}; expected {_choices(rates)}")
        channels = fields.integer("channels")
        if channels not in CHANNEL_COUNTS:
            raise _policy(f"channels {describe(channels)} is out of range; expected {_choices(CHANNEL_COUNTS)}")
        self.format = Started(encoding, rate, channels)
        self._state = _State.STREAMING
        return [self.format]

    def _on_dtmf(self, fields: JsonFields) -> list[Event]:
        if self._state is not _State.STREAMING:
            raise _policy("dtmf before start")
        digit = parse_dtmf_digit(fields, "digit")
        self.stats.dtmf += 1
        return [Dtmf(digit)]

    def _on_stop(self, fields: JsonFields) -> list[Event]:
        self._state = _State.STOPPED
        return [Stopped()]
