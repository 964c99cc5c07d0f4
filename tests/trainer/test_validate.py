"""The value-proxy check's statistics, by hand: what each valuation and credit is,
how V_k without a verdict is left out, and what pooled / within-chain ρ and their
chain-bootstrap intervals report."""

from __future__ import annotations

import math

import pytest

from stepcredit_trainer.config import ConfigError, TrainConfig, load_config
from stepcredit_trainer.validate import ChainData, analyze, credits, markdown_table, valuations


def chain(loglik, values, cid="c"):
    watermark, gains = [loglik[0]], []
    for ell in loglik[1:]:
        gains.append(max(0.0, ell - watermark[-1]))
        watermark.append(max(watermark[-1], ell))
    return ChainData(cid, list(loglik), watermark, gains, list(values), [8] * len(values), False)


def test_valuations_and_credits_of_one_chain_by_hand():
    c = chain([-2.0, -1.0, -1.5], [0.0, 0.5, 0.25])
    v = valuations(c)
    assert v["likelihood"] == [-2.0, -1.0, -1.5]
    assert v["watermark"] == [-2.0, -1.0, -1.0]
    assert v["position"] == [0.0, 0.5, 1.0]
    assert v["final_only"] == [-1.5, -1.5, -1.5]
    # weights 1, 2, 3 on ℓ_0, ℓ_1, ℓ_2: -2, (-2 - 2)/3, (-2 - 2 - 4.5)/6
    assert v["position_weighted"] == pytest.approx([-2.0, -4 / 3, -8.5 / 6])
    g = credits(c)
    assert g["mig_gain"] == [1.0, 0.0]
    assert g["plain_delta"] == [1.0, -0.5]
    assert g["position"] == [0.5, 1.0]
    assert g["final_only"] == [0.5, 0.5]
    assert g["position_weighted"] == pytest.approx([-4 / 3 + 2, -8.5 / 6 + 4 / 3])


def test_a_likelihood_that_orders_values_perfectly_has_rho_one_with_a_tight_interval():
    def value(ell):  # any increasing function of ℓ: the ranks agree exactly
        return 1 / (1 + math.exp(-ell))

    logliks = [[-3.0 + i / 7, -2.0 + i / 7, -1.0 + i / 7, -0.5 + i / 7] for i in range(6)]
    chains = [chain(ell, [value(x) for x in ell], f"c{i}") for i, ell in enumerate(logliks)]
    figures = analyze(chains, rounds=200)
    ell = figures["value"]["likelihood"]
    assert ell["pooled"]["rho"] == pytest.approx(1.0)
    assert ell["pooled"]["points"] == 24
    assert ell["within"] == {"rho": pytest.approx(1.0), "ci95": [pytest.approx(1.0), pytest.approx(1.0)], "chains": 6}
    # ℓ_K is one number per chain: it cannot rank a chain's steps (undefined, never 0).
    assert figures["value"]["final_only"]["within"]["rho"] is None
    assert figures["value"]["final_only"]["within"]["chains"] == 0


def test_an_anti_ordered_valuation_is_negative_and_the_interval_contains_the_estimate():
    chains = [chain([-1.0, -2.0, -3.0], [0.1, 0.5, 0.9], "a"), chain([-0.5, -1.5, -2.0], [0.0, 0.3, 0.7], "b"),
              chain([-2.0, -2.5, -4.0], [0.2, 0.4, 1.0], "c")]  # fmt: skip
    figures = analyze(chains * 2, rounds=300, seed=1)
    within = figures["value"]["likelihood"]["within"]
    assert within["rho"] == pytest.approx(-1.0)
    pooled = figures["value"]["likelihood"]["pooled"]
    assert -1.0 <= pooled["rho"] < 0
    low, high = pooled["ci95"]
    assert low <= pooled["rho"] <= high
    # position k/K rises with V in every chain
    assert figures["value"]["position"]["within"]["rho"] == pytest.approx(1.0)


def test_too_few_chains_get_an_estimate_but_no_interval():
    """Resampling one ranked chain yields the same ρ every time: an interval of width 0
    would read as certainty. Under 5 chains there is none, and the table says so."""
    ranked = chain([-2.0, -1.0, -0.5, -0.2], [0.1, 0.3, 0.2, 0.8], "ranked")
    others = [chain([-2.0, -1.0 - 0.1 * i], [0.1 * i, 0.2], str(i)) for i in range(6)]  # K = 1: 1 ΔV point
    figures = analyze([ranked, *others], rounds=200)
    credit = figures["credit"]["plain_delta"]["within"]
    assert credit["chains"] == 1 and credit["rho"] is not None and credit["ci95"] is None
    assert figures["value"]["likelihood"]["pooled"]["ci95"] is not None  # 7 chains behind it
    assert "[no interval] (1 chains)" in markdown_table(figures)
    # Nor does the paired difference get one from that single ranked chain.
    assert figures["comparisons"]["mig_gain_minus_position"]["within"]["ci95"] is None


def test_a_prefix_without_a_verdict_is_left_out_not_read_as_zero():
    """V_k = None (no continuation of that prefix was verified): its point, and the two
    ΔV that touch it, leave the sample; reading it as 0 would invent a drop in value."""
    c = chain([-2.0, -1.0, -0.5, -0.2], [0.1, None, 0.6, 0.8])
    figures = analyze([c, chain([-2.0, -1.5, -1.0, -0.1], [0.0, 0.2, 0.3, 0.9], "d")], rounds=100)
    assert figures["value"]["likelihood"]["pooled"]["points"] == 3 + 4
    assert figures["credit"]["plain_delta"]["pooled"]["points"] == 1 + 3


def test_constant_values_give_no_correlation_rather_than_zero():
    """A weak policy that never solves the task: V_k = 0 everywhere, ρ is undefined."""
    figures = analyze([chain([-2.0, -1.0, -0.5], [0.0, 0.0, 0.0], str(i)) for i in range(3)], rounds=100)
    for group in ("value", "credit"):
        for entry in figures[group].values():
            assert entry["pooled"]["rho"] is None and entry["pooled"]["ci95"] is None
            assert entry["within"]["rho"] is None
    assert "n/a" in markdown_table(figures)


def test_the_bootstrap_is_reproducible_from_its_seed():
    chains = [chain([-2.0, -1.0 - 0.1 * i, -0.5], [0.1, 0.05 * i, 0.6], str(i)) for i in range(6)]
    assert analyze(chains, rounds=200, seed=4) == analyze(chains, rounds=200, seed=4)
    assert not math.isnan(analyze(chains, rounds=200)["value"]["likelihood"]["pooled"]["rho"])


def test_the_validate_section_is_read_checked_and_overridden(tmp_path):
    path = tmp_path / "v.toml"
    path.write_text('[validate]\nproblems = 7\nsamples = 3\nchains = "dataset"\n')
    config = load_config(path, {"validate": {"samples": 5}})
    assert (config.validate_.problems, config.validate_.samples, config.validate_.chains) == (7, 5, "dataset")
    # written back under its TOML name (config.json of a run)
    assert '"validate"' in config.model_dump_json()
    assert TrainConfig().validate_.samples == 8
    for bad, field in (("samples = 0", "validate.samples"), ('chains = "mine"', "validate.chains"),
                       ("problemz = 3", "validate.problemz")):  # fmt: skip
        path.write_text(f"[validate]\n{bad}\n")
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_config(path)


def test_dataset_chains_from_a_task_without_worked_solutions_are_refused_by_name():
    from stepcredit_trainer.tasks import TaskError, load_problems

    task = TrainConfig().task
    with pytest.raises(TaskError, match=r"metadata\['answer_cot'\]"):
        load_problems(task, 3, 2, "answer_cot")
    gsm = task.model_copy(update={"name": "gsm_symbolic", "params": {}})
    (problem,) = load_problems(gsm, 3, 1, "answer_cot")
    assert problem.solution and problem.references[0] in problem.solution


def test_a_continuation_without_a_verdict_is_counted_apart_never_as_wrong():
    """A verification time-out or a failed item has no verdict: reading it as a wrong answer
    would lower V_k wherever verification is slow or continuations run long."""
    from stepcredit_client import ScoreResult

    from stepcredit_trainer.validate import count_verdict

    counts = [0, 0, 0, 0]
    right = ScoreResult(status="ok", correct=True, verify_timeout=False)
    wrong = ScoreResult(status="ok", correct=False, verify_timeout=False)
    timed_out = ScoreResult(status="ok", correct=False, verify_timeout=True)
    failed = ScoreResult(status="error", error={"code": "limit_exceeded", "message": "too long"})
    verdicts = [count_verdict(counts, r, t) for r, t in ((right, False), (wrong, True), (timed_out, False), (failed, False), (None, False))]
    assert verdicts == [True, True, False, False, False]
    assert counts == [1, 2, 3, 1]  # correct, verdicts, unverified, cut off at the token cap


def test_paired_bootstrap_gives_the_difference_to_position_an_interval():
    def value(ell):
        return 1 / (1 + math.exp(-ell))

    # ℓ orders the values; position does not (values fall along these chains).
    logliks = [[-0.5 + i / 9, -1.0 + i / 9, -2.0 + i / 9, -3.0 + i / 9] for i in range(8)]
    figures = analyze([chain(ell, [value(x) for x in ell], str(i)) for i, ell in enumerate(logliks)], rounds=300)
    difference = figures["comparisons"]["likelihood_minus_position"]
    expected = figures["value"]["likelihood"]["within"]["rho"] - figures["value"]["position"]["within"]["rho"]
    assert difference["within"]["difference"] == pytest.approx(expected) == pytest.approx(2.0)
    low, high = difference["pooled"]["ci95"]
    assert 0 < low <= difference["pooled"]["difference"] <= high
    assert "ρ(ℓ_k, V_k) − ρ(k/K, V_k): pooled +" in markdown_table(figures)


def test_reanalyze_refuses_chains_of_the_wrong_shape(tmp_path):
    import json

    from stepcredit_trainer.validate import ValidateError, reanalyze

    good = chain([-2.0, -1.0, -0.5], [0.1, 0.2, 0.4])
    (tmp_path / "figures.json").write_text(json.dumps({"settings": {"bootstrap": 100}}))
    bad = {**good.__dict__, "values": [0.1, 0.2]}
    (tmp_path / "chains.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(ValidateError, match="values has 2 entries, not K \\+ 1 = 3"):
        reanalyze(tmp_path)
    (tmp_path / "chains.jsonl").write_text(json.dumps({**good.__dict__, "gains": [], "loglik": [-1.0],
                                                       "watermark": [-1.0], "values": [0.5]}) + "\n")  # fmt: skip
    with pytest.raises(ValidateError, match="no steps"):
        reanalyze(tmp_path)
    (tmp_path / "figures.json").write_text(json.dumps({"settings": {"bootstrap": 1}}))
    (tmp_path / "chains.jsonl").write_text(json.dumps(good.__dict__) + "\n")
    with pytest.raises(ValidateError, match="bootstrap"):
        reanalyze(tmp_path)


def test_a_text_only_policy_on_a_visual_task_is_refused_before_the_service_is_asked(tiny_model_path, tmp_path):
    from stepcredit_trainer.validate import ValidateError, validate

    config = TrainConfig.model_validate({
        "service": {"url": "http://127.0.0.1:9", "ready_timeout_s": 1},  # nothing listens: never reached
        "policy": {"model": str(tiny_model_path)},
        "task": {"name": "clevr_count", "params": {"width": 112, "height": 112}},
        "validate": {"problems": 1},
    })  # fmt: skip
    with pytest.raises(ValidateError, match="asks about images and policy.model is a text-only model"):
        validate(config, tmp_path)
