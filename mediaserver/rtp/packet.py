"""RTP and RTCP packets (RFC 3550): parse and serialise, nothing else.

RTP fixed header (RFC 3550 §5.1)::

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |V=2|P|X|  CC   |M|     PT      |       sequence number         |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                           timestamp                           |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |           synchronization source (SSRC) identifier            |
    +=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+
    |            contributing source (CSRC) identifiers             |
    |                             ....                              |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+

`parse_header` is the receive path's allocation-light entry point: it checks every length
and returns the header fields and where the payload lies, without building a packet
object. `RtpPacket.parse` is the same check with a dataclass around it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from mediaserver.errors import ProtocolError

RTP_VERSION = 2  # RFC 3550 §5.1
RTP_HEADER_SIZE = 12  # RFC 3550 §5.1: the fixed header
RTCP_HEADER_SIZE = 4  # RFC 3550 §6.4.1: V, P, RC, PT, length
# RFC 5761 §4: with RTP and RTCP on one port, a second octet of 192..223 is RTCP
# (RTCP packet types 192-223 collide with RTP payload types 64-95 plus the marker bit,
# which is why those payload types must not be used).
RTCP_MUX_TYPES = range(192, 224)
RTCP_SR, RTCP_RR, RTCP_SDES, RTCP_BYE, RTCP_APP = 200, 201, 202, 203, 204  # RFC 3550 §12.1
RTCP_RTPFB, RTCP_PSFB = 205, 206  # RFC 4585 §6.1
RTCP_XR = 207  # RFC 3611 §2

_FIXED = struct.Struct("!BBHII")
_EXTENSION = struct.Struct("!HH")
_RTCP = struct.Struct("!BBH")


class RtpError(ProtocolError):
    """An RTP packet that does not follow RFC 3550 §5.1."""


class RtpTruncatedError(RtpError):
    """The datagram ends before the header it announces."""


class RtpVersionError(RtpError):
    """The version field is not 2."""


class RtpPaddingError(RtpError):
    """The padding count does not fit the packet."""


class RtcpError(ProtocolError):
    """An RTCP compound packet that does not follow RFC 3550 §6.4."""


def parse_header(data: bytes) -> tuple[int, int, int, int, int, int]:
    """(second octet, sequence number, timestamp, SSRC, payload start, payload end).

    The second octet carries the marker bit (0x80) and the payload type (0x7F). Every
    length is checked; a packet that breaks one raises a `RtpError` subclass.
    """
    size = len(data)
    if size < RTP_HEADER_SIZE:
        raise RtpTruncatedError(f"RTP packet of {size} bytes is shorter than the 12-byte fixed header")
    first, second, seq, timestamp, ssrc = _FIXED.unpack_from(data)
    if first >> 6 != RTP_VERSION:
        raise RtpVersionError(f"RTP version is {first >> 6}, not 2")
    start = RTP_HEADER_SIZE + 4 * (first & 0x0F)
    if first & 0x10:
        if size < start + 4:
            raise RtpTruncatedError(f"RTP packet of {size} bytes ends inside its header extension")
        start += 4 + 4 * _EXTENSION.unpack_from(data, start)[1]
    if start > size:
        raise RtpTruncatedError(f"RTP packet of {size} bytes ends inside its {start}-byte header")
    end = size
    if first & 0x20:
        padding = data[-1]
        if padding == 0 or padding > size - start:
            raise RtpPaddingError(f"RTP padding of {padding} bytes does not fit a {size - start}-byte payload")
        end -= padding
    return second, seq, timestamp, ssrc, start, end


@dataclass(slots=True)
class RtpPacket:
    """One RTP packet; `payload` excludes padding, which `padding` counts."""

    payload_type: int
    sequence_number: int
    timestamp: int
    ssrc: int
    payload: bytes = b""
    marker: bool = False
    csrc: tuple[int, ...] = ()
    extension: tuple[int, bytes] | None = None  # (profile-defined 16 bits, data)
    padding: int = 0

    @classmethod
    def parse(cls, data: bytes) -> RtpPacket:
        """The packet in `data`, or a `RtpError` naming what is wrong."""
        second, seq, timestamp, ssrc, start, end = parse_header(data)
        count = data[0] & 0x0F
        csrc = struct.unpack_from(f"!{count}I", data, RTP_HEADER_SIZE)
        extension = None
        if data[0] & 0x10:
            at = RTP_HEADER_SIZE + 4 * count
            profile, words = _EXTENSION.unpack_from(data, at)
            extension = (profile, bytes(data[at + 4:at + 4 + 4 * words]))
        return cls(second & 0x7F, seq, timestamp, ssrc, bytes(data[start:end]), bool(second & 0x80),
                   csrc, extension, len(data) - end)

    def __bytes__(self) -> bytes:
        if len(self.csrc) > 15:
            raise ValueError("an RTP packet carries at most 15 CSRC identifiers")
        first = RTP_VERSION << 6 | (0x20 if self.padding else 0) | (0x10 if self.extension else 0) | len(self.csrc)
        second = (0x80 if self.marker else 0) | self.payload_type
        parts = [_FIXED.pack(first, second, self.sequence_number, self.timestamp, self.ssrc)]
        parts.extend(struct.pack("!I", c) for c in self.csrc)
        if self.extension is not None:
            profile, data = self.extension
            if len(data) % 4:
                raise ValueError("an RTP header extension is a whole number of 32-bit words")
            parts.append(_EXTENSION.pack(profile, len(data) // 4) + data)
        parts.append(self.payload)
        if self.padding:
            parts.append(bytes(self.padding - 1) + bytes((self.padding,)))
        return b"".join(parts)


@dataclass(slots=True)
class RtcpPacket:
    """One packet of an RTCP compound: its type, count field and body after the header."""

    packet_type: int
    count: int = 0  # reception report count, source count or FMT, by type
    body: bytes = b""
    padding: int = 0

    @property
    def ssrc(self) -> int | None:
        """The sender's SSRC: the first word of every RFC 3550 packet type."""
        return struct.unpack_from("!I", self.body)[0] if len(self.body) >= 4 else None

    @classmethod
    def parse_compound(cls, data: bytes) -> list[RtcpPacket]:
        """Every packet of a compound datagram (RFC 3550 §6.1), checked to fill it exactly."""
        packets = []
        at = 0
        while at < len(data):
            if len(data) - at < RTCP_HEADER_SIZE:
                raise RtcpError(f"RTCP packet at byte {at} is shorter than the 4-byte header")
            first, packet_type, words = _RTCP.unpack_from(data, at)
            if first >> 6 != RTP_VERSION:
                raise RtcpError(f"RTCP version is {first >> 6}, not 2")
            end = at + 4 * (words + 1)
            if end > len(data):
                raise RtcpError(f"RTCP packet at byte {at} claims {4 * (words + 1)} bytes, {len(data) - at} remain")
            padding = data[end - 1] if first & 0x20 else 0
            if first & 0x20 and (padding == 0 or padding > end - at - RTCP_HEADER_SIZE):
                raise RtcpError(f"RTCP padding of {padding} bytes does not fit the packet at byte {at}")
            packets.append(cls(packet_type, first & 0x1F, bytes(data[at + 4:end - padding]), padding))
            at = end
        if not packets:
            raise RtcpError("RTCP datagram is empty")
        return packets

    def __bytes__(self) -> bytes:
        length = RTCP_HEADER_SIZE + len(self.body) + self.padding
        if length % 4:
            raise ValueError("an RTCP packet is a whole number of 32-bit words")
        first = RTP_VERSION << 6 | (0x20 if self.padding else 0) | self.count
        pad = bytes(self.padding - 1) + bytes((self.padding,)) if self.padding else b""
        return _RTCP.pack(first, self.packet_type, length // 4 - 1) + self.body + pad


def is_rtcp(data: bytes) -> bool:
    """Whether a datagram on a multiplexed port is RTCP rather than RTP (RFC 5761 §4)."""
    return len(data) > 1 and data[1] in RTCP_MUX_TYPES
