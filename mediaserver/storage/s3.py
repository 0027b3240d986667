"""The S3 backend: recordings streamed to a bucket by multipart upload while they are made.

One `S3Upload` per recording, fed from its spool file:

- `pump()` (about once a second while recording) sends every *full* part the spool holds
  beyond those already sent. The multipart upload is created when the first part is full,
  so a recording shorter than one part costs a single PutObject and no upload to clean up.
- `complete()` reads the final spool once, part by part: it hashes the whole object
  (sha256), re-sends every part whose bytes changed since they were sent (encoders patch
  what they wrote first: WAV sizes at offset 0, the MP3 info frame), sends the tail as the
  last part and completes. An upload holds one part in memory at a time (and the HTTP
  client a copy while sending it); `max_parts_in_flight` bounds that across all uploads.
- After every part the journal (`journal.py`) records upload id, part numbers, offsets,
  sizes, MD5s and ETags. After a restart, `resume()` reconciles it with ListParts and
  carries on; without a journal the upload starts over from the spool.

Failures. An unreachable endpoint, timeouts, 5xx and throttling are *transient*: `pump()`
backs off exponentially and tries again on a later call while the spool keeps growing;
`complete()` keeps trying with backoff for `retry_for_s` (24 h by default). Anything else
(AccessDenied, NoSuchBucket, bad credentials) can never succeed, and neither can an
upload still failing after `retry_for_s`: `complete()` raises StorageError and the spool is
kept. A multipart upload that vanished (NoSuchUpload: aborted elsewhere) starts over from
the spool, which is always the source of truth. A stored object's spool is removed, as the
local backend consumes its spool by renaming it.

Checksums. `ObjectInfo.sha256` is computed from the spool. A single PutObject also stores it
as metadata (`x-amz-meta-sha256`); a multipart object cannot carry it, since metadata is
fixed by CreateMultipartUpload before the bytes exist, so `stat()` of such an object
streams it once to compute the digest. `stat()` is only needed to recover a recording whose
spool is gone.

Orphans. `start()` aborts the multipart uploads under the key prefix that no journal knows:
a process died between creating and recording them. Servers that share a bucket and key
prefix must share `data_dir/journal` too; an upload aborted by mistake starts over from its
spool when its owner notices. A cluster's nodes share the bucket but not their journals
(`S3Settings.shared`): there the uploads no journal here knows are other nodes' live ones,
so start() sweeps none, and a dead node's upload is aborted by the survivor that settles it.

Checkpoints (cluster mode). The parts of an open multipart upload cannot be read back, and a
node's spool is lost with its disk. So while it records, a clustered node calls
`checkpoint()` every `checkpoint_s`: the spool's bytes since the previous checkpoint become
one small object `{key}.ckpt/{offset:016d}`, named by the offset they start at. A survivor
`restore()`s them end to end into a fresh spool, repairs it as after a crash, uploads it as
usual, then aborts the dead node's multipart upload (`abort_uploads()`) and deletes the
checkpoints (`drop_checkpoints()`). Bytes patched after they were checkpointed (WAV sizes,
the MP3 info frame) are not copied again: the repair rewrites them. The cost: one small PUT
per recording per `checkpoint_s`, and every byte stored twice until the recording completes
and its checkpoints are dropped.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import logging
import os
import random
from contextlib import AsyncExitStack
from pathlib import Path
from typing import IO, Any, Awaitable, Callable, Iterator, TypeVar
from urllib.parse import quote

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError, IncompleteReadError
from botocore.exceptions import ConnectionError as BotoConnectionError

from mediaserver.clock import Clock, SystemClock
from mediaserver.config import S3Settings
from mediaserver.errors import StorageError
from mediaserver.storage.base import ObjectInfo
from mediaserver.storage.journal import Journal, PartRecord, UploadRecord

log = logging.getLogger(__name__)
T = TypeVar("T")

MiB = 1024 * 1024
MAX_PRESIGN_S = 7 * 24 * 3600  # SigV4 presigned URLs live at most 7 days
READ_CHUNK = 1 * MiB
# Error codes worth trying again; anything 5xx, 408 and 429 is too.
TRANSIENT_CODES = frozenset({"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "Throttling",
                             "ThrottlingException", "RequestLimitExceeded", "BadDigest", "OperationAborted"})
# The upload id no longer names a live upload, or the parts we recorded are not there:
# only starting the multipart upload over can work.
LOST_UPLOAD_CODES = frozenset({"NoSuchUpload", "InvalidPart"})
TRANSPORT_ERRORS = (BotoConnectionError, HTTPClientError, IncompleteReadError, aiohttp.ClientError, OSError)
DELETE_BATCH = 1000  # the most keys one DeleteObjects takes
OFFSET_DIGITS = 16  # checkpoint names: zero-padded, so they list in offset order


class S3Error(StorageError):
    """A failed S3 request; `transient` when the same request may succeed later."""

    def __init__(self, message: str, *, code: str = "", status: int = 0, transient: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.transient = transient

    @property
    def upload_lost(self) -> bool:
        return self.code in LOST_UPLOAD_CODES


class Backoff:
    """Exponential delays with jitter: first, 2×first, … up to cap, each scaled by 0.5–1."""

    def __init__(self, first: float, cap: float) -> None:
        self.first = first
        self.cap = cap
        self.failures = 0

    def next(self) -> float:
        delay = min(self.cap, self.first * 2 ** min(self.failures, 32))
        self.failures += 1
        return delay * (0.5 + random.random() / 2)  # spread retries of many uploads apart

    def reset(self) -> None:
        self.failures = 0


def content_disposition(filename: str) -> str:
    """`attachment` with an ASCII filename, plus the exact name (RFC 6266, RFC 8187) if it is not ASCII."""
    fallback = "".join(c if " " <= c < "\x7f" and c not in '"\\' else "_" for c in filename)
    value = f'attachment; filename="{fallback}"'
    if fallback != filename:
        value += f"; filename*=UTF-8''{quote(filename, safe='')}"
    return value


def key_prefix(template: str) -> str:
    """The fixed start of every key the template makes (where orphans are looked for)."""
    return template.split("{", 1)[0]


def multipart_etag(parts: list[PartRecord]) -> str:
    """The ETag S3 gives a multipart object: MD5 of the parts' binary MD5s, then `-N`."""
    joined = b"".join(bytes.fromhex(part.md5) for part in parts)
    return f'"{hashlib.md5(joined).hexdigest()}-{len(parts)}"'


def _read_part(path: Path, offset: int, size: int, whole: Any = None) -> tuple[bytes, str, str]:
    """Blocking: `size` bytes at `offset`, their MD5 (hex, base64), feeding `whole` if given."""
    with open(path, "rb") as fh:
        data = os.pread(fh.fileno(), size, offset)
    if len(data) != size:
        raise StorageError(f"spool {path} holds fewer bytes than expected ({offset + len(data)} < {offset + size})")
    md5 = hashlib.md5(data)
    if whole is not None:
        whole.update(data)
    return data, md5.hexdigest(), base64.b64encode(md5.digest()).decode()


def checkpoint_prefix(key: str) -> str:
    """Where the checkpoints of `key` lie: one object per checkpoint, named by its offset."""
    return f"{key}.ckpt/"


def checkpoint_key(key: str, offset: int) -> str:
    return f"{checkpoint_prefix(key)}{offset:0{OFFSET_DIGITS}d}"


def checkpoint_offset(prefix: str, name: str) -> int | None:
    """The offset a checkpoint object's name gives, or None for a name checkpoint() does not make."""
    digits = name.removeprefix(prefix)
    if len(digits) == OFFSET_DIGITS and digits.isascii() and digits.isdigit():
        return int(digits)
    return None


def _read_tail(path: Path, since: int, limit: int) -> tuple[bytes, str]:
    """Blocking: up to `limit` bytes of the spool from `since` and their MD5 (base64); b"" if none."""
    try:
        fh = open(path, "rb")
    except FileNotFoundError:  # consumed by complete() meanwhile: nothing left to copy
        return b"", ""
    with fh:
        size = os.fstat(fh.fileno()).st_size
        data = os.pread(fh.fileno(), min(size - since, limit), since) if size > since else b""
    return data, base64.b64encode(hashlib.md5(data).digest()).decode()


def _create_spool(path: Path) -> IO[bytes]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "w+b")


def _append_if_agrees(fh: IO[bytes], written: int, offset: int, data: bytes) -> int | None:
    """Blocking: lay `data` (from `offset`) after the `written` bytes; the new end, or None
    when the bytes it shares with what is written differ (it belongs to another history)."""
    overlap = written - offset
    if len(data) <= overlap:
        return written
    fh.seek(offset)
    if fh.read(overlap) != data[:overlap]:
        return None
    fh.seek(written)
    fh.write(data[overlap:])
    return offset + len(data)


def _close_synced(fh: IO[bytes]) -> None:
    with fh:
        fh.flush()
        os.fsync(fh.fileno())


def _spool_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


class S3Upload:
    """One recording's multipart upload, fed from its spool (see the module docstring)."""

    def __init__(self, storage: "S3Storage", key: str, spool: Path, content_type: str,
                 record: UploadRecord | None = None) -> None:
        self.key = key
        self._storage = storage
        self._spool = spool
        self._content_type = content_type
        self._record = record
        self._reconciled = record is None
        self._backoff = Backoff(*storage.backoff_s)
        self._not_before = 0.0

    @property
    def upload_id(self) -> str | None:
        return self._record.upload_id if self._record else None

    @property
    def parts_sent(self) -> int:
        return len(self._record.parts) if self._record else 0

    @property
    def _part_size(self) -> int:
        return self._record.part_size if self._record else self._storage.part_size

    # -- while recording ---------------------------------------------------------------

    async def pump(self) -> None:
        """Send every full part the spool holds beyond those sent; on failure, wait and retry later.

        Never raises for S3 trouble: the spool keeps the bytes and a later call (or
        complete()) sends them. Calls are skipped until the backoff delay has passed.
        """
        storage = self._storage
        if not storage.ready or storage.clock.monotonic() < self._not_before:
            return
        try:
            await self._send_full_parts()
        except (StorageError, OSError) as exc:
            await self._postpone(exc)
        else:
            if self._backoff.failures:
                log.info("S3 upload of %s caught up after %d failed attempts", self.key, self._backoff.failures)
            self._backoff.reset()

    async def _send_full_parts(self) -> None:
        part_size = self._part_size
        for number in range(1, _spool_size(self._spool) // part_size + 1):
            if self._record is None or number not in self._record.parts:
                await self._sync_part(number, (number - 1) * part_size, part_size)

    async def _postpone(self, exc: Exception) -> None:
        if isinstance(exc, S3Error) and exc.upload_lost:
            await self._start_over(exc)
        delay = self._backoff.next()
        self._not_before = self._storage.clock.monotonic() + delay
        # The first failure of a run is worth a warning; the rest of an outage is noise.
        level = logging.WARNING if self._backoff.failures == 1 else logging.DEBUG
        log.log(level, "S3 upload of %s failed (%s); the spool keeps the audio, next try in %.1f s",
                self.key, exc, delay)

    # -- the parts -----------------------------------------------------------------------

    async def _ensure_upload(self) -> UploadRecord:
        if self._record is None:
            storage = self._storage
            with storage.errors("CreateMultipartUpload", self.key):
                created = await storage.client.create_multipart_upload(
                    Bucket=storage.bucket, Key=self.key, ContentType=self._content_type, **storage.sse_params)
            self._record = UploadRecord(
                self.key, created["UploadId"], str(self._spool), self._content_type, storage.part_size)
            self._reconciled = True
            await asyncio.to_thread(storage.journal.save, self._record)
        return self._record

    async def _sync_part(self, number: int, offset: int, size: int, whole: Any = None) -> PartRecord:
        """Read one part of the spool and send it, unless S3 already holds these very bytes."""
        async with self._storage.part_slots:
            data, md5, md5_b64 = await asyncio.to_thread(_read_part, self._spool, offset, size, whole)
            sent = self._record.parts.get(number) if self._record else None
            if sent is not None and (sent.offset, sent.size, sent.md5) == (offset, size, md5):
                return sent
            return await self._send_part(number, offset, data, md5, md5_b64)

    async def _send_part(self, number: int, offset: int, data: bytes, md5: str, md5_b64: str) -> PartRecord:
        record = await self._ensure_upload()
        storage = self._storage
        with storage.errors("UploadPart", self.key):
            sent = await storage.client.upload_part(
                Bucket=storage.bucket, Key=self.key, UploadId=record.upload_id, PartNumber=number,
                Body=data, ContentMD5=md5_b64)
        part = PartRecord(number, offset, len(data), md5, sent["ETag"])
        record.parts[number] = part
        await asyncio.to_thread(storage.journal.save, record)
        return part

    async def _start_over(self, exc: S3Error) -> None:
        """The multipart upload is gone or unusable: the next attempt starts over from the spool."""
        record, self._record = self._record, None
        self._reconciled = True
        if record is not None:
            log.warning("S3 multipart upload %s of %s is unusable (%s); starting over from the spool",
                        record.upload_id, self.key, exc.code)
            if exc.code != "NoSuchUpload":
                await self._storage.abort_quietly(self.key, record.upload_id)
            await asyncio.to_thread(self._storage.journal.remove, self.key)

    async def reconcile(self) -> None:
        """Keep only the journaled parts that ListParts confirms with the same ETag and size."""
        record = self._record
        if record is None or self._reconciled:
            return
        listed = await self._storage.list_parts(self.key, record.upload_id)
        kept = {n: p for n, p in record.parts.items() if listed.get(n) == (p.etag, p.size)}
        if len(kept) != len(record.parts):
            log.info("S3 upload of %s: %d of %d journaled parts confirmed", self.key, len(kept), len(record.parts))
        record.parts = kept
        await asyncio.to_thread(self._storage.journal.save, record)
        self._reconciled = True

    # -- the end -------------------------------------------------------------------------

    async def complete(self) -> ObjectInfo:
        """The spool is final: store the whole object and say what was stored.

        Transient failures are retried with backoff for `retry_for_s`; a permanent one, or
        one still failing then, raises StorageError and keeps the spool.
        """
        storage = self._storage
        deadline = storage.clock.monotonic() + storage.retry_for_s
        backoff = Backoff(*storage.backoff_s)
        while True:
            try:
                await storage.wait_ready(deadline)
                info = await self._finish()
                break
            except S3Error as exc:
                if exc.upload_lost:
                    await self._start_over(exc)
                elif not exc.transient:
                    raise
                delay = backoff.next()
                if storage.clock.monotonic() + delay > deadline:
                    message = f"{self.key} could not be stored within {storage.retry_for_s:g} s: {exc}"
                    raise StorageError(message) from exc
                level = logging.WARNING if backoff.failures == 1 else logging.DEBUG
                log.log(level, "completing S3 upload of %s failed (%s); retrying in %.1f s", self.key, exc, delay)
                await asyncio.sleep(delay)
        await asyncio.to_thread(self._consume)
        return info

    async def _finish(self) -> ObjectInfo:
        try:
            size = self._spool.stat().st_size
        except OSError as exc:
            raise StorageError(f"the spool of {self.key} cannot be read: {exc}") from exc
        # Once parts are sent, even a spool that ends within one part completes them.
        if size == 0 or (self._record is None and size <= self._part_size):
            return await self._put_single(size)
        await self.reconcile()
        return await self._complete_multipart(size)

    async def _put_single(self, size: int) -> ObjectInfo:
        storage = self._storage
        whole = hashlib.sha256()
        async with storage.part_slots:
            data, _, md5_b64 = await asyncio.to_thread(_read_part, self._spool, 0, size, whole)
            with storage.errors("PutObject", self.key):
                stored = await storage.client.put_object(
                    Bucket=storage.bucket, Key=self.key, Body=data, ContentType=self._content_type, ContentMD5=md5_b64,
                    Metadata={"sha256": whole.hexdigest()}, **storage.sse_params)
        if self._record is not None:  # the spool shrank to nothing after parts were sent
            await storage.abort_quietly(self.key, self._record.upload_id)
        return ObjectInfo(self.key, size, whole.hexdigest(), stored["ETag"])

    async def _complete_multipart(self, size: int) -> ObjectInfo:
        part_size = self._part_size
        whole = hashlib.sha256()
        parts = []
        for number in range(1, -(-size // part_size) + 1):
            offset = (number - 1) * part_size
            parts.append(await self._sync_part(number, offset, min(part_size, size - offset), whole))
        etag = await self._complete_parts(parts)
        return ObjectInfo(self.key, size, whole.hexdigest(), etag)

    async def _complete_parts(self, parts: list[PartRecord]) -> str:
        storage = self._storage
        record = self._record
        listing = {"Parts": [{"PartNumber": p.number, "ETag": p.etag} for p in parts]}
        try:
            with storage.errors("CompleteMultipartUpload", self.key):
                done = await storage.client.complete_multipart_upload(
                    Bucket=storage.bucket, Key=self.key, UploadId=record.upload_id, MultipartUpload=listing)
            return done["ETag"]
        except S3Error as exc:
            # A retry after a completion whose answer was lost finds no upload, but the object.
            if exc.code == "NoSuchUpload" and await storage.etag(self.key) == multipart_etag(parts):
                return multipart_etag(parts)
            raise

    def _consume(self) -> None:
        """Blocking: the object is stored; its journal and spool are no longer needed."""
        self._storage.journal.remove(self.key)
        self._record = None
        self._spool.unlink(missing_ok=True)

    async def abort(self) -> None:
        """Give up: abort the multipart upload if there is one; the spool stays for inspection."""
        record, self._record = self._record, None
        if record is not None:
            await self._storage.abort_quietly(self.key, record.upload_id)
            await asyncio.to_thread(self._storage.journal.remove, self.key)


class S3Storage:
    """Recordings in an S3 bucket (path-style addressing, SigV4), uploaded while they are made.

    `settings` (checked with the rest of the configuration) say where, how large a part
    is and how long complete() keeps trying through an outage; orphans are looked for under
    the fixed start of the key template. The keywords tune the rest: `retry_for_s`
    overrides the settings' (tests), `backoff_s` is the first and the longest delay between
    tries.
    """

    name = "s3"

    def __init__(self, settings: S3Settings, *, retry_for_s: float | None = None,
                 backoff_s: tuple[float, float] = (1.0, 30.0), connect_timeout_s: float = 5.0,
                 read_timeout_s: float = 60.0, max_parts_in_flight: int = 4, clock: Clock | None = None) -> None:
        self.endpoint = settings.endpoint
        self.bucket = settings.bucket
        self.region = settings.region
        self.part_size = settings.part_size
        self.prefix = key_prefix(settings.key_template)
        self.shared = settings.shared
        self.retry_for_s = settings.retry_for_s if retry_for_s is None else retry_for_s
        self.backoff_s = backoff_s
        self.clock = clock or SystemClock()
        self.journal = Journal(settings.journal_dir)
        self.sse_params = {"ServerSideEncryption": "AES256"} if settings.sse == "AES256" else {}
        self.part_slots = asyncio.Semaphore(max_parts_in_flight)
        self._credentials = (settings.access_key, settings.secret_key)
        self._timeouts = (connect_timeout_s, read_timeout_s)
        self._stack = AsyncExitStack()
        self._client: Any = None
        self._ready = asyncio.Event()
        self._checker: asyncio.Task[None] | None = None
        self._checkpoints_failing: set[str] = set()  # keys whose last checkpoint failed: warned once

    @property
    def client(self) -> Any:
        if self._client is None:
            raise StorageError(f"S3 storage {self.endpoint} bucket {self.bucket} is not started")
        return self._client

    @property
    def ready(self) -> bool:
        """Whether the bucket was checked and orphans swept: uploads may go ahead."""
        return self._ready.is_set()

    # -- lifetime ------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, check the bucket and abort orphaned uploads.

        Wrong credentials or a missing bucket raise StorageError naming endpoint and bucket.
        An unreachable endpoint does not: the server must still record (to the spool), so
        the check is retried in the background and uploads wait for it.
        """
        if self._client is not None:
            return
        self._client = await self._stack.enter_async_context(self._create_client())
        try:
            await self._check_and_sweep()
        except S3Error as exc:
            if exc.transient:
                log.warning("%s; recordings are spooled on disk and uploaded once it answers", exc)
                self._checker = asyncio.create_task(self._check_until_ready(), name="s3-start-check")
                return
            await self.close()
            raise
        except BaseException:
            await self.close()
            raise

    def _create_client(self) -> Any:
        access_key, secret_key = self._credentials
        config = AioConfig(
            signature_version="s3v4", s3={"addressing_style": "path"},
            connect_timeout=self._timeouts[0], read_timeout=self._timeouts[1],
            # Our own backoff spans outages; botocore only smooths over a single blip.
            retries={"mode": "standard", "total_max_attempts": 2},
            # Every upload carries Content-MD5 instead: S3-compatible servers do not all know the CRC headers.
            request_checksum_calculation="when_required", response_checksum_validation="when_required")
        return get_session().create_client(
            "s3", endpoint_url=self.endpoint, region_name=self.region,
            aws_access_key_id=access_key, aws_secret_access_key=secret_key, config=config)

    async def _check_and_sweep(self) -> None:
        with self.errors("HeadBucket"):
            await self.client.head_bucket(Bucket=self.bucket)
        await self._abort_orphans()
        self._ready.set()

    async def _check_until_ready(self) -> None:
        backoff = Backoff(*self.backoff_s)
        while True:
            await asyncio.sleep(backoff.next())
            try:
                await self._check_and_sweep()
                log.info("S3 at %s answers again; uploads resume", self.endpoint)
                return
            except S3Error as exc:
                if not exc.transient:
                    # Uploads will meet the same error and fail on it: let them.
                    log.error("%s", exc)
                    self._ready.set()
                    return

    async def wait_ready(self, deadline: float) -> None:
        """Wait for start()'s bucket check, until the monotonic `deadline`."""
        if self.ready:
            return
        if self._client is None:
            raise StorageError(f"S3 storage {self.endpoint} bucket {self.bucket} is not started")
        try:
            await asyncio.wait_for(self._ready.wait(), max(deadline - self.clock.monotonic(), 0))
        except TimeoutError:
            raise S3Error(f"S3 at {self.endpoint} bucket {self.bucket} was unreachable", transient=True) from None

    async def close(self) -> None:
        """Stop the background check and close the client. Idempotent."""
        checker, self._checker = self._checker, None
        if checker is not None:
            checker.cancel()
            await asyncio.gather(checker, return_exceptions=True)
        await self._stack.aclose()
        self._client = None
        self._ready.clear()

    async def _abort_orphans(self) -> None:
        """Abort uploads under the prefix that no journal knows; drop journals whose spool is gone."""
        records = await asyncio.to_thread(self.journal.records)
        for record in records:
            if not Path(record.spool).exists():
                log.warning("S3 upload of %s has lost its spool %s; aborting it", record.key, record.spool)
                await self.abort_quietly(record.key, record.upload_id)
                await asyncio.to_thread(self.journal.remove, record.key)
        if self.shared:
            log.info("S3 bucket %s is shared with other nodes: the uploads under %r that no journal here "
                     "knows are theirs, so none is aborted as an orphan", self.bucket, self.prefix)
            return
        known = {record.upload_id for record in records if Path(record.spool).exists()}
        with self.errors("ListMultipartUploads", self.prefix):
            pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=self.prefix)
            orphans = [(u["Key"], u["UploadId"]) async for page in pages for u in page.get("Uploads", [])
                       if u["UploadId"] not in known]
        for key, upload_id in orphans:
            log.info("aborting orphaned S3 multipart upload %s of %s", upload_id, key)
            await self.abort_quietly(key, upload_id)

    # -- uploads -------------------------------------------------------------------------

    def begin(self, key: str, spool: Path, content_type: str) -> S3Upload:
        """The upload of a spool about to be written; does no I/O."""
        return S3Upload(self, key, spool, content_type)

    async def resume(self, key: str, spool: Path, content_type: str) -> S3Upload:
        """After a restart: continue the journaled upload of `key`, or start over from the spool.

        Never raises for S3 trouble: what cannot be checked now is checked by complete().
        """
        record = await asyncio.to_thread(self.journal.load, key)
        if record is not None and record.spool != str(spool):
            log.warning("S3 journal of %s names spool %s, not %s; starting over", key, record.spool, spool)
            await self.abort_quietly(key, record.upload_id)
            record = None
        upload = S3Upload(self, key, spool, content_type if record is None else record.content_type, record)
        with contextlib.suppress(StorageError):
            await upload.reconcile()
        return upload

    async def list_parts(self, key: str, upload_id: str) -> dict[int, tuple[str, int]]:
        """Part number -> (ETag, size) of the parts S3 holds for an upload."""
        parts: dict[int, tuple[str, int]] = {}
        with self.errors("ListParts", key):
            pages = self.client.get_paginator("list_parts").paginate(Bucket=self.bucket, Key=key, UploadId=upload_id)
            async for page in pages:
                parts.update((p["PartNumber"], (p["ETag"], p["Size"])) for p in page.get("Parts", []))
        return parts

    async def abort_quietly(self, key: str, upload_id: str) -> None:
        """Abort a multipart upload; one that cannot be aborted now is left for the next start()."""
        try:
            with self.errors("AbortMultipartUpload", key):
                await self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except S3Error as exc:
            if exc.code != "NoSuchUpload":
                log.warning("could not abort S3 multipart upload %s of %s: %s", upload_id, key, exc)

    async def abort_uploads(self, key: str) -> int:
        """Abort every open multipart upload of exactly `key` (a lost node's); how many were aborted.

        Keys that merely start with `key` are left alone; this node's journal record of `key`
        goes too. S3 trouble raises S3Error: the uploads left open are found again next time.
        """
        with self.errors("ListMultipartUploads", key):
            pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=key)
            upload_ids = [u["UploadId"] async for page in pages for u in page.get("Uploads", []) if u["Key"] == key]
        aborted = 0
        for upload_id in upload_ids:
            try:
                with self.errors("AbortMultipartUpload", key):
                    await self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
                aborted += 1
            except S3Error as exc:
                if exc.code != "NoSuchUpload":  # gone already is what we want
                    raise
        await asyncio.to_thread(self.journal.remove, key)
        return aborted

    # -- checkpoints (see the module docstring) -----------------------------------------

    async def checkpoint(self, key: str, spool: Path, since: int) -> int:
        """Copy the spool's bytes from `since` to the object `{key}.ckpt/{since:016d}`; the new offset.

        Nothing is sent when the spool holds no new bytes, and at most one part's worth per
        call (the rest goes with the next), so a checkpoint holds no more memory than a part.
        A transient failure logs a warning (once per outage) and returns `since`: the next
        call sends these bytes again, with more. A permanent one raises StorageError.
        """
        async with self.part_slots:
            data, md5_b64 = await asyncio.to_thread(_read_tail, spool, since, self.part_size)
            if not data:
                return since
            name = checkpoint_key(key, since)
            try:
                with self.errors("PutObject", name):
                    await self.client.put_object(Bucket=self.bucket, Key=name, Body=data, ContentMD5=md5_b64,
                                                 ContentType="application/octet-stream", **self.sse_params)
            except S3Error as exc:
                if not exc.transient:
                    raise
                self._checkpoint_failed(key, exc)
                return since
        if key in self._checkpoints_failing:
            self._checkpoints_failing.discard(key)
            log.info("checkpoints of %s reach S3 again", key)
        return since + len(data)

    def _checkpoint_failed(self, key: str, exc: S3Error) -> None:
        level = logging.DEBUG if key in self._checkpoints_failing else logging.WARNING
        self._checkpoints_failing.add(key)
        log.log(level, "checkpoint of %s failed (%s); the next one carries these bytes too", key, exc)

    async def restore(self, key: str, dest: Path, *, retry_for_s: float = 60.0) -> int:
        """Rebuild a lost spool from the checkpoints of `key` into `dest`; the bytes written.

        The checkpoints are laid end to end in offset order from 0. One that starts inside
        what is written adds its bytes beyond it if the bytes they share agree; one wholly
        inside is skipped unread. A gap or a disagreement ends the restore with a warning,
        keeping the contiguous start. Names checkpoint() does not make are ignored.
        Transient failures are retried with backoff for `retry_for_s`, then raise S3Error
        with `transient` set, so that the caller tries again later.
        """
        deadline = self.clock.monotonic() + retry_for_s
        prefix = checkpoint_prefix(key)
        listed = await self._retrying(functools.partial(self._list_objects, prefix), deadline)
        pieces = sorted((offset, size, name) for name, size in listed
                        if (offset := checkpoint_offset(prefix, name)) is not None)
        fh = await asyncio.to_thread(_create_spool, dest)
        try:
            written = 0
            for offset, size, name in pieces:
                if offset + size <= written:
                    continue
                if offset > written:
                    log.warning("checkpoints of %s miss bytes %d..%d: restored the first %d bytes only",
                                key, written, offset, written)
                    break
                data = await self._retrying(functools.partial(self._read_object, name), deadline)
                end = await asyncio.to_thread(_append_if_agrees, fh, written, offset, data)
                if end is None:
                    log.warning("checkpoint %s disagrees with bytes %d..%d before it: restored the first %d bytes only",
                                name, offset, written, written)
                    break
                written = end
        finally:
            await asyncio.to_thread(_close_synced, fh)
        return written

    async def drop_checkpoints(self, key: str) -> None:
        """Delete every object under `{key}.ckpt/` (its recording is stored: they are not needed)."""
        prefix = checkpoint_prefix(key)
        names = [name for name, _ in await self._list_objects(prefix)]
        for start in range(0, len(names), DELETE_BATCH):
            batch = [{"Key": name} for name in names[start:start + DELETE_BATCH]]
            with self.errors("DeleteObjects", prefix):
                answer = await self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            if errors := answer.get("Errors"):
                first = errors[0]
                code = first.get("Code", "")
                raise S3Error(f"S3 DeleteObjects {self.bucket}/{prefix} at {self.endpoint}: {len(errors)} of "
                              f"{len(batch)} not deleted, {first.get('Key')}: {code}: {first.get('Message', '')}",
                              code=code, transient=code in TRANSIENT_CODES)
        self._checkpoints_failing.discard(key)

    async def _list_objects(self, prefix: str) -> list[tuple[str, int]]:
        """(key, size) of every object under `prefix`."""
        with self.errors("ListObjectsV2", prefix):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            return [(o["Key"], o["Size"]) async for page in pages for o in page.get("Contents", [])]

    async def _read_object(self, key: str) -> bytes:
        with self.errors("GetObject", key):
            response = await self.client.get_object(Bucket=self.bucket, Key=key)
            async with response["Body"] as body:
                return await body.read()

    async def _retrying(self, call: Callable[[], Awaitable[T]], deadline: float) -> T:
        """`call()` again after transient failures, with backoff, until the monotonic `deadline`."""
        backoff = Backoff(*self.backoff_s)
        while True:
            try:
                return await call()
            except S3Error as exc:
                if not exc.transient:
                    raise
                delay = backoff.next()
                if self.clock.monotonic() + delay > deadline:
                    raise
                level = logging.WARNING if backoff.failures == 1 else logging.DEBUG
                log.log(level, "%s; retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)

    # -- objects -------------------------------------------------------------------------

    async def _head(self, key: str) -> dict[str, Any]:
        with self.errors("HeadObject", key):
            return await self.client.head_object(Bucket=self.bucket, Key=key)

    async def etag(self, key: str) -> str | None:
        """The object's ETag, or None when there is no such object."""
        try:
            return (await self._head(key))["ETag"]
        except S3Error as exc:
            if exc.status == 404:
                return None
            raise

    async def exists(self, key: str) -> bool:
        return await self.etag(key) is not None

    async def stat(self, key: str) -> ObjectInfo:
        """Size, sha256 and ETag of a stored object (sha256 from metadata, else by reading it)."""
        head = await self._head(key)
        digest = head.get("Metadata", {}).get("sha256") or await self._stream_sha256(key)
        return ObjectInfo(key, head["ContentLength"], digest, head["ETag"])

    async def _stream_sha256(self, key: str) -> str:
        digest = hashlib.sha256()
        with self.errors("GetObject", key):
            response = await self.client.get_object(Bucket=self.bucket, Key=key)
            async with response["Body"] as body:
                while chunk := await body.read(READ_CHUNK):
                    digest.update(chunk)
        return digest.hexdigest()

    async def delete(self, key: str) -> None:
        """Delete the object; deleting one that does not exist is not an error."""
        with self.errors("DeleteObject", key):
            await self.client.delete_object(Bucket=self.bucket, Key=key)

    async def presign(self, key: str, expires_in: int, filename: str, content_type: str) -> str:
        """A GET URL (Range works) that downloads as `filename`, refused after `expires_in` seconds."""
        if not 1 <= expires_in <= MAX_PRESIGN_S:
            raise StorageError(f"a presigned URL lives 1..{MAX_PRESIGN_S} s, not {expires_in}")
        params = {"Bucket": self.bucket, "Key": key, "ResponseContentDisposition": content_disposition(filename),
                  "ResponseContentType": content_type}
        with self.errors("presign", key):
            return await self.client.generate_presigned_url("get_object", Params=params, ExpiresIn=expires_in)

    # -- errors --------------------------------------------------------------------------

    @contextlib.contextmanager
    def errors(self, operation: str, key: str | None = None) -> Iterator[None]:
        """Turn what botocore and aiohttp raise into S3Error naming endpoint, bucket and key."""
        where = f"S3 {operation} {self.bucket}/{key}" if key is not None else f"S3 {operation} bucket {self.bucket}"
        where += f" at {self.endpoint}"
        try:
            yield
        except ClientError as exc:
            raise _client_error(operation, where, exc) from exc
        except TRANSPORT_ERRORS as exc:
            raise S3Error(f"{where}: unreachable ({exc})", transient=True) from exc
        except BotoCoreError as exc:
            raise S3Error(f"{where}: {exc}") from exc


def _client_error(operation: str, where: str, exc: ClientError) -> S3Error:
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    code = error.get("Code", "") or str(status)
    transient = status >= 500 or status in (408, 429) or code in TRANSIENT_CODES
    message = error.get("Message") or "failed"
    if code.isdigit():  # HEAD answers carry no body, so no code: say what the bare status means
        message = {
            "403": "access denied (check the access key, secret key and bucket policy)",
            "404": "no such bucket" if operation == "HeadBucket" else "not found",
        }.get(code, message)
    return S3Error(f"{where}: {code}: {message}", code=code, status=status, transient=transient)
