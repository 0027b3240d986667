"""JSON from peers we do not trust: nesting depth bounded before parsing, numbers finite.

`json.loads` recurses once per nesting level, so a body of 50,000 `[` fails deep inside
the parser with RecursionError (and takes the stack with it on a smaller thread stack).
A cheap scan of the bracket depth outside string literals refuses such text before the
parser sees it. RFC 8259 §6 has no NaN or Infinity, and a number too large for a double
(`1e999`) would become infinity: both are refused too, so that no caller has to check
every float it is handed.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_DEPTH = 64

# A string literal, or an unterminated one up to the end, so that every quote starts at
# most one match and the scan stays linear (possessive: no backtracking into it).
_STRING = re.compile(r'"(?:[^"\\]++|\\.)*+"?', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]++")


class JsonDepthError(ValueError):
    """Text whose arrays and objects nest deeper than the limit."""


class JsonNumberError(ValueError):
    """NaN, Infinity, or a number beyond the range of a double."""


def nesting_exceeds(text: str, limit: int = MAX_DEPTH) -> bool:
    """Whether the arrays and objects of `text` nest more than `limit` deep (brackets
    inside strings do not count; unbalanced text is left for the parser to refuse)."""
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    for char in _NOT_BRACKET.sub("", _STRING.sub("", text)):
        if char in "[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def _finite(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise JsonNumberError(f"number {literal[:20]} is out of range")
    return value


def _no_constant(literal: str) -> Any:
    raise JsonNumberError(f"{literal} is not a JSON number")


def loads(text: str, max_depth: int = MAX_DEPTH) -> Any:
    """`json.loads(text)` for untrusted text. Raises JsonDepthError, JsonNumberError,
    json.JSONDecodeError, or ValueError for an integer of more digits than
    `sys.get_int_max_str_digits()` allows; all are ValueError."""
    if nesting_exceeds(text, max_depth):
        raise JsonDepthError(f"arrays and objects are nested more than {max_depth} deep")
    return json.loads(text, parse_float=_finite, parse_constant=_no_constant)
