"""Which `vllm serve` server scores which trajectory, and which servers are set aside.

Pure code, no HTTP (the planner apart from the executor, as vLLM keeps its scheduler
apart from its model runner): `plan_routes` assigns one batch's trajectories to the
servers that are up, and `CoolOff` is one server's health. vllm_remote.py executes both.

Routing. Every probe of a trajectory goes to one server, whose prefix cache then holds
the trajectory's tokens for the next probe. Across trajectories the planner balances
work and keeps shared prefixes together: the batch is sorted by token ids, so that
trajectories sharing a prefix (a GRPO group's prompt) sit side by side, and the sorted
list is cut into contiguous runs, one per server, least loaded (work in flight from
other batches) first. Work is counted in prompt tokens computed with a prefix cache (a
run costs the size of its token trie), so a cut inside a shared prefix costs that
prefix once more on the next server. The runs are those that finish soonest; a cut
moves to a shorter shared prefix (between groups) where that keeps the finish, and a
group stays whole where that finishes at most 10% later and saves more prefix tokens
than it adds.
Measured against hashing the first tokens (what this replaced: one server got
everything when all prompts share a system prompt) and hashing the whole trajectory:
see the README's Decisions.

Cool-off. A server that times out, refuses connections or keeps answering 5xx is set
aside for `seconds` (a circuit breaker): no request goes to it, and trajectories go to
the others. After the cool-off one trial request goes; the others routed to that
server wait for its outcome, so a dead server costs at most one timeout per batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

__all__ = ["plan_routes", "common_prefix", "CoolOff"]

_LATE = 0.1
"""A run may finish this much later than the batch's soonest finish to keep a shared
prefix whole (on one server, not computed twice)."""


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    i = 0
    while i + 64 <= n and a[i : i + 64] == b[i : i + 64]:  # slices compare in C
        i += 64
    while i < n and a[i] == b[i]:
        i += 1
    return i


def plan_routes(trunks: Sequence[Sequence[int]], extra: Sequence[int], loads: Sequence[int]) -> list[int]:
    """For each trajectory, the index into `loads` of the server that scores it.

    `trunks`: each trajectory's shared token sequence (its probes branch off it);
    `extra`: tokens its probes add beyond the trunk; `loads`: tokens in flight on each
    available server, in the caller's order of preference on ties (a caller that lists
    the least-served first spreads one-trajectory batches round-robin).

    The plan finishes first (the smallest largest load, batch included) among those
    that cut the sorted batch into contiguous runs, up to the cuts' cost in shared
    prefixes (see `_Plan.runs`). Deterministic: same input, same plan.
    """
    n = len(trunks)
    if len(extra) != n:
        raise ValueError(f"{n} trunks but {len(extra)} extra costs")
    if not loads:
        raise ValueError("no server to route to")
    if n == 0:
        return []
    keys = [t if isinstance(t, list) else list(t) for t in trunks]
    order = sorted(range(n), key=lambda i: (keys[i], i))
    shared = [0] + [common_prefix(keys[order[j - 1]], keys[order[j]]) for j in range(1, n)]
    before = [0]  # before[j]: work of sorted trajectories 0..j-1 on one server (their trie)
    for j, i in enumerate(order):
        before.append(before[-1] + len(keys[i]) - shared[j] + extra[i])
    plan = _Plan(before, shared, sorted(range(len(loads)), key=lambda s: (loads[s], s)), loads)

    # Binary search on the finish: everything on the least-loaded server always fits.
    lo, hi = min(loads), min(loads) + before[n]
    while hi - lo > 1:
        mid = (lo + hi) // 2 if isinstance(lo, int) and isinstance(hi, int) else (lo + hi) / 2
        lo, hi = (lo, mid) if plan.fits(0, 0, mid) else (mid, hi)

    route = [0] * n
    for server, first, last in plan.runs(hi):
        for j in range(first, last):
            route[order[j]] = server
    return route


class _Plan:
    """Contiguous runs of the sorted batch on the servers, least loaded first."""

    def __init__(self, before: list[int], shared: list[int], ranked: list[int], loads: Sequence[int]) -> None:
        self.before, self.shared, self.ranked, self.loads = before, shared, ranked, loads
        self.n = len(before) - 1

    def _reach(self, first: int, room: float) -> int:
        """Past the last trajectory a run starting at `first` holds within `room` tokens
        (the run's first trajectory computes its whole trunk)."""
        last = first
        while last < self.n and self.before[last + 1] - self.before[first] + self.shared[first] <= room:
            last += 1
        return last

    def fits(self, first: int, k: int, finish: float) -> bool:
        """Whether trajectories first.. fit on servers ranked[k:] by `finish`
        (filling each as far as it goes is optimal: a shorter run never costs more)."""
        for s in self.ranked[k:]:
            if first == self.n:
                return True
            first = self._reach(first, finish - self.loads[s])
        return first == self.n

    def runs(self, finish: float, window: int = 32) -> list[tuple[int, int, int]]:
        """(server, first, last) of each run. A run ends as far as it goes by `finish`,
        or where a cut costs less: a cut splits the prefix its neighbours share (the
        next server computes it again), so a run may end earlier at a shorter shared
        prefix (between GRPO groups rather than inside one) if the rest still fits, or
        run past `finish`, by at most _LATE of it and by fewer tokens than the cut
        would have cost."""
        out, first = [], 0
        for k, s in enumerate(self.ranked):
            if first == self.n:
                break
            room = finish - self.loads[s]
            last = self._reach(first, room)
            if first < last < self.n:
                best, best_cost = last, self._cut(last)
                for end in range(last - 1, max(first, last - window), -1):
                    if self._cut(end) >= best_cost:
                        continue
                    if not self.fits(end, k + 1, finish):
                        break  # ending earlier leaves even more for the others
                    best, best_cost = end, self._cut(end)
                for end in range(last + 1, min(self.n, last + window) + 1):
                    over = self.before[end] - self.before[first] + self.shared[first] - room
                    if over >= best_cost or over > _LATE * finish:
                        break
                    if over + self._cut(end) < best_cost:
                        best, best_cost = end, over + self._cut(end)
                last = best
            if last > first:
                out.append((s, first, last))
            first = last
        return out

    def _cut(self, end: int) -> int:
        """Tokens computed twice when a run ends before sorted trajectory `end`."""
        return self.shared[end] if end < self.n else 0


class CoolOff:
    """One server's health: up; set aside for `seconds` after a failure; then on trial.

    `admit()` before each request says whether it may go: "go" (up), "trial" (the
    cool-off is over and this request decides), "wait" (a trial is in flight: wait for
    its outcome and ask again) or "no" (cooling off: do not send).
    """

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        if seconds <= 0:
            raise ValueError("the cool-off must be positive")
        self.seconds = seconds
        self.clock = clock
        self.until: float | None = None
        """Set aside until this time (the clock's); None while up."""
        self.reason = ""
        self.trial = False

    @property
    def up(self) -> bool:
        return self.until is None

    @property
    def available(self) -> bool:
        """Up, or its cool-off is over (a trial may be due): the planner may route to it."""
        return self.until is None or self.clock() >= self.until

    def admit(self) -> str:
        if self.until is None:
            return "go"
        if self.clock() < self.until:
            return "no"
        if self.trial:
            return "wait"
        self.trial = True
        return "trial"

    def failed(self, reason: str, trial: bool = False) -> None:
        """A request failed for want of the server: set it aside (again). A request sent
        before a trial began that fails late says nothing new: the trial in flight decides
        (resetting here would let a second trial start beside it)."""
        if self.trial and not trial:
            return
        self.until = self.clock() + self.seconds
        self.reason = reason
        self.trial = False

    def trial_passed(self) -> None:
        """The trial request got an answer: the server is back."""
        self.until = None
        self.reason = ""
        self.trial = False

    def trial_abandoned(self) -> None:
        """The trial ended without a verdict (cancelled): the next request is the trial."""
        self.trial = False

    def describe(self) -> str:
        if self.until is None:
            return "up"
        left = self.until - self.clock()
        when = f"for {left:.0f} s more" if left > 0 else "until a trial request passes"
        return f"set aside {when} after: {self.reason}"
