"""The outbox: events are written to the catalog first, then delivered by `WebhookSender`.

Delivery is at-least-once: a 2xx answer marks an event delivered; anything else (an error
status, a timeout, a refused connection) schedules another attempt after an exponential
backoff with jitter, until the event is older than the configured maximum age. The
`event_id` never changes between attempts, so receivers can de-duplicate.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import random
import uuid
from typing import Any, Callable

import aiohttp

from mediaserver.catalog import Catalog, OutboxItem
from mediaserver.config import App
from mediaserver.tasks import cancel_and_wait
from mediaserver.webhooks.signing import SIGNATURE_HEADER, sign

log = logging.getLogger(__name__)

BACKOFF_FIRST_S = 1.0
BACKOFF_CAP_S = 600.0


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def backoff(attempts: int, rng: Callable[[], float] = random.random) -> float:
    """Seconds before attempt `attempts + 1`: doubling from 1 s, capped, ±50% jitter."""
    base = min(BACKOFF_FIRST_S * 2 ** max(attempts - 1, 0), BACKOFF_CAP_S)
    return base * (0.5 + rng())


class Outbox:
    """Writes events into the catalog's outbox and wakes the sender."""

    def __init__(self, catalog: Catalog, apps: dict[str, App], clock) -> None:
        self._catalog = catalog
        self._apps = apps
        self._clock = clock
        self.wakeup = asyncio.Event()

    def emit(self, app_id: str, kind: str, payload: dict[str, Any], url: str | None = None, extra: dict[str, Any] | None = None) -> str | None:
        """Queue an event for the app's webhook URL (or `url`); returns its event_id."""
        app = self._apps.get(app_id)
        target = url or (app.webhook_url if app else None)
        if not target:
            return None
        now = self._clock.time()
        event_id = str(uuid.uuid4())
        envelope = {"event_kind": kind, "event_id": event_id, "occurred_at": iso(now), "app_id": app_id, "payload": payload}
        if extra:
            envelope.update(extra)
        body = json.dumps(envelope, separators=(",", ":")).encode()
        self._catalog.enqueue(event_id, app_id, target, kind, body, now)
        self.wakeup.set()
        return event_id


class WebhookSender:
    """Delivers due outbox events; one task, started and closed by its owner."""

    def __init__(self, catalog: Catalog, apps: dict[str, App], clock, *, timeout_s: float = 10.0,
                 max_age_s: float = 86400.0, wakeup: asyncio.Event | None = None, concurrency: int = 8) -> None:
        self._catalog = catalog
        self._apps = apps
        self._clock = clock
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._max_age = max_age_s
        self._wakeup = wakeup or asyncio.Event()
        self._limit = asyncio.Semaphore(concurrency)
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=self._timeout)
        self._task = asyncio.create_task(self._run(), name="webhook-sender")

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self) -> None:
        while True:
            await self.deliver_due()
            self._wakeup.clear()
            nxt = await self._catalog.next_due_at()
            delay = 60.0 if nxt is None else max(min(nxt - self._clock.time(), 60.0), 0.05)
            try:
                await asyncio.wait_for(self._wakeup.wait(), delay)
            except asyncio.TimeoutError:
                pass

    async def deliver_due(self) -> int:
        """Attempt every event that is due now; returns how many were attempted."""
        items = await self._catalog.due(self._clock.time())
        await asyncio.gather(*(self._attempt(item) for item in items))
        return len(items)

    async def _attempt(self, item: OutboxItem) -> None:
        async with self._limit:
            error = await self._post(item)
        now = self._clock.time()
        if error is None:
            self._catalog.delivered(item.seq, now)
        elif now - item.created_at >= self._max_age:
            log.warning("webhook %s to %s abandoned after %d attempts: %s", item.event_id, item.url, item.attempts + 1, error)
            self._catalog.abandon(item.seq, now, error)
        else:
            self._catalog.retry_later(item.seq, now + backoff(item.attempts + 1), error)

    async def _post(self, item: OutboxItem) -> str | None:
        headers = {"Content-Type": "application/json", "User-Agent": "mediaserver-webhooks"}
        app = self._apps.get(item.app_id)
        if app is not None and app.webhook_secret:
            headers[SIGNATURE_HEADER] = sign(app.webhook_secret, item.body, int(self._clock.time()))
        try:
            async with self._session.post(item.url, data=item.body, headers=headers, allow_redirects=False) as response:
                await response.read()
                if 200 <= response.status < 300:
                    return None
                return f"HTTP {response.status}"
        except asyncio.TimeoutError:
            return "timed out"
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return f"{type(exc).__name__}: {exc}"
