"""The frame types every stage speaks: ingest produces them, the mixer consumes them.

Time is counted in samples. A frame's `pts` is the index of its first sample on its
session's timeline at the frame's own `rate`: `pts / rate` seconds after the session began.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SUPPORTED_RATES = (8000, 16000, 48000)
DTMF_DIGITS = "0123456789*#ABCD"


@dataclass(frozen=True, slots=True)
class PcmFrame:
    """Mono signed 16-bit audio from one leg. A frame whose `pts` is None carries no time
    of its own (a stream counted in samples): it follows the leg's previous audio."""

    samples: np.ndarray  # int16, shape (n,)
    rate: int
    pts: int | None
    leg: str = ""

    def __post_init__(self) -> None:
        if self.samples.dtype != np.int16 or self.samples.ndim != 1:
            raise ValueError("PcmFrame samples must be a 1-D int16 array")

    @property
    def end(self) -> int:
        if self.pts is None:
            raise ValueError("a counted frame has no position of its own")
        return self.pts + len(self.samples)

    @property
    def duration(self) -> float:
        return len(self.samples) / self.rate


@dataclass(frozen=True, slots=True)
class DtmfEvent:
    """A DTMF digit that began at `pts` (samples at `rate`) on the session timeline."""

    digit: str
    pts: int
    rate: int
    leg: str = ""
    duration: int = 0  # samples at `rate`; 0 when not yet known
    source: str = "inband"  # "inband" or "rfc4733"

    def __post_init__(self) -> None:
        if len(self.digit) != 1 or self.digit not in DTMF_DIGITS:
            raise ValueError(f"not a DTMF digit: {self.digit!r}")


def rescale(pts: int, from_rate: int, to_rate: int) -> int:
    """A sample position moved from one rate to another (rounded down)."""
    if from_rate == to_rate:
        return pts
    return pts * to_rate // from_rate
