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
forward only their remainders on top of it. Which segments share what is
chosen per batch to save the most tokens (`_share_plan`).

Only the positions that predict a reference token are projected to the
vocabulary, and log-probabilities are computed in float32 whatever the model
dtype.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..probes import TrajectoryProbes
from ..protocol import ModelInfo
from .base import Backend, BackendDeadError, BackendError, BatchLogliks

__all__ = ["HFBackend", "resolve_device"]

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available")
    return resolved


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class _Segment:
    """One row's worth of tokens with everything needed to mask and score them.

    Per token: `trunk` is its trunk index (-1 on branches), `limit` how many
    trunk tokens it sees, `probe` / `ref` which branch it belongs to (-1: none).
    Per target: the row that predicts it, the token, and its (traj, k, v) owner.
    """

    traj: int = -1
    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    trunk: list[int] = field(default_factory=list)
    limit: list[int] = field(default_factory=list)
    probe: list[int] = field(default_factory=list)
    ref: list[int] = field(default_factory=list)
    sources: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    owners: list[tuple[int, int, int]] = field(default_factory=list)

    def push(self, token: int, position: int, trunk: int, limit: int, probe: int, ref: int) -> int:
        self.ids.append(token)
        self.positions.append(position)
        self.trunk.append(trunk)
        self.limit.append(limit)
        self.probe.append(probe)
        self.ref.append(ref)
        return len(self.ids) - 1

    def score(self, source: int, token: int, owner: tuple[int, int, int]) -> None:
        self.sources.append(source)
        self.targets.append(token)
        self.owners.append(owner)

    def shareable(self) -> int:
        """How many leading tokens could come from a shared prefix pass: every later
        token must see all of them, and every scored row must lie after them."""
        if not self.sources:
            return 0
        seen = min((lim for lim, tr in zip(self.limit, self.trunk) if tr < 0), default=len(self.ids))
        return max(0, min(seen, min(self.sources), len(self.ids) - 1))


def _branch_cost(traj: TrajectoryProbes, k: int, cut: int) -> tuple[int, int]:
    """(tokens, scored positions) that probe k adds to a packed segment."""
    refs = sum(len(r) for r in traj.references)
    return len(traj.contexts[k]) - cut + refs, refs


def _packed_segments(t: int, traj: TrajectoryProbes, max_tokens: int, max_rows: int) -> list[_Segment]:
    """Group the probes of trajectory `t` into as few segments as the budgets allow."""
    cuts = [_common_prefix(ctx, traj.trunk) for ctx in traj.contexts]
    # A trunk longer than the budget would otherwise be repeated for every probe.
    max_tokens = max(max_tokens, 2 * len(traj.trunk))
    groups: list[list[int]] = []
    tokens = rows = 0
    for k, cut in enumerate(cuts):
        add_tokens, add_rows = _branch_cost(traj, k, cut)
        trunk_len = max([cut] + [cuts[j] for j in groups[-1]]) if groups else cut
        if groups and trunk_len + tokens + add_tokens <= max_tokens and rows + add_rows <= max_rows:
            groups[-1].append(k)
            tokens, rows = tokens + add_tokens, rows + add_rows
        else:
            groups.append([k])
            tokens, rows = add_tokens, add_rows
    return [_build_packed(t, traj, group, cuts) for group in groups]


def _build_packed(t: int, traj: TrajectoryProbes, probes: list[int], cuts: list[int]) -> _Segment:
    seg = _Segment(traj=t)
    trunk_len = max(cuts[k] for k in probes)
    for i in range(trunk_len):
        seg.push(traj.trunk[i], i, i, i + 1, -1, -1)
    for k in probes:
        cut, tail = cuts[k], traj.contexts[k][cuts[k] :]
        # The row that predicts the first reference token: the probe's last token.
        last = cut - 1
        for i, token in enumerate(tail):
            last = seg.push(token, cut + i, -1, cut, k, -1)
        if last < 0:
            raise BackendError("a probe has no context token to condition on")
        start = cut + len(tail)
        for v, ref in enumerate(traj.references):
            prev = last
            for i, token in enumerate(ref):
                seg.score(prev, token, (t, k, v))
                prev = seg.push(token, start + i, -1, cut, k, v)
    return seg


def _packed_mask(segments: Sequence[_Segment], n: int, device: torch.device) -> torch.Tensor:
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


def _share_plan(segments: Sequence[_Segment], min_tokens: int) -> list[tuple[int, list[_Segment]]]:
    """Partition segments into (shared prefix length, members) clusters.

    Sorted by token ids, segments with long common prefixes are neighbours; a
    cluster is a run of neighbours, and sharing c tokens among m of them saves
    (m-1)·c tokens at the price of one more forward pass, counted as
    `min_tokens`. Dynamic programming over the runs picks the partition that
    saves the most. Clusters that share nothing have c = 0.
    """
    order = sorted(segments, key=lambda seg: seg.ids)
    n = len(order)
    cap = [seg.shareable() for seg in order]
    neighbour = [_common_prefix(order[i].ids, order[i + 1].ids) for i in range(n - 1)]
    best = [0] * (n + 1)  # best[j]: the largest saving over order[:j]
    cut: list[tuple[int, int]] = [(0, 0)] * (n + 1)  # best[j]'s last cluster: (start, shared length)
    for j in range(1, n + 1):
        best[j], cut[j] = best[j - 1], (j - 1, 0)
        shared = cap[j - 1]
        for i in range(j - 2, -1, -1):  # the cluster order[i:j]
            shared = min(shared, cap[i], neighbour[i])
            if shared < max(min_tokens, 1):
                break
            saving = best[i] + (j - i - 1) * shared - min_tokens
            if saving > best[j]:
                best[j], cut[j] = saving, (i, shared)
    clusters = []
    j = n
    while j > 0:
        i, shared = cut[j]
        clusters.append((shared, order[i:j]))
        j = i
    return clusters[::-1]


def _per_prefix_segments(t: int, traj: TrajectoryProbes) -> list[_Segment]:
    segments = []
    for k, ctx in enumerate(traj.contexts):
        if not ctx:
            raise BackendError("a probe has no context token to condition on")
        for v, ref in enumerate(traj.references):
            seg = _Segment(traj=t, ids=[*ctx, *ref], positions=list(range(len(ctx) + len(ref))))
            for i, token in enumerate(ref):
                seg.score(len(ctx) - 1 + i, token, (t, k, v))
            segments.append(seg)
    return segments


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
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if strategy not in ("packed", "per-prefix"):
            raise ValueError(f"unknown strategy {strategy!r}")
        self.strategy = strategy
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
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        # SDPA takes the boolean 4-D tree mask as it is.
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype, attn_implementation="sdpa")
        self.model.to(self.device).eval()
        # Hidden states come from the decoder and only the rows that predict a reference
        # token go through the vocabulary head: the full logits of a long packed row
        # would take gigabytes.
        self._decoder = self.model.base_model
        self._head = self.model.get_output_embeddings()
        config = self.model.config
        self.info = ModelInfo(
            name=name or config.name_or_path and Path(str(config.name_or_path)).name or path.name,
            path=str(path),
            backend="hf",
            strategy=strategy,
            device=str(self.device),
            dtype=dtype,
            vocab_size=int(config.vocab_size),
            max_context=int(getattr(config, "max_position_embeddings", 0) or 1 << 30),
        )
        # One thread owns the model: forward passes never overlap.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-forward")
        self._dead: BaseException | None = None

    # ----------------------------------------------------------- contract

    async def loglikelihoods(self, batch: Sequence[TrajectoryProbes]) -> BatchLogliks:
        self.check_health()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.compute, list(batch))

    def check_health(self) -> None:
        if self._dead is not None:
            raise BackendDeadError(f"the model backend failed: {self._dead}")

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        del self.model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ----------------------------------------------------------- compute

    def compute(self, batch: Sequence[TrajectoryProbes]) -> BatchLogliks:
        """Blocking: ℓ_k(v) for every trajectory of the batch."""
        sums = [[[0.0] * len(tr.references) for _ in tr.contexts] for tr in batch]
        failed: dict[int, Exception] = {}
        segments: list[_Segment] = []
        for t, traj in enumerate(batch):
            try:
                if self.strategy == "packed":
                    segments += _packed_segments(t, traj, self.max_batch_tokens, self.max_logit_rows)
                else:
                    segments += _per_prefix_segments(t, traj)
            except BackendError as exc:
                failed[t] = exc

        out = BatchLogliks(results=[], tokens=[0] * len(batch))
        plan = [(0, segments)]
        if self.strategy == "packed" and self.share_min_tokens > 0:
            clusters = _share_plan(segments, self.share_min_tokens)
            # Segments that share nothing are still batched with each other.
            plan = [(0, [seg for shared, members in clusters if not shared for seg in members])]
            plan += [(shared, members) for shared, members in clusters if shared]
        for shared, members in plan:
            prefix = None
            if shared:
                owners = {seg.traj for seg in members}
                prefix = self._guarded(self._prefix, members[0], shared, owners=owners, failed=failed)
                if prefix is None:
                    continue
                out.forward_passes += 1
                # Each sharer is charged its part of the prefix; the total stays exact.
                for i, seg in enumerate(members):
                    out.tokens[seg.traj] += shared // len(members) + (i < shared % len(members))
            for group in self._forward_groups(members, shared):
                owners = {seg.traj for seg in group}
                logprobs = self._guarded(self._forward, group, shared, prefix, owners=owners, failed=failed)
                if logprobs is None:
                    continue
                out.forward_passes += 1
                for seg in group:
                    out.tokens[seg.traj] += len(seg.ids) - shared
                flat = iter(logprobs.tolist())
                for seg in group:
                    for t, k, v in seg.owners:
                        sums[t][k][v] += next(flat)

        for t, traj in enumerate(batch):
            if t in failed:
                out.results.append(failed[t])
                continue
            lengths = [len(r) for r in traj.references]
            out.results.append([[s / n for s, n in zip(row, lengths)] for row in sums[t]])
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
        return None

    def _forward_groups(self, segments: list[_Segment], offset: int = 0) -> list[list[_Segment]]:
        """Batch segments (longest first) under the budgets, but only with company of
        about the same length: padding is computed like real tokens, and on a
        compute-bound device it costs more than the larger batch saves. `offset`
        leading tokens come from a shared prefix and are not forwarded again."""
        order = sorted(segments, key=lambda s: len(s.ids), reverse=True)
        groups: list[list[_Segment]] = []
        width = rows = tokens = 0
        for seg in order:
            n, r = len(seg.ids) - offset, len(set(seg.sources))
            size = len(groups[-1]) + 1 if groups else 1
            if (
                groups
                and width * size <= self.max_batch_tokens
                and rows + r <= self.max_logit_rows
                and size <= self.max_batch_rows
                and width * size - (tokens + n) <= self.max_padding * width * size
            ):
                groups[-1].append(seg)
                rows, tokens = rows + r, tokens + n
            else:
                groups.append([seg])
                width, rows, tokens = n, r, n
        return groups

    @torch.inference_mode()
    def _prefix(self, seg: _Segment, length: int):
        """Keys and values of `seg`'s first `length` tokens (plain causal attention)."""
        from transformers import DynamicCache

        cache = DynamicCache()
        self._decoder(
            input_ids=torch.tensor([seg.ids[:length]], device=self.device),
            position_ids=torch.tensor([seg.positions[:length]], device=self.device),
            past_key_values=cache,
            use_cache=True,
        )
        return cache

    @torch.inference_mode()
    def _forward(self, group: list[_Segment], offset: int = 0, prefix=None) -> torch.Tensor:
        """Log-probabilities (float32, CPU) of every segment's targets, in segment order.

        With `prefix` (the cache of the group's shared first `offset` tokens) only
        the tokens after it are forwarded, attending to it as well as to themselves.
        """
        n = max(len(seg.ids) for seg in group)
        ids = torch.zeros(len(group), n, dtype=torch.long)
        positions = torch.zeros(len(group), n, dtype=torch.long)
        for b, seg in enumerate(group):
            ids[b, : len(seg.ids)] = torch.tensor(seg.ids)
            positions[b, : len(seg.ids)] = torch.tensor(seg.positions)
        if self.strategy == "packed":
            # Rows after the prefix see all of it (the share plan guarantees that).
            attention = _packed_mask(group, n, self.device)[:, :, offset:]
        else:
            attention = torch.zeros(len(group), n, dtype=torch.long)
            for b, seg in enumerate(group):
                attention[b, : len(seg.ids)] = 1
            attention = attention.to(self.device)
        cache = None
        if prefix is not None:
            cache = copy.deepcopy(prefix)
            cache.batch_repeat_interleave(len(group))
        hidden = self._decoder(
            input_ids=ids[:, offset:].to(self.device),
            attention_mask=attention,
            position_ids=positions[:, offset:].to(self.device),
            past_key_values=cache,
            use_cache=cache is not None,
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
        """The causal-LM head on selected rows, in float32 (with Gemma-style softcapping)."""
        logits = self._head(hidden).float()
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"HFBackend({self.info.name}, {self.strategy}, {self.device}, {self.info.dtype})"
