"""Fuzz properties of every route family against a real server process: whatever the body,
query, path or credentials, the answer is below 500 and every error is the JSON envelope;
SIP datagrams to the UAS never get a 500; the server logs no ERROR meanwhile.

`make fuzz` (mediaserver/tools/fuzz.py) runs the same families with many more cases."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from urllib.parse import quote, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzzing import FUZZ, JSON_VALUES, NASTY, NUMBERS, SIP_MESSAGES, line_mutated, mutated

from mediaserver.tools import fuzz
from mediaserver.tools.serverproc import ServerProcess

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """A server process with a live session, an RTP leg and a finished recording."""
    server = ServerProcess(tmp_path_factory.mktemp("fuzz-routes") / "data", fuzz.APPS)
    with server:
        run = fuzz.Fuzz(server, 0, 1)
        asyncio.run(run.prepare())
        yield run
        lines = server.log.read_text(errors="replace").splitlines()
        errors = [line for line in lines if " ERROR " in line or line.startswith("Traceback")]
        assert not errors, "\n".join(errors[:20])


def exchange(port: int, data: bytes, timeout: float = 10.0) -> fuzz.Answer:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return fuzz.parse_answer(b"".join(chunks))


def assert_refused_cleanly(answer: fuzz.Answer, request: bytes) -> None:
    assert answer.status is not None, (answer.error, request[:300])
    assert answer.status < 500, (answer.status, answer.body[:300], request[:300])
    assert fuzz.envelope_ok(answer), (answer.status, answer.body[:300], request[:300])


def text_values():
    return st.one_of(st.text(max_size=30), st.sampled_from(NASTY + NUMBERS).map(lambda b: b.decode("utf-8", "replace")))


# -- JSON bodies on every POST route -----------------------------------------------------

COMMAND_BODIES = [{}, {"command_uid": "c-1"}, {"format": "mp3", "channels": 2}, {"behavior": "silence"},
                  {"max_length": 30, "silence_timeout": 2, "finish_on_key": "#", "participant": "caller"}]


def bodies():
    valid = [json.dumps(b).encode() for b in COMMAND_BODIES + [{"metadata": {"a": 1}}, {"role": "caller", "sdp": "v=0\r\n"}]]
    return st.one_of(JSON_VALUES.map(lambda v: json.dumps(v).encode("utf-8", "surrogatepass")), mutated(valid),
                     st.binary(max_size=64), st.sampled_from([b"[" * 100 + b"]" * 100, b'{"a":' * 70 + b"1" + b"}" * 70,
                                                                b'{"max_length": 1e999}', b'{"metadata": NaN}', b"9" * 5000]))


@FUZZ
@given(route=st.sampled_from(["/api/v1/sessions", "legs", "start", "stop", "pause", "resume"]), body=bodies(),
       ctype=st.sampled_from([b"application/json", b"text/plain", b"", b"\xff"]))
def test_post_bodies_are_answered_below_500_with_the_envelope(target, route, body, ctype):
    path = route if route.startswith("/") else f"/api/v1/sessions/{target.live}/legs" if route == "legs" \
        else f"/api/v1/sessions/{target.live}/commands/record/{route}"
    request = fuzz.request_bytes("POST", path, [(b"Content-Type", ctype)], body)
    answer = exchange(target.port, request)
    assert_refused_cleanly(answer, request)
    if answer.status == 201:
        asyncio.run(target._clean_up(path, answer))


# -- query strings and paths of every GET family -----------------------------------------


@FUZZ
@given(index=st.integers(0, 14), params=st.dictionaries(
    st.sampled_from(["session_id", "since", "until", "state", "limit", "offset", "q", "format", "ttl", "width", "x"]),
    text_values(), max_size=5), path_edit=st.none() | st.binary(min_size=1, max_size=4))
def test_queries_and_paths_are_answered_below_500_with_the_envelope(target, index, params, path_edit):
    path, _ = target.query_targets()[index]
    if path_edit is not None:
        path = path[: len(path) // 2] + quote(path_edit) + path[len(path) // 2:]
    query = "&".join(f"{quote(k)}={quote(v, errors='surrogatepass')}" for k, v in params.items())
    # Below aiohttp's 8190-byte request line (longer ones get its own text/plain 400).
    request = fuzz.request_bytes("GET", (path + ("?" + query if query else ""))[:8000])
    assert_refused_cleanly(exchange(target.port, request), request)


@FUZZ
@given(st.data())
def test_signed_file_urls_are_answered_below_500(target, data):
    url = urlsplit(target.file_url)
    signed = f"{url.path}?{url.query}".encode()
    edited = data.draw(mutated([signed], max_ops=3)).replace(b" ", b"%20").replace(b"\r", b"").replace(b"\n", b"")
    headers = [(b"Range", data.draw(st.sampled_from([b"bytes=0-10", b"bytes=-5", b"bytes=5-1", b"bytes=x", b"bytes=" + b"9" * 40])))]
    request = fuzz.request_bytes("GET", edited, headers, app=None)
    answer = exchange(target.port, request)
    assert answer.status is not None and answer.status < 500, (answer.status, answer.body[:200], request[:300])


# -- credentials -------------------------------------------------------------------------

HEADER_BYTES = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


@FUZZ
@given(app_id=st.none() | HEADER_BYTES | st.just(b"fuzz1"), key=st.none() | HEADER_BYTES | st.just(b"fuzz-key-one-0123456789"),
       bearer=st.none() | HEADER_BYTES.map(lambda b: b"Bearer " + b) | HEADER_BYTES)
def test_any_credential_bytes_are_401_or_accepted_never_500(target, app_id, key, bearer):
    headers = [(name, value) for name, value in ((b"X-App-ID", app_id), (b"X-API-Key", key), (b"Authorization", bearer))
               if value is not None]
    request = fuzz.request_bytes("GET", "/api/v1/sessions", headers, app=None)
    answer = exchange(target.port, request)
    assert answer.status in (200, 400, 401), (answer.status, answer.body[:200], request[:300])
    if answer.status == 401:
        assert json.loads(answer.body)["error"]["code"] == "auth.unauthorized"


# -- SIP over a real UDP socket ----------------------------------------------------------


@FUZZ
@given(st.one_of(line_mutated(SIP_MESSAGES), mutated(SIP_MESSAGES), st.binary(max_size=300)))
def test_sip_datagrams_never_get_a_500(target, data):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(0.15)
        sock.sendto(data.replace(b"5099", str(sock.getsockname()[1]).encode()), ("127.0.0.1", target.sip_port))
        try:
            while (answer := sock.recv(65536)).startswith(b"SIP/2.0 1"):
                pass
        except TimeoutError:
            return  # no answer to what is not an answerable request
    status = re.match(rb"SIP/2\.0 (\d{3})", answer)
    assert status is not None and int(status[1]) != 500 and int(status[1]) < 600, answer[:200]
