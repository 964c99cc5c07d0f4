"""The reference trainer with a vision-language policy on the scene task: the loop runs
against a real `stepcredit serve` of the tiny random Qwen2-VL, every item scores (images
sent inline), the live scorer reloads onto the policy's checkpoints (which carry the image
processor), and a text-only policy on a visual task is refused before any work."""

from __future__ import annotations

import json

import pytest

from stepcredit_trainer.config import TrainConfig
from stepcredit_trainer.rollout import load_policy
from stepcredit_trainer.train import TrainError, train


def vl_config(model, url: str | None = None) -> TrainConfig:
    return TrainConfig.model_validate({
        "service": {"url": url, "ready_timeout_s": 60},
        "policy": {"model": str(model)},
        "task": {"name": "clevr_count", "params": {"width": 112, "height": 112, "max_objects": 4},
                 "train_size": 4, "eval_size": 2, "system_prompt": "Count. Think in <think></think>."},
        "rollout": {"group_size": 2, "prompts_per_step": 2, "max_new_tokens": 6},
        "objective": {"kl_beta": 0.01},
        "optim": {"learning_rate": 1e-3, "micro_batch_size": 3},
        "run": {"name": "vl", "steps": 2, "eval_every": 0, "reload_every": 1, "scorer": "live", "report_samples": 2},
    })  # fmt: skip


def test_a_text_only_policy_on_the_visual_task_is_refused_before_any_work(tiny_model_path, tmp_path):
    with pytest.raises(TrainError, match="text-only model: use a vision-language policy"):
        train(vl_config(tiny_model_path, "http://127.0.0.1:9"), tmp_path)  # no service is ever asked


@pytest.mark.slow
def test_the_loop_trains_a_vl_policy_scored_live_by_a_vl_service(tiny_vl_path, tmp_path):
    from tests.e2e.processes import serve

    with serve(["--model", str(tiny_vl_path), "--device", "cpu"], tmp_path / "serve.log", ready_s=120) as served:
        last = train(vl_config(tiny_vl_path, served.base), tmp_path / "out")

    out = tmp_path / "out"
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["items_failed"] == 0 and r["request_error"] is None and r["targets/n_valid"] == 4
    # Each step scored by the checkpoint reloaded before it (live scorer).
    assert [r["revision"] for r in steps] == ["vl-step-0", "vl-step-1"]
    assert "loss/kl" in steps[1] and steps[1]["loss/kl"] > 0  # the policy moved away from the reference
    assert last["eval_errors"] == 0 and last["eval_prompts"] == 2
    # The checkpoints carry the image processor: the service and a reloaded policy read images with it.
    final = load_policy(out / "checkpoints" / "final")
    assert (out / "checkpoints" / "final" / "preprocessor_config.json").is_file() and final.vision is not None
    assert (out / "reports" / "eval-step-2.html").is_file()
