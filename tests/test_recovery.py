"""A server killed mid-recording keeps what it had received: after a restart every
recording is stored (termination_reason `error`) and plays."""

import asyncio

import aiohttp
import pytest

from audio import ffprobe, tone
from servers import APP1
from serverproc import ServerProcess

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
            await asyncio.sleep(1.5)  # encoded and spooled (WAV keeps up to 1 s in memory)
            server.kill()
    return rid


@pytest.mark.parametrize("fmt", ["wav", "mp3", "opus"])
async def test_a_recording_survives_a_crash(tmp_path, fmt):
    server = ServerProcess(tmp_path / "data")
    server.start()
    try:
        rid = await stream_then_crash(server, fmt, 3.0)
        server.start()
        async with aiohttp.ClientSession(server.base_url, headers=HEADERS) as http:
            for _ in range(100):
                async with http.get(f"/api/v1/recordings/{rid}") as response:
                    meta = await response.json()
                if meta["state"] == "completed":
                    break
                await asyncio.sleep(0.1)
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
