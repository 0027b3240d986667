"""Decoded WebRTC audio as the engine takes it: mono int16, with lost time made explicit.

aiortc decodes Opus to 48 kHz stereo and G.711 to 8 kHz mono, packed signed 16-bit, and
stamps each frame with its RTP timestamp counted from the stream's first packet
(`pts` in units of `time_base`, one over the RTP clock rate). The engine places a leg's
audio by sample count, so a packet the network lost would pull everything after it
earlier. `FrameClock` turns a jump in the timestamps into the silence it stands for,
up to `MAX_FILL_S`; a longer jump (a sender that paused, a new stream) is not filled:
the session places audio that has fallen behind the mix at the mix, which is where it
belongs after a long pause.
"""

from __future__ import annotations

import av
import numpy as np

from mediaserver.errors import CodecError

MAX_FILL_S = 1.0
_PACKED, _PLANAR = "s16", "s16p"


def mono_s16(frame: av.AudioFrame) -> np.ndarray:
    """The frame's samples as one int16 channel: channels averaged in int32, no overflow."""
    name = frame.format.name
    if name not in (_PACKED, _PLANAR):
        raise CodecError(f"decoded audio in {name}, expected signed 16-bit")
    channels = len(frame.layout.channels)
    data = frame.to_ndarray()
    # Packed audio is one row of interleaved samples, planar one row per channel.
    per_channel = data.reshape(-1, channels) if name == _PACKED else data.T
    if channels == 1:
        return np.ascontiguousarray(per_channel[:, 0], dtype=np.int16)
    return (per_channel.astype(np.int32).sum(axis=1) // channels).astype(np.int16)


class FrameClock:
    """Where each frame of one stream starts on its own sample clock, to find gaps."""

    def __init__(self, max_fill_s: float = MAX_FILL_S) -> None:
        self.max_fill_s = max_fill_s
        self._next: int | None = None  # where the next frame should start, at `rate`
        self.rate = 0  # the stream's sample rate, 0 before its first frame
        self.filled = 0  # samples of silence handed out so far (at the stream's rate)

    def gap(self, frame: av.AudioFrame) -> int:
        """Samples of silence that belong before `frame` (0 when it follows on)."""
        if frame.pts is None or frame.time_base is None:
            self._next = None
            return 0
        rate = frame.sample_rate
        start = round(frame.pts * frame.time_base * rate)
        expected = self._next if rate == self.rate else None
        self._next, self.rate = start + frame.samples, rate
        if expected is None:
            return 0
        missing = start - expected
        if 0 < missing <= self.max_fill_s * rate:
            self.filled += missing
            return missing
        return 0
