"""SIP messages (RFC 3261 §7): parse and serialise requests and responses.

`parse_message` checks the framing (start line, header lines, Content-Length) and
`SipRequest.validate` the headers a UAS relies on (§8.2). Both raise a `SipError` subclass
whose message is short enough to be the reason phrase of the 400 that answers it.
Headers are kept in order under their canonical names (compact forms expanded, §7.3.3).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mediaserver.errors import ProtocolError

SIP_VERSION = "SIP/2.0"
BRANCH_COOKIE = "z9hG4bK"  # RFC 3261 §8.1.1.7: marks a branch made by an RFC 3261 element
MAX_MESSAGE_BYTES = 65535  # RFC 3261 §18.1.1: largest UDP datagram; TCP messages are held to it too
MAX_CSEQ = 2**31 - 1  # RFC 3261 §8.1.1.5

# RFC 3261 §7.3.3 and the IANA registry: compact header forms.
COMPACT = {"i": "Call-ID", "m": "Contact", "e": "Content-Encoding", "l": "Content-Length", "c": "Content-Type",
           "f": "From", "s": "Subject", "k": "Supported", "t": "To", "v": "Via", "r": "Refer-To", "b": "Referred-By",
           "o": "Event", "u": "Allow-Events", "x": "Session-Expires", "a": "Accept-Contact", "y": "Identity"}
_CANONICAL = {name.lower(): name for name in (
    "Call-ID", "CSeq", "Via", "From", "To", "Contact", "Content-Length", "Content-Type", "Content-Disposition",
    "Max-Forwards", "Record-Route", "Route", "Allow", "Supported", "Require", "Accept", "User-Agent", "Server",
    "Unsupported", "Retry-After", "Content-ID", "MIME-Version", "Session-Expires", "WWW-Authenticate", "Warning")}
_TOKEN = re.compile(r"^[A-Za-z0-9.!%*_+`'~-]+$")  # RFC 3261 §25.1 token
_STATUS_LINE = re.compile(r"^SIP/2\.0 ([1-6]\d\d)(?: (.*))?$")
_REQUEST_LINE = re.compile(r"^(\S+) (\S+) (SIP/\d+\.\d+)$")
# ASCII digits only, and few enough for int(): str.isdigit() also takes "²" and "١".
_NUMBER = re.compile(r"[0-9]{1,10}")
_MULTI_VALUED = ("via", "contact", "record-route", "route", "allow", "supported", "require", "accept")


class SipError(ProtocolError):
    """A SIP message this server cannot act on; `status` is the response that says so."""

    status = 400


class SipSyntaxError(SipError):
    """The message breaks RFC 3261's grammar (answered 400 when it can be answered)."""


class SipHeaderError(SipError):
    """A header a UAS needs is missing or malformed (answered 400)."""


class UnsupportedUriScheme(SipError):
    """The Request-URI is not sip: or sips: (answered 416, RFC 3261 §8.2.2.1)."""

    status = 416


def canonical(name: str) -> str:
    """A header name in its usual spelling, compact forms expanded."""
    lower = name.lower()
    if lower in COMPACT:
        return COMPACT[lower]
    return _CANONICAL.get(lower) or "-".join(part.capitalize() for part in name.split("-"))


def split_values(value: str) -> list[str]:
    """A comma-separated header value split outside quotes and angle brackets (§7.3.1)."""
    parts, current, quoted, angle = [], [], False, False
    for char in value:
        if char == '"':
            quoted = not quoted
        elif char == "<" and not quoted:
            angle = True
        elif char == ">" and not quoted:
            angle = False
        if char == "," and not quoted and not angle:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    parts.append("".join(current).strip())
    return [part for part in parts if part]


@dataclass(slots=True)
class Headers:
    """Ordered header fields with case-insensitive lookup."""

    items: list[tuple[str, str]] = field(default_factory=list)

    def get(self, name: str) -> str | None:
        wanted = canonical(name)
        for key, value in self.items:
            if key == wanted:
                return value
        return None

    def get_all(self, name: str) -> list[str]:
        """Every value of `name`, comma-separated lists split for list-valued headers."""
        wanted = canonical(name)
        values = [value for key, value in self.items if key == wanted]
        if wanted.lower() in _MULTI_VALUED:
            return [part for value in values for part in split_values(value)]
        return values

    def add(self, name: str, value: str) -> None:
        self.items.append((canonical(name), value))

    def set(self, name: str, value: str) -> None:
        self.remove(name)
        self.add(name, value)

    def remove(self, name: str) -> None:
        wanted = canonical(name)
        self.items = [(key, value) for key, value in self.items if key != wanted]

    def lines(self) -> list[str]:
        return [f"{key}: {value}" for key, value in self.items]


@dataclass(slots=True)
class Via:
    """One Via value (§20.42): transport, sent-by and parameters."""

    transport: str
    host: str
    port: int | None
    params: dict[str, str | None]

    @classmethod
    def parse(cls, value: str) -> Via:
        match = re.match(r"^SIP\s*/\s*2\.0\s*/\s*([A-Za-z]+)\s+([^;\s]+)\s*(;.*)?$", value.strip())
        if match is None:
            raise SipHeaderError("Malformed Via header")
        host, port = _host_port(match[2], "Via")
        return cls(match[1].upper(), host, port, _params(match[3] or ""))

    @property
    def branch(self) -> str | None:
        return self.params.get("branch")

    @property
    def sent_by(self) -> str:
        return f"{self.host}:{self.port}" if self.port else self.host

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        sent = f"{host}:{self.port}" if self.port else host
        return f"SIP/2.0/{self.transport} {sent}" + _format_params(self.params)


@dataclass(slots=True)
class SipUri:
    """A sip: or sips: URI (§19.1), enough of it to route and to read the user part."""

    scheme: str
    user: str | None
    host: str
    port: int | None
    params: dict[str, str | None]

    @classmethod
    def parse(cls, text: str) -> SipUri:
        scheme, colon, rest = text.partition(":")
        if not colon or scheme.lower() not in ("sip", "sips"):
            raise UnsupportedUriScheme(f"Unsupported URI scheme {scheme.lower()[:10]!r}")
        rest = rest.split("?", 1)[0]
        rest, _, params = rest.partition(";")
        user, at, hostport = rest.rpartition("@")
        if not hostport:
            raise SipHeaderError("Malformed SIP URI")
        host, port = _host_port(hostport, "URI")
        return cls(scheme.lower(), (user.split(":")[0] or None) if at else None, host, port, _params(";" + params if params else ""))

    def __str__(self) -> str:
        user = f"{self.user}@" if self.user else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = f":{self.port}" if self.port else ""
        return f"{self.scheme}:{user}{host}{port}" + _format_params(self.params)


@dataclass(slots=True)
class NameAddr:
    """A From, To, Contact or Route value: display name, URI and header parameters."""

    uri: str
    display: str = ""
    params: dict[str, str | None] = field(default_factory=dict)

    @classmethod
    def parse(cls, value: str, header: str = "address") -> NameAddr:
        value = value.strip()
        if "<" in value:
            display, _, rest = value.partition("<")
            uri, closed, params = rest.partition(">")
            if not closed or not uri.strip():
                raise SipHeaderError(f"Malformed {header} header")
            return cls(uri.strip(), display.strip(), _params(params.strip()))
        uri, _, params = value.partition(";")
        if not uri or " " in uri.strip():
            raise SipHeaderError(f"Malformed {header} header")
        return cls(uri.strip(), "", _params(";" + params if params else ""))

    @property
    def tag(self) -> str | None:
        return self.params.get("tag")

    def __str__(self) -> str:
        display = f"{self.display} " if self.display else ""
        return f"{display}<{self.uri}>" + _format_params(self.params)


def _host_port(text: str, where: str) -> tuple[str, int | None]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise SipHeaderError(f"Malformed host in {where}")
    if port_text:
        if not _NUMBER.fullmatch(port_text) or not 0 < int(port_text) < 65536:
            raise SipHeaderError(f"Malformed port in {where}")
        return host, int(port_text)
    return host, None


def _params(text: str) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    for part in text.split(";")[1:] if text.startswith(";") else text.split(";"):
        part = part.strip()
        if part:
            name, eq, value = part.partition("=")
            params[name.strip().lower()] = value.strip() if eq else None
    return params


def _format_params(params: dict[str, str | None]) -> str:
    return "".join(f";{name}" if value is None else f";{name}={value}" for name, value in params.items())


@dataclass(slots=True)
class SipMessage:
    """What requests and responses share: header fields and a body."""

    headers: Headers = field(default_factory=Headers)
    body: bytes = b""

    @property
    def call_id(self) -> str | None:
        return self.headers.get("Call-ID")

    def cseq(self) -> tuple[int, str]:
        """(number, method) of the CSeq header (§20.16)."""
        value = self.headers.get("CSeq")
        parts = value.split() if value else []
        if len(parts) != 2 or not _NUMBER.fullmatch(parts[0]) or int(parts[0]) > MAX_CSEQ or not _TOKEN.match(parts[1]):
            raise SipHeaderError("Malformed CSeq header" if value else "Missing CSeq header")
        return int(parts[0]), parts[1]

    def vias(self) -> list[Via]:
        return [Via.parse(value) for value in self.headers.get_all("Via")]

    def address(self, name: str) -> NameAddr:
        value = self.headers.get(name)
        if value is None:
            raise SipHeaderError(f"Missing {name} header")
        return NameAddr.parse(value, name)

    @property
    def content_type(self) -> str:
        return (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()

    def _serialise(self, start: str) -> bytes:
        headers = Headers(list(self.headers.items))
        headers.set("Content-Length", str(len(self.body)))
        return ("\r\n".join([start, *headers.lines()]) + "\r\n\r\n").encode() + self.body


@dataclass(slots=True)
class SipRequest(SipMessage):
    """A request (RFC 3261 §7.1)."""

    method: str = ""
    uri: str = ""

    def validate(self) -> None:
        """Check what a UAS needs (RFC 3261 §8.2): Via with a sent-by, From, To,
        Call-ID, a CSeq naming this method, a sip: Request-URI."""
        vias = self.vias()
        if not vias:
            raise SipHeaderError("Missing Via header")
        for name in ("From", "To"):
            self.address(name)
        if not self.call_id or not self.call_id.strip():
            raise SipHeaderError("Missing Call-ID header")
        _, method = self.cseq()
        if method != self.method:
            raise SipHeaderError("CSeq method does not match the request")
        forwards = self.headers.get("Max-Forwards")
        if forwards is not None and (not _NUMBER.fullmatch(forwards.strip()) or int(forwards) > 255):
            raise SipHeaderError("Malformed Max-Forwards header")
        SipUri.parse(self.uri)

    def __bytes__(self) -> bytes:
        return self._serialise(f"{self.method} {self.uri} {SIP_VERSION}")


@dataclass(slots=True)
class SipResponse(SipMessage):
    """A response (RFC 3261 §7.2)."""

    status: int = 200
    reason: str = "OK"

    def __bytes__(self) -> bytes:
        return self._serialise(f"{SIP_VERSION} {self.status} {self.reason}")


def parse_message(data: bytes) -> SipRequest | SipResponse:
    """One SIP message from a datagram or a framed stream message."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise SipSyntaxError("Message too large")
    data = data.lstrip(b"\r\n")  # §7.5: CRLFs before the start line are ignored
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = data.partition(b"\n\n")
        if not sep:
            raise SipSyntaxError("Message has no end of headers")
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        raise SipSyntaxError("Message headers are not UTF-8") from None
    lines = text.replace("\r\n", "\n").split("\n")
    message = _start_line(lines[0])
    message.headers = _header_lines(lines[1:])
    message.body = _body(message.headers, body)
    return message


def _start_line(line: str) -> SipRequest | SipResponse:
    status = _STATUS_LINE.match(line)
    if status:
        return SipResponse(status=int(status[1]), reason=status[2] or "")
    request = _REQUEST_LINE.match(line)
    if request is None:
        raise SipSyntaxError("Malformed start line")
    if request[3] != SIP_VERSION:
        raise SipSyntaxError("Unsupported SIP version")
    if not _TOKEN.match(request[1]):
        raise SipSyntaxError("Malformed method")
    return SipRequest(method=request[1], uri=request[2])


def _header_lines(lines: list[str]) -> Headers:
    headers = Headers()
    for line in lines:
        if line[:1] in (" ", "\t"):
            if not headers.items:
                raise SipSyntaxError("Header continuation before any header")
            name, value = headers.items[-1]
            headers.items[-1] = (name, f"{value} {line.strip()}")  # §7.3.1 line folding
            continue
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.match(name.strip()):
            raise SipSyntaxError("Malformed header line")
        headers.add(name.strip(), value.strip())
    return headers


def _body(headers: Headers, body: bytes) -> bytes:
    length = headers.get("Content-Length")
    if length is None:
        return body  # §18.3: optional over UDP, where the datagram delimits the message
    if not _NUMBER.fullmatch(length):
        raise SipHeaderError("Malformed Content-Length header")
    if int(length) > len(body):
        raise SipHeaderError("Content-Length exceeds the message body")
    return body[:int(length)]


def salvage_request(data: bytes) -> SipRequest | None:
    """The start line and the headers a response needs from a message that failed to
    parse, when they can still be read; None when it does not look like a request."""
    try:
        head = data.lstrip(b"\r\n").split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    except Exception:
        return None
    lines = head.replace("\r\n", "\n").split("\n")
    match = _REQUEST_LINE.match(lines[0])
    if match is None:
        return None
    request = SipRequest(method=match[1], uri=match[2])
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if colon and _TOKEN.match(name.strip()) and canonical(name.strip()) in ("Via", "From", "To", "Call-ID", "CSeq"):
            request.headers.add(name.strip(), value.strip())
    return request
