"""Storing, recovery and retention: what happens to a recording once its audio is spooled.

While a recording goes on, its upload is pumped (full parts sent to S3 as the spool grows);
once it is closed, the upload is completed and the recording is `completed` (or `failed`,
with its spool kept) in the catalog and announced. After a restart, `recover()` ends the
sessions the stop ended and finishes every recording that was not yet stored, from its
spool and journal, with the legs checkpointed beside the spool. Recordings past
retention have their files deleted and answer 410 from then on.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mediaserver.catalog import Catalog
from mediaserver.encoding.repair import repair
from mediaserver.errors import StorageError
from mediaserver.recorder.announce import Announcer
from mediaserver.recorder.messages import RecordingClosed
from mediaserver.storage import Storage, Upload
from mediaserver.storage.spool import read_checkpoint, remove_checkpoint
from mediaserver.tasks import TaskSet

if TYPE_CHECKING:
    from mediaserver.recorder.engine import LiveRecording

log = logging.getLogger(__name__)

# A recording in one of these states has not been stored yet.
ACTIVE_STATES = ("initiated", "recording", "paused", "stopped", "processing")


class Archive:
    """Recordings on their way to storage, and stored ones until retention ends."""

    def __init__(self, catalog: Catalog, storage: Storage, announcer: Announcer, clock, *, retention_hours: float,
                 sweep_every_s: float) -> None:
        self.catalog = catalog
        self.storage = storage
        self.announcer = announcer
        self.clock = clock
        self.retention_s = retention_hours * 3600
        self.sweep_every_s = sweep_every_s
        self._tasks = TaskSet("archive")  # pumping, storing, recovering

    async def wait(self, timeout: float) -> None:
        """Until the recordings being stored now are stored (or `timeout` has passed)."""
        await self._tasks.wait(timeout=timeout)

    async def close(self) -> None:
        await self._tasks.close()

    def pump(self, rec: LiveRecording) -> None:
        """Send what the recording's spool holds of full parts, unless a pump of it is running."""
        if rec.pumping is None or rec.pumping.done():
            rec.pumping = self._tasks.spawn(self._pump(rec), f"pump-{rec.id}")

    async def _pump(self, rec: LiveRecording) -> None:
        try:
            await rec.upload.pump()
        except StorageError as exc:
            log.warning("uploading %s: %s (will retry)", rec.id, exc)

    def store(self, rec: LiveRecording, closed: RecordingClosed) -> None:
        """The recording is closed (its spool final): store it and announce it, in the background."""
        self._tasks.spawn(self._store(rec, closed), f"store-{rec.id}")

    async def _store(self, rec: LiveRecording, closed: RecordingClosed) -> None:
        """The recording is closed (its spool final): store it and say so."""
        duration = closed.duration
        self.catalog.update_recording(rec.id, state="processing", duration=duration, legs=closed.legs, error=closed.error)
        if rec.spool is not None:
            await asyncio.to_thread(remove_checkpoint, rec.spool)  # the catalog has the final legs
        if rec.pumping is not None:
            await asyncio.wait([rec.pumping])  # the part being sent goes first; _pump handles its errors
        await self.finish_upload(rec.id, rec.app_id, rec.upload, duration)

    async def finish_upload(self, rid: str, app_id: str, upload: Upload, duration: float) -> None:
        """Complete the upload and announce the stored recording (or its failure)."""
        try:
            info = await upload.complete()
        except StorageError as exc:
            log.error("recording %s could not be stored: %s", rid, exc)
            await upload.abort()
            self.catalog.update_recording(rid, state="failed", error=str(exc))
            self.announcer.failed(await self.catalog.recording(rid), str(exc))
            return
        now = self.clock.time()
        expires = now + self.retention_s
        self.catalog.update_recording(rid, state="completed", completed_at=now, file_size=info.size, sha256=info.sha256, expires_at=expires, spool_path=None)
        self.announcer.completed(await self.catalog.recording(rid))

    # -- retention ---------------------------------------------------------------------

    async def sweep_loop(self) -> None:
        """Sweep now and every `sweep_every_s`, until cancelled."""
        while True:
            try:
                await self.sweep_expired()
            except Exception:
                log.exception("the retention sweep failed; it will run again")
            await asyncio.sleep(self.sweep_every_s)

    async def sweep_expired(self) -> int:
        """Delete the files of recordings past retention; they answer 410 from then on."""
        swept = 0
        for row in await self.catalog.expired_recordings(self.clock.time()):
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
        for row in await self.catalog.active_sessions():
            now = self.clock.time()
            # Queued before the state changes: a crash in between announces it twice, never not at all.
            self.announcer.session_ended(row["app_id"], row["uuid"])
            for leg in await self.catalog.legs(row["uuid"]):
                if leg["ended_at"] is None:
                    self.catalog.update_leg(leg["leg_id"], ended_at=now)
            self.catalog.update_session(row["uuid"], state="ended", ended_at=now)
        for row in await self.catalog.recordings_in(ACTIVE_STATES):
            self.recover_one(row)

    def recover_one(self, row: dict[str, Any]) -> None:
        """Finish the recording in `row` from its spool (and journal), in the background."""
        self._tasks.spawn(self._recover(row), f"recover-{row['id']}")

    async def _recover(self, row: dict[str, Any]) -> None:
        """Recover one recording, waiting out storage that is down for now."""
        delay = 1.0
        while True:
            try:
                return await self._recover_one(await self.catalog.recording(row["id"]))
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
                                              expires_at=self.clock.time() + self.retention_s, spool_path=None)
                self.announcer.completed(await self.catalog.recording(rid))
                return
            self.catalog.update_recording(rid, state="failed", error="the spool file was lost")
            self.announcer.failed(row, "the spool file was lost")
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
