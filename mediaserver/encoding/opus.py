"""Ogg Opus (RFC 7845) through PyAV's libopus and Ogg muxer, streamed page by page.

The container writes into a write-only file object that is drained after every call, so
the Ogg pages (one every PAGE_DURATION_US) come out as they are made and nothing
accumulates. libopus takes 8 and 16 kHz input directly; Ogg Opus always
decodes at 48 kHz, so ffprobe reports 48000 whatever the input rate, and the input rate is
kept in the OpusHead header. Packets are 20 ms; the last one is padded by libopus, and the
final page's granule position trims the padding so the decoded length is exact.
ffprobe's duration includes the 312-sample (6.5 ms) pre-skip.
"""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np

from .base import StreamEncoder

FRAME_MS = 20
# PyAV re-chunks audio to the codec's frame size in a filter graph and pays for each
# frame object; handing it 200 ms at a time instead of 20 ms is about 8% faster.
BLOCK_MS = 200
# A quarter of the muxer's default of one second: what a crash (or a lost node) can take from the
# end of a recording is about one page, for more bytes of page headers (2.5 % at 24 kbps,
# 4 % at 16 kbps, measured).
PAGE_DURATION_US = 250_000
# libopus favours intelligibility in "voip" mode, which suits recorded calls.
APPLICATION = "voip"
_LAYOUTS = {1: "mono", 2: "stereo"}


class _Sink:
    """A write-only file object for the muxer: keeps what it writes until drained."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes | memoryview) -> int:
        # PyAV may reuse the memory it passes in; keep a copy.
        self._parts.append(bytes(data))
        return len(data)

    def drain(self) -> bytes:
        out = b"".join(self._parts)
        self._parts.clear()
        return out


class OpusEncoder(StreamEncoder):
    """Streams Ogg Opus at 8, 16 or 48 kHz; `complexity` is libopus's 0 (fastest) to 10."""

    format = "opus"
    content_type = "audio/ogg"
    extension = "opus"

    def __init__(self, sample_rate: int, channels: int, bitrate_kbps: int, complexity: int) -> None:
        super().__init__(sample_rate, channels, sample_rate * BLOCK_MS // 1000)
        self._sink = _Sink()
        self._container = av.open(self._sink, mode="w", format="ogg", options={"page_duration": str(PAGE_DURATION_US)})
        try:
            self._stream = self._container.add_stream("libopus", rate=sample_rate, layout=_LAYOUTS[channels])
            self._stream.bit_rate = bitrate_kbps * 1000
            self._stream.codec_context.format = "s16"
            self._stream.codec_context.options = {
                "application": APPLICATION,
                "frame_duration": str(FRAME_MS),
                "compression_level": str(complexity),
            }
        except BaseException:
            self._container.close()
            raise
        self._time_base = Fraction(1, sample_rate)
        self._pts = 0

    def _start(self) -> bytes:
        self._container.start_encoding()
        return self._sink.drain()

    def _encode_block(self, block: np.ndarray) -> bytes:
        self._mux(block)
        return self._sink.drain()

    def _mux(self, block: np.ndarray) -> None:
        # Packed s16 wants one plane of interleaved samples: a view, not a copy.
        frame = av.AudioFrame.from_ndarray(block.reshape(1, -1), format="s16", layout=_LAYOUTS[self.channels])
        frame.sample_rate = self.sample_rate
        frame.time_base = self._time_base
        frame.pts = self._pts
        self._pts += len(block)
        self._container.mux(self._stream.encode(frame))

    def _finish(self) -> bytes:
        try:
            if self.samples_in == 0:
                # An Ogg Opus stream without audio packets does not open in ffmpeg; one
                # silent sample (0.125 ms at 8 kHz) is the shortest stream that does.
                self._mux(np.zeros((1, self.channels), dtype=np.int16))
            self._container.mux(self._stream.encode(None))
        finally:
            self._container.close()
        return self._sink.drain()

    def _patch(self) -> tuple[int, bytes] | None:
        return None
