"""TRL: a real GRPOTrainer run on a tiny policy, rewarded through the client by
the live service."""

from __future__ import annotations

import pytest

from stepcredit_client import Client, RewardWeights, ScoreItem
from stepcredit_client.adapters.trl import StepCreditReward

trl = pytest.importorskip("trl", reason="trl is in the `test` extra")
datasets = pytest.importorskip("datasets")

OPTIONS = {"format": "boxed"}  # a random policy never writes <think>; boxed makes its whole text the COT


class Recording(StepCreditReward):
    """The adapter, keeping what it was given and what it returned."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[dict] = []

    def __call__(self, prompts, completions, completion_ids=None, **kwargs):
        rewards = super().__call__(prompts, completions, completion_ids, **kwargs)
        self.calls.append({"prompts": prompts, "completions": completions, "answers": kwargs["answer"],
                           "rewards": rewards, "has_ids": completion_ids is not None})  # fmt: skip
        return rewards


def test_grpo_trainer_completes_steps_rewarded_by_the_live_service(live_server, tiny_model_path, tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    dataset = datasets.Dataset.from_dict(
        {
            "prompt": ["What is 2+3? Answer:", "What is 12*3+4? Answer:", "What is 7-2? Answer:", "Name 1+1:"],
            "answer": [["5"], ["40"], ["5", "5.0"], ["2", "two"]],  # equivalent forms per row
        }
    )
    weights = RewardWeights(outcome=1.0, mig=0.5)
    reward = Recording(live_server.url, references_column="answer", weights=weights, options=OPTIONS)
    args = GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=12,
        max_steps=2,
        learning_rate=1e-4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=str(tiny_model_path), reward_funcs=[reward], args=args, train_dataset=dataset)
    trainer.train()

    assert trainer.state.global_step == 2
    all_rewards = [r for call in reward.calls for r in call["rewards"]]
    assert len(set(all_rewards)) > 1  # real, varying process credit reached the trainer
    assert len(reward.calls) >= 2 and all(call["has_ids"] for call in reward.calls)
    logged = [entry for entry in trainer.state.log_history if "rewards/stepcredit/mean" in entry]
    assert len(logged) == 2

    # What the trainer got is what the service says for those exact completions.
    with Client(live_server.url) as client:
        for call in reward.calls:
            assert all(r is not None for r in call["rewards"])
            items = [
                ScoreItem(prompt=p, completion=c, references=[a] if isinstance(a, str) else a)
                for p, c, a in zip(call["prompts"], call["completions"], call["answers"])
            ]
            direct = client.score(items, OPTIONS).results
            expected = [weights.outcome * r.outcome_reward + weights.mig * r.mig_reward for r in direct]
            assert call["rewards"] == pytest.approx(expected, abs=1e-4)
    for entry, call in zip(logged, reward.calls):
        assert entry["rewards/stepcredit/mean"] == pytest.approx(sum(call["rewards"]) / len(call["rewards"]), abs=1e-4)
        assert "stepcredit/mig_reward" in entry and entry["stepcredit/failed"] == 0.0


def test_trl_reward_gives_none_for_an_unscorable_completion(live_server):
    reward = StepCreditReward(live_server.url, references_column="solution")
    too_long = "<think>\n" + "one two three four five\n" * 1500 + "</think>\n<answer>5</answer>"
    good = "<think>\n2 + 3 = 5\n</think>\n<answer>5</answer>"
    rewards = reward(prompts=["Q:", "Q:"], completions=[good, too_long], completion_ids=None, solution=["5", "5"])
    assert rewards[0] is not None and rewards[1] is None


def test_trl_reward_renders_conversational_prompts_with_the_policy_template(live_server, tokenizer):
    prompt = [{"role": "user", "content": "What is 2+3?"}]
    completion = [{"role": "assistant", "content": "<think>\n2 + 3 = 5\n</think>\n<answer>5</answer>"}]
    with_template = StepCreditReward(live_server.url, policy_tokenizer=tokenizer)
    scorer_template = StepCreditReward(live_server.url)
    a = with_template(prompts=[prompt], completions=[completion], answer=["5"])
    b = scorer_template(prompts=[prompt], completions=[completion], answer=["5"])
    assert a[0] is not None and a == pytest.approx(b)  # same template here: same number


def test_trl_reward_names_the_missing_reference_column(live_server):
    with pytest.raises(KeyError, match="answer"):
        StepCreditReward(live_server.url)(prompts=["Q"], completions=["A"], solution=["5"])
