"""Messages between the server process and its worker processes: pickled lists, each
framed by its length, over a local socket pair."""

from __future__ import annotations

import asyncio
import pickle
import struct

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

    def send(self, message: tuple) -> None:
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
