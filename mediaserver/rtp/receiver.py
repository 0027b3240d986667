"""One leg's RTP stream: datagrams in, codec payloads and key presses out.

`RtpReceiver.receive()` is the per-packet path and is kept short: check the header, look
the payload type up, place the packet on the timeline, hand the payload on. Decoding is
not done here: the payload goes to `on_audio` with the stream's decoder, and whoever
owns the audio path decodes it off the event loop. Nothing here does I/O or logs per
packet; everything is counted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from mediaserver.codecs.base import Decoder
from mediaserver.codecs.registry import RtpCodec
from mediaserver.media import DtmfEvent
from mediaserver.rtp.events import KeyPressTracker, TelephoneEvent, TelephoneEventError
from mediaserver.rtp.jitter import RtpTimeline
from mediaserver.rtp.packet import RtpError, parse_header

TELEPHONE_EVENT = "telephone-event"  # RFC 4733 §7.1.1 media subtype


@dataclass(slots=True)
class RtpCounters:
    """The counters a leg's owner reads: packets received, lost and malformed."""

    packets: int = 0
    lost: int = 0
    malformed: int = 0


@dataclass(slots=True)
class ReceiverStats:
    """What else happened to the stream, for statistics and tests."""

    unknown_payload_type: int = 0
    bad_events: int = 0
    key_presses: list[str] = field(default_factory=list)


class RtpReceiver:
    """Turns one leg's RTP datagrams into `on_audio(payload, pts, decoder)` calls and
    `on_dtmf(DtmfEvent)` key presses, placed on a timeline that began at `origin`.

    `formats` maps payload types to codecs (the SDP answer's rtpmap); `pts` is at the
    decoder's sample rate. `counters` may be any object with the `RtpCounters` fields
    (the recorder's per-leg input), so the owner sees them without copying.
    """

    def __init__(self, formats: Mapping[int, RtpCodec], origin: float, on_audio: Callable[[bytes, int, Decoder], None],
                 on_dtmf: Callable[[DtmfEvent], None], counters=None, leg: str = "") -> None:
        self.origin = origin
        self.leg = leg
        self.counters = counters if counters is not None else RtpCounters()
        self.stats = ReceiverStats()
        self._on_audio = on_audio
        self._on_dtmf = on_dtmf
        self._formats: dict[int, RtpCodec] = {}
        self._decoders: dict[int, tuple[Decoder, int, int]] = {}  # pt -> (decoder, its rate, clock rate)
        self._keys = KeyPressTracker()
        self.timeline = RtpTimeline(8000)
        self.set_formats(formats)

    def set_formats(self, formats: Mapping[int, RtpCodec]) -> None:
        """The payload types in force (a re-INVITE may change them). A payload type that
        now names another codec gets a new decoder; unchanged ones keep theirs."""
        for pt in list(self._decoders):
            if formats.get(pt) is not self._formats.get(pt):
                del self._decoders[pt]
        self._formats = dict(formats)
        audio = [codec for codec in self._formats.values() if codec.is_audio]
        if audio and self.timeline.received == 0:
            self.timeline.retime(audio[0].clock_rate)

    def receive(self, data: bytes, now: float) -> None:
        """One datagram that arrived at monotonic time `now`."""
        counters = self.counters
        try:
            second, seq, timestamp, ssrc, start, end = parse_header(data)
        except RtpError:
            counters.malformed += 1
            return
        counters.packets += 1
        pt = second & 0x7F
        entry = self._decoders.get(pt)
        if entry is None:
            entry = self._decoder_for(pt, ssrc, seq, timestamp, data[start:end], now)
            if entry is None:
                return
        decoder, rate, clock = entry
        timeline = self.timeline
        if clock != timeline.rate:
            timeline.retime(clock)
        pos = timeline.place(ssrc, seq, timestamp, second & 0x80, int((now - self.origin) * clock))
        if pos is not None:
            self._on_audio(data[start:end], pos if rate == clock else pos * rate // clock, decoder)
            counters.lost = timeline.lost

    def _decoder_for(self, pt: int, ssrc: int, seq: int, timestamp: int, payload: bytes, now: float):
        """The decoder for an audio payload type; events and unknown types end here."""
        codec = self._formats.get(pt)
        if codec is None:
            self.stats.unknown_payload_type += 1
            return None
        if codec.name.lower() == TELEPHONE_EVENT:
            self._event(codec, ssrc, seq, timestamp, payload, now)
            return None
        decoder = codec.make_decoder()
        entry = self._decoders[pt] = (decoder, decoder.sample_rate, codec.clock_rate)
        return entry

    def _event(self, codec: RtpCodec, ssrc: int, seq: int, timestamp: int, payload: bytes, now: float) -> None:
        """An RFC 4733 packet: one DtmfEvent per key press, at the press's start."""
        try:
            report = TelephoneEvent.parse(payload)
        except TelephoneEventError:
            self.stats.bad_events += 1
            return
        if not self.timeline.account(ssrc, seq):
            return
        digit = self._keys.feed(ssrc, timestamp, report)
        if digit is None:
            return
        rate = codec.clock_rate
        pts = self.timeline.position_of(ssrc, timestamp) if self.timeline.rate == rate else None
        if pts is None:
            # An event on its own SSRC (or before any audio): it began `duration` ago.
            pts = max(int((now - self.origin) * rate) - report.duration, 0)
        self.stats.key_presses.append(digit)
        self._on_dtmf(DtmfEvent(digit, max(pts, 0), rate, self.leg, report.duration, "rfc4733"))
