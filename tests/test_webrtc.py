"""The WebRTC layer on its own: SDP offer checks, frame conversion, gap filling, ICE
addresses, and the service's bookkeeping with a real aiortc peer on loopback."""

from __future__ import annotations

import asyncio
import fractions

import av
import numpy as np
import pytest

from mediaserver.errors import CodecError, Unavailable
from mediaserver.media import PcmFrame
from mediaserver.webrtc import Offer, OfferError, WhipService
from mediaserver.webrtc.audio import FrameClock, mono_s16
from mediaserver.webrtc.ice import addresses_for
from whip_client import client_pc, offer_for, only_formats, wait_for

# The shape of Chromium's audio-only WHIP offer (sendonly, bundle, mux, Opus first).
CHROMIUM_OFFER = "\r\n".join([
    "v=0", "o=- 4611731400430051336 2 IN IP4 127.0.0.1", "s=-", "t=0 0",
    "a=group:BUNDLE 0", "a=extmap-allow-mixed", "a=msid-semantic: WMS stream",
    "m=audio 45210 UDP/TLS/RTP/SAVPF 111 63 9 0 8 13 110 126",
    "c=IN IP4 127.0.0.1", "a=rtcp:9 IN IP4 0.0.0.0",
    "a=candidate:1 1 udp 2122260223 127.0.0.1 45210 typ host generation 0 network-id 1",
    "a=ice-ufrag:Abcd", "a=ice-pwd:0123456789abcdefghijklmn", "a=ice-options:trickle",
    "a=fingerprint:sha-256 3A:4F:10:9C:2B:77:0E:51:AA:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89",
    "a=setup:actpass", "a=mid:0",
    "a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level", "a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid",
    "a=sendonly", "a=msid:stream track", "a=rtcp-mux", "a=rtcp-rsize",
    "a=rtpmap:111 opus/48000/2", "a=rtcp-fb:111 transport-cc", "a=fmtp:111 minptime=10;useinbandfec=1",
    "a=rtpmap:63 red/48000/2", "a=fmtp:63 111/111", "a=rtpmap:9 G722/8000", "a=rtpmap:0 PCMU/8000",
    "a=rtpmap:8 PCMA/8000", "a=rtpmap:13 CN/8000", "a=rtpmap:110 telephone-event/48000",
    "a=rtpmap:126 telephone-event/8000", "a=ssrc:2230591733 cname:abc", "",
])


def change(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new)


# -- the offer ---------------------------------------------------------------------------


def test_a_chromium_offer_is_accepted():
    offer = Offer.parse(CHROMIUM_OFFER)
    assert offer.audio.kind == "audio" and offer.audio.direction == "sendonly" and offer.audio.rtcp_mux
    assert offer.audio.codec_names()[:2] == ["opus/48000", "red/48000"]
    assert offer.audio.attributes["ice-ufrag"] == "Abcd"


def test_session_level_ice_and_dtls_attributes_apply_to_every_section():
    lines = CHROMIUM_OFFER.split("\r\n")
    moved = [line for line in lines if line.startswith(("a=ice-ufrag", "a=ice-pwd", "a=fingerprint"))]
    rest = [line for line in lines if line not in moved]
    at = rest.index("a=group:BUNDLE 0")
    offer = Offer.parse("\r\n".join(rest[:at] + moved + rest[at:]))
    assert offer.audio.attributes["ice-pwd"] == "0123456789abcdefghijklmn"


def test_static_payload_types_need_no_rtpmap():
    text = only_formats(CHROMIUM_OFFER, "0")
    assert "a=rtpmap:0" in text
    text = text.replace("a=rtpmap:0 PCMU/8000\r\n", "")
    assert Offer.parse(text).audio.codec_names() == ["pcmu/8000"]


@pytest.mark.parametrize("text, malformed, message", [
    ("", True, "an SDP offer must begin with v=0"),
    ("v=1\r\n", True, "an SDP offer must begin with v=0"),
    ("v=0\r\nhello\r\n", True, "SDP line 2 is not <type>=<value>: 'hello'"),
    (change(CHROMIUM_OFFER, "m=audio 45210 UDP/TLS/RTP/SAVPF", "m=audio port UDP/TLS/RTP/SAVPF"), True,
     "SDP line 8: m= must be '<media> <port> <proto> <fmt> ...', not 'audio port UDP/TLS/RTP/SAVPF 111 63 9 0 8 13 110 126'"),
    (change(CHROMIUM_OFFER, "m=audio 45210", "m=audio 99999"), True, "SDP line 8: port 99999 is out of range"),
    (change(CHROMIUM_OFFER, "SAVPF 111 63", "SAVPF 200 63"), True, "SDP line 8: RTP payload type '200' is not 0..127 (RFC 3550 §5.1)"),
    (change(CHROMIUM_OFFER, "a=rtpmap:111 opus/48000/2", "a=rtpmap:111 opus"), True,
     "SDP line 24: a=rtpmap must be '<pt> <encoding>/<clock rate>[/<channels>]', not '111 opus'"),
    (change(CHROMIUM_OFFER, "a=rtpmap:8 PCMA/8000", "a=rtpmap:18 G729/8000"), True,
     "SDP line 31: a=rtpmap for payload type 18, which the m= line does not list"),
    (change(CHROMIUM_OFFER, "a=ice-ufrag:Abcd", "a=ice-ufrag:"), True, "SDP line 12: a=ice-ufrag needs a value"),
    (change(CHROMIUM_OFFER, "a=fingerprint:sha-256 3A:4F", "a=fingerprint:sha-256 zz:4F"), True,
     "SDP line 15: a=fingerprint must be '<hash> <hex>:<hex>:...', not 'sha-256 zz:4F:10:9C:2B:77:0E:51:AA:CD:EF:01:23:45:67:89:AB:C'"),
    (change(CHROMIUM_OFFER, "a=ice-pwd:", "a=x-pwd:"), True,
     "the audio section has no a=ice-pwd (WebRTC needs ICE credentials and a DTLS fingerprint)"),
    (change(CHROMIUM_OFFER, "a=rtcp-mux\r\n", ""), True,
     "the audio section has no a=rtcp-mux (RFC 8858: WebRTC multiplexes RTP and RTCP)"),
    (change(CHROMIUM_OFFER, "m=audio", "m=video"), False, "the offer has no audio section: a WHIP leg records audio"),
    (change(CHROMIUM_OFFER, "m=audio 45210", "m=audio 0"), False, "the offer has no audio section: a WHIP leg records audio"),
    (CHROMIUM_OFFER + CHROMIUM_OFFER[CHROMIUM_OFFER.index("m=audio"):], False,
     "the offer has 2 audio sections: a WHIP leg takes one audio track"),
    (change(CHROMIUM_OFFER, "a=sendonly", "a=inactive"), False, "the audio section is inactive: a WHIP client sends audio (sendonly)"),
    (only_formats(CHROMIUM_OFFER, "9 13"), False,
     "no audio codec in common: offered g722/8000, cn/8000; accepted opus/48000, PCMU/8000, PCMA/8000"),
])
def test_offer_errors_name_the_problem(text, malformed, message):
    with pytest.raises(OfferError) as caught:
        Offer.parse(text)
    assert str(caught.value) == message
    assert caught.value.malformed is malformed


# -- frames ------------------------------------------------------------------------------


def frame_of(data: np.ndarray, fmt: str, layout: str, rate: int = 48000, pts: int | None = 0) -> av.AudioFrame:
    frame = av.AudioFrame.from_ndarray(data, format=fmt, layout=layout)
    frame.sample_rate = rate
    frame.pts = pts
    frame.time_base = fractions.Fraction(1, rate)
    return frame


def test_packed_stereo_is_averaged_without_overflow():
    left = np.array([32767, -32768, 100, 1], dtype=np.int16)
    right = np.array([32767, -32768, -100, 0], dtype=np.int16)
    interleaved = np.stack([left, right], axis=1).reshape(1, -1)
    assert mono_s16(frame_of(interleaved, "s16", "stereo")).tolist() == [32767, -32768, 0, 0]


def test_planar_and_mono_frames():
    planar = np.array([[10, 20, 30], [30, 40, 50]], dtype=np.int16)
    assert mono_s16(frame_of(planar, "s16p", "stereo")).tolist() == [20, 30, 40]
    mono = np.array([[5, -6, 7]], dtype=np.int16)
    out = mono_s16(frame_of(mono, "s16", "mono", 8000))
    assert out.dtype == np.int16 and out.tolist() == [5, -6, 7]


def test_other_sample_formats_are_refused():
    with pytest.raises(CodecError, match="decoded audio in flt, expected signed 16-bit"):
        mono_s16(frame_of(np.zeros((1, 4), dtype=np.float32), "flt", "mono"))


def test_frame_clock_fills_lost_packets_but_not_long_jumps():
    clock = FrameClock(max_fill_s=1.0)
    block = np.zeros((1, 1920), dtype=np.int16)  # 20 ms of 48 kHz stereo, packed

    def gap(pts: int) -> int:
        return clock.gap(frame_of(block, "s16", "stereo", 48000, pts))

    assert gap(1000) == 0  # the first frame: nothing to compare with
    assert gap(1960) == 0  # follows on
    assert gap(1960 + 960 + 2 * 960) == 1920  # two packets lost
    assert gap(1960 + 4 * 960 + 48000 * 5) == 0  # five seconds: a pause, not filled
    assert gap(10) == 0  # backwards (a new stream): not filled either
    assert clock.filled == 1920


def test_frame_clock_follows_the_time_base_not_the_sample_rate():
    clock = FrameClock()
    block = np.zeros((1, 160), dtype=np.int16)  # 20 ms of 8 kHz mono
    frames = [frame_of(block, "s16", "mono", 8000, pts) for pts in (0, 160, 480)]
    assert [clock.gap(f) for f in frames] == [0, 0, 160]


# -- ICE addresses -----------------------------------------------------------------------


def test_listen_addresses_map_to_ice_addresses():
    assert addresses_for("0.0.0.0") is None and addresses_for("::") is None and addresses_for("") is None
    assert addresses_for("127.0.0.1") == ("127.0.0.1",)
    assert "127.0.0.1" in addresses_for("localhost")


def candidates(sdp: str) -> set[str]:
    return {line.split()[4] for line in sdp.split("\r\n") if line.startswith("a=candidate:")}


async def test_gathering_is_scoped_to_the_given_addresses():
    scoped, plain = client_pc(), client_pc()

    async def unscoped_offer() -> str:
        await plain.setLocalDescription(await plain.createOffer())
        return plain.localDescription.sdp

    try:
        scoped.addTransceiver("audio", direction="sendonly")
        plain.addTransceiver("audio", direction="sendonly")
        # Gathering at the same time: the scope of one task does not reach the other,
        # which keeps aioice's own rule (every interface but loopback).
        scoped_sdp, plain_sdp = await asyncio.gather(offer_for(scoped), unscoped_offer())
        assert candidates(scoped_sdp) == {"127.0.0.1"}
        assert "127.0.0.1" not in candidates(plain_sdp)
    finally:
        await scoped.close()
        await plain.close()


# -- the service -------------------------------------------------------------------------


class Sink:
    def __init__(self) -> None:
        self.samples = 0
        self.done = asyncio.Event()
        self.dropped_counts: dict[str, int] = {}

    def audio(self, frame: PcmFrame) -> None:
        self.samples += len(frame.samples)

    def gap(self, count: int, rate: int, packets: int) -> None:
        self.samples += count

    def dropped(self, reason: str, count: int) -> None:
        self.dropped_counts[reason] = self.dropped_counts.get(reason, 0) + count

    async def ended(self, stats: dict) -> None:
        self.stats = stats
        self.done.set()


async def client_offer() -> tuple:
    pc = client_pc()
    pc.addTransceiver("audio", direction="sendonly")
    return pc, await offer_for(pc)


async def test_a_peer_that_never_connects_is_closed_after_the_timeout():
    service = WhipService(("127.0.0.1",), connect_timeout_s=0.5)
    client, offer = await client_offer()  # the client never applies the answer
    try:
        sink = Sink()
        answer = await service.open("leg_a", offer, sink, owner="test")
        assert candidates(answer) == {"127.0.0.1"}
        assert "a=recvonly" in answer and service.open_count == 1
        await asyncio.wait_for(sink.done.wait(), 5)
        await wait_for(lambda: service.open_count == 0, what="the peer to close")
        assert service.get("leg_a") is None and sink.samples == 0
        assert sink.stats["frames"] == 0 and sink.stats["connection"] in ("new", "connecting", "failed")
    finally:
        await client.close()
        await service.close()


async def test_a_refused_offer_leaves_no_peer_and_close_is_idempotent():
    service = WhipService(("127.0.0.1",))
    client, offer = await client_offer()
    try:
        sink = Sink()
        with pytest.raises(OfferError):
            await service.open("leg_b", change(offer, "a=setup:actpass", "a=setup:sideways"), sink, owner="test")
        assert sink.done.is_set() and service.open_count == 0 and service.get("leg_b") is None
        answer = await service.open("leg_c", offer, Sink(), owner="test")
        assert answer.startswith("v=0")
        await service.close()
        await service.close()
        assert service.open_count == 0
        with pytest.raises(Unavailable) as refused:
            await service.open("leg_d", offer, Sink(), owner="test")
        assert refused.value.code == "whip.unavailable"
    finally:
        await client.close()
        await service.close()


async def test_closing_the_service_while_an_offer_is_answered_leaves_no_task():
    service = WhipService(("127.0.0.1",))
    client, offer = await client_offer()
    try:
        opening = asyncio.create_task(service.open("leg_e", offer, Sink(), owner="test"))
        await asyncio.sleep(0)  # the answer is under way
        await service.close()
        with pytest.raises(Unavailable) as refused:
            await opening
        assert refused.value.code == "whip.unavailable"
        assert service.open_count == 0
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("whip-") and not t.done()]
    finally:
        await client.close()
