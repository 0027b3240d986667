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
import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mediaserver.catalog import Catalog
from mediaserver.encoding.repair import repair
from mediaserver.errors import StorageError
from mediaserver.recorder.announce import Announcer
from mediaserver.recorder.messages import RecordingClosed
from mediaserver.storage import Storage, Upload
from mediaserver.storage.spool import read_checkpoint, remove_checkpoint, write_checkpoint
from mediaserver.tasks import TaskSet

if TYPE_CHECKING:
    from mediaserver.recorder.engine import LiveRecording

log = logging.getLogger(__name__)

# A recording in one of these states has not been stored yet.
ACTIVE_STATES = ("initiated", "recording", "paused", "stopped", "processing")


class Archive:
    """Recordings on their way to storage, and stored ones until retention ends."""

    def __init__(self, catalog: Catalog, storage: Storage, announcer: Announcer, clock, *, retention_hours: float,
                 sweep_every_s: float, spool_dir: Path, node_id: str | None = None,
                 checkpoint_s: float | None = None, pump_every_s: float = 1.0) -> None:
        self.catalog = catalog
        self.storage = storage
        self.announcer = announcer
        self.clock = clock
        self.retention_s = retention_hours * 3600
        self.sweep_every_s = sweep_every_s
        self.spool_dir = spool_dir
        # In a cluster: this node's name (it recovers only its own recordings) and how often
        # its spools are checkpointed to S3. None alone.
        self.node_id = node_id
        self.checkpoint_s = checkpoint_s
        self.pump_every_s = pump_every_s
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
            if self.checkpoint_s is not None and self.clock.monotonic() >= rec.checkpoint_due:
                # Taken at the first pump that is due, so one pump early: never more than
                # checkpoint_s apart.
                rec.checkpoint_due = self.clock.monotonic() + max(self.checkpoint_s - self.pump_every_s, 0.0)
                await self._checkpoint(rec)
        except StorageError as exc:
            log.warning("uploading %s: %s (will retry)", rec.id, exc)

    async def _checkpoint(self, rec: LiveRecording) -> None:
        """Copy what the spool gained since the last checkpoint to S3, where another node
        finds it if this one dies."""
        if rec.spool is None:
            return
        rec.checkpointed = await self.storage.checkpoint(rec.key, rec.spool, rec.checkpointed)
        # The legs as far as the spool goes, where a survivor finds them: the catalog.
        legs = await asyncio.to_thread(read_checkpoint, rec.spool)
        if legs and legs != rec.legs_checkpointed:
            self.catalog.update_recording(rec.id, legs=legs)
            rec.legs_checkpointed = legs

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
        if self.node_id is not None:
            if not await self._still_ours(rec.session_uuid):
                log.warning("recording %s was settled by another node while this one was cut off: not storing it", rec.id)
                await rec.upload.abort()
                return
            with contextlib.suppress(StorageError):  # the last seconds, should this node die while uploading
                await self._checkpoint(rec)
        if await self.finish_upload(rec.id, rec.app_id, rec.upload, duration) and self.node_id is not None:
            await self._drop_checkpoints(rec.key)

    async def _still_ours(self, session_uuid: str) -> bool:
        """False once another node has taken this node's sessions over (it took us for dead)."""
        row = await self.catalog.session(session_uuid)
        return row is None or row.get("node_id") in (None, self.node_id)

    async def _drop_checkpoints(self, key: str) -> None:
        try:
            await self.storage.drop_checkpoints(key)
        except StorageError as exc:
            log.warning("could not delete the checkpoints of %s: %s", key, exc)

    async def finish_upload(self, rid: str, app_id: str, upload: Upload, duration: float) -> bool:
        """Complete the upload and announce the stored recording (or its failure); True
        when it was stored."""
        try:
            info = await upload.complete()
        except StorageError as exc:
            log.error("recording %s could not be stored: %s", rid, exc)
            await upload.abort()
            self.catalog.update_recording(rid, state="failed", error=str(exc))
            self.announcer.failed(await self.catalog.recording(rid), str(exc))
            return False
        now = self.clock.time()
        expires = now + self.retention_s
        self.catalog.update_recording(rid, state="completed", completed_at=now, file_size=info.size, sha256=info.sha256, expires_at=expires, spool_path=None)
        self.announcer.completed(await self.catalog.recording(rid))
        return True

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
        if not await self.catalog.try_lead("retention"):
            return swept  # another node of the cluster sweeps
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
        for row in await self.catalog.active_sessions(self.node_id):
            now = self.clock.time()
            # Queued before the state changes: a crash in between announces it twice, never not at all.
            self.announcer.session_ended(row["app_id"], row["uuid"])
            for leg in await self.catalog.legs(row["uuid"]):
                if leg["ended_at"] is None:
                    self.catalog.update_leg(leg["leg_id"], ended_at=now)
            self.catalog.update_session(row["uuid"], state="ended", ended_at=now)
        for row in await self.catalog.recordings_in(ACTIVE_STATES, self.node_id):
            self.recover_one(row)
        if self.node_id is not None:
            await self._forget_settled_elsewhere()

    async def _forget_settled_elsewhere(self) -> None:
        """A node back from the dead: the spools of recordings another node took over and
        settled meanwhile are not touched again, only deleted."""
        for spool in sorted(self.spool_dir.glob("rec_*")) if self.spool_dir.is_dir() else []:
            if spool.name.endswith((".legs.json", ".tmp")):
                continue
            row = await self.catalog.recording(spool.name.split(".", 1)[0])
            session = await self.catalog.session(row["session_uuid"]) if row is not None else None
            if session is not None and session.get("node_id") not in (None, self.node_id):
                log.info("recording %s was settled by node %s while this one was away: deleting its spool",
                         row["id"], session["node_id"])
                await asyncio.to_thread(_delete_spool, spool)

    # -- a lost node's recordings ------------------------------------------------------

    def settle_lost(self, row: dict[str, Any]) -> None:
        """Store a recording whose node died, from the checkpoints it left in S3, in the
        background: `completed` with `termination_reason: node_lost`."""
        self._tasks.spawn(self._settle_lost(row), f"settle-{row['id']}")

    async def _settle_lost(self, row: dict[str, Any]) -> None:
        key = row["storage_key"]
        spool = self.spool_dir / Path(row["spool_path"] or f"{row['id']}.{key.rsplit('.', 1)[-1]}").name
        delay = 1.0
        while True:
            try:
                restored = await self.storage.restore(key, spool)
                await self.storage.abort_uploads(key)  # the dead node's; the spool is the source now
                break
            except StorageError as exc:
                if not getattr(exc, "transient", False):
                    log.error("settling %s of a lost node: %s", row["id"], exc)
                    self.catalog.update_recording(row["id"], state="failed", error=f"the node recording it was lost: {exc}")
                    self.announcer.failed(await self.catalog.recording(row["id"]), str(exc))
                    return
                log.warning("settling %s of a lost node: %s (retrying in %.0f s)", row["id"], exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)
        if restored == 0:
            spool.unlink(missing_ok=True)  # nothing reached S3 but, perhaps, the stored file
        elif row["legs"]:  # as the dead node last checkpointed them
            await asyncio.to_thread(write_checkpoint, spool, row["legs"])
        log.info("settling recording %s of a lost node from %d checkpointed bytes", row["id"], restored)
        # Settled as interrupted whatever state it had: the file ends where the checkpoints do.
        lost = dict(row, spool_path=str(spool), state="stopped", termination_reason="node_lost",
                    error="the node recording it was lost; the audio checkpointed until then was kept")
        self.catalog.update_recording(row["id"], spool_path=str(spool))
        await self._recover_one(lost)
        if (await self.catalog.recording(row["id"]))["state"] == "completed":
            await self._drop_checkpoints(key)

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


def _delete_spool(spool: Path) -> None:
    remove_checkpoint(spool)
    spool.unlink(missing_ok=True)


def _within(legs: list[dict[str, Any]], duration: float) -> list[dict[str, Any]]:
    """Checkpointed legs told of audio still in the encoder's buffer: none past the file's end."""
    end = round(duration * 1000, 1)
    return [{**leg, **{name: min(leg[name], end) for name in ("first_ms", "last_ms") if leg.get(name) is not None}} for leg in legs]
