"""WebSocket ingest routes (wavstream and Twilio Media Streams)."""

from __future__ import annotations

from aiohttp import web


def setup(app: web.Application) -> None:
    pass
