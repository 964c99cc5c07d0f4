"""Answer-equivalence checking with Math-Verify, isolated in worker processes.

Math-Verify bounds its own work with ``signal.alarm``, which only works in the
main thread of the main interpreter. The service verifies from asyncio tasks that
may run on a non-main thread (uvicorn), so we switch those timeouts off and
enforce one from outside: the jobs run in `workers.WorkerPool`'s processes, which
are killed at the item's hard timeout and live under an address-space limit
(``10^{10^{10^{10}}}``, thousands of nested brackets or ``(10^9)!`` can keep sympy
busy for minutes or eat all memory).

A job is one (answer, references) item; its timeout covers all references.
Fairness: the items of one request (one ``owner``) hold at most ``workers - 1``
workers at once (all of them with one worker), so one request's slow answers never
hold every worker while another request waits.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from .reading import first_match, keep_variables
from .workers import JobStopped, WorkerError, WorkerPool

__all__ = ["Verdict", "VerifyError", "VerifierPool"]


@dataclass(frozen=True)
class Verdict:
    correct: bool
    matched_reference: int | None
    """Index into the references of the first equivalent one, else None."""
    timed_out: bool
    """The hard timeout was hit (or the worker ran out of memory); correct is then False."""


class VerifyError(WorkerError):
    """The verifier could not give a verdict (worker crashed for a reason other than timeout/memory, pool closed)."""


# --------------------------------------------------------------------------- worker side


def _warm() -> None:
    import math_verify  # noqa: F401  (warm the import so the first job is not slow)

    # We own the timeouts; Math-Verify would warn about that once per process.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    keep_variables()  # a library it cannot edit fails the worker's start, loudly


def _check(job: tuple[str, list[str]]) -> int | None:
    return first_match(*job)


# --------------------------------------------------------------------------- parent side


class VerifierPool(WorkerPool):
    """A fixed number of warm Math-Verify worker processes with a hard per-item timeout.

    ``verify`` may be awaited concurrently from any number of tasks on any number of
    event loops (threads); at most ``workers`` items are checked at once, at most
    ``max(1, workers - 1)`` of one owner's.
    """

    name = "verify"
    Error = VerifyError

    def __init__(
        self,
        workers: int = 2,
        timeout_s: float = 5.0,
        max_answer_chars: int = 1000,
        memory_limit_mb: int = 2048,
    ) -> None:
        if workers < 1 or timeout_s <= 0 or max_answer_chars < 1 or memory_limit_mb < 1:
            raise ValueError("workers, timeout_s, max_answer_chars and memory_limit_mb must be positive")
        super().__init__(
            _check, warm=_warm, workers=workers, per_owner=max(1, workers - 1), memory_limit_mb=memory_limit_mb
        )
        self.timeout_s = timeout_s
        self.max_answer_chars = max_answer_chars

    async def verify(
        self,
        answer: str | None,
        references: Sequence[str],
        timeout_s: float | None = None,
        owner: object = None,
    ) -> Verdict:
        """Whether ``answer`` is equivalent to one of ``references`` (gold first).

        ``answer`` is the already extracted final answer.  A blank one is simply wrong.
        One longer than ``max_answer_chars`` is wrong without being parsed: such a text
        cannot be a final answer, and feeding it to the LaTeX parser and sympy is a
        denial-of-service vector. ``owner`` (one per scoring request) is what the
        fair hand-out of workers counts; None is an owner of its own.
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
        try:
            payload = await self.run((answer, refs), timeout, owner)
        except JobStopped:
            return Verdict(False, None, True)
        return Verdict(payload is not None, payload, False)


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
