"""The asyncio tasks a component runs in the background, and how they end.

Whoever starts a task names it, keeps it, and on `close()` cancels it and waits for it to
unwind: no task outlives its owner and none is left pending when the loop stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


async def cancel_and_wait(task: asyncio.Task | None) -> None:
    """Cancel `task` (if any) and wait until it has finished unwinding."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class TaskSet:
    """A component's background tasks: each named when spawned, forgotten when done (its
    exception, if any, logged with its name), cancelled and awaited on `close()`."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._tasks: set[asyncio.Task] = set()
        self.closed = False

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task:
        if self.closed:
            coro.close()
            raise RuntimeError(f"{self.owner} is closed: cannot start {name}")
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("%s: task %s failed: %s", self.owner, task.get_name(), exc, exc_info=exc)

    async def wait(self, timeout: float | None = None) -> None:
        """Until every task now running has finished (or `timeout` has passed)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)

    async def close(self) -> None:
        """Cancel every task and wait until all have unwound; idempotent."""
        self.closed = True
        while self._tasks:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._tasks.difference_update(tasks)
