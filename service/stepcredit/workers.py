"""Warm worker processes with a hard timeout per job, a memory limit, and a fair
hand-out across owners. The verifier (Math-Verify) and the pattern pool (user
regexes) are both built on it.

Why processes, and why a hard timeout of our own:

* Both run client-controlled input through C code that can spin for minutes or
  allocate without bound: ``10^{10^{10^{10}}}`` in sympy, ``(x{65534}){65534}``
  in the regex compiler (17 characters that ask for gigabytes). Python cannot
  interrupt C code from another thread, but a process can always be SIGKILLed, and
  ``RLIMIT_AS`` turns runaway allocation into a ``MemoryError`` inside the worker
  instead of an OOM-kill of the service.
* Workers are started with the ``spawn`` method: the service process holds
  torch/CUDA threads, and forking a multi-threaded process can deadlock the child.

A job's timeout starts when a worker takes it, not while it waits for one, so a
busy pool makes callers wait rather than time out jobs nobody looked at.

Fairness: every job names an owner (the scoring request it belongs to). An owner
holds at most ``per_owner`` workers at once, and a worker that comes free goes to
the waiting owners in turn (round-robin), so one request's slow jobs never take
every worker, and a request waits behind at most one job of each other request.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import resource
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection

__all__ = ["WorkerPool", "WorkerError", "JobStopped"]

logger = logging.getLogger(__name__)

_READY_TIMEOUT_S = 120.0  # importing sympy on a loaded 2-core box can take many seconds
# A job whose caller has gone may finish this long (keeping its warm worker) before the
# worker is killed and replaced: an ordinary job takes milliseconds, a runaway one minutes.
_ABANDONED_GRACE_S = 1.0


class WorkerError(Exception):
    """No answer: the worker died for a reason other than the timeout or memory, the
    job raised (a bug, not an answer), or the pool is closed."""


class JobStopped(Exception):
    """The job ran past its hard timeout (`reason` "timeout") or out of its memory
    budget ("memory"); its worker was replaced."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"the job was stopped ({reason})")
        self.reason = reason


# --------------------------------------------------------------------------- worker side


def _address_space_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return 0


def _worker_main(
    conn: Connection, memory_limit_mb: int, handle: Callable[[object], object], warm: Callable[[], None] | None
) -> None:
    # Ctrl-C on the service reaches the whole process group; the parent decides when we die.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The limit is a budget on top of what is mapped already: spawn re-imports the
    # parent's __main__ (and this package), which may have pulled in torch before we run.
    limit = _address_space_bytes() + memory_limit_mb * 2**20
    try:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ValueError, OSError):
        pass  # a lower hard limit is already in force, which is fine too
    if warm is not None:
        warm()
    conn.send("ready")
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return  # parent gone or closed us
        if job is None:
            return
        try:
            reply = ("ok", handle(job))
        except MemoryError:
            reply = ("oom", None)
        except Exception as e:  # a bug, not an answer
            reply = ("error", f"{type(e).__name__}: {e}"[:500])
        try:
            conn.send(reply)
        except MemoryError:  # pickling a huge reply
            conn.send(("oom", None))


# --------------------------------------------------------------------------- parent side


class _Worker:
    def __init__(self, proc: mp.process.BaseProcess, conn: Connection) -> None:
        self.proc = proc
        self.conn = conn


class WorkerPool:
    """A fixed number of warm worker processes running ``handle(job)`` with a hard timeout.

    ``handle`` and ``warm`` must be module-level functions (spawn pickles them by name).
    ``run`` may be awaited concurrently from any number of tasks on any number of event
    loops (threads); at most ``workers`` jobs run at once, at most ``per_owner`` (default
    all) of one owner's.
    """

    name = "worker"
    """Names the processes and the messages of errors."""
    Error: type[WorkerError] = WorkerError
    """What `run` and `start` raise when there is no answer."""

    def __init__(
        self,
        handle: Callable[[object], object],
        *,
        warm: Callable[[], None] | None = None,
        workers: int = 2,
        per_owner: int | None = None,
        memory_limit_mb: int = 2048,
    ) -> None:
        per_owner = workers if per_owner is None else per_owner
        if workers < 1 or memory_limit_mb < 1 or not 1 <= per_owner <= workers:
            raise ValueError("workers and memory_limit_mb must be positive, per_owner within [1, workers]")
        self.workers = workers
        self.per_owner = per_owner
        self.memory_limit_mb = memory_limit_mb
        self._handle, self._warm = handle, warm
        self._ctx = mp.get_context("spawn")
        # A threading lock, not asyncio primitives: callers may live on different loops.
        self._lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._idle: deque[_Worker] = deque()
        # Waiting callers by owner; the dict's order is the round: a served owner moves to the end.
        self._waiters: dict[object, deque[tuple[asyncio.AbstractEventLoop, asyncio.Future]]] = {}
        self._held: dict[object, int] = {}  # workers each owner holds now
        self._live: set[_Worker] = set()
        self._started = False
        self._closed = False
        self._restarts = 0

    @property
    def restarts(self) -> int:
        """How many workers were killed and replaced."""
        return self._restarts

    # ---- lifecycle

    def start(self) -> None:
        """Spawn all workers and block until each is warm. Idempotent."""
        with self._start_lock:
            if self._closed:
                raise self.Error(f"{self.name} pool is closed")
            if self._started:
                return
            spawned = [self._spawn() for _ in range(self.workers)]
            try:
                for w in spawned:
                    self._wait_ready(w)
            except BaseException:
                for w in spawned:
                    self._dispose(w)
                raise
            for w in spawned:
                self._release(w)
            self._started = True

    def close(self) -> None:
        """Kill all workers; later ``run`` calls raise. Idempotent."""
        with self._lock:
            self._closed = True
            idle, self._idle = list(self._idle), deque()
            busy = [w for w in self._live if w not in idle]
            waiters = [waiter for queue in self._waiters.values() for waiter in queue]
            self._waiters.clear()
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_fail, fut, self.Error(f"{self.name} pool is closed"))
            except RuntimeError:
                pass  # that loop is already closed
        for w in idle:
            self._dispose(w)
        # Busy workers are only killed: their job sees EOF and disposes of them itself,
        # so no connection is closed under a loop that still watches its descriptor.
        for w in busy:
            w.proc.kill()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the call

    async def run(self, job: object, timeout_s: float, owner: object = None) -> object:
        """``handle(job)`` in a worker, killed after ``timeout_s``.

        Raises JobStopped on the timeout or the memory limit, ``Error`` when there is
        no answer. ``owner`` groups the jobs of one request for the fair hand-out;
        None makes the job its own owner.
        """
        if self._closed:
            raise self.Error(f"{self.name} pool is closed")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        if not self._started:
            await asyncio.to_thread(self.start)
        owner = object() if owner is None else owner
        worker = await self._acquire(owner)
        try:
            return await self._run_on(worker, job, timeout_s)
        finally:
            self._leave(owner)

    async def _run_on(self, worker: _Worker, job: object, timeout_s: float) -> object:
        deadline = time.monotonic() + timeout_s
        settled = False  # True once the worker is back in the pool or handed to a recycler
        try:
            try:
                worker.conn.send(job)
                if not await _readable(worker.conn, timeout_s):
                    self._recycle(worker, kill=True)
                    settled = True
                    raise JobStopped("timeout")
                status, payload = worker.conn.recv()
            except (EOFError, OSError) as e:
                closed = self._closed
                self._recycle(worker, kill=True, count=not closed)
                settled = True
                if closed:
                    raise self.Error(f"{self.name} pool is closed") from e
                raise self.Error(f"{self.name} worker died while running a job") from e
            if status == "oom":
                # The heap of a worker that hit RLIMIT_AS is not worth trusting further.
                self._recycle(worker, kill=True)
                settled = True
                raise JobStopped("memory")
            self._release(worker)
            settled = True
            if status == "error":
                raise self.Error(f"{self.name} worker failed: {payload}")
            return payload
        finally:
            if not settled:
                # Cancelled (or an unexpected error) while the job runs: a background thread
                # waits a moment for the reply, so the worker cannot hand this stale reply
                # to the next caller, and kills it if the job runs on for nobody.
                self._recycle(worker, drain_until=min(deadline, time.monotonic() + _ABANDONED_GRACE_S))

    # ---- worker hand-out (thread-safe, loop-agnostic)

    async def _acquire(self, owner: object) -> _Worker:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._closed:
                raise self.Error(f"{self.name} pool is closed")
            # Owners still waiting while a worker is idle are all at their cap (see _dispatch).
            if self._idle and self._held.get(owner, 0) < self.per_owner:
                self._held[owner] = self._held.get(owner, 0) + 1
                return self._idle.popleft()
            fut: asyncio.Future = loop.create_future()
            self._waiters.setdefault(owner, deque()).append((loop, fut))
        try:
            return await fut
        except asyncio.CancelledError:
            with self._lock:
                queue = self._waiters.get(owner)
                if queue is not None and (loop, fut) in queue:
                    queue.remove((loop, fut))
                    if not queue:
                        del self._waiters[owner]
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._release(fut.result())  # it arrived just as we were cancelled
                self._leave(owner)
            raise

    def _dispatch(self) -> None:
        """Hand idle workers to waiting owners below their cap, in turn. Lock held."""
        while self._idle:
            picked = self._next_waiter()
            if picked is None:
                return
            owner, loop, fut = picked
            w = self._idle.popleft()
            self._held[owner] = self._held.get(owner, 0) + 1
            try:
                loop.call_soon_threadsafe(self._hand_over, fut, w, owner)
            except RuntimeError:  # the waiter's loop is closed
                self._unhold(owner)
                self._idle.appendleft(w)

    def _next_waiter(self) -> tuple[object, asyncio.AbstractEventLoop, asyncio.Future] | None:
        for owner in list(self._waiters):
            if self._held.get(owner, 0) >= self.per_owner:
                continue  # keeps its place in the round
            queue = self._waiters.pop(owner)
            while queue:
                loop, fut = queue.popleft()
                if fut.done():  # cancelled meanwhile
                    continue
                if queue:
                    self._waiters[owner] = queue  # to the end of the round
                return owner, loop, fut
        return None

    def _unhold(self, owner: object) -> None:
        left = self._held.get(owner, 0) - 1
        if left > 0:
            self._held[owner] = left
        else:
            self._held.pop(owner, None)

    def _leave(self, owner: object) -> None:
        """The owner's job is over: it holds one worker fewer."""
        with self._lock:
            self._unhold(owner)
            if not self._closed:
                self._dispatch()  # one of its own waiters may be below the cap now

    def _release(self, w: _Worker) -> None:
        with self._lock:
            if not self._closed:
                self._live.add(w)
                self._idle.append(w)
                self._dispatch()
                return
        self._dispose(w)

    def _hand_over(self, fut: asyncio.Future, w: _Worker, owner: object) -> None:
        # Runs on the waiter's loop; the waiter may have been cancelled meanwhile.
        if fut.done():
            self._release(w)
            self._leave(owner)
        else:
            fut.set_result(w)

    # ---- spawning and replacing

    def _spawn(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe()
        proc = self._ctx.Process(
            target=_worker_main,
            args=(child_conn, self.memory_limit_mb, self._handle, self._warm),
            daemon=True,
            name=f"stepcredit-{self.name}",
        )
        proc.start()
        child_conn.close()  # so that the worker's death shows up as EOF here
        w = _Worker(proc, parent_conn)
        with self._lock:
            self._live.add(w)
        return w

    def _wait_ready(self, w: _Worker) -> None:
        try:
            if w.conn.poll(_READY_TIMEOUT_S) and w.conn.recv() == "ready":
                return
        except (EOFError, OSError):
            pass
        raise self.Error(f"{self.name} worker failed to start (exit code {w.proc.exitcode})")

    def _dispose(self, w: _Worker) -> None:
        w.proc.kill()
        w.proc.join(5)
        w.conn.close()
        with self._lock:
            self._live.discard(w)

    def _recycle(
        self, w: _Worker, kill: bool = False, drain_until: float | None = None, count: bool = True
    ) -> None:
        """Take a worker out of service; replace it on a background thread."""
        if kill:
            w.proc.kill()  # right away: a runaway job should stop burning CPU now
            if count:
                with self._lock:
                    self._restarts += 1
        threading.Thread(
            target=self._recycle_sync,
            args=(w, kill, drain_until),
            daemon=True,
            name=f"stepcredit-{self.name}-recycle",
        ).start()

    def _recycle_sync(self, w: _Worker, killed: bool, drain_until: float | None) -> None:
        if not killed:
            try:
                remaining = max(0.0, (drain_until or 0.0) - time.monotonic())
                if not self._closed and w.conn.poll(remaining) and w.conn.recv()[0] != "oom":
                    self._release(w)
                    return
            except (EOFError, OSError):
                pass
            if not self._closed:
                with self._lock:
                    self._restarts += 1
        self._dispose(w)
        # Keep trying: a pool that silently shrank to zero workers would hang every caller.
        delay = 1.0
        while not self._closed:
            new = None
            try:
                new = self._spawn()
                self._wait_ready(new)
            except Exception:
                if new is not None:
                    self._dispose(new)
                if self._closed:
                    return  # close() killed it while it was starting
                logger.exception("could not start a %s worker; retrying in %.0f s", self.name, delay)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
            else:
                self._release(new)  # disposes of it if the pool closed meanwhile
                return


def _fail(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


async def _readable(conn: Connection, timeout: float) -> bool:
    """Wait without blocking the loop until ``conn`` has data (or EOF); False on timeout."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    fd = conn.fileno()
    loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
    try:
        await asyncio.wait_for(ready, timeout)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
