"""Typed keys of the objects the aiohttp application carries."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from mediaserver.catalog import Catalog
from mediaserver.config import App, Config
from mediaserver.recorder.engine import Engine
from mediaserver.storage import Storage
from mediaserver.webhooks import Outbox

CONFIG = web.AppKey("config", Config)
CLOCK = web.AppKey("clock", Any)
CATALOG = web.AppKey("catalog", Catalog)
STORAGE = web.AppKey("storage", Storage)
OUTBOX = web.AppKey("outbox", Outbox)
ENGINE = web.AppKey("engine", Engine)
SERVICES = web.AppKey("services", dict)  # optional ingest services (rtp, sip, webrtc) by name

CALLER = web.RequestKey("caller", App)  # the app a request is authenticated as
