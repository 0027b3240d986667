"""Fuzz properties of every wire parser: whatever the bytes, a parser returns a value or
raises its own typed `ProtocolError` subclass, never anything else."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzzing import FUZZ, JSON_VALUES, SDP_BODIES, SIP_MESSAGES, inputs, mutated

from mediaserver import jsonsafe
from mediaserver.rtp.packet import RtcpError, RtcpPacket, RtpError, RtpPacket, is_rtcp, parse_header
from mediaserver.sip.message import NameAddr, SipError, SipRequest, SipUri, Via, parse_message, salvage_request
from mediaserver.sip.sdp import OfferNotAcceptable, SdpError, SessionDescription, accepted_streams
from mediaserver.sip.siprec import MetadataError, MultipartError, RecordingMetadata, parse_multipart
from mediaserver.webrtc.offer import Offer, OfferError
from mediaserver.ws import WsProtocolError
from mediaserver.ws.twilio import TwilioParser
from mediaserver.ws.wavstream import WavstreamParser

pytestmark = pytest.mark.timeout(120)


# -- SIP ---------------------------------------------------------------------------------


@FUZZ
@given(inputs(SIP_MESSAGES, max_random=2048))
def test_sip_messages_raise_only_sip_errors(data):
    try:
        message = parse_message(data)
    except SipError:
        salvage_request(data)  # what the UAS does next; must not raise either
        return
    if isinstance(message, SipRequest):
        try:
            message.validate()
            message.address("From"), message.address("To"), message.cseq(), message.vias()
        except SipError:
            return
        bytes(message)


@FUZZ
@given(st.one_of(st.text(max_size=80), mutated([b"<sip:alice@127.0.0.1:5060;transport=udp>;tag=1",
                                                  b"SIP/2.0/UDP 10.0.0.1:5099;branch=z9hG4bK-1;rport",
                                                  b"sips:[::1]:5061;lr"]).map(lambda b: b.decode("utf-8", "replace"))))
def test_sip_header_values_raise_only_sip_errors(text):
    for parse in (SipUri.parse, NameAddr.parse, Via.parse):
        try:
            parse(text)
        except SipError:
            pass


# -- SDP and WebRTC offers ----------------------------------------------------------------


@FUZZ
@given(inputs(SDP_BODIES, max_random=1024))
def test_sdp_raises_only_sdp_errors(data):
    try:
        offer = SessionDescription.parse(data)
        accepted_streams(offer)
        str(offer)
    except (SdpError, OfferNotAcceptable):
        pass


@FUZZ
@given(inputs(SDP_BODIES, max_random=1024).map(lambda b: b.decode("utf-8", "replace")))
def test_webrtc_offers_raise_only_offer_errors(text):
    try:
        Offer.parse(text)
    except OfferError:
        pass


# -- SIPREC ------------------------------------------------------------------------------

SIPREC = [m for m in SIP_MESSAGES if b"multipart/mixed" in m]
METADATA = [b'<?xml version="1.0"?><recording xmlns="urn:ietf:params:xml:ns:recording:1"><session session_id="s1"/>'
            b'<participant participant_id="p1"><nameID aor="sip:a@x"><name>A</name></nameID></participant>'
            b'<stream stream_id="st1" session_id="s1"><label>1</label></stream>'
            b'<participantstreamassoc participant_id="p1"><send>st1</send></participantstreamassoc></recording>']


@FUZZ
@given(inputs(SIPREC, max_random=512), st.sampled_from(["multipart/mixed;boundary=boundary42", 'multipart/mixed; boundary="b"',
                                                         "multipart/mixed", "multipart/mixed;boundary="]))
def test_siprec_bodies_raise_only_multipart_errors(data, content_type):
    body = data.partition(b"\r\n\r\n")[2]
    try:
        parts = parse_multipart(content_type, body)
    except MultipartError:
        return
    for part in parts:
        try:
            RecordingMetadata.parse(part.body)
        except MetadataError:
            pass


@FUZZ
@given(inputs(METADATA, max_random=256))
def test_siprec_metadata_raises_only_metadata_errors(data):
    try:
        RecordingMetadata.parse(data)
    except MetadataError:
        pass


# -- RTP and RTCP ------------------------------------------------------------------------

RTP = [bytes([0x80, 0x00, 0x00, 0x01, 0, 0, 0, 160, 0, 0, 0, 7]) + b"\xff" * 160,
       bytes([0xb2, 0xe5, 0x12, 0x34, 0, 0, 1, 0, 0xde, 0xad, 0xbe, 0xef]) + b"\x00" * 8 + b"\xbe\xde\x00\x01abcd" + b"pay\x00\x00\x03",
       bytes([0x81, 0xc9, 0x00, 0x07]) + b"\x00" * 28 + bytes([0x81, 0xca, 0x00, 0x02, 0, 0, 0, 1, 1, 1, 0x41, 0])]


@FUZZ
@given(inputs(RTP, max_random=256))
def test_rtp_and_rtcp_raise_only_their_errors(data):
    if is_rtcp(data):
        try:
            for packet in RtcpPacket.parse_compound(data):
                packet.ssrc
        except RtcpError:
            pass
        return
    try:
        parse_header(data)
        bytes(RtpPacket.parse(data))
    except RtpError:
        pass


# -- WebSocket protocols -----------------------------------------------------------------

WAVSTREAM_TEXT = [b'{"event": "start", "encoding": "L16", "sample_rate": 16000, "channels": 2}',
                  b'{"event": "start", "encoding": "PCMU", "sample_rate": 8000, "channels": 1}',
                  b'{"event": "dtmf", "digit": "5"}', b'{"event": "stop"}']
TWILIO_TEXT = [json.dumps(m).encode() for m in (
    {"event": "connected", "protocol": "Call", "version": "1.0.0"},
    {"event": "start", "sequenceNumber": "1", "streamSid": "MZ1", "start": {
        "streamSid": "MZ1", "accountSid": "AC1", "callSid": "CA1", "tracks": ["inbound", "outbound"], "customParameters": {"a": "b"},
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}},
    {"event": "media", "sequenceNumber": "2", "streamSid": "MZ1", "media": {
        "track": "inbound", "chunk": "1", "timestamp": "20", "payload": base64.b64encode(b"\xff" * 160).decode()}},
    {"event": "dtmf", "sequenceNumber": "3", "streamSid": "MZ1", "dtmf": {"track": "inbound_track", "digit": "1"}},
    {"event": "mark", "sequenceNumber": "4", "streamSid": "MZ1", "mark": {"name": "m"}},
    {"event": "stop", "sequenceNumber": "5", "streamSid": "MZ1", "stop": {"accountSid": "AC1", "callSid": "CA1"}})]


def frames(texts: list[bytes]):
    """A socket's worth of messages: mostly mutated JSON text, some binary, some JSON values."""
    text = st.one_of(mutated(texts, max_ops=3).map(lambda b: b.decode("utf-8", "replace")), st.sampled_from(texts).map(bytes.decode),
                     JSON_VALUES.map(json.dumps))
    binary = st.one_of(st.binary(max_size=700), st.integers(0, 400).map(lambda n: b"\x00\x01" * n))
    return st.lists(st.one_of(text.map(lambda t: ("text", t)), binary.map(lambda b: ("binary", b))), min_size=1, max_size=8)


def feed_all(parser, messages) -> None:
    for kind, data in messages:
        try:
            parser.feed_text(data) if kind == "text" else parser.feed_binary(data)
        except WsProtocolError as exc:
            assert 1003 <= exc.close_code <= 1009 and exc.reason and len(exc.reason.encode()) <= 123
            return
    try:
        parser.feed_close()
    except WsProtocolError:
        pass


@FUZZ
@given(frames(WAVSTREAM_TEXT))
def test_wavstream_frames_raise_only_ws_protocol_errors(messages):
    feed_all(WavstreamParser(max_frame_bytes=1024), messages)


@FUZZ
@given(frames(TWILIO_TEXT))
def test_twilio_frames_raise_only_ws_protocol_errors(messages):
    feed_all(TwilioParser(max_frame_bytes=1024), messages)


# -- JSON from peers ---------------------------------------------------------------------


@FUZZ
@given(st.one_of(JSON_VALUES.map(json.dumps), st.text(alphabet='[]{}",:\\ 0123456789.eE-+tfnulrsaNIy', max_size=300)))
def test_bounded_json_agrees_with_json_or_refuses_with_a_value_error(text):
    try:
        value = jsonsafe.loads(text)
    except ValueError:
        return
    assert value == json.loads(text) or json.dumps(value) == json.dumps(json.loads(text))
