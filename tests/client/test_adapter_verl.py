"""verl: the reward manager and `compute_score` inside verl's own reward loop.

verl 0.9.1 pins transformers<5.11, so it is installed here with --no-deps (plus
the modules its reward loop imports); its real `RewardLoopWorker` loads our
manager through its importlib config path and scores real `DataProto` samples,
and the manager's `assemble_rm_scores` builds `rm_scores` exactly as
`RewardLoopManager.compute_rm_score` calls it. A full PPO run (vLLM/SGLang
rollout) is not exercised here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stepcredit_client import Client, RewardWeights, scalar_reward

from .policy_tokenizers import byte_bpe

verl = pytest.importorskip("verl", reason="verl is installed --no-deps by scripts/dev.py")
from omegaconf import OmegaConf  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.experimental.reward_loop.reward_loop import RewardLoopWorker  # noqa: E402

PROMPT = "Question: What is 12*3+4?\nAnswer: "
RESPONSES = [
    "<think>\nFirst 12 * 3 = 36.\nThen 36 + 4 = 40.\n</think>\n<answer>40</answer>",
    "<think>\nMultiply twelve by three.\nAdd four.\nCheck the result.\n</think>\n<answer>41</answer>",
]
P_LEN, R_LEN = 32, 96
WEIGHTS = {"outcome_weight": 1.0, "mig_weight": 2.0}


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("policy-tokenizer")
    byte_bpe().save_pretrained(path)  # a policy tokenizer unlike the scorer's SmolLM2
    return path


@pytest.fixture(scope="module")
def policy(policy_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(policy_dir)


def config(policy_dir, url, token_level=True, reward_kwargs=None):
    """verl's config for our reward manager; `reward_kwargs` beside `url` and `token_level`
    (default: the weights these tests check)."""
    kwargs = {"url": url, "token_level": token_level, **(WEIGHTS if reward_kwargs is None else reward_kwargs)}
    return OmegaConf.create(
        {
            "actor_rollout_ref": {"model": {"path": str(policy_dir), "tokenizer_path": str(policy_dir)}},
            "reward": {
                "num_workers": 1,
                "custom_reward_function": {
                    "path": None,
                    "name": "compute_score",
                    "reward_kwargs": kwargs,
                },
                "reward_manager": {
                    "source": "importlib",
                    "name": "StepCreditRewardManager",
                    "module": {"path": "pkg://stepcredit_client.adapters.verl_manager"},
                },
                "reward_model": {"enable": False},
            },
        }
    )


def batch(policy) -> tuple[DataProto, list[list[int]]]:
    """verl's layout: prompts left-padded, responses right-padded, one attention mask over both."""
    prompt_ids = policy(PROMPT, add_special_tokens=False)["input_ids"]
    rows, responses = [], []
    for text in RESPONSES:
        ids = policy(text, add_special_tokens=False)["input_ids"] + [policy.eos_token_id]
        assert len(prompt_ids) <= P_LEN and len(ids) <= R_LEN
        responses.append(ids)
        pad = policy.pad_token_id
        rows.append(
            (
                [pad] * (P_LEN - len(prompt_ids)) + prompt_ids,
                ids + [pad] * (R_LEN - len(ids)),
                [0] * (P_LEN - len(prompt_ids)) + [1] * (len(prompt_ids) + len(ids)) + [0] * (R_LEN - len(ids)),
            )
        )
    data = DataProto.from_dict(
        tensors={
            "prompts": torch.tensor([r[0] for r in rows]),
            "responses": torch.tensor([r[1] for r in rows]),
            "attention_mask": torch.tensor([r[2] for r in rows]),
        },
        non_tensors={
            "data_source": np.array(["math"] * len(rows), dtype=object),
            "reward_model": np.array([{"ground_truth": "40"}] * len(rows), dtype=object),
        },
    )
    return data, responses


async def score_in_verl(cfg, data):
    worker = RewardLoopWorker(cfg)  # loads our manager via verl's load_reward_manager
    outputs = await worker.compute_score_batch(data)
    # verl/experimental/reward_loop/reward_loop.py RewardLoopManager.compute_rm_score:
    scores = [item["reward_score"] for item in outputs]
    rm_scores = worker.reward_manager.assemble_rm_scores(data, scores)
    return outputs, rm_scores


async def test_gains_land_on_the_policy_tokens_in_the_reward_tensor(live_server, policy_dir, policy):
    data, responses = batch(policy)
    outputs, rm_scores = await score_in_verl(config(policy_dir, live_server.url), data)
    assert type(outputs) is list and rm_scores.shape == (len(RESPONSES), R_LEN) and rm_scores.dtype == torch.float32

    weights = RewardWeights(outcome=WEIGHTS["outcome_weight"], mig=WEIGHTS["mig_weight"])
    with Client(live_server.url) as client:
        direct = client.score(
            [{"prompt": PROMPT, "completion": text, "references": ["40"]} for text in RESPONSES]
        ).results
    for i, (ids, result) in enumerate(zip(responses, direct)):
        row = rm_scores[i]
        completion = policy.decode(ids, skip_special_tokens=True)
        assert completion == RESPONSES[i]
        expected = torch.zeros(R_LEN)
        for step in result.steps:
            # the step's last policy token: the first prefix whose decode reaches its end
            decoded = [len(policy.decode(ids[: k + 1], skip_special_tokens=True)) for k in range(len(ids))]
            j = next(k for k, n in enumerate(decoded) if n >= step.char_end)
            expected[j] += weights.mig * step.gain
        expected[len(ids) - 1] += weights.outcome * result.outcome_reward  # the EOS: last valid token
        assert torch.allclose(row, expected, atol=1e-4), (i, row.nonzero().flatten().tolist())
        assert row[len(ids) :].abs().sum() == 0  # nothing on padding
        assert row.sum().item() == pytest.approx(scalar_reward(result, weights), abs=1e-4)
        info = outputs[i]["reward_extra_info"]
        assert info["score"] == pytest.approx(row.sum().item(), abs=1e-4)
        assert info["correct"] == float(result.correct) and info["num_steps"] == len(result.steps)
    assert direct[0].correct and not direct[1].correct
    assert any(step.gain > 0 for result in direct for step in result.steps)  # placement was exercised


async def test_scalar_mode_lets_verl_place_the_total_on_the_last_token(live_server, policy_dir, policy):
    data, responses = batch(policy)
    outputs, rm_scores = await score_in_verl(config(policy_dir, live_server.url, token_level=False), data)
    for i, ids in enumerate(responses):
        assert isinstance(outputs[i]["reward_score"], float)
        assert rm_scores[i, len(ids) - 1].item() == pytest.approx(outputs[i]["reward_extra_info"]["score"], abs=1e-5)
        assert set(rm_scores[i].nonzero().flatten().tolist()) <= {len(ids) - 1}
    assert rm_scores[0, len(responses[0]) - 1] >= 1.0  # the correct response carries its outcome there


async def test_compute_score_is_awaitable_with_verls_keywords(live_server):
    from stepcredit_client.adapters.verl import compute_score

    result = await compute_score(
        data_source="math",
        solution_str=RESPONSES[0],
        ground_truth="40",
        extra_info={"prompt": PROMPT, "index": 3},
        url=live_server.url,
        mig_weight=0.0,
    )
    assert set(result) >= {"score", "outcome_reward", "mig_reward", "correct", "sft_gate"}
    assert result["score"] == result["outcome_reward"] == 1.0
    with pytest.raises(ValueError, match="extra_info"):
        await compute_score("math", RESPONSES[0], "40", {}, url=live_server.url)
