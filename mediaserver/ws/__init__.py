"""WebSocket ingest: pure, I/O-free parsers for the two streaming protocols.

`wavstream` is our own protocol (a JSON `start` frame, then binary audio frames);
`twilio` is Twilio Media Streams (JSON text frames carrying base64 µ-law). Each parser is
fed one received WebSocket message at a time and returns typed events; the handler that
owns the socket acts on the events and, when a parser raises `WsProtocolError`, closes the
socket with the error's `close_code` and `reason`.

This module holds what both parsers share: the close codes (RFC 6455 §7.4.1), the error,
and typed access to the fields of a JSON message, so that every wrong type, missing field
and bad value is reported the same way in both protocols.
"""

from __future__ import annotations

import json
from enum import IntEnum
from typing import Any

from mediaserver.jsonsafe import JsonDepthError, JsonNumberError, loads as bounded_json
from mediaserver.errors import ProtocolError
from mediaserver.media import DTMF_DIGITS

DEFAULT_MAX_FRAME_BYTES = 64 * 1024

# RFC 6455 §5.5: a control frame carries at most 125 bytes, two of which are the code.
MAX_CLOSE_REASON_BYTES = 123

_DESCRIBE_CHARS = 40
_DTMF_KEYS = frozenset(DTMF_DIGITS)


class CloseCode(IntEnum):
    """The WebSocket close codes the parsers use (RFC 6455 §7.4.1)."""

    UNSUPPORTED_DATA = 1003  # a kind of data the endpoint cannot accept
    INVALID_PAYLOAD = 1007  # data inconsistent with the type of the message
    POLICY_VIOLATION = 1008  # a message that breaks the protocol's rules
    MESSAGE_TOO_BIG = 1009  # a message too big to process


class WsProtocolError(ProtocolError):
    """A message that breaks its protocol; the socket is closed with `close_code` and `reason`.

    `str(error)` is the whole message; `reason` is the same text cut to the 123 UTF-8 bytes
    a close frame can carry.
    """

    def __init__(self, close_code: CloseCode, reason: str) -> None:
        super().__init__(reason)
        self.close_code = close_code
        self.reason = clip_utf8(reason, MAX_CLOSE_REASON_BYTES)


def clip_utf8(text: str, limit: int) -> str:
    """`text` cut so that its UTF-8 encoding takes at most `limit` bytes, marked with '...'."""
    data = text.encode("utf-8", "backslashreplace")
    if len(data) <= limit:
        return data.decode("utf-8")
    return data[: limit - 3].decode("utf-8", "ignore") + "..."


def describe(value: Any) -> str:
    """A short rendering of a JSON value for an error message."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    shown = repr(value)
    if len(shown) > _DESCRIBE_CHARS:
        shown = shown[: _DESCRIBE_CHARS - 3] + "..."
    return shown


def check_frame_size(kind: str, size: int, limit: int) -> None:
    """Refuse a `kind` ("text" or "binary") frame of `size` bytes above `limit` with 1009."""
    if size > limit:
        raise WsProtocolError(CloseCode.MESSAGE_TOO_BIG, f"{kind} frame of {size} bytes exceeds the {limit}-byte limit")


def parse_json_object(text: str, max_bytes: int) -> JsonFields:
    """A text frame's JSON object, after checking its size; anything else is a 1007 error."""
    check_frame_size("text", len(text.encode("utf-8", "surrogatepass")), max_bytes)
    try:
        value = bounded_json(text)
    except json.JSONDecodeError as exc:
        raise WsProtocolError(CloseCode.INVALID_PAYLOAD, f"invalid JSON: {exc.msg} at offset {exc.pos}") from None
    except JsonDepthError:
        raise WsProtocolError(CloseCode.INVALID_PAYLOAD, "invalid JSON: nested too deeply") from None
    except JsonNumberError as exc:
        raise WsProtocolError(CloseCode.INVALID_PAYLOAD, f"invalid JSON: {exc}") from None
    except ValueError:
        # The only other failure: an integer of more digits than
        # sys.get_int_max_str_digits() allows.
        raise WsProtocolError(CloseCode.INVALID_PAYLOAD, "invalid JSON: number has too many digits") from None
    if not isinstance(value, dict):
        raise WsProtocolError(CloseCode.INVALID_PAYLOAD, f"text frame must be a JSON object, not {describe(value)}")
    return JsonFields(value)


def parse_dtmf_digit(fields: JsonFields, key: str) -> str:
    """A DTMF key (0-9, *, #, A-D; a-d are taken as A-D); any other string is a 1008 error."""
    sent = fields.text(key)
    digit = sent.upper()
    if digit not in _DTMF_KEYS:
        raise WsProtocolError(
            CloseCode.POLICY_VIOLATION, f"{fields.path(key)} {describe(sent)} is not a DTMF digit (0-9, *, #, A-D)"
        )
    return digit


class JsonFields:
    """Typed access to the fields of one JSON object; every error names the field's path.

    A missing field or a value of the wrong JSON type is a 1007 (invalid payload) error,
    such as "media.timestamp must be a string, not 5". Booleans are never integers.
    """

    __slots__ = ("_object", "_prefix")

    def __init__(self, obj: dict[str, Any], prefix: str = "") -> None:
        self._object = obj
        self._prefix = prefix

    def path(self, key: str) -> str:
        """The dotted path of `key` from the top of the message, e.g. "start.mediaFormat.encoding"."""
        return f"{self._prefix}{key}"

    def has(self, key: str) -> bool:
        """Whether the field is present (with any value, null included)."""
        return key in self._object

    def text(self, key: str) -> str:
        """A required string field."""
        return self._typed(key, str, "a string")

    def optional_text(self, key: str, default: str = "") -> str:
        """A string field that may be absent (then `default`); present, it must be a string."""
        return self.text(key) if self.has(key) else default

    def integer(self, key: str) -> int:
        """A required integer field."""
        return self._typed(key, int, "an integer")

    def array(self, key: str) -> list[Any]:
        """A required array field."""
        return self._typed(key, list, "an array")

    def child(self, key: str) -> JsonFields:
        """A required object field, with paths prefixed by its own."""
        return JsonFields(self._typed(key, dict, "an object"), f"{self.path(key)}.")

    def string_map(self, key: str) -> dict[str, str]:
        """A required object field whose values are all strings."""
        child = self.child(key)
        return {name: child.text(name) for name in child._object}

    def _typed(self, key: str, kind: type, kind_name: str) -> Any:
        try:
            value = self._object[key]
        except KeyError:
            raise WsProtocolError(CloseCode.INVALID_PAYLOAD, f"missing field {self.path(key)}") from None
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise WsProtocolError(
                CloseCode.INVALID_PAYLOAD, f"{self.path(key)} must be {kind_name}, not {describe(value)}"
            )
        return value
