"""Inputs that once reached a 500, a reason-less close or a logged traceback, against a
real server: each is now a 4xx (or a WebSocket close with code and reason) and, for the
peer's own mistakes, one WARNING line."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from servers import APP1, Server
from serverproc import ServerProcess

from mediaserver import jsonsafe
from mediaserver.codecs.g711 import encode_ulaw

pytestmark = pytest.mark.timeout(90)

DEEP = b"[" * 50_000 + b"]" * 50_000


@pytest.fixture
async def server(tmp_path):
    async with Server(tmp_path) as srv:
        yield srv


async def post_raw(server: Server, path: str, body: bytes) -> tuple[int, dict]:
    headers = {**server.headers(), "Content-Type": "application/json"}
    async with server.http.post(path, data=body, headers=headers) as response:
        return response.status, await response.json()


# -- JSON bodies -------------------------------------------------------------------------


async def test_deeply_nested_bodies_are_400_on_every_post_route(server):
    uuid = (await server.create_session())["uuid"]
    routes = ["/api/v1/sessions", f"/api/v1/sessions/{uuid}/legs"]
    routes += [f"/api/v1/sessions/{uuid}/commands/record/{kind}" for kind in ("start", "stop", "pause", "resume")]
    for path in routes:
        for body in (DEEP, b'{"a": ' * 20_000 + b"1" + b"}" * 20_000):
            status, data = await post_raw(server, path, body)
            assert status == 400, (path, data)
            assert data["error"]["code"] == "request.invalid_json"
            assert "nested too deep" in data["error"]["message"]


@pytest.mark.parametrize("body, words", [
    (b'{"metadata": {"n": NaN}}', "NaN is not a JSON number"),
    (b'{"metadata": {"n": -Infinity}}', "-Infinity is not a JSON number"),
    (b'{"metadata": {"n": 1e999}}', "number 1e999 is out of range"),
    (b'{"metadata": {"n": ' + b"9" * 5000 + b"}}", "digits"),
    (b'{"metadata": {"n": "\xff"}}', "invalid start byte"),
    ('{"metadata": {"n": "é"}}'.encode("utf-16"), None),
])
async def test_numbers_json_forbids_and_bytes_that_are_not_text_are_400(server, body, words):
    status, data = await post_raw(server, "/api/v1/sessions", body)
    if words is None:  # RFC 8259 §8.1: UTF-16 is still JSON text
        assert status == 201 and data["metadata"] == {"n": "é"}
        return
    assert status == 400, data
    assert data["error"]["code"] == "request.invalid_json"
    assert words in data["error"]["message"]


async def test_infinite_recording_lengths_are_refused_not_crashed(server):
    uuid = (await server.create_session())["uuid"]
    status, data = await post_raw(server, f"/api/v1/sessions/{uuid}/commands/record/start", b'{"max_length": 1e400}')
    assert status == 400 and data["error"]["code"] == "request.invalid_json"
    status, data = await server.command(uuid, "start", silence_timeout=2.5)
    assert status == 202, data


async def test_a_new_sample_rate_beside_a_quiet_rtp_leg_keeps_the_session(server):
    """The mixer moved to another rate read a quiet leg backwards and the session died."""
    uuid = (await server.create_session())["uuid"]
    offer = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n"
    status, data, _ = await server.api("POST", f"/api/v1/sessions/{uuid}/legs", json={"role": "caller", "sdp": offer})
    assert status == 201, data
    for rate in (8000, 16000, 8000):
        status, started = await server.command(uuid, "start", sample_rate=rate)
        assert status == 202, started
        await asyncio.sleep(0.3)
        status, stopped = await server.command(uuid, "stop")
        assert status == 202, stopped
        meta = await server.wait_recording(started["recording_id"])
        assert meta["sample_rate"] == rate


def test_depth_scan_ignores_brackets_in_strings_and_stays_linear():
    assert jsonsafe.loads('["' + "[" * 1000 + '"]') == ["[" * 1000]
    assert jsonsafe.loads("[" * 64 + "]" * 64) is not None
    with pytest.raises(jsonsafe.JsonDepthError, match="nested more than 64 deep"):
        jsonsafe.loads("[" * 65 + "]" * 65)
    began = time.perf_counter()
    with pytest.raises(json.JSONDecodeError):  # every quote escaped, none closing: one pass
        jsonsafe.loads('["' + '\\"[' * 300_000)
    assert time.perf_counter() - began < 2.0


# -- credentials -------------------------------------------------------------------------


async def raw_http(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), 10)
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize("header", [
    b"X-App-ID: app1\r\nX-API-Key: key-\xff\xfe-0123456789",
    b"X-App-ID: app1\r\nX-API-Key: \xed\xa0\x80",
    b"X-App-ID: \xff\r\nX-API-Key: " + APP1["key"].encode(),
    b"Authorization: Bearer \xc3\x28\xff",
    b"Authorization: \xff\xff \xff",
])
async def test_credentials_that_are_not_utf8_are_401(server, header):
    answer = await raw_http(server.port, b"GET /api/v1/sessions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + header + b"\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401 "), answer[:300]
    assert json.loads(body)["error"]["code"] == "auth.unauthorized"


async def test_the_right_key_still_works_beside_non_utf8_headers(server):
    answer = await raw_http(server.port, b"GET /api/v1/sessions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Junk: \xff\r\n"
                            b"Authorization: Bearer " + APP1["key"].encode() + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]


# -- WebSocket frames over the limit -----------------------------------------------------


async def close_of(ws: aiohttp.ClientWebSocketResponse) -> tuple[int, str]:
    while True:
        msg = await asyncio.wait_for(ws.receive(), 10)
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
            return ws.close_code, msg.extra or ""


START = {"event": "start", "encoding": "PCMU", "sample_rate": 8000, "channels": 1}


@pytest.mark.parametrize("kind, size", [("binary", 100_000), ("text", 200_000), ("binary", 1_000_000), ("text", 600_000)])
async def test_wavstream_frame_over_the_limit_is_1009_with_a_reason(server, kind, size):
    session = await server.create_session()
    async with aiohttp.ClientSession() as http, http.ws_connect(session["ingest"]["wavstream"]["caller"]) as ws:
        await ws.send_json(START)
        await ws.send_bytes(encode_ulaw(np.zeros(160, "int16")))
        if kind == "binary":
            await ws.send_bytes(b"\xff" * size)
        else:
            await ws.send_str(json.dumps({"event": "dtmf", "digit": "1", "pad": " " * (size - 42)}))
        code, reason = await close_of(ws)
    assert code == 1009
    if size < 262144:  # the parser's own check names the frame
        assert reason == f"{kind} frame of {size} bytes exceeds the 65536-byte limit"
    else:  # aiohttp refused it by its declared length before reading it
        assert reason == "frame of 262144 bytes or more exceeds the 65536-byte limit"


@pytest.mark.parametrize("size", [150_000, 700_000])
async def test_twilio_frame_over_the_limit_is_1009_with_a_reason(server, size):
    session = await server.create_session()
    async with aiohttp.ClientSession() as http, http.ws_connect(session["ingest"]["twilio"]) as ws:
        await ws.send_json({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        await ws.send_str("x" * size)
        code, text = await close_of(ws)
    assert code == 1009
    expected = f"text frame of {size} bytes exceeds the 65536-byte limit" if size < 262144 else \
        "frame of 262144 bytes or more exceeds the 65536-byte limit"
    assert text == expected


# -- a peer's mistakes are one WARNING line, not a traceback ------------------------------


def send_raw(port: int, data: bytes, read: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        if not read:
            return b""
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


GARBAGE = [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(40)),  # TLS on the HTTP port
    b"GARBAGE\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nBad Header Line\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n\x00\x01BAD REQUEST\r\n\r\n",  # garbage after a good request
    b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n",
]


def wait_for_lines(server: ServerProcess, start: int, count: int, timeout: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        lines = server.log.read_text(errors="replace")[start:].splitlines()
        warnings = [line for line in lines if " WARNING " in line]
        if len(warnings) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_garbage_requests_and_a_vanishing_wav_reader_log_one_warning_each(tmp_path):
    with ServerProcess(tmp_path / "data") as server:
        start = len(server.log.read_text(errors="replace"))
        for data in GARBAGE:
            answer = send_raw(server.port, data)
            assert b" 500 " not in answer
        lines = wait_for_lines(server, start, len(GARBAGE))
        assert not [line for line in lines if " ERROR " in line or "Traceback" in line], "\n".join(lines)
        warnings = [line for line in lines if " WARNING " in line]
        assert len(warnings) == len(GARBAGE), "\n".join(lines)
        assert all("127.0.0.1" in line for line in warnings), "\n".join(warnings)

        start = len(server.log.read_text(errors="replace"))
        asyncio.run(_drop_a_live_wav_reader(server))
        lines = wait_for_lines(server, start, 1)
        assert not [line for line in lines if " ERROR " in line or "Traceback" in line], "\n".join(lines)
        warnings = [line for line in lines if " WARNING " in line]
        assert len(warnings) == 1 and "127.0.0.1" in warnings[0] and "went away" in warnings[0], "\n".join(lines)


async def _drop_a_live_wav_reader(server: ServerProcess) -> None:
    headers = {"X-App-ID": APP1["id"], "X-API-Key": APP1["key"]}
    async with aiohttp.ClientSession(server.base_url, headers=headers) as http:
        async with http.post("/api/v1/sessions") as response:
            session = await response.json()
        uuid = session["uuid"]
        async with http.ws_connect(session["ingest"]["wavstream"]["caller"]) as ws:
            await ws.send_json(START)
            async with http.post(f"/api/v1/sessions/{uuid}/commands/record/start") as response:
                assert response.status == 202
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(f"GET /api/v1/sessions/{uuid}/recording/file.wav HTTP/1.1\r\nHost: x\r\n"
                         f"X-App-ID: {APP1['id']}\r\nX-API-Key: {APP1['key']}\r\n\r\n".encode())
            silence = encode_ulaw(np.zeros(160, "int16"))
            for _ in range(25):  # half a second of audio, in real time
                await ws.send_bytes(silence)
                await asyncio.sleep(0.02)
            assert (await reader.read(100)).startswith(b"HTTP/1.1 200")
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # close with RST
            writer.transport.abort()
            for _ in range(50):  # the server notices at its next write
                await ws.send_bytes(silence)
                await asyncio.sleep(0.02)
        async with http.delete(f"/api/v1/sessions/{uuid}") as response:
            assert response.status == 202


# -- found by `make fuzz` ----------------------------------------------------------------


async def test_an_offset_beyond_sqlite_integers_is_400(server):
    status, data, _ = await server.api("GET", "/api/v1/sessions?offset=" + "9" * 30)
    assert status == 400 and data["error"]["code"] == "request.invalid_query", data
    status, data, _ = await server.api("GET", f"/api/v1/recordings?offset={2**63}")
    assert status == 400, data


async def test_a_signature_with_non_ascii_characters_is_403(server):
    session = await server.create_session()
    async with aiohttp.ClientSession() as http, http.ws_connect(session["ingest"]["wavstream"]["caller"]) as ws:
        await ws.send_json(START)
        status, started = await server.command(session["uuid"], "start")
        for _ in range(10):
            await ws.send_bytes(encode_ulaw(np.zeros(160, "int16")))
        await ws.send_json({"event": "stop"})
    await server.api("DELETE", f"/api/v1/sessions/{session['uuid']}")
    await server.wait_recording(started["recording_id"])
    status, data, _ = await server.api("GET", f"/api/v1/recordings/{started['recording_id']}/stream")
    url = data["data"]["url"]
    for tampered in (url[:-4] + "%ff1", url[:-4] + "%C3%A9", url + "%00"):
        async with server.http.get(tampered) as response:
            assert response.status == 403, tampered
            assert (await response.json())["error"]["code"] == "files.forbidden"
    async with server.http.get(url) as response:
        assert response.status == 200


SIP_OPTIONS = (Path(__file__).parent.parent / "sip_fixtures" / "messages" / "options.sip").read_bytes()


@pytest.mark.parametrize("old, new", [
    (b"Max-Forwards: 70", "Max-Forwards: ²".encode()),
    (b"CSeq: 1 OPTIONS", "CSeq: ² OPTIONS".encode()),
    (b"CSeq: 1 OPTIONS", b"CSeq: " + b"9" * 5000 + b" OPTIONS"),
    (b"127.0.0.1:5099;branch", "127.0.0.1:١٢;branch".encode()),
    (b"Content-Length: 0", b"Content-Length: " + b"9" * 5000),
])
def test_sip_numbers_that_are_not_ascii_digits_are_sip_errors(old, new):
    from mediaserver.sip.message import SipError, parse_message

    assert old in SIP_OPTIONS
    with pytest.raises(SipError):
        message = parse_message(SIP_OPTIONS.replace(old, new))
        message.validate()
        message.vias()


@pytest.mark.parametrize("line", ["m=audio ² RTP/AVP 0", "m=audio 4000 RTP/AVP ²", "m=audio 4000/² RTP/AVP 0",
                                  "m=audio " + "9" * 5000 + " RTP/AVP 0"])
async def test_sdp_numbers_that_are_not_ascii_digits_are_400_on_legs(server, line):
    from mediaserver.sip.sdp import SdpError, SessionDescription
    from mediaserver.webrtc.offer import Offer, OfferError

    sdp = f"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n{line}\r\n"
    with pytest.raises(SdpError):
        SessionDescription.parse(sdp)
    with pytest.raises(OfferError):
        Offer.parse(sdp.replace("RTP/AVP", "UDP/TLS/RTP/SAVPF"))
    uuid = (await server.create_session())["uuid"]
    status, data, _ = await server.api("POST", f"/api/v1/sessions/{uuid}/legs", json={"role": "caller", "sdp": sdp})
    assert status == 400, data
