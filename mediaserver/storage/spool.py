"""The spool: a recording's encoded bytes on local disk while it is being made.

Appends go straight to the file, unbuffered: the operating system keeps them if this
process dies, and an uploader reading the file from another thread sees every byte that
`size` counts. `patch` rewrites bytes already written, which WAV sizes and the MP3 info
frame need once the length is known.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

CHUNK = 1 << 16


class Spool:
    def __init__(self, path: Path, *, append: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = open(path, "r+b" if append and path.exists() else "w+b", buffering=0)  # noqa: SIM115 - closed in close()
        self._file.seek(0, os.SEEK_END)
        self.size = self._file.tell()
        self.patched_from: int | None = None  # lowest offset rewritten by a patch

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = self._file.write(view)
            view = view[written:]
        self.size += len(data)

    def patch(self, offset: int, data: bytes) -> None:
        if offset + len(data) > self.size:
            raise ValueError("a patch may only rewrite bytes already written")
        os.pwrite(self._file.fileno(), data, offset)
        self.patched_from = offset if self.patched_from is None else min(self.patched_from, offset)

    def sync(self) -> None:
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            self.sync()
            self._file.close()

    @property
    def closed(self) -> bool:
        return self._file.closed


def file_sha256(path: Path) -> str:
    """The file's sha256, read through one small reused buffer (no allocation per chunk)."""
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()
