"""What the fuzz properties share: one deterministic hypothesis profile, seed inputs from
the fixtures, and a mutator that turns a valid input into a nearly valid one (the inputs
that reach deepest into a parser)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

FIXTURES = Path(__file__).resolve().parent.parent / "sip_fixtures"

# Deterministic (the same examples on every run, no example database) and quick enough
# that every property runs on each `make test`; `make fuzz` runs many more cases.
settings.register_profile(
    "fuzz", max_examples=200, deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                           HealthCheck.function_scoped_fixture],
)
FUZZ = settings.get_profile("fuzz")


def fixture_bytes(folder: str, suffix: str) -> list[bytes]:
    return [path.read_bytes() for path in sorted((FIXTURES / folder).glob(f"*{suffix}"))]


SIP_MESSAGES = fixture_bytes("messages", ".sip")
SDP_BODIES = fixture_bytes("sdp", ".sdp")

# Bytes that parsers trip over: separators, digits that are not ASCII, huge numbers,
# surrogate escapes, NULs, quotes and brackets.
NASTY = [b"\r\n", b"\n", b"\r", b"\r\n\r\n", b":", b";", b",", b"=", b" ", b"\t", b"\x00", b"\xff", b"\xc3\x28",
         b"\xed\xa0\x80", "²".encode(), "١٢".encode(), b"-1", b"99999999999999999999", b"1e999", b"NaN", b"%",
         b"<", b">", b"\"", b"\\", b"[", b"]", b"{", b"}", b"/", b"@", b"sip:", b"SIP/2.0", b"0x10", b"\xef\xbb\xbf"]
# What a number in a header, an SDP line or a JSON field is replaced with.
NUMBERS = ["²".encode(), b"9" * 5000, "١٢".encode(), b"-1", b"0", b"65536", b"4294967296", b"9" * 30, "٣".encode(),
           b"1.5", b"1e999", b"0x1f", b" 7 ", b"", b"+3", b"1_000"]
_DIGIT_RUN = re.compile(rb"[0-9]+")


@st.composite
def mutated(draw, seeds: list[bytes], max_ops: int = 6) -> bytes:
    """A seed with a few edits: bytes flipped, cut, repeated, or nasty tokens inserted."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, max_ops))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(("flip", "insert", "delete", "truncate", "repeat", "nasty", "number", "number")))
        if op == "flip" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[at:]
        elif op == "repeat":
            data[at:at] = data[at:at + draw(st.integers(1, 64))] * draw(st.integers(1, 4))
        elif op == "nasty":
            data[at:at] = draw(st.sampled_from(NASTY))
        elif op == "number":
            runs = list(_DIGIT_RUN.finditer(data))
            if runs:
                run = runs[draw(st.integers(0, len(runs) - 1))]
                data[run.start():run.end()] = draw(st.sampled_from(NUMBERS))
    return bytes(data)


@st.composite
def line_mutated(draw, seeds: list[bytes], max_ops: int = 3) -> bytes:
    """A seed edited line by line (a header, an SDP line), so that the framing mostly
    survives and the edit reaches the code that reads the line's value."""
    head, sep, body = draw(st.sampled_from(seeds)).partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    for _ in range(draw(st.integers(1, max_ops))):
        at = draw(st.integers(0, len(lines) - 1))
        line = lines[at]
        op = draw(st.sampled_from(("number", "number", "number", "value", "drop", "repeat", "space")))
        runs = list(_DIGIT_RUN.finditer(line))
        if op == "number" and runs:
            run = runs[draw(st.integers(0, len(runs) - 1))]
            lines[at] = line[:run.start()] + draw(st.sampled_from(NUMBERS)) + line[run.end():]
        elif op == "value":
            cut = max(line.find(b":"), line.find(b"="), 0) + 1
            lines[at] = line[:cut] + draw(st.one_of(st.sampled_from(NASTY), st.binary(max_size=12)))
        elif op == "drop" and len(lines) > 1:
            del lines[at]
        elif op == "repeat":
            lines.insert(at, line)
        elif op == "space":
            lines[at] = line.replace(b" ", draw(st.sampled_from([b"", b"  ", b"\t", b" ; "])), 1)
    return b"\r\n".join(lines) + sep + body


def inputs(seeds: list[bytes], max_random: int = 512):
    """Seeds edited line by line or byte by byte, and some wholly random bytes."""
    return st.one_of(line_mutated(seeds), line_mutated(seeds), mutated(seeds), st.binary(max_size=max_random))


JSON_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False, allow_infinity=False),
                        st.text(max_size=20), st.sampled_from(["wav", "mp3", "opus", "#", "caller", "all", "skip", "silence", ""]))
JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                                st.dictionaries(st.text(max_size=12), inner, max_size=4)),
                           max_leaves=12)


def json_text(value) -> bytes:
    return json.dumps(value).encode()
