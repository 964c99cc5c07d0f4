"""`stepcredit serve`'s HTTP server: uvicorn, with a bounded drain on SIGTERM, a
request-head timeout and size bound, and a cap on open connections.

Plain uvicorn, on SIGTERM, closes its listening socket (new clients get "connection
refused"), waits for requests in flight without a bound, and re-raises the signal
(the exit status is the signal). Here, on SIGTERM or SIGINT:

1. the app's Drain begins (drain.py): /ready answers 503 `draining`, new scoring and
   reload requests 503 `draining` with Retry-After, and the socket keeps accepting;
2. accepted work runs until `drain_timeout_s`; at the deadline each request still
   running answers at once with per-item `shutting_down` errors;
3. once no work is left uvicorn shuts down (open connections get
   `CONNECTIONS_GRACE_S`, the scorer `app.CLOSE_BOUND_S`), and `run` returns 0. A
   backend call in a worker thread cannot be interrupted and Python would wait for it
   at exit: when the scorer could not close in its bound, the process ends at once
   (`os._exit`) with the same status.

A second signal during the drain cuts it short (step 2's deadline becomes now: the
answers are the same `shutting_down` errors, and the exit status is still 0); one more
after that skips the waits of step 3. A fatal error (`stop_now`: the model cannot load,
the backend died) stops at once without a drain, and the caller exits 1, so that the
orchestrator counts a crash and restarts the process.

Uvicorn has no timeout for a request head (only for idle keep-alive connections):
`_HeadGuard` closes a connection whose head has not fully arrived within
`header_timeout_s` of its first byte (or of the connection's opening), or that passes
`MAX_HEAD_BYTES`. It wraps whichever of uvicorn's HTTP/1.1 protocols is installed
(httptools, else h11); both are tested.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from ..config import Settings
from .drain import Drain

__all__ = ["Server", "build_config", "run", "MAX_HEAD_BYTES"]

log = logging.getLogger(__name__)

CONNECTIONS_GRACE_S = 2
"""After the drain: how long open connections get to finish writing before uvicorn
cancels what still runs."""

MAX_HEAD_BYTES = 64 * 1024
"""Largest request head (request line and headers). h11 refuses heads over 16 KiB by
itself; httptools keeps reading, so without this bound one URL could fill memory."""


PROBE_PATHS = frozenset({"/health", "/ready"})
"""Never refused for load: a liveness probe answered 503 because slow clients held every
connection would get the pod restarted, and its accepted work lost."""


class _HeadGuard:
    """Mixin over a uvicorn HTTP protocol: bounds the time and size of each request head,
    and exempts the orchestrator's probes from the connection cap."""

    head_timeout_s: float
    on_head_rejected: Callable[[str], None]

    # uvicorn reads `limit_concurrency` once per request, right after it has built the
    # request's scope (httptools: on_headers_complete; h11: handle_events), to answer 503
    # past the cap; a probe reads None (no cap).
    @property
    def limit_concurrency(self) -> int | None:
        scope = getattr(self, "scope", None)
        if scope is not None and scope.get("path") in PROBE_PATHS:
            return None
        return self._limit_concurrency

    @limit_concurrency.setter
    def limit_concurrency(self, value: int | None) -> None:
        self._limit_concurrency = value

    def connection_made(self, transport) -> None:
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        super().connection_made(transport)
        self._arm_head_timer()  # a connection that never sends a byte is timed too

    def data_received(self, data: bytes) -> None:
        idle = self.cycle is None or self.cycle.response_complete  # waiting for a new head
        before = self.cycle
        super().data_received(data)
        if self.cycle is not before:  # a head arrived whole
            self._disarm_head_timer()
            self._head_bytes = 0
        elif idle and not self.transport.is_closing():
            if self._head_timer is None:
                self._arm_head_timer()
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._reject_head("too_large")

    def connection_lost(self, exc) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        if not self.transport.is_closing():
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._reject_head, "timeout")

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _reject_head(self, reason: str) -> None:
        # Closed without an answer: there is no request yet to answer.
        self._disarm_head_timer()
        if not self.transport.is_closing():
            self.on_head_rejected(reason)
            self.transport.close()


def head_guarded(base: type, timeout_s: float, on_rejected: Callable[[str], None]) -> type:
    """`base` (a uvicorn HTTP protocol class) with the request-head bounds."""
    attrs = {"head_timeout_s": timeout_s, "on_head_rejected": staticmethod(on_rejected)}
    return type(f"HeadGuarded{base.__name__}", (_HeadGuard, base), attrs)


class Server(uvicorn.Server):
    """uvicorn.Server whose SIGTERM/SIGINT start `drain` instead of stopping at once."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain
        self._logged: set[str] = set()

    def handle_exit(self, sig, frame) -> None:
        # Runs as a signal handler: flags only (drain.begin assigns two fields); the
        # event loop acts on them in on_tick. Never re-raised: a drained exit is status 0.
        if self.should_exit:
            self.force_exit = True  # already shutting down: stop waiting
        else:
            self.drain.begin()

    def stop_now(self) -> None:
        """Stop without a drain (a fatal error: the backend is dead)."""
        self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        done = self.drain.tick()
        self._log_drain()
        if done:
            self.should_exit = True  # a further signal now skips the shutdown waits
        return done

    def _log_drain(self) -> None:
        drain = self.drain
        if drain.draining and "begin" not in self._logged:
            self._logged.add("begin")
            log.info("draining: %d requests in flight, deadline in %g s", drain.inflight, drain.timeout_s)
        if drain.expired and "expired" not in self._logged:
            self._logged.add("expired")
            log.warning("drain deadline: %d requests still running answer with shutting_down", drain.inflight)


def build_config(app: FastAPI, settings: Settings, http: type = AutoHTTPProtocol) -> uvicorn.Config:
    """uvicorn's Config for `app` with our protocol bounds and connection cap."""
    rejections = app.state.metrics.head_rejections
    protocol = head_guarded(http, settings.header_timeout_s, lambda reason: rejections.labels(reason).inc())
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        http=protocol,
        ws="none",
        limit_concurrency=settings.max_connections,  # past it uvicorn answers 503 itself
        timeout_graceful_shutdown=CONNECTIONS_GRACE_S,
        lifespan="on",
    )


def run(server: Server, finish: Callable[[], int]) -> int:
    """Run `server` until it stops; returns `finish()`, the exit status."""
    app = server.config.app

    async def main() -> None:
        await server.serve()
        if not app.state.closed:
            # A backend call (or a model load) still runs in a worker thread: Python would
            # wait for it at exit, past any grace period. Nothing is left to save.
            code = finish()
            log.warning("exiting with work still running in a worker thread")
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    with asyncio.Runner(loop_factory=server.config.get_loop_factory()) as runner:
        runner.run(main())
    return finish()
