"""Where a recording ends: the earliest of max length, continuous silence and a finish key.

All positions are samples on the session timeline at the recording's rate. Silence is
judged in 20 ms frames of the recorded signal, so silence termination is exact to one
frame; the other reasons are exact to the sample (a finish key to its tone's onset).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mediaserver.dsp.levels import frame_dbfs

FRAME_MS = 20


@dataclass(slots=True)
class SilenceTracker:
    """Continuous-silence accounting over recorded (never paused) audio.

    Keeps the partial 20 ms frame between calls, so the verdict does not depend on how the
    audio was cut into blocks.
    """

    frame_len: int
    threshold_dbfs: float
    run: int = 0  # samples of silence that ended the last complete frame
    _carry: np.ndarray | None = None
    heard_sound: bool = False

    def feed(self, mono: np.ndarray) -> np.ndarray:
        """Per complete frame ending in this chunk: the silence run (samples) after it.

        Returns an int64 array with one entry per completed frame (0 where the frame was
        sound), and the offsets in `mono` where those frames end, as a (2, k) array.
        """
        carry = 0 if self._carry is None else len(self._carry)
        data = mono if not carry else np.concatenate((self._carry, mono))
        frames = len(data) // self.frame_len
        used = frames * self.frame_len
        self._carry = data[used:].copy() if used < len(data) else None
        if frames == 0:
            return np.empty((2, 0), dtype=np.int64)
        silent = frame_dbfs(data[:used], self.frame_len) < self.threshold_dbfs
        runs = _runs(silent, self.run // self.frame_len) * self.frame_len
        self.run = int(runs[-1])
        self.heard_sound = self.heard_sound or not silent.all()
        ends = np.arange(1, frames + 1, dtype=np.int64) * self.frame_len - carry
        return np.vstack((runs, ends))


def _runs(silent: np.ndarray, start_run: int) -> np.ndarray:
    """Length (in frames) of the silence run ending at each frame."""
    index = np.arange(1, len(silent) + 1)
    last_sound = np.maximum.accumulate(np.where(silent, 0, index))
    runs = index - last_sound
    # Frames before the first sound of this chunk continue the previous run.
    runs = np.where(last_sound == 0, runs + start_run, runs)
    return runs.astype(np.int64)


def first_silence_end(runs_and_ends: np.ndarray, timeout: int) -> int | None:
    """Offset where the silence run first reaches `timeout` samples, if it does."""
    if runs_and_ends.shape[1] == 0:
        return None
    hits = np.nonzero(runs_and_ends[0] >= timeout)[0]
    if len(hits) == 0:
        return None
    return int(runs_and_ends[1, hits[0]])


def mono_view(mix: np.ndarray) -> np.ndarray:
    """A mono signal to judge levels on: the mix itself, or the louder-safe sum of stereo."""
    if mix.ndim == 1:
        return mix
    return np.clip(mix.astype(np.int32).sum(axis=1), -32768, 32767).astype(np.int16)
