"""Real SIPp calls the server: recordings as long as what was sent, RFC 4733 digits,
re-INVITE, CANCEL, a server-side hangup and many concurrent calls."""

from __future__ import annotations

import asyncio
import os
import struct

import numpy as np
import pytest
from audio import best_lag, noise, tone, write_wav
from servers import Server, free_udp_range
from sip_peers import (
    PCAPS,
    LegWatcher,
    first_call,
    recordings,
    run_sipp,
    scenario,
    sender_sets,
    sipp_available,
)

from mediaserver.api.keys import SERVICES
from mediaserver.codecs import g711

pytestmark = pytest.mark.skipif(not sipp_available(), reason="SIPp (sip-tester) is not installed")

RATE = 8000
TOLERANCE_S = 0.06
SLIP = RATE * 25 // 1000  # how far a realigned stretch may sit from where it was sent


def pcap_payloads(path) -> bytes:
    """The RTP payloads of a classic pcap of Ethernet/IPv4/UDP/RTP packets, in order."""
    data = path.read_bytes()
    order = "<" if struct.unpack("<I", data[:4])[0] in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    at, payloads = 24, []
    while at < len(data):
        _, _, length, _ = struct.unpack(order + "IIII", data[at:at + 16])
        frame = data[at + 16:at + 16 + length]
        ip = 14
        udp = ip + (frame[ip] & 0x0F) * 4
        rtp = frame[udp + 8:]
        payloads.append(rtp[12 + 4 * (rtp[0] & 0x0F):])
        at += 16 + length
    return b"".join(payloads)


def ulaw_file(tmp_path, samples: np.ndarray):
    path = tmp_path / "audio.ulaw"
    path.write_bytes(g711.encode_ulaw(samples))
    return path


@pytest.mark.skipif(os.geteuid() != 0, reason="SIPp replays captures through a raw socket, which needs root")
@pytest.mark.timeout(90)
async def test_pcma_capture_and_rfc4733_digits(tmp_path):
    """SIPp replays its PCMA capture, then the RFC 4733 captures of 1, 2 and #: the audio
    is in the recording sample for sample, the digits arrive once each, and # (the
    finish key) ends the recording where its event began."""
    async with Server(tmp_path, record_policy="all", default_finish_on_key="#") as server, LegWatcher(server) as watcher:
        result = await run_sipp(server, scenario(tmp_path, "uac_pcma_dtmf.xml"), tmp_path)
        assert result.returncode == 0, result.output
        [recording] = await recordings(server)
    assert watcher.key_presses() == ["1", "2", "#"]
    assert recording.meta["termination_reason"] == "finish_key" and recording.meta["finish_key"] == "#"
    sent = g711.decode_alaw(pcap_payloads(PCAPS / "g711a.pcap"))
    audio = recording.audio[:, 0]
    lag, score = best_lag(audio[:RATE // 2], sent[:RATE // 2], RATE // 4)
    assert lag >= 0 and score > 0.999
    assert np.array_equal(audio[lag:lag + len(sent)], sent)  # every sample, in place
    # The scenario plays # 7.1 + 0.3 + 0.3 s after the capture started.
    assert recording.meta["duration"] == pytest.approx(lag / RATE + 7.7, abs=TOLERANCE_S)


@pytest.mark.parametrize("transport", ["u1", "t1"])
async def test_pcmu_rtp_stream_call(tmp_path, transport):
    """A PCMU call over UDP or TCP signalling: the recording holds what was streamed and
    lasts until the BYE (which SIPp sends 100 ms after the stream's end)."""
    sent = noise(2.0, seed=3, dbfs=-18)
    path = scenario(tmp_path, "uac_pcmu_rtpstream.xml", ulaw_file=ulaw_file(tmp_path, sent))
    async with Server(tmp_path, record_policy="all") as server:
        result = await run_sipp(server, path, tmp_path, transport=transport, sets={"call_ms": 2100})
        assert result.returncode == 0, result.output
        [recording] = await recordings(server)
    [leg] = recording.meta["legs"]
    assert leg["role"] == "caller" and leg["lost"] == 0 and leg["malformed"] == 0
    start = leg["first_ms"] / 1000
    assert recording.meta["duration"] == pytest.approx(start + 2.1, abs=TOLERANCE_S)
    assert leg["audio_ms"] / 1000 == pytest.approx(2.0, abs=TOLERANCE_S)
    lag, score = best_lag(recording.audio[:, 0], g711.decode_ulaw(g711.encode_ulaw(sent)), RATE // 5)
    assert score > 0.99 and abs(lag / RATE - start) < 0.002


async def test_record_policy_api_waits_for_record_start(tmp_path):
    """With record_policy = api a call is a session without a recording until the API
    starts one; it then records from that moment, with the options given."""
    sent = noise(3.0, seed=4, dbfs=-18)
    path = scenario(tmp_path, "uac_pcmu_rtpstream.xml", ulaw_file=ulaw_file(tmp_path, sent))
    async with Server(tmp_path, record_policy="api") as server:
        sipp = asyncio.create_task(run_sipp(server, path, tmp_path, sets={"call_ms": 3100}))
        uuid = await first_call(server)
        await asyncio.sleep(1.0)
        _, session, _ = await server.api("GET", f"/api/v1/sessions/{uuid}")
        assert (session["source"], session["recording_id"]) == ("sip", None)
        assert session["metadata"]["sip"]["request_uri"].startswith("sip:app1@")
        status, started = await server.command(uuid, "start", format="mp3")
        assert status == 202
        result = await sipp
        assert result.returncode == 0, result.output
        [recording] = await recordings(server)
    assert recording.meta["recording_id"] == started["recording_id"] and recording.meta["format"] == "mp3"
    [leg] = recording.meta["legs"]
    assert recording.meta["duration"] == pytest.approx(2.0, abs=0.25)  # the call's last two seconds or so
    assert leg["first_ms"] == 0  # the leg was already sending


@pytest.mark.timeout(60)
async def test_reinvite_hold_new_port_and_codec_change(tmp_path):
    """Hold by re-INVITE, then back on another port with PCMA only: one session, one leg,
    one recording, with both stretches of audio where they were sent."""
    first, second = tone(440, 1.5), tone(1000, 1.5)
    wavs = {"wav1": write_wav(tmp_path / "first.wav", first), "wav2": write_wav(tmp_path / "second.wav", second)}
    sport1, sport2 = free_udp_range(4)[0], free_udp_range(4)[0]
    sets = {**sender_sets(**wavs), "sport1": sport1, "sport2": sport2, "delay1": 0.6, "delay2": 3.6,
            "hold_ms": 2300, "resume_ms": 3300, "bye_ms": 5400}
    async with Server(tmp_path, record_policy="all") as server, LegWatcher(server) as watcher:
        result = await run_sipp(server, scenario(tmp_path, "uac_reinvite.xml"), tmp_path, sets=sets)
        assert result.returncode == 0, result.output
        [recording] = await recordings(server)
    [leg] = watcher.legs.values()
    assert leg.endpoint.stats.relatched == 1  # the new source port was taken up
    assert [codec.name for codec in leg.stream.formats.values()] == ["PCMA", "telephone-event"]
    [stats] = recording.meta["legs"]
    assert stats["audio_ms"] / 1000 == pytest.approx(3.0, abs=TOLERANCE_S)
    audio = recording.audio[:, 0]
    lag1, score1 = best_lag(audio, first, 2 * RATE)
    start2 = lag1 + round(3.0 * RATE)  # the senders start 3.0 s apart (delay2 - delay1)
    lag2, score2 = best_lag(audio[start2 - RATE // 2:], second, RATE)
    assert score1 > 0.95 and score2 > 0.95
    assert abs(lag2 - RATE // 2) < 0.05 * RATE  # the second stretch is where it was sent
    silent = audio[lag1 + len(first) + RATE // 10:start2 - RATE]  # on hold: nothing
    assert np.abs(silent).max() == 0


async def test_cancel_while_ringing(tmp_path):
    """CANCEL before the answer: 200 for the CANCEL, 487 for the INVITE, no session left."""
    async with Server(tmp_path, record_policy="all", sip_answer_delay_ms=1500) as server:
        result = await run_sipp(server, scenario(tmp_path, "uac_cancel.xml"), tmp_path)
        assert result.returncode == 0, result.output
        status, sessions, _ = await server.api("GET", "/api/v1/sessions")
        assert status == 200 and sessions["data"] == []
        assert not server.app[SERVICES]["sip"].calls and not server.app[SERVICES]["rtp"].legs


async def test_server_hangs_up_when_the_session_is_deleted(tmp_path):
    """DELETE /api/v1/sessions/{uuid} on a SIP call sends BYE in the dialog."""
    path = scenario(tmp_path, "uac_server_hangup.xml", ulaw_file=ulaw_file(tmp_path, tone(440, 1.0)))
    async with Server(tmp_path, record_policy="all") as server:
        sipp = asyncio.create_task(run_sipp(server, path, tmp_path, timeout_s=20))
        uuid = await first_call(server)
        await asyncio.sleep(1.0)
        status, _, _ = await server.api("DELETE", f"/api/v1/sessions/{uuid}")
        assert status == 202
        result = await sipp
        assert result.returncode == 0, result.output
        [recording] = await recordings(server)
    assert recording.meta["termination_reason"] == "hangup"
    assert recording.meta["duration"] == pytest.approx(1.0, abs=0.25)


@pytest.mark.timeout(90)
async def test_many_concurrent_calls(tmp_path):
    """50 calls at once, each streaming 3 s: 50 recordings of 3 s, nothing lost, every
    half second of what was sent found where it was sent (SIPp sends a call's first
    packet late under load; the leg is then realigned to the shared clock, once, by
    less than a packet's worth)."""
    calls = 50
    sent = noise(3.0, seed=9, dbfs=-18)
    path = scenario(tmp_path, "uac_load.xml", ulaw_file=ulaw_file(tmp_path, sent))
    low, high = free_udp_range(4 * calls + 8)
    async with Server(tmp_path, record_policy="all", rtp_port_min=low, rtp_port_max=high) as server:
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, len(server.app[SERVICES]["sip"].calls))
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch())
        # Each call lasts 100 ms longer than its file, so that a stream SIPp starts late
        # still ends before the BYE.
        result = await run_sipp(server, path, tmp_path, calls=calls, sets={"call_ms": 3100}, timeout_s=60)
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        assert result.returncode == 0, result.output
        found = await recordings(server, sessions=calls)
    assert peak == calls
    assert len(found) == calls
    sent = g711.decode_ulaw(g711.encode_ulaw(sent))
    for recording in found:
        [leg] = recording.meta["legs"]
        assert leg["lost"] == 0 and leg["malformed"] == 0
        first = leg["first_ms"] / 1000
        assert leg["audio_ms"] / 1000 == pytest.approx(3.0, abs=TOLERANCE_S)
        # The recording ends with the audio, or with the hangup (less the mix delay) if later.
        assert first + 3.0 - TOLERANCE_S <= recording.meta["duration"] <= max(first + 3.0, 3.1) + TOLERANCE_S
        misplaced = []
        for start in range(0, len(sent) - RATE // 2, RATE // 2):
            expected = round(first * RATE) + start
            lag, score = best_lag(recording.audio[expected - SLIP:, 0], sent[start:start + RATE // 2], 2 * SLIP)
            if score < 0.95 or abs(lag - SLIP) > SLIP:
                misplaced.append((start, lag, score))
        assert len(misplaced) <= 1, misplaced  # the one a realignment cut through
