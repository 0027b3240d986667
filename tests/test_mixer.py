"""The mixer's timeline: alignment, late join, early leave, gaps, reordering, mixdown."""

import numpy as np
import pytest

from mediaserver.media import PcmFrame
from mediaserver.mixing import Mixer, mixdown


def frame(value: int, n: int, pts: int, leg: str) -> PcmFrame:
    return PcmFrame(np.full(n, value, dtype=np.int16), 8000, pts, leg)


def test_legs_are_aligned_by_timestamp_not_arrival():
    mixer = Mixer(8000)
    mixer.add_leg("a", "caller", 0)
    mixer.add_leg("b", "callee", 0)
    mixer.push(frame(1, 160, 160, "b"))  # b's second frame arrives first
    mixer.push(frame(2, 320, 0, "a"))
    mixer.push(frame(3, 160, 0, "b"))
    block = mixer.read(mixer.ready_until())
    assert (block.start, block.end) == (0, 320)
    a, b = (leg.samples for leg in block.legs)
    assert (a == 2).all()
    assert (b[:160] == 3).all() and (b[160:] == 1).all()


def test_late_join_has_silence_before_it_and_is_not_shifted():
    mixer = Mixer(8000)
    mixer.add_leg("a", "caller", 0)
    mixer.push(frame(5, 800, 0, "a"))
    mixer.read(400)
    mixer.add_leg("b", "callee", 600)
    mixer.push(frame(7, 200, 600, "b"))
    block = mixer.read(800)
    b = block.legs[1].samples
    assert (b[:200] == 0).all() and (b[200:] == 7).all()
    assert block.legs[1].live_from == 600


def test_early_leave_stops_holding_the_mix_back():
    mixer = Mixer(8000)
    mixer.add_leg("a", "caller", 0)
    mixer.add_leg("b", "callee", 0)
    mixer.push(frame(1, 1600, 0, "a"))
    mixer.push(frame(2, 400, 0, "b"))
    assert mixer.ready_until() == 400
    mixer.end_leg("b")
    assert mixer.ready_until() == 1600
    block = mixer.read(1600)
    b = block.legs[1].samples
    assert (b[:400] == 2).all() and (b[400:] == 0).all()


def test_gap_is_filled_with_silence_and_reported_as_uncovered():
    mixer = Mixer(8000)
    mixer.add_leg("a", "caller", 0)
    mixer.push(frame(4, 160, 0, "a"))
    mixer.push(frame(4, 160, 480, "a"))  # 320 samples lost in between
    block = mixer.read(640)
    leg = block.legs[0]
    assert leg.spans == [(0, 160), (480, 640)]
    assert (leg.samples[160:480] == 0).all()


def test_audio_for_a_position_already_mixed_is_dropped_and_counted():
    mixer = Mixer(8000)
    mixer.add_leg("a", "caller", 0)
    mixer.push(frame(1, 160, 0, "a"))
    mixer.read(320)
    mixer.push(frame(9, 160, 160, "a"))  # too late: 160..320 is already out
    stats = mixer.legs["a"].stats
    assert stats.late_samples == 160
    block = mixer.read(480)
    assert (block.legs[0].samples == 0).all()


def test_out_of_order_frame_fills_its_gap_only():
    mixer = Mixer(8000)
    mixer.add_leg("a", "caller", 0)
    mixer.push(frame(1, 160, 0, "a"))
    mixer.push(frame(3, 160, 320, "a"))
    mixer.push(frame(2, 240, 160, "a"))  # overlaps the next chunk by 80: those are dropped
    block = mixer.read(480)
    samples = block.legs[0].samples
    assert (samples[:160] == 1).all() and (samples[160:320] == 2).all() and (samples[320:] == 3).all()
    assert mixer.legs["a"].stats.overlap_samples == 80


def test_a_frame_moved_back_past_the_newest_is_overlapped_by_none_after_it():
    """A mapping moved back puts a frame partly over the newest one: what it adds past
    the newest counts as delivered, so the frame after it does not land on it too."""
    mixer = Mixer(8000)
    mixer.add_leg("a", "caller", 0)
    mixer.push(frame(1, 160, 0, "a"))
    mixer.push(frame(2, 160, 100, "a"))  # 100..160 overlaps; 160..260 is new
    mixer.push(frame(3, 160, 200, "a"))  # 200..260 is taken by the frame before
    assert mixer.legs["a"].write_pos == 360
    block = mixer.read(360)
    leg = block.legs[0]
    assert (leg.samples[:160] == 1).all() and (leg.samples[160:260] == 2).all() and (leg.samples[260:] == 3).all()
    assert sum(hi - lo for lo, hi in leg.spans) == 360
    assert mixer.legs["a"].stats.samples == 360
    assert mixer.legs["a"].stats.overlap_samples == 60 + 60


def test_a_leg_that_joined_but_sent_nothing_holds_a_fast_stream_back():
    mixer = Mixer(8000)
    mixer.add_leg("a", "caller", 0)
    mixer.add_leg("b", "callee", 0)
    mixer.push(frame(1, 8000, 0, "a"))
    assert mixer.ready_until() == 0


def test_mono_mix_sums_in_int32_and_clips():
    loud = np.full(4, 30000, dtype=np.int16)
    out = mixdown([loud, loud, -loud], ["caller", "callee", "participant3"], 1, "all", 4)
    assert out.dtype == np.int16 and (out == 30000).all()
    out = mixdown([loud, loud], ["caller", "callee"], 1, "all", 4)
    assert (out == 32767).all()
    out = mixdown([-loud, -loud], ["caller", "callee"], 1, "all", 4)
    assert (out == -32768).all()


@pytest.mark.parametrize("participant, expected", [("all", 3), ("caller", 1), ("callee", 2)])
def test_participant_filter_in_mono(participant, expected):
    a = np.ones(4, dtype=np.int16)
    b = np.full(4, 2, dtype=np.int16)
    assert (mixdown([a, b], ["caller", "callee"], 1, participant, 4) == expected).all()


def test_dual_channel_puts_caller_left_and_everyone_else_right():
    a, b, c = (np.full(4, v, dtype=np.int16) for v in (1, 2, 4))
    out = mixdown([a, b, c], ["caller", "callee", "participant3"], 2, "all", 4)
    assert out.shape == (4, 2)
    assert (out[:, 0] == 1).all() and (out[:, 1] == 6).all()
    out = mixdown([a, b], ["caller", "callee"], 2, "callee", 4)
    assert (out[:, 0] == 0).all() and (out[:, 1] == 2).all()


def test_conference_of_five_legs():
    tracks = [np.full(8, i + 1, dtype=np.int16) for i in range(5)]
    roles = ["caller", "callee", "participant3", "participant4", "participant5"]
    assert (mixdown(tracks, roles, 1, "all", 8) == 15).all()
