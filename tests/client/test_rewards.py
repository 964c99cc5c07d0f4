"""Reward composition and token placement: per-step gains on the POLICY's tokens,
with real tokenizers whose offsets differ from the scorer's, on live results."""

from __future__ import annotations

import pytest

from stepcredit_client import (
    AlignmentError,
    Client,
    DecodeAlignment,
    ItemFailedError,
    OffsetAlignment,
    RewardWeights,
    ScoreResult,
    scalar_reward,
    scalar_rewards,
    token_rewards,
)

from .conftest import PROMPT
from .policy_tokenizers import bert_wordpiece, byte_bpe

COMPLETION = (
    "<think>\nFirst multiply twelve by three: 12 * 3 = 36.\nThen add four: 36 + 4 = 40.\n"
    "So the answer is forty.\n</think>\n<answer>40</answer>"
)
WEIGHTS = RewardWeights(outcome=1.0, mig=10.0)


@pytest.fixture(scope="module")
def scored(live_server) -> ScoreResult:
    with Client(live_server.url) as client:
        (result,) = client.score([{"prompt": PROMPT, "completion": COMPLETION, "references": ["40"]}]).results
    assert result.status == "ok" and len(result.steps) == 3
    return result


@pytest.fixture(scope="module")
def policies(tokenizer):
    return {"smollm2": tokenizer, "byte_bpe": byte_bpe(), "bert_wordpiece": bert_wordpiece()}


def covering_token(offsets, char: int) -> int:
    return next(j for j, (a, b) in enumerate(offsets) if a <= char < b)


@pytest.mark.parametrize("name", ["smollm2", "byte_bpe", "bert_wordpiece"])
def test_each_gain_lands_on_the_token_holding_its_steps_last_character(scored, policies, name):
    tok = policies[name]
    offsets = tok(COMPLETION, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    placed = token_rewards(scored, OffsetAlignment(offsets), weights=WEIGHTS)
    for step, j in zip(scored.steps, placed.step_ends):
        assert j == covering_token(offsets, step.char_end - 1), (name, step)
        assert placed.process[j] == pytest.approx(WEIGHTS.mig * step.gain)
    assert sum(1 for p in placed.process if p) <= len(scored.steps)
    assert placed.outcome[-1] == pytest.approx(scored.outcome_reward) and sum(placed.outcome[:-1]) == 0
    assert sum(placed.rewards) == pytest.approx(placed.scalar) == pytest.approx(scalar_reward(scored, WEIGHTS))
    assert len(placed.rewards) == len(offsets) == sum(placed.completion_mask)


def test_the_tokenizers_really_place_steps_at_different_indices(scored, policies):
    ends = {
        name: token_rewards(scored, OffsetAlignment.from_tokenizer(tok, COMPLETION)).step_ends
        for name, tok in policies.items()
    }
    assert len({tuple(v) for v in ends.values()}) == 3, ends


@pytest.mark.parametrize("name", ["smollm2", "byte_bpe"])
def test_cot_mask_covers_exactly_the_tokens_of_the_cot_span(scored, policies, name):
    tok = policies[name]
    offsets = tok(COMPLETION, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    placed = token_rewards(scored, OffsetAlignment(offsets))
    start, end = scored.cot_span
    expected = [1 if a < end and b > start else 0 for a, b in offsets]
    assert placed.cot_mask == expected
    assert all(placed.cot_mask[j] for j in placed.step_ends)
    assert placed.cot_mask[-1] == 0  # "</answer>" is outside the chain of thought


@pytest.mark.parametrize("name", ["smollm2", "byte_bpe"])
def test_decoding_the_policys_ids_agrees_with_its_offsets(scored, policies, name):
    tok = policies[name]
    ids = tok(COMPLETION, add_special_tokens=False)["input_ids"]
    by_ids = token_rewards(scored, DecodeAlignment(tok, ids, COMPLETION), weights=WEIGHTS)
    by_offsets = token_rewards(scored, OffsetAlignment.from_tokenizer(tok, COMPLETION), weights=WEIGHTS)
    assert by_ids.step_ends == by_offsets.step_ends and by_ids.cot_mask == by_offsets.cot_mask
    assert by_ids.rewards == by_offsets.rewards


def test_sampled_non_canonical_ids_are_placed_by_their_own_boundaries(scored, policies):
    # A policy may sample a word piece by piece; re-tokenizing the text would then
    # put the gain on the wrong index. One token per character, then decode-located:
    tok = policies["byte_bpe"]
    ids = [i for ch in COMPLETION for i in tok(ch, add_special_tokens=False)["input_ids"]]
    assert tok.decode(ids) == COMPLETION and len(ids) > len(tok(COMPLETION)["input_ids"])
    placed = token_rewards(scored, DecodeAlignment(tok, ids, COMPLETION))
    for step, j in zip(scored.steps, placed.step_ends):
        assert len(tok.decode(ids[:j])) < step.char_end <= len(tok.decode(ids[: j + 1]))


def test_a_tokenizer_whose_decode_rewrites_the_text_is_refused_not_guessed(policies):
    tok = policies["bert_wordpiece"]  # lower-cases and re-spaces punctuation
    ids = tok(COMPLETION, add_special_tokens=False)["input_ids"]
    with pytest.raises(AlignmentError):
        DecodeAlignment(tok, ids, COMPLETION)


def test_service_token_spans_place_gains_when_ids_were_sent(live_server, tokenizer, scored):
    ids = tokenizer(COMPLETION, add_special_tokens=False)["input_ids"]
    item = {"prompt": PROMPT, "completion": COMPLETION, "references": ["40"], "completion_token_ids": ids}
    with Client(live_server.url) as client:
        (by_ids,) = client.score([item]).results
    assert by_ids.tokenization == "ids"
    from_service = token_rewards(by_ids, None, n_tokens=len(ids))
    from_offsets = token_rewards(by_ids, OffsetAlignment.from_tokenizer(tokenizer, COMPLETION))
    assert from_service.step_ends == from_offsets.step_ends
    assert sum(from_service.rewards) == pytest.approx(scalar_reward(by_ids))
    with pytest.raises(AlignmentError):
        token_rewards(scored, None, n_tokens=len(ids))  # a text-mode result has no token spans


def test_weights_compose_outcome_and_mig(scored):
    assert scalar_reward(scored, RewardWeights(outcome=2.0, mig=0.5)) == pytest.approx(
        2.0 * scored.outcome_reward + 0.5 * scored.mig_reward
    )
    assert scalar_reward(scored, RewardWeights(outcome=0.0, mig=1.0)) == pytest.approx(scored.mig_reward)


def test_failed_or_missing_results_are_none_in_lists_and_raise_alone():
    failed = ScoreResult(id="x", status="error", error={"code": "context_too_long", "message": "m"})
    assert scalar_rewards([failed, None]) == [None, None]
    for bad in (failed, None):
        with pytest.raises(ItemFailedError):
            scalar_reward(bad)
        with pytest.raises(ItemFailedError):
            token_rewards(bad, OffsetAlignment([(0, 1)]))
