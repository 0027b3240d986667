"""A server killed mid-recording keeps what it had received: after a restart every
recording is stored (termination_reason `error`) and plays, with its legs' statistics as
far as they were checkpointed, and every session the crash ended is announced as ended."""

import asyncio
import json
import socket

import aiohttp
import pytest

from audio import ffprobe, tone
from rtp_sender import Impairments, impair, packetize, send_async
from servers import APP1, APP2
from serverproc import ServerProcess, settled
from webhook_receiver import Receiver

pytestmark = pytest.mark.timeout(120)
HEADERS = {"X-App-ID": APP1["id"], "X-API-Key": APP1["key"]}


async def stream_then_crash(server: ServerProcess, fmt: str, seconds: float) -> str:
    async with aiohttp.ClientSession(server.base_url, headers=HEADERS) as http:
        async with http.post("/api/v1/sessions") as response:
            session = await response.json()
        async with http.ws_connect(session["ingest"]["wavstream"]["caller"]) as ws:
            await ws.send_json({"event": "start", "encoding": "L16", "sample_rate": 8000, "channels": 1})
            async with http.post(f"/api/v1/sessions/{session['uuid']}/commands/record/start", json={"format": fmt}) as response:
                rid = (await response.json())["recording_id"]
            audio = tone(440, seconds, dbfs=-12)
            for start in range(0, len(audio), 160):  # real time: 20 ms every 20 ms
                await ws.send_bytes(audio[start:start + 160].astype("<i2").tobytes())
                await asyncio.sleep(0.02)
            # What the server has spooled, it says so beside the spool (the legs' checkpoint):
            # wait for that, not for a guess at how long a busy machine takes.
            await _spooled_until(server, rid, seconds - 0.1)
            server.kill()
    return rid


async def _spooled_until(server: ServerProcess, rid: str, seconds: float) -> None:
    """Until the recording's legs checkpoint says its audio has reached `seconds` (60 s at most)."""
    spool_dir = server.data_dir / "spool"
    for _ in range(600):
        for checkpoint in spool_dir.glob(f"{rid}.*.legs.json"):
            try:
                legs = json.loads(checkpoint.read_text())
            except (OSError, ValueError):  # replaced while read
                continue
            if max((leg.get("last_ms") or 0 for leg in legs), default=0) >= seconds * 1000:
                return
        await asyncio.sleep(0.1)
    raise AssertionError(f"the server never spooled {seconds} s of {rid}")


@pytest.mark.parametrize("fmt", ["wav", "mp3", "opus"])
async def test_a_recording_survives_a_crash(tmp_path, fmt):
    server = ServerProcess(tmp_path / "data")
    server.start()
    try:
        rid = await stream_then_crash(server, fmt, 3.0)
        server.start()
        async with aiohttp.ClientSession(server.base_url, headers=HEADERS) as http:
            meta = await settled(http, rid)
            assert meta["state"] == "completed", meta
            assert meta["termination_reason"] == "error" and "stopped during the recording" in meta["error"]
            async with http.get(f"/api/v1/recordings/{rid}/download", allow_redirects=True) as response:
                body = await response.read()
        path = tmp_path / f"rec.{fmt}"
        path.write_bytes(body)
        info = ffprobe(path)
        assert info["duration"] >= 2.0  # the audio received before the crash, or nearly all of it
        assert abs(info["duration"] - meta["duration"]) <= 0.2
    finally:
        server.stop()


def rtp_offer() -> str:
    return ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            "m=audio 9 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")


async def test_a_crash_keeps_the_leg_stats_and_announces_the_sessions_it_ended(tmp_path):
    async with Receiver({APP1["id"]: APP1["webhook_secret"]}) as hooks:
        server = ServerProcess(tmp_path / "data")
        server.env["MEDIASERVER_APPS"] = json.dumps([dict(APP1, webhook_url=hooks.url), APP2])
        server.start()
        try:
            async with aiohttp.ClientSession(server.base_url, headers=HEADERS) as http:
                async with http.post("/api/v1/sessions") as response:
                    session = await response.json()
                uuid = session["uuid"]
                async with http.post(f"/api/v1/sessions/{uuid}/legs", json={"role": "callee", "sdp": rtp_offer()}) as response:
                    leg = await response.json()
                port = int(next(line for line in leg["sdp"].splitlines() if line.startswith("m=audio")).split()[1])
                impairments = Impairments(loss=0.1, seed=3)
                plan = impair(packetize(tone(700, 3.0, dbfs=-15), "PCMU"), impairments)
                async with http.ws_connect(session["ingest"]["wavstream"]["caller"]) as ws:
                    await ws.send_json({"event": "start", "encoding": "L16", "sample_rate": 8000, "channels": 1})
                    async with http.post(f"/api/v1/sessions/{uuid}/commands/record/start", json={"channels": 2}) as response:
                        rid = (await response.json())["recording_id"]
                    audio = tone(440, 3.0, dbfs=-12)

                    async def caller():
                        for start in range(0, len(audio), 160):
                            await ws.send_bytes(audio[start:start + 160].astype("<i2").tobytes())
                            await asyncio.sleep(0.02)

                    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                        await asyncio.gather(caller(), send_async([(plan, ("127.0.0.1", port))], sock))
                    await _spooled_until(server, rid, 2.9)  # spooled and checkpointed
                    server.kill()
            server.start()
            async with aiohttp.ClientSession(server.base_url, headers=HEADERS) as http:
                meta = await settled(http, rid)
                async with http.get(f"/api/v1/sessions/{uuid}") as response:
                    ended = await response.json()
            assert meta["state"] == "completed" and meta["termination_reason"] == "error", meta
            legs = {leg["role"]: leg for leg in meta["legs"]}
            assert sorted(legs) == ["callee", "caller"], meta["legs"]
            # Counted as far as the last checkpoint, which the spool's last write (at most
            # a few hundred milliseconds before the end of the audio) carried.
            lost = len(impairments.log["lost"])
            assert len(plan) - 20 <= legs["callee"]["packets"] <= len(plan)
            assert lost - 4 <= legs["callee"]["lost"] <= lost
            assert 2500 <= legs["caller"]["audio_ms"] <= 3000
            assert 0 <= legs["callee"]["inserted_silence_ms"] <= 1000 and legs["caller"]["first_ms"] < 500
            for leg in legs.values():
                assert 2000 <= leg["last_ms"] <= meta["duration"] * 1000
            assert ended["state"] == "ended" and all(leg["ended_at"] for leg in ended["legs"])
            announced = await hooks.wait_for("session.ended")
            assert [event["payload"]["session_uuid"] for event in announced] == [uuid]
            server.stop()  # and once more: the session is not announced again
            server.start()
            await asyncio.sleep(1.0)
            assert [event["payload"]["session_uuid"] for event in hooks.of_kind("session.ended")] == [uuid]
        finally:
            server.stop()
