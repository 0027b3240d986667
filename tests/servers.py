"""A real server for end-to-end tests: `make_app` on a loopback socket, in this process.

`Server(tmp_path, webhook_url=..., command_cooldown_s=...)` is an async context manager;
settings are the server's own names (as in MEDIASERVER_<NAME>). Two apps are configured,
so tests can check that one app cannot see the other's resources.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from mediaserver import config as config_module
from mediaserver.api.app import make_app
from mediaserver.api.keys import ENGINE
from mediaserver.tools.ports import free_port, free_udp_range  # noqa: F401 - also for the tests

APP1 = {"id": "app1", "key": "key-one-0123456789", "webhook_secret": "whsec-one"}
APP2 = {"id": "app2", "key": "key-two-0123456789", "webhook_secret": "whsec-two"}


class SteppedClock:
    """The system's clocks moved on by `advance()`: a test of a timeout steps over it
    instead of sleeping through it (everything else keeps running in real time)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def advance(self, seconds: float) -> None:
        self.offset += seconds

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def time(self) -> float:
        return time.time() + self.offset


class Server:
    def __init__(self, tmp_path: Path, webhook_url: str | None = None, clock=None, **settings: Any) -> None:
        self.data_dir = tmp_path / "data"
        self.webhook_url = webhook_url
        self.clock = clock  # the server's clock (a SteppedClock to test timeouts without waiting)
        self.settings = settings
        self.http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "Server":
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.config = self.make_config()
        self.app = make_app(self.config, self.clock)
        self.runner = web.AppRunner(self.app, handle_signals=False)
        await self.runner.setup()
        await web.SockSite(self.runner, self._sock).start()
        self.http = aiohttp.ClientSession(self.base_url)
        return self

    def make_config(self) -> config_module.Config:
        apps = [dict(APP1, webhook_url=self.webhook_url), dict(APP2, webhook_url=self.webhook_url)]
        rtp_min, rtp_max = free_udp_range()
        env = {
            "MEDIASERVER_DATA_DIR": str(self.data_dir),
            "MEDIASERVER_HTTP_PORT": str(self.port),
            "MEDIASERVER_PUBLIC_URL": self.base_url,
            "MEDIASERVER_APPS": json.dumps(apps),
            "MEDIASERVER_COMMAND_COOLDOWN_S": "0",
            "MEDIASERVER_SIP_PORT": str(free_port()),
            "MEDIASERVER_RTP_PORT_MIN": str(rtp_min),
            "MEDIASERVER_RTP_PORT_MAX": str(rtp_max),
        }
        for name, value in self.settings.items():
            env[f"MEDIASERVER_{name.upper()}"] = str(value)
        config = config_module.load(environ=env)
        return config_module.with_generated_secrets(config)[0]

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()
            self.http = None
        await self.runner.cleanup()

    @property
    def engine(self):
        return self.app[ENGINE]

    def headers(self, app: dict = APP1) -> dict[str, str]:
        return {"X-App-ID": app["id"], "X-API-Key": app["key"]}

    async def api(self, method: str, path: str, app: dict = APP1, **kwargs) -> tuple[int, Any, aiohttp.ClientResponse]:
        headers = {**self.headers(app), **kwargs.pop("headers", {})}
        async with self.http.request(method, path, headers=headers, allow_redirects=False, **kwargs) as response:
            body = await response.read()
            try:
                data = json.loads(body) if body else None
            except ValueError:
                data = body
            return response.status, data, response

    async def create_session(self, app: dict = APP1, **body) -> dict:
        status, data, _ = await self.api("POST", "/api/v1/sessions", app, json=body or None)
        assert status == 201, data
        return data

    async def command(self, uuid: str, kind: str, app: dict = APP1, **body) -> tuple[int, Any]:
        status, data, _ = await self.api("POST", f"/api/v1/sessions/{uuid}/commands/record/{kind}", app, json=body or None)
        return status, data

    async def wait_recording(self, recording_id: str, states=("completed",), timeout: float = 30.0, app: dict = APP1) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            status, data, _ = await self.api("GET", f"/api/v1/recordings/{recording_id}", app)
            assert status == 200, data
            if data["state"] in states:
                return data
            assert time.monotonic() < deadline, f"recording stayed {data['state']}"
            await asyncio.sleep(0.05)

    async def download(self, recording_id: str, app: dict = APP1) -> bytes:
        status, data, response = await self.api("GET", f"/api/v1/recordings/{recording_id}/download", app)
        assert status == 302, data
        async with self.http.get(response.headers["Location"]) as file:
            assert file.status == 200
            return await file.read()
