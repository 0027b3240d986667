"""Benchmark audio: looped espeak-ng speech as G.711 µ-law legs, decoding, alignment and SNR.

The legs are made once per length and kept in the work directory. Everything decoded for a
quality figure goes through the ffmpeg CLI, so the engine is judged by a decoder that is
not its own.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

RATE = 8000
# Two talkers with different voices and words, so the legs are not correlated.
TALKERS = (
    ("en-us+f3", 165, "Thank you for calling customer support. Your call may be recorded for quality and training. "
                      "I can see the order you placed on the fourteenth; it left our warehouse yesterday afternoon and "
                      "should arrive by Thursday. Is there anything else I can help you with today?"),
    ("en-gb+m3", 150, "Good afternoon. My account number is four two seven nine, and I would like to ask about the "
                      "charges on my last bill. There is a payment of thirty two pounds that I do not recognise, and "
                      "the line was out of service for three days last week."),
)
LEVEL = 0.5  # -6 dB: telephony levels, and room for two talkers before the sum clips


def speech_legs(work: Path, seconds: int) -> tuple[Path, Path]:
    """Two mono 8 kHz µ-law files of `seconds` each (caller, callee), made on first use."""
    work.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, (voice, speed, text) in enumerate(TALKERS):
        path = work / f"leg{index}-{seconds}s.ul"
        if not path.exists():
            wav = work / f"talker{index}.wav"
            subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(wav), text], check=True)
            tmp = path.with_suffix(".tmp")
            subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-stream_loop", "-1", "-i", str(wav),
                            "-t", str(seconds), "-af", f"volume={LEVEL}", "-ar", str(RATE), "-ac", "1",
                            "-f", "mulaw", str(tmp)], check=True)
            tmp.replace(path)
        paths.append(path)
    return paths[0], paths[1]


def decode(path: Path, input_args: tuple[str, ...] = ()) -> np.ndarray:
    """Any file ffmpeg reads, as mono int16 at 8 kHz (`input_args` describe raw input)."""
    out = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", *input_args, "-i", str(path),
                          "-ac", "1", "-ar", str(RATE), "-f", "s16le", "-"], check=True, capture_output=True).stdout
    return np.frombuffer(out, dtype="<i2").astype(np.int16)


def decode_ulaw(path: Path) -> np.ndarray:
    return decode(path, ("-f", "mulaw", "-ar", str(RATE), "-ac", "1"))


def exact_mix(*legs: np.ndarray) -> np.ndarray:
    """The reference: the legs' int16 samples summed in int32 and clipped to int16."""
    total = np.zeros(max(len(leg) for leg in legs), dtype=np.int32)
    for leg in legs:
        total[: len(leg)] += leg
    return np.clip(total, -32768, 32767).astype(np.int16)


def best_lag(ref: np.ndarray, out: np.ndarray, max_lag: int) -> int:
    """The shift `lag` (|lag| <= max_lag) maximising sum(ref[n] * out[n + lag]), by FFT."""
    n = min(len(ref), len(out))
    a = ref[:n].astype(np.float64)
    b = out[: n + max_lag].astype(np.float64) if len(out) > n else out[:n].astype(np.float64)
    size = 1 << int(np.ceil(np.log2(len(a) + len(b))))
    corr = np.fft.irfft(np.conj(np.fft.rfft(a, size)) * np.fft.rfft(b, size), size)
    lags = np.arange(-max_lag, max_lag + 1)
    return int(lags[np.argmax(corr[lags % size])])


def aligned_snr(ref: np.ndarray, out: np.ndarray, max_lag: int = 2000) -> dict:
    """Align `out` to `ref` by cross-correlation, then SNR (dB) of out against ref.

    `snr_db` is None when the two are identical over the compared span (exact).
    """
    lag = best_lag(ref, out, max_lag)
    shifted = out[lag:] if lag >= 0 else np.concatenate((np.zeros(-lag, dtype=out.dtype), out))
    n = min(len(ref), len(shifted))
    signal = ref[:n].astype(np.float64)
    noise = signal - shifted[:n].astype(np.float64)
    noise_energy = float(np.dot(noise, noise))
    snr = None if noise_energy == 0 else 10 * np.log10(float(np.dot(signal, signal)) / noise_energy)
    return {"lag": lag, "snr_db": snr, "exact": noise_energy == 0, "compared": n,
            "length_diff": len(out) - lag - len(ref)}
