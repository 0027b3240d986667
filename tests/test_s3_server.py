"""The server storing to a real SeaweedFS: parts stream during the call, outages and crashes
lose nothing, presigned URLs expire, deletion is final."""

import asyncio
import hashlib
import inspect
import logging
import time

import aiohttp
import numpy as np
import pytest

from audio import noise
from mediaserver.api.keys import STORAGE
from servers import APP1, Server
from serverproc import ServerProcess

pytestmark = pytest.mark.timeout(240)
MiB = 1024 * 1024


def s3_settings(s3, bucket, **extra):
    return {"storage": "s3", "s3_endpoint": s3.endpoint, "s3_bucket": bucket, "s3_region": s3.region,
            "s3_access_key": s3.credentials.access_key, "s3_secret_key": s3.credentials.secret_key,
            "s3_part_size": 5 * MiB, **extra}


async def open_leg(server_url: str, session: dict, rate: int = 16000, channels: int = 2):
    http = aiohttp.ClientSession()
    ws = await http.ws_connect(session["ingest"]["wavstream"]["caller"])
    await ws.send_json({"event": "start", "encoding": "L16", "sample_rate": rate, "channels": channels})
    return http, ws


async def send(ws, pcm: np.ndarray, frame_bytes: int = 32000, pace: float = 0.0) -> None:
    data = pcm.astype("<i2").tobytes()
    for start in range(0, len(data), frame_bytes):
        await ws.send_bytes(data[start:start + frame_bytes])
        if pace:
            await asyncio.sleep(pace)


def first_sound(data: np.ndarray, meta: dict) -> int:
    """Where the leg's audio begins in the file (silence before it), checked against the stats."""
    lead = int(np.argmax(np.any(data != 0, axis=1)))
    assert abs(lead / 16 - meta["legs"][0]["first_ms"]) <= 0.1
    return lead


def multipart_uploads(s3, bucket) -> list:
    client = s3.client()
    try:
        return client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    finally:
        client.close()


def head(s3, bucket, key) -> dict:
    client = s3.client()
    try:
        return client.head_object(Bucket=bucket, Key=key)
    finally:
        client.close()


async def test_a_recording_longer_than_three_parts_streams_them_and_is_exact(tmp_path, s3_server, s3_bucket):
    audio = noise(290.0, rate=16000, dbfs=-20)  # 290 s of 16 kHz stereo WAV ≈ 18.6 MB: four 5 MiB parts
    stereo = np.column_stack((audio, audio[::-1].copy()))
    async with Server(tmp_path, **s3_settings(s3_server, s3_bucket)) as server:
        session = await server.create_session()
        http, ws = await open_leg(server.base_url, session)
        try:
            await asyncio.sleep(0.05)
            status, answer = await server.command(session["uuid"], "start", sample_rate=16000, channels=2)
            rid = answer["recording_id"]
            await send(ws, stereo[: len(stereo) // 2])
            await asyncio.sleep(1.5)  # the first parts leave while the call goes on
            assert len(multipart_uploads(s3_server, s3_bucket)) == 1
            await send(ws, stereo[len(stereo) // 2:])
            await ws.send_json({"event": "stop"})
        finally:
            await ws.close()
            await http.close()
        await server.api("DELETE", f"/api/v1/sessions/{session['uuid']}")
        meta = await server.wait_recording(rid, timeout=60)
        key = (await server.engine.catalog.recording(rid))["storage_key"]
        body = await server.download(rid)
    info = head(s3_server, s3_bucket, key)
    assert info["ETag"].strip('"').endswith("-4")
    assert hashlib.sha256(body).hexdigest() == meta["checksum"]["value"] and len(body) == meta["file_size"]
    data = np.frombuffer(body[44:], dtype="<i2").reshape(-1, 2)
    lead = first_sound(data, meta)
    assert np.array_equal(data[lead:lead + len(stereo)], stereo)  # every sample, bit for bit
    assert multipart_uploads(s3_server, s3_bucket) == []


PART_S = 5 * MiB / (16000 * 2 * 2)  # seconds of 16 kHz stereo WAV in one 5 MiB part (81.92 s)


def deterministic_stereo(seconds: float) -> np.ndarray:
    """Seeded noise, a different signal on each channel, so any misplaced sample shows."""
    left = noise(seconds, rate=16000, dbfs=-20, seed=11)
    return np.column_stack((left, noise(seconds, rate=16000, dbfs=-20, seed=12)))


def open_upload(s3, bucket) -> tuple[str, str, dict[int, tuple[str, int]]]:
    """The one open multipart upload: key, upload id and its parts (number -> ETag, size)."""
    [upload] = multipart_uploads(s3, bucket)
    client = s3.client()
    try:
        listed = client.list_parts(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]).get("Parts", [])
    finally:
        client.close()
    return upload["Key"], upload["UploadId"], {p["PartNumber"]: (p["ETag"].strip('"'), p["Size"]) for p in listed}


async def parts_in_s3(s3, bucket) -> int:
    uploads = await asyncio.to_thread(multipart_uploads, s3, bucket)
    return len((await asyncio.to_thread(open_upload, s3, bucket))[2]) if uploads else 0


async def until(condition, timeout: float, what: str, step: float = 0.2):
    """The first true answer of `condition()` (a value or an awaitable), polled until `timeout`."""
    deadline = time.monotonic() + timeout
    while not (value := await _value(condition())):
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        await asyncio.sleep(step)
    return value


def assert_wav_is(body: bytes, meta: dict, sent: np.ndarray) -> None:
    """The WAV holds silence until the leg began, then exactly `sent`, and nothing else."""
    data = np.frombuffer(body[44:], dtype="<i2").reshape(-1, 2)
    lead = first_sound(data, meta)
    assert len(data) - lead >= len(sent), f"{len(sent) - (len(data) - lead)} frames are missing"
    assert np.array_equal(data[lead:lead + len(sent)], sent)  # every sample, in place
    assert not data[:lead].any() and not data[lead + len(sent):].any()


def failed_attempts(records, since: float, until_: float) -> list:
    """The server's log of part uploads that failed (pump() logs every try) in a time span."""
    return [r for r in records if r.name == "mediaserver.storage.s3" and r.getMessage().startswith("S3 upload of ")
            and " failed (" in r.getMessage() and since <= r.created <= until_]


async def test_s3_killed_for_ten_seconds_while_parts_upload_loses_nothing(tmp_path, s3_own_server, caplog):
    """Parts stream before, during and after an outage (S3 SIGKILLed, back 10 s later on the
    same ports and data): uploads are tried and fail meanwhile, the spool keeps the audio,
    and the stored WAV is what was sent, sample for sample."""
    caplog.set_level(logging.DEBUG, logger="mediaserver.storage.s3")
    s3 = s3_own_server
    bucket = s3.create_bucket()
    stretch = round(2.2 * PART_S * 16000)  # each stretch fills two more parts and some
    sent = deterministic_stereo(3 * stretch / 16000)
    async with Server(tmp_path, **s3_settings(s3, bucket)) as server:
        session = await server.create_session()
        http, ws = await open_leg(server.base_url, session)
        try:
            await asyncio.sleep(0.05)
            rid = (await server.command(session["uuid"], "start", sample_rate=16000, channels=2))[1]["recording_id"]
            await send(ws, sent[:stretch])
            before = await until(lambda: _at_least(s3, bucket, 2), 60, "two parts in S3 before the outage")
            await asyncio.to_thread(s3.kill)
            down_at = time.time()
            await send(ws, sent[stretch:2 * stretch])  # parts 3 and 4 fill up while S3 is gone
            await until(lambda: len(failed_attempts(caplog.records, down_at, time.time())) >= 2, 30,
                        "part uploads to be tried and fail during the outage")
            await asyncio.sleep(max(0.0, 10 - (time.time() - down_at)))
            up_at = time.time()
            await asyncio.to_thread(s3.start)
            failures = failed_attempts(caplog.records, down_at, up_at)
            during = await until(lambda: _at_least(s3, bucket, 4), 60, "the parts held back to be uploaded")
            await send(ws, sent[2 * stretch:])
            await ws.send_json({"event": "stop"})
        finally:
            await ws.close()
            await http.close()
        await server.api("DELETE", f"/api/v1/sessions/{session['uuid']}")
        meta = await server.wait_recording(rid, timeout=120)
        key = (await server.engine.catalog.recording(rid))["storage_key"]
        body = await server.download(rid)
    print(f"[measure] {len(failures)} failed part uploads in a {up_at - down_at:.1f} s outage; "
          f"{before} parts before it, {during} once S3 was back, {len(body)} bytes stored")
    assert up_at - down_at >= 10
    assert len(failures) >= 2, "part uploads were tried while S3 was down"
    assert any("caught up" in r.getMessage() for r in caplog.records if r.created >= up_at)
    assert hashlib.sha256(body).hexdigest() == meta["checksum"]["value"] and len(body) == meta["file_size"]
    parts = -(-len(body) // (5 * MiB))
    assert parts >= 7 and head(s3, bucket, key)["ETag"].strip('"').endswith(f"-{parts}")
    assert_wav_is(body, meta, sent)
    assert multipart_uploads(s3, bucket) == []


async def _at_least(s3, bucket, parts: int) -> int:
    found = await parts_in_s3(s3, bucket)
    return found if found >= parts else 0


async def _value(answer):
    return await answer if inspect.isawaitable(answer) else answer


async def samples_read(http) -> int:
    """What the server has taken in from every ingest (its own counter), in samples."""
    text = await (await http.get("/metrics")).text()
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith("mediaserver_samples_received_total ")))


async def test_server_killed_mid_upload_completes_from_its_journal(tmp_path, s3_server, s3_bucket):
    """SIGKILL with two parts in S3 and the tail in the spool: the restarted server completes
    the same multipart upload from its journal (the parts already sent are not sent again)
    and the stored audio is what was sent, sample for sample, losing at most a second of
    what the server had read."""
    server = ServerProcess(tmp_path / "data", **s3_settings(s3_server, s3_bucket))
    server.start()
    headers = {"X-App-ID": APP1["id"], "X-API-Key": APP1["key"]}
    sent = deterministic_stereo(2.5 * PART_S)  # two full parts and half a part of tail
    try:
        async with aiohttp.ClientSession(server.base_url, headers=headers) as http:
            session = await (await http.post("/api/v1/sessions")).json()
            async with http.ws_connect(session["ingest"]["wavstream"]["caller"]) as ws:
                await ws.send_json({"event": "start", "encoding": "L16", "sample_rate": 16000, "channels": 2})
                await asyncio.sleep(0.05)
                start = await http.post(f"/api/v1/sessions/{session['uuid']}/commands/record/start",
                                        json={"sample_rate": 16000, "channels": 2})
                rid = (await start.json())["recording_id"]
                await send(ws, sent)
                # Two channels of a wavstream are two legs: the counter counts both.
                read = await until(lambda: _read_all(http, 2 * len(sent)), 60, "the server to read what was sent")
                await until(lambda: _at_least(s3_server, s3_bucket, 2), 60, "two parts in S3")
                key, upload_id, before = open_upload(s3_server, s3_bucket)
                chunks_before = s3_server.part_chunks(s3_bucket, upload_id)
                server.kill()
        spool = next((tmp_path / "data" / "spool").glob("*.wav"))
        spooled = spool.stat().st_size
        assert len(before) == 2 and all(size == 5 * MiB for _, size in before.values()), before
        assert spooled > 2 * 5 * MiB, "the tail is in the spool, not in S3"
        began = time.monotonic()
        server.start()
        async with aiohttp.ClientSession(server.base_url, headers=headers) as http:
            for _ in range(300):
                meta = await (await http.get(f"/api/v1/recordings/{rid}")).json()
                if meta["state"] == "completed":
                    break
                await asyncio.sleep(0.1)
            recovered_in = time.monotonic() - began
            assert meta["state"] == "completed", meta
            download = await http.get(f"/api/v1/recordings/{rid}/download", allow_redirects=False)
            assert download.status == 302
            async with aiohttp.ClientSession() as raw, raw.get(download.headers["Location"]) as file:
                body = await file.read()
        assert hashlib.sha256(body).hexdigest() == meta["checksum"]["value"]
        assert meta["termination_reason"] == "error"
        assert multipart_uploads(s3_server, s3_bucket) == []
        # The audio: what is there is what was sent, where it was sent; at most 1 s of what
        # the server had read is missing (the encoder's buffers when it died).
        data = np.frombuffer(body[44:], dtype="<i2").reshape(-1, 2)
        lead = int(np.argmax(np.any(data != 0, axis=1)))  # a recovered recording has no leg stats
        assert lead < 16000, "the leg began within a second of the recording"
        kept = len(data) - lead
        assert read // 2 - 16000 <= kept <= len(sent), (kept, read // 2)
        assert np.array_equal(data[lead:], sent[:kept]) and not data[:lead].any()
        # S3: the same upload completed, with the parts sent before the crash as they were.
        assert_completed_from(s3_server, s3_bucket, key, body, before, chunks_before)
        print(f"[measure] recovered after restart in {recovered_in:.2f} s; {kept / 16000:.2f} s stored of "
              f"{read / 2 / 16000:.2f} s read, {spooled} bytes were spooled")
    finally:
        server.stop()


async def _read_all(http, samples: int) -> int:
    read = await samples_read(http)
    return read if read >= samples else 0


def assert_completed_from(s3, bucket, key, body, before, chunks_before) -> None:
    """The object is the journaled upload, completed: its part count, each part's size and
    MD5 (its ETag) agree with the composite ETag, and parts listed before the crash whose
    bytes did not change are the very chunks stored then, not uploaded again."""
    client = s3.client()
    try:
        etag = client.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
        attributes = client.get_object_attributes(Bucket=bucket, Key=key, ObjectAttributes=["ObjectParts"])
    finally:
        client.close()
    sizes = [p["Size"] for p in attributes["ObjectParts"]["Parts"]]
    count = -(-len(body) // (5 * MiB))
    assert etag.endswith(f"-{count}") and sum(sizes) == len(body) and sizes[:-1] == [5 * MiB] * (count - 1)
    offsets = np.cumsum([0, *sizes])
    digests = [hashlib.md5(body[a:b]).digest() for a, b in zip(offsets[:-1], offsets[1:])]
    assert etag == f"{hashlib.md5(b''.join(digests)).hexdigest()}-{count}"
    stored = s3.object_chunks(bucket, key)
    for number, (part_etag, size) in before.items():
        if digests[number - 1].hex() == part_etag:
            assert chunks_before[number] <= stored, f"part {number} was uploaded again"
        else:  # the WAV header at offset 0 is patched at the end: only it may differ
            assert number == 1, f"part {number} changed after it was sent"
    assert any(digests[n - 1].hex() == e for n, (e, _) in before.items()), "no part survived the crash"


async def test_presigned_urls_expire_and_refuse_tampering_and_deleted_is_410(tmp_path, s3_server, s3_bucket):
    async with Server(tmp_path, **s3_settings(s3_server, s3_bucket, s3_sse="AES256")) as server:
        session = await server.create_session()
        rid = (await server.command(session["uuid"], "start", format="mp3"))[1]["recording_id"]
        await asyncio.sleep(0.5)
        await server.command(session["uuid"], "stop")
        meta = await server.wait_recording(rid)
        status, _, response = await server.api("GET", f"/api/v1/recordings/{rid}/download")
        url = response.headers["Location"]
        assert url.startswith(s3_server.endpoint)
        key = (await server.engine.catalog.recording(rid))["storage_key"]
        short = await server.app[STORAGE].presign(key, 1, "x.mp3", "audio/mpeg")
        async with aiohttp.ClientSession() as http:
            async with http.get(url, headers={"Range": "bytes=0-9"}) as part:
                assert part.status == 206 and len(await part.read()) == 10
            async with http.get(url.replace("X-Amz-Signature=", "X-Amz-Signature=00")) as tampered:
                assert tampered.status == 403
            await asyncio.sleep(2.5)
            async with http.get(short) as expired:
                assert expired.status == 403
            status, data, _ = await server.api("DELETE", f"/api/v1/recordings/{rid}")
            assert status == 200
            status, data, _ = await server.api("GET", f"/api/v1/recordings/{rid}/download")
            assert status == 410
            async with http.get(url) as gone:
                assert gone.status in (403, 404)
        assert head_missing(s3_server, s3_bucket, key)
        assert meta["file_size"] > 0


def head_missing(s3, bucket, key) -> bool:
    client = s3.client()
    try:
        client.head_object(Bucket=bucket, Key=key)
    except Exception as exc:  # botocore's ClientError 404
        return "404" in str(exc)
    finally:
        client.close()
    return False


async def test_an_hour_fed_fast_does_not_grow_the_servers_memory(tmp_path, s3_server, s3_bucket):
    server = ServerProcess(tmp_path / "data", **s3_settings(s3_server, s3_bucket))
    server.start()
    headers = {"X-App-ID": APP1["id"], "X-API-Key": APP1["key"]}
    minute = np.frombuffer(bytes(noise(60.0, dbfs=-20).astype("<i2")), dtype="<i2")
    rss = {}
    try:
        async with aiohttp.ClientSession(server.base_url, headers=headers) as http:
            session = await (await http.post("/api/v1/sessions")).json()
            async with http.ws_connect(session["ingest"]["wavstream"]["caller"]) as ws:
                await ws.send_json({"event": "start", "encoding": "L16", "sample_rate": 8000, "channels": 1})
                await asyncio.sleep(0.05)
                start = await http.post(f"/api/v1/sessions/{session['uuid']}/commands/record/start", json={})
                rid = (await start.json())["recording_id"]
                began = time.monotonic()
                for minutes in range(1, 61):
                    await send(ws, minute, frame_bytes=16000)
                    rss[minutes] = server.rss_kib()
                elapsed = time.monotonic() - began
                await ws.send_json({"event": "stop"})
                await ws.receive(timeout=120)  # the server has read it all and closes
            await http.delete(f"/api/v1/sessions/{session['uuid']}")
            for _ in range(300):
                meta = await (await http.get(f"/api/v1/recordings/{rid}")).json()
                if meta["state"] == "completed":
                    break
                await asyncio.sleep(0.1)
        assert meta["state"] == "completed" and meta["duration"] >= 3600, (meta["duration"], meta["legs"])
        growth = rss[60] - rss[15]
        print(f"[measure] 60 min of audio in {elapsed:.1f} s ({3600 / elapsed:.0f}x real time); "
              f"RSS after 15 min {rss[15]} KiB, after 60 min {rss[60]} KiB, growth {growth} KiB; by minute {rss}")
        # Flat: at most a part's buffers (a one-time step), never the 43 MB those 45 minutes hold.
        assert growth < 12 * 1024
    finally:
        server.stop()
