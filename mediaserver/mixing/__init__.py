"""Aligning legs on a shared timeline and mixing them down."""

from mediaserver.mixing.mixdown import mixdown
from mediaserver.mixing.mixer import Block, LegBuffer, Mixer

__all__ = ["Block", "LegBuffer", "Mixer", "mixdown"]
