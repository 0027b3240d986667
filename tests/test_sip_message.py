"""SIP messages (RFC 3261 §7, §20, §25): parsing, serialising and the exact errors."""

from __future__ import annotations

import pytest

from mediaserver.sip.message import (
    NameAddr,
    SipHeaderError,
    SipRequest,
    SipResponse,
    SipSyntaxError,
    SipUri,
    UnsupportedUriScheme,
    Via,
    parse_message,
    salvage_request,
    split_values,
)

REQUEST = (b"INVITE sip:app1@127.0.0.1:5060;transport=udp SIP/2.0\r\n"
           b"v: SIP/2.0/UDP 10.0.0.1:5070;branch=z9hG4bK776asdhds;rport, SIP/2.0/TCP [2001:db8::1]:5080;branch=z9hG4bKx\r\n"
           b"Max-Forwards: 70\r\n"
           b"f: \"Alice, A.\" <sip:alice@example.com>;tag=1928301774\r\n"
           b"t: <sip:app1@127.0.0.1>\r\n"
           b"i: a84b4c76e66710@pc33.example.com\r\n"
           b"CSeq: 314159 INVITE\r\n"
           b"m: <sip:alice@10.0.0.1:5070>, <sip:alice@10.0.0.2>;expires=60\r\n"
           b"Subject: a long\r\n  folded subject\r\n"
           b"c: application/sdp\r\n"
           b"l: 4\r\n\r\nv=0\r\nthis is beyond Content-Length")


def test_parse_request_with_compact_and_folded_headers():
    request = parse_message(REQUEST)
    assert isinstance(request, SipRequest)
    assert (request.method, request.uri, request.body) == ("INVITE", "sip:app1@127.0.0.1:5060;transport=udp", b"v=0\r")
    assert request.call_id == "a84b4c76e66710@pc33.example.com"
    assert request.headers.get("subject") == "a long folded subject"
    assert request.cseq() == (314159, "INVITE") and request.content_type == "application/sdp"
    assert request.headers.get_all("Contact") == ["<sip:alice@10.0.0.1:5070>", "<sip:alice@10.0.0.2>;expires=60"]
    top, second = request.vias()
    assert (top.transport, top.host, top.port, top.branch, top.params["rport"]) == ("UDP", "10.0.0.1", 5070, "z9hG4bK776asdhds", None)
    assert (second.transport, second.host, second.sent_by) == ("TCP", "2001:db8::1", "2001:db8::1:5080")
    sender = request.address("From")
    assert (sender.display, sender.uri, sender.tag) == ('"Alice, A."', "sip:alice@example.com", "1928301774")
    request.validate()


def test_serialise_sets_content_length_and_round_trips():
    request = parse_message(REQUEST)
    again = parse_message(bytes(request))
    assert again.headers.items == [*(item for item in request.headers.items if item[0] != "Content-Length"), ("Content-Length", "4")]
    response = SipResponse(status=486, reason="Busy Here", body=b"x")
    response.headers.add("Call-ID", "abc")
    assert bytes(response) == b"SIP/2.0 486 Busy Here\r\nCall-ID: abc\r\nContent-Length: 1\r\n\r\nx"
    assert parse_message(bytes(response)).headers.get("Call-ID") == "abc"


def test_response_parsing():
    response = parse_message(b"SIP/2.0 200\r\nContent-Length: 0\r\n\r\n")
    assert (response.status, response.reason) == (200, "")


@pytest.mark.parametrize("data, error, message", [
    (b"INVITE sip:a@b SIP/2.0\r\nVia: x", SipSyntaxError, "Message has no end of headers"),
    (b"HELLO\r\n\r\n", SipSyntaxError, "Malformed start line"),
    (b"INVITE sip:a@b SIP/3.0\r\n\r\n", SipSyntaxError, "Unsupported SIP version"),
    (b"INV@TE sip:a@b SIP/2.0\r\n\r\n", SipSyntaxError, "Malformed method"),
    (b"OPTIONS sip:a@b SIP/2.0\r\n folded first\r\n\r\n", SipSyntaxError, "Header continuation before any header"),
    (b"OPTIONS sip:a@b SIP/2.0\r\nno colon here\r\n\r\n", SipSyntaxError, "Malformed header line"),
    (b"OPTIONS sip:a@b SIP/2.0\r\nContent-Length: -1\r\n\r\n", SipHeaderError, "Malformed Content-Length header"),
    (b"OPTIONS sip:a@b SIP/2.0\r\nContent-Length: 9\r\n\r\nabc", SipHeaderError, "Content-Length exceeds the message body"),
    (b"OPTIONS sip:a@b SIP/2.0\r\nSubject: \xff\r\n\r\n", SipSyntaxError, "Message headers are not UTF-8"),
    (b"OPTIONS sip:a@b SIP/2.0\r\n" + b"X: y\r\n" * 20000 + b"\r\n", SipSyntaxError, "Message too large"),
])
def test_malformed_messages(data, error, message):
    with pytest.raises(error) as caught:
        parse_message(data)
    assert str(caught.value) == message


def request_with(*drop: str, **replace: str) -> SipRequest:
    request = parse_message(REQUEST)
    for name in drop:
        request.headers.remove(name)
    for name, value in replace.items():
        request.headers.set(name.replace("_", "-"), value)
    return request


@pytest.mark.parametrize("request_, message", [
    (request_with("Via"), "Missing Via header"),
    (request_with("From"), "Missing From header"),
    (request_with("To"), "Missing To header"),
    (request_with("Call-ID"), "Missing Call-ID header"),
    (request_with("CSeq"), "Missing CSeq header"),
    (request_with(CSeq="1 BYE"), "CSeq method does not match the request"),
    (request_with(CSeq="99999999999 INVITE"), "Malformed CSeq header"),
    (request_with(Via="SIP/2.0/UDP"), "Malformed Via header"),
    (request_with(Via="SIP/2.0/UDP host:99999"), "Malformed port in Via"),
    (request_with(From="<sip:a@b"), "Malformed From header"),
    (request_with(Max_Forwards="256"), "Malformed Max-Forwards header"),
])
def test_validation(request_, message):
    with pytest.raises(SipHeaderError) as caught:
        request_.validate()
    assert str(caught.value) == message


def test_uris_and_addresses():
    uri = SipUri.parse("sips:bob:secret@[2001:db8::2]:5061;transport=tls?subject=x")
    assert (uri.scheme, uri.user, uri.host, uri.port, uri.params) == ("sips", "bob", "2001:db8::2", 5061, {"transport": "tls"})
    assert str(SipUri.parse("sip:example.com;lr")) == "sip:example.com;lr"
    with pytest.raises(UnsupportedUriScheme) as caught:
        SipUri.parse("tel:+1555")
    assert str(caught.value) == "Unsupported URI scheme 'tel'" and caught.value.status == 416
    assert NameAddr.parse("sip:carol@example.com;tag=99").tag == "99"
    assert str(NameAddr.parse('"Carol" <sip:carol@example.com>;tag=99')) == '"Carol" <sip:carol@example.com>;tag=99'
    assert str(Via.parse("SIP/2.0/UDP 1.2.3.4:5060;branch=z9hG4bKa;received=5.6.7.8")) == \
        "SIP/2.0/UDP 1.2.3.4:5060;branch=z9hG4bKa;received=5.6.7.8"
    assert split_values('"a, b" <sip:x>, <sip:y;p=1,2>, z') == ['"a, b" <sip:x>', "<sip:y;p=1,2>", "z"]


def test_salvage_reads_what_a_400_needs():
    broken = b"OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nCall-ID: c1\r\nbroken line\r\nCSeq: 1 OPTIONS\r\n\r\n"
    request = salvage_request(broken)
    assert request.method == "OPTIONS" and [k for k, _ in request.headers.items] == ["Via", "Call-ID", "CSeq"]
    assert salvage_request(b"\x16\x03\x01 not sip") is None
