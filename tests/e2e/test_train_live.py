"""The reference trainer end to end against real `stepcredit serve` processes:
`stepcredit-train --config` samples, scores through the client, updates the
policy, reloads the service onto it (the live scorer), evaluates, checkpoints
and plots. A tiny random Llama with SmolLM2's tokenizer plays policy and scorer."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file

from tests.e2e.processes import serve

BIN = Path(sys.executable).parent


@contextmanager
def serve_tiny(model: Path, log: Path, **env: str):
    with serve(["--model", str(model), "--device", "cpu"], log, ready_s=120, **env) as served:
        yield served.base


def config_text(model: Path, **sections) -> str:
    base = {
        "policy": {"model": str(model)},
        "task": {"name": "chain_sum", "params": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
                 "train_size": 8, "eval_size": 2},
        "rollout": {"group_size": 2, "prompts_per_step": 2, "max_new_tokens": 8},
        "objective": {"alpha": 1.0, "beta": 1.0, "gamma": 0.1, "mig_reading": "step"},
        "optim": {"learning_rate": 1e-3, "micro_batch_size": 3},
        "run": {"name": "e2e", "steps": 2, "eval_every": 0, "reload_every": 1, "scorer": "live"},
    }
    for name, values in sections.items():
        base[name] = {**base[name], **values}
    lines = []
    for name, values in base.items():
        lines.append(f"[{name}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value) if not isinstance(value, dict) else '{ ' + ', '.join(f'{k} = {json.dumps(v)}' for k, v in value.items()) + ' }'}")
    return "\n".join(lines) + "\n"


def run_train(tmp_path: Path, base: str, text: str) -> tuple[subprocess.CompletedProcess, Path]:
    config = tmp_path / "run.toml"
    config.write_text(text)
    out = tmp_path / "out"
    env = {**os.environ, "STEPCREDIT_URL": base}
    done = subprocess.run(
        [str(BIN / "stepcredit-train"), "--config", str(config), "--output-dir", str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    return done, out


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_train_updates_the_policy_and_the_service_scores_with_it(tmp_path, tiny_model_path):
    with serve_tiny(tiny_model_path, tmp_path / "serve.log") as base:
        done, out = run_train(tmp_path, base, config_text(tiny_model_path))
        assert done.returncode == 0, done.stdout + done.stderr
        served = httpx.get(f"{base}/v1/model", timeout=10).json()

    train = records(out / "metrics.jsonl")
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        assert r["items_failed"] == 0 and r["request_error"] is None
        assert all(isinstance(r[k], float) for k in ("loss/loss", "loss/outcome", "loss/mig", "loss/sft", "grad_norm"))
        assert r["targets/n_valid"] == 4
    # The learning rate each update used (linear decay from 1e-3 over 2 steps), not the next one's.
    assert [r["lr"] for r in train] == pytest.approx([1e-3, 5e-4])
    # The live scorer: step k was scored by the checkpoint saved after step k-1.
    assert [r["revision"] for r in train] == ["e2e-step-0", "e2e-step-1"]
    assert served["revision"] == "e2e-step-1"
    evals = records(out / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 2] and all(e["eval_prompts"] == 2 for e in evals)
    run = json.loads((out / "run.json").read_text())
    assert run["initial_revision"] == "e2e-step-0" and run["revisions"]["2"] == ["e2e-step-1"]
    assert json.loads((out / "config.json").read_text())["run"]["name"] == "e2e"
    meta = json.loads((out / "checkpoints" / "final" / "stepcredit_trainer.json").read_text())
    assert meta["step"] == 2 and meta["scored_by_revision"] == "e2e-step-1" and meta["config"]["run"]["steps"] == 2
    # The update moved the weights.
    before = load_file(tiny_model_path / "model.safetensors")
    after = load_file(out / "checkpoints" / "final" / "model.safetensors")
    assert any(not before[k].equal(after[k]) for k in before)
    for name in ("accuracy.png", "rewards.png", "steps.png"):
        assert (out / "plots" / name).stat().st_size > 1000
    # A step-credit page per evaluation, holding that evaluation's scored completions.
    for step in (0, 2):
        page = (out / "reports" / f"eval-step-{step}.html").read_text()
        assert page.count("chain_sum-eval-2-") >= 2 and "e2e: eval at step" in page


@pytest.mark.slow
def test_items_the_service_fails_are_counted_and_masked_not_rewarded(tmp_path, tiny_model_path):
    """A service whose token limit refuses every completion: each item is an error,
    the loop masks them (no reward, no gradient), logs them and keeps going."""
    with serve_tiny(tiny_model_path, tmp_path / "serve.log", STEPCREDIT_MAX_TOKEN_IDS="16") as base:
        text = config_text(
            tiny_model_path,
            rollout={"max_new_tokens": 24, "temperature": 1.0},
            run={"scorer": "frozen", "steps": 1},
            objective={"gamma": 1.0},
        )
        done, out = run_train(tmp_path, base, text)
    assert done.returncode == 0, done.stdout + done.stderr
    (record,) = records(out / "metrics.jsonl")
    # Completions longer than 16 ids fail at the service (a random model almost never
    # stops within 24 tokens); each failed item is counted by the loop and the targets.
    assert record["items_failed"] == record["targets/n_failed"] >= 1
    assert record["targets/n_valid"] == 4 - record["items_failed"]
    # The eval page shows the items the service refused as errors (greedy eval completions
    # run past 16 ids too), not as completions with a reward.
    page = (out / "reports" / "eval-step-1.html").read_text()
    assert re.search(r'"status":\s*"error"', page) and "limit" in page
    if record["items_failed"] == 4:  # nothing was scored: nothing may be learned
        assert record["reward_outcome"] is None and record["grad_norm"] == 0.0
        before = load_file(tiny_model_path / "model.safetensors")
        after = load_file(out / "checkpoints" / "final" / "model.safetensors")
        assert all(before[k].equal(after[k]) for k in before)
