"""Cluster mode: two server processes on one real PostgreSQL and one real S3 (SeaweedFS).

Any node answers for any recording; a request about a live session reaches the node that
holds it; webhooks are delivered once from the shared outbox; a node killed mid-call has its
recordings settled by the survivor from what reached S3; PostgreSQL restarted under a
recording loses nothing.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid as uuidlib
from contextlib import asynccontextmanager

import aiohttp
import numpy as np
import pytest

from audio import ffprobe, noise, read_audio
from postgres import fresh_database
from serverproc import ServerProcess
from servers import APP1, APP2
from webhook_receiver import Receiver

pytestmark = pytest.mark.timeout(180)

RATE = 8000
FRAME = 160  # 20 ms of L16 at 8 kHz
CHECKPOINT_S = 2.0
NODE_TIMEOUT_S = 3.0
AUTH = {"Authorization": f"Bearer {APP1['key']}"}


def node_settings(dsn: str, s3, bucket: str, name: str) -> dict[str, object]:
    return {"catalog": "postgres", "postgres_dsn": dsn, "node_id": name, "storage": "s3", "s3_endpoint": s3.endpoint,
            "s3_bucket": bucket, "s3_region": s3.region, "s3_access_key": s3.credentials.access_key,
            "s3_secret_key": s3.credentials.secret_key, "secret_key": "cluster-secret-0123456789",
            "checkpoint_s": CHECKPOINT_S, "node_timeout_s": NODE_TIMEOUT_S, "workers": 1}


@asynccontextmanager
async def cluster(tmp_path, dsn: str, s3, bucket: str, names=("node-a", "node-b"), apps=None):
    """Started nodes (ServerProcess), stopped however the test ends."""
    nodes = []
    try:
        for name in names:
            node = ServerProcess(tmp_path / name, **node_settings(dsn, s3, bucket, name))
            if apps is not None:
                node.env["MEDIASERVER_APPS"] = json.dumps(apps)
            nodes.append(node)
            await asyncio.to_thread(node.start)
        yield nodes
    finally:
        for node in nodes:
            if node.proc is not None and node.proc.poll() is None:
                await asyncio.to_thread(node.stop)


async def api(http: aiohttp.ClientSession, node, method: str, path: str, body=None) -> tuple[int, dict]:
    async with http.request(method, node.base_url + path, json=body, headers=AUTH) as response:
        data = await response.read()
        return response.status, (json.loads(data) if data and response.content_type == "application/json" else {})


async def wait_for(check, timeout: float, every: float = 0.2):
    """Poll the coroutine function `check` until it answers something true, within `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(every)


def aligned(kept: np.ndarray, sent: np.ndarray, gram: int = 16) -> tuple[np.ndarray, np.ndarray, int]:
    """The recorded audio from its first sound, the stretch of `sent` that should match
    it, and where in `sent` that stretch begins (noise: any `gram` samples occur once)."""
    sounding = np.flatnonzero(kept)
    assert len(sounding), "the recording is silent"
    first = int(sounding[0])
    windows = np.lib.stride_tricks.sliding_window_view(sent, gram)
    found = np.flatnonzero((windows == kept[first:first + gram]).all(axis=1))
    assert len(found), "the recording's first sound is not anything that was sent"
    at = int(found[0])
    got = kept[first:]
    end = min(len(got), len(sent) - at)
    # Past the end of what was sent there may only be silence.
    assert not got[end:].any(), "the recording holds sound after what was sent"
    return got[:end], sent[at:at + end], at


async def recording(http, node, rid: str) -> dict:
    return (await api(http, node, "GET", f"/api/v1/recordings/{rid}"))[1]


async def completed(http, node, rid: str, timeout: float = 30.0) -> dict:
    async def done():
        meta = await recording(http, node, rid)
        return meta if meta.get("state") in ("completed", "failed") else None
    meta = await wait_for(done, timeout)
    assert meta, f"recording {rid} did not complete: {await recording(http, node, rid)}"
    return meta


class Streamer:
    """One wavstream leg sending L16 noise in real time (20 ms frames) until stopped."""

    def __init__(self, url: str, seed: int, seconds: float = 60.0) -> None:
        self.url = url
        self.audio = noise(seconds, seed=seed, dbfs=-18)
        self.sent = 0  # samples sent so far
        self.task: asyncio.Task | None = None

    async def run(self, http: aiohttp.ClientSession, started: asyncio.Event) -> None:
        with contextlib_suppress():
            async with http.ws_connect(self.url) as ws:
                await ws.send_json({"event": "start", "encoding": "L16", "sample_rate": RATE, "channels": 1})
                started.set()
                begin = time.monotonic()
                while self.sent + FRAME <= len(self.audio):
                    await ws.send_bytes(self.audio[self.sent:self.sent + FRAME].astype("<i2").tobytes())
                    self.sent += FRAME
                    delay = begin + self.sent / RATE - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                await ws.send_json({"event": "stop"})


class contextlib_suppress:
    """A socket torn down under the streamer (its node killed) ends the stream quietly."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        return kind is not None and issubclass(kind, (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError))


@pytest.fixture
def bucket(s3_server):
    return s3_server.create_bucket()


async def test_any_node_answers_and_commands_reach_the_holder(tmp_path, postgres_server, s3_server, bucket):
    """A session on node A: its legs, commands and hangup sent to node B act on A; the
    same command_uid sent to both at once starts one recording; the recording is listed,
    fetched and deleted through B."""
    dsn = fresh_database(postgres_server)
    async with cluster(tmp_path, dsn, s3_server, bucket) as (a, b), aiohttp.ClientSession() as http:
        status, session = await api(http, a, "POST", "/api/v1/sessions")
        assert status == 201, session
        uuid = session["uuid"]
        assert session["ingest"]["wavstream"]["caller"].startswith(a.base_url.replace("http", "ws"))
        # The caller's leg reaches node B: relayed to A, where the session is mixed.
        via_b = session["ingest"]["wavstream"]["caller"].replace(a.base_url.replace("http", "ws"), b.base_url.replace("http", "ws"))
        streamer, started = Streamer(via_b, seed=3, seconds=3.0), asyncio.Event()
        streaming = asyncio.create_task(streamer.run(http, started))
        await asyncio.wait_for(started.wait(), 10)
        uid = str(uuidlib.uuid4())
        answers = await asyncio.gather(*(api(http, node, "POST", f"/api/v1/sessions/{uuid}/commands/record/start",
                                             {"command_uid": uid, "format": "wav"}) for node in (a, b)))
        assert [status for status, _ in answers] == [202, 202], answers
        assert answers[0][1]["recording_id"] == answers[1][1]["recording_id"]
        rid = answers[0][1]["recording_id"]
        await streaming
        status, _ = await api(http, b, "POST", f"/api/v1/sessions/{uuid}/commands/record/stop", {"command_uid": str(uuidlib.uuid4())})
        assert status == 202
        meta = await completed(http, b, rid)
        assert meta["state"] == "completed" and meta["termination_reason"] == "stop", meta
        status, listed = await api(http, b, "GET", f"/api/v1/recordings?session_id={uuid}")
        assert status == 200 and [r["recording_id"] for r in listed["data"]] == [rid], listed
        async with http.get(f"{b.base_url}/api/v1/recordings/{rid}/download", headers=AUTH) as response:
            assert response.status == 200
            path = tmp_path / "via-b.wav"
            path.write_bytes(await response.read())
        pcm, rate = read_audio(path)
        assert rate == RATE and len(pcm) > 0, meta
        assert meta["legs"] and meta["legs"][0]["audio_ms"] > 1000, meta
        got, sent, _ = aligned(pcm[:, 0], streamer.audio)
        assert len(got) > RATE and np.array_equal(got, sent), "the relayed leg's audio is not what was sent"
        status, _ = await api(http, b, "POST", "/api/v1/sessions/" + uuid + "/commands/record/start", {"format": "wav"})
        assert status == 202  # the session lives on A until its hangup, sent to B
        status, _ = await api(http, b, "DELETE", f"/api/v1/sessions/{uuid}")
        assert status == 202
        status, _ = await api(http, b, "DELETE", f"/api/v1/recordings/{rid}")
        assert status in (200, 204)
        status, _ = await api(http, a, "GET", f"/api/v1/recordings/{rid}/download")
        assert status == 410


async def test_each_webhook_is_delivered_once_across_nodes(tmp_path, postgres_server, s3_server, bucket):
    dsn = fresh_database(postgres_server)
    async with Receiver({"app1": APP1["webhook_secret"]}) as hooks:
        apps = [dict(APP1, webhook_url=hooks.url), APP2]
        async with cluster(tmp_path, dsn, s3_server, bucket, apps=apps) as nodes, aiohttp.ClientSession() as http:
            rids = []

            async def one(index: int) -> None:
                node = nodes[index % 2]
                status, session = await api(http, node, "POST", "/api/v1/sessions")
                assert status == 201
                status, answer = await api(http, node, "POST", f"/api/v1/sessions/{session['uuid']}/commands/record/start",
                                           {"format": "wav"})
                assert status == 202, answer
                rids.append(answer["recording_id"])
                status, _ = await api(http, node, "DELETE", f"/api/v1/sessions/{session['uuid']}")
                assert status == 202

            for first in range(0, 100, 10):
                await asyncio.gather(*(one(i) for i in range(first, first + 10)))

            def seen() -> list[str]:
                return [e["payload"]["recording_id"] for e in hooks.of_kind("recording.completed")]

            async def all_seen():
                return set(seen()) >= set(rids)
            assert await wait_for(all_seen, 60), f"{len(set(seen()))} of {len(rids)} recording.completed seen"
            await asyncio.sleep(2 * NODE_TIMEOUT_S)  # time for a duplicate to show, were there one
            assert sorted(seen()) == sorted(rids), "an event was delivered twice"
            assert hooks.bad_signatures == 0


async def test_a_killed_node_has_its_recordings_settled_by_the_survivor(tmp_path, postgres_server, s3_server, bucket):
    """SIGKILL node A in the middle of 10 calls it records (its disk counted as lost), in
    WAV, MP3 and Opus: node B settles all 10 from S3 within 30 s, each playable with the
    duration its headers give, `node_lost`, holding what was sent up to at most
    checkpoint_s + 1 s before the kill (sample for sample in WAV); no multipart upload or
    checkpoint is left."""
    dsn = fresh_database(postgres_server)
    async with cluster(tmp_path, dsn, s3_server, bucket) as (a, b), aiohttp.ClientSession() as http:
        calls, formats, sent_at_start = [], ["wav"] * 4 + ["mp3"] * 3 + ["opus"] * 3, {}
        for index, fmt in enumerate(formats):
            status, session = await api(http, a, "POST", "/api/v1/sessions")
            assert status == 201
            streamer, started = Streamer(session["ingest"]["wavstream"]["caller"], seed=100 + index), asyncio.Event()
            streamer.task = asyncio.create_task(streamer.run(http, started))
            await asyncio.wait_for(started.wait(), 10)
            before = streamer.sent
            status, answer = await api(http, a, "POST", f"/api/v1/sessions/{session['uuid']}/commands/record/start",
                                       {"format": fmt})
            assert status == 202, answer
            sent_at_start[answer["recording_id"]] = before  # the recording starts after this
            calls.append((session["uuid"], answer["recording_id"], streamer))
        await asyncio.sleep(6.0)
        sent_at_kill = {rid: streamer.sent for _, rid, streamer in calls}
        a.kill()
        killed = time.monotonic()
        await asyncio.gather(*(streamer.task for _, _, streamer in calls))
        settled = []
        for _, rid, _ in calls:
            meta = await completed(http, b, rid, timeout=max(30.0 - (time.monotonic() - killed), 1.0))
            settled.append(meta)
        assert time.monotonic() - killed < 30.0 + 5.0
        for (uuid, rid, streamer), meta, fmt in zip(calls, settled, formats):
            assert meta["state"] == "completed" and meta["termination_reason"] == "node_lost", meta
            assert [leg["role"] for leg in meta["legs"]] == ["caller"], meta  # as last checkpointed
            async with http.get(f"{b.base_url}/api/v1/recordings/{rid}/download", headers=AUTH) as response:
                assert response.status == 200
                path = tmp_path / f"{rid}.{fmt}"
                path.write_bytes(await response.read())
            probed = ffprobe(path)  # the headers say what the file holds
            # As after a crash of a single node (test_recovery): a repaired MP3 or Ogg file
            # is exact to its frames and the codec's delay.
            slack = 0.05 if fmt == "wav" else 0.2
            assert probed["duration"] == pytest.approx(meta["duration"], abs=slack), (fmt, probed, meta)
            kept_s = (sent_at_kill[rid] - sent_at_start[rid]) / RATE - (CHECKPOINT_S + 1.0)
            assert meta["duration"] >= kept_s, f"{rid} ({fmt}): {meta['duration']:.2f} s kept, {kept_s:.2f} s due"
            pcm, rate = read_audio(path)
            assert len(pcm) / rate == pytest.approx(meta["duration"], abs=slack), (fmt, len(pcm) / rate, meta)
            if fmt != "wav":
                continue
            # What was sent is there sample for sample, from the recording's start...
            got, sent, at = aligned(pcm[:, 0], streamer.audio)
            assert np.array_equal(got, sent), f"{rid}: the kept audio is not what was sent"
            # ...up to at most checkpoint_s + 1 s before the kill.
            assert at + len(got) >= sent_at_kill[rid] - (CHECKPOINT_S + 1.0) * RATE, \
                f"{rid}: {len(got) / RATE:.2f} s kept of {sent_at_kill[rid] / RATE:.2f} s sent before the kill"
            status, session = await api(http, b, "GET", f"/api/v1/sessions/{uuid}")
            assert status == 200 and session["state"] == "ended"
        s3 = s3_server.client()
        try:
            assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
            keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
            assert not [k for k in keys if ".ckpt/" in k], keys
        finally:
            s3.close()
        # New calls go to the survivor.
        status, session = await api(http, b, "POST", "/api/v1/sessions")
        assert status == 201
        # Node A comes back (its disk was not lost after all): it leaves what B settled alone.
        before = {rid: await recording(http, b, rid) for _, rid, _ in calls}
        await asyncio.to_thread(a.start)
        assert not list((a.data_dir / "spool").glob("rec_*")), "A kept the spools of recordings B settled"
        for rid, meta in before.items():
            after = await recording(http, a, rid)
            assert (after["state"], after["checksum"], after["duration"]) == (meta["state"], meta["checksum"], meta["duration"])


async def test_postgres_restarted_under_a_recording_loses_nothing(tmp_path, postgres_own_server, s3_server, bucket):
    dsn = fresh_database(postgres_own_server)
    async with cluster(tmp_path, dsn, s3_server, bucket, names=("node-a",)) as (a,), aiohttp.ClientSession() as http:
        status, session = await api(http, a, "POST", "/api/v1/sessions")
        assert status == 201
        streamer, started = Streamer(session["ingest"]["wavstream"]["caller"], seed=7, seconds=6.0), asyncio.Event()
        streaming = asyncio.create_task(streamer.run(http, started))
        await asyncio.wait_for(started.wait(), 10)
        status, answer = await api(http, a, "POST", f"/api/v1/sessions/{session['uuid']}/commands/record/start",
                                   {"format": "wav"})
        assert status == 202
        rid = answer["recording_id"]
        await asyncio.sleep(1.5)
        await asyncio.to_thread(postgres_own_server.restart)
        await streaming
        status, _ = await api(http, a, "DELETE", f"/api/v1/sessions/{session['uuid']}")
        assert status == 202
        meta = await completed(http, a, rid)
        assert meta["state"] == "completed", meta
        async with http.get(f"{a.base_url}/api/v1/recordings/{rid}/download", headers=AUTH) as response:
            path = tmp_path / "restarted.wav"
            path.write_bytes(await response.read())
        pcm, _ = read_audio(path)
        got, sent, at = aligned(pcm[:, 0], streamer.audio)
        assert np.array_equal(got, sent), "the audio is not what was sent"
        assert at + len(got) == len(streamer.audio), "the recording does not run to the end of what was sent"


async def test_a_node_cut_off_from_the_catalog_refuses_new_calls(tmp_path, postgres_own_server, s3_server, bucket):
    """Past half of node_timeout_s without a heartbeat the others are about to take this
    node's calls over: it answers new ones 503 `cluster.isolated` until it is back."""
    dsn = fresh_database(postgres_own_server)
    async with cluster(tmp_path, dsn, s3_server, bucket, names=("node-a",)) as (a,), aiohttp.ClientSession() as http:
        async def health() -> dict:
            async with http.get(f"{a.base_url}/healthz") as response:
                return await response.json()
        assert (await health())["node"]["isolated"] is False
        await asyncio.to_thread(postgres_own_server.stop)
        try:
            assert await wait_for(lambda: _isolated(health), 30), await health()
            status, answer = await api(http, a, "POST", "/api/v1/sessions")
            assert (status, answer["error"]["code"]) == (503, "cluster.isolated"), answer
        finally:
            await asyncio.to_thread(postgres_own_server.start)

        async def back() -> bool:
            return not (await health())["node"]["isolated"]
        assert await wait_for(back, 30)
        status, answer = await api(http, a, "POST", "/api/v1/sessions")
        assert status == 201, answer


async def _isolated(health) -> bool:
    return (await health())["node"]["isolated"]

