"""Audio levels in dBFS, for silence termination and silence trimming.

A level is the RMS of a frame relative to full scale: ``20 * log10(rms / 32768)``. A
full-scale square wave is 0 dBFS and a full-scale sine -3.01 dBFS. Digital silence (an
all-zero frame) has no logarithm; it is reported as ``SILENCE_FLOOR_DBFS`` (-120 dBFS),
so levels stay finite for comparisons, averages and JSON. Non-zero frames of telephony
length sit above that floor (a single ±1 sample in a 20 ms frame at 8 kHz is -112 dBFS);
the floor only clamps near-silent frames longer than about 930 samples, far below any
useful silence threshold.
"""

from __future__ import annotations

import numpy as np

SILENCE_FLOOR_DBFS = -120.0
_FULL_SCALE = 32768.0


def frame_dbfs(samples: np.ndarray, frame_len: int) -> np.ndarray:
    """RMS level in dBFS of each complete `frame_len`-sample frame of int16 `samples`.

    A trailing partial frame is ignored; :class:`LevelMeter` carries it over instead.
    """
    if frame_len <= 0:
        raise ValueError(f"frame_len must be positive, got {frame_len}")
    count = len(samples) // frame_len
    frames = np.asarray(samples[: count * frame_len], dtype=np.float64).reshape(count, frame_len)
    mean_square = np.einsum("ij,ij->i", frames, frames) / frame_len
    floor = _FULL_SCALE**2 * 10 ** (SILENCE_FLOOR_DBFS / 10)
    return 10 * np.log10(np.maximum(mean_square, floor) / _FULL_SCALE**2)


class LevelMeter:
    """Frame levels of a stream that arrives in chunks of any length.

    Samples left over after the last complete frame are kept for the next chunk, so
    the levels are the same however the stream is cut.
    """

    def __init__(self, frame_len: int) -> None:
        if frame_len <= 0:
            raise ValueError(f"frame_len must be positive, got {frame_len}")
        self.frame_len = frame_len
        self._rest = np.zeros(0, dtype=np.int16)

    def process(self, samples: np.ndarray) -> np.ndarray:
        """Levels (dBFS) of the frames this chunk completes, oldest first."""
        data = np.concatenate((self._rest, np.asarray(samples, dtype=np.int16)))
        whole = len(data) - len(data) % self.frame_len
        self._rest = data[whole:]
        return frame_dbfs(data[:whole], self.frame_len)

    def reset(self) -> None:
        """Drop any partial frame."""
        self._rest = np.zeros(0, dtype=np.int16)
