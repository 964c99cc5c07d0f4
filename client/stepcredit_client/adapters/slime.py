"""slime: custom reward functions for `--custom-rm-path`.

Matched to slime slime/rollout/rm_hub/__init__.py: `async_rm` loads the path with
`load_function` and awaits `f(args, sample)`; with `--group-rm`,
`batched_async_rm` awaits `f(args, samples)` and expects one reward per sample.
A `Sample` (slime/utils/types.py) carries `prompt` (a string, or a list of
messages), `response`, `label` and a `metadata` dict; the returned value becomes
`sample.reward`.

    --custom-rm-path stepcredit_client.adapters.slime.reward_func            # one sample per call
    --custom-rm-path stepcredit_client.adapters.slime.group_reward_func --group-rm

Both return the composed float (no `--reward-key` needed) and leave the other
signals in `sample.metadata["stepcredit"]`. Settings come from STEPCREDIT_URL,
STEPCREDIT_API_KEY, STEPCREDIT_OUTCOME_WEIGHT, STEPCREDIT_MIG_WEIGHT,
STEPCREDIT_TIMEOUT_S, STEPCREDIT_MAX_ATTEMPTS. A failed item raises
`ItemFailedError`: slime gets no reward for it rather than a wrong one.
"""

from __future__ import annotations

from typing import Any

from .._models import ScoreItem
from ._common import AdapterSettings, client_for_loop, extra_signals, references_of

__all__ = ["reward_func", "group_reward_func"]


def _item(sample) -> ScoreItem:
    refs = references_of(sample.label)
    prompt = sample.prompt
    if isinstance(prompt, str):
        return ScoreItem(prompt=prompt, completion=sample.response, references=refs)
    messages = [{"role": m["role"], "content": str(m["content"])} for m in prompt]
    return ScoreItem(messages=messages, completion=sample.response, references=refs)


async def _score(samples: list) -> list[float]:
    settings = AdapterSettings.load()
    response = await client_for_loop(settings).score([_item(s) for s in samples], settings.options)
    rewards = []
    for sample, result in zip(samples, response.results, strict=True):
        signals = extra_signals(result, settings.weights)  # raises ItemFailedError for a failed item
        if isinstance(getattr(sample, "metadata", None), dict):
            sample.metadata["stepcredit"] = signals
        rewards.append(signals["score"])
    return rewards


async def reward_func(args: Any, sample: Any, **kwargs: Any) -> float:
    """`--custom-rm-path stepcredit_client.adapters.slime.reward_func`."""
    (reward,) = await _score([sample])
    return reward


async def group_reward_func(args: Any, samples: list, **kwargs: Any) -> list[float]:
    """`--group-rm`: the whole group in one request."""
    return await _score(list(samples))
