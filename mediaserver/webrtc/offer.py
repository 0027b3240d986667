"""The SDP offer of a WHIP request (RFC 9725), checked before any peer connection exists.

`Offer.parse()` reads the structure of an SDP offer (RFC 8866) far enough to decide
whether this server can take it: one audio section that sends, in a codec we decode, with
the ICE credentials (RFC 8839 §5.4) and DTLS fingerprint (RFC 8122 §5) WebRTC needs and
RTP/RTCP multiplexing (RFC 8858). It is pure: no I/O, no peer connection. A malformed
offer raises `OfferError` with `malformed=True` (the HTTP layer answers 400); a
well-formed offer this server does not support raises it with `malformed=False` (406,
which RFC 9725 asks for rather than rejecting single "m=" sections).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mediaserver.errors import ProtocolError

# Codecs a WHIP leg may send, as "encoding/clock rate" (RFC 7587 for Opus, RFC 3551 for
# G.711). G.722 is left out: its RTP clock (8 kHz) differs from its sample rate (16 kHz)
# and the decoder stamps its frames as if they were equal, which would misplace them.
ACCEPTED_CODECS = ("opus/48000", "pcmu/8000", "pcma/8000")
STATIC_PAYLOAD_TYPES = {0: "pcmu/8000", 8: "pcma/8000"}  # RFC 3551 §6
DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")  # RFC 3264 §5.1
SENDING = ("sendrecv", "sendonly")

_LINE = re.compile(r"^([a-z])=(.*)$")
_MEDIA = re.compile(r"^(\S+) ([0-9]{1,10})(?:/[0-9]{1,10})? (\S+)((?: \S+)+)$")
_RTPMAP = re.compile(r"^([0-9]{1,10}) ([A-Za-z0-9_.+-]+)/([0-9]{1,10})(?:/([0-9]{1,10}))?$")
_FINGERPRINT = re.compile(r"^\S+ [0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2})+$")
_SESSION_ATTRIBUTES = ("ice-ufrag", "ice-pwd", "fingerprint", "setup")


class OfferError(ProtocolError):
    """An offer this server cannot take: `malformed` (400) or not supported (406)."""

    def __init__(self, message: str, *, malformed: bool = True) -> None:
        super().__init__(message)
        self.malformed = malformed


@dataclass(slots=True)
class MediaSection:
    """One "m=" section: what it carries and the attributes a WHIP server looks at."""

    kind: str
    port: int
    proto: str
    formats: tuple[str, ...]
    direction: str = "sendrecv"
    codecs: dict[int, str] = field(default_factory=dict)  # payload type -> "name/rate", lower case
    attributes: dict[str, str] = field(default_factory=dict)  # first value of each
    rtcp_mux: bool = False

    def codec_names(self) -> list[str]:
        """The codecs offered, in the offer's order of preference."""
        names = []
        for fmt in self.formats:
            pt = int(fmt)
            name = self.codecs.get(pt) or STATIC_PAYLOAD_TYPES.get(pt)
            if name is not None:
                names.append(name)
        return names


@dataclass(frozen=True, slots=True)
class Offer:
    """A parsed SDP offer; `audio` is the section a WHIP leg records."""

    media: tuple[MediaSection, ...]
    audio: MediaSection

    @classmethod
    def parse(cls, text: str) -> Offer:
        """Check an SDP offer's structure and that a WHIP leg can record it."""
        lines = _lines(text)
        session: dict[str, str] = {}
        media: list[MediaSection] = []
        for number, kind, value in lines:
            if kind == "m":
                media.append(_media_line(number, value))
            elif kind == "a":
                _attribute(number, value, media[-1] if media else None, session)
        for section in media:
            for name in _SESSION_ATTRIBUTES:
                if name in session:
                    section.attributes.setdefault(name, session[name])
        return cls(tuple(media), _audio_section(media))


def _lines(text: str) -> list[tuple[int, str, str]]:
    """(line number, type, value) of each line; the first must be "v=0" (RFC 8866 §5.1)."""
    parsed = []
    for number, line in enumerate(text.replace("\r\n", "\n").split("\n"), start=1):
        if line == "":
            continue
        match = _LINE.match(line)
        if match is None:
            raise OfferError(f"SDP line {number} is not <type>=<value>: {line[:60]!r}")
        parsed.append((number, match.group(1), match.group(2)))
    if not parsed or parsed[0][1:] != ("v", "0"):
        raise OfferError("an SDP offer must begin with v=0")
    return parsed


def _media_line(number: int, value: str) -> MediaSection:
    match = _MEDIA.match(value)
    if match is None:
        raise OfferError(f"SDP line {number}: m= must be '<media> <port> <proto> <fmt> ...', not {value[:60]!r}")
    kind, port, proto, formats = match.group(1), int(match.group(2)), match.group(3), tuple(match.group(4).split())
    if port > 65535:
        raise OfferError(f"SDP line {number}: port {port} is out of range")
    if kind in ("audio", "video") and "RTP" in proto:
        for fmt in formats:
            if not (fmt.isascii() and fmt.isdigit()) or len(fmt) > 3 or int(fmt) > 127:
                raise OfferError(f"SDP line {number}: RTP payload type {fmt!r} is not 0..127 (RFC 3550 §5.1)")
    return MediaSection(kind, port, proto, formats)


def _attribute(number: int, value: str, section: MediaSection | None, session: dict[str, str]) -> None:
    name, _, argument = value.partition(":")
    if name in ("ice-ufrag", "ice-pwd", "setup") and not argument:
        raise OfferError(f"SDP line {number}: a={name} needs a value")
    if name == "fingerprint" and not _FINGERPRINT.match(argument):
        raise OfferError(f"SDP line {number}: a=fingerprint must be '<hash> <hex>:<hex>:...', not {argument[:60]!r}")
    if section is None:
        session.setdefault(name, argument)
        return
    if name in DIRECTIONS:
        section.direction = name
    elif name == "rtcp-mux":
        section.rtcp_mux = True
    elif name == "rtpmap":
        _rtpmap(number, argument, section)
    else:
        section.attributes.setdefault(name, argument)


def _rtpmap(number: int, argument: str, section: MediaSection) -> None:
    match = _RTPMAP.match(argument)
    if match is None:
        raise OfferError(f"SDP line {number}: a=rtpmap must be '<pt> <encoding>/<clock rate>[/<channels>]', not {argument[:60]!r}")
    pt = int(match.group(1))
    if match.group(1) not in section.formats:
        raise OfferError(f"SDP line {number}: a=rtpmap for payload type {pt}, which the m= line does not list")
    section.codecs[pt] = f"{match.group(2).lower()}/{match.group(3)}"


def _audio_section(media: list[MediaSection]) -> MediaSection:
    """The one audio section a leg records, with what WebRTC needs to connect it."""
    audio = [m for m in media if m.kind == "audio" and m.port != 0]
    if not audio:
        raise OfferError("the offer has no audio section: a WHIP leg records audio", malformed=False)
    if len(audio) > 1:
        raise OfferError(f"the offer has {len(audio)} audio sections: a WHIP leg takes one audio track", malformed=False)
    section = audio[0]
    for name in ("ice-ufrag", "ice-pwd", "fingerprint"):
        if name not in section.attributes:
            raise OfferError(f"the audio section has no a={name} (WebRTC needs ICE credentials and a DTLS fingerprint)")
    if not section.rtcp_mux:
        raise OfferError("the audio section has no a=rtcp-mux (RFC 8858: WebRTC multiplexes RTP and RTCP)")
    if section.direction not in SENDING:
        raise OfferError(f"the audio section is {section.direction}: a WHIP client sends audio (sendonly)", malformed=False)
    if not any(name in ACCEPTED_CODECS for name in section.codec_names()):
        offered = ", ".join(section.codec_names()) or "none"
        raise OfferError(f"no audio codec in common: offered {offered}; accepted opus/48000, PCMU/8000, PCMA/8000", malformed=False)
    return section
