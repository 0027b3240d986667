"""A worker process: a share of the calls, their RTP sockets and their processing.

One Python process can keep only about one core busy, so a server with `workers` ≥ 2
runs the audio of its sessions in that many worker processes. Each worker has its own
event loop (receiving the RTP of its calls on ports from its share of the range) and its
own processing thread (decode, mix, encode, spool). The server process keeps signalling,
the API, the catalog, webhooks and storage; it sends the worker what ingest and commands
post into a session and gets back what the sessions report.

The messages each way are the dataclasses of `recorder.wire`: the server sends what ingest
and commands post into a session (`Post`), new sessions and legs, `Expedite` and
`Request`s (open_rtp, rtp_formats, relatch, close_rtp); the worker sends back its sessions'
`Results`, `Reply`s, tapped audio and its `Stats`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import sys
from typing import Any

from mediaserver.clock import SystemClock
from mediaserver.config import WorkerSettings
from mediaserver.recorder.processor import Processor, Result, tune_malloc
from mediaserver.recorder.rtpmedia import RtpMedia, formats_from
from mediaserver.recorder.session import Session
from mediaserver.recorder.messages import Tap
from mediaserver.recorder.wire import (Channel, Exit, Expedite, NewLeg, NewSession, Post, Reply, Request, Results,
                                        SessionResult, Setup, Stats, TapAudio, portable)
from mediaserver.rtp.endpoint import PortPool
from mediaserver.tasks import cancel_and_wait

log = logging.getLogger(__name__)

STATS_EVERY_S = 1.0
# Every RTP packet leaves a message in its session's inbox until the session's next turn
# (up to `process_ms`); with the default first threshold (700) the collector kept walking
# the messages still waiting: about 3 % of a worker's CPU at 150 calls, under 1.5 % with
# this one. Objects that die before a collection cost it nothing.
GC_YOUNG_THRESHOLD = 50_000


def port_share(settings: WorkerSettings, index: int, count: int) -> tuple[int, int]:
    """The part of the RTP port range that worker `index` of `count` binds from."""
    low, high = settings.rtp_port_min, settings.rtp_port_max
    if low == 0:
        return 0, 0
    span = ((high - low + 1) // count) & ~1
    start = low + index * span
    return start, (high if index == count - 1 else start + span - 1)


def main(argv: list[str]) -> int:
    """`python -m mediaserver.recorder.worker FD`: serve the server process on socket FD."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server process decides when we stop
    tune_malloc()
    tune_gc()
    sock = socket.socket(fileno=int(argv[1]))
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_serve(sock))
    return 0


def tune_gc() -> None:
    """Move what start-up allocated (modules, the interpreter's own objects) out of the
    collector's reach, and collect the young generation less often (GC_YOUNG_THRESHOLD)."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


async def _serve(sock: socket.socket) -> None:
    channel = await Channel.open(sock)
    first = await channel.receive()
    setup: Setup = first[0]
    settings, index, count = setup.settings, setup.index, setup.count
    logging.basicConfig(level=settings.log_level.upper(), format=f"%(asctime)s %(levelname)s worker{index} %(name)s: %(message)s")
    await Worker(settings, index, count, channel).run(first[1:])


class Worker:
    def __init__(self, settings: WorkerSettings, index: int, count: int, channel: Channel) -> None:
        self.settings = settings
        self.index = index
        self.clock = SystemClock()
        self.channel = channel
        self.processor = Processor(settings.processing, self.clock, self._results, report_progress=True)
        self.ports = PortPool(settings.rtp_host, *port_share(settings, index, count))
        self.media: dict[str, RtpMedia] = {}
        self.taps: dict[int, Any] = {}  # token -> listener relaying to the server process
        self.loop: asyncio.AbstractEventLoop | None = None

    async def run(self, pending: list) -> None:
        self.loop = asyncio.get_running_loop()
        self.processor.start()
        stats = asyncio.create_task(self._stats_loop(), name="worker-stats")
        try:
            batch = pending
            while await self._dispatch_all(batch):
                batch = await self.channel.receive()
        except EOFError:
            log.warning("the server process has gone: closing the spools and leaving")
        finally:
            await cancel_and_wait(stats)
            for media in self.media.values():
                await media.close()
            await self.processor.close()
            for session in list(self.processor.sessions.values()):
                _close_spool(session)
            await self.channel.close()

    async def _dispatch_all(self, batch: list) -> bool:
        for message in batch:
            if isinstance(message, Exit):
                await self.channel.drain()
                return False
            try:
                await self._dispatch(message)
            except Exception:
                log.exception("worker message %s failed", type(message).__name__)
        return True

    async def _dispatch(self, message) -> None:
        match message:
            case Post(uuid, inner):
                session = self.processor.sessions.get(uuid)
                if isinstance(inner, Tap):
                    inner = self._tap(uuid, inner)
                if session is not None and inner is not None:
                    session.post(inner)
            case NewLeg(uuid, leg_id, role, at_mono):
                session = self.processor.sessions.get(uuid)
                if session is not None:
                    session.add_leg(leg_id, role, at_mono)
            case Expedite(uuid):
                session = self.processor.sessions.get(uuid)
                if session is not None:
                    session.expedite()
            case NewSession(uuid, app_id, t0, rate, jitter_s):
                self.processor.add(Session(uuid, app_id, t0, rate, jitter_s=jitter_s))
            case Request(ident, name, args):
                await self._request(ident, name, args)
            case _:
                raise TypeError(f"not a worker message: {message!r}")

    def _tap(self, uuid: str, tap: Tap) -> Tap | None:
        """A tap's token stands for a listener in the server process: relay to it."""
        token = tap.listener
        if tap.attach:
            self.taps[token] = lambda pcm: self._relay_tap(uuid, token, pcm)
            return Tap(self.taps[token], True)
        listener = self.taps.pop(token, None)
        return None if listener is None else Tap(listener, False)

    def _relay_tap(self, uuid: str, token: int, pcm) -> None:
        # Called on the processing thread: hand over to the loop's thread.
        data = None if pcm is None else pcm.tobytes()
        self.loop.call_soon_threadsafe(self.channel.send, TapAudio(uuid, token, data))

    async def _request(self, ident: int | None, name: str, args: tuple) -> None:
        try:
            value = await getattr(self, f"_{name}")(*args)
        except Exception as exc:
            if ident is None:
                log.warning("%s%r failed: %s", name, args, exc)
            else:
                self.channel.send(Reply(ident, error=portable(exc)))
            return
        if ident is not None:
            self.channel.send(Reply(ident, value))

    async def _open_rtp(self, uuid: str, leg_id: str, formats: dict, hold_s: float) -> int:
        session = self.processor.sessions[uuid]
        media = self.media[leg_id] = await RtpMedia.open(self.ports, self.clock, session, leg_id, formats_from(formats), hold_s)
        return media.port

    async def _rtp_formats(self, leg_id: str, formats: dict) -> None:
        self.media[leg_id].set_formats(formats_from(formats))

    async def _relatch(self, leg_id: str) -> None:
        self.media[leg_id].relatch()

    async def _close_rtp(self, leg_id: str) -> dict[str, Any]:
        media = self.media.pop(leg_id, None)
        return {} if media is None else await media.close()

    async def _results(self, results: list[Result]) -> None:
        out = []
        for result in results:
            session = self.processor.sessions.get(result.uuid)
            progress = {} if session is None or not session.takes_pcm else \
                {leg.leg_id: (leg.applied, leg.ahead) for leg in list(session.inputs.values())}
            out.append(SessionResult(result.uuid, result.events, result.ended, progress))
        self.channel.send(Results(out))

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(STATS_EVERY_S)
            histogram = self.processor.lateness
            self.channel.send(Stats((list(histogram.buckets), histogram.count, histogram.sum, histogram.max),
                                    self.processor.errors, self.processor.dropped_totals(), len(self.processor.sessions)))


def _close_spool(session: Session) -> None:
    recording = session.recording
    if recording is not None and not recording.done and hasattr(recording.sink, "close"):
        recording.sink.close(sync=True)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
