"""The gateway contract end to end: a session, two WebSocket legs, record/start with
finish_on_key, a signed recording.completed delivered through retries, and the download."""

import asyncio
import hashlib

import aiohttp
import numpy as np
import pytest

from audio import dtmf, ffprobe, read_audio, correlation, speech
from servers import APP1, APP2, Server
from webhook_receiver import Receiver

FRAME = 160


async def stream(ws, samples: np.ndarray, frame: int = FRAME) -> None:
    for start in range(0, len(samples), frame):
        await ws.send_bytes(samples[start:start + frame].astype("<i2").tobytes())


@pytest.fixture
async def receiver():
    async with Receiver({"app1": APP1["webhook_secret"], "app2": APP2["webhook_secret"]}, fail_first=2) as rx:
        yield rx


@pytest.mark.timeout(90)
async def test_two_leg_websocket_call_to_dual_mp3_ending_on_a_finish_key(tmp_path, receiver):
    caller_voice = speech(tmp_path, "I would like to check the status of my order please")
    callee_voice = speech(tmp_path, "certainly, let me look that up for you right away", voice="en-us+f3")
    onset = len(caller_voice)
    caller = np.concatenate([caller_voice, dtmf("#", 0.1), speech(tmp_path, "this part must not be recorded")])
    async with Server(tmp_path, webhook_url=receiver.url) as server:
        session = await server.create_session()
        urls = session["ingest"]["wavstream"]
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(urls["caller"]) as ws_caller, http.ws_connect(urls["callee"]) as ws_callee:
                for ws in (ws_caller, ws_callee):
                    await ws.send_json({"event": "start", "encoding": "L16", "sample_rate": 8000, "channels": 1})
                await asyncio.sleep(0.1)
                status, answer = await server.command(session["uuid"], "start", format="mp3", channels=2,
                                                      finish_on_key="#", command_uid="start-1")
                assert status == 202, answer
                rid = answer["recording_id"]
                await asyncio.gather(stream(ws_caller, caller), stream(ws_callee, callee_voice))
                for ws in (ws_caller, ws_callee):
                    await ws.send_json({"event": "stop"})
        meta = await server.wait_recording(rid)
        assert meta["termination_reason"] == "finish_key" and meta["finish_key"] == "#"
        legs = {leg["role"]: leg for leg in meta["legs"]}
        lead = legs["caller"]["first_ms"] / 1000
        assert meta["duration"] == pytest.approx(lead + onset / 8000, abs=0.02)

        completed = (await receiver.wait_for("recording.completed"))[0]
        assert receiver.attempts[completed["event_id"]] == 3  # two refusals, then delivered
        payload = completed["payload"]
        assert payload["recording_id"] == rid and payload["termination_reason"] == "finish_key"
        assert payload["checksum"] == meta["checksum"] and payload["command_uid"] == "start-1"
        assert receiver.bad_signatures == 0

        body = await server.download(rid)
        assert hashlib.sha256(body).hexdigest() == meta["checksum"]["value"] == payload["checksum"]["value"]
        path = tmp_path / "call.mp3"
        path.write_bytes(body)
        info = ffprobe(path)
        assert info["channels"] == 2 and info["codec"] == "mp3"
        assert abs(info["duration"] - meta["duration"]) <= 0.072
        pcm, _ = read_audio(path)
        skip = round(lead * 8000)
        assert correlation(pcm[skip:skip + 8000, 0], caller_voice[:8000]) > 0.8
        assert correlation(pcm[skip:skip + 8000, 1], caller_voice[:8000]) < 0.3
