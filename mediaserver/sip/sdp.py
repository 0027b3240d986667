"""SDP (RFC 4566): parse and serialise session descriptions, and answer offers (RFC 3264).

Only what an RTP receiver needs is interpreted (connection, media lines, rtpmap, fmtp,
direction, label, rtcp-mux, ptime); every other line is kept as it came so that a
description survives a round trip.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from dataclasses import dataclass, field

from mediaserver.codecs.registry import RtpCodec, codec_for_payload_type, find_codec
from mediaserver.errors import MediaServerError, ProtocolError

# RFC 4566 §5: the line types, in the order they must appear at session and media level.
SESSION_ORDER = "vosiuepcbtrzkam"
MEDIA_ORDER = "icbka"
DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")  # RFC 3264 §5.1
RTP_PROFILES = ("RTP/AVP", "RTP/AVPF")  # RFC 3551, RFC 4585: plain RTP; SRTP is not offered
MAX_SDP_BYTES = 65536

# RFC 3264 §6.1: the answer's direction for each direction of an offered stream, seen
# from a receiver that never sends.
_ANSWER_DIRECTION = {"sendrecv": "recvonly", "sendonly": "recvonly", "recvonly": "inactive", "inactive": "inactive"}
_LINE = re.compile(r"^([a-z])=(.*)$")
_TOKEN = re.compile(r"^[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+$")
# ASCII digits only, and few enough for int(): str.isdigit() also takes "²" and "١".
_NUMBER = re.compile(r"[0-9]{1,20}")


class SdpError(ProtocolError):
    """A session description that does not follow RFC 4566; the message says where."""


class OfferNotAcceptable(MediaServerError):
    """A well-formed offer with nothing this server can receive (SIP 488, RFC 3261 §21.4.26)."""


@dataclass(slots=True)
class Connection:
    """A c= line: network type, address type, address (RFC 4566 §5.7)."""

    address: str
    addrtype: str = "IP4"
    nettype: str = "IN"

    @classmethod
    def parse(cls, value: str, where: str) -> Connection:
        parts = value.split()
        if len(parts) != 3 or parts[0] != "IN" or parts[1] not in ("IP4", "IP6"):
            raise SdpError(f"SDP {where} c= line is not 'IN IP4|IP6 <address>': {value!r}")
        address = parts[2].split("/")[0]
        try:
            ipaddress.ip_address(address)
        except ValueError:
            if not _TOKEN.match(address):
                raise SdpError(f"SDP {where} c= address is not valid: {address!r}") from None
        return cls(address, parts[1], parts[0])

    def __str__(self) -> str:
        return f"{self.nettype} {self.addrtype} {self.address}"

    @property
    def on_hold(self) -> bool:
        """RFC 3264 §8.4 (and RFC 2543 before it): c=0.0.0.0 puts a stream on hold."""
        return self.address in ("0.0.0.0", "::")


@dataclass(slots=True)
class Origin:
    """The o= line (RFC 4566 §5.2)."""

    username: str
    session_id: str
    session_version: int
    connection: Connection

    @classmethod
    def parse(cls, value: str) -> Origin:
        parts = value.split()
        if len(parts) != 6:
            raise SdpError(f"SDP o= line needs 6 fields, has {len(parts)}: {value!r}")
        if not _NUMBER.fullmatch(parts[1]) or not _NUMBER.fullmatch(parts[2]):
            raise SdpError(f"SDP o= session id and version must be numbers: {value!r}")
        return cls(parts[0], parts[1], int(parts[2]), Connection.parse(" ".join(parts[3:]), "o= line's"))

    def __str__(self) -> str:
        return f"{self.username} {self.session_id} {self.session_version} {self.connection}"


@dataclass(slots=True)
class Media:
    """One media description: its m= line and the lines under it."""

    kind: str
    port: int
    proto: str
    formats: list[str]
    port_count: int | None = None
    connection: Connection | None = None
    attributes: list[tuple[str, str | None]] = field(default_factory=list)
    other: list[tuple[str, str]] = field(default_factory=list)  # i=, b=, k= as they came

    def attribute(self, name: str) -> str | None:
        """The value of the first a=`name` line ('' for a flag), or None."""
        for key, value in self.attributes:
            if key == name:
                return "" if value is None else value
        return None

    def attribute_values(self, name: str) -> list[str]:
        return [value or "" for key, value in self.attributes if key == name]

    @property
    def direction(self) -> str:
        """sendrecv, sendonly, recvonly or inactive (RFC 3264 §5.1; default sendrecv)."""
        found = [key for key, _ in self.attributes if key in DIRECTIONS]
        return found[0] if found else ""

    def rtpmap(self) -> dict[int, tuple[str, int, int]]:
        """Payload type → (encoding name, clock rate, channels) from a=rtpmap lines."""
        found = {}
        for value in self.attribute_values("rtpmap"):
            match = re.match(r"^([0-9]{1,20})\s+([^/\s]+)/([0-9]{1,20})(?:/([0-9]{1,20}))?\s*$", value)
            if match is None:
                raise SdpError(f"SDP a=rtpmap is not '<pt> <name>/<rate>[/<channels>]': {value!r}")
            found[int(match[1])] = (match[2], int(match[3]), int(match[4] or 1))
        return found

    def fmtp(self, payload_type: int) -> str | None:
        for value in self.attribute_values("fmtp"):
            pt, _, params = value.partition(" ")
            if pt == str(payload_type):
                return params.strip()
        return None

    def lines(self) -> list[str]:
        count = f"/{self.port_count}" if self.port_count is not None else ""
        out = [f"m={self.kind} {self.port}{count} {self.proto} {' '.join(self.formats)}"]
        out += [f"{kind}={value}" for kind, value in self.other if kind == "i"]
        if self.connection is not None:
            out.append(f"c={self.connection}")
        out += [f"{kind}={value}" for kind, value in self.other if kind in "bk"]
        out += [f"a={key}" if value is None else f"a={key}:{value}" for key, value in self.attributes]
        return out


@dataclass(slots=True)
class SessionDescription:
    """A whole SDP body."""

    origin: Origin
    name: str = "-"
    connection: Connection | None = None
    timing: list[tuple[str, str]] = field(default_factory=lambda: [("t", "0 0")])  # t=, r=, z= lines
    attributes: list[tuple[str, str | None]] = field(default_factory=list)
    media: list[Media] = field(default_factory=list)
    other: list[tuple[str, str]] = field(default_factory=list)  # i= u= e= p= b= k= as they came

    @classmethod
    def parse(cls, text: str | bytes) -> SessionDescription:
        """The description in `text`; SdpError names the first line that is wrong."""
        if isinstance(text, bytes):
            if len(text) > MAX_SDP_BYTES:
                raise SdpError(f"SDP body of {len(text)} bytes is larger than {MAX_SDP_BYTES}")
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError:
                raise SdpError("SDP body is not UTF-8") from None
        lines = [line for line in text.replace("\r\n", "\n").split("\n") if line != ""]
        parsed = []
        for number, line in enumerate(lines, 1):
            match = _LINE.match(line)
            if match is None:
                raise SdpError(f"SDP line {number} is not <type>=<value>: {line[:40]!r}")
            if match[1] not in SESSION_ORDER:
                raise SdpError(f"SDP line {number} has unknown type {match[1]!r}")
            parsed.append((number, match[1], match[2]))
        return _Parser(parsed).session()

    def __str__(self) -> str:
        out = ["v=0", f"o={self.origin}", f"s={self.name or '-'}"]
        out += [f"{kind}={value}" for kind, value in self.other if kind in "iuep"]
        if self.connection is not None:
            out.append(f"c={self.connection}")
        out += [f"{kind}={value}" for kind, value in self.other if kind == "b"]
        out += [f"{kind}={value}" for kind, value in self.timing]
        out += [f"{kind}={value}" for kind, value in self.other if kind == "k"]
        out += [f"a={key}" if value is None else f"a={key}:{value}" for key, value in self.attributes]
        for media in self.media:
            out += media.lines()
        return "\r\n".join(out) + "\r\n"

    def __bytes__(self) -> bytes:
        return str(self).encode()

    def connection_of(self, media: Media) -> Connection | None:
        return media.connection or self.connection

    def direction_of(self, media: Media) -> str:
        """A stream's direction: its own attribute, else the session's, else sendrecv."""
        if media.direction:
            return media.direction
        found = [key for key, _ in self.attributes if key in DIRECTIONS]
        return found[0] if found else "sendrecv"


class _Parser:
    """Walks (line number, type, value) in RFC 4566 order."""

    def __init__(self, lines: list[tuple[int, str, str]]) -> None:
        self.lines = lines
        self.at = 0

    def _take(self, kind: str) -> tuple[int, str] | None:
        if self.at < len(self.lines) and self.lines[self.at][1] == kind:
            number, _, value = self.lines[self.at]
            self.at += 1
            return number, value
        return None

    def _require(self, kind: str, what: str) -> str:
        found = self._take(kind)
        if found is None:
            where = f"line {self.lines[self.at][0]}" if self.at < len(self.lines) else "the end"
            raise SdpError(f"SDP needs {what} ({kind}=) at {where}")
        return found[1]

    def session(self) -> SessionDescription:
        if not self.lines:
            raise SdpError("SDP body is empty")
        if self._require("v", "the version") != "0":
            raise SdpError("SDP version (v=) must be 0")
        origin = Origin.parse(self._require("o", "the origin"))
        name = self._require("s", "a session name")
        session = SessionDescription(origin, name, timing=[])
        self._session_lines(session)
        while self.at < len(self.lines):
            session.media.append(self._media())
        if not session.timing:
            raise SdpError("SDP needs at least one time line (t=)")
        for index, media in enumerate(session.media):
            if media.connection is None and session.connection is None and media.port != 0:
                raise SdpError(f"SDP media {index} has no connection address (c=) and the session has none")
        return session

    def _session_lines(self, session: SessionDescription) -> None:
        order = SESSION_ORDER.index("s")
        while self.at < len(self.lines) and self.lines[self.at][1] != "m":
            number, kind, value = self.lines[self.at]
            position = SESSION_ORDER.index(kind)
            if position < order or kind in "vos":
                raise SdpError(f"SDP line {number} ({kind}=) is out of order")
            order = position
            self.at += 1
            if kind == "c":
                if session.connection is not None:
                    raise SdpError(f"SDP line {number} is a second session c= line")
                session.connection = Connection.parse(value, "session")
            elif kind in "trz":
                if kind != "t" and not session.timing:
                    raise SdpError(f"SDP line {number} ({kind}=) comes before any t= line")
                session.timing.append((kind, value))
            elif kind == "a":
                session.attributes.append(_attribute(value))
            else:
                session.other.append((kind, value))

    def _media(self) -> Media:
        number, value = self._take("m")
        media = _media_line(number, value)
        order = 0
        while self.at < len(self.lines) and self.lines[self.at][1] != "m":
            number, kind, value = self.lines[self.at]
            if kind not in MEDIA_ORDER or MEDIA_ORDER.index(kind) < order:
                raise SdpError(f"SDP line {number} ({kind}=) is not allowed here in a media description")
            order = MEDIA_ORDER.index(kind)
            self.at += 1
            if kind == "c":
                media.connection = Connection.parse(value, f"line {number}")
            elif kind == "a":
                media.attributes.append(_attribute(value))
            else:
                media.other.append((kind, value))
        if media.proto in RTP_PROFILES:
            media.rtpmap()  # an rtpmap that cannot be read is an error now, not when answering
        return media


def _attribute(value: str) -> tuple[str, str | None]:
    name, colon, rest = value.partition(":")
    return (name, rest if colon else None)


def _media_line(number: int, value: str) -> Media:
    parts = value.split()
    if len(parts) < 4:
        raise SdpError(f"SDP line {number}: m= needs <media> <port> <proto> <format>...: {value!r}")
    kind, port_text, proto, formats = parts[0], parts[1], parts[2], parts[3:]
    port_part, slash, count = port_text.partition("/")
    if not _NUMBER.fullmatch(port_part) or int(port_part) > 65535 or (slash and not _NUMBER.fullmatch(count)):
        raise SdpError(f"SDP line {number}: m= port is not a port number: {port_text!r}")
    if proto in RTP_PROFILES and not all(_NUMBER.fullmatch(f) and int(f) <= 127 for f in formats):
        raise SdpError(f"SDP line {number}: RTP payload types must be numbers 0..127: {' '.join(formats)!r}")
    return Media(kind, int(port_part), proto, formats, int(count) if slash else None)


# -- offer/answer (RFC 3264) ------------------------------------------------------------


@dataclass(slots=True)
class AcceptedStream:
    """An offered audio stream this server will receive, and on which terms."""

    index: int  # position of its m= line in the offer
    formats: dict[int, RtpCodec]  # payload type → codec, audio first, in the offer's order
    remote: tuple[str, int]  # where the offerer said it sends from/receives on
    direction: str  # the offer's direction
    label: str | None  # a=label (RFC 4574), which SIPREC uses to name streams
    rtcp_mux: bool
    ptime: str | None

    @property
    def on_hold(self) -> bool:
        """The offerer sends nothing (RFC 3264 §8.4; c=0.0.0.0 is RFC 2543's way)."""
        return self.direction in ("recvonly", "inactive") or self.remote[0] in ("0.0.0.0", "::")


def accepted_streams(offer: SessionDescription) -> list[AcceptedStream | None]:
    """For each m= line of `offer`, the stream this server accepts, or None (rejected).

    Audio over plain RTP with at least one codec the server decodes is accepted; its
    telephone-event formats are kept when they share a clock rate with an accepted codec.
    """
    out: list[AcceptedStream | None] = []
    for index, media in enumerate(offer.media):
        if media.kind != "audio" or media.port == 0 or media.proto not in RTP_PROFILES:
            out.append(None)
            continue
        formats = _formats(media)
        if not any(codec.is_audio for codec in formats.values()):
            out.append(None)
            continue
        connection = offer.connection_of(media)
        out.append(AcceptedStream(index, formats, (connection.address, media.port), offer.direction_of(media),
                                  media.attribute("label"), media.attribute("rtcp-mux") is not None, media.attribute("ptime")))
    return out


def _formats(media: Media) -> dict[int, RtpCodec]:
    rtpmap = media.rtpmap()
    audio: dict[int, RtpCodec] = {}
    events: dict[int, RtpCodec] = {}
    for text in media.formats:
        pt = int(text)
        if pt in rtpmap:
            name, rate, channels = rtpmap[pt]
            # RFC 7587 §7 always says opus/48000/2; be lenient about the channel count there.
            codec = find_codec(name, rate, None if name.lower() == "opus" else channels)
        else:
            codec = codec_for_payload_type(pt)  # RFC 3551 Table 4, rtpmap optional
        if codec is None:
            continue
        (audio if codec.is_audio else events)[pt] = codec
    rates = {codec.clock_rate for codec in audio.values()}
    audio.update({pt: codec for pt, codec in events.items() if codec.clock_rate in rates})
    return audio


def answer(offer: SessionDescription, accepted: list[AcceptedStream | None], ports: list[int], address: str,
           origin: Origin | None = None) -> SessionDescription:
    """The answer (RFC 3264 §6) to `offer`: one m= line per offered one, in order; accepted
    streams on `ports[index]`, rejected ones with port 0. Raises OfferNotAcceptable when no
    stream is accepted. `origin` is the previous answer's, for a re-offer (§8: same
    session id, version one higher)."""
    if not any(accepted):
        raise OfferNotAcceptable("none of the offered streams has a codec this server can receive")
    connection = Connection(address, "IP6" if ":" in address else "IP4")
    if origin is None:
        origin = Origin("mediaserver", str(secrets.randbelow(10**12)), 1, connection)
    else:
        origin = Origin(origin.username, origin.session_id, origin.session_version + 1, connection)
    result = SessionDescription(origin, "mediaserver", connection)
    for index, media in enumerate(offer.media):
        stream = accepted[index] if index < len(accepted) else None
        result.media.append(_answer_media(media, stream, ports[index] if stream else 0))
    return result


def _answer_media(offered: Media, stream: AcceptedStream | None, port: int) -> Media:
    if stream is None:
        return Media(offered.kind, 0, offered.proto, offered.formats[:1])
    media = Media("audio", port, offered.proto, [str(pt) for pt in stream.formats])
    for pt, codec in stream.formats.items():
        media.attributes.append(("rtpmap", f"{pt} {codec.rtpmap}"))
        params = offered.fmtp(pt)
        if params:
            media.attributes.append(("fmtp", f"{pt} {params}"))
    if stream.label is not None:
        media.attributes.append(("label", stream.label))
    if stream.rtcp_mux:
        media.attributes.append(("rtcp-mux", None))
    if stream.ptime:
        media.attributes.append(("ptime", stream.ptime))
    media.attributes.append((_ANSWER_DIRECTION[stream.direction], None))
    return media
