"""RFC 4733 telephone-events: the payload, and one key press out of the packets carrying it.

Payload (RFC 4733 §2.3)::

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |     event     |E|R| volume    |          duration             |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+

A sender repeats one event in many packets, all with the event's start as RTP timestamp
and a growing duration, and sends the end (E bit) three times (§2.5.1.4). A long event is
split into segments of at most 0xFFFF ticks, each with a new timestamp (§2.5.1.3).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from mediaserver.errors import ProtocolError

EVENT_SIZE = 4  # RFC 4733 §2.3
# RFC 4733 §3.2: events 0-9 are the digits, 10 is *, 11 is #, 12-15 are A-D.
DTMF_EVENTS = "0123456789*#ABCD"
MAX_SEGMENT = 0xFFFF  # RFC 4733 §2.5.1.3: duration field limit

_EVENT = struct.Struct("!BBH")


class TelephoneEventError(ProtocolError):
    """A telephone-event payload that does not follow RFC 4733 §2.3."""


@dataclass(frozen=True, slots=True)
class TelephoneEvent:
    """One RFC 4733 event report."""

    event: int
    end: bool = False
    volume: int = 0  # -dBm0, 0..63
    duration: int = 0  # RTP clock ticks since the event's timestamp

    @property
    def digit(self) -> str | None:
        """The DTMF key this event is, or None for other events (flash, tones)."""
        return DTMF_EVENTS[self.event] if self.event < len(DTMF_EVENTS) else None

    @classmethod
    def parse(cls, payload: bytes) -> TelephoneEvent:
        # §2.3 allows several events only through RFC 2198 redundancy, which is not
        # negotiated here: the first event is the report.
        if len(payload) < EVENT_SIZE:
            raise TelephoneEventError(f"telephone-event payload of {len(payload)} bytes is shorter than 4")
        event, flags, duration = _EVENT.unpack_from(payload)
        return cls(event, bool(flags & 0x80), flags & 0x3F, duration)

    def __bytes__(self) -> bytes:
        if not 0 <= self.volume <= 63:
            raise ValueError("telephone-event volume is 0..63")
        return _EVENT.pack(self.event, (0x80 if self.end else 0) | self.volume, self.duration)


class KeyPressTracker:
    """Turns the stream of event reports of one source into one report per key press.

    `feed()` answers the digit the first time a press is seen, None for every repeat,
    end report, continuation segment and non-DTMF event.
    """

    def __init__(self) -> None:
        self._last: tuple[int, int, int] | None = None  # (ssrc, timestamp, event)
        self._last_ended = True
        self._last_duration = 0

    def feed(self, ssrc: int, timestamp: int, report: TelephoneEvent) -> str | None:
        key = (ssrc, timestamp, report.event)
        if key == self._last:
            self._last_ended = self._last_ended or report.end
            self._last_duration = max(self._last_duration, report.duration)
            return None
        continuation = self._continues(ssrc, timestamp, report.event)
        self._last, self._last_ended, self._last_duration = key, report.end, report.duration
        if continuation:
            return None
        return report.digit

    def _continues(self, ssrc: int, timestamp: int, event: int) -> bool:
        """A new segment of a long event still going (§2.5.1.3), not a new press: the
        previous segment did not end and had run close to the segment limit."""
        if self._last is None or self._last_ended or self._last_duration < MAX_SEGMENT // 2:
            return False
        last_ssrc, last_ts, last_event = self._last
        advance = (timestamp - last_ts) & 0xFFFFFFFF
        return last_ssrc == ssrc and last_event == event and 0 < advance <= MAX_SEGMENT
