"""The server process's side of a worker process: the worker itself (`RemoteShard`), and
stand-ins for what runs in it (`RemoteSession`, `RemoteRtpMedia`).

A `RemoteSession` takes the same calls as a `Session` (the `SessionPort` of
`recorder.session`), so ingest and commands do not care where a session runs; it forwards
them to its worker as the messages of `recorder.wire`.
What the worker's sessions report comes back through `on_results`, as for sessions of
this process.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import subprocess
import sys
from collections import deque
from typing import Any, Awaitable, Callable

import numpy as np

from mediaserver.config import WorkerSettings
from mediaserver.media import PcmFrame
from mediaserver.recorder.processor import LatenessHistogram, Result
from mediaserver.recorder.rtpmedia import format_spec
from mediaserver.recorder.messages import Command, Counters, EndLeg, Hangup, Message, Pcm, Tap
from mediaserver.recorder.session import LegInput, PostingCalls
from mediaserver.recorder.wire import (Channel, Exit, Expedite, NewLeg, NewSession, Post, Reply, Request, Results, Setup,
                                        Stats, TapAudio)
from mediaserver.tasks import cancel_and_wait

log = logging.getLogger(__name__)

COUNTERS_EVERY = 50  # packets of a PCM leg between two updates of its counters (1 s at 20 ms)


class WorkerGone(OSError):
    """The worker process running a session has exited."""


class RemoteShard:
    """One worker process and the channel to it."""

    def __init__(self, settings: WorkerSettings, index: int, count: int, on_results: Callable[[list[Result]], Awaitable[None]],
                 on_gone: Callable[["RemoteShard"], Awaitable[None]]) -> None:
        self.settings = settings
        self.index = index
        self.count = count
        self.sessions: dict[str, RemoteSession] = {}
        self.lateness = LatenessHistogram()
        self.errors = 0
        self.dropped: dict[str, int] = {}
        self._on_results = on_results
        self._on_gone = on_gone
        self._process = None
        self._channel: Channel | None = None
        self._reader: asyncio.Task | None = None
        self._requests: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._taps: dict[int, Callable] = {}
        self._closing = False

    async def start(self) -> None:
        """Start the worker (`python -m mediaserver.recorder.worker`) with its end of a socket
        pair; its settings are the first message."""
        ours, theirs = socket.socketpair()
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "mediaserver.recorder.worker", str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        self._channel = await Channel.open(ours)
        self._channel.send(Setup(self.settings, self.index, self.count))
        self._reader = asyncio.create_task(self._read(), name=f"worker-{self.index}-reader")

    async def close(self) -> None:
        """Tell the worker to leave, wait for it, and close the channel; idempotent."""
        if self._closing:
            return
        self._closing = True
        if self._channel is not None:
            self._channel.send(Exit())
            await self._channel.drain()
        if self._process is not None:
            try:
                await asyncio.to_thread(self._process.wait, 15)
            except subprocess.TimeoutExpired:
                self._process.kill()
                await asyncio.to_thread(self._process.wait, 5)
        await cancel_and_wait(self._reader)
        if self._channel is not None:
            await self._channel.close()

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def send(self, message: Any) -> None:
        self._channel.send(message)

    async def request(self, name: str, *args: Any) -> Any:
        """Call the worker's `name(*args)` and return its value (or raise its exception)."""
        ident = next(self._ids)
        future = self._requests[ident] = asyncio.get_running_loop().create_future()
        self.send(Request(ident, name, args))
        return await future

    def call(self, name: str, *args: Any) -> None:
        """Call the worker's `name(*args)` without waiting: no reply comes (the worker logs a failure)."""
        self.send(Request(None, name, args))

    def add_tap(self, listener: Callable) -> int:
        token = next(self._ids)
        self._taps[token] = listener
        return token

    def tap_token(self, listener: Callable) -> int | None:
        return next((token for token, known in self._taps.items() if known is listener), None)

    async def _read(self) -> None:
        try:
            while True:
                for message in await self._channel.receive():
                    await self._dispatch(message)
        except EOFError:
            pass
        for future in self._requests.values():
            if not future.done():
                future.set_exception(WorkerGone(f"worker {self.index} has exited"))
        self._requests.clear()
        if not self._closing:
            await asyncio.to_thread(self._process.wait)
            log.error("worker %d exited unexpectedly", self.index)
            await self._on_gone(self)

    async def _dispatch(self, message) -> None:
        match message:
            case Results(items):
                results = []
                for item in items:
                    session = self.sessions.get(item.uuid)
                    if session is not None:
                        session.progress(item.progress)
                        if item.ended:
                            session.ended = True
                            self.sessions.pop(item.uuid, None)
                    results.append(Result(item.uuid, item.events, item.ended))
                await self._on_results(results)
            case Reply(ident, value, error):
                self._reply(ident, value, error)
            case TapAudio(uuid, token, pcm):
                self._relay_tap(uuid, token, pcm)
            case Stats():
                self._stats(message)

    def _reply(self, ident: int, value: Any, error: BaseException | None) -> None:
        future = self._requests.pop(ident, None)
        if future is None or future.done():
            return
        if error is None:
            future.set_result(value)
        else:
            future.set_exception(error)

    def _relay_tap(self, uuid: str, token: int, data: bytes | None) -> None:
        listener = self._taps.get(token)
        if listener is None:
            return
        if data is None:
            self._taps.pop(token, None)
            listener(None)
        else:
            listener(np.frombuffer(data, dtype=np.int16))

    def _stats(self, stats: Stats) -> None:
        buckets, count, total, peak = stats.lateness
        histogram = LatenessHistogram()
        histogram.buckets, histogram.count, histogram.sum, histogram.max = list(buckets), count, total, peak
        self.lateness = histogram
        self.errors = stats.errors
        self.dropped = stats.dropped


class RemoteSession(PostingCalls):
    """A session that runs in a worker process, as the server process sees it."""

    live = True

    def __init__(self, shard: RemoteShard, uuid: str, app_id: str, t0: float, rate: int, jitter_s: float) -> None:
        self.shard = shard
        self.uuid = uuid
        self.app_id = app_id
        self.t0 = t0
        self.rate = rate
        self.inputs: dict[str, LegInput] = {}
        self.inbox: deque = deque()  # always empty here: the worker has the real one
        self._counted: dict[str, int] = {}  # leg_id -> its packets when its counters were last sent
        self.ended = False
        shard.sessions[uuid] = self
        shard.send(NewSession(uuid, app_id, t0, rate, jitter_s))

    def post(self, message: Message) -> None:
        if isinstance(message, Tap):
            listener, attach = message.listener, message.attach
            token = self.shard.add_tap(listener) if attach else self.shard.tap_token(listener)
            if token is None:
                return
            message = Tap(token, attach)
        elif isinstance(message, (Hangup, Command)):
            for leg in list(self.inputs.values()):  # the legs' stats the recording reports are up to date
                if leg.packets != self._counted.get(leg.leg_id, 0) or leg.error is not None:
                    self._send_counters(leg)
        self.shard.send(Post(self.uuid, message))

    def expedite(self) -> None:
        """Have the worker process this session now, not at its turn."""
        self.shard.send(Expedite(self.uuid))

    def add_leg(self, leg_id: str, role: str, at_mono: float) -> LegInput:
        if leg_id in self.inputs:
            raise ValueError(f"leg {leg_id} already exists")
        leg = self.inputs[leg_id] = LegInput(leg_id, role)
        self.shard.send(NewLeg(self.uuid, leg_id, role, at_mono))
        return leg

    def post_pcm(self, frame: PcmFrame, at_mono: float = 0.0) -> None:
        leg = self.inputs[frame.leg]
        leg.posted += len(frame.samples)
        leg.posted_rate = frame.rate
        self.post(Pcm(frame, at_mono))
        if leg.packets - self._counted.get(frame.leg, 0) >= COUNTERS_EVERY:
            self._send_counters(leg)

    def end_leg(self, leg_id: str, at_mono: float) -> None:
        leg = self.inputs.get(leg_id)
        if leg is not None:
            self._send_counters(leg)
        self.post(EndLeg(leg_id, at_mono))

    def _send_counters(self, leg: LegInput) -> None:
        """What ingest counted here of a PCM leg (packets, lost, error), for the legs' stats
        that the worker's session reports."""
        self._counted[leg.leg_id] = leg.packets
        self.post(Counters(leg.leg_id, leg.packets, leg.lost, leg.error))

    def timeline_at(self, mono: float, rate: int) -> int:
        return max(int((mono - self.t0) * rate), 0)

    def timeline(self, mono: float) -> int:
        return self.timeline_at(mono, self.rate)

    def progress(self, legs: dict[str, tuple[int, int]]) -> None:
        """How far the worker has placed and mixed each leg (for backpressure)."""
        for leg_id, (applied, ahead) in legs.items():
            leg = self.inputs.get(leg_id)
            if leg is not None:
                leg.applied, leg.ahead = applied, ahead


class RemoteRtpMedia:
    """An RTP leg whose sockets are in a worker process."""

    endpoint = receiver = None  # in the worker

    def __init__(self, shard: RemoteShard, leg_id: str, port: int) -> None:
        self.shard = shard
        self.leg_id = leg_id
        self.port = port

    @classmethod
    async def open(cls, session: RemoteSession, leg_id: str, formats, hold_s: float) -> "RemoteRtpMedia":
        port = await session.shard.request("open_rtp", session.uuid, leg_id, format_spec(formats), hold_s)
        return cls(session.shard, leg_id, port)

    def set_formats(self, formats) -> None:
        self.shard.call("rtp_formats", self.leg_id, format_spec(formats))

    def relatch(self) -> None:
        self.shard.call("relatch", self.leg_id)

    async def close(self) -> dict[str, Any]:
        try:
            return await self.shard.request("close_rtp", self.leg_id)
        except WorkerGone:
            return {}
