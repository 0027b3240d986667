"""Helpers shared by the route modules: the error envelope and how each kind of refusal
is answered, JSON bodies, paging, time formats."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from aiohttp import web

from mediaserver import jsonsafe
from mediaserver.errors import (Conflict, Forbidden, Gone, Invalid, NotFound, NotSupported, RateLimited, Refused,
                                Unacceptable, Unauthorized, Unavailable, UnsupportedMedia)

MAX_PAGE = 500
MAX_OFFSET = 2**63 - 1  # SQLite's largest INTEGER

REFUSAL_STATUS: dict[type[Refused], int] = {
    Invalid: 400, Unauthorized: 401, Forbidden: 403, NotFound: 404, Unacceptable: 406, Conflict: 409, Gone: 410,
    UnsupportedMedia: 415, RateLimited: 429, NotSupported: 501, Unavailable: 503,
}


def error_body(code: str, message: str) -> dict[str, Any]:
    """The JSON envelope every error is answered with."""
    return {"error": {"code": code, "message": message}}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=json.dumps(error_body(code, message)), content_type="application/json", headers=headers)


def refusal_status(refusal: Refused) -> int:
    """The HTTP status of a kind of refusal (a subclass answers as its nearest listed kind).

    A `Refused` of no listed kind is a bug of the server's, not the client's: 500.
    """
    for kind in type(refusal).__mro__:
        status = REFUSAL_STATUS.get(kind)
        if status is not None:
            return status
    return 500


def refusal_response(refusal: Refused) -> web.Response:
    """The HTTP answer to a refusal from any layer: its status, the envelope, and for
    `RateLimited` (and an `Unavailable` that says when) the `Retry-After` header (RFC 9110 §10.2.3) in whole seconds, for
    `Unauthorized` the `WWW-Authenticate` challenge (RFC 6750)."""
    headers = None
    if isinstance(refusal, (RateLimited, Unavailable)) and refusal.retry_after_s is not None:
        headers = {"Retry-After": str(refusal.retry_after_s)}
    elif isinstance(refusal, Unauthorized):
        headers = {"WWW-Authenticate": 'Bearer realm="mediaserver"'}
    return error_response(refusal_status(refusal), refusal.code, refusal.message, headers)


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(name: str, value: str | None) -> float | None:
    """A query time as ISO 8601 (with or without zone; UTC assumed) or Unix seconds."""
    if value is None or value == "":
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise Invalid("request.invalid_query", f"{name} must be an ISO 8601 time or Unix seconds, not {value!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.timezone.utc)
    return parsed.timestamp()


def paging(request: web.Request, default: int = 50) -> tuple[int, int]:
    try:
        limit = int(request.query.get("limit", default))
        offset = int(request.query.get("offset", 0))
    except ValueError:
        raise Invalid("request.invalid_query", "limit and offset must be integers") from None
    if not 1 <= limit <= MAX_PAGE or not 0 <= offset <= MAX_OFFSET:
        raise Invalid("request.invalid_query", f"limit must be 1..{MAX_PAGE} and offset 0..{MAX_OFFSET}")
    return limit, offset


def page(data: list[Any], total: int, limit: int, offset: int) -> dict[str, Any]:
    return {"data": data, "pagination": {"total": total, "limit": limit, "offset": offset, "has_more": offset + len(data) < total}}


async def json_body(request: web.Request, *, optional: bool = True) -> Any:
    """The request's JSON body (None when empty and optional), or 400 with a clear code."""
    raw = await request.read()
    if not raw.strip():
        if optional:
            return None
        raise Invalid("request.invalid_json", "a JSON body is required")
    return parse_json(raw)


def parse_json(raw: bytes) -> Any:
    """An untrusted JSON document (UTF-8, -16 or -32, as RFC 8259 §8.1 allows), bounded in
    depth before it is parsed; anything else is a 400 `request.invalid_json`."""
    try:
        return jsonsafe.loads(raw.decode(json.detect_encoding(raw)))
    except UnicodeDecodeError as exc:
        raise Invalid("request.invalid_json", f"the body is not valid JSON: {exc.reason} at byte {exc.start}") from None
    except jsonsafe.JsonDepthError as exc:
        raise Invalid("request.invalid_json", f"the body is nested too deep: {exc}") from None
    except json.JSONDecodeError as exc:
        raise Invalid("request.invalid_json", f"the body is not valid JSON: {exc}") from None
    except ValueError as exc:  # JsonNumberError, or an integer of too many digits
        raise Invalid("request.invalid_json", f"the body is not valid JSON: {exc}") from None


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(data, status=status, headers=headers)
