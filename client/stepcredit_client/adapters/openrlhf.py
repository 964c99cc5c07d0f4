"""OpenRLHF: a `reward_func` file for `--reward.remote_url /path/to/this/file.py`.

Matched to OpenRLHF openrlhf/utils/agent.py (`SingleTurnAgentExecutor`): a
`remote_url` ending in ".py" is loaded with `spec_from_file_location` and its
`reward_func(queries, prompts, labels)` is called in a thread, one sample per
call; `execute` reads "rewards", "scores" and "extra_logs" from the returned dict
and openrlhf/trainer/ppo_utils/samples_generator.py turns each into a tensor
(examples/python/reward_func.py documents the same keys). `queries` are the
decoded prompt + response, `labels` the dataset's label column.

    --reward.remote_url $(python -c "import stepcredit_client.adapters.openrlhf as m; print(m.__file__)")

Settings come from STEPCREDIT_URL, STEPCREDIT_API_KEY, STEPCREDIT_OUTCOME_WEIGHT,
STEPCREDIT_MIG_WEIGHT, STEPCREDIT_TIMEOUT_S, STEPCREDIT_MAX_ATTEMPTS (this
route, unlike the HTTP one, can send the API key). An item that cannot be
scored raises: OpenRLHF then records no reward for it rather than a wrong one.

No images: OpenRLHF trains vision-language policies (`--data.image_key`), but
`reward_func` receives text only (agent.py calls it with queries, prompts and
labels; the images stay with the rollout). A prompt holding Qwen-VL's image
placeholder is therefore refused rather than scored without its image.
"""

from __future__ import annotations

import threading
from typing import Any

from stepcredit_client._client import Client
from stepcredit_client._models import ScoreItem
from stepcredit_client.adapters._common import AdapterSettings, references_of
from stepcredit_client.rewards import require_ok, scalar_reward

__all__ = ["reward_func", "split_query"]

_IMAGE_TOKEN = "<|image_pad|>"  # Qwen2-VL / 2.5-VL / 3.5: the vision scorers StepCredit serves

_LOCAL = threading.local()  # OpenRLHF calls from worker threads: one client per thread


def split_query(query: str, prompt: str) -> tuple[str, str]:
    """(prompt, completion): the same rule as the service's /get_reward
    (`stepcredit.api.compat.split_query`), repeated so the client needs no service."""
    if query.startswith(prompt):
        return prompt, query[len(prompt) :]
    for cut in range(1, len(prompt)):  # a prompt cut from the left to fit the context
        if query.startswith(prompt[cut:]):
            return query[: len(prompt) - cut], query[len(prompt) - cut :]
    raise ValueError("the query does not start with its prompt (nor with a tail of it)")


def _client(settings: AdapterSettings) -> Client:
    key = (settings.url, settings.api_key, settings.timeout_s, settings.max_attempts)
    if getattr(_LOCAL, "key", None) != key:
        _LOCAL.client = Client(settings.url, api_key=settings.api_key, config=settings.client_config())
        _LOCAL.key = key
    return _LOCAL.client


def reward_func(queries: list[str], prompts: list[str], labels: list, **kwargs: Any) -> dict:
    """`{"rewards": [...], "scores": [...], "extra_logs": {...}}`, one entry per query."""
    settings = AdapterSettings.load(kwargs)
    items = []
    for query, prompt, label in zip(queries, prompts, labels, strict=True):
        if _IMAGE_TOKEN in prompt:
            raise ValueError(
                "this prompt holds an image, and OpenRLHF passes no image to reward_func(queries, prompts, labels): "
                "it cannot be scored here"
            )
        prompt_text, completion = split_query(query, prompt)
        items.append(ScoreItem(prompt=prompt_text, completion=completion, references=references_of(label)))
    results = [require_ok(r) for r in _client(settings).score(items, settings.options).results]
    return {
        "rewards": [scalar_reward(r, settings.weights) for r in results],
        # Dynamic filtering keeps prompts whose mean score lies in a band of [0, 1]: correctness.
        "scores": [float(r.correct) for r in results],
        "extra_logs": {
            "outcome_reward": [r.outcome_reward for r in results],
            "mig_reward": [r.mig_reward for r in results],
            "sft_gate": [float(r.sft_gate) for r in results],
            "num_steps": [float(len(r.steps)) for r in results],
        },
    }
