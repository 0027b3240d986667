"""G.711 against ffmpeg's vectors in codecs/, and the codecs/ manifest against its files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mediaserver.codecs import g711

CODECS_DIR = Path(__file__).resolve().parents[1] / "codecs"
LAWS = {
    "ulaw": (g711.decode_ulaw, g711.encode_ulaw, g711.ULAW_DECODE),
    "alaw": (g711.decode_alaw, g711.encode_alaw, g711.ALAW_DECODE),
}
# ffmpeg's encoder picks the nearest decision level; the G.711 reference arithmetic
# rounds differently at some boundaries. These are the counts over all 65,536 inputs.
FFMPEG_ENCODE_DIFFERENCES = {"ulaw": 512, "alaw": 964}
ULAW_NEGATIVE_ZERO = 0x7F
ULAW_POSITIVE_ZERO = 0xFF


def _all_int16() -> np.ndarray:
    return np.arange(-32768, 32768, dtype=np.int32).astype(np.int16)


@pytest.mark.parametrize("law", LAWS)
def test_decode_matches_ffmpeg_for_every_code(law: str) -> None:
    decode, _, _ = LAWS[law]
    expected = np.fromfile(CODECS_DIR / f"g711_{law}_decode.s16le", dtype="<i2")
    assert len(expected) == 256
    np.testing.assert_array_equal(decode(bytes(range(256))), expected)


def test_ulaw_decode_spot_values() -> None:
    # G.711 Table 2a: 0x00 is the most negative level, 0x80 the most positive.
    assert g711.decode_ulaw(bytes([0x00, 0x80, 0xFF, 0x7F])).tolist() == [-32124, 32124, 0, 0]


def test_alaw_decode_spot_values() -> None:
    # G.711 Table 1a: codes are stored with even bits inverted (XOR 0x55).
    assert g711.decode_alaw(bytes([0x2A, 0xAA, 0xD5, 0x55])).tolist() == [-32256, 32256, 8, -8]


@pytest.mark.parametrize("law", LAWS)
def test_encode_inverts_decode_for_every_code(law: str) -> None:
    decode, encode, _ = LAWS[law]
    codes = np.frombuffer(encode(decode(bytes(range(256)))), dtype=np.uint8)
    mismatched = np.nonzero(codes != np.arange(256))[0].tolist()
    if law == "ulaw":
        # µ-law has two codes for zero; the encoder emits the positive one.
        assert mismatched == [ULAW_NEGATIVE_ZERO]
        assert codes[ULAW_NEGATIVE_ZERO] == ULAW_POSITIVE_ZERO
    else:
        assert mismatched == []


@pytest.mark.parametrize("law", LAWS)
def test_encode_differs_from_ffmpeg_only_by_one_adjacent_level(law: str) -> None:
    _, encode, table = LAWS[law]
    expected = np.fromfile(CODECS_DIR / f"g711_{law}_encode_ffmpeg.u8", dtype=np.uint8)
    values = _all_int16().astype(np.int32)
    ours = np.frombuffer(encode(values.astype(np.int16)), dtype=np.uint8)
    differ = np.nonzero(ours != expected)[0]
    assert len(differ) == FFMPEG_ENCODE_DIFFERENCES[law]

    levels = np.unique(table)
    rank = np.searchsorted(levels, table)
    np.testing.assert_array_equal(np.abs(rank[ours[differ]] - rank[expected[differ]]), 1)
    # Both codes are the levels either side of the input, so each is within one step.
    ours_level = table[ours[differ]].astype(np.int32)
    ffmpeg_level = table[expected[differ]].astype(np.int32)
    x = values[differ]
    assert np.all(np.minimum(ours_level, ffmpeg_level) <= x)
    assert np.all(x <= np.maximum(ours_level, ffmpeg_level))


@pytest.mark.parametrize(("law", "worst"), [("ulaw", 644), ("alaw", 512)])
def test_encode_error_stays_within_one_step(law: str, worst: int) -> None:
    decode, encode, table = LAWS[law]
    values = _all_int16().astype(np.int32)
    level = decode(encode(values.astype(np.int16))).astype(np.int32)
    error = np.abs(level - values)
    levels = np.unique(table).astype(np.int32)
    gaps = np.diff(levels)
    at = np.searchsorted(levels, level)
    step = np.maximum(gaps[np.clip(at - 1, 0, len(gaps) - 1)], gaps[np.clip(at, 0, len(gaps) - 1)])
    inside = np.abs(values) <= levels.max()
    assert np.all(error[inside] <= step[inside])
    # Past the outermost level the encoder saturates: -32768 lands on -32124 (µ-law)
    # or -32256 (A-law).
    assert error.max() == worst


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(min_size=0, max_size=401), law=st.sampled_from(sorted(LAWS)))
def test_decode_of_any_payload_is_a_per_byte_lookup(payload: bytes, law: str) -> None:
    decode, _, table = LAWS[law]
    samples = decode(payload)
    assert samples.dtype == np.int16
    assert len(samples) == len(payload)
    np.testing.assert_array_equal(samples, table[np.frombuffer(payload, dtype=np.uint8)])


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(min_size=0, max_size=401), law=st.sampled_from(sorted(LAWS)))
def test_bytes_and_uint8_arrays_decode_alike(payload: bytes, law: str) -> None:
    decode, _, _ = LAWS[law]
    array = np.frombuffer(payload, dtype=np.uint8).copy()
    np.testing.assert_array_equal(decode(payload), decode(array))
    np.testing.assert_array_equal(decode(payload), decode(bytearray(payload)))


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(min_size=1, max_size=401), law=st.sampled_from(sorted(LAWS)))
def test_reencoding_a_payload_gives_it_back(payload: bytes, law: str) -> None:
    decode, encode, _ = LAWS[law]
    expected = payload.replace(bytes([ULAW_NEGATIVE_ZERO]), bytes([ULAW_POSITIVE_ZERO])) if law == "ulaw" else payload
    assert encode(decode(payload)) == expected


def test_manifest_lists_every_file_with_its_sha256() -> None:
    manifest = json.loads((CODECS_DIR / "MANIFEST.json").read_text())
    entries = manifest["files"]
    on_disk = sorted(p.name for p in CODECS_DIR.iterdir() if p.name != "MANIFEST.json")
    assert sorted(entries) == on_disk
    for name, entry in entries.items():
        data = (CODECS_DIR / name).read_bytes()
        assert len(data) == entry["bytes"], name
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], name
        assert entry["description"] and entry["format"] and entry["generated_by"], name


def test_codecs_folder_holds_no_python() -> None:
    assert not [p.name for p in CODECS_DIR.rglob("*.py")]
