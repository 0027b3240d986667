"""One WHIP leg: a receive-only aiortc peer connection whose audio goes to a sink.

The offer is checked (`Offer.parse`) before a peer connection exists. The answer is
made after ICE gathering has finished (RFC 9725: the server does not trickle), on the
configured addresses only and without STUN servers. Video and any other section the
client offers are answered inactive, so nothing but the one audio track is received.

A `_receive` task, started by `answer()` and owned by the peer, reads decoded frames and
hands them to the sink as mono int16 with gaps filled (`FrameClock`). The leg ends when
the client's stream ends, when the connection fails or closes, or when no audio has
arrived within `connect_timeout_s`; the peer then calls `on_done(peer)` and whoever owns
it calls `close()`, which closes the peer connection, stops the task and tells the sink.

The answer takes the passive DTLS role when the offer leaves the choice (see `dtls`),
and the packets still in aiortc's jitter buffer when the stream ends are decoded, so a
leg's audio ends with the last packet received. A leg that never became a working
stream says why in `error`: "ice_failed" or "dtls_failed" (the connection failed at that
step, or had not got past it within `connect_timeout_s`) or "no_media" (connected, but
not a single audio frame came).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Hashable, Protocol

import av
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpReceiver, RTCSessionDescription
from aiortc.exceptions import InvalidStateError
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from mediaserver.errors import CodecError, Unavailable
from mediaserver.media import SUPPORTED_RATES, PcmFrame
from mediaserver.webrtc import dtls, ice
from mediaserver.webrtc.audio import FrameClock, mono_s16
from mediaserver.webrtc.offer import ACCEPTED_CODECS, Offer, OfferError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 2.0  # how long close() waits for the last decoded frames
ICE_FAILED, DTLS_FAILED, NO_MEDIA = "ice_failed", "dtls_failed", "no_media"


class AudioSink(Protocol):
    """Where a leg's audio goes; called on the event loop."""

    def audio(self, frame: PcmFrame) -> None:
        """One received frame of the leg (`frame.leg` is the peer's resource id): mono int16
        that follows what came before (`pts` None)."""

    def gap(self, count: int, rate: int, packets: int) -> None:
        """`count` samples lost (about `packets` packets) before the next frame: silence."""

    def dropped(self, reason: str, count: int) -> None:
        """Input that could not be used, counted by reason."""

    async def ended(self, stats: dict[str, Any]) -> None:
        """The leg is over (`stats`: what the peer received); awaited once, by `close()`."""


class IngestPeer:
    """A receive-only peer connection for one WHIP resource."""

    def __init__(self, resource_id: str, sink: AudioSink, owner: Hashable, *, addresses: tuple[str, ...] | None,
                 connect_timeout_s: float, on_done: Callable[[IngestPeer], None]) -> None:
        self.id = resource_id
        self.owner = owner  # opaque to this layer: who may end the leg
        self.frames = 0
        self.lost = 0  # packets, estimated from the samples missing
        self.dropped = 0  # frames received but unusable
        self.error: str | None = None  # why the leg never became a working stream
        self.clock = FrameClock()
        self._sink = sink
        self._addresses = addresses
        self._connect_timeout_s = connect_timeout_s
        self._on_done = on_done
        # No STUN servers: the server's own address is the one to offer, and the default
        # (a public STUN server) would stall gathering on a machine without internet.
        self._pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        dtls.accept_rsa_peers(self._pc)
        self._pc.on("connectionstatechange", self._connection_state_changed)
        self._task: asyncio.Task | None = None
        self._transport = None  # the audio's DTLS transport, once the offer is applied
        self._closed: asyncio.Event | None = None

    @property
    def connection_state(self) -> str:
        """The peer connection's state: new, connecting, connected, failed or closed."""
        return self._pc.connectionState

    @property
    def closed(self) -> bool:
        return self._closed is not None and self._closed.is_set()

    async def answer(self, offer_sdp: str) -> str:
        """The SDP answer to `offer_sdp`, with every local candidate; raises OfferError."""
        offer = Offer.parse(offer_sdp)
        transceiver = self._pc.addTransceiver("audio", direction="recvonly")
        transceiver.setCodecPreferences(_accepted_capabilities())
        dtls.drain_on_stop(transceiver.receiver)
        await self._apply_offer(offer_sdp)
        self._transport = transceiver.receiver.transport
        for other in self._pc.getTransceivers():
            dtls.answer_passive(other.receiver, offer.audio.attributes.get("setup"))
            if other is not transceiver:
                other.direction = "inactive"
        try:
            answer = await self._pc.createAnswer()
            with ice.gather_on(self._addresses):
                await self._pc.setLocalDescription(answer)
        except InvalidStateError:
            if self._closed is None:
                raise
        # Closed meanwhile (the server is shutting down): no task may outlive close().
        if self._closed is not None:
            raise _ended_while_answering()
        self._task = asyncio.create_task(self._receive(transceiver.receiver.track), name=f"whip-receive-{self.id}")
        return self._pc.localDescription.sdp

    async def _apply_offer(self, offer_sdp: str) -> None:
        try:
            await self._pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        except Exception as exc:
            if self._closed is not None:
                raise _ended_while_answering() from exc
            # aiortc's SDP parser signals bad input with whatever its conversions raise
            # (ValueError, KeyError, AssertionError, ...); Offer.parse has already
            # refused what it knows, so anything left is still the client's offer.
            raise OfferError(f"the SDP offer could not be applied: {exc or type(exc).__name__}") from exc

    async def _receive(self, track: MediaStreamTrack) -> None:
        try:
            # Nothing within the timeout: ICE or DTLS never came up, or the client sends nothing.
            frame = await asyncio.wait_for(track.recv(), self._connect_timeout_s)
            while True:
                self._deliver(frame)
                frame = await track.recv()
        except MediaStreamError:
            log.debug("WHIP %s: the audio track ended", self.id)
            if self.frames == 0:
                self._fail(NO_MEDIA)
        except TimeoutError:
            self._fail(self._stalled_step())
            log.info("WHIP %s: no audio within %.0f s; ending the leg", self.id, self._connect_timeout_s)
        except Exception:
            log.exception("WHIP %s: receiving audio failed", self.id)
        finally:
            self._on_done(self)

    def _deliver(self, frame: av.AudioFrame) -> None:
        gap = self.clock.gap(frame)
        try:
            samples = mono_s16(frame)
        except CodecError:
            self._drop("webrtc_frame_format")
            return
        if frame.sample_rate not in SUPPORTED_RATES:
            self._drop("webrtc_sample_rate")
            return
        if gap:
            packets = max(round(gap / len(samples)), 1) if len(samples) else 1
            self.lost += packets
            self._sink.gap(gap, frame.sample_rate, packets)
        self._sink.audio(PcmFrame(samples, frame.sample_rate, None, self.id))
        self.frames += 1

    def stats(self) -> dict[str, Any]:
        """What this leg received, as kept with the leg when it ends."""
        rate = self.clock.rate or 1
        return {"frames": self.frames, "lost": self.lost, "inserted_silence_ms": round(self.clock.filled * 1000 / rate, 1),
                "dropped": self.dropped, "connection": self._pc.connectionState, "error": self.error}

    def _drop(self, reason: str) -> None:
        self.dropped += 1
        self._sink.dropped(reason, 1)

    def _fail(self, reason: str) -> None:
        if self.error is None:  # the first cause stands: a failed DTLS also ends with no media
            self.error = reason

    def _connection_state_changed(self) -> None:
        if self._pc.connectionState == "failed":
            self._fail(self._failed_step())
        if self._pc.connectionState in ("failed", "closed"):
            self._on_done(self)

    def _stalled_step(self) -> str:
        """Why nothing came within the timeout: the step the connection never got past."""
        if self._transport is None or self._transport.transport.state not in ("connected", "completed"):
            return ICE_FAILED
        if self._transport.state != "connected":
            return DTLS_FAILED
        return NO_MEDIA

    def _failed_step(self) -> str:
        # aiortc starts DTLS only once ICE has connected; an ICE failure leaves it "new".
        if self._transport is not None and self._transport.transport.state == "failed":
            return ICE_FAILED
        if self._transport is not None and self._transport.state == "failed":
            return DTLS_FAILED
        return ICE_FAILED

    async def close(self) -> None:
        """Close the peer connection, stop receiving and end the leg; safe to call again."""
        if self._closed is not None:
            await self._closed.wait()
            return
        self._closed = asyncio.Event()
        state = self._pc.connectionState
        started = self.frames > 0 or state == "connected"
        try:
            await self._pc.close()
        finally:
            try:
                await self._stop_receiving(started)
                await self._sink.ended({**self.stats(), "connection": state})
            finally:
                self._closed.set()

    async def _stop_receiving(self, started: bool) -> None:
        # Closing a connected peer stops the decoder after the buffered packets, whose
        # frames, then the end of the track, reach the task a moment later: it reads them
        # before it is cancelled. It catches everything but cancellation, so waiting raises
        # nothing. A peer that never connected has no decoder to end its track.
        if self._task is not None:
            if started:
                await asyncio.wait([self._task], timeout=DRAIN_TIMEOUT_S)
            self._task.cancel()
            await asyncio.wait([self._task])


def _ended_while_answering() -> Unavailable:
    return Unavailable("whip.unavailable", "the leg was ended while its offer was being answered")


def _accepted_capabilities():
    """aiortc's audio codecs that a WHIP leg accepts, in aiortc's order."""
    codecs = RTCRtpReceiver.getCapabilities("audio").codecs
    return [c for c in codecs if f"{c.mimeType.split('/')[1].lower()}/{c.clockRate}" in ACCEPTED_CODECS]
