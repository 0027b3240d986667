"""Frame levels in dBFS, whole and streamed; sox stats is the reference."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from mediaserver.dsp.levels import SILENCE_FLOOR_DBFS, LevelMeter, frame_dbfs


def sine(dbfs: float, seconds: float, rate: int = 8000, hz: float = 1000.0) -> np.ndarray:
    n = np.arange(round(seconds * rate))
    amplitude = 32768 * np.sqrt(2) * 10 ** (dbfs / 20)
    return np.round(amplitude * np.sin(2 * np.pi * hz * n / rate)).astype(np.int16)


def sox_rms_db(samples: np.ndarray, rate: int, tmp_path: Path) -> float:
    """The "RMS lev dB" that `sox ... -n stats` reports for int16 `samples`."""
    source = tmp_path / "level.raw"
    samples.astype("<i2").tofile(source)
    raw = ["-t", "raw", "-e", "signed", "-b", "16", "-c", "1", "-r", str(rate)]
    report = subprocess.run(["sox", *raw, str(source), "-n", "stats"], check=True, capture_output=True,
                            text=True).stderr
    return float(next(line for line in report.splitlines() if line.startswith("RMS lev dB")).split()[-1])


def test_full_scale_sine_is_minus_3_dbfs() -> None:
    n = np.arange(8000)
    full = np.round(32767 * np.sin(2 * np.pi * 1000 * n / 8000 + 0.3)).astype(np.int16)
    assert frame_dbfs(full, 160) == pytest.approx(np.full(50, -3.0103), abs=0.01)


def test_full_scale_square_is_0_dbfs() -> None:
    square = np.tile(np.array([-32768, -32768, 32767, 32767], dtype=np.int16), 40)
    assert frame_dbfs(square, 160) == pytest.approx([0.0], abs=0.001)


@pytest.mark.parametrize("dbfs", [-6.0, -20.0, -45.0, -70.0])
def test_sine_levels(dbfs: float) -> None:
    assert frame_dbfs(sine(dbfs, 1.0), 160) == pytest.approx(np.full(50, dbfs), abs=0.05)


def test_levels_agree_with_sox(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    for gain in (300.0, 3000.0, 12000.0):
        noise = np.clip(rng.normal(0, gain, 16000), -32768, 32767).astype(np.int16)
        assert frame_dbfs(noise, len(noise))[0] == pytest.approx(sox_rms_db(noise, 8000, tmp_path), abs=0.01)


def test_one_level_per_frame_and_the_partial_frame_ignored() -> None:
    samples = np.concatenate((sine(-10.0, 0.02), np.zeros(160, dtype=np.int16), sine(-30.0, 0.015)))
    levels = frame_dbfs(samples, 160)
    assert levels == pytest.approx([-10.0, SILENCE_FLOOR_DBFS], abs=0.05)


def test_digital_silence_is_the_floor_without_warnings() -> None:
    levels = frame_dbfs(np.zeros(480, dtype=np.int16), 160)  # log10(0) would warn, and warnings fail
    assert levels.tolist() == [SILENCE_FLOOR_DBFS] * 3
    assert frame_dbfs(np.array([1] + [0] * 159, dtype=np.int16), 160)[0] == pytest.approx(-112.35, abs=0.01)


def test_no_complete_frame_gives_no_level() -> None:
    assert frame_dbfs(np.zeros(159, dtype=np.int16), 160).shape == (0,)
    assert frame_dbfs(np.zeros(0, dtype=np.int16), 160).shape == (0,)


@pytest.mark.parametrize("frame_len", [0, -160])
def test_frame_length_must_be_positive(frame_len: int) -> None:
    with pytest.raises(ValueError, match=f"frame_len must be positive, got {frame_len}"):
        frame_dbfs(np.zeros(160, dtype=np.int16), frame_len)
    with pytest.raises(ValueError, match=f"frame_len must be positive, got {frame_len}"):
        LevelMeter(frame_len)


def test_meter_levels_do_not_depend_on_chunking() -> None:
    rng = np.random.default_rng(9)
    samples = (rng.normal(0, 1, 48000) * np.linspace(10, 20000, 48000)).astype(np.int16)
    meter = LevelMeter(320)
    pieces, start = [], 0
    while start < len(samples):
        size = int(rng.choice([1, 7, 160, 333, 5000]))
        pieces.append(meter.process(samples[start : start + size]))
        start += size
    assert np.array_equal(np.concatenate(pieces), frame_dbfs(samples, 320))
    assert len(np.concatenate(pieces)) == 150


def test_meter_reset_drops_the_partial_frame() -> None:
    meter = LevelMeter(160)
    assert meter.process(sine(-10.0, 0.01)).shape == (0,)  # 80 samples held back
    meter.reset()
    assert meter.process(np.zeros(160, dtype=np.int16)).tolist() == [SILENCE_FLOOR_DBFS]
