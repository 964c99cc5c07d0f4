"""`stepcredit-train validate` end to end against a real `stepcredit serve` process:
chains scored, M continuations sampled from every step prefix, each verified by the
service, the figures, the scatter and both pages written. A tiny random Llama with
SmolLM2's tokenizer is policy and scorer (it never solves anything: V_k = 0, and every
ρ is reported as undefined, never as 0)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.processes import serve

BIN = Path(sys.executable).parent
CONTINUATION_TOKENS = 16


def dataset_chain_ids(tokenizer) -> int:
    """Token ids of the first gsm_symbolic (seed 3) worked solution as validate wraps it."""
    from stepcredit_trainer.config import TrainConfig
    from stepcredit_trainer.tasks import load_problems

    task = TrainConfig().task.model_copy(update={"name": "gsm_symbolic", "params": {}})
    (problem,) = load_problems(task, 3, 1, "answer_cot")
    text = f"<think>\n{problem.solution.strip()}\n</think>\n<answer>{problem.references[0]}</answer>"
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_path, tokenizer):
    """The service refuses completions longer than the dataset chain itself: the chain is
    scored, and so are continuations of its early prefixes, but those of its last prefix
    (fewer than CONTINUATION_TOKENS ids before the chain's end) are refused per item."""
    limit = dataset_chain_ids(tokenizer)
    log = tmp_path_factory.mktemp("validate") / "serve.log"
    with serve(["--model", str(tiny_model_path), "--device", "cpu"], log, ready_s=120,
               STEPCREDIT_MAX_TOKEN_IDS=str(limit)) as s:  # fmt: skip
        yield s.base


def run_validate(tmp_path: Path, base: str, model: Path, task: str, validate: str) -> tuple[subprocess.CompletedProcess, Path]:
    config = tmp_path / "validate.toml"
    config.write_text(
        f'[policy]\nmodel = "{model}"\n{task}\n'
        f"[rollout]\nmax_new_tokens = {CONTINUATION_TOKENS}\ntemperature = 1.0\n"
        f"[run]\nname = \"e2e\"\n[validate]\nbootstrap = 100\n{validate}\n"
    )
    out = tmp_path / "out"
    done = subprocess.run(
        [str(BIN / "stepcredit-train"), "validate", "--config", str(config), "--output-dir", str(out)],
        env={**os.environ, "STEPCREDIT_URL": base}, capture_output=True, text=True, timeout=600,
    )
    return done, out


@pytest.mark.slow
def test_dataset_chains_estimate_every_prefix_and_leave_refused_continuations_out(tmp_path, served, tiny_model_path):
    task = '[task]\nname = "gsm_symbolic"\nparams = {}'
    done, out = run_validate(tmp_path, served, tiny_model_path, task,
                             'chains = "dataset"\nproblems = 1\nsamples = 2\nmin_steps = 2\nmax_without_verdict = 0.5')  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads((out / "figures.json").read_text())
    (chain,) = [json.loads(line) for line in (out / "chains.jsonl").read_text().splitlines()]
    steps = len(chain["gains"])
    assert steps >= 3  # the worked solution's paragraphs
    assert len(chain["loglik"]) == len(chain["watermark"]) == len(chain["values"]) == steps + 1
    assert figures["chains"] == 1 and figures["continuations"] == 2 * (steps + 1)
    # The last prefix's continuations ran past the service's token limit: no verdict,
    # so no V_K (never a V_K of 0); the earlier prefixes have both verdicts.
    assert chain["verdicts"][-1] == 0 and chain["values"][-1] is None
    assert chain["verdicts"][:-1] == [2] * steps
    assert chain["unverified"] == [0] * steps + [2]
    # A random model never stops within the cap: every verdict is of a cut-off continuation.
    assert chain["truncated"] == chain["verdicts"] and figures["cut_off_share_first_prefix"] == 1.0
    assert all(v == 0.0 for v in chain["values"][:-1])  # a random model solves nothing
    assert figures["continuations_without_verdict"] == 2
    # V is constant: no ρ is defined, and none is reported as a number.
    assert figures["value"]["likelihood"]["pooled"]["rho"] is None
    assert "n/a" in done.stdout and "ρ vs V_k, pooled" in done.stdout
    # The chain's own numbers are the service's: the watermark is the running max of ℓ.
    running = [chain["loglik"][0]]
    for ell in chain["loglik"][1:]:
        running.append(max(running[-1], ell))
    assert chain["watermark"] == pytest.approx(running)
    for name in ("scatter.png", "validate.html", "chains.html", "chain_items.jsonl", "chain_results.jsonl"):
        assert (out / name).stat().st_size > 500, name
    page = (out / "validate.html").read_text()
    assert "data:image/png;base64," in page and "http://" not in page and "https://" not in page
    # --reanalyze recomputes the same statistics from chains.jsonl, without a service.
    again = subprocess.run([str(BIN / "stepcredit-train"), "validate", "--reanalyze", str(out)],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stderr
    refigured = json.loads((out / "figures.json").read_text())
    assert refigured["value"] == figures["value"] and refigured["credit"] == figures["credit"]


@pytest.mark.slow
def test_policy_chains_are_sampled_scored_and_continued(tmp_path, served, tiny_model_path):
    task = '[task]\nname = "chain_sum"'
    done, out = run_validate(tmp_path, served, tiny_model_path, task, "problems = 2\nsamples = 2\nmin_steps = 1")
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads((out / "figures.json").read_text())
    chains = [json.loads(line) for line in (out / "chains.jsonl").read_text().splitlines()]
    assert figures["chains"] == len(chains) == 2 and figures["chains_from"] == "policy"
    assert figures["continuations"] == sum(2 * len(c["values"]) for c in chains)
    assert all(c["verdicts"] == [2] * len(c["values"]) for c in chains)
    items = [json.loads(line) for line in (out / "chain_items.jsonl").read_text().splitlines()]
    assert [i["completion"].startswith("<think>\n") for i in items] == [True, True]


@pytest.mark.slow
def test_too_many_continuations_without_a_verdict_fail_the_check_after_writing_its_files(tmp_path, served, tiny_model_path):
    """2 of the 12 continuations (17%) have no verdict, over the default 10%: the figures
    would lean on the rest, so the command says so and ends with status 1."""
    task = '[task]\nname = "gsm_symbolic"\nparams = {}'
    done, out = run_validate(tmp_path, served, tiny_model_path, task, 'chains = "dataset"\nproblems = 1\nsamples = 2')
    assert done.returncode == 1
    assert "got no verdict" in done.stderr and "max_without_verdict = 0.1" in done.stderr
    assert (out / "chains.jsonl").exists() and (out / "figures.json").exists()


def test_reanalyze_of_a_folder_without_a_run_says_so(tmp_path):
    done = subprocess.run([str(BIN / "stepcredit-train"), "validate", "--reanalyze", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 1 and "holds no finished validate run" in done.stderr


def test_a_config_error_is_reported_by_field_before_anything_loads(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[validate]\nsamples = 0\n")
    done = subprocess.run([str(BIN / "stepcredit-train"), "validate", "--config", str(config)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and "validate.samples" in done.stderr
