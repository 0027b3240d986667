"""The composition root: builds the components in order and tears them down in reverse.

catalog → storage → outbox and webhook sender → engine → ingest services; the aiohttp
application routes requests to them. Every error leaves as the JSON envelope
`{"error": {"code", "message"}}` with a stable code; `errors_middleware` is the one place
where a refusal from a lower layer becomes an HTTP status.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
from typing import Any, AsyncIterator

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from mediaserver.api import forward, ingest_ws, ops, recordings, sessions, telephony, whip
from mediaserver.api.auth import authenticate
from mediaserver.api.common import error_response, refusal_response
from mediaserver.api.keys import CALLER, CATALOG, CLOCK, CONFIG, ENGINE, OUTBOX, SERVICES, STORAGE
from mediaserver.catalog import Catalog, PostgresCatalog, SqliteCatalog
from mediaserver.clock import SystemClock
from mediaserver.config import Config
from mediaserver.errors import Refused, ServiceError
from mediaserver.recorder.engine import Engine
from mediaserver.storage.local import LocalStorage
from mediaserver.webhooks import Outbox, WebhookSender

log = logging.getLogger(__name__)

_STATUS_CODES = {
    400: "request.invalid", 401: "auth.unauthorized", 403: "auth.forbidden", 404: "route.not_found",
    405: "route.method_not_allowed", 413: "request.too_large", 415: "request.unsupported_media_type",
}


@web.middleware
async def errors_middleware(request: web.Request, handler):
    """Every error as the JSON envelope: a domain refusal from any layer with the status of
    its kind (`refusal_response`), api/'s own `ServiceError` with the status it names,
    aiohttp's HTTP errors with a stable code, anything else as a logged 500."""
    try:
        return await handler(request)
    except Refused as exc:
        return refusal_response(exc)
    except ServiceError as exc:
        return error_response(exc.status, exc.code, exc.message, exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        code = _STATUS_CODES.get(exc.status, "request.error")
        message = exc.reason if exc.status != 413 else f"the request body is larger than {request.app[CONFIG].max_body_bytes} bytes"
        return error_response(exc.status, code, message, {k: v for k, v in exc.headers.items() if k == "Allow"})
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return error_response(500, "internal.error", "the server failed to handle this request; it has been logged")


@web.middleware
async def auth_middleware(request: web.Request, handler):
    path = request.path
    if path.startswith("/api/") or path.startswith("/v1/"):
        request[CALLER] = authenticate(request.app[CONFIG], request)
    return await handler(request)


class HttpServerLog(logging.LoggerAdapter):
    """The log aiohttp's request handler writes to (`logger=` of `web.run_app`).

    aiohttp reports a request its HTTP parser refuses, and a peer that hangs up while a
    response is being written, with a traceback (or, for a first request that is not
    HTTP at all, at debug level only). Both are the peer's doing, not a server fault: they
    become one WARNING line with the peer's address. Everything else passes unchanged,
    so a genuine failure in the server stays an ERROR with its traceback.
    """

    PEER_FAULTS = (HttpProcessingError, ConnectionError)

    def __init__(self, logger: logging.Logger | None = None) -> None:
        super().__init__(logger or logging.getLogger("aiohttp.server"), {})

    def log(self, level: int, msg: Any, *args: Any, exc_info: Any = None, **kwargs: Any) -> None:
        exc = _exception_of(exc_info)
        if isinstance(exc, self.PEER_FAULTS):
            text = (msg % args if args else str(msg)).replace("Error handling request", "refused a request")
            self.logger.warning("%s (%s)", text, _one_line(exc), **kwargs)
            return
        self.logger.log(level, msg, *args, exc_info=exc_info, **kwargs)


def _exception_of(exc_info: Any) -> BaseException | None:
    if isinstance(exc_info, BaseException):
        return exc_info
    if isinstance(exc_info, tuple):
        return exc_info[1]
    return sys.exc_info()[1] if exc_info else None


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = re.sub(r"\s+", " ", f"{type(exc).__name__}: {exc}").strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def make_storage(config: Config, clock):
    if config.storage == "s3":
        from mediaserver.storage.s3 import S3Storage

        return S3Storage(config.s3())
    return LocalStorage(config.data_dir, config.secret_key, config.base_url, clock)


def make_catalog(config: Config) -> Catalog:
    """The catalog the config asks for: a SQLite file in data_dir, or a cluster's PostgreSQL."""
    if config.catalog == "postgres":
        return PostgresCatalog(config.postgres_dsn, config.node().node_id)
    return SqliteCatalog(config.data_dir / "catalog.sqlite3")


async def _components(app: web.Application) -> AsyncIterator[None]:
    config, clock = app[CONFIG], app[CLOCK]
    catalog = app[CATALOG] = make_catalog(config)
    storage = app[STORAGE] = make_storage(config, clock)
    apps = {a.id: a for a in config.apps}
    outbox = app[OUTBOX] = Outbox(catalog, apps, clock)
    sender = WebhookSender(catalog, apps, clock, timeout_s=config.webhook_timeout_s,
                           max_age_s=config.webhook_max_age_h * 3600, wakeup=outbox.wakeup)
    engine = app[ENGINE] = Engine(config.engine(), catalog, storage, outbox, clock)
    try:
        await catalog.start()
        await storage.start()
        sender.start()
        await engine.start()
        await _start_services(app)
        yield
    finally:
        await _close_services(app)
        await engine.close()
        await sender.close()
        await storage.close()
        await catalog.close()


async def _start_services(app: web.Application) -> None:
    """Ingest services beyond HTTP (RTP, SIP, WebRTC) that are installed in this build."""
    for name, factory in _service_factories():
        service = factory(app)
        if service is not None:
            await service.start()
            app[SERVICES][name] = service


async def _close_services(app: web.Application) -> None:
    for name, service in reversed(list(app[SERVICES].items())):
        try:
            await service.close()
        except Exception:
            log.exception("closing the %s service failed", name)
    app[SERVICES].clear()


def _service_factories():
    """(name, factory) of the ingest services beyond HTTP; a factory takes the application
    and returns an object with `async start()` and `async close()`, or None to stay off."""
    return [(whip.SERVICE_NAME, whip.make_service), ("rtp", telephony.make_rtp_service), ("sip", telephony.make_sip_service)]


def make_app(config: Config, clock=None) -> web.Application:
    """The aiohttp application for `config` (secrets and apps already filled in)."""
    middlewares = [errors_middleware, auth_middleware]
    if config.catalog == "postgres":
        middlewares.append(forward.forward_middleware)
    app = web.Application(middlewares=middlewares, client_max_size=config.max_body_bytes)
    app[CONFIG] = config
    app[CLOCK] = clock or SystemClock()
    app[SERVICES] = {}
    app.cleanup_ctx.append(_components)
    if config.catalog == "postgres":
        app.cleanup_ctx.append(forward.client_ctx)
    ops.setup(app)
    sessions.setup(app)
    recordings.setup(app)
    ingest_ws.setup(app)
    whip.setup(app)
    return app
