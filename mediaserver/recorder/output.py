"""The last stage before the encoder: a short hold-back, silence trimming and cuts.

Audio waits here for `hold` samples before it is encoded, because a finish key is only
recognised some tens of milliseconds after its tone began: the tone must be cut out of the
file, so the audio from its onset must not have been encoded yet. With `trim_silence`,
audio after the last sound also waits (bounded), so trailing silence can be dropped.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import numpy as np

from mediaserver.recorder.termination import SilenceTracker, mono_view


class OutputStage:
    """Recorded audio on its way to the encoder, in written-sample coordinates."""

    def __init__(
        self,
        emit: Callable[[np.ndarray], None],
        hold: int,
        trim: SilenceTracker | None = None,
        trim_tail_max: int = 0,
    ) -> None:
        self._emit = emit
        self._hold = hold
        self._trim = trim
        self._tail_max = trim_tail_max
        self._queue: deque[tuple[int, np.ndarray]] = deque()  # (timeline start, samples)
        self.written = 0  # samples appended (and not cut)
        self.consumed = 0  # written position up to which audio has left the queue
        self.encoded = 0  # samples handed to the encoder (consumed minus trimmed)
        self._sound_from: int | None = None  # written position where trimmed output starts
        self._sound_until = 0  # written position just after the last sound frame

    def append(self, timeline_pos: int, samples: np.ndarray) -> None:
        if len(samples) == 0:
            return
        if self._trim is not None:
            self._judge(samples)
        self._queue.append((timeline_pos, samples))
        self.written += len(samples)
        self._release(self.written - self._hold)

    def _judge(self, samples: np.ndarray) -> None:
        frames = self._trim.feed(mono_view(samples))
        if frames.shape[1] == 0:
            return
        sound_ends = frames[1][frames[0] == 0]
        if len(sound_ends) == 0:
            return
        if self._sound_from is None:
            self._sound_from = max(self.written + int(sound_ends[0]) - self._trim.frame_len, self.consumed)
        self._sound_until = self.written + int(sound_ends[-1])

    def _release(self, limit: int) -> None:
        """Hand the encoder everything before `limit` that trimming allows."""
        if self._trim is not None:
            if self._sound_from is None:
                # Before the first sound only the partial frame that may begin it is kept.
                self._discard(self.written - self._trim.frame_len)
                return
            self._discard(self._sound_from)
            limit = min(limit, max(self._sound_until, self.written - self._tail_max))
        while self._queue and self.consumed < limit:
            samples = self._take(limit)
            self._emit(samples)
            self.encoded += len(samples)

    def _discard(self, until: int) -> None:
        """Drop leading silence up to written position `until` without encoding it."""
        while self._queue and self.consumed < until:
            self._take(until)

    def _take(self, limit: int) -> np.ndarray:
        start, samples = self._queue[0]
        take = min(len(samples), limit - self.consumed)
        if take == len(samples):
            self._queue.popleft()
        else:
            self._queue[0] = (start + take, samples[take:])
        self.consumed += take
        return samples[:take]

    def cut(self, timeline_pos: int) -> int:
        """Drop queued audio at or after `timeline_pos`; returns how many samples went."""
        dropped = 0
        while self._queue:
            start, samples = self._queue[-1]
            if start >= timeline_pos:
                self._queue.pop()
                dropped += len(samples)
                continue
            keep = timeline_pos - start
            if keep < len(samples):
                self._queue[-1] = (start, samples[:keep])
                dropped += len(samples) - keep
            break
        self.written -= dropped
        self._sound_until = min(self._sound_until, self.written)
        return dropped

    def close(self) -> None:
        """Encode what is left (trailing silence dropped when trimming)."""
        if self._trim is not None and self._sound_from is None:
            self._discard(self.written)
            return
        limit = self._sound_until if self._trim is not None else self.written
        self._release(self.written if self._trim is None else limit)
        self._queue.clear()

