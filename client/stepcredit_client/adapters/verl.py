"""verl: an async `compute_score` for `reward.custom_reward_function`.

Matched to verl 0.9.1 verl/experimental/reward_loop/reward_manager/naive.py
(`NaiveRewardManager.run_single`): the function is awaited (it is a coroutine
function) as `compute_score(data_source=, solution_str=, ground_truth=,
extra_info=, **reward_kwargs)`, where `reward_kwargs` come from
`reward.custom_reward_function.reward_kwargs` (verl/trainer/ppo/reward.py
`get_custom_reward_fn`). A dict result must hold `score`; every key also goes to
`reward_extra_info`, turned into one numpy array per key across the batch, so
every key is present, and numeric, for every sample.

    reward.custom_reward_function.path=pkg://stepcredit_client.adapters.verl
    reward.custom_reward_function.name=compute_score
    +reward.custom_reward_function.reward_kwargs.url=http://127.0.0.1:8000

`compute_score` sees only the response text, so the prompt comes from the
sample's `extra_info`: `extra_info["prompt"]` (the prompt as the policy saw it,
chat template applied) or `extra_info["messages"]` (rendered with the scorer's
template). verl hands a custom function no image (naive.py passes `extra_info`,
never `raw_prompt` or the processed images), so an image-grounded prompt needs its
images in `extra_info` as well: `extra_info["images"]` (a list of PNG/JPEG/... bytes,
datasets' `{"bytes", "path"}` rows, paths or data URIs) placed where the prompt marks
them (`<image>` or the model's own placeholder), or filling the bare
`{"type": "image"}` parts of `extra_info["messages"]`, whose image parts may also
carry their own image. `StepCreditRewardManager` needs none of this: it reads the
images verl keeps in `raw_prompt`. The score is one number per response, which verl puts on its last
token; for per-step gains on their own tokens use
`stepcredit_client.adapters.verl_manager.StepCreditRewardManager`.

A failed item raises `ItemFailedError`: verl gets no number for it.
"""

from __future__ import annotations

from typing import Any

from .._models import ScoreItem
from ._common import AdapterSettings, chat_images, client_for_loop, extra_signals, image_uris, references_of

__all__ = ["compute_score"]


def _prompt_fields(extra_info: dict | None) -> dict:
    info = extra_info or {}
    images = image_uris(info.get("images"))
    if isinstance(info.get("prompt"), str):
        return {"prompt": info["prompt"], "images": images}
    messages = info.get("messages")
    if messages is not None:
        wire, _ = chat_images(list(messages), images)
        return {"messages": wire}
    raise ValueError(
        "StepCredit needs the prompt: put it in each sample's extra_info as 'prompt' "
        "(chat template applied) or 'messages'"
    )


async def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: dict | None = None,
    **kwargs: Any,
) -> dict[str, float]:
    """Score one response: `{"score": outcome·outcome_reward + mig·mig_reward, ...}`.

    `kwargs` may carry the settings (url, api_key, outcome_weight, mig_weight,
    timeout_s, max_attempts, options); verl's own extra keywords are ignored.
    """
    settings = AdapterSettings.load(kwargs)  # unknown keywords (verl's own) are not read
    item = ScoreItem(completion=solution_str, references=references_of(ground_truth), **_prompt_fields(extra_info))
    (result,) = (await client_for_loop(settings).score([item], settings.options)).results
    return extra_signals(result, settings.weights)
