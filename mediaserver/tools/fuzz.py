"""`make fuzz`: many thousand malformed inputs against a real server process.

    python -m mediaserver.tools.fuzz [--cases 10000] [--seed 1] [--family NAME ...]

Starts `mediaserver serve` on free loopback ports (as the tests do), makes what the
families need through the API (a live session, an RTP leg by POST /legs, a finished
recording and its signed file URL), then sends each family's cases: valid inputs run
through a seeded random mutator, so a run is repeatable and fast. Prints one row per
family: cases, answers by class, crashes (connection errors, no answer where one is
due, the server gone) and ERROR lines the server logged meanwhile; checks /healthz at
the end. Exits 1 on any 5xx, crash, malformed error envelope or logged ERROR.

WebSocket close codes are counted as the HTTP classes they stand for: 1000 (and the
peer's own close) "2xx", 1003/1007/1008/1009 "4xx", 1011 "5xx", 1006 (no close frame)
a crash.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import re
import socket
import sys
import tempfile
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import quote, urlsplit

from mediaserver.tools.ports import free_udp_range
from mediaserver.tools.serverproc import ServerProcess

APPS = [{"id": "fuzz1", "key": "fuzz-key-one-0123456789"}, {"id": "fuzz2", "key": "fuzz-key-two-0123456789"}]
FIXTURES = Path(__file__).resolve().parents[2] / "sip_fixtures"
CONCURRENCY = 12
TIMEOUT_S = 10.0

# -- the mutator -------------------------------------------------------------------------

NASTY = [b"\r\n", b"\n", b"\r", b"\r\n\r\n", b":", b";", b",", b"=", b" ", b"\t", b"\x00", b"\xff", b"\xc3\x28",
         b"\xed\xa0\x80", "²".encode(), "١٢".encode(), b"-1", b"99999999999999999999", b"1e999", b"NaN", b"%", b"%ff",
         b"<", b">", b'"', b"\\", b"[", b"]", b"{", b"}", b"/", b"../", b"@", b"?", b"#", b"&", b"sip:", b"SIP/2.0",
         b"0x10", b"\xef\xbb\xbf", b"A" * 300, b"9" * 5000]
NUMBERS = ["²".encode(), b"9" * 5000, "١٢".encode(), b"-1", b"0", b"65536", b"4294967296", b"9" * 30, b"1.5",
           b"1e999", b"0x1f", b" 7 ", b"", b"+3", b"1_000", b"NaN", b"-0"]
_DIGITS = re.compile(rb"[0-9]+")


class Mutator:
    """Seeded edits of valid inputs: bytes, lines (headers, SDP lines) and JSON values."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def nasty(self) -> bytes:
        return self.rng.choice(NASTY)

    def bytes_(self, data: bytes, ops: int = 4) -> bytes:
        rng, out = self.rng, bytearray(data)
        for _ in range(rng.randint(1, ops)):
            at = rng.randint(0, len(out))
            op = rng.randrange(7)
            if op == 0 and at < len(out):
                out[at] = rng.randrange(256)
            elif op == 1:
                out[at:at] = rng.randbytes(rng.randint(1, 8))
            elif op == 2:
                del out[at:at + rng.randint(1, 16)]
            elif op == 3:
                del out[at:]
            elif op == 4:
                out[at:at] = out[at:at + rng.randint(1, 64)] * rng.randint(1, 4)
            elif op == 5:
                out[at:at] = self.nasty()
            else:
                self._number(out)
        return bytes(out)

    def _number(self, out: bytearray) -> None:
        runs = list(_DIGITS.finditer(out))
        if runs:
            run = self.rng.choice(runs)
            out[run.start():run.end()] = self.rng.choice(NUMBERS)

    def lines(self, data: bytes, sep: bytes = b"\r\n", ops: int = 3) -> bytes:
        """Edits that keep most of the framing, so that they reach the code reading values."""
        rng = self.rng
        head, blank, body = data.partition(sep * 2)
        lines = head.split(sep)
        for _ in range(rng.randint(1, ops)):
            at = rng.randrange(len(lines))
            op = rng.randrange(6)
            if op <= 1:
                line = bytearray(lines[at])
                self._number(line)
                lines[at] = bytes(line)
            elif op == 2:
                cut = max(lines[at].find(b":"), lines[at].find(b"="), 0) + 1
                lines[at] = lines[at][:cut] + (self.nasty() if rng.random() < 0.7 else rng.randbytes(rng.randint(0, 12)))
            elif op == 3 and len(lines) > 1:
                del lines[at]
            elif op == 4:
                lines.insert(at, lines[at])
            else:
                lines[at] = self.bytes_(lines[at], 2)
        return sep.join(lines) + blank + body

    def json_value(self, depth: int = 0) -> Any:
        rng = self.rng
        kind = rng.randrange(10 if depth < 3 else 7)
        if kind == 0:
            return None
        if kind == 1:
            return rng.choice([True, False])
        if kind == 2:
            return rng.choice([0, -1, 1, 2, 8000, 16000, 48000, 2**31, 2**63, -(2**70), 10**30])
        if kind == 3:
            return rng.choice([0.0, -0.5, 1.5, 1e300, -1e-300, 3.14])
        if kind in (4, 5, 6):
            return rng.choice(["", "wav", "mp3", "opus", "caller", "callee", "all", "skip", "silence", "#", "#*", "5",
                               "http://127.0.0.1:1/x", "\u0000", "\ud800", "é" * 50, "x" * 200, "../../etc", "null"])
        if kind in (7, 8):
            return {rng.choice(KEYS): self.json_value(depth + 1) for _ in range(rng.randint(0, 4))}
        return [self.json_value(depth + 1) for _ in range(rng.randint(0, 4))]

    def json_body(self, valid: list[dict[str, Any]]) -> bytes:
        """A valid body with fields changed, added or removed, or any JSON, or broken bytes."""
        rng = self.rng
        choice = rng.randrange(10)
        if choice < 5:
            body = dict(rng.choice(valid))
            for _ in range(rng.randint(1, 3)):
                key = rng.choice(list(body) + KEYS) if body else rng.choice(KEYS)
                if rng.random() < 0.2:
                    body.pop(key, None)
                else:
                    body[key] = self.json_value(1)
            return _dumps(body)
        if choice < 7:
            return _dumps(self.json_value())
        if choice == 7:
            n = rng.choice([65, 100, 1000, 50_000])
            return rng.choice([b"[" * n + b"]" * n, b'{"a":' * n + b"1" + b"}" * n, b"[" * n])
        return self.bytes_(_dumps(rng.choice(valid)))


KEYS = ["uuid", "metadata", "role", "sdp", "command_uid", "format", "channels", "participant", "sample_rate", "bitrate",
        "silence_timeout", "max_length", "finish_on_key", "trim_silence", "action_url", "transcribe",
        "transcribe_callback", "behavior", "event", "x", ""]


def _dumps(value: Any) -> bytes:
    return json.dumps(value).encode("utf-8", "surrogatepass")


# -- talking to the server ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    """One HTTP exchange: the status (None when no answer came), content type and body."""

    status: int | None
    content_type: str = ""
    body: bytes = b""
    error: str = ""


async def raw_http(port: int, data: bytes, timeout: float = TIMEOUT_S, half_close: bool = False) -> Answer:
    """Send `data` as it is on a new connection; read the answer until the server closes.
    `half_close` ends the sending side at once, so that a request that promises more body
    than it carries ends there instead of waiting for the rest."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        return Answer(None, error=f"connect: {type(exc).__name__}")
    try:
        writer.write(data)
        await writer.drain()
        if half_close:
            writer.write_eof()
        raw = await asyncio.wait_for(reader.read(-1), timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        return Answer(None, error=type(exc).__name__)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
    return parse_answer(raw)


def parse_answer(raw: bytes) -> Answer:
    head, _, body = raw.partition(b"\r\n\r\n")
    match = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    if match is None:
        return Answer(None, error="no answer" if not raw else "not HTTP")
    ctype = re.search(rb"(?im)^content-type:\s*([^;\r\n]*)", head)
    chunked = re.search(rb"(?im)^transfer-encoding:\s*chunked", head)
    return Answer(int(match[1]), ctype[1].decode("latin-1").strip() if ctype else "", _unchunk(body) if chunked else body)


def _unchunk(body: bytes) -> bytes:
    out, at = bytearray(), 0
    while True:
        end = body.find(b"\r\n", at)
        if end < 0:
            return bytes(out)
        try:
            size = int(body[at:end].split(b";")[0], 16)
        except ValueError:
            return bytes(out)
        if size == 0:
            return bytes(out)
        out += body[end + 2:end + 2 + size]
        at = end + 4 + size


def request_bytes(method: str, target: bytes | str, headers: list[tuple[bytes, bytes]] | None = None, body: bytes = b"",
                  app: dict[str, str] | None = APPS[0]) -> bytes:
    """An HTTP/1.1 request with `Connection: close`, the app's credentials and `body`."""
    target = target.encode() if isinstance(target, str) else target
    lines = [method.encode() + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close"]
    if app is not None:
        lines += [b"X-App-ID: " + app["id"].encode(), b"X-API-Key: " + app["key"].encode()]
    lines += [name + b": " + value for name, value in headers or []]
    if body or method in ("POST", "PUT"):
        lines.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def envelope_ok(answer: Answer) -> bool:
    """Whether an error answer is the JSON envelope {"error": {"code", "message"}}."""
    if answer.status is None or answer.status < 400:
        return True
    try:
        error = json.loads(answer.body)["error"]
        return isinstance(error["code"], str) and isinstance(error["message"], str)
    except (ValueError, KeyError, TypeError):
        return False


# -- tallies -----------------------------------------------------------------------------


@dataclass
class Tally:
    family: str
    cases: int = 0
    ok: int = 0
    client_errors: int = 0
    server_errors: int = 0
    no_answer: int = 0
    crashes: int = 0
    bad_envelopes: int = 0
    logged_errors: int = 0
    seconds: float = 0.0
    examples: list[str] = field(default_factory=list)

    def note(self, what: str, case: bytes | str) -> None:
        if len(self.examples) < 5:
            shown = case if isinstance(case, str) else case[:300].decode("utf-8", "backslashreplace")
            self.examples.append(f"{what}: {shown[:300]!r}")

    def http(self, answer: Answer, case: bytes, *, answer_due: bool = True, envelope: bool = True) -> None:
        self.cases += 1
        if answer.status is None:
            if answer_due or answer.error not in ("no answer", "not HTTP"):
                self.crashes += 1
                self.note(f"crash ({answer.error})", case)
            else:
                self.no_answer += 1
        elif answer.status >= 500:
            self.server_errors += 1
            self.note(f"{answer.status} {answer.body[:200]!r}", case)
        elif answer.status >= 400:
            self.client_errors += 1
        else:
            self.ok += 1
        if envelope and not envelope_ok(answer):
            self.bad_envelopes += 1
            self.note(f"not the JSON envelope: {answer.status} {answer.body[:100]!r}", case)

    @property
    def failed(self) -> bool:
        return bool(self.server_errors or self.crashes or self.bad_envelopes or self.logged_errors)


def print_table(tallies: list[Tally], healthy: bool) -> None:
    columns = ("family", "cases", "2xx/3xx", "4xx", "5xx", "no answer", "crashes", "bad envelope", "ERROR logs", "seconds")
    rows = [(t.family, t.cases, t.ok, t.client_errors, t.server_errors, t.no_answer, t.crashes, t.bad_envelopes,
             t.logged_errors, f"{t.seconds:.1f}") for t in tallies]
    widths = [max(len(str(v)) for v in col) for col in zip(columns, *rows)]
    line = "  ".join(f"{{:>{w}}}" for w in widths)
    print(line.format(*columns))
    for row in rows:
        print(line.format(*row))
    for t in tallies:
        for example in t.examples:
            print(f"  {t.family}: {example}")
    print(f"/healthz after the run: {'200' if healthy else 'FAILED'}")


# -- the fuzz run --------------------------------------------------------------------------


class Fuzz:
    """One server, the fixtures its families need, and the families."""

    def __init__(self, server: ServerProcess, cases: int, seed: int) -> None:
        self.server = server
        self.port = server.port
        self.sip_port = int(server.env["MEDIASERVER_SIP_PORT"])
        self.cases = cases
        self.m = Mutator(seed)
        self.sessions: list[str] = []
        self.live = ""
        self.recording = ""
        self.file_url = ""
        self.rtp_port = 0
        self.ingest: dict[str, Any] = {}
        self.legs_session = ""

    # -- set-up through the API --------------------------------------------------------

    async def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = b"" if body is None else json.dumps(body).encode()
        headers = [(b"Content-Type", b"application/json")] if body is not None else []
        answer = await raw_http(self.port, request_bytes(method, path, headers, data))
        try:
            return answer.status or 0, json.loads(answer.body) if answer.body else None
        except ValueError:
            return answer.status or 0, answer.body

    async def prepare(self) -> None:
        status, session = await self.api("POST", "/api/v1/sessions", {"metadata": {"fuzz": True}})
        assert status == 201, session
        self.live, self.ingest = session["uuid"], session["ingest"]
        self.recording = await self._finished_recording()
        status, data = await self.api("GET", f"/api/v1/recordings/{self.recording}/stream")
        assert status == 200, data
        self.file_url = data["data"]["url"]
        self.rtp_port = await self._rtp_leg()
        self.legs_session = await self._new_session()

    async def _finished_recording(self) -> str:
        import aiohttp

        status, session = await self.api("POST", "/api/v1/sessions")
        assert status == 201, session
        async with aiohttp.ClientSession() as http, http.ws_connect(session["ingest"]["wavstream"]["caller"]) as ws:
            await ws.send_json({"event": "start", "encoding": "PCMU", "sample_rate": 8000, "channels": 1})
            status, answer = await self.api("POST", f"/api/v1/sessions/{session['uuid']}/commands/record/start")
            assert status == 202, answer
            for _ in range(25):
                await ws.send_bytes(b"\xff" * 160)
            await ws.send_json({"event": "stop"})
        await self.api("DELETE", f"/api/v1/sessions/{session['uuid']}")
        rid = answer["recording_id"]
        for _ in range(300):
            status, meta = await self.api("GET", f"/api/v1/recordings/{rid}")
            if meta["state"] == "completed":
                return rid
            await asyncio.sleep(0.1)
        raise RuntimeError(f"recording {rid} did not complete")

    async def _rtp_leg(self) -> int:
        offer = ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
                 "m=audio 4000 RTP/AVP 0 8 101\r\na=rtpmap:101 telephone-event/8000\r\n")
        status, data = await self.api("POST", f"/api/v1/sessions/{self.live}/legs", {"role": "caller", "sdp": offer})
        assert status == 201, data
        return int(re.search(r"m=audio (\d+)", data["sdp"])[1])

    async def logged_errors(self) -> int:
        text = self.server.log.read_text(errors="replace")
        return sum(1 for line in text.splitlines() if " ERROR " in line or line.startswith("Traceback"))

    async def run(self, family: str) -> Tally:
        tally = Tally(family)
        before = await self.logged_errors()
        began = time.monotonic()
        await getattr(self, f"family_{family}")(tally)
        tally.seconds = time.monotonic() - began
        await asyncio.sleep(0.3)
        tally.logged_errors = await self.logged_errors() - before
        return tally

    async def each(self, count: int, case: Callable[[int], Awaitable[None]], concurrency: int = CONCURRENCY) -> None:
        queue = iter(range(count))

        async def worker() -> None:
            for index in queue:
                await case(index)

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    # -- HTTP families ---------------------------------------------------------------------

    def post_routes(self) -> list[tuple[str, list[dict[str, Any]]]]:
        live = self.live
        offer = ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
                 "m=audio 4002 RTP/AVP 0 101\r\na=rtpmap:101 telephone-event/8000\r\n")
        commands = [{}, {"command_uid": "fuzz-1"}, {"format": "mp3", "channels": 2, "bitrate": 32}, {"behavior": "silence"},
                    {"format": "opus", "sample_rate": 48000, "max_length": 30, "silence_timeout": 5, "finish_on_key": "#"}]
        return [("/api/v1/sessions", [{}, {"metadata": {"a": 1}}, {"uuid": str(uuidlib.uuid4())}]),
                ("legs", [{"role": "callee", "sdp": offer}, {"role": "x", "sdp": offer}]),
                *[(f"/api/v1/sessions/{live}/commands/record/{kind}", commands) for kind in ("start", "stop", "pause", "resume")]]

    async def family_http_json(self, tally: Tally) -> None:
        routes = self.post_routes()
        ctypes = [b"application/json", b"application/json; charset=utf-8", b"text/plain", b"", b"\xff/\xfe", b"multipart/form-data"]

        async def case(index: int) -> None:
            path, valid = routes[index % len(routes)]
            if path == "legs":
                path = f"/api/v1/sessions/{self.legs_session}/legs"
            body = self.m.json_body(valid)
            request = request_bytes("POST", path, [(b"Content-Type", self.m.rng.choice(ctypes))], body)
            answer = await raw_http(self.port, request)
            tally.http(answer, request)
            await self._clean_up(path, answer)

        await self.each(self.cases, case)

    async def _clean_up(self, path: str, answer: Answer) -> None:
        """Sessions the fuzz made end at once, and legs do not use up the port range."""
        if answer.status != 201:
            return
        data = json.loads(answer.body)
        if path == "/api/v1/sessions":
            await self.api("DELETE", f"/api/v1/sessions/{data['uuid']}")
        elif path.endswith("/legs") and self.legs_session in path:
            # Legs hold their ports until their session ends: a new session for the next ones.
            old, self.legs_session = self.legs_session, await self._new_session()
            await self.api("DELETE", f"/api/v1/sessions/{old}")

    async def _new_session(self) -> str:
        status, session = await self.api("POST", "/api/v1/sessions")
        assert status == 201, session
        return session["uuid"]

    def query_targets(self) -> list[tuple[str, dict[str, list[str]]]]:
        rid, live = self.recording, self.live
        times = ["2024-01-01T00:00:00Z", "0", "1e999", "nan", "-1", "2024-13-45", "9" * 400, "2024-01-01T00:00:00+25:00"]
        paging = {"limit": ["1", "500", "501", "0", "-1", "x", "9" * 5000, "١٢"], "offset": ["0", "-1", "1e3", "9" * 30]}
        return [
            ("/api/v1/recordings", {"session_id": [live, "x", ""], "since": times, "until": times,
                                    "state": ["completed", "recording", "bogus", ""], "q": ["hello", "", "\"", "*", "a" * 500],
                                    **paging}),
            ("/api/v1/sessions", {"state": ["active", "ended", "x"], **paging}),
            (f"/api/v1/sessions/{live}", {}),
            (f"/api/v1/recordings/{rid}", {}),
            (f"/api/v1/recordings/{rid}/download", {}),
            (f"/api/v1/recordings/{rid}/stream", {"ttl": ["1", "-1"]}),
            (f"/api/v1/recordings/{rid}/transcription", {"format": ["vtt", "srt", "json", "", "x"]}),
            (f"/api/v1/recordings/{rid}/manifest", {}),
            (f"/api/v1/recordings/{rid}/peaks", {"width": ["1", "0", "-5", "100000", "x"], "channels": ["1", "2", "x"]}),
            ("/api/v1/recordings/rec_unknown/download", {}),
            (f"/v1/calls/{live}/recording", {}),
            (f"/api/calls/{live}/recording/stream", {}),
            (f"/api/calls/{live}/recording/download", {}),
            ("/api/v1/usage", {}),
            ("/api/v1/keys", {}),
        ]

    async def family_http_query(self, tally: Tally) -> None:
        targets = self.query_targets()
        rng = self.m.rng

        async def case(index: int) -> None:
            path, params = targets[index % len(targets)]
            if rng.random() < 0.3:  # the path itself mutated
                path = self.m.bytes_(path.encode(), 2).decode("latin-1")
                path = "/" + quote(path.lstrip("/"), safe="/%?&=", encoding="latin-1")
            pairs = []
            for name, values in params.items():
                if rng.random() < 0.5:
                    value = rng.choice(values).encode() if rng.random() < 0.8 else self.m.nasty()
                    pairs.append(f"{name}={quote(value, safe='')}")
            if rng.random() < 0.2:
                pairs.append(quote(self.m.nasty(), safe="") + "=" + quote(self.m.nasty(), safe=""))
            # Below aiohttp's 8190-byte request line: longer lines are http_raw's (text/plain 400s).
            target = (path + ("?" + "&".join(pairs) if pairs else ""))[:8000]
            request = request_bytes(rng.choice(["GET", "GET", "GET", "HEAD", "DELETE"]) if "recordings/rec_" not in path
                                    else "GET", target)
            if request.startswith(b"DELETE") and (self.recording in target or self.live in target):
                request = request.replace(b"DELETE", b"GET", 1)  # the fixtures stay
            answer = await raw_http(self.port, request)
            tally.http(answer, request, envelope=not request.startswith(b"HEAD"))

        await self.each(self.cases, case)

    async def family_files(self, tally: Tally) -> None:
        url = urlsplit(self.file_url)
        target = f"{url.path}?{url.query}".encode()
        rng = self.m.rng
        ranges = [b"bytes=0-10", b"bytes=-5", b"bytes=100-", b"bytes=5-1", b"bytes=0-0,2-3", b"bytes=x", b"bytes=99999999-",
                  b"items=0-1", b"bytes=" + b"9" * 5000 + b"-"]

        async def case(index: int) -> None:
            mutated = target if rng.random() < 0.1 else self.m.bytes_(target, 3)
            mutated = mutated.replace(b" ", b"%20").replace(b"\r", b"%0D").replace(b"\n", b"%0A")
            headers = [(b"Range", rng.choice(ranges))] if rng.random() < 0.5 else []
            request = request_bytes("GET", mutated, headers, app=None)
            answer = await raw_http(self.port, request)
            tally.http(answer, request, envelope=answer.status not in (400, 416) or answer.content_type == "application/json")

        await self.each(self.cases, case)

    async def family_auth_headers(self, tally: Tally) -> None:
        rng = self.m.rng
        key, app_id = APPS[0]["key"].encode(), APPS[0]["id"].encode()

        def value(valid: bytes) -> bytes:
            roll = rng.random()
            if roll < 0.3:
                return self.m.bytes_(valid, 2).replace(b"\r", b"").replace(b"\n", b"")
            if roll < 0.5:
                return rng.randbytes(rng.randint(0, 40)).replace(b"\r", b"").replace(b"\n", b"")
            if roll < 0.7:
                return valid + self.m.nasty().replace(b"\r", b"").replace(b"\n", b"")
            return rng.choice([valid, b"", b" ", b"\xff" * 8, "ключ".encode(), b"\xed\xa0\x80", valid.upper()])

        async def case(index: int) -> None:
            shape = rng.randrange(4)
            headers: list[tuple[bytes, bytes]] = []
            if shape in (0, 2):
                headers += [(b"X-App-ID", value(app_id)), (b"X-API-Key", value(key))]
            if shape in (1, 2):
                scheme = rng.choice([b"Bearer ", b"bearer ", b"Basic ", b"Bearer", b"", b"\xff "])
                headers.append((b"Authorization", scheme + value(key)))
            if shape == 3:
                headers.append((rng.choice([b"X-App-ID", b"X-API-Key", b"Authorization"]), value(key)))
            path = rng.choice(["/api/v1/sessions", f"/api/v1/recordings/{self.recording}", "/v1/calls/x/recording",
                               f"/ws/v1/sessions/{self.live}/legs/caller", "/api/v1/usage"])
            request = request_bytes("GET", path, headers, app=None)
            answer = await raw_http(self.port, request)
            tally.http(answer, request, envelope=answer.status != 400 or answer.content_type == "application/json")

        await self.each(self.cases, case)

    async def family_http_raw(self, tally: Tally) -> None:
        seeds = [request_bytes("GET", "/healthz", app=None), request_bytes("GET", "/api/v1/sessions"),
                 request_bytes("POST", "/api/v1/sessions", [(b"Content-Type", b"application/json")], b'{"metadata": {}}'),
                 request_bytes("GET", "/api/v1/recordings?limit=5", [(b"Transfer-Encoding", b"chunked")]),
                 b"POST /api/v1/sessions HTTP/1.1\r\nHost: x\r\nX-App-ID: fuzz1\r\nX-API-Key: fuzz-key-one-0123456789\r\n"
                 b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n4\r\n{}  \r\n0\r\n\r\n"]
        rng = self.m.rng

        async def case(index: int) -> None:
            seed = rng.choice(seeds)
            roll = rng.random()
            request = self.m.lines(seed) if roll < 0.5 else self.m.bytes_(seed, 6) if roll < 0.9 else rng.randbytes(rng.randint(1, 300))
            answer = await raw_http(self.port, request, timeout=1.0)
            if answer.status is None and answer.error == "TimeoutError":
                answer = Answer(None, error="no answer")  # a request still waiting for its body: closed by us
            tally.http(answer, request, answer_due=False, envelope=False)
            if answer.status == 201:
                await self._clean_up("/api/v1/sessions", answer)

        await self.each(self.cases, case, concurrency=48)  # many cases wait out the timeout

    # -- datagram families -----------------------------------------------------------------

    async def family_sip(self, tally: Tally) -> None:
        seeds = [path.read_bytes() for path in sorted((FIXTURES / "messages").glob("*.sip"))]
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        rng = self.m.rng
        try:
            for start in range(0, self.cases, 50):
                for index in range(start, min(start + 50, self.cases)):
                    seed = rng.choice(seeds).replace(b"5099", str(sock.getsockname()[1]).encode())
                    roll = rng.random()
                    data = self.m.lines(seed) if roll < 0.6 else self.m.bytes_(seed) if roll < 0.95 else rng.randbytes(rng.randint(1, 600))
                    try:
                        sock.sendto(data, ("127.0.0.1", self.sip_port))
                    except OSError:
                        pass  # a datagram too big for UDP
                    tally.cases += 1
                    tally.no_answer += 1  # taken back for each response below
                await asyncio.sleep(0.02)
                self._sip_responses(sock, tally)
            await asyncio.sleep(0.5)
            self._sip_responses(sock, tally)
            # The UAS still answers a plain OPTIONS.
            probe = (FIXTURES / "messages" / "options.sip").read_bytes().replace(b"5099", str(sock.getsockname()[1]).encode())
            probe = probe.replace(b"options1@fixtures", b"probe@fuzz").replace(b"z9hG4bK-options1-1", b"z9hG4bK-probe")
            sock.sendto(probe, ("127.0.0.1", self.sip_port))
            data = await asyncio.wait_for(loop.sock_recv(sock, 65536), 5)
            while b"probe@fuzz" not in data:
                data = await asyncio.wait_for(loop.sock_recv(sock, 65536), 5)
            if not data.startswith(b"SIP/2.0 200"):
                tally.crashes += 1
                tally.note("OPTIONS after the run", data)
        except asyncio.TimeoutError:
            tally.crashes += 1
            tally.note("OPTIONS after the run", "no answer")
        finally:
            sock.close()

    def _sip_responses(self, sock: socket.socket, tally: Tally) -> None:
        while True:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                return
            match = re.match(rb"SIP/2\.0 (\d)\d\d", data)
            if match is None:
                continue  # a request of ours answered by a request (a BYE), not counted
            if data.startswith(b"SIP/2.0 1"):
                continue  # provisional: the final answer is the one counted
            tally.no_answer = max(0, tally.no_answer - 1)
            klass = int(match[1])
            if data.startswith(b"SIP/2.0 501 "):
                klass = 4  # RFC 3261 §8.2.1: the answer to a method the UAS does not implement
            if klass >= 5:
                tally.server_errors += 1
                tally.note("SIP " + data[:40].decode("latin-1"), data)
            elif klass == 4:
                tally.client_errors += 1
            else:
                tally.ok += 1

    async def family_rtp(self, tally: Tally) -> None:
        rng = self.m.rng
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        seeds = [bytes([0x80, 0x00]) + b"\x00\x01\x00\x00\x00\xa0\x00\x00\x00\x07" + b"\xff" * 160,
                 bytes([0x80, 0x08]) + b"\x00\x02\x00\x00\x01\x40\x00\x00\x00\x07" + b"\xd5" * 160,
                 bytes([0x80, 0xe5]) + b"\x00\x03\x00\x00\x01\xe0\x00\x00\x00\x07" + b"\x05\x8a\x03\x20",
                 bytes([0x90, 0x00]) + b"\x00\x04\x00\x00\x02\x80\x00\x00\x00\x07\xbe\xde\x00\x01\x10\xaa\x00\x00" + b"\xff" * 160,
                 bytes([0xa0, 0x00]) + b"\x00\x05\x00\x00\x03\x20\x00\x00\x00\x07" + b"\xff" * 157 + b"\x00\x00\x03",
                 bytes([0x81, 0xc9, 0x00, 0x07]) + b"\x00\x00\x00\x07" + b"\x00" * 24,
                 bytes([0x81, 0xc8, 0x00, 0x0c]) + b"\x00\x00\x00\x07" + b"\x00" * 20 + b"\x00" * 24]
        try:
            for start in range(0, self.cases, 100):
                for _ in range(start, min(start + 100, self.cases)):
                    seed = rng.choice(seeds)
                    data = self.m.bytes_(seed, 3) if rng.random() < 0.9 else rng.randbytes(rng.randint(0, 200))
                    port = self.rtp_port + (1 if seed[1] >= 200 and rng.random() < 0.5 else 0)
                    sock.sendto(data, ("127.0.0.1", port))
                    tally.cases += 1
                    tally.no_answer += 1
                await asyncio.sleep(0.01)
        finally:
            sock.close()
        status, data = await self.api("GET", f"/api/v1/sessions/{self.live}")
        if status != 200:
            tally.crashes += 1
            tally.note("the session after the RTP run", repr(data))

    # -- WebSocket families ----------------------------------------------------------------

    async def _ws_family(self, tally: Tally, url: str, texts: list[bytes], binary: bool) -> None:
        import aiohttp

        rng = self.m.rng
        per_socket = 8

        async with aiohttp.ClientSession() as http:
            async def case(index: int) -> None:
                frames = [rng.choice(texts[:2])] if rng.random() < 0.7 else []
                for _ in range(rng.randint(1, per_socket - len(frames))):
                    roll = rng.random()
                    if binary and roll < 0.35:
                        frames.append(b"B" + (rng.randbytes(rng.choice([1, 2, 3, 160, 320, 641])) if rng.random() < 0.5
                                              else b"\x00" * rng.choice([0, 2, 4, 70_000, 200_000])))
                    elif roll < 0.75:
                        frames.append(self.m.bytes_(rng.choice(texts), 3))
                    elif roll < 0.9:
                        frames.append(_dumps(self.m.json_value()))
                    else:
                        frames.append(rng.choice(texts))
                await self._ws_case(http, url, frames, tally)

            async def worker() -> None:
                while tally.cases < self.cases:  # a socket closed early sent fewer frames
                    await case(0)

            await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))

    async def _ws_case(self, http, url: str, frames: list[bytes], tally) -> None:
        import aiohttp

        shown = b" | ".join(frames)[:300]
        try:
            async with http.ws_connect(url, timeout=aiohttp.ClientWSTimeout(ws_close=TIMEOUT_S), max_msg_size=0) as ws:
                for frame in frames:
                    tally.cases += 1
                    try:
                        if frame.startswith(b"B"):
                            await ws.send_bytes(frame[1:])
                        else:
                            await ws.send_str(frame.decode("utf-8", "replace"))
                    except ConnectionError:
                        break  # the server closed the socket already: its close frame says why
                await ws.close()
                code = ws.close_code
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            tally.cases += not frames
            if isinstance(exc, aiohttp.WSServerHandshakeError) and 400 <= exc.status < 500:
                tally.client_errors += 1
                tally.note(f"handshake refused ({exc.status} {exc.message})", shown)
                return
            tally.crashes += 1
            tally.note(f"crash ({type(exc).__name__}: {exc})", shown)
            return
        if code in (1000, None):
            tally.ok += 1
        elif code in (1003, 1007, 1008, 1009):
            tally.client_errors += 1
        elif code == 1011:
            tally.server_errors += 1
            tally.note("close 1011", shown)
        else:
            tally.crashes += 1
            tally.note(f"close {code}", shown)

    async def family_wavstream(self, tally: Tally) -> None:
        texts = [b'{"event": "start", "encoding": "PCMU", "sample_rate": 8000, "channels": 1}',
                 b'{"event": "start", "encoding": "L16", "sample_rate": 16000, "channels": 2}',
                 b'{"event": "dtmf", "digit": "5"}', b'{"event": "stop"}']
        roles = self.m.rng
        url = self.ingest["wavstream"]["caller"].replace("/legs/caller", f"/legs/fz{roles.randrange(10**6)}")
        await self._ws_family(tally, url, texts, binary=True)

    async def family_twilio(self, tally: Tally) -> None:
        payload = base64.b64encode(b"\xff" * 160).decode()
        texts = [json.dumps(m).encode() for m in (
            {"event": "start", "sequenceNumber": "1", "streamSid": "MZ1", "start": {
                "streamSid": "MZ1", "accountSid": "AC1", "callSid": "CA1", "tracks": ["inbound", "outbound"],
                "customParameters": {"a": "b"}, "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}},
            {"event": "connected", "protocol": "Call", "version": "1.0.0"},
            {"event": "media", "sequenceNumber": "2", "streamSid": "MZ1",
             "media": {"track": "inbound", "chunk": "1", "timestamp": "20", "payload": payload}},
            {"event": "dtmf", "sequenceNumber": "3", "streamSid": "MZ1", "dtmf": {"track": "inbound_track", "digit": "1"}},
            {"event": "mark", "sequenceNumber": "4", "streamSid": "MZ1", "mark": {"name": "m"}},
            {"event": "stop", "sequenceNumber": "5", "streamSid": "MZ1", "stop": {"accountSid": "AC1", "callSid": "CA1"}})]
        token = self.ingest["token"]
        url = f"ws://127.0.0.1:{self.port}/ws/v1/twilio?token={token}&session={self.live}"
        await self._ws_family(tally, url, texts, binary=False)

    async def healthy(self) -> bool:
        answer = await raw_http(self.port, request_bytes("GET", "/healthz", app=None))
        return answer.status == 200 and self.server.proc is not None and self.server.proc.poll() is None


FAMILIES = ("http_json", "http_query", "files", "auth_headers", "http_raw", "sip", "rtp", "wavstream", "twilio")


async def fuzz(server: ServerProcess, families: list[str], cases: int, seed: int) -> tuple[list[Tally], bool]:
    run = Fuzz(server, cases, seed)
    await run.prepare()
    tallies = []
    for family in families:
        tally = await run.run(family)
        tallies.append(tally)
        print(f"{family}: {tally.cases} cases in {tally.seconds:.1f} s", file=sys.stderr)
        if not await run.healthy():
            break
    return tallies, await run.healthy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mediaserver.tools.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000, help="cases per family (default 10000)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--family", action="append", choices=FAMILIES, help="run only these families")
    parser.add_argument("--keep", action="store_true", help="keep the data directory and the server log")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="mediaserver-fuzz-"))
    # Valid INVITEs among the SIP cases hold a port pair each until their ACK times out.
    server = ServerProcess(work / "data", APPS, rtp_ports=free_udp_range(2000), log_level="info")
    server.start()
    try:
        tallies, healthy = asyncio.run(fuzz(server, args.family or list(FAMILIES), args.cases, args.seed))
    finally:
        server.stop()
    print_table(tallies, healthy)
    print(f"server log: {server.log}" if args.keep else "", end="\n" if args.keep else "")
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 1 if not healthy or any(t.failed for t in tallies) else 0


if __name__ == "__main__":
    sys.exit(main())
