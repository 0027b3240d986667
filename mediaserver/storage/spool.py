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
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

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

    def flush_due(self) -> None:
        """Write what is gathered if it has waited `max_delay_s`, even with no new append:
        an encoder that has gone quiet must not keep the last of the audio from the disk."""
        if self._buffer and self._clock() - self._since >= self._max_delay:
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


# -- the legs checkpoint -------------------------------------------------------------------
# Beside the spool, what its recording knew of its legs (their counters) when the spool was
# last written: a restarted server recovers the audio from the spool and the legs from here.


def checkpoint_path(spool: Path) -> Path:
    return spool.with_name(spool.name + ".legs.json")


def write_checkpoint(spool: Path, legs: list[dict[str, Any]]) -> None:
    """Replace the checkpoint whole (write-to-temp, rename): a crash leaves the old or the new.

    Not synced to disk, like the spool's own appends: it outlives the process, which is
    what it is for."""
    target = checkpoint_path(spool)
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(json.dumps(legs, separators=(",", ":")))
    os.replace(tmp, target)


def read_checkpoint(spool: Path) -> list[dict[str, Any]] | None:
    """The legs last checkpointed beside `spool`, or None when there is none (or it cannot be read)."""
    try:
        legs = json.loads(checkpoint_path(spool).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable legs checkpoint of %s: %s", spool, exc)
        return None
    return legs if isinstance(legs, list) else None


def remove_checkpoint(spool: Path) -> None:
    checkpoint_path(spool).unlink(missing_ok=True)
