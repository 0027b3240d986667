"""Test audio, made here: numpy tones and noise, DTMF, espeak-ng speech; and ffprobe."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import numpy as np
import soundfile

DTMF_FREQS = {
    "1": (697, 1209), "2": (697, 1336), "3": (697, 1477), "A": (697, 1633),
    "4": (770, 1209), "5": (770, 1336), "6": (770, 1477), "B": (770, 1633),
    "7": (852, 1209), "8": (852, 1336), "9": (852, 1477), "C": (852, 1633),
    "*": (941, 1209), "0": (941, 1336), "#": (941, 1477), "D": (941, 1633),
}


def tone(freq: float, seconds: float, rate: int = 8000, dbfs: float = -12.0) -> np.ndarray:
    n = round(seconds * rate)
    amp = 32767 * 10 ** (dbfs / 20) * np.sqrt(2)
    return np.round(amp * np.sin(2 * np.pi * freq * np.arange(n) / rate)).astype(np.int16)


def dtmf(digit: str, seconds: float, rate: int = 8000, dbfs_per_tone: float = -10.0) -> np.ndarray:
    low, high = DTMF_FREQS[digit]
    n = round(seconds * rate)
    t = np.arange(n) / rate
    amp = 32767 * 10 ** (dbfs_per_tone / 20) * np.sqrt(2)
    return np.round(amp * (np.sin(2 * np.pi * low * t) + np.sin(2 * np.pi * high * t))).astype(np.int16)


def silence(seconds: float, rate: int = 8000) -> np.ndarray:
    return np.zeros(round(seconds * rate), dtype=np.int16)


def noise(seconds: float, rate: int = 8000, dbfs: float = -20.0, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    amp = 32767 * 10 ** (dbfs / 20)
    return np.clip(rng.normal(0, amp, round(seconds * rate)), -32768, 32767).astype(np.int16)


def speech(tmp: Path, text: str, rate: int = 8000, voice: str = "en-us", speed: int = 150) -> np.ndarray:
    """espeak-ng speech resampled by sox to `rate`, mono int16."""
    raw = tmp / f"espeak-{abs(hash((text, voice, speed)))}.wav"
    out = raw.with_suffix(f".{rate}.wav")
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(raw), text], check=True, capture_output=True)
    subprocess.run(["sox", str(raw), "-r", str(rate), "-c", "1", "-b", "16", str(out)], check=True, capture_output=True)
    data, _ = soundfile.read(out, dtype="int16")
    return data


def write_wav(path: Path, samples: np.ndarray, rate: int = 8000) -> Path:
    soundfile.write(path, samples, rate, subtype="PCM_16")
    return path


def read_audio(path: Path) -> tuple[np.ndarray, int]:
    """Any format ffmpeg reads, decoded to int16 (n, channels) at its own rate."""
    info = ffprobe(path)
    rate, channels = info["sample_rate"], info["channels"]
    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-f", "s16le", "-acodec", "pcm_s16le", "-ar", str(rate), "-"],
                         check=True, capture_output=True).stdout
    return np.frombuffer(raw, dtype="<i2").reshape(-1, channels), rate


def ffprobe(path: Path) -> dict:
    out = subprocess.run(["ffprobe", "-v", "error", "-print_format", "json", "-show_format", "-show_streams", str(path)],
                         check=True, capture_output=True, text=True).stdout
    data = json.loads(out)
    stream = data["streams"][0]
    start = float(stream.get("start_time", 0) or 0)
    return {
        # ffprobe counts an MP3's encoder delay in its duration and reports it as start_time.
        "duration": float(data["format"]["duration"]) - (start if stream["codec_name"] == "mp3" else 0.0),
        "sample_rate": int(stream["sample_rate"]),
        "channels": int(stream["channels"]),
        "codec": stream["codec_name"],
        "format": data["format"]["format_name"],
    }


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    n = min(len(a), len(b))
    a = a[:n].astype(np.float64)
    b = b[:n].astype(np.float64)
    denom = np.sqrt(np.dot(a, a) * np.dot(b, b))
    return float(np.dot(a, b) / denom) if denom else 0.0


def best_lag(a: np.ndarray, b: np.ndarray, max_lag: int) -> tuple[int, float]:
    """The shift of `b` against `a` (in samples, within ±max_lag) that correlates best."""
    best = (0, -1.0)
    for lag in range(-max_lag, max_lag + 1):
        if lag >= 0:
            c = correlation(a[lag:], b)
        else:
            c = correlation(a, b[-lag:])
        if c > best[1]:
            best = (lag, c)
    return best


class MemorySink:
    """An encoder's sink in memory (write and patch), read back as int16 PCM."""

    def __init__(self) -> None:
        self.buffer = io.BytesIO()

    def write(self, data: bytes) -> None:
        self.buffer.seek(0, io.SEEK_END)
        self.buffer.write(data)

    def patch(self, offset: int, data: bytes) -> None:
        self.buffer.seek(offset)
        self.buffer.write(data)

    def pcm(self) -> np.ndarray:
        self.buffer.seek(0)
        data, _ = soundfile.read(self.buffer, dtype="int16", always_2d=True)
        return data
