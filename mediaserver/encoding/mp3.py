"""MP3 (MPEG-2/2.5 Layer III CBR) through LAME, with a LAME tag for exact, gapless length.

lameenc writes bare audio frames: no Xing/Info frame, so readers count the encoder delay
and the last frame's padding as audio (a 3.000 s input reads as 3.168 s at 8 kHz). This
encoder puts an Info frame (see `mp3tag`) first in the stream, tracks the frame count and
the CRC of the audio bytes as they pass, and after close `header_patch()` hands back the
completed frame for offset 0. With it, ffmpeg and libsndfile (mpg123) decode exactly the
samples that went in, and current FFmpeg reports the exact duration; FFmpeg 5.1's ffprobe
still adds the priming and padding to `duration` (and gives the priming as `start_time`).
An unpatched file still plays, just with the usual MP3 slack.
"""

from __future__ import annotations

import lameenc
import numpy as np

from mediaserver.errors import CodecError

from .base import StreamEncoder, little_endian
from .mp3tag import (
    DECODER_DELAY,
    LAME_ENCODER_DELAY,
    SAMPLES_PER_FRAME,
    InfoTag,
    RunningCrc16,
    frame_bytes,
)

# LAME's cost per call is small: fed 20 ms or 1 s at a time, lameenc alone is about 3%
# faster with the larger blocks, which the copy into the gathering buffer costs back.
# Gathering 100 ms keeps the number of LAME calls and returned chunks down.
BLOCK_MS = 100


class Mp3Encoder(StreamEncoder):
    """Streams CBR MP3 at 8 or 16 kHz; `quality` is LAME's algorithm choice, 0 best, 9 fastest."""

    format = "mp3"
    content_type = "audio/mpeg"
    extension = "mp3"

    def __init__(self, sample_rate: int, channels: int, bitrate_kbps: int, quality: int) -> None:
        super().__init__(sample_rate, channels, sample_rate * BLOCK_MS // 1000)
        self._lame = lameenc.Encoder()
        self._lame.set_in_sample_rate(sample_rate)
        # Without this LAME may pick a lower output rate and resample.
        self._lame.set_out_sample_rate(sample_rate)
        self._lame.set_channels(channels)
        self._lame.set_bit_rate(bitrate_kbps)
        self._lame.set_quality(quality)
        self._tag = InfoTag(sample_rate, channels, bitrate_kbps, quality)
        self._frame_bytes = frame_bytes(sample_rate, bitrate_kbps)
        self._audio_bytes = 0
        self._crc = RunningCrc16()

    def _start(self) -> bytes:
        return self._tag.frame()

    def _encode_block(self, block: np.ndarray) -> bytearray:
        return self._audio(self._lame.encode(little_endian(block)))

    def _finish(self) -> bytearray:
        # lameenc refuses to flush an encoder that was never fed, as with empty input.
        self._lame.encode(b"")
        tail = self._lame.flush()
        # LAME's flush sometimes ends with a frame that decodes to padding only. Frames
        # only borrow bits from earlier ones and decoders are causal, so dropping it
        # changes no decoded sample and keeps the stream within one frame of its content.
        keep = self._frames_needed() * self._frame_bytes - self._audio_bytes
        if 0 <= keep < len(tail):
            del tail[keep:]
        return self._audio(tail)

    def _frames_needed(self) -> int:
        """Frames whose decoded output reaches the last input sample (delays included)."""
        end = self.samples_in + LAME_ENCODER_DELAY + DECODER_DELAY
        return -(-end // SAMPLES_PER_FRAME)

    def _audio(self, data: bytearray) -> bytearray:
        self._audio_bytes += len(data)
        self._crc.update(data)
        return data

    def _patch(self) -> tuple[int, bytes] | None:
        frames, rest = divmod(self._audio_bytes, self._frame_bytes)
        if rest:
            raise CodecError(f"LAME wrote {self._audio_bytes} bytes, not whole {self._frame_bytes}-byte frames")
        return 0, self._tag.frame(frames, self.samples_in, self._crc.value)
