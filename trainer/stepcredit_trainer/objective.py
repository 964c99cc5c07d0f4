"""The reference trainer's objective: masks, advantages and losses. Pure torch, no model.

    L = α·L_MIG + β·L_outcome + γ·L_SFT (+ kl_beta·KL to the initial policy)

Each term has its own token mask, and everything comes from the service's results
as `stepcredit_client.token_rewards` places them on the policy's tokens:

* L_outcome: GRPO's clipped policy-gradient loss, group-normalized outcome advantage
  on every completion token;
* L_MIG: the same clipped loss with a process advantage on chain-of-thought tokens
  only, in one of two readings (`build_targets`): `sequence` (the group-normalized
  `mig_reward` on every COT token, the paper's reading) or `step` (reward-to-go of
  the step gains inside the COT, normalized across the group, as PRIME does with
  token rewards);
* L_SFT: mean token negative log-likelihood over the completion tokens of
  completions whose SFT gate is open (well-formed and correct);
* KL: TRL's k3 estimator against the reference (initial) policy.

A completion whose item failed at the service (`None` in place of its TokenRewards)
is not a reward of 0: it is left out of every group statistic and every mask, and
counted in `Targets.stats["n_failed"]`.

Where behaviour follows TRL it follows TRL 1.16's `GRPOTrainer`
(`trl/trainer/grpo_trainer.py`, `_generate_and_score_completions` for advantages,
`_compute_loss` for the loss) and `GRPOConfig` defaults: epsilon 0.2,
epsilon_high None (= epsilon), beta (KL) 0.0, scale_rewards "group",
loss_type "dapo" (our "token" aggregation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Literal

import torch

from stepcredit_client import TokenRewards

__all__ = [
    "Aggregation",
    "Denominators",
    "LossWeights",
    "MigReading",
    "ScaleRewards",
    "Targets",
    "build_targets",
    "clipped_pg_loss",
    "kl_penalty",
    "sft_loss",
    "total_loss",
]

MigReading = Literal["sequence", "step"]
ScaleRewards = Literal["group", "batch", "none"]
Aggregation = Literal["token", "sequence"]

_MIG_READINGS = ("sequence", "step")
_SCALES = ("group", "batch", "none")
_AGGREGATIONS = ("token", "sequence")


@dataclass(frozen=True)
class Denominators:
    """Whole-batch normalizers per term: masked tokens ("token" aggregation) or
    sequences with at least one masked token ("sequence"). SFT is always token-mean."""

    outcome: float
    mig: float
    sft: float


@dataclass
class Targets:
    """What the losses need from one batch of scored completions.

    Float tensors are [B, T] float32 (B completions in group order, T columns of
    completion tokens, right-padded); an advantage is 0 wherever its mask is 0.
    """

    outcome_adv: torch.Tensor
    """Group-normalized outcome advantage, on every token of `outcome_mask`."""
    outcome_mask: torch.Tensor
    """Sampled completion tokens of valid items (also the KL's tokens)."""
    mig_adv: torch.Tensor
    """Process advantage of the chosen reading, on every token of `mig_mask`."""
    mig_mask: torch.Tensor
    """Sampled chain-of-thought tokens of valid items."""
    sft_mask: torch.Tensor
    """Sampled completion tokens of valid items whose SFT gate is open."""
    valid: torch.Tensor
    """[B] bool: the service scored this item (False: it failed, every mask is 0)."""
    stats: dict[str, float]
    """Counts and means for logging; see `build_targets`."""

    def rows(self, rows: slice) -> Targets:
        """The targets of a micro-batch of rows (stats stay the whole batch's)."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value[rows]
        return Targets(**moved)

    def denominators(self, aggregation: Aggregation) -> Denominators:
        """Each term's normalizer over the whole batch, so that losses summed over
        micro-batches equal the loss of the batch (TRL's `num_items_in_batch`)."""
        def count(mask: torch.Tensor, how: Aggregation) -> float:
            return float(mask.sum() if how == "token" else (mask.sum(dim=1) > 0).sum())

        return Denominators(
            outcome=count(self.outcome_mask, aggregation),
            mig=count(self.mig_mask, aggregation),
            sft=count(self.sft_mask, "token"),
        )

    def to(self, device: torch.device | str) -> Targets:
        """The same targets on `device` (stats stay Python floats)."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device)
        return Targets(**moved)


def build_targets(
    rewards: Sequence[TokenRewards | None],
    group_size: int,
    *,
    mig_reading: MigReading,
    scale_rewards: ScaleRewards = "group",
    sampled_mask: torch.Tensor | None = None,
    eps: float = 1e-4,
) -> Targets:
    """Masks and advantages for B = n_prompts·group_size completions, groups contiguous.

    `rewards[i]` is `token_rewards(result, n_tokens=..., weights=RewardWeights(1, 1))`
    for completion i, or None where the service returned an error for that item.
    `sampled_mask` [B, T] is 1 on tokens the policy sampled (0 on padding and on
    forced prefix tokens the loop prepended); every mask is ANDed with it. Without
    it, T is the longest valid completion and each item's mask comes from its length
    (pass it whenever a failed item may be the longest, so T matches the loop's).

    Normalization (TRL's rule, `_generate_and_score_completions`): advantage =
    (x − group mean) / (std + eps), std unbiased (TRL's `nanstd`); `scale_rewards`
    "group" divides by the group's std, "batch" by the std over the whole batch
    (the mean stays the group's), "none" does not divide. Failed items take no part
    in any mean or std. A group with fewer than 2 members (valid items for the
    outcome and the `sequence` reading; valid items with at least one COT token for
    the `step` reading) gets advantage 0: there is nothing to compare (TRL gets 0
    from a NaN std). A group whose values are all equal gets exactly 0 (TRL gets
    0 up to rounding). Those zero-advantage tokens stay in their masks, so they
    count in the token-mean denominator exactly as in TRL.

    Readings of the process advantage (both on COT tokens of valid items only):

    * `sequence`: the group-normalized `mig_reward` (= sum of `process`) of the
      completion on each of its COT tokens. Valid items without COT take part in
      the group statistics (their `mig_reward` of 0 is a real score) but carry no
      MIG mask.
    * `step`: the token rewards are the step gains at their last tokens
      (`process`); the return at COT token t is the sum of the gains at COT tokens
      ≥ t (γ = 1, no discount); the returns are whitened over every `mig_mask`
      token of the group's valid completions (mean of those tokens, their std for
      "group" scaling). PRIME (`compute_rloo_returns` in PRIME-RL/PRIME's
      training/verl/trainer/ppo/core_algos.py) takes the reward-to-go of the token
      rewards with γ = 1 and then `masked_whiten`s the returns over all response
      tokens; we whiten per group (with the same `scale_rewards` as the outcome
      term, so the option means one thing) and drop PRIME's leave-one-out
      baseline on the token rewards before the sum: it subtracts the baseline at
      every rewarded position, so with rewards at step ends the return at t would
      fall with the number of steps still to come, not only with their gains (the
      whitening's group mean already centers the returns). The statistics are
      token-weighted, as in PRIME's `masked_whiten`.

    Stats: n_items, n_valid, n_failed, n_groups, n_sft (valid items with the gate
    open), n_no_cot (valid items with an empty `mig_mask`), outcome_tokens,
    mig_tokens, sft_tokens, outcome_reward_mean and mig_reward_mean (over valid
    items; NaN when none), outcome_groups_too_few / mig_groups_too_few (groups with
    fewer than 2 members), outcome_groups_zero_std / mig_groups_zero_std (groups
    with members whose values are all equal).
    """
    if mig_reading not in _MIG_READINGS:
        raise ValueError(f"mig_reading must be one of {_MIG_READINGS}, got {mig_reading!r}")
    if scale_rewards not in _SCALES:
        raise ValueError(f"scale_rewards must be one of {_SCALES}, got {scale_rewards!r}")
    if not (isinstance(eps, float | int) and 0 < eps < 1):
        raise ValueError(f"eps must lie in (0, 1), got {eps!r}")
    n_items = len(rewards)
    if group_size < 1 or n_items == 0 or n_items % group_size:
        raise ValueError(f"{n_items} completions do not split into groups of {group_size}")

    valid = torch.tensor([tr is not None for tr in rewards], dtype=torch.bool)
    lengths = [_check_item(i, tr) for i, tr in enumerate(rewards)]
    width = max(lengths, default=0)
    if sampled_mask is not None:
        sampled = _check_sampled(sampled_mask, n_items, lengths, valid)
        width = sampled.shape[1]
    else:
        sampled = torch.ones(n_items, max(width, 1), dtype=torch.bool)
        width = sampled.shape[1]

    # Per-token signals of valid items, 0 beyond each item's length and for failed items.
    completion = torch.zeros(n_items, width, dtype=torch.bool)
    cot = torch.zeros(n_items, width, dtype=torch.bool)
    process = torch.zeros(n_items, width, dtype=torch.float64)
    outcome_reward = torch.zeros(n_items, dtype=torch.float64)
    sft_gate = torch.zeros(n_items, dtype=torch.bool)
    for i, tr in enumerate(rewards):
        if tr is None:
            continue
        n = lengths[i]
        completion[i, :n] = torch.tensor(tr.completion_mask, dtype=torch.bool)
        cot[i, :n] = torch.tensor(tr.cot_mask, dtype=torch.bool)
        process[i, :n] = torch.tensor(tr.process, dtype=torch.float64)
        outcome_reward[i] = math.fsum(tr.outcome)
        sft_gate[i] = tr.sft_gate
    mig_reward = process.sum(dim=1)

    outcome_mask = completion & sampled & valid[:, None]
    mig_mask = outcome_mask & cot
    sft_mask = outcome_mask & sft_gate[:, None]

    # Outcome: one value per completion, broadcast over its completion tokens.
    outcome_seq, outcome_few, outcome_flat = _group_normalize(
        outcome_reward[:, None], valid[:, None], group_size, scale_rewards, eps
    )
    outcome_adv = outcome_seq * outcome_mask

    if mig_reading == "sequence":
        mig_seq, mig_few, mig_flat = _group_normalize(
            mig_reward[:, None], valid[:, None], group_size, scale_rewards, eps
        )
        mig_adv = mig_seq * mig_mask
    else:
        # Reward-to-go inside the COT: a reversed cumulative sum of the gains.
        returns = (process * cot).flip(1).cumsum(1).flip(1)
        mig_adv, mig_few, mig_flat = _group_normalize(returns, mig_mask, group_size, scale_rewards, eps)

    n_valid = int(valid.sum())
    stats = {
        "n_items": float(n_items),
        "n_valid": float(n_valid),
        "n_failed": float(n_items - n_valid),
        "n_groups": float(n_items // group_size),
        "n_sft": float((sft_gate & valid).sum()),
        "n_no_cot": float((valid & ~mig_mask.any(dim=1)).sum()),
        "outcome_tokens": float(outcome_mask.sum()),
        "mig_tokens": float(mig_mask.sum()),
        "sft_tokens": float(sft_mask.sum()),
        "outcome_reward_mean": float(outcome_reward[valid].mean()) if n_valid else math.nan,
        "mig_reward_mean": float(mig_reward[valid].mean()) if n_valid else math.nan,
        "outcome_groups_too_few": float(outcome_few.sum()),
        "outcome_groups_zero_std": float(outcome_flat.sum()),
        "mig_groups_too_few": float(mig_few.sum()),
        "mig_groups_zero_std": float(mig_flat.sum()),
    }
    return Targets(
        outcome_adv=outcome_adv.float(),
        outcome_mask=outcome_mask.float(),
        mig_adv=mig_adv.float(),
        mig_mask=mig_mask.float(),
        sft_mask=sft_mask.float(),
        valid=valid,
        stats=stats,
    )


def _check_item(i: int, tr: TokenRewards | None) -> int:
    """The item's token count, after checking its signals are consistent."""
    if tr is None:
        return 0
    n = len(tr.completion_mask)
    if n < 1 or any(len(x) != n for x in (tr.process, tr.outcome, tr.cot_mask)):
        raise ValueError(f"item {i}: process, outcome, cot_mask and completion_mask must share one length >= 1")
    if not all(math.isfinite(x) for x in (*tr.process, *tr.outcome)):
        raise ValueError(f"item {i}: a reward is not finite")
    if any(c and not m for c, m in zip(tr.cot_mask, tr.completion_mask)):
        raise ValueError(f"item {i}: a chain-of-thought token lies outside the completion mask")
    # A gain outside the COT would be dropped by the `step` reading and kept by the
    # `sequence` one; token_rewards never places one there, so it means a bug upstream.
    if any(p != 0 and not c for p, c in zip(tr.process, tr.cot_mask)):
        raise ValueError(f"item {i}: a step gain lies outside the chain-of-thought mask")
    return n


def _check_sampled(mask: torch.Tensor, n_items: int, lengths: list[int], valid: torch.Tensor) -> torch.Tensor:
    if mask.dim() != 2 or mask.shape[0] != n_items:
        raise ValueError(f"sampled_mask must be [{n_items}, T], got {list(mask.shape)}")
    mask = mask.detach().cpu()
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("sampled_mask must hold only 0 and 1")
    mask = mask.bool()
    for i, n in enumerate(lengths):
        if not valid[i]:
            continue
        if n > mask.shape[1]:
            raise ValueError(f"item {i} has {n} tokens but sampled_mask only {mask.shape[1]} columns")
        if mask[i, n:].any():
            raise ValueError(f"item {i}: sampled_mask marks tokens past its {n} tokens (misaligned?)")
    return mask


def _group_normalize(
    values: torch.Tensor, mask: torch.Tensor, group_size: int, scale: ScaleRewards, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked (x − group mean) / (std + eps) over the elements of each group.

    `values`, `mask`: [B, T] (T = 1 for one value per completion). Returns the
    advantages [B, T] (0 off the mask), and per group: fewer than 2 member rows,
    and all member values equal; both get advantage 0.
    """
    n_rows, width = values.shape
    n_groups = n_rows // group_size
    v = values.reshape(n_groups, group_size * width)
    m = mask.reshape(n_groups, group_size * width)
    members = mask.any(dim=1).reshape(n_groups, group_size).sum(dim=1)
    too_few = members < 2
    count = m.sum(dim=1)
    mean = (v * m).sum(dim=1) / count.clamp(min=1)
    centered = (v - mean[:, None]) * m
    # All equal, exactly: a rounding residue of the mean divided by eps is not a signal.
    flat = v.masked_fill(~m, -math.inf).amax(dim=1) <= v.masked_fill(~m, math.inf).amin(dim=1)
    if scale == "group":
        std = ((centered**2).sum(dim=1) / (count - 1).clamp(min=1)).sqrt()
        centered = centered / (std[:, None] + eps)
    elif scale == "batch":
        all_values = values[mask]
        std = all_values.std() if all_values.numel() > 1 else torch.zeros((), dtype=values.dtype)
        centered = centered / (std + eps)
    keep = ~too_few & ~flat
    adv = centered * keep[:, None]
    return adv.reshape(n_rows, width), too_few, flat & ~too_few


def _check_same_shape(**tensors: torch.Tensor | None) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    if len(set(shapes.values())) > 1 or any(len(s) != 2 for s in shapes.values()):
        raise ValueError(f"expected [B, T] tensors of one shape, got {shapes}")


def _aggregate(
    per_token: torch.Tensor, mask: torch.Tensor, aggregation: Aggregation, denominator: float | None = None
) -> torch.Tensor:
    """Masked mean of a [B, T] per-token loss.

    "token" (TRL's loss_type "dapo"/"bnpo" on one batch): sum over masked tokens
    divided by their number. "sequence" (TRL's "grpo"): the mean over sequences of
    each sequence's token mean, over sequences with at least one masked token. TRL
    averages over every row of the batch; here a row with no token in this term's
    mask (a failed item, an answer without COT) is not a sequence of the term, and
    counting it would scale the term down as if it were a loss of 0. Both give a
    graph-connected 0 when the mask is empty. `denominator` replaces the count
    (tokens or sequences) with the whole batch's when this is one micro-batch.
    """
    if aggregation not in _AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {_AGGREGATIONS}, got {aggregation!r}")
    mask = mask.to(per_token.dtype)
    masked = per_token * mask
    if aggregation == "token":
        count = mask.sum() if denominator is None else torch.tensor(denominator)
        return masked.sum() / count.clamp(min=1.0)
    tokens = mask.sum(dim=1)
    per_sequence = masked.sum(dim=1) / tokens.clamp(min=1.0)
    count = (tokens > 0).sum() if denominator is None else torch.tensor(denominator)
    return per_sequence.sum() / count.clamp(min=1)


def clipped_pg_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    adv: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    aggregation: Aggregation = "token",
    denominator: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO/GRPO clipped surrogate, TRL 1.16 `_compute_loss` (token-level importance ratio).

    per token: ratio = exp(logp − old_logp), loss = −min(ratio·A, clip(ratio, 1 − ε, 1 + ε_high)·A),
    so a ratio past 1 + ε_high with A > 0, or below 1 − ε with A < 0, gives no gradient.
    `old_logp` None means on-policy (`logp.detach()`, as TRL does with one iteration).
    Stats: clip_ratio/low, clip_ratio/high, clip_ratio/region (TRL's masked means)
    and tokens.
    """
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    if not (0 < epsilon < 1 and epsilon_high > 0):
        raise ValueError(f"need 0 < epsilon < 1 and epsilon_high > 0, got {epsilon}, {epsilon_high}")
    if old_logp is None:
        old_logp = logp.detach()
    _check_same_shape(logp=logp, old_logp=old_logp, adv=adv, mask=mask)
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    loss = _aggregate(per_token, mask, aggregation, denominator)
    with torch.no_grad():
        m = mask.bool()
        n = max(int(m.sum()), 1)
        low = (ratio < 1 - epsilon) & (adv < 0) & m
        high = (ratio > 1 + epsilon_high) & (adv > 0) & m
        stats = {
            "clip_ratio/low": float(low.sum()) / n,
            "clip_ratio/high": float(high.sum()) / n,
            "clip_ratio/region": float((low | high).sum()) / n,
            "tokens": float(m.sum()),
        }
    return loss, stats


def kl_penalty(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    aggregation: Aggregation = "token",
    denominator: float | None = None,
) -> torch.Tensor:
    """TRL's k3 estimator of KL(π‖π_ref): exp(ref − logp) − (ref − logp) − 1 per token, aggregated.

    TRL adds beta·k3 to each token's loss before aggregating over the completion
    mask; aggregation is linear, so a separate term over the same mask is the same loss.
    """
    _check_same_shape(logp=logp, ref_logp=ref_logp, mask=mask)
    delta = ref_logp - logp
    return _aggregate(torch.exp(delta) - delta - 1, mask, aggregation, denominator)


def sft_loss(logp: torch.Tensor, sft_mask: torch.Tensor, denominator: float | None = None) -> torch.Tensor:
    """Mean token negative log-likelihood over every gated token of the batch.

    0 (still connected to the graph, so a backward pass works) when no gate is open.
    """
    _check_same_shape(logp=logp, sft_mask=sft_mask)
    return _aggregate(-logp, sft_mask, "token", denominator)


@dataclass(frozen=True)
class LossWeights:
    """L = alpha·L_MIG + beta·L_outcome + gamma·L_SFT + kl_beta·KL.

    alpha = gamma = 0 is plain GRPO; gamma = 0 is GRPO+MIG. kl_beta defaults to
    TRL's beta, 0.0 (no reference model needed).
    """

    alpha: float
    beta: float
    gamma: float
    kl_beta: float = 0.0

    def __post_init__(self) -> None:
        values = (self.alpha, self.beta, self.gamma, self.kl_beta)
        if not all(math.isfinite(v) and v >= 0 for v in values):
            raise ValueError(f"loss weights must be finite and >= 0, got {values}")
        if not (self.alpha or self.beta or self.gamma):
            raise ValueError("at least one of alpha (MIG), beta (outcome), gamma (SFT) must be > 0")


def total_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    targets: Targets,
    weights: LossWeights,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    aggregation: Aggregation = "token",
    denominators: Denominators | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted sum, and each term's unweighted value for logging.

    For one micro-batch of a larger batch, pass `targets.rows(rows)` and the whole
    batch's `targets.denominators(aggregation)`: the micro-batch losses then add up
    to the batch's loss (and their gradients to its gradient); parts add up likewise.

    Every term is computed and logged; only terms with a weight > 0 enter the loss
    (so an unused term cannot leak a NaN into it). The KL runs over `outcome_mask`
    (every sampled completion token of valid items) and needs `ref_logp` when
    kl_beta > 0. Parts: loss, outcome, mig, sft, kl (when ref_logp is given) and
    each policy term's clip ratios as `outcome/clip_ratio/high` etc.
    """
    _check_same_shape(
        logp=logp, old_logp=old_logp, ref_logp=ref_logp, outcome_mask=targets.outcome_mask, mig_mask=targets.mig_mask
    )
    if weights.kl_beta > 0 and ref_logp is None:
        raise ValueError("kl_beta > 0 needs ref_logp")
    clip = {"epsilon": epsilon, "epsilon_high": epsilon_high, "aggregation": aggregation}
    den = denominators or Denominators(None, None, None)  # type: ignore[arg-type]
    outcome, outcome_stats = clipped_pg_loss(
        logp, old_logp, targets.outcome_adv, targets.outcome_mask, **clip, denominator=den.outcome
    )
    mig, mig_stats = clipped_pg_loss(logp, old_logp, targets.mig_adv, targets.mig_mask, **clip, denominator=den.mig)
    sft = sft_loss(logp, targets.sft_mask, den.sft)
    terms = [(weights.beta, outcome), (weights.alpha, mig), (weights.gamma, sft)]
    parts = {"outcome": outcome.item(), "mig": mig.item(), "sft": sft.item()}
    if ref_logp is not None:
        kl = kl_penalty(logp, ref_logp, targets.outcome_mask, aggregation, den.outcome)
        terms.append((weights.kl_beta, kl))
        parts["kl"] = kl.item()
    loss = sum(w * term for w, term in terms if w > 0)  # LossWeights guarantees one term
    parts["loss"] = loss.item()
    parts.update({f"outcome/{k}": v for k, v in outcome_stats.items()})
    parts.update({f"mig/{k}": v for k, v in mig_stats.items()})
    return loss, parts
