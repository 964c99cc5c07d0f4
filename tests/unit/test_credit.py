"""Watermark, gains and outcome (SPEC sections 5 and 6)."""

import random

import pytest

from stepcredit.credit import mig_credit, outcome_reward


def test_gain_only_when_a_step_beats_the_historical_best():
    credit = mig_credit([[-5.0], [-4.0], [-4.5], [-3.0], [-3.5]])
    assert [s.gain for s in credit.steps] == pytest.approx([1.0, 0.0, 1.0, 0.0])
    assert [s.watermark for s in credit.steps] == [-4.0, -4.0, -3.0, -3.0]
    assert credit.mig_reward == pytest.approx(2.0)


def test_a_drop_then_recovery_earns_nothing_until_past_the_old_best():
    credit = mig_credit([[-2.0], [-6.0], [-2.5], [-1.0]])
    assert [s.gain for s in credit.steps] == pytest.approx([0.0, 0.0, 1.0])


def test_likelihood_is_max_over_references_and_reports_the_winner():
    credit = mig_credit([[-3.0, -2.0], [-1.0, -4.0], [-5.0, -5.0]])
    assert credit.baseline_loglik == -2.0 and credit.baseline_reference == 1
    assert [s.best_reference for s in credit.steps] == [0, 0]  # a tie goes to the gold form
    assert credit.steps[0].gain == pytest.approx(1.0)


def test_mig_equals_final_watermark_minus_baseline_on_random_chains():
    rng = random.Random(1)
    for _ in range(200):
        rows = [[rng.uniform(-9, 0) for _ in range(3)] for _ in range(rng.randint(1, 40))]
        credit = mig_credit(rows)
        top = credit.steps[-1].watermark if credit.steps else credit.baseline_loglik
        assert credit.mig_reward == pytest.approx(max(0.0, top - credit.baseline_loglik))
        assert all(s.gain >= 0 for s in credit.steps)


def test_no_steps_gives_zero_mig_and_the_baseline():
    credit = mig_credit([[-1.5]])
    assert credit.steps == [] and credit.mig_reward == 0.0 and credit.baseline_loglik == -1.5


def test_outcome_reward_weights_correctness_and_format():
    assert outcome_reward(True, False, 1.0, 0.0) == 1.0
    assert outcome_reward(False, True, 1.0, 0.5) == 0.5
    assert outcome_reward(True, True, 2.0, 0.5) == 2.5
