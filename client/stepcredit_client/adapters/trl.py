"""TRL: a reward function for `GRPOTrainer(reward_funcs=...)`.

Matched to TRL 1.16 trl/trainer/grpo_trainer.py `GRPOTrainer._calculate_rewards`:
a custom reward function is called as
`f(prompts=..., completions=..., completion_ids=..., **reward_kwargs)`, where
`reward_kwargs` holds every other dataset column (one value per completion) plus
`trainer_state`, `log_extra` and `log_metric`; it returns one value per completion,
and a None becomes NaN, which leaves that function out for that completion.

    from stepcredit_client.adapters.trl import StepCreditReward
    reward = StepCreditReward("http://127.0.0.1:8000", references_column="answer")
    trainer = GRPOTrainer(model=..., reward_funcs=[reward], train_dataset=ds, ...)

Vision-language policies (TRL 1.16 and main, `_generate_and_score_completions`): the
dataset's `image` (one per row) or `images` (a list) column holds PIL images, and
TRL turns each conversational prompt into content parts before generating, the
images in `{"type": "image", "image": <PIL.Image>}` parts (`prepare_multimodal_messages`);
those prompts are what the reward function receives, the columns come as keyword
arguments too. The adapter sends each image inline as a PNG data URI: as
`image_url` parts of `messages`, or, with `policy_tokenizer`, as the item's `images`
beside the prompt rendered by the policy's template (its image placeholders mark
where they go). A bare `{"type": "image"}` part takes the row's next column image,
as in TRL.

Unscorable completions get None (the service's per-item error), never 0. A
service that cannot be reached raises, so the run stops instead of training on
nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .._client import Client
from .._config import ClientConfig
from .._models import ItemOptions, ScoreItem
from ..rewards import RewardWeights, scalar_rewards
from ._common import chat_images, has_image_payload, image_uris, message_text, references_of

__all__ = ["StepCreditReward"]

_CONTROL = ("trainer_state", "log_extra", "log_metric", "environments")
"""Keyword arguments TRL adds beside the dataset's columns."""


def _text(message_list: Sequence[Mapping[str, Any]]) -> str:
    # A conversational completion is a list of assistant (and tool) messages; their text, in order.
    return "".join(message_text(m) for m in message_list)


def _row_images(kwargs: Mapping[str, Any], n: int) -> list:
    """Each row's images from the dataset column TRL reads: `images` (a list per row) wins over `image`."""
    if "images" in kwargs:
        return list(kwargs["images"])
    if "image" in kwargs:
        return [[image] for image in kwargs["image"]]
    return [None] * n


class StepCreditReward:
    """GRPOTrainer reward function: `outcome·outcome_reward + mig·mig_reward` per completion."""

    __name__ = "stepcredit"  # TRL names the reward's metrics after the callable

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        references_column: str = "answer",
        weights: RewardWeights = RewardWeights(),
        options: ItemOptions | Mapping | None = None,
        policy_tokenizer=None,
        api_key: str | None = None,
        config: ClientConfig | None = None,
        client: Client | None = None,
    ) -> None:
        """`references_column`: the dataset column holding the answer (a string or a
        list of equivalent strings). `policy_tokenizer`: renders conversational
        prompts with the policy's chat template (the text the policy saw); without
        it, messages are rendered with the scorer's template."""
        self.client = client or Client(base_url, api_key=api_key, config=config)
        self.references_column = references_column
        self.weights = weights
        self.options = options
        self.policy_tokenizer = policy_tokenizer

    def _item(self, prompt, completion, references, images=None) -> ScoreItem:
        refs = references_of(references)
        text = completion if isinstance(completion, str) else _text(completion)
        if isinstance(prompt, str):
            return ScoreItem(prompt=prompt, completion=text, references=refs, images=image_uris(images))
        # TRL has already put the row's images into the prompt's parts; a bare part takes them from the column.
        messages, in_order = chat_images(prompt, None if has_image_payload(prompt) else image_uris(images))
        if self.policy_tokenizer is not None:
            rendered = self.policy_tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            return ScoreItem(prompt=rendered, completion=text, references=refs, images=in_order or None)
        return ScoreItem(messages=messages, completion=text, references=refs)

    def __call__(
        self,
        prompts: list,
        completions: list,
        completion_ids: list[list[int]] | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        if self.references_column not in kwargs:
            raise KeyError(
                f"the dataset has no column {self.references_column!r} with reference answers; "
                f"columns passed: {sorted(k for k in kwargs if k not in _CONTROL)}"
            )
        references = kwargs[self.references_column]
        images = _row_images(kwargs, len(prompts))
        items = [
            self._item(p, c, r, i) for p, c, r, i in zip(prompts, completions, references, images, strict=True)
        ]
        results = self.client.score(items, self.options).results
        rewards = scalar_rewards(results, self.weights)

        log_metric = kwargs.get("log_metric")
        if callable(log_metric):
            ok = [r for r in results if r.status == "ok"]
            log_metric("stepcredit/failed", float(len(results) - len(ok)))
            if ok:
                log_metric("stepcredit/mig_reward", sum(r.mig_reward for r in ok) / len(ok))
                log_metric("stepcredit/outcome_reward", sum(r.outcome_reward for r in ok) / len(ok))
                log_metric("stepcredit/sft_gate", sum(bool(r.sft_gate) for r in ok) / len(ok))
        return rewards
