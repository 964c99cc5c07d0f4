"""Reward composition, in one place: a result -> what a trainer consumes.

* `scalar_reward`: `outcome·outcome_reward + mig·mig_reward` for trainers that
  take one number per completion (GRPO in TRL, OpenRLHF, slime, verl's score).
* `token_rewards`: the same reward spread over the POLICY's completion tokens:
  each step's gain (times `mig`) on the last token of that step, the outcome
  (times `outcome`) on the last completion token; plus the chain-of-thought mask
  (where the process reward applies), the full-completion mask (where the outcome
  applies) and the SFT gate, for decoupled losses. `sum(rewards) == scalar`.

A failed result never becomes a number: `scalar_reward` and `token_rewards`
raise `ItemFailedError`; `scalar_rewards` returns None in its place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ._exceptions import AlignmentError, ItemFailedError
from ._models import ScoreResult
from .alignment import TokenAlignment

__all__ = ["RewardWeights", "TokenRewards", "require_ok", "scalar_reward", "scalar_rewards", "token_rewards"]


@dataclass(frozen=True)
class RewardWeights:
    """reward = outcome · outcome_reward + mig · mig_reward.

    The paper's mixing coefficients are not public; 1 and 1 is the plain sum.
    Lower `mig` when the process reward (in nats) drowns the outcome.
    """

    outcome: float = 1.0
    mig: float = 1.0


@dataclass(frozen=True)
class TokenRewards:
    """Per-token signals for one completion, each of length `n_tokens`."""

    rewards: list[float]
    """process + outcome: what a token-level trainer adds to its reward tensor."""
    process: list[float]
    """mig · gain_k on the last token of step k (gains of steps ending on one token add up)."""
    outcome: list[float]
    """outcome · outcome_reward on the last token."""
    step_ends: list[int]
    """Token index of the last token of each step, in step order."""
    cot_mask: list[int]
    """1 on tokens overlapping the chain-of-thought region: where the process loss applies."""
    completion_mask: list[int]
    """1 on every completion token: where the outcome loss applies."""
    sft_gate: bool
    """Well-formed and correct: eligible for the self-SFT loss."""
    scalar: float
    """The scalar reward; equals sum(rewards) up to float rounding."""


def require_ok(result: ScoreResult | None) -> ScoreResult:
    """The result itself, or `ItemFailedError` when it failed or is missing."""
    if result is None:
        raise ItemFailedError(None, "missing", "no result arrived for this item")
    if result.status != "ok":
        error = result.error
        raise ItemFailedError(result.id, error.code if error else "error", error.message if error else "")
    return result


def scalar_reward(result: ScoreResult | None, weights: RewardWeights = RewardWeights()) -> float:
    """`outcome·outcome_reward + mig·mig_reward`; raises `ItemFailedError` for a failed item."""
    ok = require_ok(result)
    return weights.outcome * ok.outcome_reward + weights.mig * ok.mig_reward


def scalar_rewards(
    results: Sequence[ScoreResult | None], weights: RewardWeights = RewardWeights()
) -> list[float | None]:
    """One reward per result, None (never 0) where the item failed or is missing."""
    return [scalar_reward(r, weights) if r is not None and r.status == "ok" else None for r in results]


def token_rewards(
    result: ScoreResult,
    alignment: TokenAlignment | None = None,
    *,
    n_tokens: int | None = None,
    weights: RewardWeights = RewardWeights(),
) -> TokenRewards:
    """Place a result on the policy's completion tokens.

    `alignment` locates characters in the policy's tokens (see `alignment`). Leave
    it None when the item was sent with `completion_token_ids` (the policy and the
    scorer share a tokenizer): the service's own token spans are used, and
    `n_tokens` must be the number of ids sent.
    """
    ok = require_ok(result)
    if alignment is not None:
        n = alignment.n_tokens
        step_ends = [alignment.last_token(s.char_end) for s in ok.steps]
        cot = alignment.span(*ok.cot_span) if ok.cot_span else (0, 0)
    else:
        if ok.tokenization != "ids" or n_tokens is None:
            raise AlignmentError(
                "without an alignment, the item must have been scored from completion_token_ids "
                "and n_tokens must be their count"
            )
        n = n_tokens
        step_ends = [s.token_end - 1 for s in ok.steps]
        # The service reports step spans, not the COT span, in tokens: the steps
        # cover the COT's non-blank text, which is where the process loss belongs.
        cot = (ok.steps[0].token_start, ok.steps[-1].token_end) if ok.steps else (0, 0)
    if n < 1:
        raise AlignmentError("the completion has no tokens to carry a reward")
    if any(not 0 <= j < n for j in step_ends):
        raise AlignmentError(f"a step ends outside the {n} completion tokens")

    process = [0.0] * n
    for step, j in zip(ok.steps, step_ends):
        process[j] += weights.mig * step.gain
    outcome = [0.0] * n
    outcome[-1] = weights.outcome * ok.outcome_reward
    cot_mask = [1 if cot[0] <= j < cot[1] else 0 for j in range(n)]
    return TokenRewards(
        rewards=[p + o for p, o in zip(process, outcome)],
        process=process,
        outcome=outcome,
        step_ends=step_ends,
        cot_mask=cot_mask,
        completion_mask=[1] * n,
        sft_gate=bool(ok.sft_gate),
        scalar=scalar_reward(ok, weights),
    )
