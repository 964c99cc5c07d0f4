"""Swapping the weights a Scorer serves (POST /v1/admin/reload), one reload at a time.

Read top to bottom:

1. checks that read only small files (checkpoints.py): the folder, its config and
   safetensors headers against the serving model's, its tokenizer against ours;
2. a second backend of the same kind on the new weights (`Backend.load_beside`),
   built while the old one keeps serving when the device has room for both; else
   *drained* first: no new batch starts, the batch in flight finishes, the old
   backend is freed, the new one loads, and the queued requests wait (they are not
   failed). vLLM always drains: its engine holds a fixed share of the device;
3. the new weights must score the warm-up item with finite likelihoods;
4. the swap happens inside `Batcher.drained()`, between backend calls, so a batch
   in flight finishes on the old weights and every batch (a request's trajectories
   never span two) is scored by one model, which it reports. Nothing computed with
   the old weights is reused: the new backend starts with empty caches.

Any failure raises a ReloadError and the old weights keep serving. If they were
already freed and cannot be read back from their unchanged folder, BackendDeadError:
the process exits for its orchestrator to restart it.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from .backends.base import Backend, BackendDeadError
from .batching import Batcher
from .checkpoints import (
    Checkpoint,
    IncompatibleModel,
    InvalidCheckpoint,
    ReloadError,
    ReloadInProgress,
    ReloadUnsupported,
    check_architecture,
    inspect_checkpoint,
    tokenizer_difference,
)
from .credit import NonFiniteError, mig_credit, shape_problem
from .models import weights_revision
from .probes import TrajectoryProbes
from .protocol import ModelInfo

__all__ = ["Reloader", "ReloadOutcome"]

log = logging.getLogger(__name__)

# A second copy of the weights loads beside the first only with this much room to spare
# (activations of the batches that keep running, the loader's transient buffers).
BESIDE_HEADROOM = 1.25


@dataclass(frozen=True)
class ReloadOutcome:
    model: ModelInfo
    previous_revision: str | None
    mode: str
    """`beside` (loaded while the old weights served) or `drain` (after they were freed)."""
    load_s: float


class Reloader:
    def __init__(
        self,
        batcher: Batcher,
        tokenizer: object,
        on_tokenizer_thread: Callable[..., Awaitable],
        warm_probes: Callable[[], TrajectoryProbes],
    ) -> None:
        """`tokenizer` is the scorer's, used only through `on_tokenizer_thread` (which
        runs a function on the thread that owns it); `warm_probes` builds the warm-up
        item's probes there."""
        self.batcher = batcher
        self.tokenizer = tokenizer
        self._on_tokenizer_thread = on_tokenizer_thread
        self._warm_probes = warm_probes
        self.lock = asyncio.Lock()
        self.serving: Checkpoint | None = None
        """The serving weights' folder, inspected when they were loaded."""

    async def note_serving(self) -> None:
        """Inspect the serving folder now, while it still holds the weights that serve."""
        if self.batcher.backend.reload_refusal is None:
            try:
                self.serving = await asyncio.to_thread(self._inspect_serving)
            except InvalidCheckpoint as exc:  # the model serves; only a reload will need this
                log.warning("a reload will inspect the serving folder again: %s", exc)

    def _inspect_serving(self) -> Checkpoint:
        # The operator may start the service on pickled weights; a reload never reads them.
        return inspect_checkpoint(Path(self.batcher.backend.info.path).resolve(), require_safetensors=False)

    async def reload(self, path: Path, revision: str | None = None, *, root: Path | None = None) -> ReloadOutcome:
        backend = self.batcher.backend
        if backend.reload_refusal is not None:
            raise ReloadUnsupported(backend.reload_refusal)
        if self.lock.locked():
            raise ReloadInProgress("another reload is running; this one was not started")
        async with self.lock:
            started = time.perf_counter()
            # 1. checks
            if self.serving is None:  # a scorer that was never started
                self.serving = await asyncio.to_thread(self._inspect_serving)
            serving = self.serving
            new = await asyncio.to_thread(inspect_checkpoint, path, root=root)
            check_architecture(serving, new)
            tokenizer, warm = await self._on_tokenizer_thread(self._tokenizer_and_warm_up, new)
            revision = revision or new.fingerprint
            previous = backend.info
            # 2-4. load, check, swap
            mode = await self._swap(backend, new, revision, tokenizer, warm)
            self.serving = new
            log.info("reloaded (%s): %s -> %s from %s", mode, previous.revision, revision, new.path)
            return ReloadOutcome(self.batcher.backend.info, previous.revision, mode, time.perf_counter() - started)

    def _tokenizer_and_warm_up(self, new: Checkpoint) -> tuple[object, TrajectoryProbes]:
        """On the tokenizer's thread: refuse a tokenizer that differs from ours; return a
        private copy of ours for the new backend, and the warm-up item's probes."""
        if new.has_tokenizer:
            from transformers import AutoTokenizer

            try:
                theirs = AutoTokenizer.from_pretrained(new.path)
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
                raise InvalidCheckpoint(f"the tokenizer at {new.path} does not load: {reason}") from None
            difference = tokenizer_difference(self.tokenizer, theirs)
            if difference:
                raise IncompatibleModel(f"the checkpoint's tokenizer differs from the serving one: {difference}")
        return copy.deepcopy(self.tokenizer), self._warm_probes()

    async def _swap(self, old: Backend, new: Checkpoint, revision: str, tokenizer, warm) -> str:
        needed = old.weights_bytes(new.parameters)
        free = await asyncio.to_thread(old.memory_available)
        if needed is not None and free is not None and needed * BESIDE_HEADROOM <= free:
            fresh = await load_checked(old, new.path, revision, tokenizer, warm)
            async with self.batcher.drained():  # the batch in flight finishes on the old weights
                self.batcher.backend = fresh
            await old.aclose()
            return "beside"
        log.info("reload: the new weights need %s bytes, %s are free: loading after the old ones", needed, free)
        async with self.batcher.drained():
            await old.aclose()
            try:
                self.batcher.backend = await load_checked(old, new.path, revision, tokenizer, warm)
            except Exception:
                self.batcher.backend = await self._load_again(old, tokenizer, warm)
                raise
        return "drain"

    async def _load_again(self, old: Backend, tokenizer, warm) -> Backend:
        """The freed old weights, read again from their folder if it is unchanged."""
        path = Path(old.info.path)
        if self.serving is not None and await asyncio.to_thread(weights_revision, path) != self.serving.fingerprint:
            reason = f"{path} has changed since they were loaded"
        else:
            try:
                return await load_checked(old, path, old.info.revision or "", tokenizer, warm)
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
        raise BackendDeadError(
            f"a reload failed after the old weights were freed, and they cannot be read again: {reason}"
        )


async def load_checked(like: Backend, path: Path, revision: str, tokenizer, warm: TrajectoryProbes) -> Backend:
    """A backend like `like` on the weights at `path`, checked on the warm-up item."""
    try:
        fresh = await asyncio.to_thread(like.load_beside, path, revision=revision, tokenizer=tokenizer)
        await fresh.start()
    except Exception as exc:
        raise load_failure(path, exc) from exc
    try:
        await check_warm_up(fresh, warm)
    except BaseException:
        await fresh.aclose()
        raise
    return fresh


async def check_warm_up(backend: Backend, warm: TrajectoryProbes) -> None:
    """New weights serve only if they score the warm-up item with finite likelihoods."""
    out = await backend.loglikelihoods([warm])
    result = out.results[0] if len(out.results) == 1 else RuntimeError(f"{len(out.results)} results for 1")
    if isinstance(result, Exception):
        raise InvalidCheckpoint(f"the new weights failed the warm-up item: {result}")
    problem = shape_problem(result, len(warm.contexts), len(warm.references))
    if problem:
        raise InvalidCheckpoint(f"the new weights failed the warm-up item: {problem}")
    try:
        mig_credit(result)
    except NonFiniteError as exc:
        raise InvalidCheckpoint(f"the new weights score the warm-up item with a non-finite likelihood: {exc}") from None


def load_failure(path: Path, exc: Exception) -> ReloadError:
    """What to answer for an exception raised while loading: the checkpoint's fault,
    except running out of memory."""
    if isinstance(exc, ReloadError):
        return exc
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return ReloadError(f"out of memory loading {path}: {exc}")
    return InvalidCheckpoint(f"the weights at {path} do not load: {type(exc).__name__}: {exc}")
