"""What the adapters share: settings for adapters a trainer loads by path (no
constructor arguments: keyword arguments win, then STEPCREDIT_* environment
variables), one async client per event loop, references, logged signals."""

from __future__ import annotations

import asyncio
import math
import os
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .._client import AsyncClient
from .._config import ClientConfig, Retry
from .._models import ItemOptions, ScoreResult
from ..rewards import RewardWeights, scalar_reward

__all__ = ["AdapterSettings", "client_for_loop", "references_of", "extra_signals"]


@dataclass(frozen=True)
class AdapterSettings:
    url: str = "http://127.0.0.1:8000"
    api_key: str | None = None
    weights: RewardWeights = RewardWeights()
    timeout_s: float = 120.0
    max_attempts: int = 5
    options: ItemOptions | None = None

    @classmethod
    def load(cls, overrides: Mapping[str, Any] | None = None) -> AdapterSettings:
        """From `overrides` (url, api_key, outcome_weight, mig_weight, timeout_s,
        max_attempts, options), else STEPCREDIT_URL, STEPCREDIT_API_KEY,
        STEPCREDIT_OUTCOME_WEIGHT, STEPCREDIT_MIG_WEIGHT, STEPCREDIT_TIMEOUT_S,
        STEPCREDIT_MAX_ATTEMPTS; defaults otherwise."""
        given = dict(overrides or {})

        def pick(name: str, default, cast=str):
            if given.get(name) is not None:
                return cast(given[name])
            env = os.environ.get(f"STEPCREDIT_{name.upper()}")
            return cast(env) if env not in (None, "") else default

        options = given.get("options")
        return cls(
            url=pick("url", cls.url),
            api_key=pick("api_key", None),
            weights=RewardWeights(
                outcome=pick("outcome_weight", RewardWeights.outcome, float),
                mig=pick("mig_weight", RewardWeights.mig, float),
            ),
            timeout_s=pick("timeout_s", cls.timeout_s, float),
            max_attempts=pick("max_attempts", cls.max_attempts, int),
            options=ItemOptions.model_validate(dict(options)) if options else None,
        )

    def client_config(self) -> ClientConfig:
        return ClientConfig(timeout=self.timeout_s, retry=Retry(max_attempts=self.max_attempts))


_CLIENTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def client_for_loop(settings: AdapterSettings) -> AsyncClient:
    """One AsyncClient per event loop and service: httpx clients are bound to the loop that uses them."""
    per_loop = _CLIENTS.setdefault(asyncio.get_running_loop(), {})
    key = (settings.url, settings.api_key, settings.timeout_s, settings.max_attempts)
    if key not in per_loop:
        per_loop[key] = AsyncClient(settings.url, api_key=settings.api_key, config=settings.client_config())
    return per_loop[key]


def references_of(answer: Any) -> list[str]:
    """A trainer's label or ground truth as references: a string or number, or a
    list (or array) of equivalent ones; blank or null entries are skipped. A missing
    answer is an error, not a guess, and so is a value that is no answer at all (a
    boolean, a NaN or infinity, a nested container): `str` would make "False" or
    "nan" a reference."""
    answer = _plain(answer)
    if isinstance(answer, Mapping):  # iterating it would make its keys the references
        raise ValueError("a reference answer is text or a number, not a mapping")
    values = [answer] if answer is None or isinstance(answer, str | int | float) else list(answer)
    refs = []
    for value in map(_plain, values):
        if isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value)):
            raise ValueError(f"{value!r} is not a reference answer")
        if value is not None and not isinstance(value, str | int | float):
            raise ValueError(f"a reference answer is text or a number, not {type(value).__name__}")
        if value is not None and str(value).strip():
            refs.append(str(value))
    if not refs:
        raise ValueError("no reference answer (label / ground truth) for this sample")
    return refs


def _plain(value: Any) -> Any:
    # A NumPy scalar (verl hands ground truth over as arrays) as the Python value.
    return value.item() if getattr(value, "ndim", None) == 0 and hasattr(value, "item") else value


def extra_signals(result: ScoreResult, weights: RewardWeights) -> dict[str, float]:
    """The scalar signals logged beside the reward (same keys for every sample)."""
    return {
        "score": scalar_reward(result, weights),
        "outcome_reward": float(result.outcome_reward),
        "mig_reward": float(result.mig_reward),
        "correct": float(result.correct),
        "format_ok": float(result.format_ok),
        "sft_gate": float(result.sft_gate),
        "num_steps": float(len(result.steps)),
    }
