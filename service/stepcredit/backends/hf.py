"""PyTorch / transformers backend with two probe strategies.

`per-prefix` runs one right-padded sequence per (probe, reference): the plain
reference implementation. `packed` runs all probes of a trajectory in ONE
sequence: the trajectory's tokens form a trunk, and each probe is a branch
(probe-prefix tokens, then one sub-branch per reference) that sees the trunk
up to its branch point and itself only, with positions continuing from the
branch point. A 4-D boolean mask encodes the tree, so the cost is about
L + (K+1)·(P + Σ_v A_v) tokens instead of about (K+1)·V·L/2.

Across the trajectories of one batch, `packed` also computes shared leading
tokens once: segments whose first c tokens agree (a GRPO group's prompt, a
common system prompt, the trunk of a trajectory split over several segments)
get those tokens' keys and values from one forward pass of the prefix, and
forward only their remainders on top of it.

What runs together is decided by the pure planner in `packing.py`; this module
only executes the plan. `packed` is used only where the tree mask expresses the
model's attention exactly (`packing_rule`): sliding-window layers shorter than a
trajectory, hybrid or linear-attention layers and position scaling that depends
on the row length send trajectories to `per-prefix`, under the model's own masks.

Only the positions that predict a reference token are projected to the
vocabulary, and log-probabilities are computed in float32 whatever the model
dtype. At load, that projection is checked against the model's own forward
logits (`check_head`), so a head with scaling the fast path misses is refused
instead of giving silently different numbers.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoints import IncompatibleModel, available_memory
from ..probes import TrajectoryProbes
from ..models import weights_revision
from ..protocol import ModelInfo
from ..vision import Vision, load_vision
from .base import Abandoned, Backend, BackendDeadError, BackendError, BatchLogliks, abandoned_error
from .packing import PackingRule, Segment, plan_batch

__all__ = ["HFBackend", "resolve_device", "packing_rule", "HeadMismatchError", "NonFiniteModelError"]

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available")
    return resolved


# Config keys that only models with recurrent or linear-attention layers carry.
_RECURRENT_KEYS = ("mamba", "ssm_", "linear_num", "linear_key", "conv_l_cache", "full_attn_idxs", "attn_layer_period")
# Rotary scalings whose frequencies depend on the longest position in the forward pass.
_ROW_DEPENDENT_ROPE = {"dynamic", "longrope"}


def _rope_types(config) -> set[str]:
    found: set[str] = set()
    for name in ("rope_parameters", "rope_scaling"):
        value = getattr(config, name, None)
        stack = [value]
        while stack:
            item = stack.pop()
            if isinstance(item, dict):
                kind = item.get("rope_type", item.get("type"))
                if isinstance(kind, str):
                    found.add(kind)
                stack += [v for v in item.values() if isinstance(v, dict)]
    return found


def packing_rule(config) -> PackingRule:
    """Where `packed`'s tree mask is exact for this model (see `PackingRule`).

    The tree mask is one 4-D boolean mask for every layer: transformers uses a
    custom 4-D mask as it is, so sliding windows are not applied, and a layer
    with a recurrent state ignores the mask altogether.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layer_types = list(getattr(text, "layer_types", None) or [])
    other = sorted({t for t in layer_types if t not in ("full_attention", "sliding_attention")})
    keys = [k for k in text.to_dict() if any(mark in k.lower() for mark in _RECURRENT_KEYS)]
    if other or keys:
        what = f"layer types {other}" if other else f"recurrent or linear-attention layers ({keys[0]})"
        return PackingRule(packed=False, reason=f"{what}: the tree mask cannot express them")
    ropes = _rope_types(text) & _ROW_DEPENDENT_ROPE
    if ropes:
        return PackingRule(
            packed=False,
            one_row=True,
            reason=f"rotary scaling {sorted(ropes)} depends on the longest position in a forward pass",
        )
    window = getattr(text, "sliding_window", None)
    if layer_types:
        uses_window = "sliding_attention" in layer_types
    else:
        uses_window = bool(getattr(text, "use_sliding_window", True))
    if window and uses_window:
        return PackingRule(
            window=int(window),
            reason=f"sliding-window attention ({int(window)} tokens): longer trajectories run per-prefix",
        )
    return PackingRule()


def _rope_snapshot(model) -> list[tuple[object, dict, dict]]:
    """The loaded state of every rotary embedding that rescales itself."""
    state = []
    for module in model.modules():
        attrs = {k: v for k, v in vars(module).items() if k.endswith("max_seq_len_cached") or k == "attention_scaling"}
        buffers = {k: v.clone() for k, v in module.named_buffers(recurse=False) if k.endswith("inv_freq")}
        if buffers and any(k.endswith("max_seq_len_cached") for k in attrs):
            state.append((module, buffers, attrs))
    return state


def _attention_implementation(config) -> str:
    """SDPA takes the boolean 4-D tree mask as it is. It ignores attention-logit
    soft-capping (Gemma 2) without a word, and some models have no SDPA path at all
    (gpt-oss, whose attention sinks need eager): those run eager attention, which adds
    the mask to the scores, so the tree mask is then given as 0 / -inf."""
    from transformers import AutoModelForCausalLM

    if getattr(config.get_text_config(), "attn_logit_softcapping", None):
        return "eager"
    model_class = AutoModelForCausalLM._model_mapping.get(type(config), None)
    if model_class is not None and not getattr(model_class, "_supports_sdpa", True):
        return "eager"
    return "sdpa"


_UNLOADED = ("missing_keys", "mismatched_keys")


@dataclass
class _Visual:
    """A trajectory's encoded images and where they sit (hf.HFBackend._encode)."""

    embeds: torch.Tensor
    """[image pad tokens, hidden]: the vision tower's output, in prompt order."""
    positions: torch.Tensor
    """[3, end]: rotary positions (time, height, width) of the first `end` tokens."""
    slots: torch.Tensor
    """[end]: which row of `embeds` fills each of those tokens (-1: a text token)."""
    end: int
    """Tokens up to and including the last image pad."""
    delta: int
    """Token p >= end has position p + delta on all three axes."""


class HeadMismatchError(RuntimeError):
    """The fast vocabulary projection does not reproduce the model's own logits."""


class NonFiniteModelError(RuntimeError):
    """The model's own logits are NaN or infinite: its likelihoods would mean nothing."""


def _packed_mask(segments: Sequence[Segment], n: int, device: torch.device) -> torch.Tensor:
    """[B, 1, n, n] boolean tree mask; padding rows see only themselves."""
    meta = torch.full((5, len(segments), n), -1, dtype=torch.long)
    for b, seg in enumerate(segments):
        m = len(seg.ids)
        meta[0, b, :m] = torch.tensor(seg.trunk)
        meta[1, b, :m] = torch.tensor(seg.limit)
        meta[2, b, :m] = torch.tensor(seg.probe)
        meta[3, b, :m] = torch.tensor(seg.ref)
        meta[4, b, :m] = 0
        # Each padding slot is its own segment of one trunk token.
        meta[0, b, m:] = 0
        meta[1, b, m:] = 1
        meta[4, b, m:] = torch.arange(1, n - m + 1)
    trunk, limit, probe, ref, group = meta.to(device)
    q, k = (slice(None), slice(None), None), (slice(None), None, slice(None))  # [B, n, 1] / [B, 1, n]
    causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    sees_trunk = (trunk[k] >= 0) & (trunk[k] < limit[q])
    same_branch = (probe[k] >= 0) & (probe[k] == probe[q]) & ((ref[k] == -1) | (ref[k] == ref[q]))
    mask = causal & (group[q] == group[k]) & (sees_trunk | same_branch)
    return mask[:, None]


class HFBackend(Backend):
    def __init__(
        self,
        model_path: Path | str,
        *,
        strategy: str = "packed",
        device: str = "auto",
        dtype: str = "float32",
        max_batch_tokens: int = 4096,
        max_logit_rows: int = 2048,
        max_batch_rows: int = 64,
        share_min_tokens: int = 32,
        name: str | None = None,
        tokenizer: object | None = None,
        revision: str | None = None,
        safetensors_only: bool = False,
    ) -> None:
        """`tokenizer`: use this one instead of loading the folder's; `revision`: the
        name `/v1/model` reports (default: a fingerprint of the folder);
        `safetensors_only`: refuse pickled weights and any weight the folder lacks
        (a reload from a path a client named)."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

        if strategy not in ("packed", "per-prefix"):
            raise ValueError(f"unknown strategy {strategy!r}")
        self.device = resolve_device(device)
        self.dtype = _DTYPES[dtype]
        self.max_batch_tokens = max_batch_tokens
        self.max_logit_rows = max_logit_rows
        self.max_batch_rows = max_batch_rows
        # Shortest common prefix worth its own forward pass (0: never share).
        self.share_min_tokens = share_min_tokens
        # Largest share of padding a batched forward pass may carry. A CPU gains
        # almost nothing from wider batches (measured: padding only costs), a GPU
        # gains occupancy.
        self.max_padding = 0.02 if self.device.type == "cpu" else 0.2
        path = Path(model_path)
        # Kept to build a sibling on other weights (a reload).
        self._settings = dict(
            strategy=strategy, device=device, dtype=dtype, max_batch_tokens=max_batch_tokens,
            max_logit_rows=max_logit_rows, max_batch_rows=max_batch_rows, share_min_tokens=share_min_tokens,
        )  # fmt: skip
        self.tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(path)
        self.attention = _attention_implementation(AutoConfig.from_pretrained(path))
        # A vision-language model (Qwen2-VL, Qwen2.5-VL) loads through the image-text
        # auto class, with its image processor (vision.py).
        self.vision: Vision | None = load_vision(path, self.tokenizer)
        auto = AutoModelForCausalLM if self.vision is None else AutoModelForImageTextToText
        loaded = auto.from_pretrained(
            path,
            dtype=self.dtype,
            attn_implementation=self.attention,
            use_safetensors=True if safetensors_only else None,
            output_loading_info=safetensors_only,
        )
        if safetensors_only:
            loaded, loading = loaded
            # transformers leaves a weight the folder lacks (or holds in another shape) at
            # random initialization, with a warning only.
            problems = {k: sorted(map(str, v))[:3] for k, v in loading.items() if k in _UNLOADED and v}
            if problems:
                raise IncompatibleModel(f"the weights at {path} do not fit the model: {problems}")
        self.model = loaded
        self.model.to(self.device).eval()
        # Hidden states come from the decoder and only the rows that predict a reference
        # token go through the vocabulary head: the full logits of a long packed row
        # would take gigabytes.
        self._decoder = self.model.base_model
        # A VL model's text decoder takes embeddings (images scattered in) and
        # three-axis rotary positions; its vision tower runs once per trajectory.
        self._text = self._decoder.language_model if self.vision is not None else None
        self.encode_s = 0.0
        """Seconds spent encoding images (the benchmarks report its share)."""
        self.images_encoded = 0
        self._head = self.model.get_output_embeddings()
        self._rows = int(self.model.get_input_embeddings().weight.shape[0])
        config = self.model.config
        self.rule = packing_rule(config)
        self._rope_state = []
        if self.rule.one_row:
            self.max_batch_rows = 1
            self._rope_state = _rope_snapshot(self.model)
        self.strategy = strategy
        described = strategy
        if strategy == "packed" and self.rule.reason:
            if not self.rule.packed:
                self.strategy = described = "per-prefix"
                log.warning("packed falls back to per-prefix for this model: %s", self.rule.reason)
            else:
                described = f"packed (per-prefix beyond {self.rule.window} tokens)"
                log.warning("packed is limited for this model: %s", self.rule.reason)
        self.check_head()
        self.info = ModelInfo(
            name=name or config.name_or_path and Path(str(config.name_or_path)).name or path.name,
            path=str(path),
            backend="hf",
            strategy=described,
            device=str(self.device),
            dtype=dtype,
            vocab_size=int(config.get_text_config().vocab_size),
            max_context=int(getattr(config.get_text_config(), "max_position_embeddings", 0) or 1 << 30),
            revision=revision or weights_revision(path),
        )
        self._visuals: dict[int, _Visual] = {}
        # One thread owns the model: forward passes never overlap.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-forward")
        self._dead: BaseException | None = None

    # ----------------------------------------------------------- contract

    async def loglikelihoods(
        self, batch: Sequence[TrajectoryProbes], abandoned: Abandoned | None = None
    ) -> BatchLogliks:
        self.check_health()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.compute, list(batch), abandoned)

    def check_health(self) -> None:
        if self._dead is not None:
            raise BackendDeadError(f"the model backend failed: {self._dead}")

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._dead = self._dead or RuntimeError("the backend was shut down")
        for name in ("model", "_decoder", "_head", "_text"):  # every reference, so the memory is freed
            self.__dict__.pop(name, None)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ----------------------------------------------------------- reload

    reload_refusal = None
    drops_abandoned = True

    def load_beside(self, path: Path, *, revision: str, tokenizer: object) -> HFBackend:
        return HFBackend(path, **self._settings, tokenizer=tokenizer, revision=revision, safetensors_only=True)

    def weights_bytes(self, parameters: int) -> int | None:
        return parameters * torch.empty((), dtype=self.dtype).element_size()

    def memory_available(self) -> int | None:
        return available_memory(self.device)

    @torch.inference_mode()
    def check_head(self) -> None:
        """Refuse a model whose logits the fast path (decoder rows, then `_logits`)
        does not reproduce: compare both on a short input, as log-probabilities."""
        ids = self.tokenizer("The answer is 42, since 6 times 7 is 42.", return_tensors="pt")["input_ids"]
        ids = ids.to(self.device)
        full = torch.log_softmax(self.model(input_ids=ids).logits[0].float(), dim=-1)
        if not torch.isfinite(full).all():
            raise NonFiniteModelError(
                f"{type(self.model).__name__}: the model's own logits on a short input are not finite "
                "(NaN or infinite weights, or an overflow in this dtype): refusing to load"
            )
        hidden = self._decoder(input_ids=ids).last_hidden_state[0]
        fast = torch.log_softmax(self._logits(hidden), dim=-1)
        gap = (full - fast).abs().max().item()
        tolerance = 1e-3 if self.dtype == torch.float32 else 5e-2
        if not gap <= tolerance:  # also catches NaN
            raise HeadMismatchError(
                f"{type(self.model).__name__}: the vocabulary projection StepCredit uses differs from the "
                f"model's own logits by {gap:.3g} (tolerance {tolerance}); this head applies a transformation "
                "the fast path does not reproduce, so its likelihoods would be wrong: refusing to load"
            )

    # ----------------------------------------------------------- compute

    def compute(self, batch: Sequence[TrajectoryProbes], abandoned: Abandoned | None = None) -> BatchLogliks:
        """Blocking: ℓ_k(v) for every trajectory of the batch. A pass whose trajectories
        are all in `abandoned` (checked before each pass) is skipped."""
        abandoned = abandoned or Abandoned()
        plan = plan_batch(
            batch,
            strategy=self.strategy,
            rule=self.rule,
            max_tokens=self.max_batch_tokens,
            max_logit_rows=self.max_logit_rows,
            max_rows=self.max_batch_rows,
            max_padding=self.max_padding,
            share_min_tokens=self.share_min_tokens,
            vocab_rows=self._rows,
        )
        failed: dict[int, Exception] = {t: BackendError(reason) for t, reason in plan.failed.items()}
        sums = [[[0.0] * len(tr.references) for _ in tr.contexts] for tr in batch]
        out = BatchLogliks(results=[], tokens=[0] * len(batch))
        # Each image is encoded once per call, before the first pass that needs it, and
        # every probe of every trajectory showing it reuses the embeddings.
        visuals: dict[int, _Visual] = {}
        encoded: dict[tuple, torch.Tensor] = {}
        for t, traj in enumerate(batch):
            if traj.media is not None and self.vision is None:  # the first reason, whatever the plan says
                failed[t] = BackendError(f"the scoring model ({self.info.name}) takes no images")
            # Abandoned ones too: a live trajectory may reuse a prompt pass computed from
            # an abandoned sharer's row, which needs that row's images.
            if traj.media is None or t in failed:
                continue
            visual = self._guarded(self._encode, traj, encoded, owners={t}, failed=failed)
            if visual is not None:
                visuals[t] = visual
        self._visuals = visuals
        for step in plan.passes:
            prefix = None
            members = [seg for group in step.groups for seg in group if seg.traj not in failed]
            if not members or abandoned.all(seg.traj for seg in members):
                continue
            if step.shared:
                owners = {seg.traj for seg in members}
                prefix = self._guarded(self._prefix, members[0], step.shared, owners=owners, failed=failed)
                if prefix is None:
                    continue
                out.forward_passes += 1
                # Each sharer is charged its part of the prefix; the total stays exact.
                for i, seg in enumerate(members):
                    out.tokens[seg.traj] += step.shared // len(members) + (i < step.shared % len(members))
            for group in step.groups:
                group = [seg for seg in group if seg.traj not in failed]  # e.g. its images failed to encode
                owners = {seg.traj for seg in group}
                if not group or abandoned.all(owners):
                    continue
                logprobs = self._guarded(
                    self._forward, group, step.tree, step.shared, prefix, owners=owners, failed=failed
                )
                if logprobs is None:
                    continue
                out.forward_passes += 1
                for seg in group:
                    out.tokens[seg.traj] += len(seg.ids) - step.shared
                flat = iter(logprobs.tolist())
                for seg in group:
                    for t, k, v in seg.owners:
                        sums[t][k][v] += next(flat)

        for t, traj in enumerate(batch):
            if t in abandoned:  # some of its passes may have been skipped
                out.results.append(abandoned_error())
                continue
            if t in failed:
                out.results.append(failed[t])
                continue
            lengths = [len(r) for r in traj.references]
            out.results.append([[s / n for s, n in zip(row, lengths, strict=True)] for row in sums[t]])
        return out

    def _guarded(self, fn, *args, owners: set[int], failed: dict[int, Exception]):
        """Run one forward pass; on failure mark its trajectories failed and return None."""
        try:
            return fn(*args)
        except torch.cuda.OutOfMemoryError as exc:
            for t in owners:
                failed.setdefault(t, BackendError(f"out of device memory: {exc}"))
            torch.cuda.empty_cache()
        except RuntimeError as exc:
            if self.device.type == "cuda" and "CUDA error" in str(exc):
                self._dead = exc  # a device-side error poisons the context
                raise BackendDeadError(str(exc)) from exc
            log.exception("forward pass failed")
            for t in owners:
                failed.setdefault(t, BackendError(f"forward pass failed: {exc}"))
        except Exception as exc:  # any other failure is this pass's, not the batch's
            log.exception("forward pass failed")
            for t in owners:
                failed.setdefault(t, BackendError(f"forward pass failed: {type(exc).__name__}: {exc}"))
        return None

    def _reset_rope(self) -> None:
        """transformers' dynamic NTK keeps the largest scaling it has seen, so numbers
        would depend on what ran before: every pass starts from the loaded state."""
        for module, buffers, attrs in self._rope_state:
            for name, value in buffers.items():
                module.register_buffer(name, value.clone(), persistent=False)
            for name, value in attrs.items():
                setattr(module, name, value)

    @torch.inference_mode()
    def _encode(self, traj: TrajectoryProbes, encoded: dict[tuple, torch.Tensor]) -> _Visual:
        """Run the vision tower on the trajectory's images (those `encoded` lacks: the
        images of this backend call so far, by digest and patch grid, so a GRPO group's
        shared picture is encoded once); lay out where their embeddings go and the rotary
        positions of the prompt up to the last image."""
        started = time.perf_counter()
        images = traj.media.images
        keys = [(image.digest, image.grid_thw) for image in images]
        todo = [i for i, key in enumerate(keys) if key not in encoded]
        if todo:
            pixels = torch.cat([torch.as_tensor(images[i].pixel_values) for i in todo]).to(self.device, self.dtype)
            grid = torch.tensor([images[i].grid_thw for i in todo], dtype=torch.long, device=self.device)
            for i, out in zip(todo, self._decoder.get_image_features(pixels, grid).pooler_output, strict=True):
                encoded[keys[i]] = out.to(self.dtype)
        embeds = torch.cat([encoded[key] for key in keys])
        grid = torch.tensor([image.grid_thw for image in images], dtype=torch.long, device=self.device)
        trunk = torch.tensor(traj.trunk, dtype=torch.long)
        is_image = trunk == self.vision.image_token_id
        slots_at = is_image.nonzero().flatten()
        if len(slots_at) != embeds.shape[0]:
            raise BackendError(
                f"the prompt holds {len(slots_at)} image pad tokens, its images encode to {embeds.shape[0]}"
            )
        end = int(slots_at[-1]) + 1
        for k, context in enumerate(traj.contexts):
            # Every probe must hold the images exactly where the trunk does.
            if context[:end] != traj.trunk[:end]:
                raise BackendError(f"probe {k} does not share the prompt's images with the trajectory")
        positions, _ = self._decoder.get_rope_index(
            trunk[None, :end].to(self.device),
            mm_token_type_ids=is_image[None, :end].int().to(self.device),
            image_grid_thw=grid,
        )
        positions = positions[:, 0].cpu()
        # After the last image every axis counts on from the image block's largest
        # position: token p sits at p + delta (what get_rope_index gives a longer row).
        delta = int(positions.max()) + 1 - end
        slots = torch.full((end,), -1, dtype=torch.long)
        slots[slots_at] = torch.arange(len(slots_at))
        self.encode_s += time.perf_counter() - started
        self.images_encoded += len(todo)
        return _Visual(embeds, positions, slots, end, delta)

    def _inputs(self, group: Sequence[Segment], n: int, length: int | None = None) -> dict:
        """Decoder inputs of the rows of `group` (right-padded to `n`, or cut to `length`):
        token ids and positions, or for a VL model the embeddings (images scattered in)
        and three-axis positions."""
        n = length if length is not None else n
        ids = torch.zeros(len(group), n, dtype=torch.long)
        positions = torch.zeros(len(group), n, dtype=torch.long)
        for b, seg in enumerate(group):
            m = min(len(seg.ids), n)
            ids[b, :m] = torch.tensor(seg.ids[:m])
            positions[b, :m] = torch.tensor(seg.positions[:m])
        if self.vision is None:
            return {"input_ids": ids.to(self.device), "position_ids": positions.to(self.device)}
        embeds = self._text.get_input_embeddings()(ids.to(self.device))
        rope = positions[None].repeat(3, 1, 1)
        for b, seg in enumerate(group):
            visual = self._visuals.get(seg.traj)
            if visual is None:
                if seg.media:  # never pad embeddings where an image belongs
                    raise BackendError("a row with images reached the model without its encoded images")
                continue
            inside = positions[b] < visual.end
            at = positions[b].clamp(max=visual.end - 1)
            rope[:, b] = torch.where(inside, visual.positions[:, at], positions[b] + visual.delta)
            slots = torch.where(inside & (ids[b] == self.vision.image_token_id), visual.slots[at], -1)
            rows = (slots >= 0).nonzero().flatten()
            if len(rows):
                embeds[b, rows.to(self.device)] = visual.embeds[slots[rows].to(self.device)]
        return {"inputs_embeds": embeds, "position_ids": rope.to(self.device)}

    def _run(self, inputs: dict, start: int, **kwargs):
        """The text decoder on the inputs' columns from `start` on."""
        if "inputs_embeds" in inputs:
            return self._text(
                inputs_embeds=inputs["inputs_embeds"][:, start:],
                position_ids=inputs["position_ids"][..., start:],
                **kwargs,
            )
        return self._decoder(
            input_ids=inputs["input_ids"][:, start:], position_ids=inputs["position_ids"][:, start:], **kwargs
        )

    @torch.inference_mode()
    def _prefix(self, seg: Segment, length: int):
        """Keys and values of `seg`'s first `length` tokens (plain causal attention)."""
        from transformers import DynamicCache

        # No config: every layer keeps all its keys (a sliding-window layer of a
        # config-built cache would drop the oldest ones, which the tree mask counts on).
        cache = DynamicCache()
        self._run(self._inputs([seg], length, length), 0, past_key_values=cache, use_cache=True)
        return cache

    @torch.inference_mode()
    def _forward(self, group: list[Segment], tree: bool, offset: int = 0, prefix=None) -> torch.Tensor:
        """Log-probabilities (float32, CPU) of every segment's targets, in segment order.

        `tree`: rows are masked as trees (packed); else they are plain sequences
        under the model's own masks. With `prefix` (the cache of the group's shared
        first `offset` tokens) only the tokens after it are forwarded, attending to
        it as well as to themselves.
        """
        n = max(len(seg.ids) for seg in group)
        inputs = self._inputs(group, n)
        if tree:
            # Rows after the prefix see all of it (the share plan guarantees that).
            attention = _packed_mask(group, n, self.device)[:, :, offset:]
            if self.attention == "eager":
                blocked = torch.finfo(self.dtype).min
                attention = torch.zeros(attention.shape, dtype=self.dtype, device=self.device).masked_fill(
                    ~attention, blocked
                )
        else:
            attention = torch.zeros(len(group), n, dtype=torch.long)
            for b, seg in enumerate(group):
                attention[b, : len(seg.ids)] = 1
            attention = attention.to(self.device)
        self._reset_rope()
        cache = None
        if prefix is not None:
            cache = copy.deepcopy(prefix)
            cache.batch_repeat_interleave(len(group))
        hidden = self._run(
            inputs, offset, attention_mask=attention, past_key_values=cache, use_cache=cache is not None
        ).last_hidden_state
        # Project only the rows that predict a reference token (several targets may
        # share a row: every reference's first token is predicted by the probe's end).
        width = n - offset
        rows, tokens = [], []
        for b, seg in enumerate(group):
            rows += [b * width + s - offset for s in seg.sources]
            tokens += seg.targets
        unique, inverse = torch.unique(torch.tensor(rows), return_inverse=True)
        logits = self._logits(hidden.reshape(-1, hidden.shape[-1])[unique.to(self.device)])
        chosen = logits[inverse.to(self.device)]
        target = torch.tensor(tokens, device=self.device)
        logprobs = chosen.gather(1, target[:, None]).squeeze(1) - torch.logsumexp(chosen, dim=-1)
        return logprobs.cpu()

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The causal-LM head on selected rows, in float32, with the scalings that
        heads apply after the projection (Cohere's `logit_scale`, Granite's
        `logits_scaling`, Gemma's final soft-capping). `check_head` proves the result
        equals the model's own logits."""
        config = self.model.config.get_text_config()
        logits = self._head(hidden)
        scale = getattr(config, "logit_scale", None)
        if scale is not None:
            logits = logits * scale
        divide = getattr(config, "logits_scaling", None)
        if divide is not None:
            logits = logits / divide
        logits = logits.float()
        cap = getattr(config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"HFBackend({self.info.name}, {self.strategy}, {self.device}, {self.info.dtype})"
