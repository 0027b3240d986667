"""Mixdown of aligned legs: mono (int32 sum, clip) or dual (caller left, others right)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_LOW, _HIGH = -32768, 32767


def select(roles: Sequence[str], participant: str) -> list[int]:
    """Indexes of the legs a recording of `participant` ("all", "caller", "callee") keeps."""
    if participant == "all":
        return list(range(len(roles)))
    return [i for i, role in enumerate(roles) if role == participant]


def _sum(tracks: Sequence[np.ndarray], n: int) -> np.ndarray:
    if not tracks:
        return np.zeros(n, dtype=np.int16)
    if len(tracks) == 1:
        return tracks[0]
    total = tracks[0].astype(np.int32)
    for track in tracks[1:]:
        total += track
    np.clip(total, _LOW, _HIGH, out=total)
    return total.astype(np.int16)


def mixdown(tracks: Sequence[np.ndarray], roles: Sequence[str], channels: int, participant: str, n: int) -> np.ndarray:
    """Aligned int16 tracks of length `n` mixed to shape (n,) for mono or (n, 2) for dual.

    In dual channel the caller's legs go left and every other leg right, so a conference
    recorded in stereo still keeps the caller apart; the participant filter applies first.
    """
    keep = select(roles, participant)
    if channels == 1:
        return _sum([tracks[i] for i in keep], n)
    left = _sum([tracks[i] for i in keep if roles[i] == "caller"], n)
    right = _sum([tracks[i] for i in keep if roles[i] != "caller"], n)
    return np.column_stack((left, right))
