"""The S3 backend against a real SeaweedFS server (tests/s3server.py): streaming parts while a
thread writes the spool, patches, outages, crash recovery from the journal, orphans,
presigned URLs, SSE and errors."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import random
import re
import socket
import threading
import time
from pathlib import Path

import aiohttp
import pytest

from mediaserver.config import Config
from mediaserver.errors import StorageError
from mediaserver.storage.journal import Journal, PartRecord, UploadRecord
from mediaserver.storage.s3 import Backoff, MiB, S3Storage, content_disposition, key_prefix, multipart_etag
from mediaserver.storage.spool import Spool

PART = 5 * MiB
PREFIX = "recordings/"


def payload(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def multipart_etag_of(data: bytes, part_size: int) -> str:
    """The ETag S3 must give `data` uploaded in parts of `part_size`."""
    md5s = [hashlib.md5(data[i:i + part_size]).hexdigest() for i in range(0, len(data), part_size)]
    return multipart_etag([PartRecord(n, 0, 0, md5, "") for n, md5 in enumerate(md5s, 1)])


class RecordingWriter(threading.Thread):
    """Appends bytes to a spool in small chunks at a steady rate, as an encoder thread does."""

    def __init__(self, spool: Spool, data: bytes, chunk: int = 256 * 1024, pause_s: float = 0.02) -> None:
        super().__init__(name="spool-writer", daemon=True)
        self.spool, self.data, self.chunk, self.pause_s = spool, data, chunk, pause_s

    def run(self) -> None:
        for offset in range(0, len(self.data), self.chunk):
            self.spool.write(self.data[offset:offset + self.chunk])
            time.sleep(self.pause_s)


async def pump_until(upload, done, every_s: float = 0.25) -> None:
    """Pump like the engine does (it pumps once a second) until `done()` is true."""
    while not done():
        await upload.pump()
        await asyncio.sleep(every_s)


async def pump_while_writing(upload, writer: RecordingWriter, every_s: float = 0.1) -> int:
    """Pump like the engine does until the writer is done; the most parts seen sent meanwhile."""
    most = 0
    while writer.is_alive():
        await upload.pump()
        most = max(most, upload.parts_sent)
        await asyncio.sleep(every_s)
    return most


async def read_object(storage: S3Storage, key: str) -> bytes:
    response = await storage.client.get_object(Bucket=storage.bucket, Key=key)
    async with response["Body"] as body:
        return await body.read()


async def open_uploads(storage: S3Storage, prefix: str = "") -> list[dict]:
    listing = await storage.client.list_multipart_uploads(Bucket=storage.bucket, Prefix=prefix)
    return listing.get("Uploads", [])


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_storage(server, bucket: str, tmp_path: Path, *, retry_for_s: float = 60.0,
                 backoff_s: tuple[float, float] = (0.2, 2.0), **settings) -> S3Storage:
    """Storage in `bucket` with 5 MiB parts, data_dir (so the journal) in tmp_path, quick retries."""
    config = server.config(bucket, **{"data_dir": tmp_path, "s3_part_size": PART, **settings})
    return S3Storage(config.s3(), retry_for_s=retry_for_s, backoff_s=backoff_s)


@pytest.fixture
async def storage(s3_server, s3_bucket, tmp_path):
    store = make_storage(s3_server, s3_bucket, tmp_path)
    await store.start()
    yield store
    await store.close()


async def test_parts_stream_while_recording_and_the_object_equals_the_spool(storage, tmp_path):
    data = payload(4 * PART + 1234567)
    spool = Spool(tmp_path / "spool" / "rec.wav")
    key = f"{PREFIX}app/rec_stream.wav"
    upload = storage.begin(key, spool.path, "audio/wav")
    writer = RecordingWriter(spool, data)
    writer.start()
    sent_while_writing = await pump_while_writing(upload, writer)
    spool.close()

    info = await upload.complete()

    assert sent_while_writing >= 3
    assert info.etag == multipart_etag_of(data, PART) and info.etag.endswith('-5"')
    assert (info.size, info.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert await read_object(storage, key) == data
    head = await storage.client.head_object(Bucket=storage.bucket, Key=key)
    assert head["ContentType"] == "audio/wav"
    assert await open_uploads(storage) == []
    assert not spool.path.exists()  # consumed, as the local backend renames it away
    assert list((tmp_path / "journal").glob("*.json")) == []


async def test_a_patch_at_offset_zero_after_parts_were_sent_is_stored(storage, tmp_path):
    data = bytearray(payload(2 * PART + 4321))
    spool = Spool(tmp_path / "rec.wav")
    spool.write(bytes(data))
    key = f"{PREFIX}app/rec_patch.wav"
    upload = storage.begin(key, spool.path, "audio/wav")
    await upload.pump()
    assert upload.parts_sent == 2
    header = b"RIFF\x24\x00\x10\x00WAVEfmt "
    spool.patch(0, header)
    spool.patch(PART + 10, b"second part too")
    spool.close()
    data[0:len(header)] = header
    data[PART + 10:PART + 25] = b"second part too"

    info = await upload.complete()

    assert await read_object(storage, key) == bytes(data)
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert info.etag == multipart_etag_of(bytes(data), PART)


async def test_a_short_recording_is_one_put_carrying_its_sha256(storage, tmp_path):
    data = payload(300_000)
    spool = Spool(tmp_path / "short.mp3")
    key = f"{PREFIX}app/short.mp3"
    upload = storage.begin(key, spool.path, "audio/mpeg")
    spool.write(data)
    await upload.pump()
    spool.close()

    info = await upload.complete()

    assert info.etag == f'"{hashlib.md5(data).hexdigest()}"'
    assert await open_uploads(storage) == []
    stat = await storage.stat(key)
    assert (stat.size, stat.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    head = await storage.client.head_object(Bucket=storage.bucket, Key=key)
    assert head["Metadata"]["sha256"] == info.sha256


async def test_an_empty_recording_is_stored_empty(storage, tmp_path):
    spool = Spool(tmp_path / "empty.wav")
    spool.close()
    info = await storage.begin(f"{PREFIX}app/empty.wav", spool.path, "audio/wav").complete()
    assert (info.size, info.sha256) == (0, hashlib.sha256(b"").hexdigest())
    assert await read_object(storage, info.key) == b""


async def test_stat_of_a_multipart_object_reads_it_for_the_sha256(storage, tmp_path):
    data = payload(PART + 99)
    spool = Spool(tmp_path / "rec.opus")
    spool.write(data)
    spool.close()
    key = f"{PREFIX}app/stat.opus"
    await storage.begin(key, spool.path, "audio/ogg").complete()

    info = await storage.stat(key)

    assert (info.size, info.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert info.etag.endswith('-2"')


@pytest.mark.timeout(180)
async def test_an_outage_mid_recording_is_caught_up_when_s3_returns(s3_own_server, tmp_path, caplog):
    bucket = s3_own_server.create_bucket()
    storage = make_storage(s3_own_server, bucket, tmp_path, backoff_s=(1.0, 30.0))  # production backoff
    await storage.start()
    try:
        data = payload(6 * PART + 777, seed=7)
        spool = Spool(tmp_path / "outage.wav")
        key = f"{PREFIX}app/outage.wav"
        upload = storage.begin(key, spool.path, "audio/wav")
        writer = RecordingWriter(spool, data, pause_s=0.12)  # ~2 MiB/s: about 16 s of "recording"
        writer.start()
        await pump_until(upload, lambda: upload.parts_sent >= 1)

        stop = asyncio.create_task(asyncio.to_thread(s3_own_server.stop))
        await pump_until(upload, stop.done)  # SIGTERM takes a few seconds: the recording goes on
        sent_before = upload.parts_sent
        down_until = time.monotonic() + 10
        await pump_until(upload, lambda: time.monotonic() > down_until)  # fails quietly: no exception
        assert upload.parts_sent == sent_before
        assert spool.size > (sent_before + 1) * PART  # kept spooling through the outage
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == "mediaserver.storage.s3"]
        assert len(warnings) == 1  # the outage's first failure; the rest is logged at debug

        await asyncio.to_thread(s3_own_server.start)
        back = time.monotonic()
        await pump_until(upload, lambda: upload.parts_sent >= spool.size // PART)
        caught_up_s = time.monotonic() - back
        writer.join()
        spool.close()
        info = await upload.complete()
    finally:
        await storage.close()

    print(f"\n[measure] parts caught up {caught_up_s:.1f} s after S3 came back (backoff 1..30 s)")
    assert stored_bytes(s3_own_server, bucket, key) == data
    assert info.sha256 == hashlib.sha256(data).hexdigest()


def stored_bytes(server, bucket: str, key: str) -> bytes:
    client = server.client()
    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    finally:
        client.close()


@pytest.mark.timeout(120)
async def test_complete_waits_out_an_outage(s3_own_server, tmp_path):
    bucket = s3_own_server.create_bucket()
    storage = make_storage(s3_own_server, bucket, tmp_path, backoff_s=(0.5, 2.0))
    await storage.start()
    try:
        data = payload(2 * PART + 5, seed=3)
        spool = Spool(tmp_path / "late.wav")
        spool.write(data)
        spool.close()
        upload = storage.begin(f"{PREFIX}app/late.wav", spool.path, "audio/wav")
        await upload.pump()
        await asyncio.to_thread(s3_own_server.stop)
        completing = asyncio.create_task(upload.complete())
        await asyncio.sleep(3)
        assert not completing.done()
        await asyncio.to_thread(s3_own_server.start)
        info = await asyncio.wait_for(completing, 30)
    finally:
        await storage.close()
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert stored_bytes(s3_own_server, bucket, info.key) == data


async def test_an_unreachable_endpoint_does_not_stop_start_but_complete_gives_up(tmp_path, caplog):
    config = Config(storage="s3", s3_endpoint=f"http://127.0.0.1:{unused_port()}", s3_bucket="recordings",
                    s3_access_key="AK", s3_secret_key="SK", data_dir=tmp_path)
    storage = S3Storage(config.s3(), retry_for_s=2.0, backoff_s=(0.2, 0.5))
    await storage.start()  # logs and keeps checking in the background
    try:
        assert not storage.ready
        assert "unreachable" in caplog.text and "recordings" in caplog.text
        spool = Spool(tmp_path / "down.wav")
        spool.write(payload(PART + 1))
        upload = storage.begin("recordings/app/down.wav", spool.path, "audio/wav")
        await upload.pump()  # quietly nothing
        spool.close()
        with pytest.raises(StorageError, match="could not be stored within 2 s"):
            await upload.complete()
        await upload.abort()
        assert spool.path.exists()  # kept for a later attempt or inspection
    finally:
        await storage.close()


@pytest.mark.timeout(120)
async def test_a_journal_left_by_a_crash_is_resumed_and_completed(s3_server, s3_bucket, tmp_path):
    data = payload(3 * PART + 4444, seed=5)
    spool = Spool(tmp_path / "crash.wav")
    spool.write(data[:3 * PART + 100])
    key = f"{PREFIX}app/crash.wav"
    first = make_storage(s3_server, s3_bucket, tmp_path)
    await first.start()
    upload = first.begin(key, spool.path, "audio/wav")
    await upload.pump()
    upload_id = upload.upload_id
    assert upload.parts_sent == 3
    del upload  # the process dies: nothing is completed or aborted
    await first.close()
    spool.write(data[3 * PART + 100:])
    spool.close()

    second = make_storage(s3_server, s3_bucket, tmp_path)
    await second.start()
    try:
        assert [u["UploadId"] for u in await open_uploads(second)] == [upload_id]  # not an orphan
        sent = count_calls(second, "UploadPart")
        began = time.monotonic()
        resumed = await second.resume(key, spool.path, "audio/wav")
        info = await resumed.complete()
        resume_s = time.monotonic() - began
        assert sent == [1]  # only the tail: the three journaled parts were confirmed by ListParts
        assert await read_object(second, key) == data
        assert info.etag == multipart_etag_of(data, PART)
        assert await open_uploads(second) == []
        assert list((tmp_path / "journal").glob("*.json")) == []
    finally:
        await second.close()
    print(f"\n[measure] resumed from the journal and completed {len(data) / MiB:.0f} MiB in {resume_s:.2f} s")


def count_calls(storage: S3Storage, operation: str) -> list[int]:
    counter = [0]

    def seen(**_):
        counter[0] += 1

    storage.client.meta.events.register(f"before-call.s3.{operation}", seen)
    return counter


async def test_resume_resends_a_journaled_part_that_s3_does_not_confirm(s3_server, s3_bucket, tmp_path):
    data = payload(2 * PART + 10, seed=13)
    spool = Spool(tmp_path / "unconfirmed.wav")
    spool.write(data)
    spool.close()
    key = f"{PREFIX}app/unconfirmed.wav"
    first = make_storage(s3_server, s3_bucket, tmp_path)
    await first.start()
    await first.begin(key, spool.path, "audio/wav").pump()
    await first.close()
    journal = Journal(tmp_path / "journal")
    record = journal.load(key)
    record.parts[2] = dataclasses.replace(record.parts[2], etag='"0123456789abcdef0123456789abcdef"')
    journal.save(record)

    second = make_storage(s3_server, s3_bucket, tmp_path)
    await second.start()
    try:
        sent = count_calls(second, "UploadPart")
        info = await (await second.resume(key, spool.path, "audio/wav")).complete()
        assert sent == [2]  # part 2 again and the tail
        assert await read_object(second, key) == data
        assert info.etag == multipart_etag_of(data, PART)
    finally:
        await second.close()


async def test_a_bucket_that_disappeared_fails_complete_at_once(s3_server, tmp_path):
    bucket = s3_server.create_bucket()
    storage = make_storage(s3_server, bucket, tmp_path, retry_for_s=3600.0)
    await storage.start()
    try:
        await storage.client.delete_bucket(Bucket=bucket)
        spool = Spool(tmp_path / "nobucket.wav")
        spool.write(payload(1000))
        spool.close()
        upload = storage.begin(f"{PREFIX}app/nobucket.wav", spool.path, "audio/wav")
        with pytest.raises(StorageError, match="NoSuchBucket"):
            await asyncio.wait_for(upload.complete(), 30)  # no hour of retrying: it can never work
        assert spool.path.exists()
    finally:
        await storage.close()


async def test_access_denied_fails_complete_at_once_and_keeps_the_spool(s3_server, s3_bucket, tmp_path):
    reader = s3_server.readonly
    storage = make_storage(s3_server, s3_bucket, tmp_path, retry_for_s=3600.0,
                           s3_access_key=reader.access_key, s3_secret_key=reader.secret_key)
    await storage.start()  # reading the bucket is allowed
    try:
        spool = Spool(tmp_path / "denied.wav")
        spool.write(payload(PART + 1))
        upload = storage.begin(f"{PREFIX}app/denied.wav", spool.path, "audio/wav")
        await upload.pump()  # refused: quietly, complete() decides
        spool.close()
        with pytest.raises(StorageError, match="AccessDenied"):
            await asyncio.wait_for(upload.complete(), 30)
        await upload.abort()
        assert spool.path.exists()
    finally:
        await storage.close()


async def test_resume_without_a_journal_starts_over_from_the_spool(storage, tmp_path):
    data = payload(2 * PART + 1, seed=9)
    spool = Spool(tmp_path / "nojournal.wav")
    spool.write(data)
    spool.close()
    key = f"{PREFIX}app/nojournal.wav"
    upload = await storage.resume(key, spool.path, "audio/wav")
    info = await upload.complete()
    assert await read_object(storage, key) == data
    assert info.etag.endswith('-3"')


async def test_start_aborts_orphans_under_the_prefix_only(s3_server, s3_bucket, tmp_path):
    client = s3_server.client()
    try:
        orphans = [client.create_multipart_upload(Bucket=s3_bucket, Key=f"{PREFIX}app/orphan{i}.wav")["UploadId"]
                   for i in range(2)]
        elsewhere = client.create_multipart_upload(Bucket=s3_bucket, Key="other/keep.wav")["UploadId"]
    finally:
        client.close()
    journaled = make_storage(s3_server, s3_bucket, tmp_path)
    await journaled.start()
    spool = Spool(tmp_path / "live.wav")
    spool.write(payload(PART))
    upload = journaled.begin(f"{PREFIX}app/live.wav", spool.path, "audio/wav")
    await upload.pump()
    await journaled.close()

    storage = make_storage(s3_server, s3_bucket, tmp_path)
    await storage.start()
    try:
        left = {u["UploadId"] for u in await open_uploads(storage)}
    finally:
        await storage.close()
    assert left == {upload.upload_id, elsewhere}
    assert not left & set(orphans)
    spool.close()


async def test_start_drops_a_journal_whose_spool_is_gone(s3_server, s3_bucket, tmp_path):
    first = make_storage(s3_server, s3_bucket, tmp_path)
    await first.start()
    spool = Spool(tmp_path / "lost.wav")
    spool.write(payload(PART))
    await first.begin(f"{PREFIX}app/lost.wav", spool.path, "audio/wav").pump()
    await first.close()
    spool.close()
    spool.path.unlink()

    second = make_storage(s3_server, s3_bucket, tmp_path)
    await second.start()
    try:
        assert await open_uploads(second) == []
        assert Journal(tmp_path / "journal").records() == []
    finally:
        await second.close()


async def test_an_upload_aborted_elsewhere_starts_over(storage, tmp_path):
    data = payload(3 * PART + 10, seed=11)
    spool = Spool(tmp_path / "gone.wav")
    spool.write(data[:PART])
    key = f"{PREFIX}app/gone.wav"
    upload = storage.begin(key, spool.path, "audio/wav")
    await upload.pump()
    await storage.client.abort_multipart_upload(Bucket=storage.bucket, Key=key, UploadId=upload.upload_id)
    spool.write(data[PART:])
    spool.close()
    await upload.pump()  # NoSuchUpload: forgets the upload, tries again later

    info = await upload.complete()

    assert await read_object(storage, key) == data
    assert info.etag == multipart_etag_of(data, PART)


async def test_presigned_urls_answer_ranges_and_refuse_when_expired_or_tampered(storage, tmp_path):
    data = payload(200_000, seed=2)
    spool = Spool(tmp_path / "p.wav")
    spool.write(data)
    spool.close()
    key = f"{PREFIX}app/presigned.wav"
    await storage.begin(key, spool.path, "audio/wav").complete()
    url = await storage.presign(key, 2, "call 1 ü.wav", "audio/wav")
    tampered = re.sub(r"X-Amz-Signature=(.)", lambda m: "X-Amz-Signature=" + ("0" if m[1] != "0" else "1"), url)

    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers={"Range": "bytes=100-1099"}) as response:
            assert response.status == 206
            assert response.headers["Content-Range"] == f"bytes 100-1099/{len(data)}"
            assert response.headers["Content-Type"] == "audio/wav"
            assert response.headers["Content-Disposition"] == content_disposition("call 1 ü.wav")
            assert await response.read() == data[100:1100]
        async with http.get(tampered) as response:
            assert response.status == 403
        async with http.get(url.replace("presigned.wav", "presigneD.wav")) as response:
            assert response.status == 403
        await asyncio.sleep(3)  # the server's clock decides expiry: nothing to fake here
        async with http.get(url) as response:
            assert response.status == 403
    with pytest.raises(StorageError):
        await storage.presign(key, 8 * 24 * 3600, "x.wav", "audio/wav")


async def test_sse_aes256_objects_are_encrypted_and_readable(s3_server, s3_bucket, tmp_path):
    storage = make_storage(s3_server, s3_bucket, tmp_path, s3_sse="AES256")
    await storage.start()
    try:
        for name, size in (("small.wav", 1000), ("large.wav", PART + 1000)):
            data = payload(size, seed=size)
            spool = Spool(tmp_path / name)
            spool.write(data)
            spool.close()
            key = f"{PREFIX}app/{name}"
            await storage.begin(key, spool.path, "audio/wav").complete()
            head = await storage.client.head_object(Bucket=storage.bucket, Key=key)
            assert head["ServerSideEncryption"] == "AES256"
            assert await read_object(storage, key) == data
    finally:
        await storage.close()


async def test_wrong_credentials_fail_start_with_a_clear_error(s3_server, s3_bucket, tmp_path):
    storage = make_storage(s3_server, s3_bucket, tmp_path, s3_secret_key="not-the-secret")
    with pytest.raises(StorageError) as caught:
        await storage.start()
    message = str(caught.value)
    assert s3_server.endpoint in message and s3_bucket in message and "403" in message
    await storage.close()


async def test_a_missing_bucket_fails_start_with_a_clear_error(s3_server, tmp_path):
    storage = make_storage(s3_server, "no-such-bucket-here", tmp_path)
    with pytest.raises(StorageError, match="no-such-bucket-here.*no such bucket"):
        await storage.start()


async def test_delete_exists_and_stat(storage, tmp_path):
    spool = Spool(tmp_path / "d.wav")
    spool.write(b"abc")
    spool.close()
    key = f"{PREFIX}app/delete.wav"
    assert not await storage.exists(key)
    await storage.begin(key, spool.path, "audio/wav").complete()
    assert await storage.exists(key)
    assert (await storage.stat(key)).size == 3
    await storage.delete(key)
    assert not await storage.exists(key)
    await storage.delete(key)  # deleting twice is fine
    with pytest.raises(StorageError, match="not found"):
        await storage.stat(key)


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.timeout(180)
async def test_memory_stays_flat_while_uploading_100_mib(s3_server, s3_bucket, tmp_path):
    path = tmp_path / "big.wav"
    digest = hashlib.sha256()
    with open(path, "wb") as fh:
        for index in range(100):
            chunk = payload(MiB, seed=index)
            digest.update(chunk)
            fh.write(chunk)
    storage = make_storage(s3_server, s3_bucket, tmp_path, s3_part_size=8 * MiB)
    await storage.start()
    peak, baseline, stop = [0], rss_bytes(), threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        began = time.monotonic()
        upload = storage.begin(f"{PREFIX}app/big.wav", path, "audio/wav")
        await upload.pump()
        info = await upload.complete()
        took = time.monotonic() - began
    finally:
        stop.set()
        sampler.join()
        await storage.close()
    growth = peak[0] - baseline
    print(f"\n[measure] 100 MiB in 8 MiB parts: peak RSS growth {growth / MiB:.1f} MiB, {took:.1f} s")
    assert info.sha256 == digest.hexdigest() and info.etag.endswith('-13"')
    assert growth < 80 * MiB  # a handful of parts, never the file


def test_content_disposition_quotes_and_encodes_names():
    assert content_disposition("rec_1.wav") == 'attachment; filename="rec_1.wav"'
    assert content_disposition('a"b\\c.wav') == 'attachment; filename="a_b_c.wav"; filename*=UTF-8\'\'a%22b%5Cc.wav'
    assert content_disposition("é.mp3") == "attachment; filename=\"_.mp3\"; filename*=UTF-8''%C3%A9.mp3"


def test_key_prefix_is_the_fixed_start_of_the_template():
    assert key_prefix("recordings/{app_id}/{yyyy}/{recording_id}.{ext}") == "recordings/"
    assert key_prefix("{app_id}/{recording_id}.{ext}") == ""


def test_the_journal_round_trips_and_ignores_what_it_cannot_read(tmp_path, caplog):
    journal = Journal(tmp_path / "journal")
    record = UploadRecord("recordings/a/b.wav", "upload-1", "/spool/b.wav", "audio/wav", PART,
                          {1: PartRecord(1, 0, PART, "ab" * 16, '"etag"')})
    journal.save(record)
    assert journal.load(record.key) == record
    assert journal.load("recordings/other.wav") is None
    assert [p.name for p in (tmp_path / "journal").iterdir()] == [journal.path(record.key).name]  # no temp left

    journal.path("recordings/torn.wav").write_text('{"version": 1, "key": ')
    assert journal.records() == [record]
    assert "unreadable upload journal" in caplog.text
    journal.remove(record.key)
    journal.remove(record.key)
    assert journal.load(record.key) is None


def test_backoff_doubles_up_to_its_cap_with_jitter():
    backoff = Backoff(1.0, 8.0)
    delays = [backoff.next() for _ in range(6)]
    for delay, nominal in zip(delays, (1, 2, 4, 8, 8, 8)):
        assert nominal / 2 <= delay <= nominal
    backoff.reset()
    assert backoff.next() <= 1.0
