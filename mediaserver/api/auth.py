"""Who is calling: API credentials, and signed ingest tokens for clients without headers.

API routes take `X-App-ID` + `X-API-Key`, or `Authorization: Bearer <key>` (the key alone
identifies the app). Ingest URLs handed out by `POST /api/v1/sessions` carry a token that
names the app and the session and expires; it is accepted on the ingest routes only.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

from aiohttp import web

from mediaserver import jsonsafe
from mediaserver.config import App, Config
from mediaserver.errors import ServiceError

TOKEN_VERSION = "v1"


def _unauthorized(message: str) -> ServiceError:
    return ServiceError(401, "auth.unauthorized", message, {"WWW-Authenticate": 'Bearer realm="mediaserver"'})


def app_from_headers(config: Config, request: web.Request) -> App | None:
    """The app whose credentials the request carries, None when it carries none."""
    app_id = request.headers.get("X-App-ID")
    key = request.headers.get("X-API-Key")
    auth = request.headers.get("Authorization", "")
    if app_id is None and key is None and not auth:
        return None
    if auth:
        scheme, _, bearer = auth.partition(" ")
        if scheme.lower() != "bearer" or not bearer.strip():
            raise _unauthorized("Authorization must be 'Bearer <key>'")
        return _by_key(config, bearer.strip(), app_id)
    if not app_id or not key:
        raise _unauthorized("both X-App-ID and X-API-Key are required")
    return _by_key(config, key, app_id)


def header_bytes(value: str) -> bytes:
    """A header value as the bytes that came on the wire, to compare in constant time.
    aiohttp decodes headers as UTF-8 with surrogateescape, which this undoes; any other
    lone surrogate is kept by surrogatepass, so that no text fails to encode."""
    try:
        return value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogatepass")


def _by_key(config: Config, key: str, app_id: str | None) -> App:
    sent = header_bytes(key)
    # Every app's key is compared, so the time taken does not tell which one came close.
    matches = [app for app in config.apps if hmac.compare_digest(app.key.encode(), sent)]
    for app in matches:
        if app_id is None or header_bytes(app.id) == header_bytes(app_id):
            return app
    raise _unauthorized("wrong credentials")


def authenticate(config: Config, request: web.Request) -> App:
    app = app_from_headers(config, request)
    if app is None:
        raise _unauthorized("credentials are required: X-App-ID and X-API-Key, or Authorization: Bearer")
    return app


def make_token(secret: str, app_id: str, session_uuid: str, expires: int) -> str:
    payload = base64.urlsafe_b64encode(json.dumps({"a": app_id, "s": session_uuid, "e": expires}, separators=(",", ":")).encode()).rstrip(b"=").decode()
    return f"{TOKEN_VERSION}.{payload}.{_mac(secret, payload)}"


def _mac(secret: str, payload: str) -> str:
    return hmac.new(secret.encode(), header_bytes(f"{TOKEN_VERSION}.{payload}"), hashlib.sha256).hexdigest()[:40]


def check_token(config: Config, token: str, session_uuid: str, now: float) -> App:
    """The app a valid, unexpired token for `session_uuid` was issued to, else 401."""
    parts = token.split(".")
    if len(parts) != 3:
        raise _unauthorized("malformed ingest token")
    version, payload, mac = parts
    # The signature is checked before the payload is decoded, so only text this server
    # signed ever reaches the JSON parser.
    if version != TOKEN_VERSION or not hmac.compare_digest(_mac(config.secret_key, payload).encode(), header_bytes(mac)):
        raise _unauthorized("invalid ingest token")
    try:
        data = jsonsafe.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)).decode())
    except ValueError:  # bad base64, not UTF-8, not JSON
        raise _unauthorized("malformed ingest token") from None
    if not isinstance(data, dict) or data.get("s") != session_uuid:
        raise _unauthorized("the ingest token is for another session")
    if not isinstance(data.get("e"), int) or data["e"] < now:
        raise _unauthorized("the ingest token has expired")
    app = config.app(data.get("a"))
    if app is None:
        raise _unauthorized("the ingest token names an unknown app")
    return app


def ingest_app(config: Config, request: web.Request, session_uuid: str | None, now: float) -> App:
    """Headers when present, else `?token=` (bound to `session_uuid`)."""
    app = app_from_headers(config, request)
    if app is not None:
        return app
    token = request.query.get("token")
    if token is None or session_uuid is None:
        raise _unauthorized("credentials are required: API headers or an ingest token")
    return check_token(config, token, session_uuid, now)


