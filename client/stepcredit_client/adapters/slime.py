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
signals in `sample.metadata["stepcredit"]`.

Images (vision-language policies, slime/utils/data.py `Dataset` with `--multimodal-keys`):
the prompt's `<image>` marks become `{"type": "image", "image": <path, URL or base64>}`
parts, the chat template renders them into `sample.prompt` (the model's own
placeholder, e.g. Qwen's `<|vision_start|><|image_pad|><|vision_end|>`), and
`sample.multimodal_inputs["images"]` holds them loaded as PIL images
(slime/utils/processing_utils.py `process_vision_info`). The adapter sends those PIL
images as PNG data URIs, as the item's `images` beside a string prompt, or filling
the image parts of a prompt that is still a message list; without them, the parts'
own images (a path, or a data URI) are read. A web URL is refused: load it first. Settings come from STEPCREDIT_URL,
STEPCREDIT_API_KEY, STEPCREDIT_OUTCOME_WEIGHT, STEPCREDIT_MIG_WEIGHT,
STEPCREDIT_TIMEOUT_S, STEPCREDIT_MAX_ATTEMPTS. A failed item raises
`ItemFailedError`: slime gets no reward for it rather than a wrong one.
"""

from __future__ import annotations

from typing import Any

from .._models import ScoreItem
from ._common import AdapterSettings, chat_images, client_for_loop, extra_signals, image_uris, references_of

__all__ = ["reward_func", "group_reward_func"]


def _loaded_images(sample) -> list[str] | None:
    """The images slime loaded for the policy (`multimodal_inputs["images"]`), as data URIs."""
    inputs = getattr(sample, "multimodal_inputs", None) or {}
    if inputs.get("videos") is not None:
        raise ValueError("a sample with videos cannot be scored: StepCredit takes text and images")
    return image_uris(inputs.get("images"))


def _bare(messages: list) -> list:
    # The parts' own images are what slime loaded: let the loaded ones fill them, in order.
    return [
        {**m, "content": [{"type": "image"} if isinstance(p, dict) and p.get("type") == "image" else p
                          for p in m["content"]]} if isinstance(m.get("content"), list) else m
        for m in messages
    ]  # fmt: skip


def _item(sample) -> ScoreItem:
    refs = references_of(sample.label)
    prompt, images = sample.prompt, _loaded_images(sample)
    if isinstance(prompt, str):
        return ScoreItem(prompt=prompt, completion=sample.response, references=refs, images=images)
    messages, _ = chat_images(_bare(prompt) if images else prompt, images)
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
