"""The handle through which the layer that owns a call talks to one leg of a live session.

A WHIP peer, a WebSocket stream or a SIP dialog gets a `Leg` from `Engine.open_leg` and
does everything through it: push the leg's audio as `PcmFrame`s, signal a digit, count
what it received, say why the leg failed, end it, and watch how far the leg runs ahead
of the mix. Nothing outside the recorder reaches into a session's inputs.

An RTP leg's packets do not pass here: they go from the socket straight into the
session's inbox (`Engine.open_rtp`); its `Leg` ends it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mediaserver.media import PcmFrame

if TYPE_CHECKING:
    from mediaserver.recorder.engine import Engine, LiveSession
    from mediaserver.recorder.session import LegInput

class Leg:
    """One leg of a live session: `push` its audio, `end` it."""

    __slots__ = ("_engine", "live", "leg_id", "role")

    def __init__(self, engine: Engine, live: LiveSession, leg_id: str, role: str) -> None:
        self._engine = engine
        self.live = live
        self.leg_id = leg_id
        self.role = role

    def push(self, frame: PcmFrame, at_mono: float | None = None) -> None:
        """Audio of this leg that arrived at `at_mono` (now by default). The channels of one
        stereo frame pass the same arrival, so legs that begin together are placed together;
        a frame without a `pts` follows the leg's previous audio (its first where it arrived)."""
        if frame.leg != self.leg_id:
            raise ValueError(f"a frame of leg {frame.leg!r} pushed to leg {self.leg_id}")
        self._engine.post_pcm(self.live, frame, at_mono)

    def dtmf_now(self, digit: str, source: str) -> None:
        """A digit signalled without a time: placed where the leg's audio has got to."""
        self.live.session.dtmf_now(self.leg_id, digit, source)

    def count_packets(self, n: int = 1) -> None:
        """`n` more messages carrying audio received (the leg's `packets` in its stats)."""
        self._engine.count_packets(self.live, self.leg_id, n)

    def count_lost(self, packets: int) -> None:
        """About `packets` packets of the leg's audio never arrived (its `lost`)."""
        self.counters.lost += packets

    def fail(self, reason: str) -> None:
        """The leg never carried media, for `reason`: shown as its `error` in the stats."""
        self._engine.fail_leg(self.live, self.leg_id, reason)

    def end(self) -> None:
        """The leg is over; idempotent."""
        self._engine.end_leg(self.live, self.leg_id)

    @property
    def backlog_s(self) -> float:
        """Seconds of this leg's audio received but not yet mixed (what backpressure watches)."""
        return self._engine.backlog_seconds(self.live, self.leg_id)

    @property
    def counters(self) -> LegInput:
        """The leg's counters as its stats show them (packets, lost, error)."""
        return self.live.session.inputs[self.leg_id]
