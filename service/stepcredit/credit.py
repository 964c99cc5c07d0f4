"""Likelihoods -> watermark, gains, rewards and gates (SPEC sections 5 and 6). Pure."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["StepCredit", "Credit", "NonFiniteError", "mig_credit", "outcome_reward", "shape_problem"]


class NonFiniteError(ValueError):
    """A likelihood is NaN or infinite: no credit can be computed from it."""


@dataclass(frozen=True)
class StepCredit:
    loglik: float
    best_reference: int
    watermark: float
    gain: float


@dataclass(frozen=True)
class Credit:
    baseline_loglik: float
    baseline_reference: int
    steps: list[StepCredit]
    mig_reward: float


def _best(row: Sequence[float]) -> tuple[float, int]:
    # Ties go to the earliest reference, so the gold form wins a tie.
    best = max(range(len(row)), key=lambda v: (row[v], -v))
    return float(row[best]), best


def mig_credit(logliks: Sequence[Sequence[float]]) -> Credit:
    """`logliks[k][v]` is ℓ_k(v) for k = 0..K (row 0 is the baseline) and reference v.

    h_0 = ℓ_0;  g_k = max(0, ℓ_k − h_{k−1});  h_k = max(h_{k−1}, ℓ_k);  R = Σ g_k.
    """
    if not logliks or not logliks[0]:
        raise ValueError("need at least the baseline row with one reference")
    # max() would quietly turn a NaN into a gain of 0 (max(0, nan) is 0).
    for k, row in enumerate(logliks):
        for v, value in enumerate(row):
            if not math.isfinite(value):
                raise NonFiniteError(f"log-likelihood of reference {v} after probe {k} is {value}")
    baseline, baseline_ref = _best(logliks[0])
    watermark, total, steps = baseline, 0.0, []
    for row in logliks[1:]:
        loglik, ref = _best(row)
        gain = max(0.0, loglik - watermark)
        watermark = max(watermark, loglik)
        total += gain
        steps.append(StepCredit(loglik, ref, watermark, gain))
    return Credit(baseline, baseline_ref, steps, total)


def outcome_reward(correct: bool, format_ok: bool, acc_weight: float, format_weight: float) -> float:
    return acc_weight * float(correct) + format_weight * float(format_ok)


def shape_problem(logliks: object, contexts: int, references: int) -> str | None:
    """A result for every probe and reference? (Finiteness is `mig_credit`'s check.)"""
    if not isinstance(logliks, list) or len(logliks) != contexts:
        got = len(logliks) if isinstance(logliks, list) else type(logliks).__name__
        return f"the backend returned {got} probe results for {contexts} probes"
    for k, row in enumerate(logliks):
        if len(row) != references:
            return f"the backend returned {len(row)} reference results for probe {k}, expected {references}"
    return None
