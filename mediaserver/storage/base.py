"""The interface every storage backend offers the engine."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int
    sha256: str
    etag: str | None = None


class Upload(Protocol):
    """One recording's way from its spool file to a stored object."""

    key: str

    async def pump(self) -> None:
        """Send whatever the spool holds that can go now (S3: every full part)."""

    async def complete(self) -> ObjectInfo:
        """The spool is final: store the object and say what was stored."""

    async def abort(self) -> None:
        """Give up: nothing is stored; the spool file is left for inspection."""


class Storage(Protocol):
    name: str

    async def start(self) -> None:
        """Connect, check the bucket, clean up what a crash left behind."""

    def begin(self, key: str, spool: Path, content_type: str) -> Upload:
        """An upload for a spool that is about to be written; does no I/O, cannot fail."""

    async def resume(self, key: str, spool: Path, content_type: str) -> Upload:
        """After a restart: the upload of a spool that was being written (journal permitting)."""

    async def stat(self, key: str) -> ObjectInfo: ...

    async def presign(self, key: str, expires_in: int, filename: str, content_type: str) -> str:
        """A URL that GETs the object (with Range) for `expires_in` seconds, then is refused."""

    async def delete(self, key: str) -> None: ...

    async def exists(self, key: str) -> bool: ...

    async def close(self) -> None: ...


def object_key(template: str, app_id: str, recording_id: str, ext: str, created: dt.datetime) -> str:
    """The object key of a recording from the configured template."""
    return template.format(
        app_id=app_id,
        recording_id=recording_id,
        ext=ext,
        yyyy=f"{created.year:04d}",
        mm=f"{created.month:02d}",
        dd=f"{created.day:02d}",
    )
