"""G.711 µ-law and A-law (ITU-T G.711), vectorised with lookup tables.

Decoding gathers from a 256-entry table (it stays in the L1 cache, which makes it 3-6x
faster than a 65,536-entry table of byte pairs); encoding indexes a 65,536-entry table by
the int16 value seen as uint16. The tables are built once, from the segment arithmetic of the reference
implementation (14-bit µ-law and 13-bit A-law input, as in G.711's reference code), and checked against every code value kept in the top-level codecs/ folder.
"""

from __future__ import annotations

import numpy as np

_ULAW_BIAS = 0x84
_ULAW_CLIP = 8159  # 14-bit magnitude limit


def _ulaw_decode_table() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    t = ((u & 0x0F) << 3) + _ULAW_BIAS
    t = t << ((u & 0x70) >> 4)
    return np.where(u & 0x80, _ULAW_BIAS - t, t - _ULAW_BIAS).astype(np.int16)


def _alaw_decode_table() -> np.ndarray:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    seg = (a & 0x70) >> 4
    t = (a & 0x0F) << 4
    t = np.where(seg == 0, t + 8, (t + 0x108) << np.maximum(seg - 1, 0))
    return np.where(a & 0x80, t, -t).astype(np.int16)


def _segment(value: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Index of the first segment end not below `value` (len(ends) when above all)."""
    return np.searchsorted(ends, value, side="left")


def _ulaw_encode_table() -> np.ndarray:
    pcm = np.arange(-32768, 32768, dtype=np.int32) >> 2
    mask = np.where(pcm < 0, 0x7F, 0xFF)
    mag = np.minimum(np.abs(pcm), _ULAW_CLIP) + (_ULAW_BIAS >> 2)
    seg = _segment(mag, np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF]))
    code = np.where(seg >= 8, 0x7F, (seg << 4) | ((mag >> (np.minimum(seg, 7) + 1)) & 0x0F)) ^ mask
    return _by_uint16(code & 0xFF)


def _alaw_encode_table() -> np.ndarray:
    pcm = np.arange(-32768, 32768, dtype=np.int32) >> 3
    mask = np.where(pcm >= 0, 0xD5, 0x55)
    mag = np.where(pcm >= 0, pcm, -pcm - 1)
    seg = _segment(mag, np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF]))
    low = np.where(seg < 2, (mag >> 1) & 0x0F, (mag >> np.maximum(seg, 1)) & 0x0F)
    code = np.where(seg >= 8, 0x7F, (seg << 4) | low) ^ mask
    return _by_uint16(code & 0xFF)


def _by_uint16(code: np.ndarray) -> np.ndarray:
    """Reorder a table indexed from -32768 so that int16 samples viewed as uint16 index it."""
    table = np.empty(65536, dtype=np.uint8)
    table[np.arange(-32768, 32768, dtype=np.int32).astype(np.int16).view(np.uint16)] = code
    return table


ULAW_DECODE = _ulaw_decode_table()
ALAW_DECODE = _alaw_decode_table()
ULAW_ENCODE = _ulaw_encode_table()
ALAW_ENCODE = _alaw_encode_table()


def _decode(payload: bytes | np.ndarray, table: np.ndarray) -> np.ndarray:
    if isinstance(payload, (bytes, bytearray, memoryview)):
        codes = np.frombuffer(payload, dtype=np.uint8)
    else:
        codes = np.asarray(payload, dtype=np.uint8)
    return table.take(codes)


def decode_ulaw(payload: bytes | np.ndarray) -> np.ndarray:
    """µ-law bytes (or a uint8 array) to int16 samples."""
    return _decode(payload, ULAW_DECODE)


def decode_alaw(payload: bytes | np.ndarray) -> np.ndarray:
    """A-law bytes (or a uint8 array) to int16 samples."""
    return _decode(payload, ALAW_DECODE)


def encode_ulaw(samples: np.ndarray) -> bytes:
    """int16 samples to µ-law bytes."""
    return ULAW_ENCODE[np.asarray(samples, dtype=np.int16).view(np.uint16)].tobytes()


def encode_alaw(samples: np.ndarray) -> bytes:
    """int16 samples to A-law bytes."""
    return ALAW_ENCODE[np.asarray(samples, dtype=np.int16).view(np.uint16)].tobytes()
