"""Where each RTP packet of a leg belongs on the session timeline.

The buffering half of a jitter buffer lives in the mixer, which places audio by position
until that position is mixed (the mix runs `jitter_ms` behind real time) and fills what
never came with silence, and in `RtpReceiver`, which hands payloads on in sequence order
(a packet after a gap waits a little for the missing one) and lets the decoder conceal a
lost one. This module is the other half: turn (SSRC, sequence number, timestamp, arrival
time) into a timeline position that a reordered packet, a duplicate, a lost packet, a
sender restart or a slow clock cannot shift, and drop what must not be played twice.

The mapping
-----------
The first packet is placed at its arrival. Every later packet of the same stream is placed
by its timestamp's distance from the newest packet so far (32-bit arithmetic, so the
timestamp may wrap), which puts a reordered packet back into its gap and keeps a lost
packet's span for its concealment: nothing after it moves.

`d = arrival - position` says how late a packet came compared with where the mapping puts
it. Network delay only ever makes `d` positive and varying; a discontinuity at the sender
shows up as a jump. The stream is re-anchored (placed afresh, by arrival) when:

* the SSRC changes, or the sequence number jumps beyond RFC 3550 A.1's MAX_DROPOUT or
  back beyond MAX_MISORDER and the next packet follows on (a restarted sender; a lone
  stray packet is dropped), or a marker-bit packet that looks old has a timestamp that
  does not fit its sequence number or comes far too late for one (a restart that reuses
  nearby sequence numbers);
* the timestamp does not advance with the sequence number (not `k` packets of `step`
  ticks for `k` packets on) and `|d|` exceeds `jump`: a timestamp jump. A legitimate
  gap, silence suppression or hold, advances the timestamp by the real pause and so
  keeps `d` small, and keeps the mapping;
* a packet comes more than `jump` *earlier* than its position, which no network can do;
* packets with a steadily advancing timestamp keep coming more than `jump` late for
  `jump` of arrival time (a sender that paused without advancing its clock). A burst
  after a network stall arrives all at once and is left alone: its packets are late and
  the mixer drops them, which keeps the audio after the stall in its place.

A re-anchored stream continues exactly where the previous packet ended when its arrival
is within `realign` of that point (a timestamp jump inside continuous speech leaves no
gap), else at its arrival.

Alignment with the shared clock
-------------------------------
Every `window` of arrival time the smallest `d` of the window is taken as the current
error of the mapping (the least delayed packet is the best estimate of when packets
leave the sender). When it exceeds `realign` either way, positions from then on move by
it: a slip of that many samples of silence or overlap, once, instead of a leg that drifts
away from the others (a sender whose clock runs fast or slow, a first packet that was
itself delayed). Legs therefore stay within `realign` of the shared clock, as the least
delayed of their packets tell it.
"""

from __future__ import annotations

RTP_SEQ_MOD = 1 << 16  # RFC 3550 A.1
MAX_DROPOUT = 3000  # RFC 3550 A.1: a forward sequence jump beyond this is a restart
MAX_MISORDER = 100  # RFC 3550 A.1: a backward jump beyond this is a restart
HISTORY = 128  # packets back from the newest in which a duplicate is recognised
REALIGN_S = 0.015  # how far a stream may be off the shared clock before it slips back
JUMP_S = 0.06  # beyond network jitter: a difference this large is the sender's doing
WINDOW_S = 2.0  # arrival time over which the least delayed packet is looked for
MAX_PTIME_S = 0.15  # RFC 7587 allows 120 ms Opus packets; anything longer is a gap

_TS_HALF = 1 << 31
_TS_MASK = (1 << 32) - 1
_HISTORY_MASK = (1 << HISTORY) - 1
_UNSEEN = 1 << 62  # a window's minimum lateness before its first packet


def _signed(delta: int) -> int:
    """A 32-bit timestamp difference as a signed number (RFC 3550 §5.1 wrap-around)."""
    return ((delta + _TS_HALF) & _TS_MASK) - _TS_HALF


class RtpTimeline:
    """Maps one leg's RTP packets (at `rate`, the RTP clock) to timeline positions.

    `place()` takes the arrival position (the arrival time on the session timeline,
    in RTP clock ticks) and answers the packet's position, or None for a duplicate
    or a packet too old to place. Counters are cumulative over the leg's life.
    """

    __slots__ = ("rate", "ssrc", "streams", "received", "duplicates", "stale", "lost", "reanchored", "realigned", "slipped",
                 "ssrc_changes", "_realign", "_jump", "_window", "_max_step", "_seq", "_seen", "_ts", "_ts_seq",
                 "_pos", "_step", "_fresh", "_probe", "_win_start", "_win_min", "_late_since", "_late_min")

    def __init__(self, rate: int, *, realign_s: float = REALIGN_S, jump_s: float = JUMP_S, window_s: float = WINDOW_S) -> None:
        self.ssrc: int | None = None
        self.streams = 0  # how many times a stream was anchored afresh (new SSRC, restart, new clock)
        self.received = self.duplicates = self.stale = self.lost = 0
        self.reanchored = self.realigned = self.slipped = self.ssrc_changes = 0
        self._seq = self._seen = self._ts = self._ts_seq = self._pos = 0
        self._fresh = True
        self._probe = -1  # the sequence number that would confirm a jump as a restart
        self._late_since: int | None = None
        self._late_min = 0
        self._configure(rate, realign_s, jump_s, window_s)
        self._step = rate // 50
        self._win_start, self._win_min = 0, _UNSEEN

    def _configure(self, rate: int, realign_s: float, jump_s: float, window_s: float) -> None:
        self.rate = rate
        self._realign = round(realign_s * rate)
        self._jump = round(jump_s * rate)
        self._window = round(window_s * rate)
        self._max_step = round(MAX_PTIME_S * rate)

    def retime(self, rate: int) -> None:
        """The stream switched to a payload format with another RTP clock: positions are
        kept, and the next packet is anchored afresh (its timestamps are a new scale)."""
        if rate == self.rate:
            return
        old = self.rate
        self._configure(rate, self._realign / old, self._jump / old, self._window / old)
        self._pos = self._pos * rate // old
        self._step = self._step * rate // old
        self._fresh = True

    @property
    def step(self) -> int:
        """Clock ticks per packet, as the stream's steady timestamps say."""
        return self._step

    def shift(self, ticks: int) -> None:
        """Move the mapping: positions from now on are `ticks` later (earlier if negative)."""
        self._pos += ticks
        if self._win_min != _UNSEEN:
            self._win_min -= ticks

    def position_of(self, ssrc: int, timestamp: int) -> int | None:
        """Where `timestamp` of the current stream lies, without placing a packet."""
        if ssrc != self.ssrc or self._fresh:
            return None
        return self._pos + _signed(timestamp - self._ts)

    def place(self, ssrc: int, seq: int, timestamp: int, marker: bool, arrival: int) -> int | None:
        """The timeline position of one audio packet, or None to drop it."""
        if ssrc != self.ssrc or self._fresh:
            return self._restart(ssrc, seq, timestamp, arrival)
        delta = (seq - self._seq) & 0xFFFF
        if delta == 0 or delta > RTP_SEQ_MOD - MAX_MISORDER:
            back = RTP_SEQ_MOD - delta if delta else 0
            ts_delta = _signed(timestamp - self._ts)
            if marker and (abs(ts_delta + back * self._step) > self._step or arrival - self._pos - ts_delta > self._jump):
                return self._restart(ssrc, seq, timestamp, arrival)
            return self._older(back, ts_delta)
        if delta <= MAX_DROPOUT:
            return self._advance(delta, seq, timestamp, arrival)
        # RFC 3550 A.1: a jump in sequence numbers is a restart only once the next packet
        # follows it (or its marker bit says so); a lone stray is dropped.
        if marker or seq == self._probe:
            return self._restart(ssrc, seq, timestamp, arrival)
        self._probe = (seq + 1) & 0xFFFF
        self.stale += 1
        return None

    def account(self, ssrc: int, seq: int) -> bool:
        """A packet of the stream that carries no audio (an RFC 4733 event sharing the
        SSRC): counted for loss and duplicates only. False for a duplicate."""
        if ssrc != self.ssrc or self._fresh:
            return True
        delta = (seq - self._seq) & 0xFFFF
        if delta == 0 or delta > RTP_SEQ_MOD - MAX_MISORDER:
            return self._older(RTP_SEQ_MOD - delta if delta else 0, 0) is not None
        if delta <= MAX_DROPOUT:
            self._seen = ((self._seen << delta) | 1) & _HISTORY_MASK
            self.lost += delta - 1
            self._seq = seq
            self.received += 1
        return True

    # -- internals -------------------------------------------------------------------

    def _restart(self, ssrc: int, seq: int, timestamp: int, arrival: int) -> int:
        """A new stream (new SSRC, restarted sender, new clock): anchor it afresh."""
        if self.ssrc is not None and ssrc != self.ssrc:
            self.ssrc_changes += 1
        pos = arrival
        if self.received:
            self.reanchored += 1
            pos = self._continuation(self._pos + self._step, arrival)
        self.ssrc, self._fresh = ssrc, False
        self.streams += 1
        self._seq, self._seen = seq, 1
        self._set_base(seq, timestamp, pos)
        self.received += 1
        self._reset_window(arrival)
        self._track(arrival - pos, arrival)
        return pos

    def _older(self, back: int, ts_delta: int) -> int | None:
        """A packet at or before the newest: a duplicate, a reordered one, or too old."""
        if back >= HISTORY:
            self.stale += 1
            return None
        bit = 1 << back
        if self._seen & bit:
            self.duplicates += 1
            return None
        self._seen |= bit
        self.lost = max(self.lost - 1, 0)
        self.received += 1
        return self._pos + ts_delta

    def _advance(self, delta: int, seq: int, timestamp: int, arrival: int) -> int:
        """The newest packet so far, `delta` sequence numbers on.

        The path of almost every packet: `_signed`, `_set_base` and the common case of
        `_track` are written out here rather than called."""
        kt = (seq - self._ts_seq) & 0xFFFF
        ts_delta = ((timestamp - self._ts + _TS_HALF) & _TS_MASK) - _TS_HALF
        step, jump = self._step, self._jump
        pos = self._pos + ts_delta
        late = arrival - pos
        steady = abs(ts_delta - kt * step) <= step >> 1
        if late < -jump or (not steady and late > jump):
            self.reanchored += 1
            pos = self._continuation(self._pos + kt * step, arrival)
            self._reset_window(arrival)
        elif late > jump:
            pos = self._late_run(pos, late, arrival)
        elif self._late_since is not None:
            self._late_since = None
        if kt == 1 and 0 < ts_delta <= self._max_step:
            self._step = ts_delta
        self._seen = ((self._seen << delta) | 1) & _HISTORY_MASK
        self.lost += delta - 1
        self._seq = self._ts_seq = seq
        self._ts, self._pos = timestamp, pos
        self.received += 1
        lateness = arrival - pos
        if lateness < self._win_min:
            self._win_min = lateness
        if arrival - self._win_start >= self._window:
            self._track(lateness, arrival)
        return pos

    def _late_run(self, pos: int, late: int, arrival: int) -> int:
        """A steady stream arriving more than `jump` late: move it once the lateness has
        lasted `jump` of arrival time (a burst after a stall arrives at once and does not)."""
        if self._late_since is None:
            self._late_since, self._late_min = arrival, late
            return pos
        self._late_min = min(self._late_min, late)
        if arrival - self._late_since < self._jump:
            return pos
        self.reanchored += 1
        shift, self._late_since = self._late_min, None
        self._reset_window(arrival)
        return pos + shift

    def _continuation(self, expected: int, arrival: int) -> int:
        """Where a re-anchored stream goes: right after the previous audio when it
        arrives about then, else at its arrival."""
        return expected if abs(arrival - expected) <= self._realign else arrival

    def _set_base(self, seq: int, timestamp: int, pos: int) -> None:
        self._ts_seq, self._ts, self._pos = seq, timestamp, pos

    def _reset_window(self, arrival: int) -> None:
        self._win_start, self._win_min = arrival, _UNSEEN
        self._late_since = None

    def _track(self, lateness: int, arrival: int) -> None:
        """Keep the window's smallest lateness; at the window's end, slip if it is off."""
        if lateness < self._win_min:
            self._win_min = lateness
        if arrival - self._win_start < self._window:
            return
        error = self._win_min
        if error > self._realign or error < -self._realign:
            self._pos += error
            self.realigned += 1
            self.slipped += abs(error)
        self._win_start, self._win_min = arrival, _UNSEEN
