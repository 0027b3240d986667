"""WHIP legs (RFC 9725): a WebRTC peer per offer, its audio into its session's leg.

`publish()` checks the offer, joins (or creates) the session, opens the leg and answers
it through the WebRTC service; `unpublish()` ends a leg for the app that owns it. A leg
also ends when the client's stream or connection ends, and with its session. A leg whose
ICE or DTLS failed, or that never received audio, is logged at WARNING and carries
`error` (`ice_failed`, `dtls_failed`, `no_media`) in the recording's legs.

An offer that is malformed is `Invalid`; one this server cannot record (no audio,
several, no common codec) is `Unacceptable`.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import numpy as np

from mediaserver.calls.sessions import session_for_ingest
from mediaserver.errors import Forbidden, Invalid, NotFound, Refused, Unacceptable
from mediaserver.media import PcmFrame
from mediaserver.recorder.engine import Engine
from mediaserver.recorder.legs import Leg
from mediaserver.webrtc import Offer, OfferError, WhipService

log = logging.getLogger(__name__)


class LegOwner(NamedTuple):
    """Who a WHIP leg belongs to: checked before a DELETE ends it."""

    app_id: str
    session_uuid: str
    role: str


class LegSink:
    """Where one WHIP leg's audio goes: its `Leg`. Ends the session too when this offer
    created it and no other leg is left (as the WebSocket ingest does)."""

    def __init__(self, engine: Engine, leg: Leg, created: bool) -> None:
        self.engine = engine
        self.leg = leg
        self.live = leg.live
        self.created = created

    def audio(self, frame: PcmFrame) -> None:
        self.leg.count_packets()
        if not self.live.ending:
            self.leg.push(frame)  # the peer's resource id is the leg's id

    def gap(self, count: int, rate: int, packets: int) -> None:
        self.leg.count_lost(packets)
        if not self.live.ending:
            self.leg.push(PcmFrame(np.zeros(count, dtype=np.int16), rate, None, self.leg.leg_id))

    def dropped(self, reason: str, count: int) -> None:
        self.engine.count_dropped(reason, count)

    async def ended(self, stats: dict[str, Any]) -> None:
        live, leg = self.live, self.leg
        self.engine.catalog.update_leg(leg.leg_id, stats=stats)
        if stats.get("error"):
            log.warning("WHIP leg %s (%s) of session %s failed: %s (connection %s)", leg.leg_id,
                        live.legs.get(leg.leg_id), live.uuid, stats["error"], stats.get("connection"))
            leg.fail(stats["error"])
        if self.engine.sessions.get(live.uuid) is not live:
            return  # the session is over: its legs were ended with it
        leg.end()
        if self.created and all(leg_id in live.ended_legs for leg_id in live.legs):
            await self.engine.end_session(live.uuid)


def refusal(exc: OfferError) -> Refused:
    """What an offer that cannot be answered is: malformed, or not recordable."""
    if exc.malformed:
        return Invalid("whip.invalid_sdp", str(exc))
    return Unacceptable("whip.offer_not_acceptable", str(exc))


async def publish(engine: Engine, service: WhipService, app_id: str, uuid: str, role: str, offer: str) -> tuple[str, str]:
    """A new WebRTC leg `role` of session `uuid` (created for `app_id` when unknown) for the
    SDP `offer`; answers (leg_id, SDP answer)."""
    try:
        Offer.parse(offer)
    except OfferError as exc:
        raise refusal(exc) from None
    live, created = await session_for_ingest(engine, app_id, uuid, "whip")
    leg = engine.open_leg(live, role, "webrtc")
    sink = LegSink(engine, leg, created)
    try:
        answer = await service.open(leg.leg_id, offer, sink, owner=LegOwner(app_id, uuid, role))
    except OfferError as exc:
        log.info("WHIP offer for %s/%s refused: %s", uuid, role, exc)
        raise refusal(exc) from None
    service.end_on(leg.leg_id, live.over)  # the session ending ends the peer connection
    log.info("WHIP leg %s (%s) joined session %s", leg.leg_id, role, uuid)
    return leg.leg_id, answer


async def unpublish(service: WhipService, app_id: str, uuid: str, role: str, leg_id: str) -> None:
    """End WHIP leg `leg_id` of session `uuid` for `app_id`: its peer connection is closed
    and the leg ends."""
    peer = service.get(leg_id)
    if peer is None or (peer.owner.session_uuid, peer.owner.role) != (uuid, role):
        raise NotFound("whip.not_found", f"no WHIP leg {leg_id} in session {uuid} (ended, or never created)")
    if peer.owner.app_id != app_id:
        raise Forbidden("auth.forbidden", "this leg belongs to another app")
    await service.end(leg_id)
