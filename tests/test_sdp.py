"""SDP (RFC 4566) parsing and serialising, and answers to offers (RFC 3264), over the
bodies in sip_fixtures/sdp with the results expected.json names."""

from __future__ import annotations

import json

import pytest

from mediaserver.sip.sdp import OfferNotAcceptable, SdpError, SessionDescription, accepted_streams, answer
from sip_peers import FIXTURES

SDP = FIXTURES / "sdp"
EXPECTED = json.loads((SDP / "expected.json").read_text())
VALID = sorted(name for name, case in EXPECTED.items() if "error" not in case)
MALFORMED = sorted(name for name, case in EXPECTED.items() if "error" in case)


def read(name: str) -> str:
    return (SDP / name).read_bytes().decode()


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_bodies(name):
    with pytest.raises(SdpError) as caught:
        SessionDescription.parse(read(name))
    assert str(caught.value) == EXPECTED[name]["error"]


@pytest.mark.parametrize("name", VALID)
def test_answers(name):
    case = EXPECTED[name]
    offer = SessionDescription.parse(read(name))
    accepted = accepted_streams(offer)
    if case.get("not_acceptable"):
        with pytest.raises(OfferNotAcceptable):
            answer(offer, accepted, [0] * len(accepted), "127.0.0.1")
        return
    ports = [40000 + 2 * i for i in range(len(accepted))]
    result = answer(offer, accepted, ports, "127.0.0.1")
    assert len(result.media) == len(offer.media)
    for index, (media, wanted) in enumerate(zip(result.media, case["answer"])):
        if wanted is None:
            assert media.port == 0 and media.formats == offer.media[index].formats[:1]
            continue
        assert media.port == ports[index] and media.proto == offer.media[index].proto
        assert [f"{n}/{r}" + (f"/{c}" if c != 1 else "") for n, r, c in media.rtpmap().values()] == wanted
        assert media.direction == case.get("direction", "recvonly")
        for attribute in case.get("attributes", []):
            key, _, value = attribute.partition(":")
            assert media.attribute(key) == value
    again = SessionDescription.parse(str(result))
    assert str(again) == str(result)  # the answer itself parses back to the same text


@pytest.mark.parametrize("name", VALID)
def test_round_trip(name):
    parsed = SessionDescription.parse(read(name))
    assert str(SessionDescription.parse(str(parsed))) == str(parsed)
    assert str(parsed) == read(name).replace("\r\n", "\n").replace("\n", "\r\n")  # nothing lost or reordered


def test_a_re_offer_keeps_the_session_id_and_bumps_the_version():
    offer = SessionDescription.parse(read("pcmu_pcma_te.sdp"))
    first = answer(offer, accepted_streams(offer), [40000], "127.0.0.1")
    second = answer(offer, accepted_streams(offer), [40000], "127.0.0.1", first.origin)
    assert (second.origin.session_id, second.origin.session_version) == (first.origin.session_id, first.origin.session_version + 1)


def test_accepted_stream_terms():
    offer = SessionDescription.parse(read("rtcp_mux_label.sdp"))
    [stream] = accepted_streams(offer)
    assert (stream.remote, stream.label, stream.rtcp_mux, stream.direction, stream.ptime) == (
        ("127.0.0.1", 49170), "7", True, "sendonly", "20")
    assert not stream.on_hold  # sendonly: it sends, this server receives (SIPREC streams are so)
    assert accepted_streams(SessionDescription.parse(read("hold_rfc2543.sdp")))[0].on_hold
    assert accepted_streams(SessionDescription.parse(read("hold_inactive.sdp")))[0].on_hold
    assert not accepted_streams(SessionDescription.parse(read("pcmu_pcma_te.sdp")))[0].on_hold


def test_non_utf8_and_oversized_bodies():
    with pytest.raises(SdpError) as caught:
        SessionDescription.parse(b"v=0\r\ns=\xff\r\n")
    assert str(caught.value) == "SDP body is not UTF-8"
    with pytest.raises(SdpError) as caught:
        SessionDescription.parse(b"v" * 70000)
    assert str(caught.value) == "SDP body of 70000 bytes is larger than 65536"
