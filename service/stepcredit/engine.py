"""The Scorer: items in, results out. No HTTP here.

Data path for one batch (read top to bottom):

1. prepare (one worker thread, since HF tokenizers must not be shared across
   threads): options -> prompt -> structure -> steps -> probe token ids;
2. verify the extracted answers in worker processes, concurrently with
3. the backend's log-likelihoods for every probe and reference;
4. credit: watermark, gains, outcome, gates -> one ScoreResult per item.

`reload` swaps in new weights between backend calls (POST /v1/admin/reload); each
batch reports the model that scored it.

An item that cannot be scored gets `status: "error"` with a code; it never
gets a made-up number, and the other items are still scored.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .backends.base import Backend, BackendDeadError
from .batching import Batcher, Overloaded
from .config import Settings
from .credit import NonFiniteError, mig_credit, outcome_reward, shape_problem
from .probes import ProbeError, TrajectoryProbes, check_completion_ids, ids_probes, text_probes
from .protocol import ItemOptions, ModelInfo, ScoreItem, ScoreResult, StepResult, Usage
from .reload import Reloader, ReloadOutcome
from .structure import (
    BOXED_PROBE_PREFIX,
    THINK_PROBE_PREFIX,
    Structure,
    StructureError,
    parse_structure,
    split_steps,
)
from .verify import VerifierPool, Verdict, VerifyError

__all__ = ["Scorer", "ScoreBatch", "Overloaded", "ReloadOutcome", "ResolvedOptions", "resolve_options"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedOptions:
    format: str
    cot_pattern: str | None
    answer_pattern: str | None
    step_split: str
    max_steps: int
    probe_prefix: str
    acc_weight: float
    format_weight: float
    verify_timeout_s: float


def resolve_options(settings: Settings, *layers: ItemOptions | None) -> ResolvedOptions:
    """Defaults, then request options, then item options: the last one set wins."""
    merged: dict = {
        "format": settings.default_format,
        "cot_pattern": None,
        "answer_pattern": None,
        "step_split": settings.default_step_split,
        "max_steps": settings.default_max_steps,
        "probe_prefix": None,
        "acc_weight": settings.default_acc_weight,
        "format_weight": settings.default_format_weight,
        "verify_timeout_s": settings.verify_timeout_s,
    }
    for layer in layers:
        if layer is not None:
            merged.update(layer.model_dump(exclude_none=True))
    # One item's slow answer may not hold a verify worker longer than the server allows.
    merged["verify_timeout_s"] = min(merged["verify_timeout_s"], settings.max_verify_timeout_s)
    if merged["probe_prefix"] is None:
        defaults = {"think_answer": THINK_PROBE_PREFIX, "boxed": BOXED_PROBE_PREFIX}
        if merged["format"] not in defaults:
            raise StructureError("format `regex` needs an explicit `probe_prefix`")
        merged["probe_prefix"] = defaults[merged["format"]]
    return ResolvedOptions(**merged)


@dataclass
class _Prepared:
    item: ScoreItem
    options: ResolvedOptions
    structure: Structure
    steps: list[tuple[int, int]]
    truncated: bool
    token_spans: list[tuple[int, int]] | None
    probes: TrajectoryProbes | None


@dataclass
class ScoreBatch:
    results: list[ScoreResult]
    usage: Usage
    timings: dict[str, float] = field(default_factory=dict)
    model: ModelInfo | None = None
    """The model that computed every likelihood of the batch (the serving one when no
    item needed the model)."""


# Scores the warm-up at start and checks new weights before they serve.
_WARM_ITEM = ScoreItem(
    prompt="1+1=",
    completion="<think>\nadd\n</think>\n<answer>2</answer>",
    references=["2"],
    options=ItemOptions(format="think_answer", step_split="lines", max_steps=1),
)


class Scorer:
    def __init__(self, backend: Backend, settings: Settings, verifier: VerifierPool | None = None) -> None:
        self.settings = settings
        self.tokenizer = backend.tokenizer
        self.verifier = verifier or VerifierPool(
            workers=settings.verify_workers,
            timeout_s=settings.verify_timeout_s,
            memory_limit_mb=settings.verify_memory_mb,
        )
        self._prepare_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare")
        self.batcher = Batcher(
            backend,
            max_batch_tokens=settings.batch_max_tokens,
            max_wait_s=settings.batch_max_wait_ms / 1000,
            max_queued=settings.max_queued_items,
            max_inflight=backend.max_inflight_batches,
        )
        self.ready = False
        self.reloader = Reloader(self.batcher, self.tokenizer, self._on_prepare_thread, self._warm_probes)

    @property
    def backend(self) -> Backend:
        """The backend that scores the next batch (a reload swaps it in the batcher)."""
        return self.batcher.backend

    @property
    def queue_depth(self) -> int:
        """Trajectories waiting for the backend."""
        return self.batcher.queued

    async def start(self) -> None:
        await self.backend.start()
        await asyncio.to_thread(self.verifier.start)
        batch = await self.score([_WARM_ITEM])
        if batch.results[0].status != "ok":
            raise RuntimeError(f"warm-up scoring failed: {batch.results[0].error}")
        await self.reloader.note_serving()
        self.ready = True

    async def close(self) -> None:
        self.ready = False
        async with self.reloader.lock:  # a reload in progress finishes (its swap included) first
            pass
        await self.batcher.close()
        self.verifier.close()
        self._prepare_pool.shutdown(wait=False, cancel_futures=True)
        await self.backend.aclose()

    # ----------------------------------------------------------------- reload

    async def reload(self, path: Path, revision: str | None = None, *, root: Path | None = None) -> ReloadOutcome:
        """Score with the weights at `path` from the next batch on (see reload.py)."""
        return await self.reloader.reload(path, revision, root=root)

    async def _on_prepare_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._prepare_pool, fn, *args)

    def _warm_probes(self) -> TrajectoryProbes:
        return self._prepare(_WARM_ITEM, None).probes

    # ------------------------------------------------------------------ score

    async def score(self, items: Sequence[ScoreItem], options: ItemOptions | None = None) -> ScoreBatch:
        """Score a batch; raises Overloaded (before any work) when the queue is full."""
        self.batcher.check_capacity(len(items))
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        prepared = await loop.run_in_executor(self._prepare_pool, self._prepare_all, list(items), options)
        timings = {"prepare_s": time.perf_counter() - started}

        # 2. verification runs while the model works.
        verdicts = {
            i: asyncio.ensure_future(
                self.verifier.verify(p.structure.answer, p.item.references, p.options.verify_timeout_s)
            )
            for i, p in enumerate(prepared)
            if isinstance(p, _Prepared)
        }
        # 3. the batcher coalesces these probes with other requests' into backend calls.
        probe_owner = [i for i, p in enumerate(prepared) if isinstance(p, _Prepared) and p.probes is not None]
        usage = Usage(items=len(items))
        model = None
        logliks: dict[int, list[list[float]] | Exception] = {}
        if probe_owner:
            t0 = time.perf_counter()
            try:
                out = await self.batcher.submit([prepared[i].probes for i in probe_owner])
            except Exception as exc:
                if isinstance(exc, BackendDeadError | Overloaded):
                    for task in verdicts.values():
                        task.cancel()
                    raise
                # Only this batch failed: its items get an error, never a 500.
                log.exception("backend batch failed")
                logliks = {i: exc for i in probe_owner}
            except BaseException:  # cancelled (the client went away)
                for task in verdicts.values():
                    task.cancel()
                raise
            else:
                timings["backend_s"] = time.perf_counter() - t0
                model = out.model
                usage.tokens_forwarded, usage.forward_passes = out.tokens_forwarded, out.forward_passes
                if len(out.results) != len(probe_owner):
                    short = RuntimeError(
                        f"the backend returned {len(out.results)} results for {len(probe_owner)} trajectories"
                    )
                    logliks = {i: short for i in probe_owner}
                else:
                    logliks = dict(zip(probe_owner, out.results, strict=True))

        results = []
        for i, p in enumerate(prepared):
            if isinstance(p, ScoreResult):
                results.append(p)
                continue
            try:
                verdict = await verdicts[i]
            except VerifyError as exc:
                results.append(ScoreResult.failure(p.item.id, "verify_failed", str(exc)))
                continue
            result = self._assemble(p, logliks.get(i), verdict)
            if result.status == "ok" and p.probes is not None:
                usage.probes += len(p.probes.contexts)
                usage.reference_probes += len(p.probes.contexts) * len(p.probes.references)
            results.append(result)
        usage.items_ok = sum(r.status == "ok" for r in results)
        usage.items_error = len(results) - usage.items_ok
        timings["total_s"] = time.perf_counter() - started
        return ScoreBatch(results, usage, timings, model or self.backend.info)

    # ---------------------------------------------------------------- prepare

    def _prepare_all(self, items: list[ScoreItem], options: ItemOptions | None) -> list[_Prepared | ScoreResult]:
        out: list[_Prepared | ScoreResult] = []
        for item in items:
            try:
                out.append(self._prepare(item, options))
            except ProbeError as exc:
                out.append(ScoreResult.failure(item.id, exc.code, str(exc)))
            except StructureError as exc:
                out.append(ScoreResult.failure(item.id, "invalid_options", str(exc)))
        return out

    def _render_prompt(self, item: ScoreItem) -> str:
        if item.prompt is not None:
            return item.prompt
        if not getattr(self.tokenizer, "chat_template", None):
            raise ProbeError("no_chat_template", "the scorer's tokenizer has no chat template: send `prompt`")
        try:
            return self.tokenizer.apply_chat_template(
                [m.model_dump() for m in item.messages], tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:  # a template may raise on unexpected roles
            raise ProbeError("invalid_messages", f"chat template failed: {exc}") from None

    def _prepare(self, item: ScoreItem, request_options: ItemOptions | None) -> _Prepared:
        opts = resolve_options(self.settings, request_options, item.options)
        prompt = self._render_prompt(item)
        text = item.completion
        structure = parse_structure(
            text,
            opts.format,
            eos_text=getattr(self.tokenizer, "eos_token", None),
            cot_pattern=opts.cot_pattern,
            answer_pattern=opts.answer_pattern,
        )
        ids = item.completion_token_ids
        if structure.cot_span is None:
            if ids is not None:
                check_completion_ids(self.tokenizer, text, ids)
            return _Prepared(item, opts, structure, [], False, None, None)

        steps, truncated = split_steps(text, structure.cot_span, opts.step_split, opts.max_steps)
        cut_0 = steps[0][0] if steps else structure.cot_span[1]
        spans = None
        if ids is None:
            cuts = [cut_0] + [end for _, end in steps]
            probes = text_probes(self.tokenizer, prompt, text, cuts, opts.probe_prefix, item.references)
        else:
            probes, spans = ids_probes(
                self.tokenizer, prompt, text, ids, cut_0, steps, opts.probe_prefix, item.references
            )
        if any(not ctx for ctx in probes.contexts):
            raise ProbeError("empty_context", "a probe has no token to condition on (empty prompt and prefix)")
        if probes.longest_sequence > self.backend.info.max_context:
            raise ProbeError(
                "context_too_long",
                f"the longest probe is {probes.longest_sequence} tokens, "
                f"the model takes {self.backend.info.max_context}",
            )
        return _Prepared(item, opts, structure, steps, truncated, spans, probes)

    # --------------------------------------------------------------- assemble

    def _assemble(
        self, p: _Prepared, logliks: list[list[float]] | Exception | None, verdict: Verdict
    ) -> ScoreResult:
        if isinstance(logliks, Exception):
            return ScoreResult.failure(p.item.id, "backend_error", str(logliks) or type(logliks).__name__)
        if p.probes is not None:
            # A result for every probe and every reference, or none at all: a short
            # answer must never read as "no chain of thought".
            problem = shape_problem(logliks, len(p.probes.contexts), len(p.probes.references))
            if problem:
                return ScoreResult.failure(p.item.id, "backend_error", problem)
        format_ok = p.structure.format_ok
        result = ScoreResult(
            id=p.item.id,
            status="ok",
            format_ok=format_ok,
            correct=verdict.correct,
            verify_timeout=verdict.timed_out,
            extracted_answer=p.structure.answer,
            matched_reference=verdict.matched_reference,
            outcome_reward=outcome_reward(verdict.correct, format_ok, p.options.acc_weight, p.options.format_weight),
            mig_reward=0.0,
            baseline_loglik=None,
            format_gate=format_ok,
            correctness_gate=verdict.correct,
            sft_gate=format_ok and verdict.correct,
            cot_span=p.structure.cot_span,
            tokenization="text" if p.item.completion_token_ids is None else "ids",
            steps_truncated=p.truncated,
        )
        if logliks is None:  # no COT region: no probes, K = 0
            return result
        try:
            credit = mig_credit(logliks)
        except NonFiniteError as exc:  # e.g. float16 overflow: never a gain of 0 with status ok
            return ScoreResult.failure(p.item.id, "backend_error", f"non-finite likelihood: {exc}")
        result.mig_reward = credit.mig_reward
        result.baseline_loglik = credit.baseline_loglik
        for k, ((start, end), step) in enumerate(zip(p.steps, credit.steps, strict=True)):
            token_start, token_end = p.token_spans[k] if p.token_spans else (None, None)
            result.steps.append(
                StepResult(
                    index=k + 1,
                    char_start=start,
                    char_end=end,
                    token_start=token_start,
                    token_end=token_end,
                    loglik=step.loglik,
                    best_reference=step.best_reference,
                    watermark=step.watermark,
                    gain=step.gain,
                )
            )
        return result
