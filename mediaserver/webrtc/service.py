"""The WebRTC ingest service: every WHIP peer connection of this process, and their ends.

A leg's peer is registered under its resource id from the moment it is created, so that
shutting down closes it even halfway through its answer. A peer leaves the registry
exactly once, by whichever comes first: `end()` (the client's DELETE), `end_soon()` (a
synchronous caller such as the end of the session), the peer itself reporting that its
stream or connection is over, the event given to `end_on()` (the end of its session), or
`close()`. The closes started without an awaiting caller run as named tasks that
`close()` waits for; `open_count` counts peer
connections not yet fully closed, which is what a leak check looks at.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Hashable

from mediaserver.errors import Unavailable
from mediaserver.tasks import TaskSet
from mediaserver.webrtc.peer import CONNECT_TIMEOUT_S, AudioSink, IngestPeer

log = logging.getLogger(__name__)


class WhipService:
    """Creates, tracks and ends the peer connections of WHIP legs."""

    def __init__(self, addresses: tuple[str, ...] | None, connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        self.addresses = addresses
        self.connect_timeout_s = connect_timeout_s
        self._peers: dict[str, IngestPeer] = {}
        self._unclosed: set[IngestPeer] = set()
        self._tasks = TaskSet("whip")
        self._watchers: dict[str, asyncio.Task] = {}  # resource id -> the task waiting for its end_on event
        self._closing = False

    async def start(self) -> None:
        """Nothing runs until the first offer; present for the composition root."""

    @property
    def closing(self) -> bool:
        """True once `close()` has begun: no new legs."""
        return self._closing

    @property
    def open_count(self) -> int:
        """Peer connections created and not yet fully closed."""
        return len(self._unclosed)

    def get(self, resource_id: str) -> IngestPeer | None:
        return self._peers.get(resource_id)

    async def open(self, resource_id: str, offer_sdp: str, sink: AudioSink, owner: Hashable) -> str:
        """Answer an offer for a new leg; raises OfferError (and closes the peer) when it cannot,
        Unavailable once `close()` has begun."""
        if self._closing:
            raise Unavailable("whip.unavailable", "the server is shutting down")
        peer = IngestPeer(resource_id, sink, owner, addresses=self.addresses,
                          connect_timeout_s=self.connect_timeout_s, on_done=self._peer_done)
        self._peers[resource_id] = peer
        self._unclosed.add(peer)
        try:
            return await peer.answer(offer_sdp)
        except BaseException:
            await self.end(resource_id)
            raise

    async def end(self, resource_id: str) -> bool:
        """End a leg and wait until its peer connection is closed; False if it was not open."""
        peer = self._peers.pop(resource_id, None)
        if peer is None:
            return False
        await self._close(peer)
        return True

    def end_soon(self, resource_id: str) -> None:
        """End a leg from synchronous code: the close runs as a task `close()` waits for."""
        peer = self._peers.pop(resource_id, None)
        if peer is not None:
            self._tasks.spawn(self._close(peer), f"whip-close-{resource_id}")

    def end_on(self, resource_id: str, over: asyncio.Event) -> None:
        """End the leg once `over` is set, unless it has ended before."""
        if resource_id in self._peers and resource_id not in self._watchers:
            self._watchers[resource_id] = self._tasks.spawn(self._end_on(resource_id, over), f"whip-watch-{resource_id}")

    async def _end_on(self, resource_id: str, over: asyncio.Event) -> None:
        await over.wait()
        self._watchers.pop(resource_id, None)
        await self.end(resource_id)

    def _peer_done(self, peer: IngestPeer) -> None:
        if self._peers.get(peer.id) is peer:
            self.end_soon(peer.id)

    async def _close(self, peer: IngestPeer) -> None:
        try:
            await peer.close()
        except Exception:
            log.exception("closing WHIP peer %s failed", peer.id)
        finally:
            self._unclosed.discard(peer)
            watcher = self._watchers.pop(peer.id, None)
            if watcher is not None and watcher is not asyncio.current_task():
                watcher.cancel()

    async def close(self) -> None:
        """End every leg and wait for every close; safe to call again."""
        self._closing = True
        peers = list(self._peers)
        await asyncio.gather(*(self.end(resource_id) for resource_id in peers))
        for watcher in list(self._watchers.values()):
            watcher.cancel()
        await self._tasks.wait()
        await self._tasks.close()
