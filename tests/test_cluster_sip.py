"""The cluster behind Kamailio, end to end: two clustered nodes (one real PostgreSQL
catalog, one SeaweedFS bucket) behind Kamailio from deploy/kamailio/kamailio.cfg, called
by SIPp.

Calls spread over both nodes are served (listed, fetched, deleted) by the node that did
not record them; a record/stop sent to the node that does not hold a live call stops that
call's recording; a node killed under its calls has their recordings settled by the
survivor, and new calls go to the survivor.

Which node holds a call is read from the catalog (`sessions.node_id`, through psql); for
calls that have ended it is checked against the node that answered the INVITE (its SIP
port in the 200's Contact, as SIPp logged it).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import shutil
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
from audio import ffprobe, noise
from postgres import fresh_database
from sip_peers import Recorded, SippResult, run_sipp, scenario
from test_cluster import CHECKPOINT_S, node_settings
from test_kamailio import (
    CALL_MS, CALL_S, GRAM, RATE, Cluster, Node, assert_holds, call_through, start_cluster, ulaw_file, wait_for_flags,
)
from test_kamailio import pytestmark as kamailio_marks

from mediaserver.codecs import g711
from mediaserver.tools.postgres import LocalPostgres

pytestmark = [*kamailio_marks[:2], pytest.mark.timeout(120)]

NODE_IDS = ("node-a", "node-b")
SETTLE_S = 30.0  # how long a survivor may take to settle a dead node's recordings
WAIT_S = 20.0  # bound of every other wait for the cluster to reach a state


class Catalog:
    """The cluster's shared catalog, read with psql where the API does not say it."""

    def __init__(self, server: LocalPostgres, dsn: str) -> None:
        self.server = server
        self.database = dsn.rsplit("/", 1)[1]

    async def holders(self) -> dict[str, str]:
        """Session UUID -> the node that holds it (or held it last)."""
        out = await asyncio.to_thread(self.server.psql, "SELECT uuid, node_id FROM sessions WHERE node_id IS NOT NULL",
                                      self.database)
        return dict(line.split("|", 1) for line in out.splitlines() if line)


@contextlib.asynccontextmanager
async def sip_cluster(tmp_path: Path, postgres: LocalPostgres, s3, bucket: str,
                      **settings: Any) -> AsyncIterator[tuple[Cluster, Catalog]]:
    """Two clustered nodes (`settings` on top of each) behind Kamailio, on a fresh database."""
    dsn = fresh_database(postgres)
    own = [{**node_settings(dsn, s3, bucket, name), **settings} for name in NODE_IDS]
    async with start_cluster(tmp_path, *own) as group:
        yield group, Catalog(postgres, dsn)


def dt_seconds(iso: str) -> float:
    """An API timestamp as seconds since the epoch."""
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def node_of(group: Cluster, node_id: str) -> Node:
    return group.nodes[NODE_IDS.index(node_id)]


def other_than(group: Cluster, node: Node) -> Node:
    [other] = [n for n in group.nodes if n is not node]
    return other


def node_id_of(group: Cluster, node: Node) -> str:
    return NODE_IDS[group.nodes.index(node)]


async def poll(check, timeout: float, what: str, every: float = 0.1) -> Any:
    """The first true answer of the coroutine function `check`, within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        await asyncio.sleep(every)


async def sessions_in(node: Node, state: str, count: int, timeout: float = WAIT_S) -> list[dict]:
    """Once the cluster has `count` sessions in `state` (any node answers for all of them)."""
    async def enough():
        status, data, _ = await node.api("GET", f"/api/v1/sessions?state={state}&limit=100")
        assert status == 200, data
        return data["data"] if len(data["data"]) >= count else None
    found = await poll(enough, timeout, f"{count} {state} sessions")
    assert len(found) == count, f"{len(found)} {state} sessions, not {count}"
    return found


async def holders_of(catalog: Catalog, uuids: list[str]) -> dict[str, str]:
    """The holding node of each session, once the catalog has them all."""
    async def known():
        held = await catalog.holders()
        return {uuid: held[uuid] for uuid in uuids} if all(uuid in held for uuid in uuids) else None
    return await poll(known, WAIT_S, "the catalog's node of every session")


async def recording_of(node: Node, uuid: str) -> dict:
    """The one recording of session `uuid`, once it has one."""
    async def one():
        status, data, _ = await node.api("GET", f"/api/v1/recordings?session_id={uuid}")
        assert status == 200, data
        return data["data"]
    rows = await poll(one, WAIT_S, f"a recording of session {uuid}")
    assert len(rows) == 1, rows
    return rows[0]


async def fetched(node: Node, meta: dict, path: Path) -> Recorded:
    """The recording downloaded through `node`, checked to be the WAV its metadata
    describes (the headers' duration is the recording's)."""
    data = await node.download(meta["recording_id"])
    path.write_bytes(data)
    probed = ffprobe(path)
    assert (probed["codec"], probed["sample_rate"], probed["channels"]) == ("pcm_s16le", RATE, 1), probed
    assert probed["duration"] == pytest.approx(meta["duration"], abs=0.05), (probed, meta)
    audio, rate = soundfile.read(io.BytesIO(data), dtype="int16", always_2d=True)
    return Recorded(meta, audio, rate)


def share_from(recording: Recorded, sent: np.ndarray) -> float:
    """Which share of the recording's 20 ms frames of sound are, sample for sample, audio
    that was sent (the µ-law of `sent`): a recording of a stretch of the call, wherever it
    starts and ends."""
    sent = g711.decode_ulaw(g711.encode_ulaw(sent)).astype("<i2").tobytes()
    audio = recording.audio[:, 0]
    gram, frame = 2 * GRAM, RATE // 50
    grams = {sent[at:at + gram] for at in range(0, len(sent) - gram + 1, 2)}
    frames = [audio[at:at + GRAM] for at in range(0, len(audio) - GRAM + 1, frame)]
    sounding = [f for f in frames if f.any()]
    assert sounding, f"recording {recording.meta['recording_id']} is silent"
    return sum(f.astype("<i2").tobytes() in grams for f in sounding) / len(sounding)


async def long_calls(group: Cluster, workdir: Path, calls: int, sent: np.ndarray, call_ms: int) -> SippResult:
    """`calls` concurrent SIPp calls of `call_ms` through Kamailio streaming `sent`; SIPp's
    result as it is (the caller judges it). SIPp stops by itself by its -timeout."""
    workdir.mkdir()
    path = scenario(workdir, "uac_proxied.xml", ulaw_file=ulaw_file(workdir, sent))
    return await run_sipp(None, path, workdir, calls=calls, sets={"call_ms": call_ms}, timeout_s=40,
                          target=group.target, extra=("-trace_logs",))


@contextlib.asynccontextmanager
async def in_background(calling: asyncio.Task) -> AsyncIterator[asyncio.Task]:
    """A SIPp run going on while the block runs; however the block ends, SIPp has exited
    (by itself: run_sipp kills it past its timeout) when this is left."""
    try:
        yield calling
    finally:
        await asyncio.wait([calling])


def open_uploads(s3, bucket: str) -> list[dict]:
    client = s3.client()
    try:
        return client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    finally:
        client.close()


def object_keys(s3, bucket: str) -> list[str]:
    client = s3.client()
    try:
        return [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    finally:
        client.close()


@pytest.fixture
def bucket(s3_server):
    return s3_server.create_bucket()


async def test_calls_spread_over_both_nodes_are_served_by_the_other(tmp_path, postgres_server, s3_server, bucket):
    """20 calls through Kamailio land on both nodes and are all recorded; each recording is
    listed, fetched (a WAV of the call's duration holding what was sent) and deleted
    through the node that did not record it."""
    sent = noise(CALL_S, seed=21, dbfs=-18)
    async with sip_cluster(tmp_path, postgres_server, s3_server, bucket) as (group, catalog):
        answers = await call_through(group, tmp_path, 20, sent, "calls")
        sessions = await sessions_in(group.nodes[0], "ended", 20)
        held = await holders_of(catalog, [s["uuid"] for s in sessions])
        counts = {node_id: list(held.values()).count(node_id) for node_id in NODE_IDS}
        assert all(counts.values()), f"calls per node: {counts}"
        for index, session in enumerate(sessions):
            holder = node_of(group, held[session["uuid"]])
            other = other_than(group, holder)
            # The catalog's node is the one that answered the INVITE.
            assert answers[session["metadata"]["sip"]["call_id"]].contact == ("127.0.0.1", holder.sip_port)
            row = await recording_of(other, session["uuid"])
            meta = await other.wait_recording(row["recording_id"])
            assert meta["duration"] == pytest.approx(CALL_MS / 1000, abs=0.5), meta
            assert_holds(await fetched(other, meta, tmp_path / f"call-{index}.wav"), sent)
        status, listing, _ = await group.nodes[1].api("GET", "/api/v1/recordings?limit=100")
        assert status == 200 and listing["pagination"]["total"] == 20, listing
        assert {r["session_uuid"] for r in listing["data"]} == set(held)
        for row in listing["data"]:
            holder = node_of(group, held[row["session_uuid"]])
            other = other_than(group, holder)
            status, data, _ = await other.api("DELETE", f"/api/v1/recordings/{row['recording_id']}")
            assert status == 200, data
            status, data, _ = await holder.api("GET", f"/api/v1/recordings/{row['recording_id']}/download")
            assert status == 410, data  # the holder sees the deletion the other made
        assert object_keys(s3_server, bucket) == []  # every file gone from the bucket
    print(f"calls per node: {counts}")


async def test_record_stop_sent_to_the_other_node_stops_the_call_recording(tmp_path, postgres_server, s3_server,
                                                                            bucket):
    """With record_policy = api, a call is up on one node: record/start and record/stop
    sent to the other node start and stop its recording there, and the call goes on to
    its BYE."""
    sent = noise(8.0, seed=22, dbfs=-18)
    async with sip_cluster(tmp_path, postgres_server, s3_server, bucket, record_policy="api") as (group, catalog):
        calling = asyncio.create_task(long_calls(group, tmp_path / "call", 1, sent, 8100))
        async with in_background(calling):
            [session] = await sessions_in(group.nodes[0], "active", 1)
            uuid = session["uuid"]
            holder = node_of(group, (await holders_of(catalog, [uuid]))[uuid])
            other = other_than(group, holder)
            status, started, _ = await other.api("POST", f"/api/v1/sessions/{uuid}/commands/record/start",
                                                 json={"format": "wav"})
            assert status == 202, started
            rid = started["recording_id"]

            async def checkpointed():  # a few seconds of the call in the recording
                status, meta, _ = await other.api("GET", f"/api/v1/recordings/{rid}")
                assert status == 200 and meta["state"] in ("initiated", "recording"), meta
                return sum(leg.get("audio_ms", 0) for leg in meta["legs"]) >= 1500
            await poll(checkpointed, WAIT_S, f"recording {rid} taking audio")
            status, stopped, _ = await other.api("POST", f"/api/v1/sessions/{uuid}/commands/record/stop", json={})
            assert status == 202, stopped
            meta = await other.wait_recording(rid)
            assert meta["termination_reason"] == "stop", meta
            status, live, _ = await other.api("GET", f"/api/v1/sessions/{uuid}")
            assert status == 200 and live["state"] == "active", live  # the call goes on without a recording
        result = calling.result()
        assert result.returncode == 0, f"{result.output}\n{group.proxy.log_tail()}"
        recording = await fetched(holder, meta, tmp_path / "stopped.wav")
        assert 1.0 <= meta["duration"] < 8.0, meta
        assert share_from(recording, sent) >= 0.9
        status, ended, _ = await other.api("GET", f"/api/v1/sessions/{uuid}")
        assert ended["state"] == "ended", ended


async def test_a_node_killed_under_its_calls_has_them_settled_by_the_survivor(tmp_path, postgres_server, s3_server,
                                                                               bucket):
    """SIGKILL the node holding the most of 12 calls in progress (its disk counted as
    lost): within 30 s the survivor has settled each of its recordings (`completed`,
    `node_lost`, a playable WAV of what was sent, holding the call up to at most
    checkpoint_s + 1 s before the kill); the survivor's own calls end as usual; new calls
    through Kamailio land on the survivor and are recorded; no multipart upload or
    checkpoint is left in the bucket."""
    held_sound = noise(12.0, seed=23, dbfs=-18)
    async with sip_cluster(tmp_path, postgres_server, s3_server, bucket) as (group, catalog):
        # SIPp's calls to the dead node fail from the kill on: its result is not judged.
        calling = asyncio.create_task(long_calls(group, tmp_path / "held", 12, held_sound, 12000))
        async with in_background(calling):
            sessions = await sessions_in(group.nodes[0], "active", 12)
            held = await holders_of(catalog, [s["uuid"] for s in sessions])
            victim_id = max(NODE_IDS, key=list(held.values()).count)
            victim = node_of(group, victim_id)
            survivor = other_than(group, victim)
            doomed = {uuid: (await recording_of(survivor, uuid))["recording_id"]
                      for uuid, node_id in held.items() if node_id == victim_id}
            kept = {uuid: (await recording_of(survivor, uuid))["recording_id"]
                    for uuid, node_id in held.items() if node_id != victim_id}

            async def checkpointed():  # each doomed recording has seconds of audio in S3
                for rid in doomed.values():
                    status, meta, _ = await survivor.api("GET", f"/api/v1/recordings/{rid}")
                    if sum(leg.get("audio_ms", 0) for leg in meta["legs"]) < 3000:
                        return False
                return True
            await poll(checkpointed, WAIT_S, "3 s of every call of the node to kill checkpointed")
            victim.kill()
            killed_at, killed = time.time(), time.monotonic()
            shutil.rmtree(victim.process.data_dir)  # its disk is lost with it

            margins = []  # seconds kept beyond what was due, per settled recording
            for index, rid in enumerate(doomed.values()):
                left = max(SETTLE_S - (time.monotonic() - killed), 0.1)
                meta = await survivor.wait_recording(rid, states=("completed", "failed"), timeout=left)
                assert meta["state"] == "completed" and meta["termination_reason"] == "node_lost", meta
                recording = await fetched(survivor, meta, tmp_path / f"settled-{index}.wav")
                assert share_from(recording, held_sound) >= 0.9
                # The recording started at the answer; the call's audio up to at most
                # checkpoint_s + 1 s before the kill is there.
                started = dt_seconds(meta["started_at"] or meta["created_at"])
                due = killed_at - started - (CHECKPOINT_S + 1.0)
                assert meta["duration"] >= due, f"{rid}: {meta['duration']:.2f} s kept, {due:.2f} s due"
                margins.append(meta["duration"] - due)
            settled_in = time.monotonic() - killed

            await wait_for_flags(group.proxy, {victim.uri: "I", survivor.uri: "A"})
            answers = await call_through(group, tmp_path, 4, noise(CALL_S, seed=24, dbfs=-18), "after")
            assert {a.contact for a in answers.values()} == {("127.0.0.1", survivor.sip_port)}
        new = [s for s in await sessions_in(survivor, "ended", 16) if s["uuid"] not in held]
        assert {(await holders_of(catalog, [s["uuid"]]))[s["uuid"]] for s in new} == {node_id_of(group, survivor)}
        for session in new:
            meta = await survivor.wait_recording((await recording_of(survivor, session["uuid"]))["recording_id"])
            assert meta["termination_reason"] != "node_lost", meta
        for rid in kept.values():  # the survivor's own calls ended by their BYE
            meta = await survivor.wait_recording(rid)
            assert meta["termination_reason"] != "node_lost", meta
            assert meta["duration"] == pytest.approx(12.0, abs=0.5), meta

        async def clean():
            keys = object_keys(s3_server, bucket)
            return not open_uploads(s3_server, bucket) and not [k for k in keys if ".ckpt/" in k]
        await poll(clean, WAIT_S, f"a bucket without open uploads or checkpoints: {object_keys(s3_server, bucket)}")
    print(f"{len(doomed)} calls on the killed node, settled in {settled_in:.1f} s, each holding at least "
          f"{min(margins):.2f} s more than due; {len(kept)} on the survivor")
