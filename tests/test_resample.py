"""The streaming resampler: exact lengths, chunk invariance, response and delay."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mediaserver.codecs.resample import GROUP_DELAY_S, Resampler

RATES = (8000, 16000, 48000)
DIRECTIONS = list(itertools.product(RATES, RATES))
CONVERSIONS = [(a, b) for a, b in DIRECTIONS if a != b]
DECIMATIONS = [(a, b) for a, b in DIRECTIONS if a > b]
INTERPOLATIONS = [(a, b) for a, b in DIRECTIONS if a < b]


def tone(freq: float, rate: int, seconds: float, amplitude: float = 16000.0) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    return np.round(amplitude * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def amplitude_at(samples: np.ndarray, freq: float, rate: int) -> float:
    """Amplitude of the `freq` component, by least squares on a sine and a cosine."""
    t = np.arange(len(samples)) / rate
    basis = np.column_stack((np.sin(2 * np.pi * freq * t), np.cos(2 * np.pi * freq * t)))
    coef, *_ = np.linalg.lstsq(basis, samples.astype(np.float64), rcond=None)
    return float(np.hypot(*coef))


def rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(samples.astype(np.float64) ** 2)))


def settled(samples: np.ndarray, rate: int) -> np.ndarray:
    """Drop the first 10 ms (the filter filling up) and the last 10 ms."""
    return samples[rate // 100 : len(samples) - rate // 100]


def run_in_chunks(resampler: Resampler, samples: np.ndarray, sizes: list[int]) -> np.ndarray:
    out, start = [], 0
    for size in itertools.cycle(sizes):
        if start >= len(samples):
            break
        out.append(resampler.process(samples[start : start + size]))
        start += size
    return np.concatenate(out)


@pytest.mark.parametrize(("in_rate", "out_rate"), DIRECTIONS)
def test_output_length_is_exact_for_20ms_chunks(in_rate: int, out_rate: int) -> None:
    resampler = Resampler(in_rate, out_rate)
    chunk = tone(440, in_rate, 0.02)
    for _ in range(7):
        assert len(resampler.process(chunk)) == len(chunk) * out_rate // in_rate


@pytest.mark.parametrize(("in_rate", "out_rate"), DIRECTIONS)
def test_ragged_chunks_carry_the_remainder(in_rate: int, out_rate: int) -> None:
    resampler = Resampler(in_rate, out_rate)
    fed = produced = 0
    for size in [1, 0, 7, 5, 2, 13, 160, 3, 1, 1]:
        produced += len(resampler.process(np.zeros(size, dtype=np.int16)))
        fed += size
        assert produced == fed * out_rate // in_rate


@pytest.mark.parametrize(("in_rate", "out_rate"), DIRECTIONS)
def test_chunking_does_not_change_a_single_sample(in_rate: int, out_rate: int) -> None:
    rng = np.random.default_rng(in_rate + out_rate)
    # Full-scale noise also exercises the saturation path.
    samples = rng.integers(-32768, 32768, in_rate // 2).astype(np.int16)
    whole = Resampler(in_rate, out_rate).process(samples)
    for sizes in ([1], [0, 5, 1, 17, 2], [7, 160, 3, 959], list(rng.integers(0, 500, 40))):
        pieces = run_in_chunks(Resampler(in_rate, out_rate), samples, [int(s) for s in sizes])
        np.testing.assert_array_equal(pieces, whole)


@pytest.mark.parametrize(("in_rate", "out_rate"), DIRECTIONS)
def test_1khz_tone_keeps_its_amplitude(in_rate: int, out_rate: int) -> None:
    out = Resampler(in_rate, out_rate).process(tone(1000, in_rate, 0.5))
    gain_db = 20 * np.log10(amplitude_at(settled(out, out_rate), 1000, out_rate) / 16000)
    assert abs(gain_db) <= 0.5


@pytest.mark.parametrize(("in_rate", "out_rate"), CONVERSIONS)
def test_passband_is_flat_to_045_of_the_lower_rate(in_rate: int, out_rate: int) -> None:
    low = min(in_rate, out_rate)
    for fraction in (0.05, 0.2, 0.35, 0.45):
        freq = fraction * low
        out = Resampler(in_rate, out_rate).process(tone(freq, in_rate, 0.5))
        gain_db = 20 * np.log10(amplitude_at(settled(out, out_rate), freq, out_rate) / 16000)
        assert -0.5 <= gain_db <= 0.5, (freq, gain_db)


@pytest.mark.parametrize(("in_rate", "out_rate"), DECIMATIONS)
def test_tones_above_the_target_nyquist_are_rejected_by_50db(in_rate: int, out_rate: int) -> None:
    # From 0.6 x the target rate up to the source's Nyquist: a tone there would alias
    # into the output band; what is left of it must be 50 dB below the input.
    for fraction in (0.6, 0.75, 1.0, 2.0, 2.9):
        freq = fraction * out_rate
        if freq >= in_rate / 2:
            continue
        out = Resampler(in_rate, out_rate).process(tone(freq, in_rate, 0.5))
        rejection_db = 20 * np.log10(rms(tone(freq, in_rate, 0.5)) / max(rms(settled(out, out_rate)), 1e-3))
        assert rejection_db >= 50, (freq, rejection_db)


@pytest.mark.parametrize(("in_rate", "out_rate"), INTERPOLATIONS)
def test_images_of_an_interpolated_tone_are_50db_down(in_rate: int, out_rate: int) -> None:
    out = settled(Resampler(in_rate, out_rate).process(tone(1000, in_rate, 0.5)), out_rate)
    spectrum = np.abs(np.fft.rfft(out * np.hanning(len(out))))
    freqs = np.fft.rfftfreq(len(out), 1 / out_rate)
    wanted = spectrum[np.abs(freqs - 1000) < 50].max()
    images = spectrum[freqs > in_rate / 2].max()
    assert 20 * np.log10(wanted / images) >= 50


@pytest.mark.parametrize(("in_rate", "out_rate"), DIRECTIONS)
def test_group_delay_is_the_documented_one(in_rate: int, out_rate: int) -> None:
    resampler = Resampler(in_rate, out_rate)
    expected_delay = 0 if in_rate == out_rate else round(GROUP_DELAY_S * out_rate)
    assert resampler.delay == expected_delay
    assert resampler.delay_seconds <= 0.0015

    # A band-limited multitone sampled at both rates: the output must be the signal at
    # the output rate, shifted by `delay` samples.
    rng = np.random.default_rng(3)
    freqs = rng.uniform(100, 0.4 * min(in_rate, out_rate), 12)
    phases = rng.uniform(0, 2 * np.pi, 12)

    def multitone(rate: int) -> np.ndarray:
        t = np.arange(rate // 2) / rate
        return np.round(2000 * np.sin(2 * np.pi * np.outer(t, freqs) + phases).sum(axis=1)).astype(np.int16)

    out = resampler.process(multitone(in_rate)).astype(np.float64)
    reference = multitone(out_rate).astype(np.float64)[: out_rate // 4]
    lags = range(0, 3 * round(GROUP_DELAY_S * out_rate) + 3)
    measured = max(lags, key=lambda lag: float(np.dot(out[lag : lag + len(reference)], reference)))
    assert abs(measured - resampler.delay) <= 1

    aligned = out[resampler.delay : resampler.delay + len(reference)]
    error = max(float(np.sum((aligned - reference) ** 2)), 1.0)
    assert 10 * np.log10(np.sum(reference**2) / error) >= 35


@pytest.mark.parametrize(("in_rate", "out_rate"), CONVERSIONS)
def test_impulse_peaks_after_the_delay(in_rate: int, out_rate: int) -> None:
    resampler = Resampler(in_rate, out_rate)
    impulse = np.zeros(in_rate // 50, dtype=np.int16)
    at = 6 * max(in_rate // out_rate, 1)  # on the decimation grid
    impulse[at] = 20000
    out = resampler.process(impulse)
    assert int(np.argmax(np.abs(out))) == at * out_rate // in_rate + resampler.delay


def test_identity_returns_a_copy() -> None:
    samples = tone(440, 16000, 0.01)
    resampler = Resampler(16000, 16000)
    out = resampler.process(samples)
    np.testing.assert_array_equal(out, samples)
    assert out is not samples
    assert resampler.delay == 0


def test_reset_starts_from_silence() -> None:
    samples = tone(700, 8000, 0.05)
    resampler = Resampler(8000, 48000)
    first = resampler.process(samples)
    resampler.process(tone(300, 8000, 0.02))
    resampler.reset()
    np.testing.assert_array_equal(resampler.process(samples), first)


@pytest.mark.parametrize(("in_rate", "out_rate"), DIRECTIONS)
@pytest.mark.parametrize("length", [960, 961, 965])
def test_flush_returns_what_the_filter_held_back(in_rate: int, out_rate: int, length: int) -> None:
    samples = np.random.default_rng(11).integers(-20000, 20000, length).astype(np.int16)
    resampler = Resampler(in_rate, out_rate)
    streamed = np.concatenate((resampler.process(samples), resampler.flush()))
    # The same as converting the stream followed by enough silence, cut at the end of the
    # stream plus the delay.
    padded = np.concatenate((samples, np.zeros(in_rate // 100, dtype=np.int16)))
    expected_length = -(-length * out_rate // in_rate) + resampler.delay
    assert len(streamed) == expected_length
    np.testing.assert_array_equal(streamed, Resampler(in_rate, out_rate).process(padded)[:expected_length])
    # Flushing reset the stream.
    np.testing.assert_array_equal(resampler.process(samples), Resampler(in_rate, out_rate).process(samples))


def test_silence_stays_silent_and_dc_stays_dc() -> None:
    for in_rate, out_rate in CONVERSIONS:
        assert not Resampler(in_rate, out_rate).process(np.zeros(in_rate // 10, dtype=np.int16)).any()
        out = Resampler(in_rate, out_rate).process(np.full(in_rate // 10, 10000, dtype=np.int16))
        assert (settled(out, out_rate) == 10000).all()


@pytest.mark.parametrize(("in_rate", "out_rate"), [(44100, 8000), (8000, 22050), (16000, 12000)])
def test_unsupported_rates_are_refused(in_rate: int, out_rate: int) -> None:
    with pytest.raises(ValueError, match="unsupported sample rate"):
        Resampler(in_rate, out_rate)


@pytest.mark.parametrize("bad", [np.zeros(8, dtype=np.float64), np.zeros(8, dtype=np.int32), np.zeros((2, 4), dtype=np.int16)])
def test_process_takes_only_1d_int16(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="1-D int16"):
        Resampler(8000, 16000).process(bad)
