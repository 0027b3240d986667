"""L16: uncompressed signed 16-bit PCM, mono.

RTP carries L16 in network byte order, most significant byte first (RFC 3551 §4.5.11);
WebSocket audio streams carry the little-endian samples that most software produces.
Both directions take the byte order explicitly so that neither is assumed by accident.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from mediaserver.errors import CodecError

ByteOrder = Literal["big", "little"]
_DTYPES: dict[str, str] = {"big": ">i2", "little": "<i2"}


def _dtype(byteorder: str) -> str:
    try:
        return _DTYPES[byteorder]
    except KeyError:
        raise ValueError(f"byteorder must be 'big' or 'little', not {byteorder!r}") from None


def decode_l16(payload: bytes | bytearray | memoryview, byteorder: ByteOrder = "big") -> np.ndarray:
    """L16 bytes to native int16 samples; an odd byte count is a CodecError."""
    dtype = _dtype(byteorder)
    size = memoryview(payload).nbytes
    if size % 2:
        raise CodecError(f"L16 payload of {size} bytes has an odd length; every sample is 2 bytes")
    return np.frombuffer(payload, dtype=dtype).astype(np.int16)


def encode_l16(samples: np.ndarray, byteorder: ByteOrder = "big") -> bytes:
    """1-D int16 samples to L16 bytes in the given byte order."""
    dtype = _dtype(byteorder)
    if samples.dtype != np.int16 or samples.ndim != 1:
        raise ValueError("encode_l16() takes a 1-D int16 array")
    return samples.astype(dtype).tobytes()
