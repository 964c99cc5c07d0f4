"""OpenRLHF's Python-file reward mode and slime's custom reward functions, called
the way those trainers call them, against the live service.

Neither trainer installs here (OpenRLHF needs flash-attn and vLLM; slime is not
on PyPI and needs SGLang and Megatron): the loaders and the consumers below are
transcribed from OpenRLHF openrlhf/utils/agent.py (`SingleTurnAgentExecutor`),
openrlhf/trainer/ppo_utils/samples_generator.py, and slime slime/utils/misc.py
(`load_function`), slime/rollout/rm_hub/__init__.py, slime/utils/types.py.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import stepcredit_client.adapters.openrlhf as openrlhf_adapter
from stepcredit_client import Client, ItemFailedError

from .conftest import PROMPT

RESPONSE = "<think>\nWe add 2 and 3.\n2 + 3 = 5\n</think>\n<answer>5</answer><|im_end|>"
TOO_LONG = "<think>\n" + "one two three four five\n" * 1500 + "</think>\n<answer>5</answer>"


@pytest.fixture
def service_env(live_server, monkeypatch):
    monkeypatch.setenv("STEPCREDIT_URL", live_server.url)
    monkeypatch.setenv("STEPCREDIT_MIG_WEIGHT", "0.5")
    monkeypatch.setenv("STEPCREDIT_MAX_ATTEMPTS", "2")
    return live_server


def direct(url, prompt, completion, label):
    with Client(url) as client:
        return client.score([{"prompt": prompt, "completion": completion, "references": [label]}]).results[0]


def load_openrlhf_reward_func():
    # openrlhf/utils/agent.py SingleTurnAgentExecutor.__init__, for a remote_url ending in ".py":
    spec = importlib.util.spec_from_file_location("reward_func", openrlhf_adapter.__file__)
    reward_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reward_module)
    return reward_module.reward_func


async def openrlhf_fetch(reward_func, queries, prompts, labels):
    # agent.py `_fetch_rewards_via_func`: batch_size 1, each chunk in a thread.
    tasks = [asyncio.to_thread(reward_func, queries[i : i + 1], prompts[i : i + 1], labels[i : i + 1])
             for i in range(len(queries))]  # fmt: skip
    return await asyncio.gather(*tasks)


def openrlhf_experience_fields(rewards_info: dict) -> dict:
    # agent.py `execute` then samples_generator.py: every value becomes a tensor.
    score_value = rewards_info.get("scores")
    if score_value is None:
        score_value = rewards_info.get("rewards")
    info = {"reward": torch.tensor([rewards_info.get("rewards")]), "score": torch.tensor([score_value])}
    for key, value in (rewards_info.get("extra_logs") or {}).items():
        if isinstance(value, torch.Tensor):
            value = value.flatten()[0].item()
        info[key] = torch.tensor([value])
    return info


async def test_openrlhf_reward_func_file_loads_and_answers_in_openrlhfs_format(service_env):
    reward_func = load_openrlhf_reward_func()
    wrong = RESPONSE.replace("<answer>5", "<answer>6")
    answers = await openrlhf_fetch(reward_func, [PROMPT + RESPONSE, PROMPT + wrong], [PROMPT, PROMPT], ["5", "5"])
    for answer, completion, correct in zip(answers, [RESPONSE, wrong], [1.0, 0.0]):
        assert set(answer) == {"rewards", "scores", "extra_logs"}
        expected = direct(service_env.url, PROMPT, completion, "5")
        # abs: the service may batch concurrent requests, which moves float32 noise
        assert answer["rewards"] == [pytest.approx(expected.outcome_reward + 0.5 * expected.mig_reward, abs=1e-4)]
        assert answer["scores"] == [correct]
        info = openrlhf_experience_fields(answer)
        assert all(t.dtype == torch.float32 and t.numel() == 1 for t in info.values())


def test_openrlhf_reward_func_raises_for_an_unscorable_sample(service_env):
    reward_func = load_openrlhf_reward_func()
    with pytest.raises(ItemFailedError, match="context_too_long"):
        reward_func([PROMPT + TOO_LONG], [PROMPT], ["5"])
    with pytest.raises(ValueError, match="does not start"):
        reward_func(["unrelated text"], [PROMPT], ["5"])


def test_openrlhf_split_matches_the_services_split():
    from stepcredit.api.compat import split_query as service_split

    def outcome(split, query, prompt):
        try:
            return split(query, prompt)
        except ValueError:
            return "refused"

    cases = [("PQRS-c", "PQRS"), ("RS-c", "PQRS"), ("aaab", "aaa"), ("abab-c", "xabab"), ("PQPQRS", "PQRS")]
    for query, prompt in cases:
        assert outcome(openrlhf_adapter.split_query, query, prompt) == outcome(service_split, query, prompt)
    assert outcome(service_split, "PQPQRS", "PQRS") == "refused"


@dataclass
class Sample:
    """The fields of slime/utils/types.py `Sample` that a reward function reads."""

    prompt: str | list[dict[str, str]] = ""
    response: str = ""
    label: str | None = None
    reward: float | dict[str, Any] | None = None
    metadata: dict = field(default_factory=dict)


def slime_load_function(path: str):
    # slime/utils/misc.py load_function
    module_path, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module_path), attr)


async def test_slime_custom_rm_returns_the_composed_float_and_keeps_the_signals(service_env):
    rm = slime_load_function("stepcredit_client.adapters.slime.reward_func")
    sample = Sample(prompt=PROMPT, response=RESPONSE, label="5")
    sample.reward = await rm(None, sample)  # slime/rollout/rm_hub/__init__.py async_rm
    expected = direct(service_env.url, PROMPT, RESPONSE, "5")
    assert isinstance(sample.reward, float)
    assert sample.reward == pytest.approx(expected.outcome_reward + 0.5 * expected.mig_reward, abs=1e-4)
    assert sample.metadata["stepcredit"]["correct"] == 1.0
    assert torch.tensor([sample.reward], dtype=torch.float).shape == (1,)  # slime/ray/rollout.py


async def test_slime_group_rm_scores_the_whole_group_in_order(service_env):
    rm = slime_load_function("stepcredit_client.adapters.slime.group_reward_func")
    group = [Sample(prompt=PROMPT, response=RESPONSE.replace("<answer>5", f"<answer>{k}"), label="5")
             for k in (5, 6, 5)]  # fmt: skip
    rewards = await rm(None, group)  # batched_async_rm with --group-rm
    assert len(rewards) == 3 and rewards[0] == pytest.approx(rewards[2], abs=1e-4) and rewards[1] < rewards[0]


async def test_slime_rm_raises_instead_of_rewarding_a_failed_sample(service_env):
    rm = slime_load_function("stepcredit_client.adapters.slime.reward_func")
    with pytest.raises(ItemFailedError):
        await rm(None, Sample(prompt=PROMPT, response=TOO_LONG, label="5"))
    with pytest.raises(ValueError, match="label"):
        await rm(None, Sample(prompt=PROMPT, response=RESPONSE, label=None))
