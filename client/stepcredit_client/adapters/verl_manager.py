"""verl: a reward-loop manager that puts each step's gain on the step's last token.

Matched to verl 0.9.1 verl/experimental/reward_loop/reward_manager/base.py
(`RewardManagerBase(config, tokenizer, compute_score)`, `async run_single(data)`
returning `{"reward_score", "reward_extra_info"}`, and the classmethod
`assemble_rm_scores(data, scores) -> Tensor` that builds `rm_scores`) and to
verl/experimental/reward_loop/reward_loop.py (`RewardLoopManager.compute_rm_score`
passes each sample's raw `reward_score` to `assemble_rm_scores`). The sample
layout (left-padded `prompts`, right-padded `responses`, `attention_mask` over
both) follows naive.py.

    reward.reward_manager.source=importlib
    reward.reward_manager.name=StepCreditRewardManager
    reward.reward_manager.module.path=pkg://stepcredit_client.adapters.verl_manager
    +reward.custom_reward_function.reward_kwargs.url=http://127.0.0.1:8000

Settings come from `reward.custom_reward_function.reward_kwargs` (url, api_key,
outcome_weight, mig_weight, timeout_s, options, token_level), then STEPCREDIT_*
variables. With `token_level` (the default) `reward_score` is the whole
`[response_len]` row: mig·gain_k on the last POLICY token of step k (located by
decoding the policy's own ids, `DecodeAlignment`) and the outcome on the last
response token; `assemble_rm_scores` stacks the rows into `[batch, response_len]`.
verl's streaming agent-loop reward path (agent_loop.py) places one scalar per
sample itself, so set `token_level: false` there: `reward_score` is then the
scalar total, which verl puts on the last token.

Images (vision-language policies): verl 0.9.1's RLHFDataset (verl/utils/dataset/rl_dataset.py,
`_build_messages`) turns each `<image>` of the prompt into a content part of the sample's
`raw_prompt` (`{"type": "image", "image": <PIL.Image>}`, or with the dataset row's
`bytes`/`path` beside it, or a path), and `raw_prompt` reaches the reward loop in
`non_tensor_batch` on both the batch and the streaming path (verl's own reward-model
path reads it there too). The manager sends those images inline, in order, as the
item's `images` (a row's original bytes as they are, a PIL image as PNG). The prompt
text is still the decode of the policy's prompt ids, in which the processor has
expanded each image into many `<|image_pad|>` tokens; each run is put back to one,
so that the prompt marks each image once, as the service expects.

Needs verl, torch and a tokenizer: import it only inside a verl job.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from verl import DataProto
from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase

from .._models import ScoreItem
from ..alignment import DecodeAlignment
from ..rewards import token_rewards
from ._common import AdapterSettings, chat_images, client_for_loop, extra_signals, references_of

__all__ = ["StepCreditRewardManager"]

# Qwen2-VL / Qwen2.5-VL (the vision scorers StepCredit serves) write one image as
# <|vision_start|><|image_pad|>...<|image_pad|><|vision_end|>: a run is one image.
_IMAGE_PAD_RUN = re.compile(r"(?:<\|image_pad\|>)+")


def _images(data_item) -> list[str] | None:
    """The sample's images as data URIs, in prompt order, from its `raw_prompt` content parts."""
    raw_prompt = data_item.non_tensor_batch.get("raw_prompt")
    if raw_prompt is None:
        return None
    _, uris = chat_images(list(raw_prompt))
    return uris or None


def _reward_kwargs(config) -> dict[str, Any]:
    try:
        kwargs = config.reward.custom_reward_function.get("reward_kwargs") or {}
    except AttributeError:
        kwargs = {}
    return dict(kwargs)


class StepCreditRewardManager(RewardManagerBase):
    """Scores each response with StepCredit; per-token rewards in the policy's tokenization."""

    def __init__(self, config, tokenizer, compute_score=None, reward_router_address=None, reward_model_tokenizer=None):
        # `compute_score` is verl's loaded custom function, unused: the service is the scorer.
        super().__init__(config, tokenizer, compute_score)
        kwargs = _reward_kwargs(config)
        self.settings = AdapterSettings.load(kwargs)
        self.token_level = str(kwargs.get("token_level", True)).lower() not in ("false", "0", "no")

    def _sample(self, data_item) -> tuple[str, list[int], int]:
        prompt_ids = data_item.batch["prompts"]
        prompt_length = prompt_ids.shape[-1]
        mask = data_item.batch["attention_mask"]
        valid_prompt = int(mask[:prompt_length].sum())
        response_ids = data_item.batch["responses"]
        response_length = response_ids.shape[-1]
        valid_response = int(mask[prompt_length:].sum())
        # Prompts are left-padded, responses right-padded (naive.py reads them the same way).
        prompt = self.tokenizer.decode(prompt_ids[prompt_length - valid_prompt :].tolist(), skip_special_tokens=False)
        return prompt, response_ids[:valid_response].tolist(), response_length

    async def run_single(self, data: DataProto) -> dict:
        data = data[-1:]  # multi-sequence outputs: the last sequence carries the reward, as in naive.py
        data_item = data[0]
        prompt, ids, response_length = self._sample(data_item)
        # The text verl's rule-based scorers see (naive.py: skip_special_tokens=True); no
        # clean-up, so that the text is exactly what the ids' prefixes decode to.
        completion = self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        ground_truth = data_item.non_tensor_batch["reward_model"]["ground_truth"]
        images = _images(data_item)
        if images:
            prompt = _IMAGE_PAD_RUN.sub("<|image_pad|>", prompt)
        item = ScoreItem(prompt=prompt, completion=completion, references=references_of(ground_truth), images=images)
        (result,) = (await client_for_loop(self.settings).score([item], self.settings.options)).results

        extra = extra_signals(result, self.settings.weights)  # raises ItemFailedError for a failed item
        if not self.token_level:
            return {"reward_score": extra["score"], "reward_extra_info": extra}
        alignment = DecodeAlignment(self.tokenizer, ids, completion, skip_special_tokens=True)
        placed = token_rewards(result, alignment, weights=self.settings.weights)
        row = placed.rewards + [0.0] * (response_length - len(placed.rewards))
        return {"reward_score": row, "reward_extra_info": extra}

    @classmethod
    def assemble_rm_scores(cls, data: DataProto, scores: list) -> torch.Tensor:
        """Stack per-token rows into `[batch, response_len]`; scalars go to the last token (verl's default)."""
        if not all(isinstance(s, list | tuple | torch.Tensor) for s in scores):
            return super().assemble_rm_scores(data, scores)
        responses = data.batch["responses"]
        rows = torch.stack([torch.as_tensor(s, dtype=torch.float32) for s in scores]).to(responses.device)
        if tuple(rows.shape) != tuple(responses.shape):
            raise RuntimeError(f"token rewards {tuple(rows.shape)} do not match responses {tuple(responses.shape)}")
        return rows
