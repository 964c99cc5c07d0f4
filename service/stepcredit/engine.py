"""The Scorer: items in, results out. No HTTP here.

Data path for one batch (read top to bottom):

1. prepare: user regexes (`regex` format) in the pattern worker processes, then
   on one thread (HF tokenizers must not be shared across threads): options ->
   prompt -> structure -> steps -> probe token ids, each item bounded by the cost
   model (probes x reference tokens) before any model work. Requests take turns
   on that thread in slices of `_PREPARE_SLICE_S`;
2. verify the extracted answers in worker processes, concurrently with
3. the backend's log-likelihoods for every probe and reference;
4. credit: watermark, gains, outcome, gates -> one ScoreResult per item.

Each request is one `owner` to the pattern and verify pools, which share their
workers fairly between requests (see workers.py).

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
from .batching import Batcher, Overloaded, estimate_tokens
from .config import Settings
from .credit import NonFiniteError, mig_credit, outcome_reward, shape_problem
from .media import MediaError, decode_image, item_images
from .patterns import PatternJob, PatternPool
from .probes import (
    ProbeError,
    ProbeImage,
    ProbeMedia,
    TrajectoryProbes,
    check_completion_ids,
    check_context,
    ids_probes,
    text_probes,
)
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

# How long one request prepares before the next request's items get the thread: a
# 512-item request must not hold a one-item request for its whole preparation.
_PREPARE_SLICE_S = 0.02

# Default of `max_probe_tokens_per_item`. Measured with SmolLM2 (hf packed) on the 2-core
# CPU, a one-item request sent beside one item of 512 probe tokens waited 3-5 s, beside
# 1,024 8-11 s. 512 would refuse ordinary items (34 steps x 3 answer forms of 4 + 6 + 9
# tokens is 665), so the CPU allows twice that; a GPU is about 100x faster.
_PROBE_TOKENS_CPU = 1024
_PROBE_TOKENS_ACCELERATED = 32_768


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
    def __init__(
        self,
        backend: Backend,
        settings: Settings,
        verifier: VerifierPool | None = None,
        patterns: PatternPool | None = None,
    ) -> None:
        self.settings = settings
        self.tokenizer = backend.tokenizer
        self.verifier = verifier or VerifierPool(
            workers=settings.verify_workers,
            timeout_s=settings.verify_timeout_s,
            memory_limit_mb=settings.verify_memory_mb,
        )
        self.patterns = patterns or PatternPool(
            workers=settings.pattern_workers,
            timeout_s=settings.pattern_timeout_s,
            budget_s=settings.max_pattern_s_per_request,
            memory_limit_mb=settings.pattern_memory_mb,
        )
        self._prepare_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare")
        self.batcher = Batcher(
            backend,
            max_batch_tokens=settings.batch_max_tokens,
            max_wait_s=settings.batch_max_wait_ms / 1000,
            max_queued=settings.max_queued_items,
            max_queued_tokens=settings.max_queued_tokens,
            max_wait_for_scores_s=settings.max_queue_wait_s,
            max_inflight=backend.max_inflight_batches,
        )
        self.ready = False
        self.reloader = Reloader(self.batcher, self.tokenizer, self._on_prepare_thread, self._warm_probes)

    @property
    def backend(self) -> Backend:
        """The backend that scores the next batch (a reload swaps it in the batcher)."""
        return self.batcher.backend

    @property
    def max_probe_tokens(self) -> int:
        """The cost model's limit per item: the setting, else by where the model runs."""
        if self.settings.max_probe_tokens_per_item is not None:
            return self.settings.max_probe_tokens_per_item
        return _PROBE_TOKENS_CPU if self.backend.info.device == "cpu" else _PROBE_TOKENS_ACCELERATED

    @property
    def queue_depth(self) -> int:
        """Trajectories waiting for the backend."""
        return self.batcher.queued

    async def start(self) -> None:
        await self.backend.start()
        await asyncio.to_thread(self.verifier.start)
        await asyncio.to_thread(self.patterns.start)
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
        self.patterns.close()
        self._prepare_pool.shutdown(wait=False, cancel_futures=True)
        await self.backend.aclose()

    # ----------------------------------------------------------------- reload

    async def reload(self, path: Path, revision: str | None = None, *, root: Path | None = None) -> ReloadOutcome:
        """Score with the weights at `path` from the next batch on (see reload.py)."""
        return await self.reloader.reload(path, revision, root=root)

    async def _on_prepare_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._prepare_pool, fn, *args)

    def _warm_probes(self) -> TrajectoryProbes:
        return self._prepare(_WARM_ITEM, None, None).probes

    # ------------------------------------------------------------------ score

    async def score(self, items: Sequence[ScoreItem], options: ItemOptions | None = None) -> ScoreBatch:
        """Score a batch; raises Overloaded when the queue is full: before any work when
        it is full already, else once the items are prepared and their size is known."""
        self.batcher.check_capacity(len(items))
        started = time.perf_counter()
        items = list(items)
        request = object()  # this request's key in the worker pools' fair hand-out

        # 1. prepare: user regexes first (only requests with regex items wait for them).
        structures = await self._parse_patterns(items, options, request)
        prepared = await self._prepare_in_turns(items, options, structures)
        timings = {"prepare_s": time.perf_counter() - started}
        # Admission, now that the request's real size is known (raises Overloaded).
        probe_owner = [i for i, p in enumerate(prepared) if isinstance(p, _Prepared) and p.probes is not None]
        if probe_owner:  # items without probes never wait for the backend
            self.batcher.admit(len(probe_owner), sum(estimate_tokens(prepared[i].probes) for i in probe_owner))

        # 2. verification runs while the model works.
        verdicts = {
            i: asyncio.ensure_future(
                self.verifier.verify(p.structure.answer, p.item.references, p.options.verify_timeout_s, request)
            )
            for i, p in enumerate(prepared)
            if isinstance(p, _Prepared)
        }
        # 3. the batcher coalesces these probes with other requests' into backend calls.
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
        try:
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
        except BaseException:  # cancelled (the client went away): its answers free their workers
            for task in verdicts.values():
                task.cancel()
            raise
        usage.items_ok = sum(r.status == "ok" for r in results)
        usage.items_error = len(results) - usage.items_ok
        timings["total_s"] = time.perf_counter() - started
        return ScoreBatch(results, usage, timings, model or self.backend.info)

    # ---------------------------------------------------------------- prepare

    async def _parse_patterns(
        self, items: list[ScoreItem], options: ItemOptions | None, owner: object
    ) -> dict[int, Structure | StructureError]:
        """The structure of every `regex` item, from the pattern workers."""
        eos = getattr(self.tokenizer, "eos_token", None)
        jobs = {}
        for i, item in enumerate(items):
            try:
                opts = resolve_options(self.settings, options, item.options)
            except StructureError:
                continue  # preparation reports it
            if opts.format == "regex":
                jobs[i] = PatternJob(item.completion, eos, opts.cot_pattern, opts.answer_pattern)
        return await self.patterns.parse(jobs, owner) if jobs else {}

    async def _prepare_in_turns(
        self, items: list[ScoreItem], options: ItemOptions | None, structures: dict[int, Structure | StructureError]
    ) -> list[_Prepared | ScoreResult]:
        # Each request has at most one slice queued on the one-thread executor, so
        # concurrent requests alternate (and a cancelled one stops after its slice).
        loop = asyncio.get_running_loop()
        out: list[_Prepared | ScoreResult] = []
        while len(out) < len(items):
            out += await loop.run_in_executor(
                self._prepare_pool, self._prepare_all, items, options, structures, len(out), _PREPARE_SLICE_S
            )
        return out

    def _prepare_all(
        self,
        items: list[ScoreItem],
        options: ItemOptions | None,
        structures: dict[int, Structure | StructureError] | None = None,
        start: int = 0,
        slice_s: float | None = None,
    ) -> list[_Prepared | ScoreResult]:
        """Prepare items[start:], or as many of them as fit in `slice_s` (at least one)."""
        out: list[_Prepared | ScoreResult] = []
        until = None if slice_s is None else time.perf_counter() + slice_s
        for i in range(start, len(items)):
            item = items[i]
            try:
                out.append(self._prepare(item, options, (structures or {}).get(i)))
            except (ProbeError, StructureError) as exc:
                out.append(ScoreResult.failure(item.id, exc.code, str(exc)))
            if until is not None and time.perf_counter() >= until:
                break
        return out

    def _render_prompt(self, item: ScoreItem) -> tuple[str, ProbeMedia | None]:
        """The prompt text, with each image's placeholder expanded to its pad tokens, and
        the images (None for an item without any)."""
        try:
            refs = item_images(item, self.settings, "item")
        except MediaError as exc:  # parse_item checked it already; the limits may have moved
            raise ProbeError(exc.code, str(exc)) from None
        vision = getattr(self.backend, "vision", None)
        if refs and vision is None:
            raise ProbeError(
                "images_unsupported", f"the scoring model ({self.backend.info.name}) takes no images: it is text-only"
            )
        if item.prompt is not None:
            prompt = item.prompt
        else:
            prompt = self._render_messages(item, vision is not None)
        if vision is None:
            return prompt, None
        # Vision tokens stand for pixels: only the placeholders may hold them (a stray pad
        # in the prompt, completion or a reference would shift every image's embeddings).
        vision.check_text(item.completion, "completion")
        for j, reference in enumerate(item.references):
            vision.check_text(reference, f"references[{j}]")
        ids = item.completion_token_ids or ()
        if vision.reserved_ids.intersection(ids):
            raise ProbeError("invalid_item", "completion_token_ids hold a vision token, which only an image may fill")
        if not refs:
            return vision.place(prompt, []), None
        decoded = []
        for ref in refs:
            try:
                decoded.append(decode_image(ref))
            except MediaError as exc:
                raise ProbeError(exc.code, str(exc)) from None
        processed = vision.process(decoded)
        prompt = vision.place(prompt, [p.grid_thw for p in processed], generic=item.prompt is not None)
        images = tuple(
            ProbeImage(ref.data_uri, image, ref.digest, p.grid_thw, p.pixel_values)
            for ref, image, p in zip(refs, decoded, processed, strict=True)
        )
        return prompt, ProbeMedia(images)

    def _render_messages(self, item: ScoreItem, takes_images: bool) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ProbeError("no_chat_template", "the scorer's tokenizer has no chat template: send `prompt`")
        messages = []
        for message in item.messages:
            content = message.content
            if not isinstance(content, str):
                parts = [part.model_dump(exclude_none=True) for part in content]
                if takes_images:
                    # Every chat template of a VL family knows a bare image part; the data
                    # itself never goes into the template.
                    content = [
                        {"type": "text", "text": p["text"]} if p["type"] == "text" else {"type": "image"}
                        for p in parts
                    ]
                else:  # text parts only (images were refused above): joined by newlines, as vLLM's renderer does
                    content = "\n".join(p["text"] for p in parts)
            messages.append({"role": message.role, "content": content})
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # a template may raise on unexpected roles
            raise ProbeError("invalid_messages", f"chat template failed: {exc}") from None

    def _prepare(
        self, item: ScoreItem, request_options: ItemOptions | None, parsed: Structure | StructureError | None
    ) -> _Prepared:
        """`parsed`: the pattern workers' answer for a `regex` item (None for the other formats)."""
        opts = resolve_options(self.settings, request_options, item.options)
        if isinstance(parsed, StructureError):
            raise parsed
        if opts.format == "regex" and parsed is None:
            # User patterns never run on this shared thread (see patterns.py).
            raise RuntimeError("a regex item reached preparation without its structure")
        prompt, media = self._render_prompt(item)
        text = item.completion
        if parsed is None:
            parsed = parse_structure(text, opts.format, eos_text=getattr(self.tokenizer, "eos_token", None))
        structure = parsed
        ids = item.completion_token_ids
        if structure.cot_span is None:
            if ids is not None:
                check_completion_ids(self.tokenizer, text, ids)
            return _Prepared(item, opts, structure, [], False, None, None)

        steps, truncated = split_steps(text, structure.cot_span, opts.step_split, opts.max_steps)
        cut_0 = steps[0][0] if steps else structure.cot_span[1]
        spans = None
        max_context = self.backend.info.max_context
        # The cost model bounds the item before its contexts are even tokenized.
        max_probe_tokens = self.max_probe_tokens
        if ids is None:
            cuts = [cut_0] + [end for _, end in steps]
            probes = text_probes(
                self.tokenizer,
                prompt,
                text,
                cuts,
                opts.probe_prefix,
                item.references,
                max_probe_tokens=max_probe_tokens,
                max_context=max_context,
                media=media,
            )
        else:
            probes, spans = ids_probes(
                self.tokenizer,
                prompt,
                text,
                ids,
                cut_0,
                steps,
                opts.probe_prefix,
                item.references,
                max_probe_tokens=max_probe_tokens,
                media=media,
            )
        if any(not ctx for ctx in probes.contexts):
            raise ProbeError("empty_context", "a probe has no token to condition on (empty prompt and prefix)")
        check_context(probes.longest_sequence, max_context)
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
