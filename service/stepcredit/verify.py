"""Answer-equivalence checking with Math-Verify, isolated in worker processes.

Why processes, and why a hard timeout of our own:

* Math-Verify bounds its own work with ``signal.alarm``, which only works in the
  main thread of the main interpreter.  The service verifies from asyncio tasks
  that may run on a non-main thread (uvicorn), so we switch those timeouts off
  and enforce one from outside.
* Model output is adversarial in practice: ``10^{10^{10^{10}}}``, thousands of
  nested brackets or ``(10^9)!`` can keep sympy busy for minutes or eat all
  memory.  Python code cannot be interrupted reliably from another thread, but
  a process can always be SIGKILLed, and ``RLIMIT_AS`` turns runaway allocation
  into a ``MemoryError`` inside the worker instead of an OOM-kill of the service.
* Workers are started with the ``spawn`` method: the service process holds
  torch/CUDA threads, and forking a multi-threaded process can deadlock the
  child.

A job is one (answer, references) item; its timeout covers all references.
The timeout starts when a worker takes the job, not while it waits for one, so
a busy pool makes callers wait rather than time out answers nobody looked at.
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
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection

from .reading import first_match

__all__ = ["Verdict", "VerifyError", "VerifierPool"]

logger = logging.getLogger(__name__)

_READY_TIMEOUT_S = 120.0  # importing sympy on a loaded 2-core box can take many seconds


@dataclass(frozen=True)
class Verdict:
    correct: bool
    matched_reference: int | None
    """Index into the references of the first equivalent one, else None."""
    timed_out: bool
    """The hard timeout was hit (or the worker ran out of memory); correct is then False."""


class VerifyError(Exception):
    """The verifier could not give a verdict (worker crashed for a reason other than timeout/memory, pool closed)."""


# --------------------------------------------------------------------------- worker side


def _address_space_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return 0


def _worker_main(conn: Connection, memory_limit_mb: int) -> None:
    # Ctrl-C on the service reaches the whole process group; the parent decides when we die.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The limit is a budget on top of what is mapped already: spawn re-imports the
    # parent's __main__ (and this package), which may have pulled in torch before we run.
    limit = _address_space_bytes() + memory_limit_mb * 2**20
    try:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ValueError, OSError):
        pass  # a lower hard limit is already in force, which is fine too
    import math_verify  # noqa: F401  (warm the import so the first job is not slow)

    # We own the timeouts; Math-Verify would warn about that once per process.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    conn.send("ready")
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return  # parent gone or closed us
        if job is None:
            return
        try:
            reply = ("ok", first_match(*job))
        except MemoryError:
            reply = ("oom", None)
        except Exception as e:  # a bug, not a verdict
            reply = ("error", f"{type(e).__name__}: {e}"[:500])
        conn.send(reply)


# --------------------------------------------------------------------------- parent side


class _Worker:
    def __init__(self, proc: mp.process.BaseProcess, conn: Connection) -> None:
        self.proc = proc
        self.conn = conn


class VerifierPool:
    """A fixed number of warm Math-Verify worker processes with a hard per-item timeout.

    ``verify`` may be awaited concurrently from any number of tasks on any number of
    event loops (threads); at most ``workers`` items are checked at once.
    """

    def __init__(
        self,
        workers: int = 2,
        timeout_s: float = 5.0,
        max_answer_chars: int = 1000,
        memory_limit_mb: int = 2048,
    ) -> None:
        if workers < 1 or timeout_s <= 0 or max_answer_chars < 1 or memory_limit_mb < 1:
            raise ValueError("workers, timeout_s, max_answer_chars and memory_limit_mb must be positive")
        self.workers = workers
        self.timeout_s = timeout_s
        self.max_answer_chars = max_answer_chars
        self.memory_limit_mb = memory_limit_mb
        self._ctx = mp.get_context("spawn")
        # A threading lock, not asyncio primitives: callers may live on different loops.
        self._lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._idle: deque[_Worker] = deque()
        self._waiters: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = deque()
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
        """Spawn all workers and block until each has imported Math-Verify. Idempotent."""
        with self._start_lock:
            if self._closed:
                raise VerifyError("verifier pool is closed")
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
        """Kill all workers; later ``verify`` calls raise VerifyError. Idempotent."""
        with self._lock:
            self._closed = True
            idle, self._idle = list(self._idle), deque()
            busy = [w for w in self._live if w not in idle]
            waiters, self._waiters = list(self._waiters), deque()
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_fail, fut, VerifyError("verifier pool is closed"))
            except RuntimeError:
                pass  # that loop is already closed
        for w in idle:
            self._dispose(w)
        # Busy workers are only killed: their job sees EOF and disposes of them itself,
        # so no connection is closed under a loop that still watches its descriptor.
        for w in busy:
            w.proc.kill()

    def __enter__(self) -> VerifierPool:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the call

    async def verify(
        self, answer: str | None, references: Sequence[str], timeout_s: float | None = None
    ) -> Verdict:
        """Whether ``answer`` is equivalent to one of ``references`` (gold first).

        ``answer`` is the already extracted final answer.  A blank one is simply wrong.
        One longer than ``max_answer_chars`` is wrong without being parsed: such a text
        cannot be a final answer, and feeding it to the LaTeX parser and sympy is a
        denial-of-service vector.
        """
        if self._closed:
            raise VerifyError("verifier pool is closed")
        if _wrong_unread(answer, self.max_answer_chars):
            return Verdict(False, None, False)
        refs = list(references)
        if not all(isinstance(r, str) for r in refs):
            raise TypeError("references must be strings")
        if not refs:
            return Verdict(False, None, False)
        timeout = self.timeout_s if timeout_s is None else timeout_s
        if timeout <= 0:
            raise ValueError("timeout_s must be positive")
        if not self._started:
            await asyncio.to_thread(self.start)

        worker = await self._acquire()
        deadline = time.monotonic() + timeout
        settled = False  # True once the worker is back in the pool or handed to a recycler
        try:
            try:
                worker.conn.send((answer, refs))
                if not await _readable(worker.conn, timeout):
                    self._recycle(worker, kill=True)
                    settled = True
                    return Verdict(False, None, True)
                status, payload = worker.conn.recv()
            except (EOFError, OSError) as e:
                closed = self._closed
                self._recycle(worker, kill=True, count=not closed)
                settled = True
                if closed:
                    raise VerifyError("verifier pool is closed") from e
                raise VerifyError("verify worker died while checking an answer") from e
            if status == "oom":
                # The heap of a worker that hit RLIMIT_AS is not worth trusting further.
                self._recycle(worker, kill=True)
                settled = True
                return Verdict(False, None, True)
            self._release(worker)
            settled = True
            if status == "error":
                raise VerifyError(f"verify worker failed: {payload}")
            return Verdict(payload is not None, payload, False)
        finally:
            if not settled:
                # Cancelled (or an unexpected error) while the job runs: let a background
                # thread wait for the reply until the job's deadline, so the worker cannot
                # hand this stale reply to the next caller.
                self._recycle(worker, drain_until=deadline)

    # ---- worker hand-out (thread-safe, loop-agnostic)

    async def _acquire(self) -> _Worker:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._closed:
                raise VerifyError("verifier pool is closed")
            if self._idle:
                return self._idle.popleft()
            fut: asyncio.Future = loop.create_future()
            self._waiters.append((loop, fut))
        try:
            return await fut
        except asyncio.CancelledError:
            with self._lock:
                try:
                    self._waiters.remove((loop, fut))
                except ValueError:
                    pass
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._release(fut.result())  # it arrived just as we were cancelled
            raise

    def _release(self, w: _Worker) -> None:
        with self._lock:
            if not self._closed:
                self._live.add(w)
                while self._waiters:
                    loop, fut = self._waiters.popleft()
                    if fut.done():
                        continue
                    try:
                        loop.call_soon_threadsafe(self._hand_over, fut, w)
                        return
                    except RuntimeError:
                        continue  # the waiter's loop is closed
                self._idle.append(w)
                return
        self._dispose(w)

    def _hand_over(self, fut: asyncio.Future, w: _Worker) -> None:
        # Runs on the waiter's loop; the waiter may have been cancelled meanwhile.
        if fut.done():
            self._release(w)
        else:
            fut.set_result(w)

    # ---- spawning and replacing

    def _spawn(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe()
        proc = self._ctx.Process(
            target=_worker_main, args=(child_conn, self.memory_limit_mb), daemon=True, name="stepcredit-verify"
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
        raise VerifyError(f"verify worker failed to start (exit code {w.proc.exitcode})")

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
            target=self._recycle_sync, args=(w, kill, drain_until), daemon=True, name="stepcredit-verify-recycle"
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
                logger.exception("could not start a verify worker; retrying in %.0f s", delay)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
            else:
                self._release(new)  # disposes of it if the pool closed meanwhile
                return


def _wrong_unread(answer: str | None, max_answer_chars: int) -> bool:
    """Answers judged wrong without parsing: missing, blank, over-long or with unbalanced braces."""
    if answer is None or not answer.strip() or len(answer) > max_answer_chars:
        return True
    # Math-Verify reads "2^{" as 2: a broken answer must not match gold "2".
    return not _braces_balance(answer)


def _braces_balance(text: str) -> bool:
    depth, i = 0, 0
    while i < len(text):
        if text[i] == "\\":
            i += 2  # \{ and \} are literal braces
            continue
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth < 0:
            return False
        i += 1
    return depth == 0


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
