"""The engine: live sessions, where they run, and what their recordings report.

The event loop receives media and commands and only posts them into sessions; a
processing thread (this process's, or a worker process's: `shards`) runs every session's
`process()` in turns (decode, mix, judge, encode, spool). What the sessions report back (a
recording started, paused, stopped, closed) is handled on the loop: written to the catalog
first, then announced (`recorder.announce`), then a closed recording's spool is handed to
the archive (`recorder.archive`: storing, recovery after a restart, retention).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mediaserver import ids
from mediaserver.catalog import Catalog
from mediaserver.config import EngineSettings
from mediaserver.encoding import file_type
from mediaserver.errors import Conflict, Forbidden, NotFound, Unavailable
from mediaserver.media import PcmFrame
from mediaserver.options import RecordingOptions
from mediaserver.recorder.admission import Admission
from mediaserver.recorder.announce import Announcer
from mediaserver.recorder.archive import Archive
from mediaserver.recorder.cluster import Membership
from mediaserver.recorder.legs import Leg
from mediaserver.recorder.messages import (Event, RecordingClosed, RecordingPaused, RecordingResumed, RecordingStarted,
                                            RecordingStopped)
from mediaserver.recorder.processor import LatenessHistogram, Processor, Result
from mediaserver.recorder.remote import RemoteRtpMedia, RemoteSession, RemoteShard
from mediaserver.recorder.rtpmedia import RtpMedia
from mediaserver.recorder.session import Session, SessionPort
from mediaserver.recorder.spec import RecordingSpec
from mediaserver.rtp.endpoint import PortPool
from mediaserver.storage import Storage, Upload, object_key
from mediaserver.tasks import TaskSet
from mediaserver.webhooks import Outbox

log = logging.getLogger(__name__)

PUMP_EVERY_S = 1.0
CLOSE_SESSIONS_S = 10.0  # how long close() waits for the sessions it hung up to end
CLOSE_STORING_S = 30.0  # and then for the recordings being stored


@dataclass(slots=True)
class LiveRecording:
    """The loop's view of a recording that is not yet stored."""

    id: str
    app_id: str
    session_uuid: str
    options: RecordingOptions
    key: str
    upload: Upload
    content_type: str
    command_uid: str | None
    spool: Path | None = None
    state: str = "initiated"  # as commands have been accepted: recording, paused, stopping
    pumping: asyncio.Task | None = None  # the upload's pump while it sends parts
    checkpointed: int = 0  # spool bytes copied to S3 as checkpoints (cluster mode)
    checkpoint_due: float = 0.0  # monotonic time of the next checkpoint
    legs_checkpointed: list | None = None  # the legs last written to the catalog with a checkpoint


@dataclass(slots=True)
class LiveSession:
    uuid: str
    app_id: str
    source: str
    created_at: float
    session: SessionPort  # a Session here, or a RemoteSession standing for one in a worker
    legs: dict[str, str] = field(default_factory=dict)  # leg_id -> role
    ended_legs: set[str] = field(default_factory=set)
    recording: LiveRecording | None = None  # the one commands act on
    recordings: dict[str, LiveRecording] = field(default_factory=dict)  # every one not yet closed
    last_command_at: float | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    ending: bool = False
    idle_since: float | None = None  # monotonic time since when it has had no live leg or recording
    progressed: asyncio.Event = field(default_factory=asyncio.Event)  # set when a turn of it is reported
    expedited: bool = False  # asked to be processed now, and no turn reported since
    over: asyncio.Event = field(default_factory=asyncio.Event)  # set once the engine has ended it: its owners let go


class Engine:
    """Owns the live sessions of this process and drives their processing."""

    def __init__(self, settings: EngineSettings, catalog: Catalog, storage: Storage, outbox: Outbox, clock) -> None:
        self.settings = settings
        self.clock = clock
        self.catalog = catalog
        self.storage = storage
        self.outbox = outbox
        self.announcer = Announcer(outbox, settings.base_url, settings.recording_base_url)
        node = settings.node
        self.archive = Archive(catalog, storage, self.announcer, clock, retention_hours=settings.retention_hours,
                               sweep_every_s=settings.sweep_every_s, spool_dir=settings.spool_dir,
                               node_id=node.node_id if node.clustered else None,
                               checkpoint_s=node.checkpoint_s if node.clustered else None, pump_every_s=PUMP_EVERY_S)
        self.membership = Membership(node, self) if node.clustered else None
        self.defaults = settings.defaults
        self.admission = Admission(settings.admission, clock)
        self.sessions: dict[str, LiveSession] = {}
        self.counters: dict[str, int] = {"frames_in": 0, "samples_in": 0}
        self.dropped: dict[str, int] = {}  # input refused or dropped, by reason
        self.processor = Processor(settings.processing, clock, self._on_results)
        self.rtp_ports = PortPool(settings.worker.rtp_host, settings.worker.rtp_port_min, settings.worker.rtp_port_max)
        # With workers ≥ 2 every session runs in a worker process (one Python process keeps
        # about one core busy); with 1, sessions run on this process's processing thread.
        self.shards: list[RemoteShard] = []
        self._loops = TaskSet("engine loops")  # housekeeping and the retention sweep
        self._all_ended = asyncio.Event()  # set whenever no session is live
        self._all_ended.set()
        self._closing = False

    # -- lifetime ----------------------------------------------------------------------

    async def start(self) -> None:
        if self.membership is not None:
            await self.membership.beat()  # known to the cluster before it records anything
        await self.archive.recover()
        self.processor.start()
        if self.settings.workers > 1:
            for index in range(self.settings.workers):
                await self._start_shard(index)
        self._loops.spawn(self._housekeeping_loop(), "housekeeping")
        self._loops.spawn(self.archive.sweep_loop(), "retention-sweep")
        if self.membership is not None:
            self._loops.spawn(self.membership.run(), "cluster-membership")

    async def close(self) -> None:
        """End every session (their recordings are finished and stored), then stop."""
        self._closing = True
        for uuid in list(self.sessions):
            await self.end_session(uuid)
        try:
            async with asyncio.timeout(CLOSE_SESSIONS_S):
                await self._all_ended.wait()
        except TimeoutError:
            log.warning("%d sessions still ending after %.0f s; stopping anyway", len(self.sessions), CLOSE_SESSIONS_S)
        await self._loops.close()
        for shard in self.shards:
            await shard.close()
        await self.processor.close()
        await self.archive.wait(timeout=CLOSE_STORING_S)  # recordings being stored finish, if they can
        await self.archive.close()

    def recording_url(self, row: dict[str, Any]) -> str:
        """Where a stored recording is fetched from (the download route, or RECORDING_BASE_URL)."""
        return self.announcer.recording_url(row)

    # -- sessions and legs -------------------------------------------------------------

    async def create_session(self, app_id: str, source: str, uuid: str | None = None,
                             meta: dict[str, Any] | None = None) -> LiveSession:
        uuid = uuid or ids.session_uuid()
        if self.membership is not None and self.membership.isolated:
            raise Unavailable("cluster.isolated", "this node has lost touch with the cluster's catalog: "
                              "another node takes new calls", retry_after_s=1)
        # Asked again after the catalog answers: another request may have made it meanwhile.
        if uuid in self.sessions or await self.catalog.session(uuid) is not None or uuid in self.sessions:
            raise Conflict("sessions.exists", f"session {uuid} already exists")
        self.admission.check(len(self.sessions))  # Unavailable past capacity
        now = self.clock.time()
        session = self._new_session(uuid, app_id)
        live = self.sessions[uuid] = LiveSession(uuid, app_id, source, now, session)
        self._all_ended.clear()
        self.catalog.create_session(uuid, app_id, source, now, meta, node_id=self.settings.node.node_id)
        self.announcer.session_started(app_id, uuid, source)
        return live

    async def session_for(self, app_id: str, uuid: str) -> LiveSession:
        """The live session `uuid` of `app_id`: NotFound, Forbidden (another app's) or Conflict (ended)."""
        live = self.sessions.get(uuid)
        if live is None:
            row = await self.catalog.session(uuid)
            if row is None:
                raise NotFound("sessions.not_found", f"no session {uuid}")
            if row["app_id"] != app_id:
                raise Forbidden("auth.forbidden", "this session belongs to another app")
            raise Conflict("sessions.ended", f"session {uuid} has ended")
        if live.app_id != app_id:
            raise Forbidden("auth.forbidden", "this session belongs to another app")
        if live.ending:
            raise Conflict("sessions.ended", f"session {uuid} is ending")
        return live

    def add_leg(self, live: LiveSession, role: str, kind: str) -> str:
        leg_id = ids.leg_id()
        live.session.add_leg(leg_id, role, self.clock.monotonic())
        live.legs[leg_id] = role
        self.catalog.add_leg(leg_id, live.uuid, role, kind, self.clock.time())
        return leg_id

    def open_leg(self, live: LiveSession, role: str, kind: str) -> Leg:
        """A new leg of `live` and the handle its call talks to it through."""
        return Leg(self, live, self.add_leg(live, role, kind), role)

    def post_pcm(self, live: LiveSession, frame: PcmFrame, at_mono: float | None = None) -> None:
        """A leg's audio (`frame.leg`) that arrived at `at_mono` (now by default): the channels
        of one stereo frame pass the same arrival, so legs that begin together are placed together."""
        self.counters["frames_in"] += 1
        self.counters["samples_in"] += len(frame.samples)
        live.session.post_pcm(frame, self.clock.monotonic() if at_mono is None else at_mono)

    def monotonic(self) -> float:
        return self.clock.monotonic()

    def _new_session(self, uuid: str, app_id: str) -> Session | RemoteSession:
        jitter = self.settings.jitter_ms / 1000
        # The timeline begins one jitter delay before the session: a leg opened with the
        # session whose first packet came late and the next ones in a burst is anchored
        # on the least delayed, which puts its first audio before its first arrival. The
        # mix reads that far behind anyway; without the margin it would be before
        # position 0 and dropped as late.
        t0 = self.clock.monotonic() - jitter
        if self.shards:
            shard = min(self.shards, key=lambda s: len(s.sessions))
            return RemoteSession(shard, uuid, app_id, t0, self.defaults.sample_rate, jitter)
        session = Session(uuid, app_id, t0, self.defaults.sample_rate, jitter_s=jitter)
        self.processor.add(session)
        return session

    async def open_rtp(self, live: LiveSession, leg_id: str, formats, hold_s: float):
        """The media path of an RTP leg (its port pair bound); OSError when no port is free."""
        if isinstance(live.session, RemoteSession):
            return await RemoteRtpMedia.open(live.session, leg_id, formats, hold_s)
        return await RtpMedia.open(self.rtp_ports, self.clock, live.session, leg_id, formats, hold_s)

    def count_packets(self, live: LiveSession, leg_id: str, n: int = 1) -> None:
        """`n` more messages carrying audio received on a leg (its `packets` in the legs' stats)."""
        leg = live.session.inputs.get(leg_id)
        if leg is not None:
            leg.packets += n

    def fail_leg(self, live: LiveSession, leg_id: str, reason: str) -> None:
        """The leg never carried media, for `reason`: shown as its `error` in the legs' stats."""
        leg = live.session.inputs.get(leg_id)
        if leg is not None and leg.error is None:
            leg.error = reason

    def count_dropped(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n

    def dropped_totals(self) -> dict[str, int]:
        """Input dropped so far by reason, live sessions included (samples for audio)."""
        totals = dict(self.dropped)
        for source in [self.processor.dropped_totals()] + [shard.dropped for shard in self.shards]:
            for reason, count in source.items():
                totals[reason] = totals.get(reason, 0) + count
        return totals

    @property
    def lateness(self) -> LatenessHistogram:
        """Tick lateness of this process's processing thread and of every worker's."""
        histogram = LatenessHistogram()
        histogram.merge(self.processor.lateness)
        for shard in self.shards:
            histogram.merge(shard.lateness)
        return histogram

    @property
    def processing_errors(self) -> int:
        return self.processor.errors + sum(shard.errors for shard in self.shards)

    def end_leg(self, live: LiveSession, leg_id: str) -> None:
        if leg_id in live.legs and leg_id not in live.ended_legs:
            live.ended_legs.add(leg_id)
            live.session.end_leg(leg_id, self.clock.monotonic())
            self.catalog.update_leg(leg_id, ended_at=self.clock.time())

    def add_tap(self, live: LiveSession, listener: Callable) -> None:
        """`listener(pcm)` gets what the active recording encodes, then None at its end."""
        live.session.tap(listener, True)

    def remove_tap(self, live: LiveSession, listener: Callable) -> None:
        live.session.tap(listener, False)

    def backlog_seconds(self, live: LiveSession, leg_id: str) -> float:
        leg = live.session.inputs.get(leg_id)
        return leg.backlog / leg.posted_rate if leg is not None and leg.posted_rate else 0.0

    async def wait_mixed(self, live: LiveSession, timeout: float) -> None:
        """Have the session processed now, not at its turn, and wait (at most `timeout`)
        until a turn of it has been reported, which moves its legs' backlog."""
        live.progressed.clear()
        if not live.expedited:  # one request per turn, however many sockets of it wait
            live.expedited = True
            live.session.expedite()
        try:
            async with asyncio.timeout(timeout):
                await live.progressed.wait()
        except TimeoutError:
            live.expedited = False  # no turn came of it: ask again next time

    async def end_session(self, uuid: str) -> None:
        """Hang up: legs end, the recording finishes with `hangup` and is stored."""
        live = self.sessions.get(uuid)
        if live is None or live.ending:
            return
        live.ending = True
        live.session.hangup(self.clock.monotonic())

    # -- commands ----------------------------------------------------------------------

    def start_recording(self, live: LiveSession, options: RecordingOptions, command_uid: str | None) -> LiveRecording:
        """Create the recording (catalog row, upload) and hand its spec to the session."""
        rid = ids.recording_id()
        now = self.clock.time()
        extension, content_type = file_type(options.format)
        created = dt.datetime.fromtimestamp(now, dt.timezone.utc)
        key = object_key(self.settings.key_template, live.app_id, rid, extension, created)
        spool_path = self.settings.spool_dir / f"{rid}.{extension}"
        self.catalog.create_recording(
            id=rid, session_uuid=live.uuid, app_id=live.app_id, state="initiated", format=options.format,
            sample_rate=options.sample_rate, channels=options.channels, bitrate=options.effective_bitrate,
            options=options.to_dict(), content_type=content_type, storage_key=key,
            spool_path=str(spool_path), created_at=now, command_uid=command_uid)
        upload = self.storage.begin(key, spool_path, content_type)
        rec = LiveRecording(rid, live.app_id, live.uuid, options, key, upload, content_type, command_uid, spool_path)
        encoders = self.settings.encoders
        spec = RecordingSpec(rid, options, str(spool_path), encoders.mp3_quality, encoders.opus_complexity,
                             encoders.wav_buffer_ms, encoders.silence_threshold_dbfs)
        live.recording = live.recordings[rid] = rec
        live.session.start_recording(spec, self.clock.monotonic())
        return rec

    def command_recording(self, live: LiveSession, kind: str, behavior: str = "skip") -> LiveRecording:
        rec = live.recording
        live.session.command(kind, behavior, self.clock.monotonic())
        rec.state = {"pause": "paused", "resume": "recording", "stop": "stopping"}[kind]
        return rec

    # -- what the sessions report -------------------------------------------------------

    async def _on_results(self, results: list[Result]) -> None:
        for result in results:
            live = self.sessions.get(result.uuid)
            if live is None:
                continue
            live.progressed.set()
            live.expedited = False
            self._handle(live, result.events)
            if result.ended:
                self._session_ended(live)

    async def _start_shard(self, index: int) -> None:
        shard = RemoteShard(self.settings.worker, index, self.settings.workers, self._on_results, self._shard_gone)
        await shard.start()
        if index < len(self.shards):
            self.shards[index] = shard
        else:
            self.shards.append(shard)

    async def _shard_gone(self, shard: RemoteShard) -> None:
        """A worker process died: its calls end, their recordings are kept from their
        spools as after a restart, and a new worker takes its place."""
        for uuid in list(shard.sessions):
            live = self.sessions.get(uuid)
            if live is None:
                continue
            live.session.ended = True
            live.recordings.clear()
            live.recording = None
            self._session_ended(live)
            for row in (await self.catalog.recordings(live.app_id, session_uuid=uuid, limit=500))[0]:
                # "processing" ones were closed before the worker died and are being stored.
                if row["state"] in ("initiated", "recording", "paused", "stopped"):
                    self.archive.recover_one(row)
        shard.sessions.clear()
        if not self._closing:
            await self._start_shard(shard.index)

    async def _housekeeping_loop(self) -> None:
        while True:
            await asyncio.sleep(PUMP_EVERY_S)
            self.admission.observe(self.lateness)
            for live in list(self.sessions.values()):
                for rec in list(live.recordings.values()):
                    self.archive.pump(rec)
            await self._end_idle_sessions()

    def _handle(self, live: LiveSession, events: list[Event]) -> None:
        for event in events:
            try:
                self._on_event(live, event)
            except Exception:
                log.exception("handling %s for session %s failed", type(event).__name__, live.uuid)

    def _on_event(self, live: LiveSession, event: Event) -> None:
        rec = live.recordings.get(getattr(event, "recording_id", None))
        if rec is None:
            return  # leg.joined, or a recording already closed
        now = self.clock.time()
        match event:
            case RecordingStarted():
                self.catalog.update_recording(rec.id, state="recording", started_at=now)
                self._emit(rec, "recording.started", {})
            case RecordingPaused() | RecordingResumed():
                paused = isinstance(event, RecordingPaused)
                self.catalog.update_recording(rec.id, state="paused" if paused else "recording")
                self._emit(rec, "recording.paused" if paused else "recording.resumed", {})
            case RecordingStopped(_, _, reason, finish_key):
                self.catalog.update_recording(rec.id, state="stopped", stopped_at=now, termination_reason=reason, finish_key=finish_key)
                self._emit(rec, "recording.stopped", {"termination_reason": reason, "finish_key": finish_key})
                if live.recording is rec:
                    rec.state = "stopping"
            case RecordingClosed():
                del live.recordings[rec.id]
                if live.recording is rec:
                    live.recording = None
                self.archive.store(rec, event)

    def _emit(self, rec: LiveRecording, kind: str, extra: dict[str, Any]) -> None:
        self.announcer.recording(rec.app_id, kind, rec.id, rec.session_uuid, rec.command_uid, **extra)

    def _session_ended(self, live: LiveSession) -> None:
        if self.sessions.get(live.uuid) is not live:
            return
        del self.sessions[live.uuid]
        if not self.sessions:
            self._all_ended.set()
        now = self.clock.time()
        self.catalog.update_session(live.uuid, state="ended", ended_at=now)
        for leg_id in live.legs:
            self.catalog.update_leg(leg_id, ended_at=now)
        self.announcer.session_ended(live.app_id, live.uuid)
        live.over.set()

    async def _end_idle_sessions(self) -> None:
        now = self.clock.monotonic()
        for live in list(self.sessions.values()):
            if live.ending or set(live.legs) - live.ended_legs or live.recordings:
                live.idle_since = None
            elif live.idle_since is None:
                live.idle_since = now
            elif now - live.idle_since >= self.settings.session_idle_s:
                log.info("session %s idle for %.0f s: ending it", live.uuid, now - live.idle_since)
                await self.end_session(live.uuid)
