"""The engine contract every likelihood backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..probes import TrajectoryProbes
from ..protocol import ModelInfo

__all__ = ["Abandoned", "Backend", "BatchLogliks", "BackendError", "BackendDeadError", "abandoned_error"]


class BackendError(RuntimeError):
    """One batch failed (recoverable): its items get a per-item error."""


class BackendDeadError(RuntimeError):
    """The backend cannot serve any more: readiness goes false, the process should exit."""


class Abandoned:
    """Trajectories of one backend call whose callers have gone (their clients
    disconnected): a backend may skip what it has not computed for them yet.

    Written from the event loop, read from the backend's worker thread: adding to and
    testing a set are single operations under the GIL, and a stale read only means one
    more pass is run.
    """

    def __init__(self) -> None:
        self._gone: set[int] = set()

    def add(self, indices: range) -> None:
        self._gone.update(indices)

    def __contains__(self, trajectory: int) -> bool:
        return trajectory in self._gone

    def all(self, trajectories) -> bool:
        """Every one of `trajectories` is abandoned (an empty set is not)."""
        trajectories = set(trajectories)
        return bool(trajectories) and trajectories <= self._gone


def abandoned_error() -> BackendError:
    """What an abandoned trajectory gets instead of likelihoods (nobody reads it)."""
    return BackendError("not computed: the request was abandoned by its client")


@dataclass
class BatchLogliks:
    """Per trajectory either `logliks[k][v]` (mean log-prob of reference v after probe k)
    or the exception that prevented it."""

    results: list[list[list[float]] | Exception]
    tokens: list[int] = field(default_factory=list)
    """Tokens forwarded for each trajectory (padding excluded, cache hits excluded)."""
    forward_passes: int = 0
    model: ModelInfo | None = None
    """The model that computed them (set by the batcher: a reload may swap models between batches)."""

    @property
    def tokens_forwarded(self) -> int:
        return sum(self.tokens)

    @classmethod
    def collect(cls, outcomes: Sequence[tuple[list[list[float]], int] | BaseException]) -> BatchLogliks:
        """From per-trajectory `(logliks, tokens)` or exceptions (asyncio.gather's
        `return_exceptions`): a dead backend or a cancellation propagates, any other
        failure becomes that trajectory's error."""
        out = cls(results=[], tokens=[], forward_passes=1)
        for outcome in outcomes:
            if isinstance(outcome, BackendDeadError) or (
                isinstance(outcome, BaseException) and not isinstance(outcome, Exception)
            ):
                raise outcome
            if isinstance(outcome, Exception):
                out.results.append(outcome if isinstance(outcome, BackendError) else BackendError(str(outcome)))
                out.tokens.append(0)
            else:
                out.results.append(outcome[0])
                out.tokens.append(outcome[1])
        return out


class Backend(ABC):
    info: ModelInfo
    tokenizer: object
    """The scorer's HF tokenizer: probes are built with it, in the service."""
    max_inflight_batches: int = 1
    """Backend calls the batcher may have in flight at once (1: strictly one after another)."""
    drops_abandoned: bool = False
    """`loglikelihoods` takes `abandoned=` and skips work for the trajectories in it."""

    @abstractmethod
    async def loglikelihoods(self, batch: Sequence[TrajectoryProbes]) -> BatchLogliks:
        """ℓ_k(v) for every probe k and reference v of every trajectory. A backend with
        `drops_abandoned` also takes `abandoned: Abandoned | None = None`."""

    async def start(self) -> None:
        """Connect or warm up; called once before the first batch."""

    async def aclose(self) -> None:
        """Release everything; the default runs `shutdown` off the event loop."""
        import asyncio

        await asyncio.to_thread(self.shutdown)

    def check_health(self) -> None:
        """Raise BackendDeadError when the backend can no longer serve."""

    def shutdown(self) -> None:
        """Release the model and any worker."""

    # ------------------------------------------------------------ reload
    reload_refusal: str | None = "this backend cannot load new weights while serving"
    """Why `Scorer.reload` is refused (None: `load_beside` builds a backend on new weights)."""

    def load_beside(self, path: Path, *, revision: str, tokenizer: object) -> Backend:
        """A new backend with this one's settings on the weights at `path` (blocking).
        `tokenizer` is a private copy of the scorer's, already checked against `path`'s."""
        raise NotImplementedError

    def weights_bytes(self, parameters: int) -> int | None:
        """Device memory `parameters` weights take in this backend's dtype (None: unknown)."""
        return None

    def memory_available(self) -> int | None:
        """Device memory a second backend could use now, beside this one (None: unknown,
        so a reload frees this one first)."""
        return None
