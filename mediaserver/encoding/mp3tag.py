"""The Xing "Info" frame with a LAME tag that makes a CBR MP3 stream gapless and exact.

An MP3 decoder's output starts late and ends long: LAME delays the signal by 576 samples,
the decoder adds 529 more, and the last frame is padded to 576 samples. Without a tag,
readers report every decoded sample (about 140 ms too much at 8 kHz). The Info frame is an
MPEG frame of silence placed first in the stream; in it the Xing header counts frames and
bytes, and the LAME extension stores the encoder delay and end padding, which ffmpeg,
mpg123 (and so libsndfile), foobar2000 and Apple's decoders use to trim to the exact length.

Layout references: the Xing header as read by ffmpeg `libavformat/mp3dec.c`
(`mp3_parse_info_tag`) and written by LAME `libmp3lame/VbrTag.c`; the LAME tag rev 1
field list ("Mp3 Info Tag rev 1 specifications", Gabriel Bouvigne).

Only 8 and 16 kHz (MPEG-2.5 and MPEG-2 Layer III) are described here. At those rates every
bitrate gives frames of a whole number of bytes, so a CBR stream never sets the padding bit
and its frame count is its byte count divided by one frame's size.
"""

from __future__ import annotations

import functools
import struct

import numpy as np

from mediaserver.errors import CodecError

SAMPLES_PER_FRAME = 576  # MPEG-2/2.5 Layer III
LAME_ENCODER_DELAY = 576  # LAME's ENCDELAY: what the tag's delay field holds
DECODER_DELAY = 529  # the Layer III decoder's own delay, which readers add to the tag's
MAX_TAG_PADDING = 0xFFF  # the LAME tag keeps delay and padding in 12 bits each

# sample rate -> (MPEG version bits, sample rate index): ISO/IEC 13818-3 and MPEG-2.5.
_RATES = {8000: (0b00, 2), 16000: (0b10, 2)}
_LSF_BITRATES = (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)
# LAME refuses more than 64 kbps at 8 kHz and silently lowers the rate.
MAX_BITRATE = {8000: 64, 16000: 160}
BITRATES = {rate: tuple(b for b in _LSF_BITRATES[1:] if b <= top) for rate, top in MAX_BITRATE.items()}

_XING_FLAGS = 0x0F  # frames, bytes, TOC and quality fields present
_CBR_TOC = bytes(256 * i // 100 for i in range(100))  # CBR: i % of time is i % of bytes
_TAG_BYTES = 120 + 36  # Xing header with every field + LAME extension
_LAME_VERSION = b"LAME3.100"  # the library lameenc bundles; ffmpeg only trusts "LAME*" delays
_VBR_METHOD_CBR = 1
_STEREO_MODE = {1: 0, 2: 3}  # LAME tag codes: mono, joint stereo


def side_info_bytes(channels: int) -> int:
    """Layer III side information length after the 4-byte header (MPEG-2/2.5)."""
    return 9 if channels == 1 else 17


def frame_bytes(sample_rate: int, bitrate_kbps: int) -> int:
    """Bytes in one unpadded Layer III frame at this rate and bitrate."""
    return SAMPLES_PER_FRAME // 8 * bitrate_kbps * 1000 // sample_rate


def frame_header(sample_rate: int, channels: int, bitrate_kbps: int) -> bytes:
    """A 4-byte Layer III header: no CRC, no padding, original, joint stereo for two channels."""
    version, rate_index = _RATES[sample_rate]
    mode = 0b11 if channels == 1 else 0b01
    return bytes(
        (
            0xFF,
            0xE0 | version << 3 | 0b01 << 1 | 1,
            _LSF_BITRATES.index(bitrate_kbps) << 4 | rate_index << 2,
            mode << 6 | 1 << 2,
        )
    )


def info_bitrate(sample_rate: int, channels: int, bitrate_kbps: int) -> int:
    """The stream's bitrate if an Info frame fits in its frames, else the least that does.

    A frame of another bitrate is still a valid frame; LAME makes the same choice.
    """
    need = 4 + side_info_bytes(channels) + _TAG_BYTES
    for kbps in _LSF_BITRATES:
        if kbps >= bitrate_kbps and frame_bytes(sample_rate, kbps) >= need:
            return kbps
    raise CodecError(f"no Layer III frame at {sample_rate} Hz holds an Info tag")


class InfoTag:
    """The first frame of a CBR stream: Xing "Info" header plus LAME tag.

    Written once with zero counts as a placeholder (readers of the growing file still get
    the encoder delay), and again after the last frame with the totals, to overwrite it.
    """

    _XING = struct.Struct(">4sIII100sI")
    _LAME = struct.Struct(">9sBBIHHBB3sBBHIH")

    def __init__(self, sample_rate: int, channels: int, bitrate_kbps: int, quality: int) -> None:
        self.sample_rate = sample_rate
        self.channels = channels
        self.bitrate_kbps = bitrate_kbps
        self.quality = quality
        self.tag_bitrate = info_bitrate(sample_rate, channels, bitrate_kbps)
        self.size = frame_bytes(sample_rate, self.tag_bitrate)

    def frame(self, frames: int = 0, samples: int = 0, music_crc: int = 0) -> bytes:
        """The Info frame for `frames` audio frames that decode to `samples` samples.

        With `frames` 0 the counts and end padding are left zero, which readers take as
        "not known yet"; `music_crc` is the CRC-16 of the audio frames.
        """
        stream_bytes = self.size + frames * frame_bytes(self.sample_rate, self.bitrate_kbps) if frames else 0
        xing = self._XING.pack(b"Info", _XING_FLAGS, frames, stream_bytes, _CBR_TOC, self._quality_figure())
        body = b"".join(
            (
                frame_header(self.sample_rate, self.channels, self.tag_bitrate),
                bytes(side_info_bytes(self.channels)),
                xing,
                self._lame(frames, samples, stream_bytes, music_crc),
            )
        )
        body += struct.pack(">H", crc16(body))  # the tag CRC covers everything before it
        return body + bytes(self.size - len(body))

    def _lame(self, frames: int, samples: int, stream_bytes: int, music_crc: int) -> bytes:
        padding = frames * SAMPLES_PER_FRAME - samples - LAME_ENCODER_DELAY if frames else 0
        if not 0 <= padding <= MAX_TAG_PADDING:
            raise CodecError(f"{frames} MP3 frames cannot hold {samples} samples")
        delays = (LAME_ENCODER_DELAY << 12 | padding).to_bytes(3, "big")
        misc = _STEREO_MODE[self.channels] << 2  # source rate bits 00: 32 kHz or less
        unknown = 0  # lowpass, peak, replay gains, encoding flags, MP3Gain, preset
        fields = (_LAME_VERSION, _VBR_METHOD_CBR, unknown, unknown, unknown, unknown, unknown)
        fields += (min(self.bitrate_kbps, 255), delays, misc, unknown, unknown, stream_bytes, music_crc)
        return self._LAME.pack(*fields)

    def _quality_figure(self) -> int:
        # LAME writes 100 - 10 * VBR quality (4 unless set) - algorithm quality.
        return 100 - 10 * 4 - self.quality


class RunningCrc16:
    """CRC-16/ARC of a byte stream that arrives in small pieces.

    Pieces are gathered to a few KiB first: `crc16` costs about 6 us per call whatever
    the size up to 1 KiB, and an MP3 encoder hands out a few hundred bytes at a time.
    """

    BATCH = 8192

    def __init__(self) -> None:
        self._crc = 0
        self._pending = bytearray()

    def update(self, data: bytes | bytearray) -> None:
        self._pending += data
        if len(self._pending) >= self.BATCH:
            self._crc = crc16(self._pending, self._crc)
            # A fresh buffer rather than clear(): resizing one that something still views
            # (a numpy array not yet freed) raises BufferError.
            self._pending = bytearray()

    @property
    def value(self) -> int:
        self._crc = crc16(self._pending, self._crc)
        self._pending = bytearray()
        return self._crc


CRC_BLOCK = 1024
_ROWS = np.arange(CRC_BLOCK - 1, -1, -1)  # each byte's distance from the end of a block


def crc16(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC-16/ARC (polynomial 0x8005 reflected, as LAME's tag uses) of `data`, continued from `crc`.

    Vectorised: the CRC of a block is linear in its bytes, so it is the XOR of one table
    entry per byte, picked by the byte's value and its distance from the block's end. The
    running value enters by XOR into the block's first two bytes (reflected CRC, 16 bits).
    A short block is padded in front with zero bytes, which add nothing to a CRC that
    starts from zero: every array here has the same size whatever the data's length, so
    numpy's cache of freed small buffers does not fill up with one size after another
    over a long recording.
    """
    table = _crc_tables()
    size = len(table)
    view = np.frombuffer(data, dtype=np.uint8)
    block = np.empty(size, dtype=np.uint8)
    for start in range(0, len(view), size):
        piece = view[start : start + size]
        if len(piece) < 2:
            return _crc16_byte(crc, int(piece[0]))
        head = size - len(piece)
        block[:head] = 0
        block[head:] = piece
        block[head] ^= crc & 0xFF
        block[head + 1] ^= crc >> 8
        crc = int(np.bitwise_xor.reduce(table[_ROWS, block]))
    return crc


@functools.cache
def _crc_tables(block: int = CRC_BLOCK) -> np.ndarray:
    """table[k][b]: CRC-16/ARC (from 0) of byte b followed by k zero bytes; 512 KiB."""
    table = np.empty((block, 256), dtype=np.uint16)
    table[0] = [_crc16_byte(0, b) for b in range(256)]
    for k in range(1, block):
        prev = table[k - 1]
        table[k] = (prev >> 8) ^ table[0][prev & 0xFF]
    return table


def _crc16_byte(crc: int, byte: int) -> int:
    crc ^= byte
    for _ in range(8):
        crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc
