"""The engine: live sessions, their processing thread, and every recording's lifecycle.

The event loop receives media and commands and only posts them into sessions; a single
processing thread runs every session's `process()` each tick (decode, mix, judge, encode,
spool). What the sessions report back (a recording started, paused, stopped, closed) is
handled on the loop: written to the catalog first, then announced by webhook, then the
spool is handed to storage.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mediaserver import ids
from mediaserver.catalog import Catalog
from mediaserver.config import Config
from mediaserver.encoding import file_type
from mediaserver.encoding.repair import repair
from mediaserver.errors import ServiceError, StorageError
from mediaserver.options import RecordingOptions
from mediaserver.recorder.processor import LatenessHistogram, Processor, Result
from mediaserver.recorder.remote import RemoteRtpMedia, RemoteSession, RemoteShard
from mediaserver.recorder.rtpmedia import RtpMedia
from mediaserver.recorder.session import Session
from mediaserver.recorder.spec import RecordingSpec
from mediaserver.rtp.endpoint import PortPool
from mediaserver.storage import Storage, Upload, object_key
from mediaserver.storage.spool import read_checkpoint, remove_checkpoint
from mediaserver.tasks import cancel_and_wait
from mediaserver.webhooks import Outbox

log = logging.getLogger(__name__)

ACTIVE_STATES = ("initiated", "recording", "paused", "stopped", "processing")
PUMP_EVERY_S = 1.0


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
    pumping: bool = False


@dataclass(slots=True)
class LiveSession:
    uuid: str
    app_id: str
    source: str
    created_at: float
    session: Session
    legs: dict[str, str] = field(default_factory=dict)  # leg_id -> role
    ended_legs: set[str] = field(default_factory=set)
    recording: LiveRecording | None = None  # the one commands act on
    recordings: dict[str, LiveRecording] = field(default_factory=dict)  # every one not yet closed
    last_command_at: float | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    ending: bool = False
    idle_since: float | None = None  # monotonic time since when it has had no live leg or recording
    progressed: asyncio.Event = field(default_factory=asyncio.Event)  # set when a turn of it is reported
    hurried: bool = False  # asked to be processed now, and no turn reported since
    on_end: list[Callable[[], Any]] = field(default_factory=list)


class Engine:
    """Owns the live sessions of this process and drives their processing."""

    def __init__(self, config: Config, catalog: Catalog, storage: Storage, outbox: Outbox, clock) -> None:
        self.config = config
        self.catalog = catalog
        self.storage = storage
        self.outbox = outbox
        self.clock = clock
        self.defaults = config.recording_defaults()
        self.sessions: dict[str, LiveSession] = {}
        self.counters: dict[str, int] = {"frames_in": 0, "samples_in": 0}
        self.dropped: dict[str, int] = {}  # input refused or dropped, by reason
        self.processor = Processor(config, clock, self._on_results)
        self.rtp_ports = PortPool(config.sip_host, config.rtp_port_min, config.rtp_port_max)
        # With workers ≥ 2 every session runs in a worker process (one Python process keeps
        # about one core busy); with 1, sessions run on this process's processing thread.
        self.shards: list[RemoteShard] = []
        self._tasks: set[asyncio.Task] = set()
        self._housekeeping_task: asyncio.Task | None = None
        self._sweep_task: asyncio.Task | None = None
        self._closing = False

    # -- lifetime ----------------------------------------------------------------------

    async def start(self) -> None:
        await self.recover()
        self.processor.start()
        if self.config.workers > 1:
            for index in range(self.config.workers):
                await self._start_shard(index)
        self._housekeeping_task = asyncio.create_task(self._housekeeping_loop(), name="housekeeping")
        self._sweep_task = asyncio.create_task(self._sweep_loop(), name="retention-sweep")

    async def close(self) -> None:
        """End every session (their recordings are finished and stored), then stop."""
        self._closing = True
        for uuid in list(self.sessions):
            await self.end_session(uuid)
        deadline = time.monotonic() + 10
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(self.config.tick_ms / 1000)
        for task in (self._housekeeping_task, self._sweep_task):
            await cancel_and_wait(task)
        self._housekeeping_task = self._sweep_task = None
        for shard in self.shards:
            await shard.close()
        await self.processor.close()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=30)
        for task in list(self._tasks):
            task.cancel()

    def _spawn(self, coro, name: str) -> asyncio.Task:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- sessions and legs -------------------------------------------------------------

    def create_session(self, app_id: str, source: str, uuid: str | None = None, meta: dict[str, Any] | None = None) -> LiveSession:
        uuid = uuid or ids.session_uuid()
        if uuid in self.sessions or self.catalog.session(uuid) is not None:
            raise ServiceError(409, "sessions.exists", f"session {uuid} already exists")
        now = self.clock.time()
        session = self._new_session(uuid, app_id)
        live = self.sessions[uuid] = LiveSession(uuid, app_id, source, now, session)
        self.catalog.create_session(uuid, app_id, source, now, meta)
        self.outbox.emit(app_id, "session.started", {"session_uuid": uuid, "source": source})
        return live

    def session_for(self, app_id: str, uuid: str) -> LiveSession:
        """The live session `uuid` of `app_id`: 404 unknown, 403 another app's, 409 ended."""
        live = self.sessions.get(uuid)
        if live is None:
            row = self.catalog.session(uuid)
            if row is None:
                raise ServiceError(404, "sessions.not_found", f"no session {uuid}")
            if row["app_id"] != app_id:
                raise ServiceError(403, "auth.forbidden", "this session belongs to another app")
            raise ServiceError(409, "sessions.ended", f"session {uuid} has ended")
        if live.app_id != app_id:
            raise ServiceError(403, "auth.forbidden", "this session belongs to another app")
        if live.ending:
            raise ServiceError(409, "sessions.ended", f"session {uuid} is ending")
        return live

    def add_leg(self, live: LiveSession, role: str, kind: str) -> str:
        leg_id = ids.leg_id()
        live.session.add_leg(leg_id, role, self.clock.monotonic())
        live.legs[leg_id] = role
        self.catalog.add_leg(leg_id, live.uuid, role, kind, self.clock.time())
        return leg_id

    def post_pcm(self, live: LiveSession, leg_id: str, samples: np.ndarray, rate: int, pts: int | None = None,
                 at_mono: float | None = None) -> None:
        """PCM of a leg that arrived at `at_mono` (now by default): the channels of one
        frame pass the same arrival, so legs that begin together are placed together."""
        self.counters["frames_in"] += 1
        self.counters["samples_in"] += len(samples)
        live.session.post_pcm(leg_id, samples, rate, pts, self.clock.monotonic() if at_mono is None else at_mono)

    def monotonic(self) -> float:
        return self.clock.monotonic()

    def _new_session(self, uuid: str, app_id: str) -> Session | RemoteSession:
        t0, jitter = self.clock.monotonic(), self.config.jitter_ms / 1000
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
        if not live.hurried:  # one request per turn, however many sockets of it wait
            live.hurried = True
            if isinstance(live.session, RemoteSession):
                live.session.hurry = True
            else:
                self.processor.hurry(live.session)
        try:
            async with asyncio.timeout(timeout):
                await live.progressed.wait()
        except TimeoutError:
            live.hurried = False  # no turn came of it: ask again next time

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
        key = object_key(self.config.s3_key_template, live.app_id, rid, extension, created)
        spool_path = self.config.data_dir / "spool" / f"{rid}.{extension}"
        self.catalog.create_recording(
            id=rid, session_uuid=live.uuid, app_id=live.app_id, state="initiated", format=options.format,
            sample_rate=options.sample_rate, channels=options.channels, bitrate=options.effective_bitrate,
            options=options.to_dict(), content_type=content_type, storage_key=key,
            spool_path=str(spool_path), created_at=now, command_uid=command_uid)
        upload = self.storage.begin(key, spool_path, content_type)
        rec = LiveRecording(rid, live.app_id, live.uuid, options, key, upload, content_type, command_uid, spool_path)
        spec = RecordingSpec(rid, options, str(spool_path), self.config.mp3_quality, self.config.opus_complexity,
                             self.config.wav_buffer_ms, self.config.silence_threshold_dbfs)
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
            live.hurried = False
            self._handle(live, result.events)
            if result.ended:
                self._session_ended(live)

    async def _start_shard(self, index: int) -> None:
        shard = RemoteShard(self.config, index, self.config.workers, self._on_results, self._shard_gone)
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
            for row in self.catalog.recordings(live.app_id, session_uuid=uuid, limit=500)[0]:
                # "processing" ones were closed before the worker died and are being stored.
                if row["state"] in ("initiated", "recording", "paused", "stopped"):
                    self._spawn(self._recover(row), f"recover-{row['id']}")
        shard.sessions.clear()
        if not self._closing:
            await self._start_shard(shard.index)

    async def _housekeeping_loop(self) -> None:
        while True:
            await asyncio.sleep(PUMP_EVERY_S)
            self._pump_uploads()
            await self._end_idle_sessions()

    def _handle(self, live: LiveSession, events: list) -> None:
        for kind, data in events:
            try:
                self._on_event(live, kind, data)
            except Exception:
                log.exception("handling %s for session %s failed", kind, live.uuid)

    def _on_event(self, live: LiveSession, kind: str, data: dict[str, Any]) -> None:
        rid = data.get("recording_id")
        rec = live.recordings.get(rid)
        if rec is None:
            return
        now = self.clock.time()
        if kind == "recording.started":
            self.catalog.update_recording(rid, state="recording", started_at=now)
            self._emit(rec, "recording.started", {})
        elif kind in ("recording.paused", "recording.resumed"):
            state = "paused" if kind == "recording.paused" else "recording"
            self.catalog.update_recording(rid, state=state)
            self._emit(rec, kind, {})
        elif kind == "recording.stopped":
            self.catalog.update_recording(rid, state="stopped", stopped_at=now, termination_reason=data["reason"], finish_key=data.get("finish_key"))
            self._emit(rec, "recording.stopped", {"termination_reason": data["reason"], "finish_key": data.get("finish_key")})
        if kind == "recording.stopped" and live.recording is rec:
            rec.state = "stopping"
        if kind == "recording.closed":
            del live.recordings[rid]
            if live.recording is rec:
                live.recording = None
            self._spawn(self._store(rec, data), f"store-{rid}")

    def _emit(self, rec: LiveRecording, kind: str, extra: dict[str, Any]) -> None:
        payload = {"recording_id": rec.id, "session_uuid": rec.session_uuid, "command_uid": rec.command_uid, **extra}
        self.outbox.emit(rec.app_id, kind, payload)

    def _session_ended(self, live: LiveSession) -> None:
        if self.sessions.get(live.uuid) is not live:
            return
        del self.sessions[live.uuid]
        now = self.clock.time()
        self.catalog.update_session(live.uuid, state="ended", ended_at=now)
        for leg_id in live.legs:
            self.catalog.update_leg(leg_id, ended_at=now)
        self.outbox.emit(live.app_id, "session.ended", {"session_uuid": live.uuid})
        for callback in live.on_end:
            try:
                callback()
            except Exception:
                log.exception("session %s end callback failed", live.uuid)

    async def _end_idle_sessions(self) -> None:
        now = self.clock.monotonic()
        for live in list(self.sessions.values()):
            if live.ending or set(live.legs) - live.ended_legs or live.recordings:
                live.idle_since = None
            elif live.idle_since is None:
                live.idle_since = now
            elif now - live.idle_since >= self.config.session_idle_s:
                log.info("session %s idle for %.0f s: ending it", live.uuid, now - live.idle_since)
                await self.end_session(live.uuid)

    # -- storing -----------------------------------------------------------------------

    def _pump_uploads(self) -> None:
        for live in list(self.sessions.values()):
            for rec in list(live.recordings.values()):
                if not rec.pumping:
                    rec.pumping = True
                    self._spawn(self._pump(rec), f"pump-{rec.id}")

    async def _pump(self, rec: LiveRecording) -> None:
        try:
            await rec.upload.pump()
        except StorageError as exc:
            log.warning("uploading %s: %s (will retry)", rec.id, exc)
        finally:
            rec.pumping = False

    async def _store(self, rec: LiveRecording, summary: dict[str, Any]) -> None:
        """The recording is closed (its spool final): store it and say so."""
        duration = summary["duration"]
        self.catalog.update_recording(rec.id, state="processing", duration=duration, legs=summary["legs"], error=summary.get("error"))
        if rec.spool is not None:
            await asyncio.to_thread(remove_checkpoint, rec.spool)  # the catalog has the final legs
        while rec.pumping:
            await asyncio.sleep(0.05)
        await self.finish_upload(rec.id, rec.app_id, rec.upload, duration)

    async def finish_upload(self, rid: str, app_id: str, upload: Upload, duration: float) -> None:
        """Complete the upload and announce the stored recording (or its failure)."""
        try:
            info = await upload.complete()
        except StorageError as exc:
            log.error("recording %s could not be stored: %s", rid, exc)
            await upload.abort()
            self.catalog.update_recording(rid, state="failed", error=str(exc))
            row = self.catalog.recording(rid)
            self.outbox.emit(app_id, "recording.failed", {"recording_id": rid, "session_uuid": row["session_uuid"], "reason": str(exc), "command_uid": row["command_uid"]})
            return
        now = self.clock.time()
        expires = now + self.config.recording_retention_hours * 3600
        self.catalog.update_recording(rid, state="completed", completed_at=now, file_size=info.size, sha256=info.sha256, expires_at=expires, spool_path=None)
        self._announce_completed(self.catalog.recording(rid))

    def recording_url(self, row: dict[str, Any]) -> str:
        if self.config.recording_base_url:
            return f"{self.config.recording_base_url.rstrip('/')}/{row['storage_key']}"
        return f"{self.config.base_url}/api/v1/recordings/{row['id']}/download"

    def _announce_completed(self, row: dict[str, Any]) -> None:
        payload = {
            "recording_id": row["id"],
            "session_uuid": row["session_uuid"],
            "recording_url": self.recording_url(row),
            "duration": row["duration"],
            "file_size": row["file_size"],
            "format": row["format"],
            "checksum": {"algorithm": "sha256", "value": row["sha256"]},
            "command_uid": row["command_uid"],
            "termination_reason": row["termination_reason"],
            "finish_key": row["finish_key"],
            # legs that never carried media, and why (ice_failed, dtls_failed, no_media)
            "failed_legs": [{"leg_id": leg["leg_id"], "role": leg["role"], "error": leg["error"]}
                            for leg in row["legs"] or [] if leg.get("error")],
        }
        self.outbox.emit(row["app_id"], "recording.completed", payload)
        action_url = row["options"].get("action_url")
        if action_url:
            record_verb = {
                "RecordingUrl": payload["recording_url"],
                "RecordingDuration": round(row["duration"] or 0),
                "RecordingSid": row["id"],
                "CallId": row["session_uuid"],
                "RecordingStatus": "completed",
                "Digits": row["finish_key"] or "",
            }
            self.outbox.emit(row["app_id"], "recording.completed", payload, url=action_url, extra=record_verb)

    # -- retention ---------------------------------------------------------------------

    async def _sweep_loop(self) -> None:
        while True:
            try:
                await self.sweep_expired()
            except Exception:
                log.exception("the retention sweep failed; it will run again")
            await asyncio.sleep(self.config.retention_sweep_s)

    async def sweep_expired(self) -> int:
        """Delete the files of recordings past retention; they answer 410 from then on."""
        swept = 0
        for row in self.catalog.expired_recordings(self.clock.time()):
            try:
                await self.storage.delete(row["storage_key"])
            except StorageError as exc:
                log.warning("could not delete expired %s: %s (will retry)", row["id"], exc)
                continue
            self.catalog.update_recording(row["id"], state="expired")
            swept += 1
        return swept

    # -- recovery ----------------------------------------------------------------------

    async def recover(self) -> None:
        """After a restart: end the sessions the stop ended (announcing it, once: the next
        restart finds them ended) and finish every recording that was not yet stored."""
        for row in self.catalog.active_sessions():
            now = self.clock.time()
            # Queued before the state changes: a crash in between announces it twice, never not at all.
            self.outbox.emit(row["app_id"], "session.ended", {"session_uuid": row["uuid"]})
            for leg in self.catalog.legs(row["uuid"]):
                if leg["ended_at"] is None:
                    self.catalog.update_leg(leg["leg_id"], ended_at=now)
            self.catalog.update_session(row["uuid"], state="ended", ended_at=now)
        for row in self.catalog.recordings_in(ACTIVE_STATES):
            self._spawn(self._recover(row), f"recover-{row['id']}")

    async def _recover(self, row: dict[str, Any]) -> None:
        """Recover one recording, waiting out storage that is down for now."""
        delay = 1.0
        while True:
            try:
                return await self._recover_one(self.catalog.recording(row["id"]))
            except StorageError as exc:
                if not getattr(exc, "transient", False):
                    raise
                log.warning("recovering %s: %s (retrying in %.0f s)", row["id"], exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)

    async def _recover_one(self, row: dict[str, Any]) -> None:
        rid = row["id"]
        spool = Path(row["spool_path"]) if row["spool_path"] else None
        if spool is None or not spool.exists():
            if await self.storage.exists(row["storage_key"]):
                info = await self.storage.stat(row["storage_key"])
                self.catalog.update_recording(rid, state="completed", completed_at=self.clock.time(), file_size=info.size, sha256=info.sha256,
                                              expires_at=self.clock.time() + self.config.recording_retention_hours * 3600, spool_path=None)
                self._announce_completed(self.catalog.recording(rid))
                return
            self.catalog.update_recording(rid, state="failed", error="the spool file was lost")
            self.outbox.emit(row["app_id"], "recording.failed", {"recording_id": rid, "session_uuid": row["session_uuid"], "reason": "the spool file was lost", "command_uid": row["command_uid"]})
            return
        duration = await asyncio.to_thread(repair, row["format"], spool, row["sample_rate"], row["channels"], row["bitrate"])
        interrupted = row["state"] != "processing"
        # An interrupted recording's legs are as far as they were checkpointed with its spool.
        legs = _within(await asyncio.to_thread(read_checkpoint, spool) or [], duration) if interrupted else row["legs"]
        self.catalog.update_recording(
            rid, state="processing", duration=duration if interrupted or row["duration"] is None else row["duration"],
            termination_reason=row["termination_reason"] or "error", legs=legs,
            error=row["error"] or ("the server stopped during the recording; the audio received until then was kept" if interrupted else None))
        await asyncio.to_thread(remove_checkpoint, spool)
        upload = await self.storage.resume(row["storage_key"], spool, row["content_type"])
        await self.finish_upload(rid, row["app_id"], upload, duration)


def _within(legs: list[dict[str, Any]], duration: float) -> list[dict[str, Any]]:
    """Checkpointed legs told of audio still in the encoder's buffer: none past the file's end."""
    end = round(duration * 1000, 1)
    return [{**leg, **{name: min(leg[name], end) for name in ("first_ms", "last_ms") if leg.get(name) is not None}} for leg in legs]
