"""The processing thread: every session of this process, processed in turns, tick by tick.

The event loop only posts into sessions; here one thread runs each session's `process()`
(decode, mix, judge, encode, spool) when its turn comes, every `process_ms`, the turns of
different sessions spread over the ticks. What the sessions report goes back to the loop
through `on_results`. A session whose processing raises is ended on its own: its
recording finishes with `error`, keeping what it had spooled, and the others carry on.
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import ctypes
import ctypes.util
import logging
import random
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from mediaserver.config import ProcessingSettings
from mediaserver.recorder.messages import RecordingClosed, RecordingStopped
from mediaserver.recorder.recording import legs_view
from mediaserver.recorder.session import Session
from mediaserver.tasks import cancel_and_wait

log = logging.getLogger(__name__)


class LatenessHistogram:
    """How late each processing tick started, as a cumulative histogram (Prometheus style)."""

    BOUNDS = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5, 1.0)

    def __init__(self) -> None:
        self.buckets = [0] * (len(self.BOUNDS) + 1)  # the last one is +Inf
        self.count = 0
        self.sum = 0.0
        self.max = 0.0

    def observe(self, seconds: float) -> None:
        self.buckets[bisect.bisect_left(self.BOUNDS, seconds)] += 1
        self.count += 1
        self.sum += seconds
        self.max = max(self.max, seconds)

    def merge(self, other: "LatenessHistogram") -> None:
        self.buckets = [a + b for a, b in zip(self.buckets, other.buckets)]
        self.count += other.count
        self.sum += other.sum
        self.max = max(self.max, other.max)


# glibc mallopt(3) parameters
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MALLOC_THRESHOLD = 128 * 1024


def tune_malloc() -> None:
    """Hand freed memory back to the system sooner.

    A recording process interleaves short-lived allocations (packets, audio blocks) with
    long-lived ones (encoders); with glibc's default, adaptive thresholds its heaps keep
    what they once held. Fixed thresholds keep RSS per call low and flat.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt(M_TRIM_THRESHOLD, MALLOC_THRESHOLD)
        libc.mallopt(M_MMAP_THRESHOLD, MALLOC_THRESHOLD)
    except (OSError, AttributeError):
        pass  # not glibc: its allocator is left as it is


@dataclass(slots=True)
class Result:
    """What one session's turn reported: its events, and whether it has ended for good."""

    uuid: str
    events: list[tuple[str, dict[str, Any]]]
    ended: bool


class Processor:
    """The sessions of this process and the one thread that processes them."""

    def __init__(self, settings: ProcessingSettings, clock, on_results: Callable[[list[Result]], Awaitable[None]],
                 report_progress: bool = False) -> None:
        self.settings = settings
        # In a worker: report every turn of a session that takes PCM, even without events,
        # because the server process's backpressure on that stream follows its progress.
        self.report_progress = report_progress
        self.clock = clock
        self.sessions: dict[str, Session] = {}
        self.lateness = LatenessHistogram()
        self.errors = 0
        self.dropped: dict[str, int] = {}  # drops of sessions already gone, by reason
        self._on_results = on_results
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="media")
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()  # an expedited session waits: run the turns without waiting for the tick

    def add(self, session: Session) -> None:
        # Sessions take turns: each is processed every process_ms, spread over the ticks.
        session.next_process = self.clock.monotonic() + random.uniform(0, self.settings.process_ms / 1000)
        session.on_expedite = self._wake.set
        self.sessions[session.uuid] = session

    def remove(self, uuid: str) -> None:
        session = self.sessions.pop(uuid, None)
        if session is not None:
            add_mixer_drops(self.dropped, session.mixer.totals)

    def dropped_totals(self) -> dict[str, int]:
        """Input dropped so far by reason, live sessions included (samples for audio)."""
        totals = dict(self.dropped)
        for session in list(self.sessions.values()):
            add_mixer_drops(totals, session.mixer.totals)
        return totals

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="media-tick")

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        self._executor.shutdown(wait=True)

    async def _run(self) -> None:
        """Turns every tick, and in between as soon as a session is expedited: a stream faster
        than real time is then mixed as fast as the processing thread goes, not a tick's worth
        at a time."""
        loop = asyncio.get_running_loop()
        interval = self.settings.tick_ms / 1000
        due = loop.time()
        while True:
            ticked = loop.time() >= due
            if ticked:
                self.lateness.observe(loop.time() - due)
            self._wake.clear()
            now = self.clock.monotonic()
            await read_backlog()
            results = await loop.run_in_executor(self._executor, self._turns, now)
            if results:
                await self._on_results(results)
                for result in results:
                    if result.ended:
                        self.remove(result.uuid)
            if ticked:
                due += interval
                if due - loop.time() < -interval:
                    due = loop.time()  # too far behind: do not try to catch up with a burst
            await self._pause(due - loop.time())

    async def _pause(self, delay: float) -> None:
        """Until the next tick, or until a session is expedited."""
        if delay <= 0 or self._wake.is_set():
            await asyncio.sleep(0)
            return
        try:
            async with asyncio.timeout(delay):
                await self._wake.wait()
        except TimeoutError:
            pass

    def _turns(self, now: float) -> list[Result]:
        """Processing thread: the process() of every session whose turn it is.

        Each session's turn comes every `process_ms`: its cost is mostly per turn, not per
        sample, so fewer, longer turns hold more calls.
        """
        results = []
        period = self.settings.process_ms / 1000
        for session in list(self.sessions.values()):
            expedited = session.expedited
            if now < session.next_process and not session.ended and not expedited and not session.hangup_posted:
                continue
            session.expedited = False
            if now >= session.next_process:
                # An expedited turn leaves the schedule alone: were it to count as a regular
                # turn, a fast stream's many expedited turns would push the next regular one
                # far into the future, and a command posted after the stream would wait for it.
                # A turn that comes late (a stall) moves the next one by whole periods, which
                # keeps the session's place in the spread: were every overdue session due at
                # the end of the stall, they would all fall due together from then on, and
                # one tick would hold the work of them all.
                session.next_process += period * ((now - session.next_process) // period + 1)
            try:
                events = session.process(now)
            except Exception as exc:  # a bug in one call must not stop the others
                log.exception("processing session %s failed", session.uuid)
                self.errors += 1
                events = contain(session, exc)
            ended = session.ended and not session.inbox
            # An expedited turn is always reported: the ingest that asked for it waits to hear.
            if events or ended or expedited or (self.report_progress and session.takes_pcm):
                results.append(Result(session.uuid, events, ended))
        return results


async def read_backlog() -> None:
    """Let the event loop poll its sockets and run what the poll brought, before a turn
    that reads the clock from before the poll.

    A live mix reads up to `jitter_ms` behind the clock reading it is given: audio that
    reached a socket before that reading must be in its session by then. When this
    process stalls (a garbage collection, a long callback, the processing thread holding
    the interpreter) the datagrams wait in the kernel; a turn that read the clock after
    the stall with no poll in between would mix past them and drop them as late, counting
    the process's own stall as network lateness. Each yield is one pass of the loop
    (asyncio runs I/O callbacks after the callbacks already queued, uvloop before them):
    two passes hold a whole poll and its callbacks whichever loop runs. One poll reads up
    to 32 datagrams a socket with uvloop (what the worker runs), 640 ms of a 20 ms stream.
    """
    await asyncio.sleep(0)
    await asyncio.sleep(0)


def contain(session: Session, exc: Exception) -> list:
    """End a session whose processing raised; keep what its recording has spooled."""
    session.inbox.clear()
    session.ended = True
    recording = session.recording
    events: list = []
    if recording is not None and not recording.done:
        recording.finish("error")
        events.append(RecordingStopped(recording.id, recording.position, "error", None))
        try:
            recording.close()
        except Exception:
            log.exception("closing recording %s after an error failed", recording.id)
        finally:
            if hasattr(recording.sink, "close"):
                recording.sink.close(sync=False)
        events.append(RecordingClosed(recording.id, recording.duration_samples / recording.rate, legs_view(recording),
                                      f"processing failed: {exc}"))
    return events


def add_mixer_drops(totals: dict[str, int], stats) -> None:
    for reason, count in (("late_samples", stats.late_samples), ("overlap_samples", stats.overlap_samples)):
        if count:
            totals[reason] = totals.get(reason, 0) + count
