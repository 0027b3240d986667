"""The local backend: recordings published into a directory, served by signed URLs.

Publishing is write-to-temp (the spool), fsync, rename, so a reader never sees half a
file. The server signs its own short-lived URLs (`/files/<key>?expires=…&signature=…`)
with the same meaning as S3 presigned GETs: refused once expired or tampered with.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import time
from pathlib import Path
from urllib.parse import quote, urlencode

from mediaserver.errors import StorageError
from mediaserver.storage.base import ObjectInfo
from mediaserver.storage.spool import file_sha256


class LocalUpload:
    def __init__(self, storage: "LocalStorage", key: str, spool: Path) -> None:
        self.key = key
        self._storage = storage
        self._spool = spool

    async def pump(self) -> None:
        """Nothing to send early: the spool already is the file."""

    async def complete(self) -> ObjectInfo:
        return await asyncio.to_thread(self._publish)

    def _publish(self) -> ObjectInfo:
        target = self._storage.path(self.key)
        try:
            with open(self._spool, "rb+") as fh:
                os.fsync(fh.fileno())
            digest = file_sha256(self._spool)
            size = self._spool.stat().st_size
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self._spool, target)
            _fsync_dir(target.parent)
        except OSError as exc:
            raise StorageError(f"could not publish {self.key}: {exc}") from exc
        return ObjectInfo(self.key, size, digest)

    async def abort(self) -> None:
        """The spool stays where it is; nothing was published."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStorage:
    name = "local"

    def __init__(self, root: Path, secret: str, base_url: str, clock=time) -> None:
        self.root = root
        self._secret = secret.encode()
        self._base_url = base_url.rstrip("/")
        self._clock = clock

    def path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()) or ".." in Path(key).parts:
            raise StorageError(f"object key escapes the storage root: {key!r}")
        return path

    async def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def begin(self, key: str, spool: Path, content_type: str) -> LocalUpload:
        return LocalUpload(self, key, spool)

    async def resume(self, key: str, spool: Path, content_type: str) -> LocalUpload:
        return LocalUpload(self, key, spool)

    async def delete(self, key: str) -> None:
        try:
            await asyncio.to_thread(self.path(key).unlink, True)
        except OSError as exc:
            raise StorageError(f"could not delete {key}: {exc}") from exc

    async def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    async def stat(self, key: str) -> ObjectInfo:
        path = self.path(key)
        digest = await asyncio.to_thread(file_sha256, path)
        return ObjectInfo(key, path.stat().st_size, digest)

    async def close(self) -> None:
        pass

    # -- signed URLs -----------------------------------------------------------------

    def _signature(self, key: str, expires: int, filename: str, content_type: str) -> str:
        message = f"{key}\n{expires}\n{filename}\n{content_type}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    async def presign(self, key: str, expires_in: int, filename: str, content_type: str) -> str:
        expires = int(self._clock.time()) + expires_in
        query = urlencode({
            "expires": expires,
            "filename": filename,
            "type": content_type,
            "signature": self._signature(key, expires, filename, content_type),
        })
        return f"{self._base_url}/files/{quote(key)}?{query}"

    def verify(self, key: str, expires: str, filename: str, content_type: str, signature: str) -> bool:
        """Whether a `/files/` request carries a valid, unexpired signature."""
        try:
            when = int(expires)
        except ValueError:
            return False
        expected = self._signature(key, when, filename, content_type)
        # As bytes: compare_digest refuses str with non-ASCII characters, and a URL may carry any.
        sent = signature.encode("utf-8", "surrogatepass")
        return hmac.compare_digest(expected.encode(), sent) and when >= self._clock.time()
