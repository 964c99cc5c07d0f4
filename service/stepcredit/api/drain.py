"""What SIGTERM starts: a bounded drain, shared by the server, the guard and the routes.

1. `begin()` (the signal handler): `/ready` turns 503 at once and new work (scoring,
   reload) is refused with 503 `draining`; the listening socket keeps accepting.
2. Work accepted before that runs on until `timeout_s` has passed.
3. At the deadline `expired` is set: each request still running stops and answers
   with per-item `shutting_down` errors (never a reward).
4. The server stops once no work is left (`done`).

A second signal cuts the drain short: the deadline becomes now (step 3 at once).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["Drain", "DrainExpired"]

RETRY_AFTER_S = 2
"""Retry-After of a `draining` 503: the orchestrator routes the retry to another replica
(a deleted pod leaves the Service's endpoints at once), so a short wait is enough."""

ANSWER_GRACE_S = 1.0
"""After the deadline, how long requests get to write their `shutting_down` answers."""


class DrainExpired(Exception):
    """The drain deadline passed while this request's work was running."""


class Drain:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.draining = False
        self.deadline: float | None = None
        self.inflight = 0
        """Work requests (scoring, reload) accepted and not yet answered."""
        self._expired = asyncio.Event()

    def begin(self) -> None:
        """Start draining, or cut a drain in progress short. Safe in a signal handler:
        plain assignments only; the event loop acts on them in `tick`."""
        now = time.monotonic()
        if self.draining:
            self.deadline = min(self.deadline or now, now)
        else:
            self.deadline = now + self.timeout_s
            self.draining = True

    @property
    def expired(self) -> bool:
        return self._expired.is_set()

    def tick(self) -> bool:
        """On the event loop, a few times a second: expire at the deadline; True once
        the server may stop (no work left, or the deadline plus the answer grace passed)."""
        if not self.draining:
            return False
        now = time.monotonic()
        if now >= self.deadline and not self.expired:
            self._expired.set()
        return self.inflight == 0 or now >= self.deadline + ANSWER_GRACE_S

    @contextmanager
    def work(self) -> Iterator[None]:
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1

    async def wait_expired(self) -> None:
        await self._expired.wait()
