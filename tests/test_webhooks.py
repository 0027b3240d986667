"""Webhooks: signed, retried with backoff, durable across restarts, Record-verb action URLs."""

import asyncio
import random

import pytest

from mediaserver.webhooks import sign, verify
from mediaserver.webhooks.outbox import backoff
from servers import APP1, APP2, Server, free_port
from webhook_receiver import Receiver

pytestmark = pytest.mark.timeout(60)
SECRETS = {"app1": APP1["webhook_secret"], "app2": APP2["webhook_secret"]}


def test_signature_format_and_verification():
    body = b'{"event_kind":"x"}'
    header = sign("s3cret", body, 1700000000)
    assert header.startswith("t=1700000000,v1=") and len(header.split("v1=")[1]) == 64
    assert verify("s3cret", body, header, 1700000100)
    assert not verify("other", body, header, 1700000100)
    assert not verify("s3cret", body + b" ", header, 1700000100)
    assert not verify("s3cret", body, header, 1700009999)  # too old
    assert not verify("s3cret", body, "garbage", 1700000100)


def test_backoff_doubles_with_jitter_and_is_capped():
    rng = random.Random(4).random
    delays = [backoff(n, rng) for n in range(1, 16)]
    assert 0.5 <= delays[0] <= 1.5 and 1.0 <= delays[1] <= 3.0 and 2.0 <= delays[2] <= 6.0
    assert max(delays) <= 900
    assert len({round(d, 6) for d in delays}) == len(delays)


async def run_call(server, **options) -> str:
    session = await server.create_session()
    status, answer = await server.command(session["uuid"], "start", command_uid="go", **options)
    assert status == 202
    await asyncio.sleep(0.2)
    await server.api("DELETE", f"/api/v1/sessions/{session['uuid']}")
    await server.wait_recording(answer["recording_id"])
    return answer["recording_id"]


async def test_every_event_kind_arrives_signed(tmp_path):
    async with Receiver(SECRETS) as rx, Server(tmp_path, webhook_url=rx.url) as server:
        rid = await run_call(server)
        await rx.wait_for("session.ended")
        await rx.wait_for("recording.completed")
        kinds = [e["event_kind"] for e in rx.events]
        for kind in ("session.started", "command.result", "recording.started", "recording.stopped", "recording.completed", "session.ended"):
            assert kind in kinds
        assert rx.bad_signatures == 0
        result = rx.of_kind("command.result")[0]["payload"]
        assert result == {"session_uuid": result["session_uuid"], "command": "record/start", "command_uid": "go",
                          "status": "accepted", "recording_id": rid}
        stopped = rx.of_kind("recording.stopped")[0]["payload"]
        assert stopped["termination_reason"] == "hangup"
        event = rx.of_kind("recording.completed")[0]
        assert set(event) >= {"event_kind", "event_id", "occurred_at", "app_id", "payload"}
        assert event["app_id"] == "app1"


async def test_undelivered_events_survive_a_restart_and_keep_their_id(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}/hook"
    async with Server(tmp_path, webhook_url=url) as server:
        await run_call(server)
        await asyncio.sleep(0.5)  # the receiver is down: attempts fail
        pending = [row for row in (await server.engine.catalog.outbox_items()) if row["delivered_at"] is None]
        assert pending and all(row["attempts"] >= 1 for row in pending if row["kind"] == "session.started")
        ids = {row["event_id"] for row in pending}
    # The receiver comes up on that port; the server restarts on the same data.
    async with Receiver(SECRETS, port=port) as receiver, Server(tmp_path, webhook_url=url) as server:
        for _ in range(200):
            if ids <= {e["event_id"] for e in receiver.events}:
                break
            await asyncio.sleep(0.05)
        assert ids <= {e["event_id"] for e in receiver.events}
        assert (await server.engine.catalog.outbox_backlog()) == 0


async def test_retries_back_off_then_deliver(tmp_path):
    async with Receiver(SECRETS, fail_first=2) as rx, Server(tmp_path, webhook_url=rx.url) as server:
        await server.create_session()
        started = (await rx.wait_for("session.started", timeout=15))[0]
        assert rx.attempts[started["event_id"]] == 3
        row = next(r for r in (await server.engine.catalog.outbox_items()) if r["event_id"] == started["event_id"])
        assert row["attempts"] == 3 and row["delivered_at"] is not None
        assert row["delivered_at"] - row["created_at"] >= 1.0  # two backoffs: ≥ 0.5 s + ≥ 1 s


async def test_events_older_than_the_maximum_age_are_abandoned(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/hook"
    async with Server(tmp_path, webhook_url=url, webhook_max_age_h=0.0002) as server:
        await server.create_session()
        for _ in range(100):
            rows = (await server.engine.catalog.outbox_items())
            if rows and all(row["abandoned_at"] for row in rows):
                break
            await asyncio.sleep(0.1)
        assert rows and all(row["abandoned_at"] for row in rows)
        assert (await server.engine.catalog.outbox_backlog()) == 0


async def test_action_url_gets_record_verb_fields(tmp_path):
    async with Receiver(SECRETS) as rx, Server(tmp_path) as server:
        rid = await run_call(server, action_url=rx.action_url)
        event = (await rx.wait_for("recording.completed", path="/action"))[0]
        assert event["RecordingSid"] == rid
        assert event["RecordingUrl"].endswith(f"/api/v1/recordings/{rid}/download")
        assert isinstance(event["RecordingDuration"], int)
        assert event["CallId"] == event["payload"]["session_uuid"]
        assert event["payload"]["recording_id"] == rid
