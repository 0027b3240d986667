"""RTP legs by SDP offer/answer: their ports, their media paths and their statistics.

`RtpService` ("rtp") owns the UDP endpoints of RTP legs: `offer()` answers the SDP of
`POST /api/v1/sessions/{uuid}/legs`, and the SIP service opens its legs through it.
Each leg's packets go straight from the socket callback to the session's inbox as codec
payloads; decoding happens on the processing thread.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from mediaserver.errors import Invalid, Unavailable
from mediaserver.recorder.engine import Engine, LiveSession
from mediaserver.recorder.legs import Leg
from mediaserver.sip.sdp import AcceptedStream, SessionDescription, accepted_streams, answer
from mediaserver.sip.transport import local_address_for
from mediaserver.tasks import TaskSet

log = logging.getLogger(__name__)

# What the media path counts and drops, kept in the engine's dropped totals as rtp_<reason>.
DROP_REASONS = ("duplicates", "stale", "unknown_payload_type", "foreign_source", "rtcp_malformed", "malformed")


@dataclass(eq=False)
class RtpLeg:
    """One RTP leg: its engine leg and its media path (sockets and receiver, in this
    process or in the worker that runs the session)."""

    leg: Leg
    media: Any  # RtpMedia, or its stand-in for a session in a worker process
    stream: AcceptedStream
    closed: bool = False

    @property
    def leg_id(self) -> str:
        return self.leg.leg_id

    @property
    def role(self) -> str:
        return self.leg.role

    @property
    def live(self) -> LiveSession:
        return self.leg.live

    @property
    def endpoint(self):
        return self.media.endpoint

    @property
    def receiver(self):
        return self.media.receiver


class RtpService:
    """RTP legs of live sessions, on ports from the configured range."""

    def __init__(self, engine: Engine, host: str, jitter_ms: int, tick_ms: int) -> None:
        self.engine = engine
        self.host = host  # media and signalling face the same network
        # Packets behind a gap wait for the missing one while the mix, `jitter_ms` behind
        # real time, can still take it, with a processing tick to spare either side.
        self.hold_s = max(jitter_ms - 2 * tick_ms, tick_ms) / 1000
        self.legs: dict[str, RtpLeg] = {}
        self._sessions: dict[str, list[RtpLeg]] = {}
        self._tasks = TaskSet("rtp")
        self._watchers = TaskSet("rtp sessions")  # one per session, until it is over

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        """Close every leg's sockets and wait until they are closed; idempotent."""
        for leg in list(self.legs.values()):
            self.close_leg(leg)
        await self._tasks.wait()
        await self._tasks.close()
        await self._watchers.close()

    def address_for(self, remote_host: str) -> str:
        """The address to put in SDP for a peer at `remote_host`."""
        return local_address_for(self.host, remote_host)

    async def offer(self, live: LiveSession, role: str, offer: SessionDescription) -> tuple[str, str]:
        """A new leg `role` of `live` for the offer's first audio stream that this server
        can receive; answers (leg_id, SDP answer)."""
        accepted = accepted_streams(offer)
        first = next((stream for stream in accepted if stream is not None), None)
        if first is None:
            raise Invalid("sdp.not_acceptable", "the offer has no audio stream with a codec this server receives")
        accepted = [stream if stream is first else None for stream in accepted]
        leg = await self.open_leg(live, role, first)
        ports = [leg.media.port if stream is first else 0 for stream in accepted]
        return leg.leg_id, str(answer(offer, accepted, ports, self.address_for(first.remote[0])))

    async def open_leg(self, live: LiveSession, role: str, stream: AcceptedStream) -> RtpLeg:
        """Bind a port pair and start receiving `stream` as a new leg of `live`;
        `Unavailable` (rtp.no_ports) when no port is free."""
        handle = self.engine.open_leg(live, role, "rtp")
        try:
            media = await self.engine.open_rtp(live, handle.leg_id, stream.formats, self.hold_s)
        except OSError as exc:
            handle.end()
            raise Unavailable("rtp.no_ports", f"no RTP port is free: {exc}") from None
        leg = self.legs[handle.leg_id] = RtpLeg(handle, media, stream)
        if live.uuid not in self._sessions:
            self._sessions[live.uuid] = []
            self._watchers.spawn(self._close_when_over(live), f"rtp-session-{live.uuid}")
        self._sessions[live.uuid].append(leg)
        return leg

    def update_leg(self, leg: RtpLeg, stream: AcceptedStream) -> None:
        """A re-offer for the leg's stream: new formats, and a new peer when it moved."""
        leg.media.set_formats(stream.formats)
        if stream.remote != leg.stream.remote and not stream.on_hold:
            leg.media.relatch()
        leg.stream = stream

    def end_leg(self, leg: RtpLeg) -> None:
        """The stream was removed (port 0 in a re-offer): the leg ends, its port closes."""
        leg.leg.end()
        self.close_leg(leg)

    def close_leg(self, leg: RtpLeg) -> None:
        """Close the leg's sockets and keep its counters in the catalog; idempotent."""
        if leg.closed:
            return
        leg.closed = True
        self.legs.pop(leg.leg_id, None)
        self._tasks.spawn(self._close(leg), f"rtp-close-{leg.leg_id}")

    async def _close(self, leg: RtpLeg) -> None:
        try:
            stats = await leg.media.close()
        except Exception:
            log.exception("closing RTP leg %s failed", leg.leg_id)
            return
        for reason in DROP_REASONS:
            if stats.get(reason):
                self.engine.count_dropped(f"rtp_{reason}", stats[reason])
        try:
            self.engine.catalog.update_leg(leg.leg_id, stats=stats)
        except Exception:
            log.exception("keeping the statistics of leg %s failed", leg.leg_id)

    async def _close_when_over(self, live: LiveSession) -> None:
        """Once the session has ended (hangup, API, idle, shutdown), its ports close."""
        await live.over.wait()
        for leg in self._sessions.pop(live.uuid, ()):
            self.close_leg(leg)
