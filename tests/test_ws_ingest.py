"""WebSocket ingest against a real server: both protocols, bad input, backpressure."""

import asyncio
import base64
import contextlib
import json

import aiohttp
import numpy as np
import pytest

from audio import best_lag, correlation, noise, read_audio, speech, tone
from mediaserver.codecs.g711 import encode_ulaw
from serverproc import ServerProcess, settled
from servers import APP1, APP2, Server

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def server(tmp_path):
    async with Server(tmp_path) as srv:
        yield srv


async def start_recording(server, uuid, **options) -> str:
    status, answer = await server.command(uuid, "start", **options)
    assert status == 202, answer
    return answer["recording_id"]


async def finish(server, uuid, rid) -> dict:
    await server.api("DELETE", f"/api/v1/sessions/{uuid}")
    return await server.wait_recording(rid)


async def test_interleaved_two_channel_stream_is_two_legs(server, tmp_path):
    session = await server.create_session()
    left, right = tone(400, 2.0, dbfs=-15), tone(900, 2.0, dbfs=-15)
    interleaved = np.column_stack((left, right)).reshape(-1)
    async with aiohttp.ClientSession() as http, http.ws_connect(session["ingest"]["wavstream"]["caller"]) as ws:
        await ws.send_json({"event": "start", "encoding": "L16", "sample_rate": 8000, "channels": 2})
        await asyncio.sleep(0.05)
        rid = await start_recording(server, session["uuid"], channels=2)
        for start in range(0, len(interleaved), 640):
            await ws.send_bytes(interleaved[start:start + 640].astype("<i2").tobytes())
        await ws.send_json({"event": "stop"})
        assert (await ws.receive()).type == aiohttp.WSMsgType.CLOSE
    meta = await finish(server, session["uuid"], rid)
    assert sorted(leg["role"] for leg in meta["legs"]) == ["callee", "caller"]
    assert [leg["packets"] for leg in meta["legs"]] == [len(interleaved) // 640] * 2  # one per audio message
    path = tmp_path / "two.wav"
    path.write_bytes(await server.download(rid))
    pcm, _ = read_audio(path)
    lead = round(meta["legs"][0]["first_ms"] * 8)
    assert correlation(pcm[lead:lead + 8000, 0], left[:8000]) > 0.99
    assert correlation(pcm[lead:lead + 8000, 1], right[:8000]) > 0.99


async def test_faster_than_real_time_stream_is_complete_and_backpressured(server):
    session = await server.create_session()
    audio = tone(300, 20.0, dbfs=-20)  # 20 s of audio, sent as fast as the server takes it
    async with aiohttp.ClientSession() as http, http.ws_connect(session["ingest"]["wavstream"]["caller"]) as ws:
        await ws.send_json({"event": "start", "encoding": "PCMU", "sample_rate": 8000, "channels": 1})
        await asyncio.sleep(0.05)
        rid = await start_recording(server, session["uuid"])
        loop = asyncio.get_running_loop()
        began = loop.time()
        payload = encode_ulaw(audio)
        for start in range(0, len(payload), 1600):
            await ws.send_bytes(payload[start:start + 1600])
        await ws.send_json({"event": "stop"})
        await ws.receive()
        elapsed = loop.time() - began
    meta = await finish(server, session["uuid"], rid)
    assert elapsed < 15  # faster than real time …
    leg = meta["legs"][0]
    assert leg["audio_ms"] == pytest.approx(20000, abs=1)  # … and nothing lost
    assert meta["duration"] >= 20.0


@pytest.mark.parametrize("first, then, code, reason", [
    (None, b"\x00\x01", 1003, "binary frame before start"),
    ('{"event": "start", "encoding": "G729", "sample_rate": 8000, "channels": 1}', None, 1003, "encoding"),
    ('{"event": "start", "encoding": "L16", "sample_rate": 8000, "channels": 1}', b"\x00\x01\x02", 1007, "whole"),
    ("{nope", None, 1007, "JSON"),
    ('{"event": "start", "encoding": "L16", "sample_rate": 8000, "channels": 1}', '{"event": "start", "encoding": "L16", "sample_rate": 8000, "channels": 1}', 1008, "start"),
    ('{"event": "start", "encoding": "L16", "sample_rate": 8000, "channels": 1}', b"\x00" * 70000, 1009, "70000"),
])
async def test_bad_wavstream_input_closes_with_a_code_and_loses_nothing(server, first, then, code, reason):
    session = await server.create_session()
    urls = session["ingest"]["wavstream"]
    async with aiohttp.ClientSession() as http, http.ws_connect(urls["callee"]) as good, http.ws_connect(urls["caller"]) as bad:
        await good.send_json({"event": "start", "encoding": "L16", "sample_rate": 8000, "channels": 1})
        await asyncio.sleep(0.05)
        rid = await start_recording(server, session["uuid"])
        await good.send_bytes(tone(500, 1.0).astype("<i2").tobytes())
        if first is not None:
            await bad.send_str(first)
        if then is not None:
            await (bad.send_bytes(then) if isinstance(then, bytes) else bad.send_str(then))
        closing = await bad.receive(timeout=5)
        assert closing.type == aiohttp.WSMsgType.CLOSE
        assert bad.close_code == code
        assert reason.lower() in closing.extra.lower()
        await good.send_bytes(tone(500, 1.0).astype("<i2").tobytes())  # the other leg carries on
        await good.send_json({"event": "stop"})
        await good.receive()
    meta = await finish(server, session["uuid"], rid)
    callee = next(leg for leg in meta["legs"] if leg["role"] == "callee")
    assert callee["audio_ms"] == pytest.approx(2000, abs=1)


async def test_ingest_needs_credentials_or_a_valid_token(server):
    session = await server.create_session()
    url = session["ingest"]["wavstream"]["caller"]
    bare = url.split("?")[0]
    async with aiohttp.ClientSession() as http:
        for target, headers in ((bare, {}), (url[:-4] + "0000", {}), (bare, {"Authorization": "Bearer wrong"})):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(target, headers=headers)
            assert refused.value.status == 401
        other = (await server.create_session(APP2))["ingest"]["wavstream"]["caller"]
        token = other.split("token=")[1]
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:  # a token for another session
            await http.ws_connect(f"{bare}?token={token}")
        assert refused.value.status == 401
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:  # headers of another app
            await http.ws_connect(bare, headers={"Authorization": f"Bearer {APP2['key']}"})
        assert refused.value.status == 403
        async with http.ws_connect(bare, headers={"Authorization": f"Bearer {APP1['key']}"}) as ws:
            await ws.send_json({"event": "stop"})


async def test_a_websocket_on_an_unknown_uuid_creates_its_session_and_ends_it(server):
    uuid = "3f0c7b1a-1111-4222-8333-444455556666"
    headers = server.headers()
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{server.base_url}/ws/v1/sessions/{uuid}/legs/caller", headers=headers) as ws:
            await ws.send_json({"event": "start", "encoding": "L16", "sample_rate": 16000, "channels": 1})
            await asyncio.sleep(0.1)
            status, data, _ = await server.api("GET", f"/api/v1/sessions/{uuid}")
            assert status == 200 and data["source"] == "websocket" and data["state"] == "active"
            await ws.send_json({"event": "stop"})
    for _ in range(100):
        status, data, _ = await server.api("GET", f"/api/v1/sessions/{uuid}")
        if data["state"] == "ended":
            break
        await asyncio.sleep(0.05)
    assert data["state"] == "ended"


def twilio(event: str, **fields) -> str:
    return json.dumps({"event": event, **fields})


async def test_twilio_media_stream_records_both_tracks_with_dtmf_finish(server, tmp_path):
    session = await server.create_session()
    uuid = session["uuid"]
    caller_voice = np.pad(speech(tmp_path, "hello this is the caller"), (0, 16000))[:16000]
    callee_voice = tone(700, 2.0, dbfs=-18)
    async with aiohttp.ClientSession() as http, http.ws_connect(session["ingest"]["twilio"]) as ws:
        await ws.send_str(twilio("connected", protocol="Call", version="1.0.0"))
        await ws.send_str(twilio("start", sequenceNumber="1", streamSid="MZ1", start={
            "streamSid": "MZ1", "accountSid": "AC1", "callSid": "CA1", "tracks": ["inbound", "outbound"],
            "customParameters": {}, "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}))
        await asyncio.sleep(0.05)
        rid = await start_recording(server, uuid, channels=2, finish_on_key="#")
        seq = 2
        for chunk, start in enumerate(range(0, 2 * 8000, 160)):
            for track, audio in (("inbound", caller_voice), ("outbound", callee_voice)):
                payload = base64.b64encode(encode_ulaw(audio[start:start + 160])).decode()
                await ws.send_str(twilio("media", sequenceNumber=str(seq), streamSid="MZ1",
                                         media={"track": track, "chunk": str(chunk + 1), "timestamp": str(start // 8), "payload": payload}))
                seq += 1
        await ws.send_str(twilio("dtmf", streamSid="MZ1", sequenceNumber=str(seq), dtmf={"track": "inbound_track", "digit": "#"}))
        await ws.send_str(twilio("stop", streamSid="MZ1", sequenceNumber=str(seq + 1), stop={"accountSid": "AC1", "callSid": "CA1"}))
        await ws.receive()
    meta = await server.wait_recording(rid)
    assert (meta["termination_reason"], meta["finish_key"]) == ("finish_key", "#")
    caller = next(leg for leg in meta["legs"] if leg["role"] == "caller")
    lead = caller["first_ms"] / 1000
    # The stream began just before record/start: the recording holds all of it from then
    # to the digit, which came right after the last media.
    assert caller["audio_ms"] > 1800
    assert [leg["packets"] for leg in meta["legs"]] == [2 * 8000 // 160] * 2  # one per media message
    assert meta["duration"] == pytest.approx(lead + caller["audio_ms"] / 1000, abs=0.021)
    path = tmp_path / "twilio.wav"
    path.write_bytes(await server.download(rid))
    pcm, _ = read_audio(path)
    lag, score = best_lag(callee_voice[:12000], pcm[:8000, 1], 1200)
    assert score > 0.98


async def test_twilio_bad_input_is_refused_with_a_code(server):
    async with aiohttp.ClientSession() as http:
        url = f"{server.base_url}/ws/v1/twilio"
        async with http.ws_connect(url, headers=server.headers()) as ws:
            await ws.send_str(twilio("media", media={"track": "inbound", "chunk": "1", "timestamp": "0", "payload": "AAAA"}))
            msg = await ws.receive()
            assert msg.type == aiohttp.WSMsgType.CLOSE and ws.close_code == 1008
        async with http.ws_connect(url, headers=server.headers()) as ws:
            await ws.send_bytes(b"\x00")
            await ws.receive()
            assert ws.close_code == 1003


async def test_a_fast_sender_is_held_back_from_its_very_first_frame(server):
    session = await server.create_session()
    data = tone(300, 30.0, dbfs=-20).astype("<i2").tobytes()
    live = server.engine.sessions[session["uuid"]]
    backlog = []

    async def watch():  # every turn of the event loop: the whole stream may be read within milliseconds
        while True:
            for leg_id in list(live.legs):
                backlog.append(server.engine.backlog_seconds(live, leg_id))
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    try:
        async with aiohttp.ClientSession() as http, http.ws_connect(session["ingest"]["wavstream"]["caller"]) as ws:
            await ws.send_json({"event": "start", "encoding": "L16", "sample_rate": 8000, "channels": 1})
            for start in range(0, len(data), 16000):  # one second per frame, no pause at all
                await ws.send_bytes(data[start:start + 16000])
            await ws.send_json({"event": "stop"})
            await ws.receive()
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    # The server never held more than the backlog limit (2 s) plus the frame in hand.
    assert 1.0 <= max(backlog) <= 3.0


async def wait_mixed(server, live, leg_ids: list[str], samples: int, timeout: float = 30.0) -> None:
    """Until the server has read `samples` of every leg from the socket and mixed them."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while any(live.session.inputs[leg_id].posted < samples or server.engine.backlog_seconds(live, leg_id) for leg_id in leg_ids):
        assert loop.time() < deadline, "the server did not read and mix the whole stream"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("message_ms", [1000, 20])
async def test_a_fast_stream_is_mixed_as_fast_as_it_is_read_and_stops_at_once(tmp_path, workers, message_ms):
    audio = noise(60.0, dbfs=-20)
    data = audio.astype("<i2").tobytes()
    step = message_ms * 16  # bytes of L16 at 8 kHz
    loop = asyncio.get_running_loop()
    async with Server(tmp_path, workers=workers) as server:
        session = await server.create_session()
        live = server.engine.sessions[session["uuid"]]
        async with aiohttp.ClientSession() as http, http.ws_connect(session["ingest"]["wavstream"]["caller"]) as ws:
            await ws.send_json({"event": "start", "encoding": "L16", "sample_rate": 8000, "channels": 1})
            rid = await start_recording(server, session["uuid"])
            for start in range(0, len(data), step):  # all at once
                await ws.send_bytes(data[start:start + step])
            await wait_mixed(server, live, list(live.legs), len(audio))
            stopped = loop.time()
            status, _ = await server.command(session["uuid"], "stop")
            assert status == 202
            meta = await server.wait_recording(rid, timeout=30)
            took = loop.time() - stopped
            await ws.send_json({"event": "stop"})
        assert took < 5, f"completed {took:.1f} s after the stop"
        path = tmp_path / "fast.wav"
        path.write_bytes(await server.download(rid))
    pcm, _ = read_audio(path)
    # The file is the stream, sample for sample, after the moment between record/start and
    # its first message; nothing after it (the stop came once all of it was read).
    lead = len(pcm) - len(audio)
    assert 0 <= lead < 4000
    assert not pcm[:lead, 0].any()
    assert np.array_equal(pcm[lead:, 0], audio)
    assert meta["duration"] == pytest.approx(len(pcm) / 8000, abs=1e-6)
    assert meta["legs"][0]["audio_ms"] == 60000.0
    assert meta["legs"][0]["packets"] == len(data) // step  # counted where the socket is, reported where it is mixed


async def test_an_hour_pushed_fast_keeps_the_server_memory_flat(tmp_path):
    second = tone(250, 1.0, dbfs=-20).astype("<i2").tobytes()
    headers = {"X-App-ID": APP1["id"], "X-API-Key": APP1["key"]}
    rss = []
    with ServerProcess(tmp_path / "data") as server:
        async with aiohttp.ClientSession(server.base_url, headers=headers) as http:
            async with http.post("/api/v1/sessions") as response:
                session = await response.json()
            async with http.ws_connect(session["ingest"]["wavstream"]["caller"]) as ws:
                await ws.send_json({"event": "start", "encoding": "L16", "sample_rate": 8000, "channels": 1})
                async with http.post(f"/api/v1/sessions/{session['uuid']}/commands/record/start", json={}) as response:
                    rid = (await response.json())["recording_id"]
                for pushed in range(3600):
                    await ws.send_bytes(second)
                    if pushed % 300 == 0:
                        rss.append(server.rss_kib())
                await ws.send_json({"event": "stop"})
                await ws.receive()
                rss.append(server.rss_kib())
            async with http.post(f"/api/v1/sessions/{session['uuid']}/commands/record/stop", json={}) as response:
                assert response.status == 202
            meta = await settled(http, rid, tries=600, every_s=0.05)
    assert meta["state"] == "completed" and meta["legs"][0]["audio_ms"] == 3600000.0
    # After the first five minutes (encoder, buffers and allocator warmed up) an hour of
    # audio read as fast as it comes costs no more memory than the first minutes did.
    print(f"server RSS while an hour was pushed (KiB, every 300 s): {rss}")
    assert max(rss[1:]) - rss[1] < 16 * 1024
