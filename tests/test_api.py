"""The HTTP API against a real server: every status code of the contract, auth, tenancy,
idempotency, cooldown, concurrency, signed files, retention, aliases, OpenAPI, metrics."""

import asyncio
import io
import json
import re

import aiohttp
import pytest

from mediaserver.api.common import refusal_response, refusal_status
from mediaserver.api.keys import CATALOG, STORAGE
from mediaserver.errors import (Conflict, Forbidden, Gone, Invalid, NotFound, NotSupported, RateLimited, Refused,
                                Unacceptable, Unavailable, UnsupportedMedia)
from servers import APP1, APP2, Server, SteppedClock

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def server(tmp_path):
    async with Server(tmp_path) as srv:
        yield srv


async def recorded(server, seconds: float = 0.3, **options) -> dict:
    """A completed recording of a session without legs (silence, in real time)."""
    session = await server.create_session()
    status, answer = await server.command(session["uuid"], "start", **options)
    assert status == 202, answer
    await asyncio.sleep(seconds)
    status, _ = await server.command(session["uuid"], "stop")
    assert status == 202
    return await server.wait_recording(answer["recording_id"])


def error_code(data) -> str:
    return data["error"]["code"]


async def test_credentials_are_required_and_checked(server):
    for headers in ({}, {"X-App-ID": "app1", "X-API-Key": "wrong"}, {"X-App-ID": "app2", "X-API-Key": APP1["key"]},
                    {"X-App-ID": "app1"}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer nope"}):
        async with server.http.get("/api/v1/sessions", headers=headers) as response:
            assert response.status == 401, headers
            assert error_code(await response.json()) == "auth.unauthorized"
    async with server.http.get("/api/v1/sessions", headers={"Authorization": f"Bearer {APP1['key']}"}) as response:
        assert response.status == 200


async def test_session_lifecycle(server):
    session = await server.create_session(metadata={"call": "x"})
    uuid = session["uuid"]
    assert session["state"] == "active" and session["metadata"] == {"call": "x"}
    assert set(session["ingest"]["wavstream"]) == {"caller", "callee"}
    status, data, _ = await server.api("GET", f"/api/v1/sessions/{uuid}")
    assert status == 200 and data["uuid"] == uuid
    status, data, _ = await server.api("GET", "/api/v1/sessions")
    assert status == 200 and data["pagination"]["total"] == 1
    status, data, _ = await server.api("DELETE", f"/api/v1/sessions/{uuid}")
    assert status == 202
    for _ in range(100):
        status, data, _ = await server.api("GET", f"/api/v1/sessions/{uuid}")
        if data["state"] == "ended":
            break
        await asyncio.sleep(0.05)
    assert data["state"] == "ended"
    status, data, _ = await server.api("DELETE", f"/api/v1/sessions/{uuid}")
    assert (status, error_code(data)) == (409, "sessions.ended")
    status, data, _ = await server.api("POST", "/api/v1/sessions", json={"uuid": uuid})
    assert (status, error_code(data)) == (409, "sessions.exists")


async def test_another_apps_resources_are_forbidden(server):
    rec = await recorded(server)
    uuid = rec["session_uuid"]
    for method, path in (("GET", f"/api/v1/sessions/{uuid}"), ("DELETE", f"/api/v1/sessions/{uuid}"),
                         ("POST", f"/api/v1/sessions/{uuid}/commands/record/start"),
                         ("GET", f"/api/v1/recordings/{rec['recording_id']}"),
                         ("GET", f"/api/v1/recordings/{rec['recording_id']}/download"),
                         ("DELETE", f"/api/v1/recordings/{rec['recording_id']}"),
                         ("GET", f"/v1/calls/{uuid}/recording")):
        status, data, _ = await server.api(method, path, APP2)
        assert (status, error_code(data)) == (403, "auth.forbidden"), path
    status, data, _ = await server.api("GET", "/api/v1/recordings", APP2)
    assert data["data"] == []


async def test_unknown_things_are_404_with_the_envelope(server):
    for path in ("/api/v1/sessions/0b7f3c5e-0000-4000-8000-000000000000", "/api/v1/recordings/rec_nope",
                 "/api/v1/recordings/rec_nope/download", "/api/v1/nothing-here"):
        status, data, _ = await server.api("GET", path)
        assert status == 404 and "code" in data["error"], path
    status, data, _ = await server.api("POST", "/api/v1/sessions/0b7f3c5e-0000-4000-8000-000000000000/commands/record/start")
    assert (status, error_code(data)) == (404, "sessions.not_found")


@pytest.mark.parametrize("body, code", [
    ({"command_uid": "x" * 129}, "commands.invalid_command_uid"),
    ({"command_uid": "has space"}, "commands.invalid_command_uid"),
    ({"command_uid": 12}, "commands.invalid_command_uid"),
    ({"format": "flac"}, "recordings.invalid_option"),
    ({"channels": 3}, "recordings.invalid_option"),
    ({"format": "wav", "bitrate": 32}, "recordings.invalid_option"),
    ({"sample_rate": 44100}, "recordings.invalid_option"),
    ({"finish_on_key": "#x"}, "recordings.invalid_option"),
    ({"max_length": -1}, "recordings.invalid_option"),
    ({"silence_timeout": "3"}, "recordings.invalid_option"),
    ({"colour": "blue"}, "recordings.invalid_option"),
    ({"action_url": "ftp://x"}, "recordings.invalid_option"),
    ({"transcribe": True}, "recordings.unsupported_option"),
])
async def test_bad_record_start_is_400_and_records_nothing(server, body, code):
    session = await server.create_session()
    status, data = await server.command(session["uuid"], "start", **body)
    assert (status, error_code(data)) == (400, code)
    status, data, _ = await server.api("GET", f"/api/v1/recordings?session_id={session['uuid']}")
    assert data["data"] == []


async def test_malformed_json_and_oversized_bodies(server):
    session = await server.create_session()
    status, data, _ = await server.api("POST", f"/api/v1/sessions/{session['uuid']}/commands/record/start",
                                       data=b"{not json", headers={"Content-Type": "application/json"})
    assert (status, error_code(data)) == (400, "request.invalid_json")
    status, data, _ = await server.api("POST", "/api/v1/sessions", data=io.BytesIO(b"[" * (2 * 1024 * 1024)))
    assert (status, error_code(data)) == (413, "request.too_large")


async def test_commands_in_the_wrong_state_are_409(server):
    uuid = (await server.create_session())["uuid"]
    for kind in ("stop", "pause", "resume"):
        status, data = await server.command(uuid, kind)
        assert (status, error_code(data)) == (409, "recordings.not_active"), kind
    status, data = await server.command(uuid, "start")
    assert status == 202
    assert (await server.command(uuid, "start"))[1]["error"]["code"] == "recordings.already_active"
    assert (await server.command(uuid, "resume"))[1]["error"]["code"] == "recordings.not_paused"
    assert (await server.command(uuid, "pause"))[0] == 202
    assert (await server.command(uuid, "pause"))[1]["error"]["code"] == "recordings.already_paused"
    status, data = await server.command(uuid, "pause", behavior="loud")
    assert status == 400
    assert (await server.command(uuid, "resume"))[0] == 202
    assert (await server.command(uuid, "stop"))[0] == 202
    assert (await server.command(uuid, "stop"))[1]["error"]["code"] == "recordings.not_active"


async def test_the_same_command_uid_answers_the_same_and_acts_once(server):
    uuid = (await server.create_session())["uuid"]
    first = await server.command(uuid, "start", command_uid="cmd-1", format="mp3")
    again = await server.command(uuid, "start", command_uid="cmd-1", format="mp3")
    assert first == again and first[0] == 202
    status, data, _ = await server.api("GET", f"/api/v1/recordings?session_id={uuid}")
    assert data["pagination"]["total"] == 1
    generated = await server.command(uuid, "stop")
    assert re.fullmatch(r"[0-9a-f-]{36}", generated[1]["command_uid"])


async def test_a_refused_command_sent_again_is_refused_the_same(server):
    uuid = (await server.create_session())["uuid"]
    first = await server.command(uuid, "stop", command_uid="early-stop")
    assert (first[0], error_code(first[1])) == (409, "recordings.not_active")
    assert (await server.command(uuid, "start"))[0] == 202
    again = await server.command(uuid, "stop", command_uid="early-stop")  # a recording is active now
    assert again == first
    status, data, _ = await server.api("GET", f"/api/v1/sessions/{uuid}")
    assert data["recording_id"] is not None


async def test_command_answers_stored_by_an_earlier_version_are_answered_the_same(server):
    uuid = (await server.create_session())["uuid"]
    catalog = server.app[CATALOG]
    accepted = {"command_uid": "old-start", "status": "accepted", "recording_id": "rec_earlier"}
    refused = {"error": {"code": "recordings.not_active", "message": "no recording is active in this session to stop"}}
    catalog.put_command(uuid, "old-start", "record/start", 202, accepted, 0.0)
    catalog.put_command(uuid, "old-stop", "record/stop", 409, refused, 0.0)
    assert await server.command(uuid, "start", command_uid="old-start") == (202, accepted)
    assert await server.command(uuid, "stop", command_uid="old-stop") == (409, refused)
    status, data, _ = await server.api("GET", f"/api/v1/recordings?session_id={uuid}")
    assert data["pagination"]["total"] == 0


@pytest.mark.parametrize("kind, status", [
    (Invalid, 400), (Forbidden, 403), (NotFound, 404), (Unacceptable, 406), (Conflict, 409), (Gone, 410),
    (UnsupportedMedia, 415), (NotSupported, 501), (Unavailable, 503),
])
def test_each_kind_of_refusal_has_its_status_and_the_envelope(kind, status):
    response = refusal_response(kind("things.refused", "refused for a reason"))
    assert (response.status, response.content_type) == (status, "application/json")
    assert json.loads(response.text) == {"error": {"code": "things.refused", "message": "refused for a reason"}}
    assert "Retry-After" not in response.headers


def test_a_rate_limited_refusal_is_429_with_retry_after():
    response = refusal_response(RateLimited("commands.cooldown", "too soon", retry_after_s=3))
    assert (response.status, response.headers["Retry-After"]) == (429, "3")
    assert json.loads(response.text) == {"error": {"code": "commands.cooldown", "message": "too soon"}}


def test_a_refusal_answers_as_its_nearest_kind_and_one_of_no_kind_is_a_server_fault():
    class Expired(Gone):
        pass

    assert refusal_status(Expired("x.expired", "old")) == 410
    assert refusal_status(Refused("x.unknown", "no kind")) == 500


async def test_cooldown_is_429_with_retry_after(tmp_path):
    async with Server(tmp_path, command_cooldown_s=2) as server:
        uuid = (await server.create_session())["uuid"]
        assert (await server.command(uuid, "start", command_uid="a"))[0] == 202
        status, data, response = await server.api("POST", f"/api/v1/sessions/{uuid}/commands/record/stop", json={"command_uid": "b"})
        assert (status, error_code(data)) == (429, "commands.cooldown")
        assert 1 <= int(response.headers["Retry-After"]) <= 2
        assert (await server.command(uuid, "start", command_uid="a"))[0] == 202  # a replay is not throttled


async def test_the_cooldown_counts_down_on_the_server_clock(tmp_path):
    """Retry-After follows the server's clock: stepped over, the cooldown ends without a wait."""
    clock = SteppedClock()
    async with Server(tmp_path, clock=clock, command_cooldown_s=30) as server:
        uuid = (await server.create_session())["uuid"]
        assert (await server.command(uuid, "start", command_uid="a"))[0] == 202
        stop = f"/api/v1/sessions/{uuid}/commands/record/stop"
        status, _, response = await server.api("POST", stop, json={"command_uid": "b"})
        assert (status, response.headers["Retry-After"]) == (429, "30")
        clock.advance(29.5)
        status, _, response = await server.api("POST", stop, json={"command_uid": "b"})
        assert (status, response.headers["Retry-After"]) == (429, "1")
        clock.advance(1.0)
        assert (await server.command(uuid, "stop", command_uid="b"))[0] == 202


async def test_concurrent_starts_record_once(server):
    uuid = (await server.create_session())["uuid"]
    answers = await asyncio.gather(*(server.command(uuid, "start", command_uid=f"c{i}") for i in range(20)))
    assert sorted(status for status, _ in answers).count(202) == 1
    assert all(data["error"]["code"] == "recordings.already_active" for status, data in answers if status != 202)


async def test_racing_start_and_stop_never_crash_or_record_twice(server):
    uuid = (await server.create_session())["uuid"]
    for round_ in range(5):
        answers = await asyncio.gather(server.command(uuid, "start", command_uid=f"s{round_}"),
                                       server.command(uuid, "stop", command_uid=f"t{round_}"))
        assert {status for status, _ in answers} <= {202, 409}
    await server.command(uuid, "stop")
    status, data, _ = await server.api("GET", f"/api/v1/recordings?session_id={uuid}&limit=50")
    ids = [row["recording_id"] for row in data["data"]]
    assert len(ids) == len(set(ids)) <= 5
    for rid in ids:
        assert (await server.wait_recording(rid))["termination_reason"] in ("stop", "hangup")


async def test_download_is_202_while_pending_then_302_to_a_ranged_file(server):
    uuid = (await server.create_session())["uuid"]
    _, answer = await server.command(uuid, "start", format="wav")
    rid = answer["recording_id"]
    status, data, response = await server.api("GET", f"/api/v1/recordings/{rid}/download")
    assert status == 202 and data["status"] == "pending" and data["retry_after_seconds"] > 0
    await asyncio.sleep(0.5)
    await server.command(uuid, "stop")
    meta = await server.wait_recording(rid)
    status, _, response = await server.api("GET", f"/api/v1/recordings/{rid}/download")
    assert status == 302
    url = response.headers["Location"]
    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers={"Range": "bytes=0-43"}) as part:
            assert part.status == 206
            header = await part.read()
            assert header[:4] == b"RIFF" and len(header) == 44
        async with http.get(url) as whole:
            assert whole.status == 200 and len(await whole.read()) == meta["file_size"]
        tampered = url.replace("signature=", "signature=0")
        async with http.get(tampered) as refused:
            assert refused.status == 403
    status, data, _ = await server.api("GET", f"/api/v1/recordings/{rid}/stream")
    assert status == 200 and data["success"] is True
    assert data["data"]["expires_in"] == 3600 and data["data"]["content_type"] == "audio/wav"
    assert data["data"]["filename"].endswith(".wav")


async def test_expired_link_is_refused(server):
    rec = await recorded(server)
    url = await server.app[STORAGE].presign(await rec_key(server, rec), -1, "x.wav", "audio/wav")
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.status == 403


async def rec_key(server, rec) -> str:
    return (await server.engine.catalog.recording(rec["recording_id"]))["storage_key"]


async def test_delete_recording_then_410(server):
    rec = await recorded(server)
    rid = rec["recording_id"]
    status, _, response = await server.api("GET", f"/api/v1/recordings/{rid}/download")
    old_url = response.headers["Location"]
    status, data, _ = await server.api("DELETE", f"/api/v1/recordings/{rid}")
    assert status == 200 and data["recording_id"] == rid and data["deleted_at"]
    status, data, _ = await server.api("GET", f"/api/v1/recordings/{rid}/download")
    assert (status, error_code(data)) == (410, "recordings.deleted")
    async with aiohttp.ClientSession() as http, http.get(old_url) as response:
        assert response.status == 404
    status, data, _ = await server.api("DELETE", f"/api/v1/recordings/{rid}")
    assert status == 410


async def test_retention_expires_recordings(tmp_path):
    async with Server(tmp_path, recording_retention_hours=0.0002, retention_sweep_s=0.1) as server:
        rec = await recorded(server)
        expired = await server.wait_recording(rec["recording_id"], states=("expired",), timeout=10)
        assert expired["state"] == "expired"
        status, data, _ = await server.api("GET", f"/api/v1/recordings/{rec['recording_id']}/download")
        assert (status, error_code(data)) == (410, "recordings.expired")
        status, data, _ = await server.api("GET", f"/v1/calls/{rec['session_uuid']}/recording")
        assert status == 410


async def test_listing_filters_and_pages(server):
    first = await recorded(server, format="mp3")
    second = await recorded(server)
    status, data, _ = await server.api("GET", "/api/v1/recordings?limit=1")
    assert data["pagination"] == {"total": 2, "limit": 1, "offset": 0, "has_more": True}
    assert data["data"][0]["recording_id"] == second["recording_id"]
    status, data, _ = await server.api("GET", f"/api/v1/recordings?session_id={first['session_uuid']}")
    assert [r["recording_id"] for r in data["data"]] == [first["recording_id"]]
    status, data, _ = await server.api("GET", "/api/v1/recordings?state=completed&since=2000-01-01T00:00:00Z&until=2999-01-01")
    assert data["pagination"]["total"] == 2
    status, data, _ = await server.api("GET", "/api/v1/recordings?since=yesterday")
    assert (status, error_code(data)) == (400, "request.invalid_query")
    status, data, _ = await server.api("GET", "/api/v1/recordings?limit=0")
    assert status == 400


async def test_metadata_has_the_contract_fields(server):
    rec = await recorded(server, format="opus", channels=2)
    for field in ("recording_id", "session_uuid", "app_id", "state", "format", "sample_rate", "channels", "bitrate",
                  "duration", "file_size", "checksum", "created_at", "completed_at", "termination_reason", "finish_key", "legs"):
        assert field in rec, field
    assert rec["checksum"]["algorithm"] == "sha256" and len(rec["checksum"]["value"]) == 64
    assert (rec["format"], rec["channels"], rec["termination_reason"]) == ("opus", 2, "stop")
    assert rec["duration"] == pytest.approx(0.3, abs=0.15)


async def test_aliases(server):
    rec = await recorded(server)
    uuid = rec["session_uuid"]
    status, _, response = await server.api("GET", f"/v1/calls/{uuid}/recording")
    assert status == 302
    status, _, response = await server.api("GET", f"/api/calls/{uuid}/recording/download")
    assert status == 302
    status, data, _ = await server.api("GET", f"/api/calls/{uuid}/recording/stream")
    assert status == 200 and data["data"]["url"].startswith(server.base_url)
    status, data, _ = await server.api("GET", "/v1/calls/0b7f3c5e-0000-4000-8000-000000000000/recording")
    assert status == 404


async def test_live_file_wav_grows_while_recording(server):
    uuid = (await server.create_session())["uuid"]
    await server.command(uuid, "start", sample_rate=16000, channels=2)
    async with server.http.get(f"/api/v1/sessions/{uuid}/recording/file.wav", headers=server.headers()) as response:
        assert response.status == 200 and response.headers["Content-Type"] == "audio/wav"
        header = await response.content.readexactly(44)
        assert header[:4] == b"RIFF" and int.from_bytes(header[24:28], "little") == 16000
        body = await response.content.readexactly(16000 * 4 // 2)  # half a second of stereo
        assert len(body) == 32000
        await server.command(uuid, "stop")
        rest = await asyncio.wait_for(response.content.read(), 10)
        assert len(rest) % 4 == 0


async def test_openapi_describes_exactly_the_routes_served(server):
    async with server.http.get("/openapi.json") as response:
        spec = await response.json()
    documented = {(path, method.upper()) for path, ops in spec["paths"].items() for method in ops}
    served = set()
    for route in server.app.router.routes():
        if route.method in ("HEAD", "*"):
            continue
        path = re.sub(r"\{(\w+)(:[^}]+)?\}", r"{\1}", route.resource.canonical)
        served.add((path, route.method))
    assert documented == served


async def test_healthz_and_metrics(server):
    await recorded(server)
    async with server.http.get("/healthz") as response:
        assert (await response.json())["status"] == "ok"
    async with server.http.get("/metrics") as response:
        text = await response.text()
    for name in ("mediaserver_sessions_active", 'mediaserver_recordings{state="completed"} 1', "mediaserver_frames_received_total",
                 "mediaserver_webhook_backlog", "mediaserver_tick_lateness_seconds"):
        assert name in text, name


async def test_an_idle_session_ends_by_itself(tmp_path):
    async with Server(tmp_path, session_idle_s=0.5) as server:
        uuid = (await server.create_session())["uuid"]
        for _ in range(100):
            status, data, _ = await server.api("GET", f"/api/v1/sessions/{uuid}")
            if data["state"] == "ended":
                break
            await asyncio.sleep(0.1)
        assert data["state"] == "ended"
