"""Streaming sample-rate conversion between 8000, 16000 and 48000 Hz.

Every supported pair has an integer ratio, so each direction is either an L-fold
interpolator or an M-fold decimator around one linear-phase low-pass prototype: a
Kaiser-windowed sinc running at the higher of the two rates with its -6 dB point at half
the lower rate. The prototype spans 3 ms whatever the rates, which fixes the transition
band at about 1 kHz and the group delay at `GROUP_DELAY_S` (1.5 ms) in every direction.
With beta 5 the response is within 0.35 dB up to 0.45 x the lower rate and at least 50 dB
down from 0.57 x (8 kHz side) or 0.54 x (16 kHz side) the lower rate upwards.

Exactness: the taps are rounded to integers scaled by 2**_TAP_BITS and the samples are
int16, so every product and every partial sum is an integer far below 2**53. The float64
matrix products that do the work are therefore exact whatever order BLAS adds in, and
the output does not depend on how the input was cut into chunks.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from mediaserver.media import SUPPORTED_RATES

GROUP_DELAY_S = 0.0015
_KAISER_BETA = 5.0
_TAP_BITS = 20  # 32768 * 2**20 * sum(|taps|) stays below 2**40, far from 2**53


def _prototype(high_rate: int, low_rate: int, gain: int) -> np.ndarray:
    """Integer taps of the low-pass at `high_rate` cutting at `low_rate` / 2, DC gain `gain`."""
    half = round(GROUP_DELAY_S * high_rate)
    n = np.arange(-half, half + 1)
    cutoff = low_rate / high_rate  # of the high rate's Nyquist band
    taps = np.sinc(cutoff * n) * np.kaiser(2 * half + 1, _KAISER_BETA)
    taps *= gain / taps.sum()
    return np.round(taps * 2.0**_TAP_BITS)


def _unity_dc(taps: np.ndarray) -> np.ndarray:
    """Nudge each column's largest tap so the column sums to exactly 1.0 (2**_TAP_BITS).

    Rounding leaves the sums a few units off; for an interpolator the phases would then
    disagree on DC and a constant input would come out with a faint ripple at the input
    rate. Exact sums make a constant input come out exactly constant.
    """
    taps = taps.copy()
    biggest = np.argmax(np.abs(taps), axis=0)
    columns = np.arange(taps.shape[1])
    taps[biggest, columns] += 2.0**_TAP_BITS - taps.sum(axis=0)
    return taps


def _to_int16(acc: np.ndarray) -> np.ndarray:
    """Scale exact integer accumulators back, rounding half up, and saturate to int16."""
    scaled = np.floor(acc * 2.0**-_TAP_BITS + 0.5)
    return np.clip(scaled, -32768, 32767).astype(np.int16)


class Resampler:
    """A stateful converter for one stream: feed chunks in order, get seamless output.

    `process()` returns exactly `len(chunk) * out_rate // in_rate` samples whenever the
    chunks fed so far all had lengths that are multiples of `in_rate // out_rate`; when
    decimating, leftover input is carried into the next call. `delay` is the constant group
    delay in output samples (`delay_seconds` in seconds): an input event at time t shows up
    at t + delay_seconds. `flush()` ends a stream and returns what the filter still holds.
    """

    def __init__(self, in_rate: int, out_rate: int) -> None:
        for rate in (in_rate, out_rate):
            if rate not in SUPPORTED_RATES:
                raise ValueError(f"unsupported sample rate {rate}; expected one of {SUPPORTED_RATES}")
        self.in_rate = in_rate
        self.out_rate = out_rate
        self.up = max(out_rate // in_rate, 1)
        self.down = max(in_rate // out_rate, 1)
        identity = in_rate == out_rate
        self.delay = 0 if identity else round(GROUP_DELAY_S * out_rate)
        self.delay_seconds = self.delay / out_rate
        if identity:
            self._taps = np.ones((1, 1))
        elif self.up > 1:
            self._taps = self._polyphase(_prototype(out_rate, in_rate, self.up))
        else:
            self._taps = _unity_dc(_prototype(in_rate, out_rate, 1)[::-1, None])[:, 0]
        self.reset()

    def _polyphase(self, taps: np.ndarray) -> np.ndarray:
        """Matrix whose column p holds the taps that make output phase p of each input.

        Row j multiplies input n - (rows - 1 - j), so a window of the latest `rows` inputs
        in time order times this matrix gives outputs n*L .. n*L + L-1 in one product.
        """
        rows = -(-len(taps) // self.up)
        padded = np.zeros(rows * self.up)
        padded[: len(taps)] = taps
        return _unity_dc(padded.reshape(rows, self.up)[::-1])

    def reset(self) -> None:
        """Forget the stream: the next chunk starts from silence, as after construction."""
        self._history = np.zeros(len(self._taps) - 1)

    def process(self, samples: np.ndarray) -> np.ndarray:
        """Convert the next chunk of a stream (1-D int16) and return int16 output."""
        if samples.dtype != np.int16 or samples.ndim != 1:
            raise ValueError("Resampler.process() takes a 1-D int16 array")
        if self.in_rate == self.out_rate or not len(samples):
            return samples.copy()
        buf = np.concatenate((self._history, samples))
        if self.up > 1:
            return self._interpolate(buf)
        return self._decimate(buf)

    def flush(self) -> np.ndarray:
        """End the stream: the output still held back by the filter, then `reset()`.

        That is the last `delay` samples, plus one for a partial group of inputs carried
        by a decimator, as if the stream had been followed by silence.
        """
        if self.in_rate == self.out_rate:
            return np.empty(0, dtype=np.int16)
        carried = len(self._history) - (len(self._taps) - 1)
        if self.up > 1:
            tail = self.process(np.zeros(-(-self.delay // self.up), dtype=np.int16))[: self.delay]
        else:
            tail = self.process(np.zeros(self.delay * self.down + -carried % self.down, dtype=np.int16))
        self.reset()
        return tail

    def _interpolate(self, buf: np.ndarray) -> np.ndarray:
        windows = sliding_window_view(buf, len(self._taps))
        self._history = buf[len(buf) - len(self._taps) + 1 :]
        return _to_int16(np.ascontiguousarray(windows) @ self._taps).reshape(-1)

    def _decimate(self, buf: np.ndarray) -> np.ndarray:
        # Output n needs inputs up to n*M; it is produced once n*M + M-1 has arrived, so
        # whole groups of M inputs map to one output and a partial group is carried.
        width = len(self._taps)
        count = (len(buf) - width + 1) // self.down
        if count == 0:
            self._history = buf
            return np.empty(0, dtype=np.int16)
        windows = sliding_window_view(buf, width)[: count * self.down : self.down]
        self._history = buf[count * self.down :]
        return _to_int16(np.ascontiguousarray(windows) @ self._taps)
