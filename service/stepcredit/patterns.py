"""User regexes (the `regex` format) in worker processes, off the shared preparation path.

A user pattern is client code: `(.*?,){30}x` backtracks for as long as it is let,
and `(x{65534}){65534}` (17 characters) asks the regex compiler for gigabytes. So
`parse_structure(format="regex")` runs only here, in `workers.WorkerPool` processes
under an address-space limit, and each item has three bounds:

* `pattern_timeout_s`: the regex module's own timeout stops compiling-and-matching
  both patterns over one completion (the item fails with `limit_exceeded`); a worker
  that overruns it by `_KILL_GRACE_S` (a compile that never returns) is killed;
* `max_pattern_s_per_request`: the pattern time one request may spend in all; its
  regex items past it fail at once with `limit_exceeded`. A job that had to be killed,
  ran out of memory or crashed spends the rest of the budget, so a hostile request
  costs at most one worker restart;
* fairness: a request's items run one after another on one worker at a time, and
  free workers go to waiting requests in turn, so `pattern_workers` requests make
  progress at once and each waits behind at most one item of every other request.
  Requests without regex items never come here.

The structure logic itself stays in `structure.py`; a worker only calls it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

from .structure import PatternTimeout, Structure, StructureError, parse_structure
from .workers import JobStopped, WorkerError, WorkerPool

__all__ = ["PatternJob", "PatternPool", "PatternFailed"]

# A worker answers within the item's allowance unless something outside the regex
# timeout runs away (compilation): the margin also covers pickling and a loaded host.
_KILL_GRACE_S = 0.5


class PatternFailed(StructureError):
    """The pattern worker crashed (not a timeout): no structure for this item."""

    code = "pattern_failed"


@dataclass(frozen=True)
class PatternJob:
    """What one `regex` item's structure needs."""

    completion: str
    eos_text: str | None
    cot_pattern: str | None
    answer_pattern: str | None


def _parse(job: tuple[PatternJob, float]) -> tuple[float, Structure | StructureError]:
    """Runs in a worker: the structure (or the item's StructureError) and the time it took."""
    item, allowance_s = job
    started = time.perf_counter()
    try:
        result: Structure | StructureError = parse_structure(
            item.completion,
            "regex",
            eos_text=item.eos_text,
            cot_pattern=item.cot_pattern,
            answer_pattern=item.answer_pattern,
            pattern_timeout_s=allowance_s,
        )
    except StructureError as exc:
        result = exc
    return time.perf_counter() - started, result


class PatternPool(WorkerPool):
    """Parses `regex`-format items in worker processes, within per-item and per-request time limits."""

    name = "pattern"

    def __init__(
        self, workers: int = 2, timeout_s: float = 0.25, budget_s: float = 1.0, memory_limit_mb: int = 256
    ) -> None:
        if timeout_s <= 0 or budget_s <= 0:
            raise ValueError("timeout_s and budget_s must be positive")
        super().__init__(_parse, workers=workers, per_owner=1, memory_limit_mb=memory_limit_mb)
        self.timeout_s = timeout_s
        self.budget_s = budget_s

    async def parse(
        self, jobs: Mapping[int, PatternJob], owner: object = None
    ) -> dict[int, Structure | StructureError]:
        """Each job's structure, or the error its item fails with. The jobs of one call
        (one request, one `owner`) run one after another within `budget_s` in all."""
        owner = object() if owner is None else owner
        out: dict[int, Structure | StructureError] = {}
        spent = 0.0
        for key, job in jobs.items():
            left = self.budget_s - spent
            if left <= 0:
                out[key] = PatternTimeout(self._over_budget())
                continue
            allowance = min(self.timeout_s, left)
            try:
                elapsed, result = await self.run((job, allowance), allowance + _KILL_GRACE_S, owner)
            except JobStopped as exc:
                spent = self.budget_s
                limit = (
                    f"ran out of memory, pattern_memory_mb={self.memory_limit_mb}"
                    if exc.reason == "memory"
                    else f"ran past pattern_timeout_s={self.timeout_s:g} s and were stopped"
                )
                out[key] = PatternTimeout(f"the user patterns {limit}; this request's other regex items are not run")
                continue
            except WorkerError as exc:
                spent = self.budget_s
                out[key] = PatternFailed(str(exc))
                continue
            spent += elapsed
            if isinstance(result, PatternTimeout):
                result = PatternTimeout(
                    self._over_budget()
                    if allowance < self.timeout_s
                    else f"the user patterns ran past pattern_timeout_s={self.timeout_s:g} s on this completion"
                )
            out[key] = result
        return out

    def _over_budget(self) -> str:
        return f"this request spent its time for user patterns, max_pattern_s_per_request={self.budget_s:g} s"
