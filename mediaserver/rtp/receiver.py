"""One leg's RTP stream: datagrams in, codec payloads and key presses out.

`RtpReceiver.receive()` is the per-packet path and is kept short: check the header, look
the payload type up, place the packet on the timeline, hand the payload on. Decoding is
not done here: the payload goes to `on_audio` with the stream's decoder, and whoever
owns the audio path decodes it off the event loop. Nothing here does I/O or logs per
packet; everything is counted.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from mediaserver.codecs.base import Decoder
from mediaserver.codecs.registry import RtpCodec
from mediaserver.media import DtmfEvent
from mediaserver.rtp.events import KeyPressTracker, TelephoneEvent, TelephoneEventError
from mediaserver.rtp.jitter import RtpTimeline
from mediaserver.rtp.packet import RTP_HEADER_SIZE, RtpError, parse_header

TELEPHONE_EVENT = "telephone-event"  # RFC 4733 §7.1.1 media subtype
PLAIN_FIRST_OCTET = 0x80  # RFC 3550 §5.1: version 2, no padding, no extension, no CSRC
_PLAIN = struct.Struct("!BHII")  # the rest of a plain fixed header: M/PT, sequence, timestamp, SSRC
HOLD_S = 0.04  # how long packets wait behind a gap for the missing one (and the first ones)
STARTUP_PACKETS = 3  # the first packets, whose least delayed one anchors the stream
MAX_CONCEAL = 10  # packets a gap may lose and still be concealed by the decoder


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

    Payloads are handed on in sequence order. In-order packets go at once; a packet that
    comes after a gap waits until the gap is filled (reordering) or for `hold_s`, after
    which the missing packets are declared lost and handed on as None, so the decoder
    conceals them at their own positions. Handing on in order is what keeps the mixer
    from reading past a gap that a late packet is about to fill.
    """

    def __init__(self, formats: Mapping[int, RtpCodec], origin: float, on_audio: Callable[[bytes | None, int, Decoder], None],
                 on_dtmf: Callable[[DtmfEvent], None], counters=None, leg: str = "", hold_s: float = HOLD_S) -> None:
        self.origin = origin
        self.leg = leg
        self.hold_s = hold_s
        self.counters = counters if counters is not None else RtpCounters()
        self.stats = ReceiverStats()
        self._on_audio = on_audio
        self._on_dtmf = on_dtmf
        self._formats: dict[int, RtpCodec] = {}
        self._decoders: dict[int, tuple[Decoder, int, int]] = {}  # pt -> (decoder, its rate, clock rate)
        self._keys = KeyPressTracker()
        self.timeline = RtpTimeline(8000)
        self._expected = -1  # the sequence number handed on next; -1 before a stream starts
        self._stream = 0  # timeline.streams when `_expected` was set
        # seq -> what waits behind a gap (None: an event packet, which only takes its number)
        self._held: dict[int, tuple[bytes, int, Decoder] | None] = {}
        self._gap_since: float | None = None
        self._last: tuple[int, Decoder] | None = None  # pts and decoder of the last audio handed on
        self._startup: list | None = []  # the leg's first packets until the stream's anchor is settled
        self._startup_since = 0.0
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

    def receive(self, data: bytes, now: float) -> float | None:
        """One datagram that arrived at monotonic time `now`. Returns the time by which
        `expire()` must be called when packets are held behind a gap, else None."""
        counters = self.counters
        if len(data) >= RTP_HEADER_SIZE and data[0] == PLAIN_FIRST_OCTET:
            # What nearly every telephone sends: parse_header's checks have nothing to find.
            second, seq, timestamp, ssrc = _PLAIN.unpack_from(data, 1)
            start, end = RTP_HEADER_SIZE, len(data)
        else:
            try:
                second, seq, timestamp, ssrc, start, end = parse_header(data)
            except RtpError:
                counters.malformed += 1
                return None
        counters.packets += 1
        pt = second & 0x7F
        entry = self._decoders.get(pt)
        if entry is None:
            entry = self._decoder_for(pt, ssrc, seq, timestamp, data[start:end], now)
            if entry is None:
                return self._deadline()
        decoder, rate, clock = entry
        timeline = self.timeline
        if clock != timeline.rate:
            timeline.retime(clock)
        arrival = round((now - self.origin) * clock)
        pos = timeline.place(ssrc, seq, timestamp, second & 0x80, arrival)
        if pos is None:
            return None
        counters.lost = timeline.lost
        if self._startup is not None:
            return self._starting(seq, data[start:end], pos, entry, arrival - pos, now)
        pts = pos if rate == clock else pos * rate // clock
        if seq == self._expected and not self._held:
            self._expected = (seq + 1) & 0xFFFF
            self._last = (pts, decoder)
            self._on_audio(data[start:end], pts, decoder)
            return None
        return self._out_of_order(seq, data[start:end], pts, decoder, now)

    def expire(self, now: float) -> float | None:
        """Hand on what waited behind a gap longer than `hold_s`; the next deadline or None."""
        if self._startup is not None and now - self._startup_since >= self.hold_s - 1e-4:
            self._settle(now)
        if self._gap_since is not None and now - self._gap_since >= self.hold_s - 1e-4:
            self._release_all()
        return self._deadline()

    # -- internals -------------------------------------------------------------------

    def _starting(self, seq: int, payload: bytes, pos: int, entry, lateness: int, now: float) -> float | None:
        """The first packets of the leg wait (at most `hold_s`) so that the stream is
        anchored on the least delayed of them rather than on the first, which a busy
        moment may have delayed: nothing moves later, nothing is dropped."""
        if not self._startup:
            self._startup_since = now
        self._startup.append((seq, payload, pos, entry, lateness))
        if len(self._startup) >= STARTUP_PACKETS:
            self._settle(now)
        return self._deadline()

    def _settle(self, now: float) -> None:
        waiting, self._startup = self._startup, None
        error = min(0, min(item[4] for item in waiting))
        self.timeline.shift(error)
        for seq, payload, pos, (decoder, rate, clock), _ in waiting:
            pos += error
            pts = pos if rate == clock else pos * rate // clock
            if seq == self._expected and not self._held:
                self._hand_on(seq, payload, pts, decoder)
            else:
                self._out_of_order(seq, payload, pts, decoder, now)

    def _out_of_order(self, seq: int, payload: bytes, pts: int, decoder: Decoder, now: float) -> float | None:
        if self.timeline.streams != self._stream or self._expected < 0:
            self._release_all()  # a new stream: what the old one held goes first
            self._stream, self._expected = self.timeline.streams, seq
        ahead = (seq - self._expected) & 0xFFFF
        if ahead == 0:
            self._hand_on(seq, payload, pts, decoder)
            self._drain()
            self._gap_since = now if self._held else None
        elif ahead < 0x8000:
            self._held[seq] = (payload, pts, decoder)
            if self._gap_since is None:
                self._gap_since = now
        else:
            self._on_audio(payload, pts, decoder)  # its gap was given up on: the mixer decides
        return self.expire(now)

    def _hand_on(self, seq: int, payload: bytes | None, pts: int, decoder: Decoder) -> None:
        self._expected = (seq + 1) & 0xFFFF
        self._last = (pts, decoder)
        self._on_audio(payload, pts, decoder)

    def _drain(self) -> None:
        while self._expected in self._held:
            seq = self._expected
            item = self._held.pop(seq)
            if item is None:
                self._expected = (seq + 1) & 0xFFFF
            else:
                self._hand_on(seq, *item)

    def _release_all(self) -> None:
        """Give up on every gap: conceal the missing packets, hand on the held ones."""
        while self._held:
            seq = min(self._held, key=lambda s: (s - self._expected) & 0xFFFF)
            self._conceal((seq - self._expected) & 0xFFFF)
            self._expected = seq
            self._drain()
        self._gap_since = None

    def _conceal(self, missing: int) -> None:
        """Lost packets go to the decoder as None, each at its own position, so that what
        follows stays where it is; long gaps are left to the mixer's silence."""
        if self._last is None or not 0 < missing <= MAX_CONCEAL:
            return
        pts, decoder = self._last
        step = self.timeline.step * decoder.sample_rate // self.timeline.rate
        for index in range(1, missing + 1):
            self._on_audio(None, pts + index * step, decoder)

    def _sequence_event(self, seq: int, now: float) -> None:
        """An event sharing the audio's SSRC takes a sequence number: audio behind it must
        not wait for it, and a gap before it is not one more lost audio packet."""
        ahead = (seq - self._expected) & 0xFFFF
        if ahead == 0:
            self._expected = (seq + 1) & 0xFFFF
            self._drain()
            self._gap_since = now if self._held else None
        elif ahead < 0x8000:
            self._held[seq] = None
            if self._gap_since is None:
                self._gap_since = now

    def _deadline(self) -> float | None:
        if self._startup:
            return self._startup_since + self.hold_s
        return None if self._gap_since is None else self._gap_since + self.hold_s

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
        self.counters.lost = self.timeline.lost
        if ssrc == self.timeline.ssrc and self._expected >= 0:
            self._sequence_event(seq, now)
        digit = self._keys.feed(ssrc, timestamp, report)
        if digit is None:
            return
        rate = codec.clock_rate
        pts = self.timeline.position_of(ssrc, timestamp) if self.timeline.rate == rate else None
        if pts is None:
            # An event on its own SSRC (or before any audio): it began `duration` ago.
            pts = max(round((now - self.origin) * rate) - report.duration, 0)
        self.stats.key_presses.append(digit)
        self._on_dtmf(DtmfEvent(digit, max(pts, 0), rate, self.leg, report.duration, "rfc4733"))
