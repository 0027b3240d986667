"""The recording engine: every termination reason exact to one 20 ms frame, pause, trim,
the finish key's tone cut out, per-leg statistics."""


import numpy as np
import pytest

from audio import MemorySink, dtmf, noise, silence, tone
from mediaserver.dsp.dtmf import DtmfDetector
from mediaserver.encoding import make_encoder
from mediaserver.media import DtmfEvent, PcmFrame
from mediaserver.mixing import Mixer
from mediaserver.options import RecordingOptions
from mediaserver.recorder.messages import RecordingClosed, RecordingStopped
from mediaserver.recorder.recording import Recording
from mediaserver.recorder.session import Session

RATE = 8000
FRAME = RATE // 50  # one 20 ms frame


def record(legs, block=1000, commands=(), detect=False, dtmf_events=(), **options):
    """Feed `legs` (arrays, caller first) through a Recording in `block`-sample blocks."""
    opts = RecordingOptions().merged(options)
    sink = MemorySink()
    rec = Recording("rec_test", opts, 0, make_encoder("wav", opts.sample_rate, opts.channels), sink)
    for seconds, kind, behavior in commands:
        rec.schedule(kind, round(seconds * opts.sample_rate), behavior)
    mixer = Mixer(opts.sample_rate)
    roles = ["caller", "callee", "participant3"]
    detectors = [DtmfDetector(opts.sample_rate, f"leg{i}") for i in range(len(legs))]
    for i, samples in enumerate(legs):
        mixer.add_leg(f"leg{i}", roles[i], 0)
        mixer.legs[f"leg{i}"].push(samples, 0, 0)
        mixer.end_leg(f"leg{i}")
    end = max(len(s) for s in legs)
    pending = list(dtmf_events)
    while mixer.cursor < end and not rec.done:
        got = mixer.read(min(mixer.cursor + block, end))
        events = [ev for ev in pending if ev.pts < got.end]
        pending = [ev for ev in pending if ev.pts >= got.end]
        if detect:
            for part, det in zip(got.legs, detectors):
                events += det.process(part.samples, got.start)
        rec.feed(got, events)
    rec.finish("hangup")
    rec.close()
    return rec, sink.pcm()


def seconds(pcm) -> float:
    return len(pcm) / RATE


def test_stop_lands_exactly_where_it_was_scheduled():
    rec, pcm = record([tone(440, 5)], commands=[(3.0, "stop", "skip")])
    assert rec.termination_reason == "stop"
    assert len(pcm) == 3 * RATE


@pytest.mark.parametrize("block", [160, 1000, 8000])
def test_silence_timeout_ends_after_that_much_continuous_silence(block):
    audio = np.concatenate([tone(440, 2.0), silence(6.0)])
    rec, pcm = record([audio], block=block, silence_timeout=3)
    assert rec.termination_reason == "silence"
    assert abs(seconds(pcm) - 5.0) <= 0.02


def test_low_level_noise_counts_as_silence_and_speech_level_does_not():
    audio = np.concatenate([noise(2.0, dbfs=-20), noise(4.0, dbfs=-60, seed=2), noise(1.0, dbfs=-20, seed=3)])
    rec, pcm = record([audio], silence_timeout=3)
    assert rec.termination_reason == "silence"
    assert abs(seconds(pcm) - 5.0) <= 0.02
    rec, pcm = record([noise(8.0, dbfs=-30)], silence_timeout=3)
    assert rec.termination_reason == "hangup"


def test_silence_timer_restarts_on_sound():
    audio = np.concatenate([tone(440, 1), silence(2.5), tone(440, 1), silence(2.5), tone(440, 1)])
    rec, pcm = record([audio], silence_timeout=3)
    assert rec.termination_reason == "hangup"
    assert seconds(pcm) == pytest.approx(8.0)


@pytest.mark.parametrize("block", [160, 999, 8000])
def test_max_length_is_exact(block):
    rec, pcm = record([tone(440, 10)], block=block, max_length=4.25)
    assert rec.termination_reason == "max_length"
    assert len(pcm) == int(4.25 * RATE)


def test_finish_key_ends_at_the_tone_onset_and_the_tone_is_not_in_the_file():
    onset = 2.5
    caller = np.concatenate([tone(300, onset, dbfs=-20), dtmf("#", 0.12), tone(300, 2.0, dbfs=-20)])
    rec, pcm = record([caller, tone(500, 5.0, dbfs=-20)], detect=True, finish_on_key="#")
    assert rec.termination_reason == "finish_key"
    assert rec.finish_key == "#"
    assert abs(seconds(pcm) - onset) <= 0.02
    leftover = DtmfDetector(RATE).process(pcm[:, 0].copy(), 0)
    assert leftover == []


def test_a_digit_not_in_finish_on_key_does_not_end_it():
    caller = np.concatenate([tone(300, 1.0, dbfs=-20), dtmf("5", 0.1), tone(300, 1.0, dbfs=-20)])
    rec, pcm = record([caller], detect=True, finish_on_key="#*")
    assert rec.termination_reason == "hangup"


def test_rfc4733_finish_key_detected_late_still_cuts_at_its_onset():
    # The event reaches the recording a block after its onset: the held audio is cut back.
    event = DtmfEvent("*", pts=int(1.5 * RATE), rate=RATE, source="rfc4733")
    rec, pcm = record([tone(440, 4)], block=800, dtmf_events=[event], finish_on_key="*")
    assert rec.termination_reason == "finish_key"
    assert len(pcm) == int(1.5 * RATE)


def test_pause_skip_leaves_no_gap_and_pause_silence_keeps_it():
    audio = tone(440, 6)
    commands = [(2.0, "pause", "skip"), (4.0, "resume", "skip")]
    rec, pcm = record([audio], commands=commands)
    assert len(pcm) == 4 * RATE
    commands = [(2.0, "pause", "silence"), (4.0, "resume", "skip")]
    rec, pcm = record([audio], commands=commands)
    assert len(pcm) == 6 * RATE
    assert not pcm[2 * RATE:4 * RATE].any()
    assert pcm[4 * RATE:].any() and pcm[:2 * RATE].any()


@pytest.mark.parametrize("behavior, file_seconds", [("skip", 3.0), ("silence", 6.0)])
def test_paused_time_does_not_count_towards_max_length(behavior, file_seconds):
    commands = [(1.0, "pause", behavior), (4.0, "resume", "skip")]
    rec, pcm = record([tone(440, 10)], commands=commands, max_length=3)
    assert rec.termination_reason == "max_length"
    assert rec.ended_at == 6 * RATE
    assert len(pcm) == int(file_seconds * RATE)


def test_paused_time_does_not_count_towards_the_silence_timer():
    audio = np.concatenate([tone(440, 1), silence(3), tone(440, 2)])
    commands = [(1.0, "pause", "silence"), (4.0, "resume", "skip")]
    rec, pcm = record([audio], commands=commands, silence_timeout=2)
    assert rec.termination_reason == "hangup"


def test_trim_silence_drops_leading_and_trailing_silence():
    audio = np.concatenate([silence(1.0), tone(440, 2.0), silence(1.5)])
    rec, pcm = record([audio], trim_silence=True)
    assert abs(seconds(pcm) - 2.0) <= 0.02
    assert np.abs(pcm[:FRAME]).max() > 1000


def test_trim_keeps_silence_between_sounds():
    audio = np.concatenate([silence(0.5), tone(440, 1.0), silence(2.0), tone(440, 1.0), silence(0.5)])
    rec, pcm = record([audio], trim_silence=True)
    assert abs(seconds(pcm) - 4.0) <= 0.02


def test_leg_statistics_count_frames_gaps_and_timestamps():
    opts = RecordingOptions()
    sink = MemorySink()
    rec = Recording("rec_stats", opts, 0, make_encoder("wav", RATE, 1), sink)
    mixer = Mixer(RATE)
    mixer.add_leg("a", "caller", 0)
    for i in range(50):
        if i in (10, 11, 12):
            continue  # 60 ms lost
        mixer.legs["a"].push(tone(440, 0.02), i * FRAME + 800, 0)
    mixer.end_leg("a")
    rec.feed(mixer.read(mixer.ready_until()))
    rec.finish("hangup")
    rec.close()
    tally = rec.legs["a"]
    assert tally.frames == 47
    assert tally.inserted_silence == 3 * FRAME
    assert tally.first == 800 and tally.last == 800 + 50 * FRAME


def test_session_timeline_with_a_late_leg_and_counted_pcm():
    session = Session("s", "app", 0.0, RATE, live=False)
    opts = RecordingOptions().merged({"channels": 2})
    sink = MemorySink()
    rec = Recording("rec_s", opts, 0, make_encoder("wav", RATE, 2), sink)
    session.start_recording(rec, 0.0)
    a = session.add_leg("a", "caller", 0.0)
    session.post_pcm(PcmFrame(tone(440, 1.0), RATE, None, "a"))
    session.process(0.0)
    b = session.add_leg("b", "callee", 0.0)  # joins where the mix has got to: 1 s
    session.post_pcm(PcmFrame(tone(440, 1.0), RATE, None, "a"))
    session.post_pcm(PcmFrame(tone(660, 1.0), RATE, None, "b"))
    session.hangup(0.0)
    events = session.process(0.0)
    pcm = sink.pcm()
    assert [type(event) for event in events][-2:] == [RecordingStopped, RecordingClosed]
    assert len(pcm) == 2 * RATE
    assert not pcm[:RATE, 1].any() and pcm[RATE:, 1].any()
    assert a.backlog == 0 and b.backlog == 0


def test_session_resamples_a_16k_leg_into_an_8k_recording():
    session = Session("s", "app", 0.0, RATE, live=False)
    sink = MemorySink()
    rec = Recording("rec_r", RecordingOptions(), 0, make_encoder("wav", RATE, 1), sink)
    session.start_recording(rec, 0.0)
    session.add_leg("a", "caller", 0.0)
    session.post_pcm(PcmFrame(tone(1000, 2.0, rate=16000), 16000, None, "a"))
    session.hangup(0.0)
    session.process(0.0)
    pcm = sink.pcm()[:, 0]
    assert len(pcm) == 2 * RATE
    spectrum = np.abs(np.fft.rfft(pcm[RATE // 2:RATE // 2 + RATE]))
    assert np.argmax(spectrum) == 1000
