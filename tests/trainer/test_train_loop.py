"""Pieces of the training loop that need no service: the learning-rate schedule."""

from __future__ import annotations

import pytest
import torch

from stepcredit_trainer.train import lr_factor


def test_lr_warms_up_linearly_then_decays_linearly_towards_zero():
    assert [lr_factor(i, 0, 4) for i in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert [lr_factor(i, 2, 6) for i in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]


def test_the_lr_an_update_uses_is_read_before_the_scheduler_steps():
    """train.py logs `optimizer.param_groups[0]["lr"]` before `scheduler.step()`:
    `scheduler.get_last_lr()` after it is the next update's (0 at the last one)."""
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, 0, 2))
    used, after = [], []
    for _ in range(2):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
        after.append(scheduler.get_last_lr()[0])
    assert used == [1.0, 0.5]
    assert after == pytest.approx([0.5, 0.0])  # what the loop logged before


def test_a_run_starts_its_logs_afresh_in_a_reused_output_folder(tmp_path):
    """train() cannot resume: a second run into the same folder (bench_trainer.py
    --resume restarts an unfinished arm there) must not append its steps to the
    first run's, or step 1 appears twice and the plots draw both runs as one."""
    from stepcredit_trainer.plot import read_jsonl
    from stepcredit_trainer.train import _Log

    for run in ("first", "second"):
        log = _Log(tmp_path)
        log.write({"step": 1, "run": run})
        log.write({"step": 0, "run": run}, "eval")
        log.close()
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "run": "second"}]
    assert read_jsonl(tmp_path / "eval.jsonl") == [{"step": 0, "run": "second"}]
