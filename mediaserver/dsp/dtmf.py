"""In-band DTMF detection for decoded telephony audio.

Keys pressed on a phone reach us either as RFC 4733 telephone-events or, on WebSocket
streams and on G.711 RTP without telephone-events, only as tones inside the audio. This
module finds those tones: the dual-frequency signals of ITU-T Q.23, accepted and rejected
along the lines of the Q.24 reception limits.

The algorithm
-------------
The audio is cut into analysis blocks of about 12.75 ms (102 samples at 8 kHz, the block
length most software receivers use: long enough to separate neighbouring row tones, 73 Hz
apart, short enough for 40 ms tones), one block every half block. For every block the
Goertzel value, the DFT at exactly one frequency, is computed for the eight Q.23 tones.
Goertzel's recursion yields the same number as a dot product of the block with a cosine
and a sine at that frequency, so a chunk is analysed at once by one matrix product: its
half blocks (rows) against a table holding, for each tone, the cosine and sine over the
first and over the second half of a block. A block's value is the sum of its first
half's projection on the first-half table and its second half's on the second-half
table, so every sample is multiplied once per table entry.

Row tones are measured over the plain (rectangular) block: rows are only 0.93 DFT bins
apart, and any window would blur them together. Column tones are 1.6 bins or more apart
and are measured twice: through a Hann window, which keeps the row tone's sidelobes (the
row tone sits 3.4 bins or more away) from masking a column tone 8 dB weaker, and over the
plain block for the energy share below, which must weigh every sample alike.

A block names a key when all of these hold (each a Q.24-style limit, constants below):

* the strongest row tone and the strongest column tone are each above a minimum level;
* each is stronger than the other tones of its group by a margin;
* the twist (row power over column power) is within the normal and reverse limits;
* the two tones carry most of the block's energy, which also rejects blocks only partly
  filled by a tone, so short tones stay short. This is what rules out speech, music
  and noise, which spread their energy over many frequencies. It also stands in for a
  second-harmonic check: a voiced sound whose harmonics happen to fall on a row and a
  column tone has further harmonics that take their share of the energy. (A separate
  check would misfire on real keys, since the row harmonics at 1394, 1540 and 1704 Hz
  lie within one block bandwidth of the column tones.)

A key press is reported when ``ON_BLOCKS`` successive blocks name the same key. With half
overlapping blocks every tone of 35 ms or more is found, whatever its alignment to the
blocks, and no tone of 25 ms or less (Q.24: accept 40 ms, reject under about 23 ms). The
press ends when ``OFF_BLOCKS`` successive blocks do not name it, which takes a gap of
20 ms (Q.24 pauses are 40 ms or more; interruptions of up to 10 ms are bridged), or at
once when another key is confirmed. A held key is reported once.
"""

from __future__ import annotations

from functools import cache
from itertools import groupby

import numpy as np

from mediaserver.media import DtmfEvent

ROW_HZ = (697.0, 770.0, 852.0, 941.0)  # Q.23 low group
COL_HZ = (1209.0, 1336.0, 1477.0, 1633.0)  # Q.23 high group
KEYPAD = "123A456B789C*0#D"  # Q.23 keypad, row-major: KEYPAD[4 * row + col]

BLOCK_SECONDS = 102 / 8000
ON_BLOCKS = 4  # 4 blocks, half overlapping, span 31.9 ms
OFF_BLOCKS = 4

# Power estimates from one block are off by up to about 2 dB (the tone's negative-frequency
# image, leakage from the other tones, noise), so the level and twist limits below are
# applied with that allowance: tones right at a limit still operate.
_ALLOWANCE_DB = 2.0
# Q.24 receivers must operate down to about -27 dBm0 per tone; with G.711's 0 dBm0 at
# -6.2 dBFS (a full-scale sine is +3.17 dBm0) that is about -33 dBFS.
MIN_TONE_DBFS = -33.0
# Twist limits used by many Q.24 administrations: the high group may arrive up to 8 dB
# weaker than the low group ("normal" twist, line loss rises with frequency) and up to
# 4 dB stronger ("reverse" twist).
NORMAL_TWIST_DB = 8.0
REVERSE_TWIST_DB = 4.0
# The chosen tone must beat every other tone of its group by 8 dB.
RELATIVE_PEAK_DB = 8.0
# Share of the block energy the two tones must carry. Over nine minutes of espeak-ng speech
# (several voices and rates, much of it counting) no four successive blocks named one key
# above 0.6; a tone in white noise keeps 0.8 down to about 10 dB SNR.
TONE_TO_TOTAL = 0.80

_FULL_SCALE = 32768.0
_NO_KEY = -1


class DtmfDetector:
    """Streaming in-band DTMF detector for one leg.

    Feed consecutive chunks of int16 audio with :meth:`process`; each confirmed key press
    comes back once, as a :class:`DtmfEvent` whose ``pts`` is the start of the tone
    (within one analysis block) and whose ``duration`` is 0. When the tone has ended, the
    same event with its ``duration`` filled in is available from :meth:`pop_ended`.
    Results do not depend on how the stream is cut into chunks.
    """

    def __init__(self, rate: int, leg: str = "") -> None:
        if max(COL_HZ) >= rate / 2:
            raise ValueError(f"rate {rate} Hz cannot carry DTMF tones")
        self.rate = rate
        self.leg = leg
        self.hop = round(rate * BLOCK_SECONDS / 2)
        self.block = 2 * self.hop
        self._basis = _goertzel_basis(rate, self.block)
        self._min_tone = _FULL_SCALE**2 * _db(MIN_TONE_DBFS - _ALLOWANCE_DB)
        self._normal_twist = _db(NORMAL_TWIST_DB + _ALLOWANCE_DB)
        self._reverse_twist = _db(REVERSE_TWIST_DB + _ALLOWANCE_DB)
        self._relative_peak = _db(RELATIVE_PEAK_DB)
        self.reset()

    def reset(self) -> None:
        """Forget all audio, any key in progress and any ended key not yet popped."""
        self._buf = np.zeros(0, dtype=np.int16)  # starts at the next block to analyse
        self._buf_pts: int | None = None
        self._run_key = _NO_KEY  # the key of the latest run of identical blocks
        self._run_pts = 0
        self._run_len = 0
        self._held: DtmfEvent | None = None  # the key press in progress
        self._held_key = _NO_KEY
        self._held_end = 0
        self._misses = 0
        self._ended: list[DtmfEvent] = []

    def process(self, samples: np.ndarray, pts: int) -> list[DtmfEvent]:
        """Analyse a chunk whose first sample sits at `pts`; return key presses confirmed in it.

        Chunks are expected back to back. A chunk that does not start where the previous
        one ended (a gap or an overlap on the timeline) ends any key in progress and
        restarts the analysis at `pts`.
        """
        if self._buf_pts is None or pts != self._buf_pts + len(self._buf):
            self._restart(pts)
        self._buf = np.concatenate((self._buf, np.asarray(samples, dtype=np.int16)))
        count = len(self._buf) // self.hop - 1  # complete blocks in the buffer
        if count <= 0:
            return []
        keys = self._classify(self._buf[: (count + 1) * self.hop].reshape(count + 1, self.hop))
        events = self._advance(keys, self._buf_pts)
        self._buf = self._buf[count * self.hop :]
        self._buf_pts += count * self.hop
        return events

    def pop_ended(self) -> list[DtmfEvent]:
        """Key presses whose tone has ended since the last call, with `duration` set.

        A tone counts as ended once a gap has been seen (or another key confirmed); the
        duration runs from the event's `pts` to the end of the last block holding the tone.
        """
        ended, self._ended = self._ended, []
        return ended

    def _restart(self, pts: int) -> None:
        self._release()
        self._buf = np.zeros(0, dtype=np.int16)
        self._buf_pts = pts
        self._run_key = _NO_KEY
        self._run_len = 0

    def _classify(self, halves: np.ndarray) -> np.ndarray:
        """The key each block names, or -1; block i is halves i and i + 1.

        See the module docstring for the checks. The level and energy-share checks come
        first and on their own, since they alone settle silence and almost all speech.
        """
        power, energy = self._powers(halves)
        rows, cols = power[:, :4], power[:, 8:]  # power[:, 4:8]: plain-block columns
        row, col = rows.argmax(axis=1), cols.argmax(axis=1)
        picked = np.arange(len(power))
        row_p, col_p = rows[picked, row], cols[picked, col]
        ok = row_p + power[picked, 4 + col] >= TONE_TO_TOTAL * energy
        ok &= np.minimum(row_p, col_p) >= self._min_tone
        if not ok.any():
            return np.full(len(power), _NO_KEY)
        ok &= (row_p <= col_p * self._normal_twist) & (col_p <= row_p * self._reverse_twist)
        ok &= row_p >= self._relative_peak * np.sort(rows, axis=1)[:, -2]
        ok &= col_p >= self._relative_peak * np.sort(cols, axis=1)[:, -2]
        return np.where(ok, 4 * row + col, _NO_KEY)

    def _powers(self, halves: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per block: the 12 tone powers (rows, plain-block columns, Hann-window columns) and
        the block's mean-square energy.

        Both are in mean-square units, so a sine of amplitude A shows as A**2 / 2
        whatever the block length.
        """
        halves = halves.astype(np.float64)
        proj = halves @ self._basis
        spectrum = proj[:-1, :24] + proj[1:, 24:]
        spectrum *= spectrum
        half_energy = np.einsum("ij,ij->i", halves, halves)
        return spectrum[:, 0::2] + spectrum[:, 1::2], (half_energy[:-1] + half_energy[1:]) / self.block

    def _advance(self, keys: np.ndarray, first_pts: int) -> list[DtmfEvent]:
        """Run the per-block keys through the press/release state machine, run by run."""
        if self._held is None and self._run_key == _NO_KEY and keys.max() == _NO_KEY:
            return []  # no tone before or in this chunk: nothing changes
        events = []
        pts = first_pts
        for key, run in groupby(keys.tolist()):
            length = sum(1 for _ in run)
            event = self._run(key, pts, length)
            if event is not None:
                events.append(event)
            pts += length * self.hop
        return events

    def _run(self, key: int, pts: int, length: int) -> DtmfEvent | None:
        """Take `length` successive blocks naming `key` (-1: none), the first at `pts`.

        Returns the key press this run confirms: ON_BLOCKS successive blocks of a key
        that is not already held. A held key survives fewer than OFF_BLOCKS other blocks.
        """
        if key != self._run_key:
            self._run_key, self._run_pts, self._run_len = key, pts, 0
        self._run_len += length
        last_end = pts + (length - 1) * self.hop + self.block
        if self._held is not None and key == self._held_key:
            self._misses = 0
            self._held_end = last_end
            return None
        if self._held is not None:
            self._misses += length
            if self._misses >= OFF_BLOCKS:
                self._release()
        if key == _NO_KEY or self._run_len < ON_BLOCKS:
            return None
        self._release()
        self._held = DtmfEvent(KEYPAD[key], self._run_pts, self.rate, self.leg, source="inband")
        self._held_key, self._held_end, self._misses = key, last_end, 0
        return self._held

    def _release(self) -> None:
        """End the held key press, if any, and queue it for :meth:`pop_ended`."""
        if self._held is not None:
            held = self._held
            duration = self._held_end - held.pts
            self._ended.append(DtmfEvent(held.digit, held.pts, self.rate, self.leg, duration, "inband"))
        self._held = None
        self._held_key = _NO_KEY
        self._misses = 0


@cache
def _goertzel_basis(rate: int, block: int) -> np.ndarray:
    """The (block / 2, 48) projection table: first-half columns 0-23, second-half 24-47.

    Built once per rate and shared, read-only, by every detector at that rate.

    In each half, columns 2k and 2k + 1 are the cosine and sine of tone k: the 4 rows,
    the 4 columns, then the 4 columns again under a Hann window. Each pair is scaled by
    sqrt(2) / sum(window) so that its squared magnitude reads as the mean-square power of a
    sine (2 |X|^2 / N^2 for the plain block).
    """
    phase = 2 * np.pi * np.outer(np.arange(block), np.array(ROW_HZ + COL_HZ + COL_HZ)) / rate
    window = np.ones((block, 12))
    window[:, 8:] = np.hanning(block + 2)[1:-1, None]
    window *= np.sqrt(2) / window.sum(axis=0)
    table = np.empty((block, 24))
    table[:, 0::2] = np.cos(phase) * window
    table[:, 1::2] = np.sin(phase) * window
    half = block // 2
    basis = np.hstack((table[:half], table[half:]))
    basis.flags.writeable = False
    return basis


def _db(decibels: float) -> float:
    """A power ratio from decibels."""
    return 10 ** (decibels / 10)
