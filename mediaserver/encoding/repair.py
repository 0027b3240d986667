"""Making a spool whose encoder died with the process into a file that plays.

After a crash the encoder's final bytes and header patch never happened. What is on disk
is kept: a WAV gets exact sizes, an Ogg Opus stream is cut after its last complete page,
an MP3 is left as it is (every complete frame decodes; only its info frame is stale).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from mediaserver.encoding.wav import HEADER_BYTES, wav_header

_OGG_HEADER = struct.Struct("<4sBBqIIIB")  # RFC 3533 page header, up to the segment count
OPUS_PRE_SKIP_OFFSET = 10  # RFC 7845 §5.1: pre-skip, after "OpusHead", version, channels


def repair(fmt: str, path: Path, sample_rate: int, channels: int, bitrate_kbps: int | None = None) -> float:
    """Repair `path` in place; returns the duration in seconds of what it holds."""
    if fmt == "wav":
        return _repair_wav(path, sample_rate, channels)
    if fmt == "opus":
        return _repair_ogg(path)
    if fmt == "mp3":
        return _mp3_duration(path, bitrate_kbps or 32)
    raise ValueError(f"unknown format {fmt!r}")


def _repair_wav(path: Path, sample_rate: int, channels: int) -> float:
    size = path.stat().st_size
    frame = 2 * channels
    data = max(size - HEADER_BYTES, 0) // frame * frame
    with open(path, "r+b") as fh:
        if size < HEADER_BYTES:
            fh.truncate(0)
        fh.truncate(HEADER_BYTES + data)
        fh.seek(0)
        fh.write(wav_header(sample_rate, channels, data))
        fh.flush()
        os.fsync(fh.fileno())
    return data / frame / sample_rate


def _repair_ogg(path: Path) -> float:
    """Cut after the last complete page; duration from its granule position."""
    data = path.read_bytes()
    offset, good, granule, pre_skip = 0, 0, 0, 0
    while offset + _OGG_HEADER.size <= len(data):
        magic, _version, _flags, position, _serial, _seq, _crc, segments = _OGG_HEADER.unpack_from(data, offset)
        table_end = offset + _OGG_HEADER.size + segments
        if magic != b"OggS" or table_end > len(data):
            break
        end = table_end + sum(data[offset + _OGG_HEADER.size:table_end])
        if end > len(data):
            break
        if data[table_end:table_end + 8] == b"OpusHead":
            pre_skip = struct.unpack_from("<H", data, table_end + OPUS_PRE_SKIP_OFFSET)[0]
        if position >= 0:
            granule = position
        offset = good = end
    with open(path, "r+b") as fh:
        fh.truncate(good)
        os.fsync(fh.fileno())
    return max(granule - pre_skip, 0) / 48000


def _mp3_duration(path: Path, bitrate_kbps: int) -> float:
    return path.stat().st_size * 8 / (bitrate_kbps * 1000)
