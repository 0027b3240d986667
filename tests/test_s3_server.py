"""The server storing to a real SeaweedFS: parts stream during the call, outages and crashes
lose nothing, presigned URLs expire, deletion is final."""

import asyncio
import hashlib
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
        key = server.engine.catalog.recording(rid)["storage_key"]
        body = await server.download(rid)
    info = head(s3_server, s3_bucket, key)
    assert info["ETag"].strip('"').endswith("-4")
    assert hashlib.sha256(body).hexdigest() == meta["checksum"]["value"] and len(body) == meta["file_size"]
    data = np.frombuffer(body[44:], dtype="<i2").reshape(-1, 2)
    lead = first_sound(data, meta)
    assert np.array_equal(data[lead:lead + len(stereo)], stereo)  # every sample, bit for bit
    assert multipart_uploads(s3_server, s3_bucket) == []


async def test_s3_down_for_ten_seconds_mid_recording_loses_nothing(tmp_path, s3_own_server):
    s3 = s3_own_server
    bucket = s3.create_bucket()
    audio = noise(60.0, rate=16000, dbfs=-20)
    stereo = np.column_stack((audio, audio))
    async with Server(tmp_path, **s3_settings(s3, bucket)) as server:
        session = await server.create_session()
        http, ws = await open_leg(server.base_url, session)
        try:
            await asyncio.sleep(0.05)
            rid = (await server.command(session["uuid"], "start", sample_rate=16000, channels=2))[1]["recording_id"]
            await send(ws, stereo[:16000 * 20])
            await asyncio.sleep(1.5)
            s3.stop()
            outage = time.monotonic()
            await send(ws, stereo[16000 * 20:16000 * 40])  # keeps recording to the spool meanwhile
            await asyncio.sleep(max(0.0, 10 - (time.monotonic() - outage)))
            s3.start()
            await send(ws, stereo[16000 * 40:])
            await ws.send_json({"event": "stop"})
        finally:
            await ws.close()
            await http.close()
        await server.api("DELETE", f"/api/v1/sessions/{session['uuid']}")
        meta = await server.wait_recording(rid, timeout=120)
        body = await server.download(rid)
    data = np.frombuffer(body[44:], dtype="<i2").reshape(-1, 2)
    lead = first_sound(data, meta)
    assert np.array_equal(data[lead:lead + len(stereo)], stereo)
    assert multipart_uploads(s3, bucket) == []


async def test_server_killed_mid_upload_completes_from_its_journal(tmp_path, s3_server, s3_bucket):
    server = ServerProcess(tmp_path / "data", **s3_settings(s3_server, s3_bucket))
    server.start()
    headers = {"X-App-ID": APP1["id"], "X-API-Key": APP1["key"]}
    audio = noise(100.0, rate=16000, dbfs=-20)
    stereo = np.column_stack((audio, audio))
    try:
        async with aiohttp.ClientSession(server.base_url, headers=headers) as http:
            session = await (await http.post("/api/v1/sessions")).json()
            async with http.ws_connect(session["ingest"]["wavstream"]["caller"]) as ws:
                await ws.send_json({"event": "start", "encoding": "L16", "sample_rate": 16000, "channels": 2})
                await asyncio.sleep(0.05)
                start = await http.post(f"/api/v1/sessions/{session['uuid']}/commands/record/start",
                                        json={"sample_rate": 16000, "channels": 2})
                rid = (await start.json())["recording_id"]
                await send(ws, stereo)
                for _ in range(100):  # until at least two parts are in S3
                    uploads = multipart_uploads(s3_server, s3_bucket)
                    if uploads and _parts(s3_server, s3_bucket, uploads[0]) >= 2:
                        break
                    await asyncio.sleep(0.1)
                server.kill()
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
        assert meta["duration"] >= 60  # what the crashed server had received and spooled
        assert multipart_uploads(s3_server, s3_bucket) == []
        print(f"[measure] recovered after restart in {recovered_in:.2f} s")
    finally:
        server.stop()


def _parts(s3, bucket, upload) -> int:
    client = s3.client()
    try:
        return len(client.list_parts(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]).get("Parts", []))
    finally:
        client.close()


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
        key = server.engine.catalog.recording(rid)["storage_key"]
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
