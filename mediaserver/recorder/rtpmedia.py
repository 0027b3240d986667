"""An RTP leg's media path in the process that runs its session: sockets and receiver.

`RtpMedia` binds the leg's port pair and feeds its packets to the session's inbox (codec
payloads, decoded on the processing thread) and its RFC 4733 key presses to the session.
It is the same in the server process and in a worker process; whoever does signalling
(SIP, the legs API) reaches it directly or through a worker.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from mediaserver.codecs.registry import RtpCodec, find_codec
from mediaserver.rtp.endpoint import PortPool, RtpEndpoint
from mediaserver.rtp.receiver import RtpReceiver
from mediaserver.recorder.session import Session

FormatSpec = dict[int, tuple[str, int, int]]  # payload type -> (encoding name, clock rate, channels)


def format_spec(formats: Mapping[int, RtpCodec]) -> FormatSpec:
    """Negotiated formats as plain data (to hand to another process)."""
    return {pt: (codec.name, codec.clock_rate, codec.channels) for pt, codec in formats.items()}


def formats_from(spec: FormatSpec) -> dict[int, RtpCodec]:
    formats = {}
    for pt, (name, clock_rate, channels) in spec.items():
        codec = find_codec(name, clock_rate, channels) or find_codec(name, clock_rate)
        if codec is not None:
            formats[int(pt)] = codec
    return formats


class RtpMedia:
    """One RTP leg's sockets and receiver, feeding `session`."""

    def __init__(self, endpoint: RtpEndpoint, receiver: RtpReceiver) -> None:
        self.endpoint = endpoint
        self.receiver = receiver

    @classmethod
    async def open(cls, pool: PortPool, clock, session: Session, leg_id: str, formats: Mapping[int, RtpCodec],
                   hold_s: float) -> "RtpMedia":
        """Bind a port pair from `pool` (OSError when none is free) and start receiving."""
        endpoint = RtpEndpoint(clock.monotonic)
        await pool.open(endpoint)
        receiver = RtpReceiver(formats, session.t0, functools.partial(session.post_encoded, leg_id),
                               functools.partial(session.dtmf, leg_id), session.inputs[leg_id], leg_id, hold_s)
        endpoint.sink = receiver
        return cls(endpoint, receiver)

    @property
    def port(self) -> int:
        return self.endpoint.port

    def set_formats(self, formats: Mapping[int, RtpCodec]) -> None:
        self.receiver.set_formats(formats)

    def relatch(self) -> None:
        self.endpoint.relatch()

    async def close(self) -> dict[str, Any]:
        """Close the sockets; the leg's RTP statistics."""
        self.endpoint.close()
        return self.stats()

    def stats(self) -> dict[str, Any]:
        """The leg's RTP statistics, as kept with the leg in the catalog."""
        receiver, endpoint = self.receiver, self.endpoint
        counters, timeline = receiver.counters, receiver.timeline
        return {
            "packets": counters.packets, "lost": counters.lost, "malformed": counters.malformed,
            "duplicates": timeline.duplicates, "stale": timeline.stale, "reanchored": timeline.reanchored,
            "realigned": timeline.realigned, "slipped_ms": round(timeline.slipped * 1000 / timeline.rate, 1),
            "ssrc_changes": timeline.ssrc_changes, "unknown_payload_type": receiver.stats.unknown_payload_type,
            "dtmf_events": len(receiver.stats.key_presses), "rtcp_packets": endpoint.stats.rtcp_packets,
            "rtcp_malformed": endpoint.stats.rtcp_malformed, "foreign_source": endpoint.stats.foreign,
            "relatched": endpoint.stats.relatched, "errors": endpoint.stats.errors, "port": endpoint.port,
        }
