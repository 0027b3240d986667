"""Placing RTP packets on the timeline (RtpTimeline) and handing them on in order
(RtpReceiver): reordering, duplicates, loss, wrap-around, SSRC changes, timestamp jumps,
restarts, stalls, clock drift; RFC 4733 events; all with arrival times given."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from mediaserver.codecs.registry import find_codec
from mediaserver.rtp.events import TelephoneEvent
from mediaserver.rtp.jitter import RtpTimeline
from mediaserver.rtp.packet import RtpPacket
from mediaserver.rtp.receiver import RtpReceiver

STEP = 160  # 20 ms at 8 kHz


def steady(timeline: RtpTimeline, count: int, *, seq: int = 0, ts: int = 0, at: int = 1000, ssrc: int = 1, step: int = STEP):
    """`count` packets on time; their positions."""
    return [timeline.place(ssrc, (seq + i) & 0xFFFF, (ts + i * step) & 0xFFFFFFFF, False, at + i * step) for i in range(count)]


def test_in_order_packets_follow_their_timestamps_from_the_first_arrival():
    timeline = RtpTimeline(8000)
    assert steady(timeline, 5, ts=123456, at=4000) == [4000 + i * STEP for i in range(5)]
    assert (timeline.received, timeline.lost, timeline.duplicates) == (5, 0, 0)


def test_network_jitter_does_not_move_packets():
    timeline = RtpTimeline(8000)
    rng = random.Random(1)
    places = [timeline.place(1, i, i * STEP, False, 1000 + i * STEP + (rng.randint(0, 240) if i else 0)) for i in range(200)]
    assert places == [1000 + i * STEP for i in range(200)]
    assert timeline.realigned == timeline.reanchored == 0


def test_reordered_and_duplicated_packets():
    timeline = RtpTimeline(8000)
    order = [0, 1, 3, 2, 2, 4, 6, 5, 6]
    places = [timeline.place(1, seq, seq * STEP, False, 1000 + seq * STEP + 10 * (seq > 0)) for seq in order]
    assert places == [1000, 1160, 1480, 1320, None, 1640, 1960, 1800, None]
    assert (timeline.duplicates, timeline.lost) == (2, 0)


def test_loss_is_counted_and_taken_back_when_the_packet_comes_late():
    timeline = RtpTimeline(8000)
    steady(timeline, 3)
    assert timeline.place(1, 5, 5 * STEP, False, 1000 + 5 * STEP) == 1000 + 5 * STEP
    assert timeline.lost == 2
    timeline.place(1, 4, 4 * STEP, False, 1000 + 6 * STEP)
    assert timeline.lost == 1
    assert timeline.place(1, (5 - 200) & 0xFFFF, 0, False, 1000 + 7 * STEP) is None and timeline.stale == 1  # a stray
    assert timeline.place(1, 6, 6 * STEP, False, 1000 + 7 * STEP) == 1000 + 6 * STEP and timeline.reanchored == 0


def test_a_sequence_jump_is_a_restart_once_the_next_packet_follows():
    timeline = RtpTimeline(8000)
    steady(timeline, 5)
    assert timeline.place(1, 30000, 99, False, 1000 + 5 * STEP) is None
    assert timeline.place(1, 30001, 99 + STEP, False, 1000 + 6 * STEP) == 1000 + 6 * STEP
    assert (timeline.stale, timeline.reanchored) == (1, 1)


def test_sequence_and_timestamp_wrap_around():
    timeline = RtpTimeline(8000)
    places = steady(timeline, 10, seq=65530, ts=0xFFFFFFFF - 3 * STEP)
    assert places == [1000 + i * STEP for i in range(10)]
    assert timeline.lost == 0 and timeline.reanchored == 0


def test_ssrc_change_continues_where_the_previous_stream_ended():
    timeline = RtpTimeline(8000)
    steady(timeline, 10)
    after = steady(timeline, 3, seq=40000, ts=999_999, at=1000 + 10 * STEP + 30, ssrc=2)
    assert after == [1000 + i * STEP for i in range(10, 13)]  # no gap, no overlap
    assert (timeline.ssrc_changes, timeline.reanchored, timeline.lost) == (1, 1, 0)


def test_ssrc_change_after_a_pause_starts_at_its_arrival():
    timeline = RtpTimeline(8000)
    steady(timeline, 10)
    assert steady(timeline, 2, seq=7, ts=5, at=50_000, ssrc=2) == [50_000, 50_000 + STEP]


def test_timestamp_jump_inside_continuous_audio_leaves_no_gap():
    timeline = RtpTimeline(8000)
    steady(timeline, 10)
    assert steady(timeline, 5, seq=10, ts=10 * STEP + 987_654, at=1000 + 10 * STEP) == [1000 + i * STEP for i in range(10, 15)]
    assert timeline.reanchored == 1
    steady(timeline, 5, seq=15, ts=15 * STEP - 555_555, at=1000 + 15 * STEP + 20)  # and backwards
    assert timeline.position_of(1, 15 * STEP - 555_555) == 1000 + 15 * STEP and timeline.reanchored == 2


def test_silence_suppression_keeps_the_mapping():
    """A talkspurt after 2 s of silence: the timestamp moved with real time; nothing to fix."""
    timeline = RtpTimeline(8000)
    steady(timeline, 5)
    assert timeline.place(1, 5, 5 * STEP + 16000, True, 1000 + 5 * STEP + 16000 + 40) == 1000 + 5 * STEP + 16000
    assert timeline.reanchored == 0


def test_marker_bit_restart_with_nearby_sequence_numbers():
    """A sender restarts its stream on the same SSRC, sequence numbers back near the old
    ones and new timestamps: not duplicates, a new stream where it arrives."""
    timeline = RtpTimeline(8000)
    steady(timeline, 50)
    restart_at = 1000 + 50 * STEP + 3000
    assert timeline.place(1, 3, 777, True, restart_at) == restart_at
    assert steady(timeline, 3, seq=4, ts=777 + STEP, at=restart_at + STEP) == [restart_at + i * STEP for i in range(1, 4)]
    assert timeline.duplicates == 0 and timeline.reanchored == 1


def test_burst_after_a_stall_stays_in_place():
    """Packets held up 300 ms in the network, then all at once: they keep their places
    (and will be too late to mix), and the packets after them are not moved."""
    timeline = RtpTimeline(8000)
    steady(timeline, 10)
    stall_end = 1000 + 25 * STEP
    burst = [timeline.place(1, i, i * STEP, False, stall_end + (i - 10)) for i in range(10, 25)]
    assert burst == [1000 + i * STEP for i in range(10, 25)]
    assert steady(timeline, 5, seq=25, ts=25 * STEP, at=1000 + 25 * STEP) == [1000 + i * STEP for i in range(25, 30)]
    assert timeline.reanchored == 0


def test_paused_sender_whose_clock_did_not_run_is_moved_to_its_arrival():
    """After a 2 s pause a sender continues its timestamps as if it had not paused: the
    packets come 2 s late, steadily; once that lasted `jump`, the stream moves."""
    timeline = RtpTimeline(8000)
    steady(timeline, 10)
    resume = 1000 + 10 * STEP + 16000
    places = steady(timeline, 8, seq=10, ts=10 * STEP, at=resume)
    assert places[:3] == [1000 + i * STEP for i in range(10, 13)]  # late: the mixer drops them
    assert places[-1] == resume + 7 * STEP and timeline.reanchored == 1


def test_a_fast_or_slow_sender_clock_stays_aligned_within_20_ms():
    """A sender clock 0.1% off drifts 1 ms a second; the mapping slips each time the drift
    passes `realign`, so the audio never strays 20 ms from the shared clock."""
    for speed in (1.001, 0.999):
        timeline = RtpTimeline(8000)
        worst = 0
        for i in range(3000):  # 60 s
            arrival = 1000 + round(i * STEP / speed)
            pos = timeline.place(1, i & 0xFFFF, i * STEP, False, arrival)
            worst = max(worst, abs(arrival - pos))
        assert timeline.realigned >= 3 and worst <= 0.02 * 8000


def test_retime_when_the_clock_rate_changes():
    timeline = RtpTimeline(8000)
    steady(timeline, 5)
    timeline.retime(48000)
    assert timeline.place(1, 5, 12345, False, (1000 + 5 * STEP) * 6) == (1000 + 5 * STEP) * 6
    assert timeline.rate == 48000 and timeline.step == STEP * 6


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_reordering_and_duplicates_never_change_a_position(seed):
    """Packets delayed at random by up to 40 ms (so they overtake each other), some sent
    twice: whatever the order, each lands where its timestamp says."""
    rng = random.Random(seed)
    arrivals = [(1000, 0)] + [(1000 + seq * STEP + rng.randint(0, 320), seq) for seq in range(1, 100)]
    arrivals += [(1000 + seq * STEP + rng.randint(0, 640), seq) for seq in rng.sample(range(100), 10)]
    timeline = RtpTimeline(8000)
    seen = {}
    for arrival, seq in sorted(arrivals):
        pos = timeline.place(9, seq, 5000 + seq * STEP, False, arrival)
        if pos is not None:
            assert seq not in seen
            seen[seq] = pos
    assert seen == {seq: 1000 + seq * STEP for seq in range(100)}
    assert timeline.duplicates == 10 and timeline.lost == 0


# -- the receiver -------------------------------------------------------------------------

PCMU = find_codec("PCMU")
EVENTS = find_codec("telephone-event", 8000)


class Sink:
    def __init__(self) -> None:
        self.audio: list[tuple[bytes | None, int]] = []
        self.dtmf = []

    def on_audio(self, payload, pts, decoder) -> None:
        self.audio.append((payload, pts))

    def on_dtmf(self, event) -> None:
        self.dtmf.append(event)


def receiver(formats=None, hold_s=0.04) -> tuple[RtpReceiver, Sink]:
    sink = Sink()
    return RtpReceiver(formats or {0: PCMU, 101: EVENTS}, 100.0, sink.on_audio, sink.on_dtmf, hold_s=hold_s), sink


def packet(seq: int, ts: int | None = None, pt: int = 0, payload: bytes | None = None, ssrc: int = 1, marker=False) -> bytes:
    return bytes(RtpPacket(pt, seq, seq * STEP if ts is None else ts, ssrc, payload if payload is not None else bytes([seq % 256]) * 160, marker))


def at(n: float) -> float:
    """The arrival time of packet n on time: 1 s into the session."""
    return 101.0 + n * 0.02


def test_receiver_hands_payloads_on_in_order_at_their_positions():
    rx, sink = receiver()
    for n in range(5):
        assert rx.receive(packet(n), at(n)) is None or n < 3  # the first three wait to anchor the stream
    assert [pts for _, pts in sink.audio] == [8000 + n * STEP for n in range(5)]
    assert [payload[0] for payload, _ in sink.audio] == [0, 1, 2, 3, 4]
    assert rx.counters.packets == 5 and rx.counters.lost == 0


def test_the_first_packets_anchor_on_the_least_delayed():
    """The first packet came 15 ms late (a busy moment); the next two on time: the stream
    is placed by them, so nothing has to slip later."""
    rx, sink = receiver()
    rx.receive(packet(0), at(0) + 0.015)
    rx.receive(packet(1), at(1))
    rx.receive(packet(2), at(2))
    assert [pts for _, pts in sink.audio] == [8000, 8000 + STEP, 8000 + 2 * STEP]


def test_a_gap_waits_for_its_packet():
    rx, sink = receiver()
    for n in (0, 1, 2, 3, 5, 6):
        due = rx.receive(packet(n), at(n))
    assert due == at(5) + 0.04  # 5 and 6 wait for 4
    assert [payload[0] for payload, _ in sink.audio] == [0, 1, 2, 3]
    assert rx.receive(packet(4), at(6) + 0.01) is None
    assert [payload[0] for payload, _ in sink.audio] == [0, 1, 2, 3, 4, 5, 6]
    assert [pts for _, pts in sink.audio] == [8000 + n * STEP for n in range(7)]


def test_a_lost_packet_is_concealed_at_its_own_position():
    rx, sink = receiver()
    for n in (0, 1, 2, 3, 5, 6):
        rx.receive(packet(n), at(n))
    assert rx.expire(at(5) + 0.039) == at(5) + 0.04  # not yet
    assert rx.expire(at(5) + 0.04) is None
    assert [(payload[0] if payload else None, pts) for payload, pts in sink.audio][3:] == [
        (3, 8000 + 3 * STEP), (None, 8000 + 4 * STEP), (5, 8000 + 5 * STEP), (6, 8000 + 6 * STEP)]
    assert rx.counters.lost == 1
    rx.receive(packet(4), at(7))  # too late now: handed on, the mixer will drop it
    assert sink.audio[-1] == (packet(4)[12:], 8000 + 4 * STEP)


def test_malformed_and_unknown_packets_are_counted_and_dropped():
    rx, sink = receiver()
    rx.receive(b"\x80\x00", at(0))
    rx.receive(packet(0, pt=18), at(0))
    assert (rx.counters.malformed, rx.counters.packets, rx.stats.unknown_payload_type) == (1, 1, 1)
    assert sink.audio == []


def test_rfc4733_events_one_per_press_at_the_event_start():
    rx, sink = receiver()
    for n in range(5):
        rx.receive(packet(n), at(n))
    for n, (end, duration) in enumerate([(False, 0), (False, 160), (True, 320), (True, 320), (True, 320)]):
        rx.receive(packet(5 + n, ts=5 * STEP, pt=101, payload=bytes(TelephoneEvent(9, end, 10, duration))), at(5 + n))
    rx.receive(packet(10), at(10))
    [event] = sink.dtmf
    assert (event.digit, event.pts, event.rate, event.source) == ("9", 8000 + 5 * STEP, 8000, "rfc4733")
    assert rx.counters.lost == 0 and sink.audio[-1] == (packet(10)[12:], 8000 + 10 * STEP)  # events took their sequence numbers


def test_rfc4733_event_on_its_own_ssrc_is_placed_by_its_arrival():
    rx, sink = receiver()
    rx.receive(packet(0, ts=13280, pt=101, payload=bytes(TelephoneEvent(11, False, 10, 400)), ssrc=0xE05384E), 102.0)
    assert [(e.digit, e.pts) for e in sink.dtmf] == [("#", 16000 - 400)]


def test_a_codec_switch_uses_the_new_codecs_decoder_and_clock():
    g722 = find_codec("G722")
    rx, sink = receiver({0: PCMU, 9: g722})
    for n in range(3):
        rx.receive(packet(n), at(n))
    rx.receive(packet(3, pt=9, payload=bytes(160)), at(3))
    assert sink.audio[-1][1] == 2 * (8000 + 3 * STEP)  # G.722: 16 kHz audio on an 8 kHz clock


def test_an_event_late_in_the_sequence_fills_its_gap_without_concealment():
    rx, sink = receiver()
    for n in (0, 1, 2, 3, 4, 6):
        rx.receive(packet(n), at(n))
    assert [payload[0] for payload, _ in sink.audio] == [0, 1, 2, 3, 4]  # 6 waits for 5
    rx.receive(packet(5, ts=5 * STEP, pt=101, payload=bytes(TelephoneEvent(1, True, 10, 160))), at(6) + 0.005)
    assert [payload[0] for payload, _ in sink.audio] == [0, 1, 2, 3, 4, 6]  # no None for the event's number
    assert rx.expire(at(8)) is None and rx.counters.lost == 0
