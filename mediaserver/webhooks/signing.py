"""Webhook signatures: `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, body + "." + t)>`."""

from __future__ import annotations

import hashlib
import hmac

SIGNATURE_HEADER = "X-Mediaserver-Signature"


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The signature header value for `body` sent at `timestamp`."""
    mac = hmac.new(secret.encode(), body + b"." + str(timestamp).encode(), hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify(secret: str, body: bytes, header: str, now: float, tolerance_s: float = 300.0) -> bool:
    """Whether `header` signs `body` with `secret` within `tolerance_s` of `now`."""
    parts = dict(item.split("=", 1) for item in header.split(",") if "=" in item)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance_s:
        return False
    expected = sign(secret, body, timestamp).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))
