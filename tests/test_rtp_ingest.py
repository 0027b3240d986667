"""RTP legs by SDP offer/answer over the API, fed by a Python sender over loopback:
every codec, a stream with reordering, loss, duplicates, a timestamp jump, an SSRC change,
a marker-bit restart and malformed packets, RFC 4733 digits, RTCP and latching."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import struct

import numpy as np
import pytest
import soundfile

from audio import best_lag, correlation, noise, tone
from mediaserver.api.keys import CATALOG, SERVICES
from mediaserver.rtp.events import TelephoneEvent
from mediaserver.rtp.packet import RtcpPacket, RtpPacket
from rtp_sender import Impairments, Planned, impair, packetize, send_async
from servers import Server, free_udp_range
from sip_peers import FIXTURES

RATE = 8000
OFFER = ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
         "m=audio {port} RTP/AVP {formats}\r\n{lines}")


def offer(port: int, formats: str = "0 101", lines: str = "a=rtpmap:101 telephone-event/8000\r\n") -> str:
    return OFFER.format(port=port, formats=formats, lines=lines)


@pytest.fixture
def sock():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        sender.bind(("127.0.0.1", 0))
        yield sender


async def add_leg(server: Server, uuid: str, role: str, sdp: str) -> tuple[str, int, str]:
    status, data, _ = await server.api("POST", f"/api/v1/sessions/{uuid}/legs", json={"role": role, "sdp": sdp})
    assert status == 201, data
    port = int(data["sdp"].split("m=audio ")[1].split()[0])
    return data["leg_id"], port, data["sdp"]


async def recorded(server: Server, recording_id: str) -> tuple[dict, np.ndarray]:
    meta = await server.wait_recording(recording_id)
    audio, _ = soundfile.read(io.BytesIO(await server.download(recording_id)), dtype="int16", always_2d=True)
    return meta, audio


# -- offer/answer over the API ----------------------------------------------------------


async def test_answer_chooses_supported_codecs_in_the_offer_order(tmp_path, sock):
    async with Server(tmp_path) as server:
        uuid = (await server.create_session())["uuid"]
        sdp = offer(sock.getsockname()[1], "18 8 0 96 101", "a=rtpmap:18 G729/8000\r\na=rtpmap:96 opus/48000/2\r\n"
                    "a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\na=ptime:20\r\na=sendrecv\r\n")
        leg_id, port, answer = await add_leg(server, uuid, "caller", sdp)
        assert answer.split("\r\n")[5:] == [
            f"m=audio {port} RTP/AVP 8 0 96 101", "a=rtpmap:8 PCMA/8000", "a=rtpmap:0 PCMU/8000",
            "a=rtpmap:96 opus/48000/2", "a=rtpmap:101 telephone-event/8000", "a=fmtp:101 0-16", "a=ptime:20",
            "a=recvonly", ""]
        low, high = server.config.rtp_port_min, server.config.rtp_port_max
        assert low <= port <= high and port % 2 == 0
        status, session, _ = await server.api("GET", f"/api/v1/sessions/{uuid}")
        assert [(leg["leg_id"], leg["role"], leg["kind"]) for leg in session["legs"]] == [(leg_id, "caller", "rtp")]


@pytest.mark.parametrize("body, status, code, message", [
    ({"role": "caller"}, 400, "sdp.missing", "sdp must be the SDP offer as a string"),
    ({"role": "caller", "sdp": "v=0\r\nnonsense\r\n"}, 400, "sdp.invalid", "SDP line 2 is not <type>=<value>: 'nonsense'"),
    ({"role": "caller", "sdp": offer(4000, "3", "")}, 400, "sdp.not_acceptable",
     "the offer has no audio stream with a codec this server receives"),
    ({"role": "no spaces", "sdp": offer(4000)}, 400, "legs.invalid_role", "role must be 1-64 letters, digits, '_' or '-'"),
    ({"role": "caller", "sdp": offer(4000), "codec": "x"}, 400, "request.invalid_body", "unknown field: codec"),
    (["not", "an", "object"], 400, "request.invalid_body", "the body must be a JSON object"),
])
async def test_bad_offers(tmp_path, body, status, code, message):
    async with Server(tmp_path) as server:
        uuid = (await server.create_session())["uuid"]
        got, data, _ = await server.api("POST", f"/api/v1/sessions/{uuid}/legs", json=body)
        assert (got, data["error"]["code"], data["error"]["message"]) == (status, code, message)


async def test_every_malformed_sdp_fixture_is_refused_with_its_error(tmp_path):
    expected = json.loads((FIXTURES / "sdp" / "expected.json").read_text())
    async with Server(tmp_path) as server:
        uuid = (await server.create_session())["uuid"]
        for name, case in sorted(expected.items()):
            sdp = (FIXTURES / "sdp" / name).read_bytes().decode()
            status, data, _ = await server.api("POST", f"/api/v1/sessions/{uuid}/legs", json={"role": "caller", "sdp": sdp})
            if "error" in case:
                message = case["error"] if sdp.strip() else "sdp must be the SDP offer as a string"
                assert (status, data["error"]["message"]) == (400, message), name
            elif case.get("not_acceptable"):
                assert (status, data["error"]["code"]) == (400, "sdp.not_acceptable"), name
            else:
                assert status == 201, (name, data)
        status, _, _ = await server.api("GET", f"/api/v1/sessions/{uuid}")
        assert status == 200


async def test_port_range_exhausted_is_503(tmp_path):
    low, _ = free_udp_range(4)
    async with Server(tmp_path, rtp_port_min=low, rtp_port_max=low + 1) as server:
        uuid = (await server.create_session())["uuid"]
        await add_leg(server, uuid, "caller", offer(4000))
        status, data, _ = await server.api("POST", f"/api/v1/sessions/{uuid}/legs", json={"role": "callee", "sdp": offer(4002)})
        assert (status, data["error"]["code"]) == (503, "rtp.no_ports")


# -- codecs -------------------------------------------------------------------------------

CODECS = [  # name, SDP formats and rtpmap, payload type, clock, the sender's sample rate
    ("PCMU", "0", "", 0, None, 8000),
    ("PCMA", "8", "", 8, None, 8000),
    ("G722", "9", "", 9, None, 16000),
    ("opus", "111", "a=rtpmap:111 opus/48000/2\r\n", 111, 48000, 48000),
    ("L16", "97", "a=rtpmap:97 L16/16000\r\n", 97, 16000, 16000),
    ("L16", "98", "a=rtpmap:98 L16/8000\r\n", 98, 8000, 8000),
]


@pytest.mark.parametrize("codec, formats, rtpmap, pt, clock, rate", CODECS, ids=[f"{c[0]}-{c[5]}" for c in CODECS])
async def test_every_codec_is_recorded(tmp_path, sock, codec, formats, rtpmap, pt, clock, rate):
    """One second of a 700 Hz tone in each codec: one second of that tone recorded."""
    async with Server(tmp_path) as server:
        uuid = (await server.create_session())["uuid"]
        _, port, _ = await add_leg(server, uuid, "caller", offer(sock.getsockname()[1], formats, rtpmap))
        status, started = await server.command(uuid, "start", sample_rate=16000)
        assert status == 202
        plan = packetize(tone(700, 1.0, rate), codec, pt, rate=rate, clock_rate=clock)
        await send_async([(plan, ("127.0.0.1", port))], sock)
        await asyncio.sleep(0.1)
        await server.api("DELETE", f"/api/v1/sessions/{uuid}")
        meta, audio = await recorded(server, started["recording_id"])
    [leg] = meta["legs"]
    assert (leg["packets"], leg["lost"], leg["malformed"], leg["decode_errors"]) == (50, 0, 0, 0)
    assert leg["audio_ms"] == pytest.approx(1000, abs=30)  # codec delay (Opus, resampling) moves the edges
    start = round(leg["first_ms"] * 16)
    body = audio[start + 1600:start + 14400, 0].astype(np.float64)  # the middle, past codec warm-up
    spectrum = np.abs(np.fft.rfft(body * np.hanning(len(body))))
    assert np.argmax(spectrum) * 16000 / len(body) == pytest.approx(700, abs=5)


# -- a hard network -------------------------------------------------------------------------

MALFORMED = [
    b"\x80\x00\x00",  # shorter than the fixed header
    bytes([0x40, 0]) + bytes(10),  # version 1
    bytes([0xA0, 0]) + bytes(10) + b"\x00\x00\x09",  # padding longer than the payload
    bytes([0x90, 0]) + bytes(10) + b"\x00\x01\x00\x09",  # extension longer than the packet
    bytes([0x8F, 0]) + bytes(10),  # 15 CSRCs announced, none present
]


def rtcp_receiver_report(ssrc: int) -> bytes:
    return bytes(RtcpPacket(201, 0, struct.pack("!I", ssrc))) + bytes(RtcpPacket(202, 1, struct.pack("!IBB", ssrc, 1, 1) + b"a\x00"))


@pytest.mark.timeout(60)
async def test_impaired_streams_are_recorded_whole_and_aligned(tmp_path, sock):
    """Two legs over loopback for 6 s. The caller's packets are reordered and duplicated;
    the callee's are also 5% lost, jump in timestamp at 2 s, change SSRC at 4 s and
    restart (marker bit, new sequence and timestamps) at 5 s; malformed datagrams and
    RTCP arrive in between. The recording is as long as what was sent, every second of
    each leg sits where it was sent (within 20 ms), and the counters say what happened."""
    seconds = 6.0
    caller, callee = noise(seconds, seed=41, dbfs=-16), noise(seconds, seed=42, dbfs=-16)
    async with Server(tmp_path) as server:
        uuid = (await server.create_session())["uuid"]
        legs = [await add_leg(server, uuid, role, offer(sock.getsockname()[1])) for role in ("caller", "callee")]
        status, started = await server.command(uuid, "start", channels=2)
        assert status == 202
        caller_plan = impair(packetize(caller, ssrc=0xCA11E5), Impairments(reorder=0.05, duplicate=0.05, seed=3))
        harsh = Impairments(loss=0.05, duplicate=0.05, reorder=0.05, timestamp_jump_at=2.0, ssrc_change_at=4.0,
                            marker_restart_at=5.0, seed=4)
        callee_plan = impair(packetize(callee, ssrc=0xCA11EE), harsh)
        junk = [Planned(0.5 + i * 0.7, _Raw(data), -1) for i, data in enumerate(MALFORMED)]
        junk.append(Planned(1.0, _Raw(rtcp_receiver_report(0xCA11E5)), -1))
        rtcp = [Planned(1.5, _Raw(rtcp_receiver_report(0xCA11EE)), -1), Planned(3.5, _Raw(b"\x80\xc9\x00\x09"), -1)]
        await send_async([(caller_plan, ("127.0.0.1", legs[0][1])), (callee_plan, ("127.0.0.1", legs[1][1])),
                          (junk, ("127.0.0.1", legs[1][1])), (rtcp, ("127.0.0.1", legs[1][1] + 1))], sock)
        stats = {leg.role: leg for leg in server.app[SERVICES]["rtp"].legs.values()}
        timelines = {role: leg.receiver.timeline for role, leg in stats.items()}
        await server.api("DELETE", f"/api/v1/sessions/{uuid}")  # the call ends with what was sent
        meta, audio = await recorded(server, started["recording_id"])
        kept = {leg["role"]: leg["stats"] for leg in await server.app[CATALOG].legs(uuid)}
    lost = detectable_losses(harsh.log["lost"], [0, 200, 250, 300])  # restarts at 4 s and 5 s
    by_role = {leg["role"]: leg for leg in meta["legs"]}
    assert by_role["caller"]["lost"] == 0 and by_role["callee"]["lost"] == lost
    assert by_role["callee"]["malformed"] == len(MALFORMED)
    assert timelines["callee"].ssrc_changes == 1 and timelines["callee"].reanchored >= 2
    assert timelines["caller"].duplicates > 0 and timelines["callee"].duplicates > 0
    assert kept["callee"]["rtcp_packets"] == 4 and kept["callee"]["rtcp_malformed"] == 1  # RR+SDES twice, one torn
    first = by_role["caller"]["first_ms"] / 1000
    assert meta["duration"] == pytest.approx(first + seconds, abs=0.06)
    assert by_role["caller"]["audio_ms"] == pytest.approx(seconds * 1000, abs=1)
    assert longest_silence(audio[round(first * RATE):round(first * RATE) + len(caller), 0]) < 8  # reordering left no hole
    # Every second of each leg where it was sent: aligned to the shared clock and to each other.
    padded = np.concatenate((np.zeros((400, 2), dtype=np.int16), audio))
    for channel, sent in ((0, caller), (1, callee)):
        for second in range(int(seconds)):
            piece = sent[second * RATE:(second + 1) * RATE]
            at = round(first * RATE) + second * RATE  # in `audio`; 400 more in `padded`
            lag, score = best_lag(padded[at:at + RATE + 800, channel], piece, 800)
            assert abs(lag - 400) <= RATE * 0.02 and score > 0.9, (channel, second, lag - 400, score)
    assert abs(correlation(audio[:, 0], audio[:, 1])) < 0.05


def longest_silence(samples: np.ndarray) -> int:
    """The longest run of exact zeros (what the mixer puts where nothing arrived)."""
    zero = np.concatenate(([0], (samples == 0).astype(np.int8), [0]))
    edges = np.flatnonzero(np.diff(zero))
    return int((edges[1::2] - edges[::2]).max()) if len(edges) else 0


def detectable_losses(lost: list[int], bounds: list[int]) -> int:
    """Lost packets a receiver can count: not at the very start or end of a stream
    (a sender restart begins a new sequence, so losses at its edges leave no gap)."""
    count = 0
    for start, end in zip(bounds, bounds[1:]):
        inside = sorted(i for i in lost if start <= i < end)
        while inside and inside[0] == start:
            inside.pop(0)
            start += 1
        while inside and inside[-1] == end - 1:
            inside.pop()
            end -= 1
        count += len(inside)
    return count


class _Raw:
    """A datagram that is not an RtpPacket, for the sender's plan."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __bytes__(self) -> bytes:
        return self.data


async def test_rfc4733_finish_key_on_the_audio_stream(tmp_path, sock):
    """A telephone-event sharing the audio's SSRC and clock: the finish key ends the
    recording exactly where the event's timestamp puts it; every repeat counts once."""
    async with Server(tmp_path) as server:
        uuid = (await server.create_session())["uuid"]
        _, port, _ = await add_leg(server, uuid, "caller", offer(sock.getsockname()[1]))
        status, started = await server.command(uuid, "start", finish_on_key="#")
        plan = packetize(noise(3.0, seed=5), ssrc=77, seq=100, timestamp=1000)
        events = []
        for digit, at in (("4", 1.0), ("#", 2.0)):  # each press: 5 reports, the end three times
            index = round(at / 0.02)
            stamp = 1000 + index * 160
            for n in range(8):
                report = TelephoneEvent("0123456789*#".index(digit), n >= 5, 10, min(n, 5) * 160)
                events.append(Planned(at + min(n, 5) * 0.02, RtpPacket(101, 0, stamp, 77, bytes(report), n == 0), -1))
        plan = [item for item in plan if not any(abs(item.at - e.at) < 0.001 for e in events)]
        merged = sorted(plan + events, key=lambda item: item.at)
        for seq, item in enumerate(merged):
            item.packet.sequence_number = 100 + seq  # events take their place in the sequence
        await send_async([(merged, ("127.0.0.1", port))], sock)
        await asyncio.sleep(0.1)
        [leg] = server.app[SERVICES]["rtp"].legs.values()
        presses = list(leg.receiver.stats.key_presses)
        lost = leg.receiver.counters.lost
        await server.api("DELETE", f"/api/v1/sessions/{uuid}")
        meta, audio = await recorded(server, started["recording_id"])
    assert presses == ["4", "#"] and lost == 0
    assert meta["termination_reason"] == "finish_key" and meta["finish_key"] == "#"
    first = meta["legs"][0]["first_ms"] / 1000
    assert meta["duration"] == pytest.approx(first + 2.0, abs=0.001)


async def test_symmetric_latching(tmp_path, sock):
    """The first source is the peer; another one is dropped while the peer is heard."""
    async with Server(tmp_path) as server:
        uuid = (await server.create_session())["uuid"]
        _, port, _ = await add_leg(server, uuid, "caller", offer(9))  # what SDP says is not used
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as intruder:
            intruder.bind(("127.0.0.1", 0))
            plan = packetize(tone(500, 0.5))
            other = packetize(tone(900, 0.5), ssrc=0xBAD)
            await send_async([(plan, ("127.0.0.1", port))], sock)
            await send_async([(other[:10], ("127.0.0.1", port))], intruder)
            await asyncio.sleep(0.05)
            [leg] = server.app[SERVICES]["rtp"].legs.values()
            assert leg.endpoint.peer == sock.getsockname()
            assert leg.endpoint.stats.foreign == 10 and leg.receiver.counters.packets == 25


async def test_receive_path_survives_a_flood_of_garbage(tmp_path, sock):
    """Random datagrams never stop the receive loop; good packets after them are kept."""
    rng = np.random.default_rng(1)
    async with Server(tmp_path) as server:
        uuid = (await server.create_session())["uuid"]
        _, port, _ = await add_leg(server, uuid, "caller", offer(sock.getsockname()[1], "0 96 101",
                                                                  "a=rtpmap:96 opus/48000/2\r\na=rtpmap:101 telephone-event/8000\r\n"))
        rtcp = 0
        for index in range(2000):
            data = rng.integers(0, 256, int(rng.integers(0, 300)), dtype=np.uint8).tobytes()
            rtcp += len(data) > 1 and 192 <= data[1] <= 223  # RFC 5761: these go to RTCP
            sock.sendto(data, ("127.0.0.1", port))
            if index % 20 == 0:
                await asyncio.sleep(0.001)  # not faster than the socket buffer takes them
        await asyncio.sleep(0.2)
        good = packetize(tone(500, 0.2), ssrc=5)
        await send_async([(good, ("127.0.0.1", port))], sock)
        await asyncio.sleep(0.1)
        [leg] = server.app[SERVICES]["rtp"].legs.values()
        counters = leg.receiver.counters
        assert counters.malformed > 0 and counters.packets + counters.malformed == 2000 - rtcp + len(good)
        assert leg.receiver.timeline.received >= len(good)
        assert not leg.endpoint.closed
        status, _, _ = await server.api("GET", "/healthz")
        assert status == 200
