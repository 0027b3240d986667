"""Checkpoints against a real SeaweedFS server (tests/s3server.py): a spool copied to S3 as it
grows and rebuilt from S3 alone, through an outage, gaps and overlaps; a lost node's uploads
aborted by key; no orphan sweep in a shared bucket."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import socket
from pathlib import Path

import pytest

from mediaserver.config import Config
from mediaserver.errors import StorageError
from mediaserver.storage.journal import Journal
from mediaserver.storage.s3 import MiB, S3Storage, checkpoint_key, checkpoint_prefix
from mediaserver.storage.spool import Spool

PART = 5 * MiB
KEY = "recordings/app/rec_ckpt.wav"


def payload(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def grow(spool: Spool, data: bytes) -> None:
    """Append and write through, as the spool does within `max_delay_s`."""
    spool.write(data)
    spool.flush()


def make_storage(server, bucket: str, tmp_path: Path, *, shared: bool = False, **settings) -> S3Storage:
    """Storage in `bucket` with 5 MiB parts, data_dir (so the journal) in tmp_path, quick retries."""
    config = server.config(bucket, **{"data_dir": tmp_path, "s3_part_size": PART, **settings})
    return S3Storage(dataclasses.replace(config.s3(), shared=shared), retry_for_s=30.0, backoff_s=(0.2, 1.0))


@pytest.fixture
async def storage(s3_server, s3_bucket, tmp_path):
    store = make_storage(s3_server, s3_bucket, tmp_path)
    await store.start()
    yield store
    await store.close()


async def checkpoint_names(storage: S3Storage, key: str = KEY) -> list[str]:
    return [name for name, _ in await storage._list_objects(checkpoint_prefix(key))]


async def put(storage: S3Storage, name: str, data: bytes) -> None:
    await storage.client.put_object(Bucket=storage.bucket, Key=name, Body=data)


async def open_uploads(storage: S3Storage) -> set[tuple[str, str]]:
    listing = await storage.client.list_multipart_uploads(Bucket=storage.bucket)
    return {(u["Key"], u["UploadId"]) for u in listing.get("Uploads", [])}


def s3_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and r.name == "mediaserver.storage.s3"]


async def test_a_growing_spool_is_restored_from_its_checkpoints_and_they_drop(storage, tmp_path):
    spool = Spool(tmp_path / "spool" / "rec.wav")
    data = payload(3 * 1024 * 1024 + 17)
    steps = [0, 44, 200_000, 200_000, 1_500_000, len(data)]  # one step adds nothing
    since = 0
    for end in steps[1:]:
        grow(spool, data[spool.size:end])
        since = await storage.checkpoint(KEY, spool.path, since)
        assert since == end
    spool.close()
    await put(storage, checkpoint_prefix(KEY) + "notes.txt", b"not a checkpoint")

    assert len(await checkpoint_names(storage)) == 5  # four checkpoints, no empty one, and the stray object
    restored = tmp_path / "other" / "restored.wav"
    assert await storage.restore(KEY, restored) == len(data)
    assert restored.read_bytes() == data

    await storage.drop_checkpoints(KEY)
    assert await checkpoint_names(storage) == []
    assert await storage.checkpoint(KEY, spool.path, since) == since  # nothing new: nothing stored
    assert await checkpoint_names(storage) == []


async def test_a_checkpoint_holds_at_most_one_part(storage, tmp_path):
    data = payload(2 * PART + 3, seed=4)
    spool = Spool(tmp_path / "big.wav")
    grow(spool, data)
    spool.close()
    offsets = [0]
    for _ in range(4):
        offsets.append(await storage.checkpoint(KEY, spool.path, offsets[-1]))
    assert offsets == [0, PART, 2 * PART, len(data), len(data)]
    restored = tmp_path / "restored.wav"
    assert await storage.restore(KEY, restored) == len(data)
    assert restored.read_bytes() == data


@pytest.mark.timeout(180)
async def test_a_checkpoint_during_an_outage_is_carried_by_the_next(s3_own_server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mediaserver.storage.s3")
    bucket = s3_own_server.create_bucket()
    storage = make_storage(s3_own_server, bucket, tmp_path)
    await storage.start()
    try:
        data = payload(900_000, seed=2)
        spool = Spool(tmp_path / "outage.wav")
        grow(spool, data[:300_000])
        since = await storage.checkpoint(KEY, spool.path, 0)
        assert since == 300_000

        await asyncio.to_thread(s3_own_server.stop)
        grow(spool, data[300_000:600_000])
        assert await storage.checkpoint(KEY, spool.path, since) == since  # kept for the next one
        grow(spool, data[600_000:])
        spool.close()
        assert await storage.checkpoint(KEY, spool.path, since) == since
        assert len(s3_warnings(caplog)) == 1  # the outage's first failure; the rest at debug

        await asyncio.to_thread(s3_own_server.start)
        assert await storage.checkpoint(KEY, spool.path, since) == len(data)
        assert "checkpoints of recordings/app/rec_ckpt.wav reach S3 again" in caplog.text
        assert await checkpoint_names(storage) == [checkpoint_key(KEY, 0), checkpoint_key(KEY, 300_000)]
        restored = tmp_path / "restored.wav"
        assert await storage.restore(KEY, restored) == len(data)
        assert restored.read_bytes() == data
    finally:
        await storage.close()


async def test_restore_gives_up_on_an_unreachable_endpoint_as_transient(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = Config(storage="s3", s3_endpoint=f"http://127.0.0.1:{port}", s3_bucket="recordings",
                    s3_access_key="AK", s3_secret_key="SK", data_dir=tmp_path)
    storage = S3Storage(config.s3(), backoff_s=(0.1, 0.2))
    await storage.start()
    try:
        with pytest.raises(StorageError, match="unreachable") as caught:
            await storage.restore(KEY, tmp_path / "restored.wav", retry_for_s=1.0)
        assert caught.value.transient
    finally:
        await storage.close()


async def test_a_permanent_failure_raises(s3_server, s3_bucket, tmp_path):
    reader = s3_server.readonly
    storage = make_storage(s3_server, s3_bucket, tmp_path,
                           s3_access_key=reader.access_key, s3_secret_key=reader.secret_key)
    await storage.start()
    try:
        spool = Spool(tmp_path / "denied.wav")
        grow(spool, b"RIFF....")
        spool.close()
        with pytest.raises(StorageError, match="AccessDenied"):
            await storage.checkpoint(KEY, spool.path, 0)
    finally:
        await storage.close()


async def test_a_missing_checkpoint_ends_the_restore_at_the_gap(storage, tmp_path, caplog):
    data = payload(400_000, seed=3)
    spool = Spool(tmp_path / "gap.wav")
    since = 0
    for end in (100_000, 200_000, 300_000, 400_000):
        grow(spool, data[since:end])
        since = await storage.checkpoint(KEY, spool.path, since)
    spool.close()
    await storage.client.delete_object(Bucket=storage.bucket, Key=checkpoint_key(KEY, 200_000))

    restored = tmp_path / "restored.wav"
    assert await storage.restore(KEY, restored) == 200_000
    assert restored.read_bytes() == data[:200_000]
    assert s3_warnings(caplog) == [f"checkpoints of {KEY} miss bytes 200000..300000: "
                                   "restored the first 200000 bytes only"]


async def test_overlapping_checkpoints_join_only_where_they_agree(storage, tmp_path, caplog):
    await put(storage, checkpoint_key(KEY, 0), b"abcdef")
    await put(storage, checkpoint_key(KEY, 2), b"cd")  # inside what is written: skipped
    await put(storage, checkpoint_key(KEY, 4), b"efghij")  # agrees on "ef": adds "ghij"
    await put(storage, checkpoint_key(KEY, 8), b"XXklm")  # "ij" written, "XX" here: another history
    await put(storage, checkpoint_key(KEY, 12), b"mnop")

    restored = tmp_path / "restored.wav"
    assert await storage.restore(KEY, restored) == 10
    assert restored.read_bytes() == b"abcdefghij"
    assert s3_warnings(caplog) == [f"checkpoint {checkpoint_key(KEY, 8)} disagrees with bytes 8..10 before it: "
                                   "restored the first 10 bytes only"]


async def test_a_key_without_checkpoints_restores_to_an_empty_spool(storage, tmp_path):
    restored = tmp_path / "restored.wav"
    assert await storage.restore(KEY, restored) == 0
    assert restored.read_bytes() == b""


@pytest.mark.timeout(180)
async def test_listing_and_deleting_go_beyond_a_thousand_objects(storage, tmp_path):
    data = payload(1203, seed=6)
    slots = asyncio.Semaphore(16)

    async def put_one(offset: int) -> None:
        async with slots:
            await put(storage, checkpoint_key(KEY, offset), data[offset:offset + 1])

    await asyncio.gather(*(put_one(offset) for offset in range(len(data))))
    restored = tmp_path / "restored.wav"
    assert await storage.restore(KEY, restored) == len(data)
    assert restored.read_bytes() == data
    await storage.drop_checkpoints(KEY)
    assert await checkpoint_names(storage) == []


async def test_abort_uploads_aborts_that_key_only_and_forgets_its_journal(storage, tmp_path):
    uploads = {}
    for key in (KEY, KEY + "x"):
        spool = Spool(tmp_path / f"{len(uploads)}.wav")
        grow(spool, payload(PART + 1000, seed=len(uploads)))
        upload = storage.begin(key, spool.path, "audio/wav")
        await upload.pump()
        assert upload.parts_sent == 1
        uploads[key] = upload.upload_id
        spool.close()
    journal = Journal(tmp_path / "journal")
    assert journal.load(KEY) is not None

    assert await storage.abort_uploads(KEY) == 1

    assert await open_uploads(storage) == {(KEY + "x", uploads[KEY + "x"])}
    assert journal.load(KEY) is None and journal.load(KEY + "x") is not None
    assert await storage.abort_uploads(KEY) == 0


@pytest.mark.parametrize("shared", [True, False])
async def test_start_sweeps_unknown_uploads_only_when_the_bucket_is_not_shared(s3_server, s3_bucket, tmp_path,
                                                                               shared, caplog):
    client = s3_server.client()
    try:
        upload_id = client.create_multipart_upload(Bucket=s3_bucket, Key=KEY)["UploadId"]
    finally:
        client.close()
    caplog.set_level(logging.INFO, logger="mediaserver.storage.s3")
    storage = make_storage(s3_server, s3_bucket, tmp_path, shared=shared)
    await storage.start()
    try:
        left = await open_uploads(storage)
    finally:
        await storage.close()
    assert left == ({(KEY, upload_id)} if shared else set())
    assert ("is shared with other nodes" in caplog.text) == shared
