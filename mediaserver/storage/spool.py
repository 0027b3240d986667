"""The spool: a recording's encoded bytes on local disk while it is being made.

Appends are gathered up to `buffer_bytes` or `max_delay_s`, whichever comes first, then
written unbuffered: the operating system keeps them if this process dies (so a crash
loses at most that much), and an uploader reading the file from another thread sees every
byte that `written` counts. A few hundred calls each writing a few hundred bytes every
turn would otherwise cost a system call per call per turn. `patch` rewrites bytes already
written, which WAV sizes and the MP3 info frame need once the length is known.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

CHUNK = 1 << 16


class Spool:
    def __init__(self, path: Path, *, append: bool = False, buffer_bytes: int = 8192, max_delay_s: float = 0.5,
                 clock=time.monotonic) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = open(path, "r+b" if append and path.exists() else "w+b", buffering=0)  # noqa: SIM115 - closed in close()
        self._file.seek(0, os.SEEK_END)
        self.written = self._file.tell()  # bytes in the file
        self.size = self.written  # bytes in the file and in the buffer
        self.patched_from: int | None = None  # lowest offset rewritten by a patch
        self._buffer = bytearray()
        self._buffer_bytes = buffer_bytes
        self._max_delay = max_delay_s
        self._clock = clock
        self._since = 0.0

    def write(self, data: bytes) -> None:
        if not self._buffer:
            self._since = self._clock()
        self._buffer += data
        self.size += len(data)
        if len(self._buffer) >= self._buffer_bytes or self._clock() - self._since >= self._max_delay:
            self.flush()

    def flush(self) -> None:
        """Write what is gathered to the file."""
        view = memoryview(self._buffer)
        while view:
            written = self._file.write(view)
            view = view[written:]
        view.release()
        self.written += len(self._buffer)
        self._buffer.clear()

    def patch(self, offset: int, data: bytes) -> None:
        self.flush()
        if offset + len(data) > self.written:
            raise ValueError("a patch may only rewrite bytes already written")
        os.pwrite(self._file.fileno(), data, offset)
        self.patched_from = offset if self.patched_from is None else min(self.patched_from, offset)

    def sync(self) -> None:
        self.flush()
        os.fsync(self._file.fileno())

    def close(self, sync: bool = True) -> None:
        """Write what is gathered and close; `sync` also waits for the disk (fsync)."""
        if not self._file.closed:
            self.flush()
            if sync:
                os.fsync(self._file.fileno())
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
