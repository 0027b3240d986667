"""This node among the others of a cluster: heartbeats, and taking over a node that died.

Every node writes a heartbeat to the shared catalog's node registry. A node whose heartbeat
is older than `node_timeout_s` is taken for dead: the first survivor to notice moves the
dead node's active sessions to itself in one catalog update (so exactly one survivor takes
each), ends them, and settles each of their unfinished recordings from the checkpoints the
dead node left in S3 (`Archive.settle_lost`). A node that comes back finds those sessions
no longer its own and leaves them alone; one that was only cut off from the catalog finds
out before it stores anything (`Archive._still_ours`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from mediaserver.config import NodeSettings

if TYPE_CHECKING:
    from mediaserver.recorder.engine import Engine

log = logging.getLogger(__name__)

# Recording states that a dead node may have left unfinished.
UNFINISHED = ("initiated", "recording", "paused", "stopped", "processing")


class Membership:
    """Heartbeats of this node, and the watch over the others."""

    def __init__(self, settings: NodeSettings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.every_s = max(min(settings.timeout_s / 4, 2.0), 0.2)
        self.settled = 0  # recordings of lost nodes this node has settled
        self._beat_at = engine.clock.monotonic()  # when a heartbeat last reached the catalog

    @property
    def isolated(self) -> bool:
        """True while this node's heartbeats do not reach the catalog: past `timeout_s` the
        others take it for dead and take its calls over, so it must not take new ones."""
        return self.engine.clock.monotonic() - self._beat_at > self.settings.timeout_s / 2

    async def beat(self) -> None:
        self.engine.catalog.heartbeat(self.settings.node_id, self.settings.node_url, self.engine.clock.time())
        await self.engine.catalog.flush(timeout=self.settings.timeout_s)
        self._beat_at = self.engine.clock.monotonic()

    async def run(self) -> None:
        """Beat and watch every `every_s`, until cancelled; a catalog that is away for a
        while is waited out."""
        while True:
            try:
                await self.beat()
                await self.take_over_dead()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the catalog away: the next round tries again
                log.warning("cluster heartbeat: %s", exc)
            await asyncio.sleep(self.every_s)

    async def take_over_dead(self) -> int:
        """Take the sessions of every node silent for longer than `timeout_s`; answers how
        many recordings this node set out to settle."""
        now = self.engine.clock.time()
        taken = 0
        for node in await self.engine.catalog.nodes():
            if node["node_id"] == self.settings.node_id or now - node["heartbeat_at"] < self.settings.timeout_s:
                continue
            sessions = await self.engine.catalog.claim_sessions(node["node_id"], self.settings.node_id)
            if sessions:
                log.warning("node %s silent for %.0f s: taking over its %d sessions", node["node_id"],
                            now - node["heartbeat_at"], len(sessions))
            for row in sessions:
                taken += await self._take_session(row)
        self.settled += taken
        return taken

    async def _take_session(self, row: dict) -> int:
        catalog, announcer = self.engine.catalog, self.engine.announcer
        uuid = row["uuid"]
        rows, _ = await catalog.recordings(row["app_id"], session_uuid=uuid, limit=500)
        unfinished = [r for r in rows if r["state"] in UNFINISHED]
        for rec in unfinished:
            self.engine.archive.settle_lost(rec)
        now = self.engine.clock.time()
        for leg in await catalog.legs(uuid):
            if leg["ended_at"] is None:
                catalog.update_leg(leg["leg_id"], ended_at=now)
        catalog.update_session(uuid, state="ended", ended_at=now)
        announcer.session_ended(row["app_id"], uuid)
        return len(unfinished)

    async def owner_url(self, uuid: str) -> str | None:
        """The API of the node that holds live session `uuid`, when that is another node."""
        row = await self.engine.catalog.session(uuid)
        if row is None or row["state"] != "active" or row.get("node_id") in (None, self.settings.node_id):
            return None
        node = await self.engine.catalog.node(row["node_id"])
        return None if node is None else node["node_url"]
