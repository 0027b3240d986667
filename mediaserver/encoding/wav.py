"""PCM16 little-endian RIFF/WAVE, written as a stream that any reader can open while it grows.

The 44-byte canonical header goes out first with both size fields set to 0xFFFFFFFF, the
"length unknown" value that ffmpeg itself writes when its output cannot seek. Readers of
the growing file then play whatever is there: ffmpeg/ffprobe read to end of file (with a
warning), libsndfile (soundfile) and sox clamp the size to the file length, and Python's
`wave` reads until the data runs out. Zero, the other common placeholder, makes
libsndfile and sox see an empty file and `wave` refuse it. After close, `header_patch()` gives the exact header for offset 0.
"""

from __future__ import annotations

import struct

import numpy as np

from .base import StreamEncoder, little_endian

WAVE_FORMAT_PCM = 1
HEADER_BYTES = 44
STREAMING_SIZE = 0xFFFFFFFF
_HEADER = struct.Struct("<4sI4s4sIHHIIHH4sI")


def wav_header(sample_rate: int, channels: int, data_bytes: int) -> bytes:
    """The canonical 44-byte PCM16 header for `data_bytes` of sample data.

    Sizes that RIFF's 32-bit fields cannot hold (over 4 GiB) are written as 0xFFFFFFFF,
    the same "read to end of file" value a stream header carries.
    """
    riff_bytes = data_bytes + HEADER_BYTES - 8
    if riff_bytes > 0xFFFFFFFF:
        riff_bytes = data_bytes = STREAMING_SIZE
    block_align = 2 * channels
    fmt = (16, WAVE_FORMAT_PCM, channels, sample_rate, sample_rate * block_align, block_align, 16)
    return _HEADER.pack(b"RIFF", riff_bytes, b"WAVE", b"fmt ", *fmt, b"data", data_bytes)


class WavEncoder(StreamEncoder):
    """Streams PCM16 WAV, handing out about `buffer_ms` of audio per non-empty return."""

    format = "wav"
    content_type = "audio/wav"
    extension = "wav"

    def __init__(self, sample_rate: int, channels: int, buffer_ms: int = 1000) -> None:
        super().__init__(sample_rate, channels, sample_rate * buffer_ms // 1000)

    def _start(self) -> bytes:
        return wav_header(self.sample_rate, self.channels, STREAMING_SIZE)

    def _encode_block(self, block: np.ndarray) -> bytes:
        return little_endian(block).tobytes()

    def _finish(self) -> bytes:
        return b""

    def _patch(self) -> tuple[int, bytes] | None:
        data_bytes = self.samples_in * self.channels * 2
        return 0, wav_header(self.sample_rate, self.channels, data_bytes)
