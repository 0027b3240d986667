"""In-band DTMF detection: Q.23 tones found, Q.24-style rejects refused, speech left alone.

All audio is generated here: dual tones with numpy, speech with espeak-ng and sox. The
tone material is also decoded by multimon-ng, an independent DTMF decoder, so a test that
expects silence from our detector is known to hold real DTMF where it should.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mediaserver.codecs.g711 import decode_alaw, decode_ulaw, encode_alaw, encode_ulaw
from mediaserver.dsp.dtmf import COL_HZ, KEYPAD, ROW_HZ, DtmfDetector
from mediaserver.dsp.levels import frame_dbfs
from mediaserver.media import DtmfEvent

RATES = (8000, 16000, 48000)
TONE_DBFS = -10.0  # per tone
FULL_SCALE = 32768.0

# (voice, words per minute, text): male and female voices, slow to fast, and plenty of
# spoken digits, the speech most likely to fool a DTMF receiver.
SPEECH = [
    ("en-us", 150, "The quick brown fox jumps over the lazy dog. Please hold while we "
     "connect your call to the next available agent."),
    ("en-us+f3", 170, "one two three four five six seven eight nine ten eleven twelve "
     "thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty"),
    ("en-gb", 130, "My account number is four seven one, nine nine two, zero zero eight, "
     "and my PIN is five five five one."),
    ("en-us+f4", 200, "Hello, thank you for calling. Your call may be recorded for quality "
     "and training purposes. Press one for sales, two for support."),
    ("en-us+m3", 120, "zero one two three four five six seven eight nine, nine eight seven "
     "six five four three two one zero"),
    ("en-us+f2", 210, "zero, oh, one, two, three, four, five, six, seven, eight, nine, star, "
     "pound, hash"),
    ("en-gb-scotland", 140, "My phone number is five five five, eight six seven, five three "
     "zero nine. My card ends in four four two one."),
    ("en-us+f5", 160, "Seven hundred and seventy seven. Nine thousand nine hundred and ninety "
     "nine. Eight eight eight. Sixty six. Three point one four one five nine."),
    ("en-us", 190, "Beep boop. Eeeeeeee. Ooooooooh. Mmmmmmm. Aaaaaaah. Hmmmmm. Yes, no, "
     "maybe. Wow, really? Hello? Hello?"),
    ("en-us+f3", 120, "twenty one, twenty two, twenty three, twenty four, twenty five, "
     "twenty six, twenty seven, twenty eight, twenty nine, thirty"),
]


# --- signal generation -------------------------------------------------------------


def dual_tone(
    digit: str, seconds: float, rate: int, dbfs: float = TONE_DBFS, twist_db: float = 0.0
) -> np.ndarray:
    """A Q.23 dual tone as float samples; the column tone `twist_db` below the row tone."""
    index = KEYPAD.index(digit)
    n = np.arange(round(seconds * rate))
    amplitude = FULL_SCALE * np.sqrt(2) * 10 ** (dbfs / 20)
    row = amplitude * np.sin(2 * np.pi * ROW_HZ[index // 4] * n / rate)
    col = amplitude * 10 ** (-twist_db / 20) * np.sin(2 * np.pi * COL_HZ[index % 4] * n / rate + 1.0)
    return row + col


def pcm(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x), -32768, 32767).astype(np.int16)


def keyed(
    digits: str, rate: int, tone_s: float = 0.040, gap_s: float = 0.040, lead_s: float = 0.1037
) -> tuple[np.ndarray, list[int]]:
    """Digits as tones with gaps between them (float samples), and each tone's onset.

    The default lead-in is no multiple of the analysis hop, so onsets fall mid-block.
    """
    parts, onsets = [np.zeros(round(lead_s * rate))], []
    position = len(parts[0])
    for digit in digits:
        onsets.append(position)
        parts += [dual_tone(digit, tone_s, rate), np.zeros(round(gap_s * rate))]
        position += len(parts[-2]) + len(parts[-1])
    parts.append(np.zeros(round(lead_s * rate)))
    return np.concatenate(parts), onsets


def with_noise(x: np.ndarray, snr_db: float, seed: int, tone_dbfs: float = TONE_DBFS) -> np.ndarray:
    """White noise at `snr_db` below the power of the sounding dual tone (`tone_dbfs` per tone)."""
    tone_power = 2 * (FULL_SCALE * 10 ** (tone_dbfs / 20)) ** 2
    sigma = np.sqrt(tone_power / 10 ** (snr_db / 10))
    return x + np.random.default_rng(seed).normal(0.0, sigma, len(x))


def g711_round_trip(samples: np.ndarray, law: str) -> np.ndarray:
    if law == "ulaw":
        return decode_ulaw(encode_ulaw(samples))
    return decode_alaw(encode_alaw(samples))


def detect(samples: np.ndarray, rate: int, leg: str = "") -> list[DtmfEvent]:
    return DtmfDetector(rate, leg).process(samples, 0)


def digits_of(events: list[DtmfEvent]) -> str:
    return "".join(event.digit for event in events)


def assert_onsets(events: list[DtmfEvent], onsets: list[int], rate: int) -> None:
    errors_ms = [1000 * (event.pts - onset) / rate for event, onset in zip(events, onsets, strict=True)]
    assert max(abs(e) for e in errors_ms) <= 10.0, errors_ms


# --- external tools ------------------------------------------------------------------


def multimon_digits(samples: np.ndarray, rate: int, tmp_path: Path) -> str:
    """The digits multimon-ng decodes from int16 `samples` (resampled to its 22050 Hz)."""
    source, resampled = tmp_path / "in.raw", tmp_path / "mm.raw"
    samples.astype("<i2").tofile(source)
    raw = ["-t", "raw", "-e", "signed", "-b", "16", "-c", "1"]
    subprocess.run(["sox", *raw, "-r", str(rate), str(source), *raw, "-r", "22050", str(resampled)],
                   check=True, capture_output=True)
    out = subprocess.run(["multimon-ng", "-q", "-c", "-a", "DTMF", "-t", "raw", str(resampled)],
                         check=True, capture_output=True, text=True).stdout
    return "".join(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("DTMF:"))


def sox_rms_db(samples: np.ndarray, rate: int, tmp_path: Path, *effect: str) -> float:
    """sox's RMS level (dB re full scale) of int16 `samples` after a sox effect."""
    source = tmp_path / "level.raw"
    samples.astype("<i2").tofile(source)
    raw = ["-t", "raw", "-e", "signed", "-b", "16", "-c", "1", "-r", str(rate)]
    report = subprocess.run(["sox", *raw, str(source), "-n", *effect, "stats"],
                            check=True, capture_output=True, text=True).stderr
    line = next(line for line in report.splitlines() if line.startswith("RMS lev dB"))
    return float(line.split()[-1])


def espeak(tmp_path: Path, voice: str, wpm: int, text: str, rate: int) -> np.ndarray:
    wav, out = tmp_path / "espeak.wav", tmp_path / f"speech{rate}.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(wpm), "-w", str(wav), text], check=True)
    subprocess.run(["sox", str(wav), "-r", str(rate), "-c", "1", "-b", "16", str(out)], check=True)
    samples, file_rate = sf.read(out, dtype="int16")
    assert file_rate == rate
    return samples


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> dict[int, np.ndarray]:
    """Over a minute of espeak-ng speech per rate (8 and 16 kHz), utterances back to back."""
    tmp = tmp_path_factory.mktemp("speech")
    return {
        rate: np.concatenate([espeak(tmp, voice, wpm, text, rate) for voice, wpm, text in SPEECH])
        for rate in (8000, 16000)
    }


# --- the keypad, clean and impaired ------------------------------------------------------


@pytest.mark.parametrize("rate", RATES)
def test_all_sixteen_digits_in_order(rate: int) -> None:
    x, onsets = keyed(KEYPAD, rate)
    events = detect(pcm(x), rate, leg="caller")
    assert digits_of(events) == KEYPAD
    assert_onsets(events, onsets, rate)
    assert all(e.rate == rate and e.leg == "caller" and e.source == "inband" for e in events)
    assert all(e.duration == 0 for e in events)


@pytest.mark.parametrize("rate", RATES)
def test_multimon_decodes_the_same_digits(rate: int, tmp_path: Path) -> None:
    x, _ = keyed(KEYPAD, rate)
    assert multimon_digits(pcm(x), rate, tmp_path) == KEYPAD


@pytest.mark.parametrize("law", ["ulaw", "alaw"])
def test_all_digits_after_g711_round_trip(law: str, tmp_path: Path) -> None:
    x, onsets = keyed(KEYPAD, 8000)
    samples = g711_round_trip(pcm(x), law)
    events = detect(samples, 8000)
    assert digits_of(events) == KEYPAD
    assert_onsets(events, onsets, 8000)
    assert multimon_digits(samples, 8000, tmp_path) == KEYPAD


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("seed", range(4))
def test_all_digits_at_15_db_snr(rate: int, seed: int) -> None:
    x, onsets = keyed(KEYPAD, rate)
    events = detect(pcm(with_noise(x, 15.0, seed)), rate)
    assert digits_of(events) == KEYPAD
    assert_onsets(events, onsets, rate)


def test_noisy_material_is_real_dtmf(tmp_path: Path) -> None:
    x, _ = keyed(KEYPAD, 8000)
    assert multimon_digits(pcm(with_noise(x, 15.0, 0)), 8000, tmp_path) == KEYPAD


def test_noise_and_g711_together() -> None:
    x, onsets = keyed(KEYPAD * 2, 8000)
    events = detect(g711_round_trip(pcm(with_noise(x, 15.0, 7)), "alaw"), 8000)
    assert digits_of(events) == KEYPAD * 2
    assert_onsets(events, onsets, 8000)


@pytest.mark.parametrize("rate", RATES)
def test_onset_is_found_at_every_alignment(rate: int) -> None:
    step = rate // 8000 * 7  # walks the onset through a whole analysis block
    for shift in range(0, rate * 13 // 1000, step):
        x, onsets = keyed("5#", rate, lead_s=0.05 + shift / rate)
        events = detect(pcm(x), rate)
        assert digits_of(events) == "5#", shift
        assert_onsets(events, onsets, rate)


# --- speech ----------------------------------------------------------------------------


def test_speech_material_is_a_minute_of_real_speech(speech: dict[int, np.ndarray]) -> None:
    samples = speech[8000]
    levels = frame_dbfs(samples, 160)
    assert len(samples) / 8000 >= 60.0
    assert np.count_nonzero(levels > -40.0) * 160 / 8000 >= 45.0  # seconds of active speech


@pytest.mark.parametrize("rate", [8000, 16000])
def test_no_digit_in_a_minute_of_speech(rate: int, speech: dict[int, np.ndarray]) -> None:
    assert detect(speech[rate], rate) == []


@pytest.mark.parametrize("law", ["ulaw", "alaw"])
def test_no_digit_in_speech_after_g711_round_trip(law: str, speech: dict[int, np.ndarray]) -> None:
    assert detect(g711_round_trip(speech[8000], law), 8000) == []


def test_no_digit_in_loud_speech(speech: dict[int, np.ndarray]) -> None:
    loud = pcm(speech[8000].astype(np.float64) * 2.0)  # +6 dB, clipping on peaks
    assert detect(loud, 8000) == []


def active_positions(samples: np.ndarray, rate: int, count: int) -> list[int]:
    """`count` spread-out positions inside loud speech (20 ms frames over -25 dBFS), 1 s or
    more from either end."""
    frame = rate // 50
    loud = np.flatnonzero(frame_dbfs(samples, frame) > -25.0) * frame
    loud = loud[(loud >= rate) & (loud <= len(samples) - rate)]
    return loud[np.linspace(0, len(loud) - 1, count).astype(int)].tolist()


def test_tone_sandwiched_in_speech(speech: dict[int, np.ndarray]) -> None:
    samples = speech[8000].astype(np.float64)
    for digit, cut in zip(KEYPAD, active_positions(speech[8000], 8000, len(KEYPAD)), strict=True):
        around = samples[cut - 8000 : cut + 8000]
        x = np.concatenate((around[:8000], dual_tone(digit, 0.060, 8000), around[8000:]))
        events = detect(pcm(x), 8000)
        assert digits_of(events) == digit
        assert_onsets(events, [8000], 8000)


def test_key_pressed_while_talking(speech: dict[int, np.ndarray]) -> None:
    """A tone over speech 15 dB quieter than the tone itself is still found."""
    samples = speech[8000].astype(np.float64)
    for digit, at in zip(KEYPAD, active_positions(speech[8000], 8000, len(KEYPAD)), strict=True):
        tone = dual_tone(digit, 0.100, 8000)
        x = samples[at - 4000 : at + 4000].copy()
        talk = x[4000 : 4000 + len(tone)]
        x *= np.sqrt(np.mean(tone**2) / np.mean(talk**2) / 10**1.5)
        x[4000 : 4000 + len(tone)] += tone
        events = detect(pcm(x), 8000)
        assert digits_of(events) == digit
        assert_onsets(events, [4000], 8000)


# --- what a receiver must refuse ----------------------------------------------------


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("seconds", [0.020, 0.023])
def test_short_tones_are_rejected(rate: int, seconds: float) -> None:
    x, _ = keyed(KEYPAD * 3, rate, tone_s=seconds, gap_s=0.0617)  # gap moves onsets across blocks
    assert detect(pcm(x), rate) == []


def test_short_tones_are_real_dtmf(tmp_path: Path) -> None:
    x, _ = keyed(KEYPAD, 8000, tone_s=0.020, gap_s=0.060)
    assert multimon_digits(pcm(x), 8000, tmp_path) == KEYPAD


@pytest.mark.parametrize("rate", [8000, 16000])
def test_single_frequencies_are_rejected(rate: int) -> None:
    n = np.arange(rate // 5)
    for hz in ROW_HZ + COL_HZ:
        x = FULL_SCALE * np.sqrt(2) * 10 ** (TONE_DBFS / 20) * np.sin(2 * np.pi * hz * n / rate)
        assert detect(pcm(np.concatenate((x, np.zeros(rate // 10)))), rate) == [], hz


def test_two_rows_or_two_columns_are_rejected() -> None:
    n = np.arange(1600)
    amplitude = FULL_SCALE * np.sqrt(2) * 10 ** (TONE_DBFS / 20)
    for a, b in ((ROW_HZ[0], ROW_HZ[2]), (COL_HZ[1], COL_HZ[3]), (1000.0, 1500.0)):
        x = amplitude * (np.sin(2 * np.pi * a * n / 8000) + np.sin(2 * np.pi * b * n / 8000))
        assert detect(pcm(x), 8000) == [], (a, b)


@pytest.mark.parametrize(("third_db", "expected"), [(-6.0, ""), (-20.0, "8")])
def test_a_third_tone_in_a_group_must_be_well_below_the_pair(third_db: float, expected: str) -> None:
    """8 is 852 + 1336 Hz; a third tone (697 Hz) within 8 dB makes the row ambiguous."""
    n = np.arange(800)
    amplitude = FULL_SCALE * np.sqrt(2) * 10 ** ((TONE_DBFS + third_db) / 20)
    third = amplitude * np.sin(2 * np.pi * ROW_HZ[0] * n / 8000)
    x = np.concatenate((np.zeros(400), dual_tone("8", 0.1, 8000) + third, np.zeros(400)))
    assert digits_of(detect(pcm(x), 8000)) == expected


def twisted(twist_db: float, dbfs: float) -> np.ndarray:
    return np.concatenate([np.concatenate((dual_tone(d, 0.1, 8000, dbfs, twist_db), np.zeros(800)))
                           for d in KEYPAD])


@pytest.mark.parametrize("twist_db", [-4.0, -2.0, 0.0, 4.0, 8.0])
def test_twist_within_limits_is_accepted(twist_db: float) -> None:
    assert digits_of(detect(pcm(twisted(twist_db, -14.0)), 8000)) == KEYPAD


@pytest.mark.parametrize("twist_db", [-8.0, 12.0])
def test_twist_beyond_limits_is_rejected(twist_db: float) -> None:
    """Q.24 limits: 8 dB normal twist (high group weaker), 4 dB reverse."""
    assert detect(pcm(twisted(twist_db, -14.0)), 8000) == []


@pytest.mark.parametrize("twist_db", [-8.0, 12.0])
def test_twisted_material_is_real_dtmf_with_that_twist(twist_db: float, tmp_path: Path) -> None:
    """sox measures each group through its own filter; multimon-ng (whose twist limits are
    tighter than Q.24's) decodes the same keys from the same generator without twist."""
    samples = pcm(twisted(twist_db, -14.0))
    low_group = sox_rms_db(samples, 8000, tmp_path, "sinc", "-1000")
    high_group = sox_rms_db(samples, 8000, tmp_path, "sinc", "1100")
    assert abs(low_group - high_group - twist_db) <= 0.5
    assert multimon_digits(pcm(twisted(0.0, -14.0)), 8000, tmp_path) == KEYPAD


def test_quiet_tones_are_accepted_and_faint_ones_rejected() -> None:
    x, _ = keyed(KEYPAD, 8000)  # -10 dBFS per tone
    assert digits_of(detect(pcm(x * 10 ** (-23 / 20)), 8000)) == KEYPAD  # -33 dBFS
    assert detect(pcm(x * 10 ** (-30 / 20)), 8000) == []  # -40 dBFS


# --- key press timing --------------------------------------------------------------


def test_held_key_is_reported_once_with_its_duration() -> None:
    x = np.concatenate((np.zeros(800), dual_tone("7", 2.0, 8000), np.zeros(800)))
    detector = DtmfDetector(8000)
    events = detector.process(pcm(with_noise(x, 15.0, 3)), 0)
    assert [(e.digit, e.duration) for e in events] == [("7", 0)]
    ended = detector.pop_ended()
    assert [e.digit for e in ended] == ["7"] and ended[0].pts == events[0].pts
    assert abs(ended[0].duration - 16000) <= 80  # within 10 ms of 2 s
    assert detector.pop_ended() == []


def test_tone_end_is_reported_for_every_key() -> None:
    x, onsets = keyed(KEYPAD, 8000, tone_s=0.100, gap_s=0.050)
    detector = DtmfDetector(8000)
    detector.process(pcm(x), 0)
    ended = detector.pop_ended()
    assert digits_of(ended) == KEYPAD
    assert all(abs(e.pts + e.duration - (onset + 800)) <= 80 for e, onset in zip(ended, onsets))


def test_a_short_interruption_does_not_repeat_the_key() -> None:
    x = np.concatenate((np.zeros(400), dual_tone("9", 0.1, 8000), np.zeros(80), dual_tone("9", 0.1, 8000),
                        np.zeros(400)))
    assert digits_of(detect(pcm(x), 8000)) == "9"


def test_repeated_key_needs_and_gets_a_gap() -> None:
    x, onsets = keyed("55##00", 8000)
    events = detect(pcm(x), 8000)
    assert digits_of(events) == "55##00"
    assert_onsets(events, onsets, 8000)


def test_key_change_without_a_gap() -> None:
    x = np.concatenate((np.zeros(400), dual_tone("1", 0.08, 8000), dual_tone("D", 0.08, 8000), np.zeros(400)))
    events = detect(pcm(x), 8000)
    assert digits_of(events) == "1D"
    assert_onsets(events, [400, 1040], 8000)


# --- streaming -----------------------------------------------------------------------


def random_chunks(n: int, seed: int) -> list[tuple[int, int]]:
    """Chunk boundaries mixing single samples, RTP-sized packets and long stretches."""
    rng = np.random.default_rng(seed)
    bounds, start = [], 0
    while start < n:
        size = int(rng.choice([rng.integers(1, 4), rng.integers(60, 400), rng.integers(400, 5000)]))
        bounds.append((start, min(start + size, n)))
        start += size
    return bounds


@pytest.mark.parametrize("rate", [8000, 48000])
@pytest.mark.parametrize("seed", range(3))
def test_chunking_does_not_change_the_events(rate: int, seed: int) -> None:
    x, _ = keyed(KEYPAD + "55", rate, tone_s=0.041, gap_s=0.039)
    x = np.concatenate((x, dual_tone("#", 0.5, rate), x[: rate // 5]))
    samples = pcm(with_noise(x, 15.0, seed))
    whole = DtmfDetector(rate)
    expected = whole.process(samples, 1000)
    expected_ended = whole.pop_ended()
    chunked = DtmfDetector(rate)
    events: list[DtmfEvent] = []
    for start, stop in random_chunks(len(samples), seed):
        events += chunked.process(samples[start:stop], 1000 + start)
    assert digits_of(expected) == KEYPAD + "55#1"
    assert events == expected
    assert chunked.pop_ended() == expected_ended


def test_a_gap_on_the_timeline_ends_the_key_and_restarts() -> None:
    detector = DtmfDetector(8000)
    tone = pcm(dual_tone("3", 0.2, 8000))
    first = detector.process(tone, 0)
    second = detector.process(tone, 40000)  # 5 s later: a new press
    assert [(e.digit, e.pts) for e in first] == [("3", 0)]
    assert [(e.digit, e.pts) for e in second] == [("3", 40000)]
    assert [e.digit for e in detector.pop_ended()] == ["3"]


def test_reset_forgets_the_key_in_progress() -> None:
    detector = DtmfDetector(8000)
    tone = pcm(dual_tone("8", 0.4, 8000))
    assert digits_of(detector.process(tone[:1600], 0)) == "8"
    detector.reset()
    again = detector.process(tone[1600:], 1600)  # the same tone, heard afresh
    assert [(e.digit, e.pts) for e in again] == [("8", 1600)]
    assert detector.pop_ended() == []


def test_rate_too_low_for_dtmf_is_refused() -> None:
    with pytest.raises(ValueError, match="rate 3000 Hz cannot carry DTMF tones"):
        DtmfDetector(3000)
