"""`packed` (one pass per trajectory under a tree mask) must equal `per-prefix`
(one padded sequence per probe and reference) within 1e-4 in float32 (SPEC 8)."""

from __future__ import annotations

import pytest

from benchmarks.workload import varied_items, workload
from stepcredit.backends.hf import HFBackend
from stepcredit.engine import Scorer
from stepcredit.protocol import ScoreItem

TOL = 1e-4


async def score_both(model_path, settings, verifier, items, device="cpu", **packed_kwargs):
    results = {}
    for strategy in ("packed", "per-prefix"):
        kwargs = packed_kwargs if strategy == "packed" else {}
        backend = HFBackend(model_path, device=device, dtype="float32", strategy=strategy, **kwargs)
        try:
            batch = await Scorer(backend, settings, verifier=verifier).score([ScoreItem(**i) for i in items])
        finally:
            backend.shutdown()
        results[strategy] = batch
    return results["packed"], results["per-prefix"]


def assert_same(packed, reference):
    assert len(packed.results) == len(reference.results)
    for a, b in zip(packed.results, reference.results):
        assert a.status == b.status == "ok", (a.id, a.error, b.error)
        assert [(s.char_start, s.char_end) for s in a.steps] == [(s.char_start, s.char_end) for s in b.steps]
        if b.baseline_loglik is None:
            assert a.baseline_loglik is None
            continue
        assert a.baseline_loglik == pytest.approx(b.baseline_loglik, abs=TOL), a.id
        for sa, sb in zip(a.steps, b.steps):
            assert sa.loglik == pytest.approx(sb.loglik, abs=TOL), (a.id, sa.index)
        assert a.mig_reward == pytest.approx(b.mig_reward, abs=TOL), a.id


@pytest.mark.slow
async def test_packed_equals_per_prefix_on_smollm2_over_a_varied_set(smol_path, settings, verifier):
    # The long chains, truncation, split modes and edge cases on the real weights; every
    # format x layout item is checked on the tiny model below (per-prefix on SmolLM2 is the
    # slowest thing CI runs: these nine items were a quarter of it).
    formats = ("think_answer-", "boxed-", "regex-")
    items = [i for i in varied_items(seed=7) if not i["id"].startswith(formats)]
    packed, reference = await score_both(smol_path, settings, verifier, items)
    assert_same(packed, reference)
    by_id = {r.id: r for r in packed.results}
    assert len(by_id["long-34"].steps) == 34 and len(by_id["long-31-wrong"].steps) == 31
    assert by_id["max-steps-5"].steps_truncated and len(by_id["max-steps-5"].steps) == 5
    # The point of packing: far fewer tokens through the model.
    assert packed.usage.tokens_forwarded * 4 < reference.usage.tokens_forwarded


MERGING = {
    # The probe prefix merges with the step's last token ("hel" + "lo" -> "hello"),
    # so probes branch off the trunk before the step end.
    "prompt": "Say it:",
    "completion": "<think>\nhel\nwor\n</think><answer>hello world</answer>",
    "references": ["hello world", "hi"],
    "options": {"probe_prefix": "lo", "step_split": "lines"},
}
NO_PREFIX = {
    # With an empty probe prefix the first reference token is predicted from the trunk itself.
    "prompt": "Count: one two",
    "completion": "<think>\nthree\nfour\nfive\n</think><answer>six</answer>",
    "references": [" six", " seven"],
    "options": {"probe_prefix": ""},
}


async def test_packed_branches_off_where_tokenization_merges_across_the_cut(tiny_model_path, settings, verifier):
    packed, reference = await score_both(tiny_model_path, settings, verifier, [MERGING, NO_PREFIX])
    assert_same(packed, reference)


async def test_packed_splits_trajectories_over_small_token_budgets(tiny_model_path, settings, verifier):
    items = varied_items(seed=3)
    packed, reference = await score_both(
        tiny_model_path, settings, verifier, items, max_batch_tokens=64, max_logit_rows=16, max_batch_rows=2
    )
    assert_same(packed, reference)
    assert packed.usage.forward_passes > len(items)


async def test_a_grpo_group_computes_its_shared_prompt_once_with_the_same_numbers(
    tiny_model_path, tokenizer, settings, verifier
):
    items = workload(n=8, group=4, min_steps=3, max_steps=8, seed=4)
    shared, reference = await score_both(tiny_model_path, settings, verifier, items)
    assert_same(shared, reference)
    plain, _ = await score_both(tiny_model_path, settings, verifier, items, share_min_tokens=0)
    assert_same(plain, reference)
    # Two groups of four rollouts: at least three copies of each question's prompt are saved.
    prompt = len(tokenizer(items[0]["prompt"])["input_ids"])
    assert plain.usage.tokens_forwarded - shared.usage.tokens_forwarded >= 2 * 3 * prompt
    assert shared.usage.forward_passes > plain.usage.forward_passes  # one more pass per shared prefix
