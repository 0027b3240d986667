"""Twilio Media Streams as Twilio really sends them: `<Stream url>` loses its query string,
so the signed ingest token and the session come as `<Parameter>`s in the start message's
`customParameters`. A stream whose token is wrong or missing is closed with 1008 and a
reason and leaves nothing behind: no session, no leg."""

from __future__ import annotations

import asyncio
import base64
import json

import aiohttp
import numpy as np
import pytest

from audio import tone
from mediaserver.codecs.g711 import encode_ulaw
from servers import Server

pytestmark = pytest.mark.timeout(60)

CHUNK = 160  # 20 ms of 8 kHz µ-law, as Twilio sends it


@pytest.fixture
async def server(tmp_path):
    async with Server(tmp_path) as srv:
        yield srv


def message(event: str, **fields) -> str:
    return json.dumps({"event": event, **fields})


def start_message(params: dict[str, str]) -> str:
    return message("start", sequenceNumber="1", streamSid="MZ1", start={
        "streamSid": "MZ1", "accountSid": "AC1", "callSid": "CA1", "tracks": ["inbound"], "customParameters": params,
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}})


def media_messages(samples: np.ndarray) -> list[str]:
    out = []
    for chunk, at in enumerate(range(0, len(samples), CHUNK)):
        payload = base64.b64encode(encode_ulaw(samples[at:at + CHUNK])).decode()
        out.append(message("media", sequenceNumber=str(chunk + 2), streamSid="MZ1",
                           media={"track": "inbound", "chunk": str(chunk + 1), "timestamp": str(at // 8), "payload": payload}))
    return out


def bare_url(server) -> str:
    """The <Stream url> as Twilio connects to it: no query string, no headers."""
    return server.base_url.replace("http", "ws", 1) + "/ws/v1/twilio"


async def test_credentials_in_custom_parameters_authenticate_the_stream(server):
    session = await server.create_session()
    uuid, token = session["uuid"], session["ingest"]["token"]
    status, started = await server.command(uuid, "start")
    assert status == 202, started
    audio = tone(500, 1.0, dbfs=-12)
    async with aiohttp.ClientSession() as http, http.ws_connect(bare_url(server)) as ws:
        await ws.send_str(message("connected", protocol="Call", version="1.0.0"))
        await ws.send_str(start_message({"session": uuid, "token": token, "caller": "+15550100"}))
        for text in media_messages(audio):
            await ws.send_str(text)
        await ws.send_str(message("stop", sequenceNumber="99", streamSid="MZ1", stop={"accountSid": "AC1", "callSid": "CA1"}))
        msg = await ws.receive()
        assert msg.type == aiohttp.WSMsgType.CLOSE and ws.close_code == 1000
    assert (await server.command(uuid, "stop"))[0] == 202
    meta = await server.wait_recording(started["recording_id"])
    (leg,) = meta["legs"]
    assert leg["role"] == "caller" and leg["packets"] == len(audio) // CHUNK
    assert leg["audio_ms"] == pytest.approx(1000, abs=20)


async def test_a_token_parameter_is_not_kept_in_the_session_metadata(server):
    """A stream authenticated by headers, whose session is made at start, keeps its other
    customParameters in the session's metadata, but not a `token` (a credential)."""
    async with aiohttp.ClientSession() as http, http.ws_connect(bare_url(server), headers=server.headers()) as ws:
        await ws.send_str(start_message({"token": "v1.some.credential", "caller": "+15550100"}))
        for text in media_messages(tone(500, 0.2)):
            await ws.send_str(text)
        await asyncio.sleep(0.1)
        (uuid,) = server.engine.sessions
        live = server.engine.sessions[uuid]
        assert [live.session.inputs[leg].packets for leg in live.legs] == [10]
        status, view, _ = await server.api("GET", f"/api/v1/sessions/{uuid}")
        assert status == 200 and view["metadata"]["custom_parameters"] == {"caller": "+15550100"}
        await ws.close()


@pytest.mark.parametrize("params,reason", [
    ({}, "credentials are required"),
    ({"token": "v1.bogus.0000"}, "UUID"),
    ("wrong", "invalid ingest token"),
    ("other-session", "another session"),
])
async def test_a_stream_with_a_wrong_or_missing_token_is_refused_and_nothing_is_kept(server, params, reason):
    session = await server.create_session()
    uuid, token = session["uuid"], session["ingest"]["token"]
    if params == "wrong":
        params = {"session": uuid, "token": token[:-4] + ("0000" if not token.endswith("0000") else "1111")}
    elif params == "other-session":
        params = {"session": "00000000-0000-4000-8000-000000000000", "token": token}
    sessions_before = set(server.engine.sessions)
    _, listed_before, _ = await server.api("GET", "/api/v1/sessions")
    async with aiohttp.ClientSession() as http, http.ws_connect(bare_url(server)) as ws:
        await ws.send_str(message("connected", protocol="Call", version="1.0.0"))
        await ws.send_str(start_message(params))
        for text in media_messages(tone(500, 0.1)):
            await ws.send_str(text)
        msg = await ws.receive()
        assert msg.type == aiohttp.WSMsgType.CLOSE and ws.close_code == 1008
        assert reason in msg.extra
    assert set(server.engine.sessions) == sessions_before
    assert server.engine.sessions[uuid].legs == {}
    _, listed_after, _ = await server.api("GET", "/api/v1/sessions")
    assert listed_after == listed_before


async def test_media_before_an_authenticating_start_is_refused(server):
    async with aiohttp.ClientSession() as http, http.ws_connect(bare_url(server)) as ws:
        await ws.send_str(media_messages(tone(500, 0.02))[0])
        msg = await ws.receive()
        assert msg.type == aiohttp.WSMsgType.CLOSE and ws.close_code == 1008
        assert "before start" in msg.extra
    assert server.engine.sessions == {}


async def test_a_stream_that_never_starts_is_closed(tmp_path):
    """Without credentials in the request, a socket may wait for its start only so long
    (`twilio_start_timeout_s`), and is kept in nothing meanwhile."""
    async with Server(tmp_path, twilio_start_timeout_s=1.5) as server:
        async with aiohttp.ClientSession() as http, http.ws_connect(bare_url(server)) as ws:
            await ws.send_str(message("connected", protocol="Call", version="1.0.0"))
            assert server.engine.sessions == {}
            msg = await ws.receive(timeout=30)
            assert msg.type == aiohttp.WSMsgType.CLOSE and ws.close_code == 1008
            assert msg.extra == "no authenticated start message within 1.5 s"
        assert server.engine.sessions == {}
