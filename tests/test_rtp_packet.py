"""RTP and RTCP packets (RFC 3550) and RFC 4733 telephone-events: round trips and the
exact error for every way a datagram can be broken."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mediaserver.rtp.events import KeyPressTracker, TelephoneEvent, TelephoneEventError
from mediaserver.rtp.packet import (
    RtcpError,
    RtcpPacket,
    RtpPacket,
    RtpPaddingError,
    RtpTruncatedError,
    RtpVersionError,
    is_rtcp,
    parse_header,
)


def test_round_trip_with_every_header_part():
    packet = RtpPacket(96, 65535, 0xFFFFFFFF, 0xDEADBEEF, b"\x01\x02\x03", True, (1, 2), (0xBEDE, b"\x10\xAA\x00\x00"), 4)
    data = bytes(packet)
    assert len(data) == 12 + 8 + 4 + 4 + 3 + 4
    assert RtpPacket.parse(data) == packet
    assert parse_header(data) == (0x80 | 96, 65535, 0xFFFFFFFF, 0xDEADBEEF, 28, 31)


@given(pt=st.integers(0, 127), seq=st.integers(0, 0xFFFF), ts=st.integers(0, 0xFFFFFFFF), ssrc=st.integers(0, 0xFFFFFFFF),
       payload=st.binary(max_size=200), marker=st.booleans(), csrc=st.lists(st.integers(0, 0xFFFFFFFF), max_size=15),
       words=st.integers(0, 4), padding=st.integers(0, 8))
def test_round_trip_property(pt, seq, ts, ssrc, payload, marker, csrc, words, padding):
    extension = (0x1000, bytes(range(4 * words))) if words else None
    packet = RtpPacket(pt, seq, ts, ssrc, payload, marker, tuple(csrc), extension, padding)
    assert RtpPacket.parse(bytes(packet)) == packet


@pytest.mark.parametrize("data, error, message", [
    (b"", RtpTruncatedError, "RTP packet of 0 bytes is shorter than the 12-byte fixed header"),
    (b"\x80\x00" + bytes(9), RtpTruncatedError, "RTP packet of 11 bytes is shorter than the 12-byte fixed header"),
    (b"\x40\x00" + bytes(10), RtpVersionError, "RTP version is 1, not 2"),
    (b"\x00\x00" + bytes(10), RtpVersionError, "RTP version is 0, not 2"),
    (b"\x82\x00" + bytes(14), RtpTruncatedError, "RTP packet of 16 bytes ends inside its 20-byte header"),
    (b"\x90\x00" + bytes(12), RtpTruncatedError, "RTP packet of 14 bytes ends inside its header extension"),
    (b"\x90\x00" + bytes(10) + b"\xbe\xde\x00\x02" + bytes(4), RtpTruncatedError, "RTP packet of 20 bytes ends inside its 24-byte header"),
    (b"\xa0\x00" + bytes(10) + b"\x01\x00", RtpPaddingError, "RTP padding of 0 bytes does not fit a 2-byte payload"),
    (b"\xa0\x00" + bytes(10) + b"\x01\x03", RtpPaddingError, "RTP padding of 3 bytes does not fit a 2-byte payload"),
])
def test_malformed_rtp(data, error, message):
    with pytest.raises(error) as caught:
        parse_header(data)
    assert str(caught.value) == message
    with pytest.raises(error):
        RtpPacket.parse(data)


def test_serialising_checks_what_cannot_be_sent():
    with pytest.raises(ValueError):
        bytes(RtpPacket(0, 0, 0, 0, csrc=tuple(range(16))))
    with pytest.raises(ValueError):
        bytes(RtpPacket(0, 0, 0, 0, extension=(1, b"abc")))


def test_rtcp_compound_round_trip():
    report = RtcpPacket(201, 1, struct.pack("!I", 7) + bytes(24))
    sdes = RtcpPacket(202, 1, struct.pack("!IBB", 7, 1, 4) + b"name" + bytes(2), padding=4)
    data = bytes(report) + bytes(sdes)
    assert RtcpPacket.parse_compound(data) == [report, sdes]
    assert report.ssrc == 7 and RtcpPacket(203).ssrc is None
    assert is_rtcp(data) and not is_rtcp(bytes(RtpPacket(0, 1, 2, 3)))


@pytest.mark.parametrize("data, message", [
    (b"", "RTCP datagram is empty"),
    (b"\x81\xc9\x00", "RTCP packet at byte 0 is shorter than the 4-byte header"),
    (b"\x41\xc9\x00\x00", "RTCP version is 1, not 2"),
    (b"\x81\xc9\x00\x07" + bytes(8), "RTCP packet at byte 0 claims 32 bytes, 12 remain"),
    (b"\x80\xc8\x00\x00\x80\xc9\x00\x01", "RTCP packet at byte 4 claims 8 bytes, 4 remain"),
    (b"\xa0\xc9\x00\x01\x00\x00\x00\x09", "RTCP padding of 9 bytes does not fit the packet at byte 0"),
])
def test_malformed_rtcp(data, message):
    with pytest.raises(RtcpError) as caught:
        RtcpPacket.parse_compound(data)
    assert str(caught.value) == message


def test_telephone_event_payload():
    report = TelephoneEvent(11, True, 10, 1600)
    assert bytes(report) == b"\x0b\x8a\x06\x40"
    assert TelephoneEvent.parse(b"\x0b\x8a\x06\x40\xff") == report and report.digit == "#"
    assert TelephoneEvent(16).digit is None  # flash: not a key
    with pytest.raises(TelephoneEventError) as caught:
        TelephoneEvent.parse(b"\x01\x02\x03")
    assert str(caught.value) == "telephone-event payload of 3 bytes is shorter than 4"


def test_one_report_per_key_press():
    keys = KeyPressTracker()
    seen = []
    for ts, event, end, duration in [
        (100, 1, False, 0), (100, 1, False, 160), (100, 1, True, 320), (100, 1, True, 320), (100, 1, True, 320),
        (900, 1, False, 0), (900, 1, True, 400),  # the same key again: a new press
        (2000, 16, False, 0),  # flash: not a digit
        (3000, 5, False, 0xFFFF), (3000 + 0xFFFF, 5, False, 200), (3000 + 0xFFFF, 5, True, 400),  # a long press in two segments
    ]:
        seen.append(keys.feed(42, ts, TelephoneEvent(event, end, 10, duration)))
    assert [digit for digit in seen if digit] == ["1", "1", "5"]
    assert keys.feed(43, 3000 + 0xFFFF, TelephoneEvent(5)) == "5"  # another source
