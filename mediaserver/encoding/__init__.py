"""Streaming encoders: int16 PCM in, the bytes of a WAV, MP3 or Ogg Opus file out, as they are made.

`make_encoder()` checks the arguments and builds one. The recorder feeds it blocks of any
size, appends every returned chunk to storage, and after `close()` writes
`header_patch()` over the stored file where the format has totals to fill in.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral

from mediaserver.errors import CodecError

from .base import Encoder
from .mp3 import Mp3Encoder
from .mp3tag import BITRATES as MP3_BITRATES
from .opus import OpusEncoder
from .wav import WavEncoder, wav_header

__all__ = [
    "DEFAULT_BITRATES",
    "FORMATS",
    "MP3_BITRATES",
    "SAMPLE_RATES",
    "CodecError",
    "Encoder",
    "Mp3Encoder",
    "OpusEncoder",
    "WavEncoder",
    "file_type",
    "make_encoder",
    "wav_header",
]

FORMATS = ("wav", "mp3", "opus")
_CLASSES = {"wav": WavEncoder, "mp3": Mp3Encoder, "opus": OpusEncoder}


def file_type(format: str) -> tuple[str, str]:
    """(extension, content type) of the files an encoder of `format` writes."""
    if format not in _CLASSES:
        raise CodecError(f"unsupported format: {format!r} (supported: {', '.join(FORMATS)})")
    cls = _CLASSES[format]
    return cls.extension, cls.content_type
SAMPLE_RATES = {"wav": (8000, 16000), "mp3": (8000, 16000), "opus": (8000, 16000, 48000)}
DEFAULT_BITRATES = {"mp3": 32, "opus": 24}
OPUS_MIN_KBPS = 6  # the lowest rate libopus encodes
OPUS_MAX_KBPS_PER_CHANNEL = 256  # ffmpeg's libopus wrapper refuses more


def make_encoder(
    format: str,
    sample_rate: int,
    channels: int,
    bitrate_kbps: int | None = None,
    *,
    mp3_quality: int = 2,
    opus_complexity: int = 10,
    wav_buffer_ms: int = 1000,
) -> Encoder:
    """A streaming encoder for one recording, or CodecError naming the unsupported value.

    `bitrate_kbps` applies to mp3 (CBR; 8-64 kbps at 8 kHz, 8-160 at 16 kHz, default 32) and
    opus (6 to 256 per channel, default 24) and must be None for wav. `mp3_quality` is
    LAME's 0 (best, slowest) to 9, `opus_complexity` libopus's 0 (fastest) to 10, and
    `wav_buffer_ms` how much WAV audio to gather before returning bytes.
    """
    if format not in FORMATS:
        raise CodecError(f"unsupported format: {format!r} (supported: {', '.join(FORMATS)})")
    sample_rate = _check_int(f"sample rate for {format} (Hz)", sample_rate, SAMPLE_RATES[format])
    channels = _check_int("channel count", channels, (1, 2))
    if format == "wav":
        if bitrate_kbps is not None:
            raise CodecError(f"bitrate {bitrate_kbps!r} does not apply to wav (PCM16)")
        wav_buffer_ms = _check_int("wav_buffer_ms", wav_buffer_ms, range(60_001))
        return WavEncoder(sample_rate, channels, wav_buffer_ms)
    bitrate = DEFAULT_BITRATES[format] if bitrate_kbps is None else bitrate_kbps
    if format == "mp3":
        bitrate = _check_int(f"mp3 bitrate at {sample_rate} Hz (kbps)", bitrate, MP3_BITRATES[sample_rate])
        quality = _check_int("mp3_quality", mp3_quality, range(10))
        return Mp3Encoder(sample_rate, channels, bitrate, quality)
    top = OPUS_MAX_KBPS_PER_CHANNEL * channels
    bitrate = _check_int(f"opus bitrate for {channels} channel(s) (kbps)", bitrate, range(OPUS_MIN_KBPS, top + 1))
    complexity = _check_int("opus_complexity", opus_complexity, range(11))
    return OpusEncoder(sample_rate, channels, bitrate, complexity)


def _check_int(name: str, value: object, allowed: Sequence[int]) -> int:
    """`value` as an int if it is an integer in `allowed`, else CodecError naming it."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value not in allowed:
        if isinstance(allowed, range):
            supported = f"{allowed.start} to {allowed.stop - 1}"
        else:
            supported = ", ".join(map(str, allowed))
        raise CodecError(f"unsupported {name}: {value!r} (supported: {supported})")
    return int(value)
