"""Admission: a new call is taken only while the server can still record every call exactly.

Past its capacity a recorder must refuse what it cannot hold rather than record everything
badly. Two things close admission:

* `max_calls` live sessions (0: no fixed limit). This is the capacity measured for the
  machine (README's rtp_load row), set by whoever deploys it;
* the processing falling behind: during the last interval, more than 1 % of the
  processing ticks (of this process and of every worker) started more than
  `overload_lateness_ms` late. Admission stays closed for `overload_hold_s` after the last
  such interval, so that a server at its limit does not take a call, fall behind, refuse,
  recover and take the next in a loop.

A refused call is an `Unavailable` with a stable code (`server.full`, `server.overloaded`)
and a `retry_after_s`: the API answers 503 with Retry-After, SIP answers an INVITE 503 with
Retry-After (a proxy such as Kamailio then tries another node). The calls already recording
go on untouched. Only new sessions are refused; a leg joining a call already taken is part
of that call.
"""

from __future__ import annotations

import math
from typing import Any

from mediaserver.config import AdmissionSettings
from mediaserver.errors import Unavailable
from mediaserver.recorder.processor import LatenessHistogram

LATE_SHARE = 0.01  # more than this share of an interval's ticks late: overloaded


class Admission:
    """Whether a new call may start, from the live calls and the processing's lateness."""

    def __init__(self, settings: AdmissionSettings, clock) -> None:
        self.settings = settings
        self.clock = clock
        self.refused: dict[str, int] = {}  # by code
        self._seen: list[int] | None = None  # the lateness buckets at the last observation
        self._overloaded_until = -math.inf
        self.late_share = 0.0  # of the last interval's ticks

    def observe(self, lateness: LatenessHistogram) -> None:
        """The processing's cumulative tick lateness, read once per interval."""
        buckets = list(lateness.buckets)
        seen, self._seen = self._seen, buckets
        if seen is None or len(seen) != len(buckets):
            return
        delta = [max(now - before, 0) for now, before in zip(buckets, seen)]
        total = sum(delta)
        if not total:
            return
        # Ticks in buckets wholly above the limit (a limit between two edges counts from the next).
        limit = self.settings.overload_lateness_ms / 1000
        lowers = (0.0,) + LatenessHistogram.BOUNDS
        late = sum(count for lower, count in zip(lowers, delta) if lower >= limit)
        self.late_share = late / total
        if self.late_share > LATE_SHARE:
            self._overloaded_until = self.clock.monotonic() + self.settings.overload_hold_s

    @property
    def overloaded(self) -> bool:
        return self.clock.monotonic() < self._overloaded_until

    def closed_by(self, calls: int) -> str | None:
        """Why a new call would be refused now ("full", "overloaded"), or None; `calls`: the live ones."""
        if self.settings.max_calls and calls >= self.settings.max_calls:
            return "full"
        return "overloaded" if self.overloaded else None

    def check(self, calls: int) -> None:
        """Raise `Unavailable` when a new call must be refused."""
        reason = self.closed_by(calls)
        if reason == "full":
            self._refuse("server.full", f"the server holds its maximum of {self.settings.max_calls} calls", 5)
        elif reason == "overloaded":
            remaining = max(1, math.ceil(self._overloaded_until - self.clock.monotonic()))
            self._refuse("server.overloaded", "the server's processing is behind; it takes no new call for now", remaining)

    def _refuse(self, code: str, message: str, retry_after_s: int) -> None:
        self.refused[code] = self.refused.get(code, 0) + 1
        raise Unavailable(code, message, retry_after_s=retry_after_s)

    def state(self, calls: int) -> dict[str, Any]:
        """What `/healthz` shows: "open", "full" or "overloaded", with what it is judged on."""
        return {"state": self.closed_by(calls) or "open", "calls": calls, "max_calls": self.settings.max_calls or None,
                "late_tick_share": round(self.late_share, 4)}
