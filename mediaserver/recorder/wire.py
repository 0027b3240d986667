"""Messages between the server process and its worker processes, and the channel that
carries them: pickled lists, each framed by its length, over a local socket pair.

Server → worker: `Setup` (first), `NewSession`, `NewLeg`, `Post` (a session inbox message
of `recorder.messages`), `Expedite`, `Request`, `Exit`.
Worker → server: `Results`, `Reply`, `TapAudio`, `Stats`.

A `Request` names a worker method and its arguments; its `ident` is None when no reply is
wanted, else the `Reply` carries the same ident and either the value or the exception the
method raised, pickled as itself (or a RuntimeError naming it, if it cannot be pickled).
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from dataclasses import dataclass
from typing import Any

@dataclass(frozen=True, slots=True)
class Setup:
    settings: Any  # the worker's WorkerSettings
    index: int
    count: int


@dataclass(frozen=True, slots=True)
class NewSession:
    uuid: str
    app_id: str
    t0: float
    rate: int
    jitter_s: float


@dataclass(frozen=True, slots=True)
class NewLeg:
    uuid: str
    leg_id: str
    role: str
    at_mono: float


@dataclass(frozen=True, slots=True)
class Post:
    uuid: str
    message: Any  # a recorder.messages message


@dataclass(frozen=True, slots=True)
class Expedite:
    """Process the session now, not at its turn: an ingest waits for its mix."""

    uuid: str


@dataclass(frozen=True, slots=True)
class Request:
    ident: int | None  # None: no reply wanted
    name: str
    args: tuple


@dataclass(frozen=True, slots=True)
class Exit:
    pass


@dataclass(frozen=True, slots=True)
class SessionResult:
    """One session's turn as a worker reports it; `progress`: leg_id -> (applied, ahead)."""

    uuid: str
    events: list
    ended: bool
    progress: dict[str, tuple[int, int]]


@dataclass(frozen=True, slots=True)
class Results:
    results: list[SessionResult]


@dataclass(frozen=True, slots=True)
class Reply:
    ident: int
    value: Any = None
    error: BaseException | None = None


@dataclass(frozen=True, slots=True)
class TapAudio:
    uuid: str
    token: int
    pcm: bytes | None  # None: the recording ended


@dataclass(frozen=True, slots=True)
class Stats:
    lateness: tuple  # (buckets, count, sum, max)
    errors: int
    dropped: dict[str, int]
    sessions: int


def portable(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling as itself, else a RuntimeError that names it."""
    try:
        if type(pickle.loads(pickle.dumps(exc))) is type(exc):
            return exc
    except Exception:
        pass
    return RuntimeError(f"{type(exc).__name__}: {exc}")


_LENGTH = struct.Struct("!I")
MAX_FRAME = 256 * 1024 * 1024


class Channel:
    """Both directions of a socket pair's end; `send` gathers messages and writes them once
    per event-loop iteration, so a burst of small messages costs one system call."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._pending: list = []
        self._scheduled = False

    @classmethod
    async def open(cls, sock) -> "Channel":
        reader, writer = await asyncio.open_connection(sock=sock, limit=MAX_FRAME)
        return cls(reader, writer)

    def send(self, message: Any) -> None:
        self._pending.append(message)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if not self._pending or self._writer.is_closing():
            self._pending.clear()
            return
        data = pickle.dumps(self._pending, protocol=5)
        self._pending = []
        self._writer.write(_LENGTH.pack(len(data)) + data)

    async def drain(self) -> None:
        self._flush()
        await self._writer.drain()

    async def receive(self) -> list:
        """The next batch of messages; EOFError when the other side has gone."""
        try:
            header = await self._reader.readexactly(_LENGTH.size)
            (length,) = _LENGTH.unpack(header)
            return pickle.loads(await self._reader.readexactly(length))
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise EOFError("the other process has gone") from exc

    async def close(self) -> None:
        self._flush()
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (ConnectionError, OSError):
            pass
