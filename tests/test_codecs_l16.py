"""L16 in both byte orders: exact bytes, round trips, odd lengths, and ffmpeg agreeing."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mediaserver.codecs.l16 import ByteOrder, decode_l16, encode_l16
from mediaserver.errors import CodecError

SAMPLES = np.array([1, -2, 0x1234, -32768, 32767], dtype=np.int16)
BIG = b"\x00\x01\xff\xfe\x12\x34\x80\x00\x7f\xff"
LITTLE = b"\x01\x00\xfe\xff\x34\x12\x00\x80\xff\x7f"


def test_big_endian_is_network_order() -> None:
    assert encode_l16(SAMPLES) == BIG
    assert encode_l16(SAMPLES, "big") == BIG
    np.testing.assert_array_equal(decode_l16(BIG), SAMPLES)


def test_little_endian() -> None:
    assert encode_l16(SAMPLES, "little") == LITTLE
    np.testing.assert_array_equal(decode_l16(LITTLE, "little"), SAMPLES)


def test_decoded_samples_are_native_int16() -> None:
    samples = decode_l16(BIG)
    assert samples.dtype == np.dtype(np.int16)
    assert samples.dtype.isnative


@pytest.mark.parametrize("byteorder", ["big", "little"])
@pytest.mark.parametrize("size", [1, 3, 321])
def test_odd_byte_count_is_a_codec_error(byteorder: ByteOrder, size: int) -> None:
    with pytest.raises(CodecError) as info:
        decode_l16(b"\x00" * size, byteorder)
    assert str(info.value) == f"L16 payload of {size} bytes has an odd length; every sample is 2 bytes"


def test_empty_payload_is_no_samples() -> None:
    assert len(decode_l16(b"")) == 0
    assert encode_l16(np.empty(0, dtype=np.int16)) == b""


def test_buffer_types_decode_alike() -> None:
    for payload in (bytearray(BIG), memoryview(BIG), np.frombuffer(BIG, dtype=np.uint8)):
        np.testing.assert_array_equal(decode_l16(payload), SAMPLES)  # type: ignore[arg-type]


def test_unknown_byte_order_is_refused() -> None:
    with pytest.raises(ValueError, match="byteorder must be 'big' or 'little', not 'network'"):
        decode_l16(BIG, "network")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="byteorder"):
        encode_l16(SAMPLES, "middle")  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [np.zeros(4, dtype=np.float32), np.zeros(4, dtype=np.int32), np.zeros((2, 2), dtype=np.int16)])
def test_encode_takes_only_1d_int16(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="1-D int16"):
        encode_l16(bad)


@settings(max_examples=200, deadline=None)
@given(
    samples=hnp.arrays(np.int16, st.integers(0, 500)),
    byteorder=st.sampled_from(["big", "little"]),
)
def test_round_trip(samples: np.ndarray, byteorder: ByteOrder) -> None:
    payload = encode_l16(samples, byteorder)
    assert len(payload) == 2 * len(samples)
    np.testing.assert_array_equal(decode_l16(payload, byteorder), samples)


@settings(max_examples=100, deadline=None)
@given(payload=st.binary(max_size=300).filter(lambda b: len(b) % 2 == 0))
def test_big_and_little_are_byte_swaps_of_each_other(payload: bytes) -> None:
    swapped = bytes(np.frombuffer(payload, dtype=np.uint8).reshape(-1, 2)[:, ::-1])
    np.testing.assert_array_equal(decode_l16(payload, "big"), decode_l16(swapped, "little"))


def test_big_endian_matches_ffmpeg_pcm_s16be(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    samples = rng.integers(-32768, 32768, 8000).astype(np.int16)
    source = tmp_path / "in.s16le"
    source.write_bytes(samples.astype("<i2").tobytes())
    target = tmp_path / "out.s16be"
    subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "s16le", "-ar", "8000", "-ac", "1",
         "-i", str(source), "-f", "s16be", "-c:a", "pcm_s16be", str(target)],
        check=True,
    )
    assert encode_l16(samples, "big") == target.read_bytes()
    np.testing.assert_array_equal(decode_l16(target.read_bytes(), "big"), samples)
