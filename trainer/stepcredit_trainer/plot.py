"""`stepcredit-plot RUN_DIR [RUN_DIR ...] [--out DIR]`: PNGs of a run's metrics.

Writes accuracy.png (eval accuracy vs step and vs generated tokens),
rewards.png (outcome and MIG reward per step) and steps.png (steps per
completion, SFT-gate rate). Several runs are drawn on the same axes,
labelled by their run directory's name.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "plot_runs", "read_jsonl"]


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            records.append(json.loads(line))
    return records


def _series(records: list[dict], x: str, y: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for record in records:
        value = record.get(y)
        if isinstance(value, (int, float)) and math.isfinite(value):
            xs.append(record[x])
            ys.append(value)
    return xs, ys


def plot_runs(runs: Sequence[Path], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    data = {Path(r).name: (read_jsonl(Path(r) / "metrics.jsonl"), read_jsonl(Path(r) / "eval.jsonl")) for r in runs}
    if not any(train or evals for train, evals in data.values()):
        raise FileNotFoundError(f"no metrics.jsonl or eval.jsonl in {', '.join(str(r) for r in runs)}")
    panels = {
        "accuracy.png": [("eval", "step", "eval_accuracy", "eval accuracy"), ("eval", "generated_tokens", "eval_accuracy", "eval accuracy")],
        "rewards.png": [("train", "step", "reward_outcome", "outcome reward"), ("train", "step", "reward_mig", "MIG reward (nats)")],
        "steps.png": [("train", "step", "steps_per_completion", "steps per completion"), ("train", "step", "sft_rate", "SFT-gate rate")],
    }
    written = []
    for name, specs in panels.items():
        fig, axes = plt.subplots(1, len(specs), figsize=(5.5 * len(specs), 4))
        for ax, (kind, x, y, label) in zip(axes, specs):
            for run, (train, evals) in data.items():
                xs, ys = _series(evals if kind == "eval" else train, x, y)
                if xs:
                    ax.plot(xs, ys, marker="o" if kind == "eval" else None, label=run)
            ax.set_xlabel("generated tokens" if x == "generated_tokens" else "step")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stepcredit-plot", description="Plot stepcredit-train runs.")
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (with metrics.jsonl / eval.jsonl)")
    parser.add_argument("--out", type=Path, help="output folder (default: RUN/plots for one run, ./plots for several)")
    args = parser.parse_args(argv)
    out = args.out or (args.runs[0] / "plots" if len(args.runs) == 1 else Path("plots"))
    try:
        paths = plot_runs(args.runs, out)
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        print(f"stepcredit-plot: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
