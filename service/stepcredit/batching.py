"""Cross-request dynamic batching in front of any backend.

Concurrent `/v1/score` calls each submit their trajectories; a single loop
coalesces what is queued into one backend call, which leaves when the batch
reaches its token budget or when the oldest waiting job has waited `max_wait_s`.

Admission (`admit`, called once a request is prepared, so its real size is known):
the queue is bounded in trajectories (`max_queued`), in estimated tokens
(`max_queued_tokens`) and in time: the predicted wait for a request's scores (the
backlog ahead of it and its own work, at the drain rate measured on the last backend
calls) may not pass `max_wait_for_scores_s`, since a client that times out turns
the work done for it into waste (measured: at twice the capacity, open-loop clients
with a 15 s timeout timed out on 40-75% of requests, and goodput fell to 0.3-0.6 of
the single-client peak, while nothing was refused). A request that does not fit
raises `Overloaded` (HTTP 429) with a Retry-After: the time until enough of the
backlog has drained for it to fit. Into an empty queue a request of any size is
admitted (it could never be admitted otherwise), unless the calls running now alone
would make it wait past the limit.

A job cancelled while queued (its client went away) is dropped before it costs any
model time; one cancelled inside a running call is marked abandoned, and a backend
that `drops_abandoned` skips what it has not computed for it yet.

A job (one request's trajectories) always goes whole into one backend call, and
each call reports the model that ran it. A reload swaps `backend` only inside
`drained()`, while no call runs, so every job is scored by one model.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from .backends.base import Abandoned, Backend, BackendDeadError, BatchLogliks
from .probes import TrajectoryProbes

__all__ = ["Batcher", "Overloaded", "estimate_tokens"]

log = logging.getLogger(__name__)


class Overloaded(RuntimeError):
    """The queue is full; retry after `retry_after_s`."""

    def __init__(self, retry_after_s: float, reason: str = "the scoring queue is full") -> None:
        super().__init__(f"{reason}; retry after {math.ceil(retry_after_s)} s")
        self.retry_after_s = retry_after_s


def estimate_tokens(traj: TrajectoryProbes) -> int:
    """About what the packed strategy forwards: the trunk plus each probe's branch."""
    per_probe = 8 + sum(len(r) for r in traj.references)
    return len(traj.trunk) + len(traj.contexts) * per_probe


@dataclass(eq=False)  # identity: `job in queue` must not compare token lists
class _Job:
    probes: list[TrajectoryProbes]
    tokens: int
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    abandoned: Abandoned | None = None
    """Set when the job is taken into a backend call, with its first index there."""
    offset: int = 0


class Batcher:
    def __init__(
        self,
        backend: Backend,
        *,
        max_batch_tokens: int = 16384,
        max_wait_s: float = 0.005,
        max_queued: int = 4096,
        max_queued_tokens: int = 1 << 30,
        max_wait_for_scores_s: float = float("inf"),
        max_inflight: int = 1,
    ) -> None:
        self.backend = backend
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.max_queued = max_queued
        self.max_queued_tokens = max_queued_tokens
        self.max_wait_for_scores_s = max_wait_for_scores_s
        self._queue: deque[_Job] = deque()
        self._queued = 0  # trajectories in the queue
        self._queued_tokens = 0  # their estimated tokens
        self._running_tokens = 0  # estimated tokens of the calls in flight
        self._wakeup = asyncio.Event()
        self.max_inflight = max_inflight
        self._slots = asyncio.Semaphore(max_inflight)
        self._open = asyncio.Event()  # cleared while drained: no batch starts
        self._open.set()
        self._loop_task: asyncio.Task | None = None
        self._inflight: set[asyncio.Task] = set()
        # Estimated tokens the backend drains per second, measured on every call
        # (an exponential average): the basis of Retry-After.
        self._drain_rate: float | None = None
        self._recent: deque[tuple[int, float]] = deque(maxlen=16)  # (tokens, seconds) of the last calls
        self._last_done = 0.0
        self.batches = 0

    @property
    def queued(self) -> int:
        """Trajectories waiting for the backend."""
        return self._queued

    @property
    def queued_tokens(self) -> int:
        """Estimated tokens waiting for the backend."""
        return self._queued_tokens

    @property
    def drain_rate(self) -> float | None:
        """Estimated tokens per second the backend has been draining (None: not measured yet)."""
        return self._drain_rate

    def admit(self, trajectories: int, tokens: int = 0) -> None:
        """Raise Overloaded unless `trajectories` more (of `tokens` estimated tokens) fit
        in the queue now. Nothing is reserved: call `submit` before the next await."""
        rate = self._drain_rate
        if not self._queued:
            # Nothing waits: whatever its size, it goes next, unless the calls running now
            # alone would keep it waiting past the limit.
            ahead = self._running_tokens / rate if rate else 0.0
            if ahead > self.max_wait_for_scores_s:
                raise Overloaded(
                    max(1.0, ahead - self.max_wait_for_scores_s),
                    f"the calls running now take about {ahead:.0f} s more ({rate:.0f} tokens/s), "
                    f"limit {self.max_wait_for_scores_s:g} s",
                )
            return
        if self._queued + trajectories > self.max_queued:
            per_trajectory = self._queued_tokens / max(1, self._queued)
            excess = (self._queued + trajectories - self.max_queued) * per_trajectory
            raise Overloaded(self._wait_s(excess), f"{self._queued} trajectories are queued, limit {self.max_queued}")
        if self._queued_tokens + tokens > self.max_queued_tokens:
            excess = min(self._queued_tokens + tokens - self.max_queued_tokens, self._queued_tokens)
            raise Overloaded(
                self._wait_s(excess),
                f"{self._queued_tokens} estimated tokens are queued and this request adds {tokens}, "
                f"limit {self.max_queued_tokens}",
            )
        if rate:
            predicted = (self._running_tokens + self._queued_tokens + tokens) / rate
            if predicted > self.max_wait_for_scores_s:
                raise Overloaded(
                    max(1.0, predicted - self.max_wait_for_scores_s),
                    f"its scores would take about {predicted:.0f} s (the backlog at "
                    f"{rate:.0f} tokens/s), limit {self.max_wait_for_scores_s:g} s",
                )

    def check_capacity(self, trajectories: int = 1) -> None:
        """The cheap check before a request is prepared (its tokens are not known yet):
        refused at once when the queue is full already, so that a flood of requests costs
        no preparation (which shares the CPU with the model) beyond this check."""
        self.admit(trajectories)

    def _wait_s(self, excess_tokens: float) -> float:
        """Seconds until `excess_tokens` of the queue have drained: the calls in flight
        finish first, then the queue drains at the measured rate."""
        rate = self._drain_rate or 1000.0
        return max(1.0, (self._running_tokens + excess_tokens) / rate)

    async def submit(self, probes: Sequence[TrajectoryProbes]) -> BatchLogliks:
        """ℓ for `probes`, computed in a batch with whatever else is waiting."""
        if not probes:
            return BatchLogliks(results=[])
        tokens = sum(estimate_tokens(p) for p in probes)
        self.admit(len(probes), tokens)
        self._ensure_running()
        job = _Job(list(probes), tokens, asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self._queued += len(job.probes)
        self._queued_tokens += job.tokens
        self._wakeup.set()
        try:
            return await job.future
        except asyncio.CancelledError:
            if job in self._queue:  # not taken yet: it costs nothing
                self._queue.remove(job)
                self._queued -= len(job.probes)
                self._queued_tokens -= job.tokens
            elif job.abandoned is not None:  # inside a running call: skip what is left of it
                job.abandoned.add(range(job.offset, job.offset + len(job.probes)))
            raise

    @asynccontextmanager
    async def drained(self) -> AsyncIterator[None]:
        """While inside, no backend call runs: the calls in flight have finished and
        queued jobs wait (they are not failed). `backend` may be swapped here."""
        self._open.clear()
        held = 0
        try:
            for _ in range(self.max_inflight):
                await self._slots.acquire()
                held += 1
            yield
        finally:
            for _ in range(held):
                self._slots.release()
            self._open.set()
            self._wakeup.set()

    def _ensure_running(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="stepcredit-batcher")

    async def close(self) -> None:
        for task in [self._loop_task, *self._inflight]:
            if task is not None:
                task.cancel()
        for job in self._queue:
            if not job.future.done():
                job.future.set_exception(BackendDeadError("the scorer is shutting down"))
        self._queue.clear()
        self._queued = self._queued_tokens = 0

    async def _run(self) -> None:
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            # Wait for company until the oldest job's deadline or a full batch.
            deadline = self._queue[0].enqueued + self.max_wait_s
            while sum(j.tokens for j in self._queue) < self.max_batch_tokens:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            await self._open.wait()
            await self._slots.acquire()
            if not self._open.is_set():  # drained while this loop waited for the slot
                self._slots.release()
                continue
            batch = self._take()
            if not batch:
                self._slots.release()
                continue
            task = asyncio.get_running_loop().create_task(self._execute(batch, self.backend))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    def _take(self) -> list[_Job]:
        batch, tokens = [], 0
        while self._queue and (not batch or tokens + self._queue[0].tokens <= self.max_batch_tokens):
            job = self._queue.popleft()
            self._queued -= len(job.probes)
            self._queued_tokens -= job.tokens
            if job.future.done():  # cancelled by its caller
                continue
            batch.append(job)
            tokens += job.tokens
        abandoned, offset = Abandoned(), 0
        for job in batch:
            job.abandoned, job.offset = abandoned, offset
            offset += len(job.probes)
        return batch

    async def _execute(self, batch: list[_Job], backend: Backend) -> None:
        tokens = sum(job.tokens for job in batch)
        self._running_tokens += tokens
        try:
            started = time.monotonic()
            flat = [p for job in batch for p in job.probes]
            model = backend.info
            try:
                if backend.drops_abandoned:
                    out = await backend.loglikelihoods(flat, abandoned=batch[0].abandoned)
                else:
                    out = await backend.loglikelihoods(flat)
            except BaseException as exc:
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc if isinstance(exc, Exception) else RuntimeError(str(exc)))
                if not isinstance(exc, Exception):
                    raise
                return
            self.batches += 1
            self._measure(batch, started)
            out.model = model
            self._split(batch, out)
        finally:
            self._running_tokens -= tokens
            self._slots.release()

    def _measure(self, batch: list[_Job], started: float) -> None:
        """Refine the drain rate from one finished call. Calls may overlap (vLLM): time
        is counted from the later of this call's start and the previous call's end, so
        overlapping calls are not charged the same seconds twice; the rate is the tokens of
        the last 16 calls over their seconds (not an average of per-call rates: a call
        that ends just after an overlapping one "took" a few ms and would read as a huge
        rate). Abandoned jobs are left out: their skipped work took (almost) no time."""
        now = time.monotonic()
        done = sum(job.tokens for job in batch if not job.future.done())
        elapsed = max(0.0, now - max(started, self._last_done))
        self._last_done = now
        if done <= 0:
            return
        self._recent.append((done, elapsed))
        seconds = sum(s for _, s in self._recent)
        if seconds > 0:
            self._drain_rate = sum(t for t, _ in self._recent) / seconds

    @staticmethod
    def _split(batch: list[_Job], out: BatchLogliks) -> None:
        """Hand each job its own results and token counts (forward passes are shared)."""
        start = 0
        for job in batch:
            n = len(job.probes)
            share = BatchLogliks(
                results=out.results[start : start + n],
                tokens=out.tokens[start : start + n],
                forward_passes=out.forward_passes,
                model=out.model,
            )
            start += n
            if not job.future.done():
                job.future.set_result(share)
