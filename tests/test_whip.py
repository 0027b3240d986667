"""WHIP ingest against a real server with a real aiortc client over loopback: the recording
holds what was published; refusals answer the right status and leak no peer connection."""

from __future__ import annotations

import asyncio
import io
import uuid as uuidlib

import numpy as np
import pytest
import soundfile

from audio import dtmf, silence, speech, write_wav
from mediaserver.api.keys import SERVICES
from servers import APP1, APP2, Server
from whip_client import Publisher, active_span, align, client_pc, offer_for, only_formats, wait_for

pytestmark = pytest.mark.timeout(90)

RATE = 16000


def bearer(app: dict = APP1) -> dict[str, str]:
    return {"Authorization": f"Bearer {app['key']}"}


def endpoint(uuid: str, role: str = "caller") -> str:
    return f"/whip/v1/sessions/{uuid}/legs/{role}"


@pytest.fixture
async def server(tmp_path):
    async with Server(tmp_path) as srv:
        yield srv


def whip_service(server):
    return server.app[SERVICES]["webrtc"]


def whip_tasks() -> list[asyncio.Task]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("whip-") and not t.done()]


async def recorded_audio(server, recording_id: str) -> tuple[np.ndarray, dict]:
    meta = await server.wait_recording(recording_id)
    data, rate = soundfile.read(io.BytesIO(await server.download(recording_id)), dtype="int16")
    assert rate == meta["sample_rate"]
    return data, meta


@pytest.fixture(scope="module")
def voice_wav(tmp_path_factory):
    """A WAV file of about three seconds of speech at 16 kHz, with a little silence around."""
    tmp = tmp_path_factory.mktemp("voice")
    spoken = speech(tmp, "recording calls over web r t c, one two three", rate=RATE)
    return write_wav(tmp / "voice.wav", np.concatenate([silence(0.2, RATE), spoken, silence(0.2, RATE)]), RATE)


@pytest.fixture
def voice(voice_wav) -> np.ndarray:
    samples, rate = soundfile.read(voice_wav, dtype="int16")
    assert rate == RATE
    return samples


# Just under the worst of repeated runs, idle and with a core held busy (Opus 0.966-0.972,
# G.711 0.996): a regression of a few hundredths fails.
MIN_CORRELATION = {"opus": 0.95, "PCMU": 0.99, "PCMA": 0.99}


@pytest.mark.parametrize("codec", ["opus", "PCMU", "PCMA"])
async def test_aiortc_client_publishes_a_wav_and_the_recording_matches(server, voice, codec):
    """The WAV file's samples, published in real time, are in the recording unchanged in
    length and placed where they were sent."""
    session = await server.create_session()
    uuid = session["uuid"]
    status, started = await server.command(uuid, "start", sample_rate=RATE)
    assert status == 202, started
    async with Publisher(server.http, endpoint(uuid), voice, RATE, bearer(), codec=codec) as publisher:
        assert publisher.location.startswith(endpoint(uuid) + "/leg_")
        assert f"{codec}/" in publisher.pc.remoteDescription.sdp
        await asyncio.wait_for(publisher.track.played.wait(), 20)
        await asyncio.sleep(0.5)  # the last packets through the jitter buffers
        assert await publisher.delete() == 200
        await wait_for(lambda: whip_service(server).open_count == 0, what="the peer connection to close")
    status, _ = await server.command(uuid, "stop")
    assert status == 202
    audio, meta = await recorded_audio(server, started["recording_id"])

    lag, corr = align(audio, voice)
    start, end = active_span(audio, RATE)
    want_start, want_end = active_span(voice, RATE)
    duration_error = (end - start) - (want_end - want_start)
    print(f"aiortc WHIP {codec}: correlation {corr:.4f}, lag {lag / RATE:.3f} s, duration error {duration_error * 1000:+.1f} ms")
    assert corr > MIN_CORRELATION[codec]
    assert abs(duration_error) <= 0.03
    assert abs((start - lag / RATE) - want_start) <= 0.03  # the speech sits where the correlation says
    (leg,) = meta["legs"]
    assert leg["role"] == "caller" and leg["audio_ms"] >= len(voice) / RATE * 1000 - 100
    assert leg["packets"] >= len(voice) / RATE / 0.02 and leg["lost"] == 0
    assert not whip_tasks()


async def test_an_offer_with_video_is_answered_with_the_video_inactive(server, voice):
    uuid = (await server.create_session())["uuid"]
    status, started = await server.command(uuid, "start", sample_rate=RATE)
    assert status == 202, started
    async with Publisher(server.http, endpoint(uuid), voice, RATE, bearer(), video=True) as publisher:
        answer = publisher.pc.remoteDescription.sdp
        audio, video = answer.split("m=audio")[1], answer.split("m=video")[1]
        assert "a=recvonly" in audio.split("m=video")[0] and "a=inactive" in video
        await asyncio.wait_for(publisher.track.played.wait(), 20)
        await asyncio.sleep(0.5)
        assert await publisher.delete() == 200
    await server.command(uuid, "stop")
    audio, _ = await recorded_audio(server, started["recording_id"])
    assert align(audio, voice)[1] > 0.9


async def test_inband_dtmf_on_a_whip_leg_ends_the_recording_with_the_finish_key(server, voice):
    uuid = (await server.create_session())["uuid"]
    status, started = await server.command(uuid, "start", sample_rate=RATE, finish_on_key="#")
    assert status == 202, started
    published = np.concatenate([voice[: RATE], dtmf("#", 0.2, RATE), silence(0.3, RATE), voice[RATE:]])
    async with Publisher(server.http, endpoint(uuid), published, RATE, bearer()) as publisher:
        meta = await server.wait_recording(started["recording_id"], timeout=20)
        assert await publisher.delete() == 200
    assert meta["termination_reason"] == "finish_key" and meta["finish_key"] == "#"
    audio, _ = await recorded_audio(server, started["recording_id"])
    lag, corr = align(audio, voice[: RATE])
    assert corr > 0.9
    # Cut where the key began: the tone itself is not in the file.
    assert abs(len(audio) - (lag + RATE)) <= 0.06 * RATE


async def test_ending_the_session_closes_its_peer_connections(server, voice):
    uuid = (await server.create_session())["uuid"]
    publishers = [Publisher(server.http, endpoint(uuid, role), voice, RATE, bearer()) for role in ("caller", "callee")]
    for publisher in publishers:
        await publisher.start()
    try:
        service = whip_service(server)
        peers = [service.get(p.location.rsplit("/", 1)[1]) for p in publishers]
        await wait_for(lambda: all(p.connection_state == "connected" for p in peers), what="both legs to connect")
        status, _, _ = await server.api("DELETE", f"/api/v1/sessions/{uuid}")
        assert status == 202
        await wait_for(lambda: service.open_count == 0, what="the session's peer connections to close")
        assert all(p.closed and p.connection_state == "closed" for p in peers)
        # The clients see the server close (DTLS close_notify): the immediate revocation
        # of consent that RFC 9725 asks of a server ending a session.
        await wait_for(lambda: all(p.pc.connectionState in ("closed", "failed") for p in publishers), what="the clients to notice")
        assert not whip_tasks()
        assert [await p.delete() for p in publishers] == [404, 404]
    finally:
        for publisher in publishers:
            await publisher.close()


async def test_an_offer_creates_an_unknown_session_which_ends_with_its_leg(server, voice):
    uuid = str(uuidlib.uuid4())
    async with Publisher(server.http, endpoint(uuid), voice, RATE, bearer()) as publisher:
        status, session, _ = await server.api("GET", f"/api/v1/sessions/{uuid}")
        assert status == 200 and session["source"] == "whip" and session["app_id"] == APP1["id"]
        assert [leg["kind"] for leg in session["legs"]] == ["webrtc"]
        assert await publisher.delete() == 200
    await wait_for(lambda: uuid not in server.engine.sessions, what="the session to end")
    status, session, _ = await server.api("GET", f"/api/v1/sessions/{uuid}")
    assert session["state"] == "ended" and session["legs"][0]["ended_at"] is not None


async def test_ingest_token_authenticates_the_offer_and_the_location(server, voice):
    session = await server.create_session()
    url = session["ingest"]["whip"]["callee"]
    assert url.startswith(server.base_url + endpoint(session["uuid"], "callee") + "?token=")
    async with Publisher(server.http, url.removeprefix(server.base_url), voice, RATE) as publisher:
        assert "?token=" in publisher.location
        bare = publisher.location.split("?")[0]
        async with server.http.delete(bare) as response:
            assert response.status == 401
        async with server.http.delete(bare, headers=bearer(APP2)) as response:
            assert response.status == 403
        assert await publisher.delete() == 200
        assert await publisher.delete() == 404
    assert whip_service(server).open_count == 0


async def test_a_client_that_goes_away_ends_its_leg(server, voice):
    uuid = (await server.create_session())["uuid"]
    publisher = Publisher(server.http, endpoint(uuid), voice, RATE, bearer())
    await publisher.start()
    service = whip_service(server)
    await wait_for(lambda: service.get(publisher.location.rsplit("/", 1)[1]).frames > 10, what="audio")
    await publisher.close()  # no DELETE: the DTLS close ends the stream
    await wait_for(lambda: service.open_count == 0, what="the leg to end")
    status, session, _ = await server.api("GET", f"/api/v1/sessions/{uuid}")
    assert session["legs"][0]["ended_at"] is not None and session["state"] == "active"
    (leg,) = (await server.engine.catalog.legs(uuid))
    assert leg["stats"]["frames"] > 10 and leg["stats"]["connection"] in ("connected", "closed", "failed")
    assert not whip_tasks()


@pytest.fixture
async def offer():
    """A real aiortc offer (never answered) to vary."""
    pc = client_pc()
    pc.addTransceiver("audio", direction="sendonly")
    try:
        yield await offer_for(pc)
    finally:
        await pc.close()


async def post_offer(server, url: str, sdp: str, headers: dict[str, str] | None = None, content_type: str = "application/sdp"):
    async with server.http.post(url, data=sdp.encode(), headers={"Content-Type": content_type, **(headers or {})}) as response:
        body = await response.json() if response.content_type == "application/json" else await response.text()
        return response.status, body


async def test_offers_are_refused_with_the_right_status_and_leak_nothing(server, offer):
    uuid = (await server.create_session())["uuid"]
    other = (await server.create_session(APP2))["uuid"]
    ended = (await server.create_session())["uuid"]
    await server.api("DELETE", f"/api/v1/sessions/{ended}")
    await wait_for(lambda: ended not in server.engine.sessions, what="the session to end")
    no_ice = offer.replace("a=ice-ufrag:", "a=x-ufrag:")
    fresh = str(uuidlib.uuid4())
    cases = [
        (endpoint(uuid), offer, {}, "application/sdp", 401, "auth.unauthorized"),
        (endpoint(uuid), offer, {"Authorization": "Bearer wrong"}, "application/sdp", 401, "auth.unauthorized"),
        (endpoint(uuid) + "?token=v1.bad.token", offer, {}, "application/sdp", 401, "auth.unauthorized"),
        (endpoint(other), offer, bearer(), "application/sdp", 403, "auth.forbidden"),
        (endpoint(ended), offer, bearer(), "application/sdp", 409, "sessions.ended"),
        (endpoint("not-a-uuid"), offer, bearer(), "application/sdp", 400, "sessions.invalid_uuid"),
        (endpoint(uuid, "bad role!"), offer, bearer(), "application/sdp", 400, "legs.invalid_role"),
        (endpoint(uuid), offer, bearer(), "text/plain", 415, "whip.unsupported_media_type"),
        (endpoint(uuid), "hello", bearer(), "application/sdp", 400, "whip.invalid_sdp"),
        (endpoint(fresh), "v=0\r\n", bearer(), "application/sdp", 406, "whip.offer_not_acceptable"),
        (endpoint(uuid), no_ice, bearer(), "application/sdp", 400, "whip.invalid_sdp"),
        (endpoint(uuid), offer.replace("a=setup:actpass", "a=setup:sideways"), bearer(), "application/sdp", 400, "whip.invalid_sdp"),
        (endpoint(uuid), offer.replace("m=audio", "m=video"), bearer(), "application/sdp", 406, "whip.offer_not_acceptable"),
        (endpoint(uuid), offer.replace("a=sendonly", "a=recvonly"), bearer(), "application/sdp", 406, "whip.offer_not_acceptable"),
        (endpoint(uuid), only_formats(offer, "9"), bearer(), "application/sdp", 406, "whip.offer_not_acceptable"),
    ]
    for url, sdp, headers, content_type, status, code in cases:
        got, body = await post_offer(server, url, sdp, headers, content_type)
        assert (got, body["error"]["code"]) == (status, code), (url, body)
    service = whip_service(server)
    assert service.open_count == 0 and not whip_tasks()
    # The one offer that got past the checks into aiortc left an ended leg, no live one.
    status, session, _ = await server.api("GET", f"/api/v1/sessions/{uuid}")
    assert all(leg["ended_at"] is not None for leg in session["legs"])
    assert server.engine.sessions[uuid].ended_legs == set(server.engine.sessions[uuid].legs)
    assert set(server.engine.sessions) == {uuid, other} and (await server.engine.catalog.session(fresh)) is None, \
        "a refused offer must not create a session"


async def test_whip_methods_other_than_post_and_delete(server):
    uuid = (await server.create_session())["uuid"]
    async with server.http.options(endpoint(uuid)) as response:
        assert response.status == 204 and response.headers["Accept-Post"] == "application/sdp"
    async with server.http.patch(endpoint(uuid) + "/leg_0123456789abcdef", data=b"a=end-of-candidates",
                                 headers={"Content-Type": "application/trickle-ice-sdpfrag", **bearer()}) as response:
        assert response.status == 501 and (await response.json())["error"]["code"] == "whip.patch_not_supported"
    async with server.http.get(endpoint(uuid), headers=bearer()) as response:
        assert response.status == 405
    async with server.http.delete(endpoint(uuid) + "/leg_0123456789abcdef", headers=bearer()) as response:
        assert response.status == 404 and (await response.json())["error"]["code"] == "whip.not_found"


async def test_the_publish_page_is_served(server):
    async with server.http.get("/whip/publish") as response:
        assert response.status == 200 and response.content_type == "text/html"
        assert '<script src="/whip/publish.js">' in await response.text()
    async with server.http.get("/whip/publish.js") as response:
        assert response.status == 200 and "javascript" in response.content_type
        assert "application/sdp" in await response.text()
