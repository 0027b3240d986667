"""The mixer's timeline: every leg's audio placed by timestamp, read out in aligned blocks.

Frames are placed where their `pts` says, never shifted: a leg that joins late has silence
before it, one that leaves early has silence after it, and a gap inside a leg is filled
with silence and counted. Audio that arrives for a position already read out is late and
dropped (counted), so the output never moves in time.

Who decides how far to read is the caller: `ready_until()` is as far as every leg that is
still sending has delivered; a live session reads further than that once a deadline
passes (bounded silence fill for a lagging leg), an offline one never does.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from mediaserver.media import PcmFrame


@dataclass(slots=True)
class LegStats:
    frames: int = 0
    samples: int = 0
    late_samples: int = 0  # arrived after their position was mixed
    overlap_samples: int = 0  # arrived for a position the leg had already filled


@dataclass(slots=True)
class BlockLeg:
    """One leg's audio for a block, and which parts of it were real audio."""

    leg_id: str
    role: str
    samples: np.ndarray
    spans: list[tuple[int, int]]  # absolute [start, end) of each frame that landed here
    live_from: int  # first position at which this leg had joined (its first frame)
    live_until: int | None  # where it ended, None while still going


@dataclass(slots=True)
class Block:
    start: int
    end: int
    legs: list[BlockLeg] = field(default_factory=list)

    def __len__(self) -> int:
        return self.end - self.start


class LegBuffer:
    """Frames of one leg waiting to be read, in timeline order."""

    def __init__(self, leg_id: str, role: str, joined_at: int, totals: LegStats | None = None) -> None:
        self.leg_id = leg_id
        self.role = role
        self.stats = LegStats()
        self._totals = totals if totals is not None else LegStats()
        self.joined_at = joined_at
        self.first_pts: int | None = None
        # Until its first frame a leg has "delivered" up to where it joined, which keeps a
        # fast stream from running ahead of a leg that has announced itself but not sent yet.
        self.write_pos = joined_at
        self.ended_at: int | None = None
        self._chunks: deque[tuple[int, np.ndarray]] = deque()

    @property
    def ended(self) -> bool:
        return self.ended_at is not None

    def push(self, samples: np.ndarray, pts: int, read_pos: int) -> None:
        """Place audio at `pts`. Late parts (before `read_pos`) and parts that overlap audio
        already placed are dropped and counted; a frame that arrives out of order but before
        its position was read lands in its gap, which is what makes reordering free."""
        if self.ended:
            return
        if pts < read_pos:
            late = min(pts + len(samples), read_pos) - pts
            self.stats.late_samples += late
            self._totals.late_samples += late
            if late == len(samples):
                return
            samples, pts = samples[late:], read_pos
        if self.first_pts is None or pts >= self.write_pos:
            self._accept(samples, pts)
            self._chunks.append((pts, samples))
            self.write_pos = pts + len(samples)
            return
        self._insert(samples, pts)

    def _accept(self, samples: np.ndarray, pts: int) -> None:
        self.stats.frames += 1
        self.stats.samples += len(samples)
        if self.first_pts is None or pts < self.first_pts:
            self.first_pts = pts

    def _insert(self, samples: np.ndarray, pts: int) -> None:
        """An out-of-order frame: keep only what falls into gaps between placed chunks."""
        end = pts + len(samples)
        index = bisect.bisect_right(self._chunks, pts, key=lambda chunk: chunk[0])
        lo = pts
        if index > 0:
            prev_pts, prev = self._chunks[index - 1]
            lo = max(lo, prev_pts + len(prev))
        hi = self._chunks[index][0] if index < len(self._chunks) else end
        hi = min(hi, end)
        overlap = len(samples) - max(hi - lo, 0)
        self.stats.overlap_samples += overlap
        self._totals.overlap_samples += overlap
        if hi <= lo:
            return
        self._accept(samples[lo - pts:hi - pts], lo)
        self._chunks.insert(index, (lo, samples[lo - pts:hi - pts]))
        # Past the newest chunk it delivers, so what comes next must not land on it.
        self.write_pos = max(self.write_pos, hi)

    def end(self, at: int) -> None:
        if not self.ended:
            self.ended_at = max(at, self.write_pos)

    def read(self, start: int, end: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """Samples for [start, end) with zeros where nothing arrived, and the covered spans."""
        out = np.zeros(end - start, dtype=np.int16)
        spans: list[tuple[int, int]] = []
        chunks = self._chunks
        while chunks and chunks[0][0] < end:
            pts, samples = chunks[0]
            stop = pts + len(samples)
            lo, hi = max(pts, start), min(stop, end)
            if hi > lo:
                out[lo - start:hi - start] = samples[lo - pts:hi - pts]
                spans.append((lo, hi))
            if stop <= end:
                chunks.popleft()
            else:
                chunks[0] = (end, samples[end - pts:])
                break
        return out, spans


class Mixer:
    """All legs of one session at one sample rate, read out in aligned blocks."""

    def __init__(self, rate: int, start: int = 0) -> None:
        self.rate = rate
        self.cursor = start
        self.legs: dict[str, LegBuffer] = {}
        self.totals = LegStats()  # drops of every leg this mixer has had

    def add_leg(self, leg_id: str, role: str, at: int | None = None) -> LegBuffer:
        """A leg that joins at timeline position `at` (the cursor when not given)."""
        if leg_id in self.legs:
            raise ValueError(f"leg {leg_id} already exists")
        leg = self.legs[leg_id] = LegBuffer(leg_id, role, max(self.cursor if at is None else at, self.cursor), self.totals)
        return leg

    def push(self, frame: PcmFrame) -> None:
        if frame.rate != self.rate:
            raise ValueError(f"frame at {frame.rate} Hz pushed into a {self.rate} Hz mixer")
        self.legs[frame.leg].push(frame.samples, frame.pts, self.cursor)

    def end_leg(self, leg_id: str, at: int | None = None) -> None:
        leg = self.legs[leg_id]
        leg.end(max(self.cursor, leg.write_pos) if at is None else at)

    def ready_until(self) -> int:
        """How far every leg that has not ended has delivered (all of it when all ended)."""
        going = [leg.write_pos for leg in self.legs.values() if not leg.ended]
        if going:
            return max(min(going), self.cursor)
        return self.written_until()

    def written_until(self) -> int:
        """The furthest position any leg has delivered."""
        return max([self.cursor] + [leg.write_pos for leg in self.legs.values()])

    def read(self, until: int) -> Block:
        """Every leg's audio for [cursor, until), aligned; the cursor moves to `until`."""
        until = max(until, self.cursor)
        block = Block(self.cursor, until)
        for leg in self.legs.values():
            samples, spans = leg.read(self.cursor, until)
            live_from = leg.first_pts if leg.first_pts is not None else until
            block.legs.append(BlockLeg(leg.leg_id, leg.role, samples, spans, live_from, leg.ended_at))
        self.cursor = until
        return block

    def drop_finished_legs(self) -> None:
        """Forget legs that ended before the cursor and have nothing left to read."""
        for leg_id in [k for k, leg in self.legs.items() if leg.ended and leg.ended_at <= self.cursor]:
            del self.legs[leg_id]
