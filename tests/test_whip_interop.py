"""WHIP from other WebRTC stacks than aiortc, against a real server over loopback:
GStreamer's webrtcbin with its default offer (RSA certificate, `a=setup:actpass`) and
FFmpeg's WHIP muxer. Each recording holds what was sent: every RTP packet the client
sent is counted, the audio lasts as long as the file within one packet, and it
correlates with the file. Run as subprocesses: webrtcbin by the system Python
(python3-gi, Debian), ffmpeg from imageio-ffmpeg's build, which has `-f whip`."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
from pathlib import Path

import numpy as np
import pytest
from aiortc import RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack

from audio import silence, speech, tone, write_wav
from servers import APP1, Server
from test_whip import bearer, endpoint, recorded_audio, whip_service
from webhook_receiver import Receiver
from whip_client import active_span, align, client_pc, offer_for, wait_for

pytestmark = pytest.mark.timeout(90)

RATE = 16000
SYSTEM_PYTHON = "/usr/bin/python3"
GST_CLIENT = Path(__file__).parent / "gst_whip_client.py"


def _has_gstreamer_webrtc() -> bool:
    if not Path(SYSTEM_PYTHON).exists():
        return False
    probe = ("import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstWebRTC', '1.0');"
             "from gi.repository import Gst; Gst.init(None);"
             "gi.require_version('GstSdp', '1.0'); gi.require_version('Nice', '0.1');"
             "assert all(Gst.ElementFactory.find(e) for e in ('webrtcbin', 'opusenc', 'mulawenc', 'nicesrc'))")
    return subprocess.run([SYSTEM_PYTHON, "-c", probe], capture_output=True).returncode == 0


needs_gstreamer = pytest.mark.skipif(not _has_gstreamer_webrtc(), reason="GStreamer webrtcbin (make debian-deps) is not installed")


@pytest.fixture
async def server(tmp_path):
    async with Server(tmp_path) as srv:
        yield srv


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """Speech, then a tone loud up to the file's last sample: a leg that loses its last
    packets records a shorter tone."""
    tmp = tmp_path_factory.mktemp("interop")
    spoken = speech(tmp, "recording calls from other web r t c stacks", rate=RATE)
    samples = np.concatenate([silence(0.2, RATE), spoken, tone(440, 0.6, RATE, dbfs=-10)])
    return write_wav(tmp / "source.wav", samples, RATE), samples


async def run_client(*argv: str, timeout: float = 60) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return process.returncode, out.decode(), err.decode()


async def check_recording(server, recording_id: str, samples: np.ndarray, packet_s: float, min_corr: float, label: str) -> dict:
    audio, meta = await recorded_audio(server, recording_id)
    lag, corr = align(audio, samples)
    start, end = active_span(audio, RATE)
    want_start, want_end = active_span(samples, RATE)
    duration_error = (end - start) - (want_end - want_start)
    print(f"{label}: correlation {corr:.4f}, lag {lag / RATE:.3f} s, duration error {duration_error * 1000:+.1f} ms",)
    assert corr > min_corr
    assert abs(duration_error) <= packet_s + 0.005
    (leg,) = meta["legs"]
    assert leg["error"] is None and leg["lost"] == 0
    return leg


# Measured, idle: webrtcbin Opus 0.998, PCMU 0.996-0.997; ffmpeg Opus 0.9998. A leg that
# loses its last packets scores 0.96 (Opus, 20 ms) and 0.83 (PCMU, 128 ms).
GST_CASES = [("opus", 20, 0.98), ("pcmu", 20, 0.98), ("pcmu", 128, 0.98)]


@needs_gstreamer
@pytest.mark.parametrize("codec,ptime_ms,min_corr", GST_CASES, ids=[f"{c}-{p}ms" for c, p, _ in GST_CASES])
async def test_gstreamer_webrtcbin_default_offer_is_recorded_whole(server, source, codec, ptime_ms, min_corr):
    path, samples = source
    uuid = (await server.create_session())["uuid"]
    status, started = await server.command(uuid, "start", sample_rate=RATE)
    assert status == 202, started
    code, out, err = await run_client(SYSTEM_PYTHON, str(GST_CLIENT), server.base_url + endpoint(uuid), str(path),
                                      "--codec", codec, "--ptime-ms", str(ptime_ms), "--bearer", APP1["key"])
    assert code == 0 and out, (code, out[-2000:], err[-2000:])
    result = json.loads(out.splitlines()[-1])
    assert "a=setup:actpass" in result["offer"]
    assert "a=setup:passive" in result["answer"]
    assert result["post"] == 201 and result["delete"] == 200
    await wait_for(lambda: whip_service(server).open_count == 0, what="the peer connection to close")
    assert (await server.command(uuid, "stop"))[0] == 202
    leg = await check_recording(server, started["recording_id"], samples, ptime_ms / 1000, min_corr,
                                f"webrtcbin {codec} {ptime_ms} ms")
    assert leg["packets"] == result["packets"]


@needs_gstreamer
async def test_a_webrtcbin_that_insists_on_being_the_dtls_server_is_recorded(server, source):
    """An offer with `a=setup:passive` makes the server the DTLS client, which must then
    offer suites that webrtcbin's RSA certificate can serve."""
    path, samples = source
    uuid = (await server.create_session())["uuid"]
    status, started = await server.command(uuid, "start", sample_rate=RATE)
    assert status == 202, started
    code, out, err = await run_client(SYSTEM_PYTHON, str(GST_CLIENT), server.base_url + endpoint(uuid), str(path),
                                      "--codec", "pcmu", "--setup", "passive", "--bearer", APP1["key"])
    assert code == 0 and out, (code, out[-2000:], err[-2000:])
    result = json.loads(out.splitlines()[-1])
    assert "a=setup:passive" in result["offer"] and "a=setup:active" in result["answer"]
    await wait_for(lambda: whip_service(server).open_count == 0, what="the peer connection to close")
    assert (await server.command(uuid, "stop"))[0] == 202
    leg = await check_recording(server, started["recording_id"], samples, 0.02, 0.98, "webrtcbin pcmu, server active")
    assert leg["packets"] == result["packets"]


def _ffmpeg_with_whip() -> str | None:
    """imageio-ffmpeg's ffmpeg when it has the WHIP muxer (FFmpeg 8), else None."""
    try:
        import imageio_ffmpeg
    except ImportError:
        return None
    exe = imageio_ffmpeg.get_ffmpeg_exe()
    muxers = subprocess.run([exe, "-hide_banner", "-muxers"], capture_output=True, text=True).stdout
    return exe if any(line.split()[1:2] == ["whip"] for line in muxers.splitlines() if line.strip()) else None


FFMPEG = _ffmpeg_with_whip()


@pytest.mark.skipif(FFMPEG is None, reason="no ffmpeg with the WHIP muxer (imageio-ffmpeg >= 0.6)")
async def test_ffmpeg_whip_muxer_is_recorded_whole(server, source):
    path, samples = source
    uuid = (await server.create_session())["uuid"]
    status, started = await server.command(uuid, "start", sample_rate=RATE)
    assert status == 202, started
    code, out, err = await run_client(
        FFMPEG, "-hide_banner", "-loglevel", "info", "-re", "-i", str(path), "-ar", "48000", "-ac", "2",
        "-c:a", "libopus", "-frame_duration", "20", "-application", "audio",
        "-f", "whip", "-authorization", APP1["key"], server.base_url + endpoint(uuid))
    assert code == 0, err[-3000:]
    await wait_for(lambda: whip_service(server).open_count == 0, what="the peer connection to close")
    assert (await server.command(uuid, "stop"))[0] == 202
    leg = await check_recording(server, started["recording_id"], samples, 0.02, 0.98, "ffmpeg whip opus")
    sent = round(len(samples) / RATE / 0.02)
    assert abs(leg["packets"] - sent) <= 1


# -- a failed leg says so --------------------------------------------------------------

class NothingTrack(MediaStreamTrack):
    """An audio track that never yields a frame: the client connects and sends nothing."""

    kind = "audio"

    async def recv(self):
        await asyncio.Event().wait()


def refuse_every_server_cipher(pc) -> None:
    """Make this client's DTLS offer only RSA key exchange, which the server's ECDSA
    certificate cannot serve: the handshake ends with "no shared cipher"."""
    for certificate in pc._RTCPeerConnection__certificates:
        make_context = certificate._create_ssl_context

        def rsa_only(srtp_profiles, make_context=make_context):
            context = make_context(srtp_profiles)
            context.set_cipher_list(b"AES128-SHA")
            return context

        certificate._create_ssl_context = rsa_only


async def publish(server, uuid: str, pc, edit=None) -> str:
    """POST the client's offer (changed by `edit`, which also keeps the answer from the
    client when given: a client that never answers the server's checks)."""
    offer = await offer_for(pc)
    if edit is not None:
        offer = edit(offer)
    async with server.http.post(endpoint(uuid), data=offer, headers={**bearer(), "Content-Type": "application/sdp"}) as response:
        assert response.status == 201, await response.text()
        location = response.headers["Location"]
        answer = await response.text()
    if edit is None:
        await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
    return location


async def failed_leg(tmp_path, caplog, prepare, until_ended, edit=None,
                     connect_timeout_s: float | None = None) -> tuple[dict, dict, str, int]:
    """Publish with a client set up by `prepare(pc)`; return the recorded leg, the
    recording.completed payload, the session and the status of a DELETE after the end."""
    async with Receiver({"app1": APP1["webhook_secret"]}) as rx, Server(tmp_path, webhook_url=rx.url) as server:
        if connect_timeout_s is not None:
            whip_service(server).connect_timeout_s = connect_timeout_s
        uuid = (await server.create_session())["uuid"]
        status, started = await server.command(uuid, "start", sample_rate=RATE)
        assert status == 202, started
        pc = client_pc()
        prepare(pc)
        try:
            with caplog.at_level(logging.WARNING, logger="mediaserver.calls.whip"):
                location = await publish(server, uuid, pc, edit)
                leg_id = location.rsplit("/", 1)[1]
                await until_ended(server, leg_id, location)
                await wait_for(lambda: whip_service(server).open_count == 0, what="the leg to end")
        finally:
            await pc.close()
        async with server.http.delete(location, headers=bearer()) as response:
            after = response.status
        assert (await server.command(uuid, "stop"))[0] == 202
        meta = await server.wait_recording(started["recording_id"])
        await wait_for(lambda: rx.of_kind("recording.completed"), what="recording.completed")
        (leg,) = meta["legs"]
        return leg, rx.of_kind("recording.completed")[0]["payload"], uuid, after


async def ends_by_itself(server, leg_id: str, location: str) -> None:
    await wait_for(lambda: whip_service(server).get(leg_id) is None, timeout=20, what="the failed leg to end")


async def connected_then_deleted(server, leg_id: str, location: str) -> None:
    await wait_for(lambda: whip_service(server).get(leg_id).connection_state == "connected", what="the connection")
    await asyncio.sleep(0.5)
    async with server.http.delete(location, headers=bearer()) as response:
        assert response.status == 200


def warned(caplog, uuid: str, reason: str) -> bool:
    return any(r.levelno == logging.WARNING and uuid in r.getMessage() and reason in r.getMessage() for r in caplog.records)


async def test_a_leg_whose_dtls_fails_is_reported_failed(tmp_path, caplog):
    def prepare(pc):
        pc.addTransceiver(NothingTrack(), direction="sendonly")
        refuse_every_server_cipher(pc)

    leg, completed, uuid, after = await failed_leg(tmp_path, caplog, prepare, ends_by_itself)
    assert leg["error"] == "dtls_failed" and leg["packets"] == 0
    assert completed["failed_legs"] == [{"leg_id": leg["leg_id"], "role": "caller", "error": "dtls_failed"}]
    assert warned(caplog, uuid, "dtls_failed")
    assert after == 404


async def test_a_leg_that_connects_and_sends_nothing_reports_no_media(tmp_path, caplog):
    leg, completed, uuid, after = await failed_leg(
        tmp_path, caplog, lambda pc: pc.addTransceiver(NothingTrack(), direction="sendonly"), connected_then_deleted)
    assert leg["error"] == "no_media" and leg["packets"] == 0
    assert completed["failed_legs"] == [{"leg_id": leg["leg_id"], "role": "caller", "error": "no_media"}]
    assert warned(caplog, uuid, "no_media")
    assert after == 404


def without_candidates(offer: str) -> str:
    """The offer with no ICE candidate: the server has no pair to check."""
    lines = [line for line in offer.split("\r\n") if not line.startswith("a=candidate:")]
    return "\r\n".join(lines)


async def test_a_leg_whose_ice_never_connects_is_reported_failed(tmp_path, caplog):
    """No candidate pair: ICE never gets going, and the leg ends at the connect timeout."""
    leg, completed, uuid, after = await failed_leg(
        tmp_path, caplog, lambda pc: pc.addTransceiver(NothingTrack(), direction="sendonly"), ends_by_itself,
        edit=without_candidates, connect_timeout_s=2.0)
    assert leg["error"] == "ice_failed" and leg["packets"] == 0
    assert completed["failed_legs"] == [{"leg_id": leg["leg_id"], "role": "caller", "error": "ice_failed"}]
    assert warned(caplog, uuid, "ice_failed")
    assert after == 404
