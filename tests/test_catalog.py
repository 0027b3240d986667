"""The catalog's contract, on SQLite and on a real PostgreSQL, and what only a cluster needs.

The contract tests run once per backend through the `catalog` fixture. The PostgreSQL
tests below them use two catalogs (two nodes) on one database, restart the server under
queued writes, and start against nothing. Times passed to the catalog are made up: the
catalog never reads a clock of its own, so leases expire when the test says so.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import pytest
from postgres import fresh_database

from mediaserver.catalog import OutboxItem, SqliteCatalog
from mediaserver.catalog.postgres import MIGRATIONS, PostgresCatalog
from mediaserver.errors import ConfigError, Unavailable
from mediaserver.tools.ports import free_port

APP = "app-1"


@pytest.fixture(params=["sqlite", "postgres"])
async def catalog(request, tmp_path):
    """A fresh, started catalog of each backend (a new database per test on PostgreSQL)."""
    if request.param == "sqlite":
        store = SqliteCatalog(tmp_path / "catalog.sqlite3")
    else:
        store = PostgresCatalog(fresh_database(request.getfixturevalue("postgres_server")), "node-a")
    await store.start()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
def pg_dsn(postgres_server):  # noqa: F811 - the fixture imported above
    return fresh_database(postgres_server)


def recording_values(rid: str, session_uuid: str = "s-1", created_at: float = 100.0, **extra):
    values = {
        "id": rid, "session_uuid": session_uuid, "app_id": APP, "state": "pending", "format": "wav",
        "sample_rate": 8000, "channels": 2, "bitrate": None, "options": {"format": "wav", "channels": 2},
        "content_type": "audio/wav", "storage_key": f"recordings/{APP}/{rid}.wav", "spool_path": f"/spool/{rid}",
        "created_at": created_at, "command_uid": None, "legs": {},
    }
    return {**values, **extra}


# -- the contract, on both backends -------------------------------------------------------

async def test_session_round_trip_with_meta_and_node(catalog):
    catalog.create_session("s-1", APP, "sip", 100.5, {"from": "alice", "tags": [1, 2]}, node_id="node-a")
    catalog.create_session("s-2", APP, "ws", 101.0)
    row = await catalog.session("s-1")
    assert row == {"uuid": "s-1", "app_id": APP, "source": "sip", "state": "active", "created_at": 100.5,
                   "ended_at": None, "meta": {"from": "alice", "tags": [1, 2]}, "node_id": "node-a"}
    assert (await catalog.session("s-2"))["meta"] == {}
    assert (await catalog.session("s-2"))["node_id"] is None
    assert await catalog.session("nope") is None

    catalog.update_session("s-1", state="ended", ended_at=130.25)
    assert {r["uuid"] for r in await catalog.active_sessions()} == {"s-2"}
    row = await catalog.session("s-1")
    assert (row["state"], row["ended_at"]) == ("ended", 130.25)


async def test_sessions_filter_paginate_and_count(catalog):
    for i in range(7):
        catalog.create_session(f"s-{i}", APP, "sip", 100.0 + i)
    catalog.create_session("other", "app-2", "sip", 200.0)
    for i in (1, 3):
        catalog.update_session(f"s-{i}", state="ended", ended_at=150.0)

    rows, total = await catalog.sessions(APP, None, 3, 0)
    assert total == 7
    assert [r["uuid"] for r in rows] == ["s-6", "s-5", "s-4"]
    rows, total = await catalog.sessions(APP, None, 3, 6)
    assert ([r["uuid"] for r in rows], total) == (["s-0"], 7)
    rows, total = await catalog.sessions(APP, "ended", 10, 0)
    assert ([r["uuid"] for r in rows], total) == (["s-3", "s-1"], 2)
    rows, total = await catalog.sessions(APP, None, 5, 50)
    assert (rows, total) == ([], 7)


async def test_legs_round_trip_with_stats(catalog):
    catalog.create_session("s-1", APP, "sip", 100.0)
    catalog.add_leg("leg-b", "s-1", "callee", "rtp", 101.0)
    catalog.add_leg("leg-a", "s-1", "caller", "rtp", 100.0)
    catalog.add_leg("leg-x", "s-other", "caller", "ws", 100.0)
    catalog.update_leg("leg-a", ended_at=120.0, stats={"packets": 1000, "lost": 2, "jitter_ms": 1.5})

    legs = await catalog.legs("s-1")
    assert [leg["leg_id"] for leg in legs] == ["leg-a", "leg-b"]
    assert legs[0] == {"leg_id": "leg-a", "session_uuid": "s-1", "role": "caller", "kind": "rtp", "created_at": 100.0,
                       "ended_at": 120.0, "stats": {"packets": 1000, "lost": 2, "jitter_ms": 1.5}}
    assert legs[1]["stats"] == {} and legs[1]["ended_at"] is None
    assert await catalog.legs("none") == []


async def test_recording_round_trip_with_json_columns(catalog):
    catalog.create_recording(**recording_values("r-1"))
    row = await catalog.recording("r-1")
    assert row["options"] == {"format": "wav", "channels": 2}
    assert (row["legs"], row["sample_rate"], row["bitrate"], row["duration"]) == ({}, 8000, None, None)

    legs = {"caller": {"frames": 500, "gaps": [[1.0, 1.5]]}}
    catalog.update_recording("r-1", state="completed", duration=12.5, file_size=200_044, sha256="ab" * 32,
                             completed_at=130.0, expires_at=1000.0, legs=legs, spool_path=None,
                             termination_reason="stopped")
    row = await catalog.recording("r-1")
    assert (row["state"], row["duration"], row["file_size"], row["legs"]) == ("completed", 12.5, 200_044, legs)
    assert (row["spool_path"], row["termination_reason"], row["expires_at"]) == (None, "stopped", 1000.0)
    assert await catalog.recording("nope") is None


async def test_recordings_filter_paginate_and_count(catalog):
    for i in range(6):
        catalog.create_recording(**recording_values(f"r-{i}", session_uuid="s-1" if i < 4 else "s-2",
                                                    created_at=100.0 + i))
    catalog.create_recording(**recording_values("r-other", created_at=104.5, app_id="app-2"))
    catalog.update_recording("r-2", state="completed")
    catalog.update_recording("r-5", state="completed")

    rows, total = await catalog.recordings(APP, limit=2)
    assert ([r["id"] for r in rows], total) == (["r-5", "r-4"], 6)
    rows, total = await catalog.recordings(APP, limit=2, offset=4)
    assert ([r["id"] for r in rows], total) == (["r-1", "r-0"], 6)
    rows, total = await catalog.recordings(APP, session_uuid="s-1")
    assert ([r["id"] for r in rows], total) == (["r-3", "r-2", "r-1", "r-0"], 4)
    rows, total = await catalog.recordings(APP, since=101.0, until=104.0)
    assert ([r["id"] for r in rows], total) == (["r-3", "r-2", "r-1"], 3)
    rows, total = await catalog.recordings(APP, state="completed", session_uuid="s-2")
    assert ([r["id"] for r in rows], total) == (["r-5"], 1)
    assert await catalog.recordings("app-none") == ([], 0)

    assert [r["id"] for r in await catalog.recordings_in(["completed"])] == ["r-2", "r-5"]
    assert [r["id"] for r in await catalog.recordings_in(("pending", "nothing"))] == ["r-0", "r-1", "r-3", "r-4", "r-other"]
    assert await catalog.count_recordings_by_state() == {"pending": 5, "completed": 2}


async def test_expired_recordings(catalog):
    catalog.create_recording(**recording_values("r-old", state="completed", expires_at=500.0))
    catalog.create_recording(**recording_values("r-new", state="completed", expires_at=2000.0))
    catalog.create_recording(**recording_values("r-kept", state="completed", expires_at=None))
    catalog.create_recording(**recording_values("r-live", state="recording", expires_at=500.0))
    assert [r["id"] for r in await catalog.expired_recordings(1000.0)] == ["r-old"]
    assert {r["id"] for r in await catalog.expired_recordings(3000.0)} == {"r-old", "r-new"}
    assert len(await catalog.expired_recordings(3000.0, limit=1)) == 1


async def test_commands_round_trip(catalog):
    assert await catalog.command("s-1", "uid-1") is None
    catalog.put_command("s-1", "uid-1", "record/start", 201, {"recording_id": "r-1", "nested": {"a": [1]}}, 100.0)
    row = await catalog.command("s-1", "uid-1")
    assert row == {"session_uuid": "s-1", "command_uid": "uid-1", "command": "record/start", "status": 201,
                   "response": {"recording_id": "r-1", "nested": {"a": [1]}}, "created_at": 100.0}
    assert await catalog.command("s-2", "uid-1") is None


async def test_outbox_lifecycle(catalog):
    assert (await catalog.next_due_at(), await catalog.outbox_backlog()) == (None, 0)
    for i, at in enumerate((103.0, 101.0, 102.0)):
        catalog.enqueue(f"ev-{i}", APP, "http://127.0.0.1:9/hook", "recording.completed", b'{"n":%d}' % i, at,
                        signed=i != 2)
    catalog.enqueue("ev-other", "app-2", "http://127.0.0.1:9/other", "session.ended", b"\x00\xffraw", 104.0)
    assert await catalog.outbox_backlog() == 4
    assert await catalog.next_due_at() == 101.0

    due = await catalog.due(102.5)
    assert [item.event_id for item in due] == ["ev-1", "ev-2"]
    assert due[0] == OutboxItem(due[0].seq, "ev-1", APP, "http://127.0.0.1:9/hook", "recording.completed",
                                b'{"n":1}', True, 101.0, 0)
    assert due[1].signed is False

    first, second = due
    catalog.delivered(first.seq, 110.0)
    catalog.retry_later(second.seq, 200.0, "HTTP 503")
    later = await catalog.due(150.0)
    assert [item.event_id for item in later] == ["ev-0", "ev-other"]
    assert later[1].body == b"\x00\xffraw"
    catalog.abandon(later[1].seq, 150.0, "too old")
    catalog.delivered(later[0].seq, 150.0)

    assert await catalog.outbox_backlog() == 1
    assert await catalog.next_due_at() == 200.0
    assert await catalog.due(199.0) == []
    retried = await catalog.due(200.0)
    assert [(item.event_id, item.attempts) for item in retried] == [("ev-2", 1)]

    items = {row["event_id"]: row for row in await catalog.outbox_items()}
    assert set(items) == {"ev-0", "ev-1", "ev-2", "ev-other"}
    assert (items["ev-1"]["delivered_at"], items["ev-1"]["attempts"], items["ev-1"]["last_error"]) == (110.0, 1, None)
    assert (items["ev-2"]["last_error"], items["ev-2"]["next_attempt_at"]) == ("HTTP 503", 200.0)
    assert (items["ev-other"]["abandoned_at"], items["ev-other"]["last_error"]) == (150.0, "too old")
    assert items["ev-other"]["body"] == b"\x00\xffraw"
    assert [row["event_id"] for row in await catalog.outbox_items("app-2")] == ["ev-other"]


async def test_due_honours_limit_in_order(catalog):
    for i in range(5):
        catalog.enqueue(f"ev-{i}", APP, "http://127.0.0.1:9/", "k", b"{}", 100.0 + i)
    assert [item.event_id for item in await catalog.due(1000.0, limit=3)] == ["ev-0", "ev-1", "ev-2"]


async def test_nodes_heartbeat(catalog):
    assert await catalog.nodes() == []
    catalog.heartbeat("node-b", "http://127.0.0.1:8081", 100.0)
    catalog.heartbeat("node-a", "http://127.0.0.1:8080", 101.0)
    catalog.heartbeat("node-b", "http://127.0.0.1:9091", 105.0)
    assert await catalog.nodes() == [
        {"node_id": "node-a", "node_url": "http://127.0.0.1:8080", "started_at": 101.0, "heartbeat_at": 101.0},
        {"node_id": "node-b", "node_url": "http://127.0.0.1:9091", "started_at": 100.0, "heartbeat_at": 105.0},
    ]


async def test_sessions_and_recordings_by_node(catalog):
    catalog.create_session("s-a", APP, "sip", 100.0, node_id="node-a")
    catalog.create_session("s-b", APP, "sip", 101.0, node_id="node-b")
    catalog.create_session("s-b2", APP, "ws", 102.0, node_id="node-b")
    catalog.create_session("s-gone", APP, "sip", 90.0, node_id="node-b")
    catalog.update_session("s-gone", state="ended", ended_at=95.0)
    for rid, session_uuid in (("r-a", "s-a"), ("r-b", "s-b"), ("r-b2", "s-b2")):
        catalog.create_recording(**recording_values(rid, session_uuid=session_uuid, state="recording"))
    assert {r["uuid"] for r in await catalog.active_sessions("node-b")} == {"s-b", "s-b2"}
    assert [r["id"] for r in await catalog.recordings_in(["recording"], node_id="node-a")] == ["r-a"]

    moved = await catalog.claim_sessions("node-b", "node-a")
    assert {(r["uuid"], r["node_id"]) for r in moved} == {("s-b", "node-a"), ("s-b2", "node-a")}
    assert await catalog.claim_sessions("node-b", "node-c") == []
    assert await catalog.active_sessions("node-b") == []
    assert (await catalog.session("s-gone"))["node_id"] == "node-b"
    assert {r["id"] for r in await catalog.recordings_in(["recording"], node_id="node-a")} == {"r-a", "r-b", "r-b2"}


async def test_node_lookup(catalog):
    assert await catalog.node("node-a") is None
    catalog.heartbeat("node-a", "http://127.0.0.1:8080", 101.0)
    assert await catalog.node("node-a") == {"node_id": "node-a", "node_url": "http://127.0.0.1:8080",
                                            "started_at": 101.0, "heartbeat_at": 101.0}


async def test_reads_see_the_writes_before_them(catalog):
    catalog.create_session("s-1", APP, "sip", 100.0)
    for i in range(50):
        catalog.update_session("s-1", meta={"step": i})
        catalog.put_command("s-1", f"uid-{i}", "record/start", 200, {"i": i}, 100.0 + i)
        assert (await catalog.session("s-1"))["meta"] == {"step": i}
        assert (await catalog.command("s-1", f"uid-{i}"))["response"] == {"i": i}
    await catalog.flush(timeout=10)
    assert catalog.writes_pending == 0


async def test_single_node_leads(catalog):
    assert await catalog.try_lead("retention") is True
    assert await catalog.try_lead("retention") is True


# -- PostgreSQL: several nodes on one database ------------------------------------------

async def started(*catalogs: PostgresCatalog) -> None:
    await asyncio.gather(*(c.start() for c in catalogs))


async def closed(*catalogs: PostgresCatalog) -> None:
    for c in catalogs:
        await c.close()


async def test_two_nodes_never_claim_the_same_event(pg_dsn):
    a, b = PostgresCatalog(pg_dsn, "node-a"), PostgresCatalog(pg_dsn, "node-b")
    await started(a, b)
    try:
        for i in range(300):
            a.enqueue(f"ev-{i}", APP, "http://127.0.0.1:9/", "k", b"{}", 100.0 + i % 7)
        await a.flush(timeout=30)
        got: dict[str, list[int]] = {"node-a": [], "node-b": []}

        async def drain(node: PostgresCatalog) -> None:
            for _ in range(2000):  # bounded: 300 events in batches of at most 5, and waits
                items = await node.due(1000.0, limit=5)
                if not items and await node.outbox_backlog() == 0:
                    return
                for item in items:
                    got[node.node_id].append(item.seq)
                    node.delivered(item.seq, 1000.0)
                await asyncio.sleep(0 if items else 0.01)  # the rest may be the other node's
            raise AssertionError("the outbox did not drain")

        await asyncio.gather(drain(a), drain(b))
        claimed = got["node-a"] + got["node-b"]
        assert len(claimed) == len(set(claimed)) == 300
        items = await b.outbox_items()
        assert all(row["attempts"] == 1 and row["delivered_at"] == 1000.0 for row in items)
    finally:
        await closed(a, b)


async def test_a_dead_nodes_claims_return_after_the_lease(pg_dsn):
    a = PostgresCatalog(pg_dsn, "node-a", lease_s=30.0)
    b = PostgresCatalog(pg_dsn, "node-b", lease_s=30.0)
    await started(a, b)
    try:
        a.enqueue("ev-1", APP, "http://127.0.0.1:9/", "k", b"{}", 100.0)
        a.enqueue("ev-2", APP, "http://127.0.0.1:9/", "k", b"{}", 100.0)
        assert [item.event_id for item in await a.due(100.0)] == ["ev-1", "ev-2"]
        assert await b.due(120.0) == []  # a's lease lasts until 130
        assert await a.due(120.0) == []  # nor does a get them twice
        assert await b.next_due_at() == 130.0
        await a.close()  # died without settling them

        taken = await b.due(131.0)
        assert [item.event_id for item in taken] == ["ev-1", "ev-2"]
        b.delivered(taken[0].seq, 131.0)
        b.retry_later(taken[1].seq, 140.0, "HTTP 500")
        assert await b.outbox_backlog() == 1
        assert [(i.event_id, i.attempts) for i in await b.due(140.0)] == [("ev-2", 1)]
    finally:
        await closed(a, b)


async def test_two_survivors_never_claim_the_same_sessions(pg_dsn):
    a, b = PostgresCatalog(pg_dsn, "node-a"), PostgresCatalog(pg_dsn, "node-b")
    await started(a, b)
    try:
        for i in range(50):
            a.create_session(f"s-{i}", APP, "sip", 100.0 + i, node_id="node-dead")
        await a.flush(timeout=10)
        got_a, got_b = await asyncio.gather(a.claim_sessions("node-dead", "node-a"),
                                            b.claim_sessions("node-dead", "node-b"))
        assert sorted(len(rows) for rows in (got_a, got_b)) == [0, 50]
    finally:
        await closed(a, b)


async def test_a_late_retry_does_not_undo_another_nodes_claim(pg_dsn):
    a = PostgresCatalog(pg_dsn, "node-a", lease_s=10.0)
    b = PostgresCatalog(pg_dsn, "node-b", lease_s=10.0)
    await started(a, b)
    try:
        a.enqueue("ev-1", APP, "http://127.0.0.1:9/", "k", b"{}", 100.0)
        (item,) = await a.due(100.0)
        (again,) = await b.due(111.0)  # a's lease ran out while its attempt hung
        # Each node's writes are ordered; across nodes only a flush orders them.
        a.retry_later(item.seq, 112.0, "timed out")
        await a.flush(timeout=10)
        assert await a.due(112.0) == []  # still b's
        b.delivered(again.seq, 112.0)
        await b.flush(timeout=10)
        a.delivered(item.seq, 113.0)  # both delivered: counted once
        (row,) = await a.outbox_items()
        assert (row["delivered_at"], row["attempts"], row["last_error"]) == (112.0, 1, None)
    finally:
        await closed(a, b)


async def test_exactly_one_node_leads_and_the_lead_moves_when_it_goes(pg_dsn):
    a, b = PostgresCatalog(pg_dsn, "node-a"), PostgresCatalog(pg_dsn, "node-b")
    await started(a, b)
    try:
        first = await asyncio.gather(a.try_lead("retention"), b.try_lead("retention"))
        assert sorted(first) == [False, True]
        leader, other = (a, b) if first[0] else (b, a)
        assert await leader.try_lead("retention") is True
        assert await other.try_lead("retention") is False
        assert await other.try_lead("another job") is True  # a lock per job name

        await leader.close()
        for _ in range(200):  # the server ends the closed session's locks a moment later
            if await other.try_lead("retention"):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the lead did not move to the surviving node")
        assert await leader.try_lead("retention") is False  # closed: never leads
    finally:
        await closed(a, b)


async def test_the_lead_is_taken_again_after_postgres_restarts(postgres_own_server):  # noqa: F811
    catalog = PostgresCatalog(fresh_database(postgres_own_server), "node-a", read_timeout_s=2.0)
    await catalog.start()
    try:
        assert await catalog.try_lead("retention") is True
        await asyncio.to_thread(postgres_own_server.restart)
        assert await catalog.try_lead("retention") is True
        holders = postgres_own_server.psql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")
        assert holders.strip() == "1"
    finally:
        await catalog.close()


# -- PostgreSQL: outages ------------------------------------------------------------------

async def test_writes_queued_through_a_restart_are_all_applied_once_and_in_order(postgres_own_server, caplog):  # noqa: F811
    catalog = PostgresCatalog(fresh_database(postgres_own_server), "node-a", read_timeout_s=30.0)
    await catalog.start()
    try:
        catalog.enqueue("ev-1", APP, "http://127.0.0.1:9/", "k", b"{}", 100.0)
        catalog.create_session("s-1", APP, "sip", 100.0)
        await catalog.flush(timeout=10)
        (item,) = await catalog.due(100.0)
        caplog.set_level(logging.WARNING, logger="mediaserver.catalog.postgres")
        step = 0

        def write() -> None:
            # retry_later adds one to attempts: a write applied twice would show in the count.
            nonlocal step
            step += 1
            catalog.retry_later(item.seq, 100.0 + step, f"attempt {step}")
            catalog.update_session("s-1", meta={"step": step})
            catalog.create_recording(**recording_values(f"r-{step}", created_at=100.0 + step))

        for _ in range(300):
            write()
        postgres_own_server.restart()  # the loop is held: all 900 writes wait for the writer
        assert catalog.writes_pending == 900
        await catalog.flush(timeout=60)

        restart = asyncio.create_task(asyncio.to_thread(postgres_own_server.restart))
        for _ in range(5000):  # the writer is busy when the server goes down and comes back
            if restart.done():
                break
            for _ in range(5):
                write()
            await asyncio.sleep(0.002)
        await restart
        for _ in range(50):
            write()
        await catalog.flush(timeout=60)

        (row,) = await catalog.outbox_items()
        assert (row["attempts"], row["next_attempt_at"], row["last_error"]) == (step, 100.0 + step, f"attempt {step}")
        assert (await catalog.session("s-1"))["meta"] == {"step": step}
        assert (await catalog.recordings(APP, limit=1))[1] == step
        warnings = [r for r in caplog.records if "cannot write to PostgreSQL" in r.getMessage()]
        assert 1 <= len(warnings) <= 2  # one per outage
    finally:
        await catalog.close()


async def test_reads_during_an_outage_are_unavailable_and_writes_wait(postgres_own_server, caplog):  # noqa: F811
    catalog = PostgresCatalog(fresh_database(postgres_own_server), "node-a", read_timeout_s=0.5)
    await catalog.start()
    try:
        catalog.create_session("s-1", APP, "sip", 100.0)
        await catalog.flush(timeout=10)
        assert (await catalog.session("s-1"))["state"] == "active"
        caplog.set_level(logging.WARNING, logger="mediaserver.catalog.postgres")
        postgres_own_server.stop()

        with pytest.raises(Unavailable) as nothing_queued:
            await catalog.recordings(APP)
        assert nothing_queued.value.code == "catalog.unavailable"
        catalog.update_session("s-1", state="ended", ended_at=120.0)
        catalog.heartbeat("node-a", "http://127.0.0.1:8080", 120.0)
        with pytest.raises(Unavailable):
            await catalog.session("s-1")
        with pytest.raises(TimeoutError):
            await catalog.flush(timeout=0.3)
        assert catalog.writes_pending == 2
        warnings = [r for r in caplog.records if "cannot write to PostgreSQL" in r.getMessage()]
        assert len(warnings) == 1 and postgres_own_server.host in warnings[0].getMessage()

        postgres_own_server.start()
        await catalog.flush(timeout=30)
        assert (await catalog.session("s-1"))["state"] == "ended"
        assert [n["node_id"] for n in await catalog.nodes()] == ["node-a"]
    finally:
        await catalog.close()


async def test_a_refused_write_is_dropped_and_the_rest_go_on(pg_dsn, caplog):
    catalog = PostgresCatalog(pg_dsn, "node-a")
    await catalog.start()
    try:
        catalog.create_session("s-1", APP, "sip", 100.0)
        catalog.update_session("s-1", ended_at="not a number")
        catalog.update_session("s-1", state="ended")
        assert (await catalog.session("s-1"))["state"] == "ended"
        assert any("refused and dropped" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
        with pytest.raises(ValueError, match="no column"):
            catalog.update_session("s-1", colour="blue")
    finally:
        await catalog.close()


# -- PostgreSQL: schema and start ----------------------------------------------------------

async def schema_versions(dsn: str) -> list[int]:
    conn = await asyncpg.connect(dsn)
    try:
        return [row[0] for row in await conn.fetch("SELECT version FROM schema_version ORDER BY version")]
    finally:
        await conn.close()


async def test_start_twice_on_one_database(pg_dsn):
    for i in range(2):
        catalog = PostgresCatalog(pg_dsn, "node-a")
        await catalog.start()
        catalog.create_session(f"s-{i}", APP, "sip", 100.0)
        await catalog.close()
    assert await schema_versions(pg_dsn) == list(range(1, len(MIGRATIONS) + 1))
    catalog = PostgresCatalog(pg_dsn, "node-a")
    await catalog.start()
    try:
        assert (await catalog.sessions(APP, None, 10, 0))[1] == 2
    finally:
        await catalog.close()


async def test_nodes_starting_together_migrate_once(pg_dsn):
    nodes = [PostgresCatalog(pg_dsn, f"node-{i}") for i in range(4)]
    try:
        await started(*nodes)
    finally:
        await closed(*nodes)
    assert await schema_versions(pg_dsn) == list(range(1, len(MIGRATIONS) + 1))


async def test_start_without_a_server_names_host_and_port():
    port = free_port()
    catalog = PostgresCatalog(f"postgresql://mediaserver:s3cr3t-pw@127.0.0.1:{port}/catalog", "node-a")
    with pytest.raises(ConfigError) as error:
        await catalog.start()
    message = str(error.value)
    assert f"127.0.0.1:{port}" in message and "postgres_dsn" in message
    assert "s3cr3t-pw" not in message
    await catalog.close()


async def test_start_on_a_missing_database_is_a_config_error(postgres_server):  # noqa: F811
    catalog = PostgresCatalog(postgres_server.dsn_for("no_such_database"), "node-a")
    with pytest.raises(ConfigError, match="no_such_database"):
        await catalog.start()
    await catalog.close()
