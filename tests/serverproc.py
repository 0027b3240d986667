"""`mediaserver serve` as a real process, for tests that kill and restart it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp

from servers import APP1, APP2

from mediaserver.tools import serverproc


class ServerProcess(serverproc.ServerProcess):
    """The tests' two apps, recordings under `data_dir`, the log beside it."""

    def __init__(self, data_dir: Path, **settings) -> None:
        super().__init__(data_dir, [APP1, APP2], **settings)

    def rss_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")


async def settled(http: aiohttp.ClientSession, rid: str, tries: int = 100, every_s: float = 0.1) -> dict[str, Any]:
    """The recording's metadata once it is `completed`, or as it is after `tries` polls."""
    for _ in range(tries):
        async with http.get(f"/api/v1/recordings/{rid}") as response:
            meta = await response.json()
        if meta["state"] == "completed":
            break
        await asyncio.sleep(every_s)
    return meta
