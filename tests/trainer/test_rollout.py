"""The policy's side of the loop on a tiny random model: sampling groups, the
padded layout, and per-token log-probs that match an unpadded forward pass."""

from __future__ import annotations

import pytest
import torch

from stepcredit_trainer.rollout import load_policy
from stepcredit_trainer.tasks import Problem

PROBLEMS = [
    Problem("a", "What is 2 + 3?", ("5", "5.0")),
    Problem("b", "Compute 7 - 4 - 1, carefully and with every step written out.", ("2", "2.0")),
]


@pytest.fixture(scope="module")
def policy(tiny_model_path):
    return load_policy(tiny_model_path)


def sample(policy, **kw):
    torch.manual_seed(0)
    args = {"system_prompt": "Think in <think></think>.", "response_prefix": "<think>\n", "group_size": 3,
            "max_new_tokens": 12, "temperature": 1.0, "top_p": 1.0}
    return policy.sample(PROBLEMS, **{**args, **kw})


def test_groups_are_contiguous_and_carry_the_forced_prefix(policy):
    rollouts = sample(policy)
    assert [r.problem.id for r in rollouts] == ["a"] * 3 + ["b"] * 3
    prefix = policy.tokenizer("<think>\n", add_special_tokens=False)["input_ids"]
    eos = policy.tokenizer.eos_token_id
    for r in rollouts:
        assert r.prefix_ids == prefix and r.completion_ids[: len(prefix)] == prefix
        assert r.completion.startswith("<think>\n")
        assert 1 <= len(r.sampled_ids) <= 12
        assert r.truncated == (eos not in r.sampled_ids)
        if not r.truncated:
            assert r.sampled_ids[-1] == eos and r.sampled_ids.count(eos) == 1
        assert r.prompt_ids == policy.tokenizer(r.prompt)["input_ids"]
        assert r.prompt.endswith("assistant\n")  # the chat template's generation prompt


def test_sampled_mask_covers_sampled_tokens_only(policy):
    rollouts = sample(policy)
    _, attention, completion, sampled, width = policy.layout(rollouts)
    for row, r in enumerate(rollouts):
        n_prefix, n = len(r.prefix_ids), len(r.completion_ids)
        assert sampled[row, :n_prefix].sum() == 0
        assert sampled[row, n_prefix:n].sum() == len(r.sampled_ids)
        assert sampled[row, n:].sum() == 0
        assert completion[row, :n].tolist() == r.completion_ids
        assert attention[row].sum() == len(r.prompt_ids) + n


def test_token_logprobs_of_the_padded_batch_match_each_row_alone(policy):
    """Left-padded prompts and right-padded completions must not change any token's log-prob."""
    rollouts = sample(policy)
    input_ids, attention, completion, sampled, _ = policy.layout(rollouts)
    with torch.no_grad():
        batched = policy.token_logprobs(input_ids, attention, completion, temperature=0.7)
        for row, r in enumerate(rollouts):
            ids = torch.tensor([r.prompt_ids + r.completion_ids])
            logits = policy.model(input_ids=ids).logits[0, len(r.prompt_ids) - 1 : -1].float() / 0.7
            alone = torch.log_softmax(logits, -1).gather(-1, torch.tensor(r.completion_ids)[:, None])[:, 0]
            torch.testing.assert_close(batched[row, : len(r.completion_ids)], alone, rtol=1e-4, atol=1e-4)


def test_greedy_sampling_repeats_itself(policy):
    first = [r.completion_ids for r in sample(policy, group_size=1, greedy=True)]
    second = [r.completion_ids for r in sample(policy, group_size=1, greedy=True)]
    assert first == second


def test_a_bos_the_chat_template_renders_is_not_added_twice(tiny_model_path):
    """A tokenizer that adds BOS (Llama-style) must not put a second one before a chat
    template that already starts with it: the service reads that text with one."""
    policy = load_policy(tiny_model_path)
    policy.tokenizer.add_bos_token = True
    bos = policy.tokenizer.bos_token_id
    assert policy.tokenizer("hi")["input_ids"][0] == bos  # this tokenizer now adds BOS
    (rollout,) = policy.sample(PROBLEMS[:1], system_prompt="", response_prefix="", group_size=1,
                               max_new_tokens=2, temperature=1.0, top_p=1.0, greedy=True)
    assert rollout.prompt.startswith(policy.tokenizer.bos_token)
    assert rollout.prompt_ids[0] == bos and rollout.prompt_ids[1] != bos
    assert rollout.prompt_ids == policy.tokenizer(rollout.prompt, add_special_tokens=False)["input_ids"]
