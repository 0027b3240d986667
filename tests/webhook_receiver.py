"""A real webhook endpoint on loopback that checks signatures and can fail on purpose."""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict

from aiohttp import web

from mediaserver.webhooks import SIGNATURE_HEADER, verify


class Receiver:
    """Answers 500 to the first `fail_first` attempts of every event, 200 afterwards."""

    def __init__(self, secrets: dict[str, str], fail_first: int = 0, port: int = 0) -> None:
        self.secrets = secrets
        self.port = port
        self.fail_first = fail_first
        self.attempts: dict[str, int] = defaultdict(int)
        self.events: list[dict] = []  # delivered (answered 200), in order
        self.bad_signatures = 0
        self.bodies: list[dict] = []

    async def __aenter__(self) -> "Receiver":
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        app.router.add_post("/action", self._hook)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/hook"
        self.action_url = f"http://127.0.0.1:{port}/action"
        return self

    async def __aexit__(self, *exc) -> None:
        await self.runner.cleanup()

    async def _hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        event = json.loads(body)
        secret = self.secrets.get(event.get("app_id"))
        if secret is None or not verify(secret, body, request.headers.get(SIGNATURE_HEADER, ""), time.time()):
            self.bad_signatures += 1
            return web.Response(status=401)
        self.attempts[event["event_id"]] += 1
        if self.attempts[event["event_id"]] <= self.fail_first:
            return web.Response(status=500)
        event["_path"] = request.path
        self.events.append(event)
        return web.Response(status=200)

    def of_kind(self, kind: str, path: str = "/hook") -> list[dict]:
        return [e for e in self.events if e["event_kind"] == kind and e["_path"] == path]

    async def wait_for(self, kind: str, count: int = 1, timeout: float = 30.0, path: str = "/hook") -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(self.of_kind(kind, path)) < count:
            assert time.monotonic() < deadline, f"no {kind} delivered; got {[e['event_kind'] for e in self.events]}"
            await asyncio.sleep(0.05)
        return self.of_kind(kind, path)
