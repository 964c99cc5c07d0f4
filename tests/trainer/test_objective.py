"""The reference trainer's objective: masks, both MIG readings, outcome advantage,
SFT selection, failed items, clipping, aggregation, KL, and a real update loop.

Every expected number is worked out by hand in the comments; TRL 1.16's rule is
advantage = (r − group mean) / (unbiased std + 1e-4)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from stepcredit_client import TokenRewards
from stepcredit_trainer.objective import (
    LossWeights,
    build_targets,
    clipped_pg_loss,
    kl_penalty,
    sft_loss,
    total_loss,
)

EPS = 1e-4


def item(process: list[float], cot: list[int], outcome: float = 0.0, sft: bool = False) -> TokenRewards:
    """TokenRewards as `token_rewards(..., weights=RewardWeights(1, 1))` builds them."""
    n = len(process)
    placed_outcome = [0.0] * (n - 1) + [outcome]
    return TokenRewards(
        rewards=[p + o for p, o in zip(process, placed_outcome)],
        process=list(process),
        outcome=placed_outcome,
        step_ends=[j for j, p in enumerate(process) if p],
        cot_mask=list(cot),
        completion_mask=[1] * n,
        sft_gate=sft,
        scalar=sum(process) + outcome,
    )


def answer_only(n: int, outcome: float) -> TokenRewards:
    return item([0.0] * n, [0] * n, outcome)


def rows(t: torch.Tensor) -> list[list[float]]:
    return t.tolist()


def close(actual: torch.Tensor, expected: list[list[float]]) -> bool:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), rtol=0, atol=1e-6)
    return True


# --- outcome advantage and masks -------------------------------------------------


def test_outcome_advantage_is_group_normalized_on_every_completion_token():
    # Group 1 rewards [1, 0, 0.5]: mean 0.5, deviations ±0.5 and 0, unbiased var
    # (0.25 + 0.25 + 0) / 2 = 0.25, std 0.5. Group 2 rewards [1, 1, 1]: all equal.
    batch = [answer_only(3, 1.0), answer_only(2, 0.0), answer_only(1, 0.5)] + [answer_only(2, 1.0)] * 3
    t = build_targets(batch, 3, mig_reading="sequence")
    a = 0.5 / (0.5 + EPS)
    assert close(t.outcome_adv, 
        [[a, a, a], [-a, -a, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]]
    )
    assert rows(t.outcome_mask) == [[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 0], [1, 1, 0], [1, 1, 0]]
    assert t.stats["outcome_groups_zero_std"] == 1 and t.stats["outcome_groups_too_few"] == 0
    assert t.stats["outcome_reward_mean"] == pytest.approx(4.5 / 6)
    assert t.outcome_adv.dtype == torch.float32 and t.valid.dtype == torch.bool


def test_scale_rewards_batch_divides_by_the_batch_std_and_none_does_not_divide():
    # Rewards [1, 0 | 3, 3]. Group means 0.5 and 3. Batch: mean 1.75, deviations
    # [-0.75, -1.75, 1.25, 1.25], squares sum 6.75, unbiased var 6.75 / 3 = 2.25, std 1.5.
    batch = [answer_only(1, 1.0), answer_only(1, 0.0), answer_only(1, 3.0), answer_only(1, 3.0)]
    by_batch = build_targets(batch, 2, mig_reading="sequence", scale_rewards="batch")
    assert close(by_batch.outcome_adv, [[0.5 / (1.5 + EPS)], [-0.5 / (1.5 + EPS)], [0], [0]])
    unscaled = build_targets(batch, 2, mig_reading="sequence", scale_rewards="none")
    assert close(unscaled.outcome_adv, [[0.5], [-0.5], [0], [0]])
    # Group scaling: std of [1, 0] is sqrt(0.5).
    by_group = build_targets(batch, 2, mig_reading="sequence")
    assert close(by_group.outcome_adv, [[0.5 / (math.sqrt(0.5) + EPS)], [-0.5 / (math.sqrt(0.5) + EPS)], [0], [0]])


# --- failed items ---------------------------------------------------------------


def test_a_failed_item_is_masked_and_left_out_of_the_statistics_not_scored_zero():
    # Valid rewards [1, 0, 0.5] -> mean 0.5, std 0.5, advantages ±0.5/0.5001 and 0.
    # Read as a reward of 0, the failed item would give rewards [1, 0, 0, 0.5]: mean 0.375,
    # deviations [0.625, -0.375, -0.375, 0.125], squares sum 0.6875, var 0.6875 / 3, std 0.4787,
    # and the first advantage would be 0.625 / 0.4787 = 1.31 instead of 1.0.
    batch = [answer_only(2, 1.0), None, answer_only(2, 0.0), answer_only(2, 0.5)]
    t = build_targets(batch, 4, mig_reading="step")
    a = 0.5 / (0.5 + EPS)
    assert close(t.outcome_adv, [[a, a], [0, 0], [-a, -a], [0, 0]])
    assert rows(t.outcome_mask)[1] == [0, 0]
    assert rows(t.mig_mask)[1] == [0, 0] and rows(t.sft_mask)[1] == [0, 0]
    assert t.valid.tolist() == [True, False, True, True]
    assert t.stats["n_failed"] == 1 and t.stats["n_valid"] == 3
    assert t.stats["outcome_reward_mean"] == pytest.approx(0.5)  # 0.375 if the failure counted as 0
    zeroed = build_targets([answer_only(2, r) for r in (1.0, 0.0, 0.0, 0.5)], 4, mig_reading="step")
    assert zeroed.outcome_adv[0, 0].item() == pytest.approx(0.625 / (math.sqrt(0.6875 / 3) + EPS))
    assert zeroed.outcome_adv[0, 0].item() != pytest.approx(t.outcome_adv[0, 0].item(), abs=0.1)


def test_a_group_with_fewer_than_two_valid_items_gets_zero_advantage_but_keeps_its_mask():
    t = build_targets([None, item([1.0, 0.0], [1, 0], 1.0, sft=True)], 2, mig_reading="sequence")
    assert rows(t.outcome_adv) == [[0, 0], [0, 0]] and rows(t.mig_adv) == [[0, 0], [0, 0]]
    assert rows(t.outcome_mask) == [[0, 0], [1, 1]]
    assert rows(t.sft_mask) == [[0, 0], [1, 1]]  # SFT needs no comparison
    assert t.stats["outcome_groups_too_few"] == 1 and t.stats["mig_groups_too_few"] == 1


def test_all_items_failed_gives_empty_masks_and_nan_means():
    t = build_targets([None, None], 2, mig_reading="step", sampled_mask=torch.ones(2, 3))
    assert t.outcome_mask.sum() == 0 and t.mig_mask.sum() == 0 and t.sft_mask.sum() == 0
    assert t.outcome_mask.shape == (2, 3)
    assert math.isnan(t.stats["outcome_reward_mean"]) and t.stats["n_failed"] == 2


# --- MIG readings ----------------------------------------------------------------


def test_sequence_reading_puts_the_group_normalized_mig_reward_on_every_cot_token():
    # mig rewards: A 0.25 + 0.75 = 1.0, B 0.5, C (answer only, no COT) 0.
    # mean 0.5, deviations [0.5, 0, -0.5], unbiased var 0.5/2 = 0.25, std 0.5.
    a_item = item([0.25, 0.0, 0.75, 0.0], [1, 1, 1, 0])
    b_item = item([0.0, 0.5, 0.0], [1, 1, 0])
    c_item = answer_only(2, 0.0)
    t = build_targets([a_item, b_item, c_item], 3, mig_reading="sequence")
    a = 0.5 / (0.5 + EPS)
    # C's advantage would be -a, but it has no COT token to carry it: mask 0.
    assert close(t.mig_adv, [[a, a, a, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    assert rows(t.mig_mask) == [[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]]
    assert t.stats["n_no_cot"] == 1 and t.stats["mig_reward_mean"] == pytest.approx(0.5)


def test_step_reading_whitens_the_reward_to_go_over_the_group_cot_tokens():
    # A: gains 0.5 at token 0 and 1.0 at token 2, COT = tokens 0..2 -> returns [1.5, 1.0, 1.0].
    # B: gain 0.5 at token 1, COT = tokens 0..1                  -> returns [0.5, 0.5].
    # C: no COT (answer only), D failed: neither adds a token to the statistics.
    # Group COT tokens [1.5, 1, 1, 0.5, 0.5]: mean 0.9, deviations [0.6, 0.1, 0.1, -0.4, -0.4],
    # squares 0.36 + 0.01 + 0.01 + 0.16 + 0.16 = 0.70, unbiased var 0.70 / 4 = 0.175.
    a_item = item([0.5, 0.0, 1.0, 0.0], [1, 1, 1, 0], outcome=1.0)
    b_item = item([0.0, 0.5, 0.0], [1, 1, 0])
    c_item = answer_only(1, 1.0)
    t = build_targets([a_item, b_item, c_item, None], 4, mig_reading="step")
    s = math.sqrt(0.175) + EPS
    assert close(t.mig_adv, 
        [[0.6 / s, 0.1 / s, 0.1 / s, 0], [-0.4 / s, -0.4 / s, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    )
    assert rows(t.mig_mask) == [[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    # The sequence reading of the same group is constant along a completion: mig [1.5, 0.5, 0],
    # mean 2/3, deviations [5/6, -1/6, -2/3], var (25/36 + 1/36 + 16/36) / 2 = 7/12.
    seq = build_targets([a_item, b_item, c_item, None], 4, mig_reading="sequence")
    s_seq = math.sqrt(7 / 12) + EPS
    assert close(seq.mig_adv[:2], [[5 / 6 / s_seq] * 3 + [0], [-1 / 6 / s_seq] * 2 + [0, 0]])


def test_step_reading_needs_two_completions_with_cot_tokens():
    # Whitening one completion against itself would reward its early tokens just for
    # coming first (the reward-to-go only falls): no comparison, no advantage.
    batch = [item([1.0, 0.0, 0.0], [1, 1, 0]), answer_only(2, 0.0)]
    t = build_targets(batch, 2, mig_reading="step")
    assert rows(t.mig_adv) == [[0, 0, 0], [0, 0, 0]]
    assert rows(t.mig_mask) == [[1, 1, 0], [0, 0, 0]]
    assert t.stats["mig_groups_too_few"] == 1


def test_step_reading_gives_zero_when_every_cot_return_is_equal():
    batch = [item([0.0, 0.0], [1, 0]), item([0.0, 0.0, 0.0], [1, 1, 0])]
    t = build_targets(batch, 2, mig_reading="step")
    assert t.mig_adv.abs().sum() == 0 and t.stats["mig_groups_zero_std"] == 1


# --- SFT selection and sampled_mask ---------------------------------------------


def test_sft_mask_covers_the_completion_tokens_of_open_gates_only():
    batch = [
        item([0.5, 0.0, 0.0], [1, 0, 0], 1.0, sft=True),
        item([0.5, 0.0], [1, 0], 1.0, sft=False),  # correct but ill-formed: gate shut
        None,
        answer_only(2, 1.0),
    ]
    batch[3] = dataclasses.replace(batch[3], sft_gate=True)  # an answer without COT can pass the gate
    t = build_targets(batch, 2, mig_reading="sequence")
    assert rows(t.sft_mask) == [[1, 1, 1], [0, 0, 0], [0, 0, 0], [1, 1, 0]]
    assert t.stats["n_sft"] == 2 and t.stats["sft_tokens"] == 5


def test_sampled_mask_drops_forced_prefix_and_padding_from_masks_and_statistics():
    # A's token 0 was forced by the loop (a "<think>" prefix), not sampled. A: COT tokens 0..1,
    # gain 1.0 at token 1 -> returns [1, 1], of which only token 1 is sampled. B: returns [0].
    # Step statistics over [1, 0]: mean 0.5, std sqrt(0.5). (With the forced token: [1, 1, 0],
    # mean 2/3, a different advantage.)
    batch = [item([0.0, 1.0, 0.0], [1, 1, 0], 1.0, sft=True), item([0.0, 0.0], [1, 0], 0.0)]
    sampled = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0]])
    t = build_targets(batch, 2, mig_reading="step", sampled_mask=sampled)
    assert rows(t.outcome_mask) == [[0, 1, 1, 0], [1, 1, 0, 0]]
    assert rows(t.mig_mask) == [[0, 1, 0, 0], [1, 0, 0, 0]]
    assert rows(t.sft_mask) == [[0, 1, 1, 0], [0, 0, 0, 0]]
    s = math.sqrt(0.5) + EPS
    assert close(t.mig_adv, [[0, 0.5 / s, 0, 0], [-0.5 / s, 0, 0, 0]])
    unmasked = build_targets(batch, 2, mig_reading="step")
    assert unmasked.mig_adv[0, 1].item() != pytest.approx(t.mig_adv[0, 1].item(), abs=0.05)


def test_sampled_mask_past_an_items_tokens_is_refused_as_misaligned():
    with pytest.raises(ValueError, match="misaligned"):
        build_targets([answer_only(2, 1.0), answer_only(2, 0.0)], 2, mig_reading="step",
                      sampled_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]))


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="groups of 3"):
        build_targets([answer_only(1, 1.0)] * 4, 3, mig_reading="step")
    with pytest.raises(ValueError, match="outside the chain-of-thought"):
        build_targets([item([0.0, 1.0], [1, 0]), answer_only(2, 0.0)], 2, mig_reading="step")
    with pytest.raises(ValueError, match="mig_reading"):
        build_targets([answer_only(1, 1.0)] * 2, 2, mig_reading="token")  # type: ignore[arg-type]


# --- clipped loss, aggregation, KL, SFT ------------------------------------------


def _grad(logp_value: float, adv: float, epsilon_high: float | None = None) -> float:
    logp = torch.tensor([[logp_value]], requires_grad=True)
    loss, _ = clipped_pg_loss(logp, torch.zeros(1, 1), torch.tensor([[adv]]), torch.ones(1, 1),
                              epsilon=0.2, epsilon_high=epsilon_high)
    loss.backward()
    return logp.grad.item()


def test_clipping_stops_the_gradient_only_in_the_clipped_direction():
    up, down, between = math.log(1.5), math.log(0.5), math.log(1.25)
    assert _grad(up, +1.0) == 0.0  # ratio 1.5 > 1.2 with A > 0: clipped
    assert _grad(up, -1.0) == pytest.approx(1.5)  # with A < 0 the unclipped term is the min: d(-r·A)/dlogp = r
    assert _grad(down, -1.0) == 0.0  # ratio 0.5 < 0.8 with A < 0: clipped
    assert _grad(down, +1.0) == pytest.approx(-0.5)
    assert _grad(between, +1.0) == 0.0  # 1.25 > 1 + epsilon
    assert _grad(between, +1.0, epsilon_high=0.28) == pytest.approx(-1.25)  # inside 1 + epsilon_high


def test_clip_stats_count_tokens_clipped_in_the_direction_of_their_advantage():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0, 1.5]]))
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    _, stats = clipped_pg_loss(logp, torch.zeros(1, 4), adv, torch.ones(1, 4))
    assert stats == {"clip_ratio/low": 0.25, "clip_ratio/high": 0.25, "clip_ratio/region": 0.5, "tokens": 4.0}


def test_token_and_sequence_aggregation():
    # On-policy (ratio 1) the per-token loss is -A. Row 0: A = 1 on 3 tokens, row 1: A = -2 on 1 token,
    # row 2: no token (a failed item).
    logp = torch.zeros(3, 3)
    adv = torch.tensor([[1.0, 1.0, 1.0], [-2.0, 0.0, 0.0], [5.0, 5.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    token, _ = clipped_pg_loss(logp, None, adv, mask, aggregation="token")
    assert token.item() == pytest.approx((-3 + 2) / 4)  # tokens sum / 4 tokens
    sequence, _ = clipped_pg_loss(logp, None, adv, mask, aggregation="sequence")
    assert sequence.item() == pytest.approx((-1 + 2) / 2)  # mean of row means, rows with tokens only
    empty, _ = clipped_pg_loss(logp.requires_grad_(), None, adv, torch.zeros(3, 3))
    assert empty.item() == 0.0 and empty.requires_grad


def test_kl_is_trl_k3_and_zero_at_the_reference():
    logp = torch.tensor([[-1.0, -2.0, -3.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert kl_penalty(logp, logp.clone(), mask).item() == 0.0
    # ref - logp = ln 2 on token 0 and 0 on token 1: k3 = 2 - ln 2 - 1 = 0.30685, then 0.
    ref = logp + torch.tensor([[math.log(2.0), 0.0, 7.0]])
    assert kl_penalty(logp, ref, mask).item() == pytest.approx((1 - math.log(2.0)) / 2)
    assert kl_penalty(logp, ref, mask, aggregation="sequence").item() == pytest.approx((1 - math.log(2.0)) / 2)


def test_sft_loss_is_the_mean_token_nll_over_gated_tokens():
    logp = torch.tensor([[-1.0, -2.0, -9.0], [-3.0, -9.0, -9.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert sft_loss(logp, mask).item() == pytest.approx((1 + 2 + 3) / 3)
    none = sft_loss(logp, torch.zeros(2, 3))
    none.backward()
    assert none.item() == 0.0 and logp.grad.abs().sum() == 0


# --- total loss --------------------------------------------------------------------


def _grpo_reference(logp, old_logp, ref_logp, rewards, group_size, mask, kl_beta, aggregation):
    """Plain GRPO as TRL 1.16's _compute_loss writes it (loss_type dapo or grpo, scale_rewards group)."""
    grouped = rewards.view(-1, group_size)
    adv = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1, 1)
    coef_1 = torch.exp(logp - old_logp)
    coef_2 = torch.clamp(coef_1, 1 - 0.2, 1 + 0.2)
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    per_token_loss = per_token_loss + kl_beta * (torch.exp(ref_logp - logp) - (ref_logp - logp) - 1)
    if aggregation == "token":
        return (per_token_loss * mask).sum() / mask.sum()
    return ((per_token_loss * mask).sum(-1) / mask.sum(-1)).mean()


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_total_loss_with_alpha_and_gamma_zero_is_plain_grpo(aggregation):
    torch.manual_seed(0)
    lengths = [3, 5, 2, 4]
    outcome = [1.0, 0.0, 0.0, 1.0]
    batch = [item([0.3] + [0.0] * (n - 1), [1] * (n - 1) + [0], r, sft=r > 0) for n, r in zip(lengths, outcome)]
    t = build_targets(batch, 2, mig_reading="step")
    logp = -torch.rand(4, 5) * 3
    old_logp = logp + 0.3 * torch.randn(4, 5)  # off-policy enough that some ratios clip
    ref_logp = logp + 0.5 * torch.randn(4, 5)
    loss, parts = total_loss(logp, old_logp, ref_logp, t, LossWeights(alpha=0, beta=1, gamma=0, kl_beta=0.04),
                             epsilon=0.2, epsilon_high=None, aggregation=aggregation)
    mask = torch.tensor([[1.0] * n + [0.0] * (5 - n) for n in lengths])
    expected = _grpo_reference(logp, old_logp, ref_logp, torch.tensor(outcome), 2, mask, 0.04, aggregation)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert parts["loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert parts["outcome/clip_ratio/region"] > 0
    assert {"mig", "sft", "kl"} <= parts.keys()  # unused terms are still logged


def test_total_loss_sends_no_gradient_to_a_failed_item():
    batch = [item([0.5, 0.0], [1, 0], 1.0, sft=True), None, item([0.0, 0.0], [1, 0], 0.0), item([1.0, 0.0], [1, 0], 1.0)]
    t = build_targets(batch, 2, mig_reading="sequence", sampled_mask=torch.ones(4, 2))
    logp = (-torch.rand(4, 2)).requires_grad_()
    loss, _ = total_loss(logp, logp.detach() + 0.05, logp.detach() - 0.1, t,
                         LossWeights(alpha=1, beta=1, gamma=1, kl_beta=0.1))
    loss.backward()
    assert logp.grad[1].abs().sum() == 0
    assert logp.grad[0].abs().sum() > 0


def test_loss_weights_and_kl_need_what_they_use():
    with pytest.raises(ValueError, match="at least one"):
        LossWeights(alpha=0, beta=0, gamma=0, kl_beta=1.0)
    with pytest.raises(ValueError, match="finite"):
        LossWeights(alpha=-1, beta=1, gamma=0)
    t = build_targets([answer_only(1, 1.0), answer_only(1, 0.0)], 2, mig_reading="step")
    with pytest.raises(ValueError, match="ref_logp"):
        total_loss(torch.zeros(2, 1), None, None, t, LossWeights(alpha=0, beta=1, gamma=0, kl_beta=0.1))
    with pytest.raises(ValueError, match="one shape"):
        total_loss(torch.zeros(2, 3), None, None, t, LossWeights(alpha=0, beta=1, gamma=0))


# --- a real model on a fixed batch ----------------------------------------------


def _completion_logp(model, prompt: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
    ids = torch.cat([prompt, completion], dim=1)
    logits = model(input_ids=ids).logits[:, prompt.shape[1] - 1 : -1]
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)


def test_full_objective_decreases_on_a_fixed_batch_with_a_tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=1, num_key_value_heads=1, head_dim=64, max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config)
    # Two prompts x G = 3, completions of 6 tokens right-padded; one item failed at the service.
    prompt = torch.randint(0, 64, (6, 4))
    prompt[3:] = prompt[3]
    prompt[:3] = prompt[0]
    completion = torch.randint(0, 64, (6, 6))
    lengths = [6, 4, 5, 6, 3, 5]
    sampled = torch.tensor([[1.0] * n + [0.0] * (6 - n) for n in lengths])
    batch = [
        item([0.4, 0.0, 0.9, 0.0, 0.0, 0.0], [1, 1, 1, 1, 0, 0], 1.0, sft=True),
        item([0.0, 0.2, 0.0, 0.0], [1, 1, 0, 0], 0.0),
        item([0.1, 0.0, 0.0, 0.0, 0.0], [1, 0, 0, 0, 0], 0.0),
        item([0.0, 0.7, 0.0, 0.3, 0.0, 0.0], [1, 1, 1, 1, 1, 0], 1.0, sft=True),
        None,
        item([0.0, 0.0, 0.0, 0.0, 0.0], [0, 0, 0, 0, 0], 0.0),
    ]
    targets = build_targets(batch, 3, mig_reading="step", sampled_mask=sampled)
    weights = LossWeights(alpha=1.0, beta=1.0, gamma=0.1, kl_beta=0.04)
    with torch.no_grad():
        old_logp = _completion_logp(model, prompt, completion)
    ref_logp = old_logp.clone()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = []
    for _ in range(8):
        logp = _completion_logp(model, prompt, completion)
        loss, parts = total_loss(logp, old_logp, ref_logp, targets, weights)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(parts)
    with torch.no_grad():
        _, final = total_loss(_completion_logp(model, prompt, completion), old_logp, ref_logp, targets, weights)
    assert final["loss"] < history[0]["loss"] - 0.1
    assert final["sft"] < history[0]["sft"] and final["outcome"] < history[0]["outcome"]
    assert final["mig"] < history[0]["mig"]
    assert targets.stats["n_failed"] == 1


def test_micro_batches_with_whole_batch_denominators_add_up_to_the_batch_loss():
    """Gradient accumulation: summing micro-batch losses normalized by the whole
    batch's counts gives the batch's loss and gradient, for both aggregations."""
    torch.manual_seed(0)
    rewards = [
        item([0.0, 0.5, 0.0, 0.0], [0, 1, 1, 1], 1.0, sft=True),
        item([0.0, 0.0, 0.2], [0, 1, 1], 0.0),
        None,
        item([0.0, 0.1, 0.0, 0.3, 0.0], [0, 1, 1, 1, 1], 1.0, sft=True),
    ]
    targets = build_targets(rewards, 2, mig_reading="step")
    weights = LossWeights(alpha=1.0, beta=1.0, gamma=0.5, kl_beta=0.1)
    for aggregation in ("token", "sequence"):
        logp = (-torch.rand(4, targets.outcome_mask.shape[1])).requires_grad_()
        ref = -torch.rand(4, targets.outcome_mask.shape[1])
        whole, _ = total_loss(logp, None, ref, targets, weights, aggregation=aggregation)
        (whole_grad,) = torch.autograd.grad(whole, logp)
        den = targets.denominators(aggregation)
        parts = []
        for rows in (slice(0, 1), slice(1, 3), slice(3, 4)):
            loss, _ = total_loss(logp[rows], None, ref[rows], targets.rows(rows), weights, aggregation=aggregation, denominators=den)
            parts.append(loss)
        summed = sum(parts)
        (summed_grad,) = torch.autograd.grad(summed, logp)
        assert torch.allclose(summed, whole, atol=1e-6), aggregation
        assert torch.allclose(summed_grad, whole_grad, atol=1e-6), aggregation
        # Without the whole batch's counts the micro-batches would not add up.
        naive = sum(total_loss(logp[r], None, ref[r], targets.rows(r), weights, aggregation=aggregation)[0]
                    for r in (slice(0, 1), slice(1, 3), slice(3, 4)))
        assert not torch.allclose(naive, whole, atol=1e-4), aggregation
