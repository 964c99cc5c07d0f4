"""The reference trainer: pick the task by measurement, then compare the three objectives.

    # 1. pass@1 and pass@G of the untrained policy on candidate tasks
    .venv/bin/python benchmarks/bench_trainer.py baseline [--prompts 32] [--group 8]
    # 2. GRPO vs GRPO+MIG vs the full method, identical budgets and seeds
    .venv/bin/python benchmarks/bench_trainer.py experiment [--seeds 0 1] [--steps 16]

Both need a running service on the embedded model (`python3 scripts/dev.py
serve`, or STEPCREDIT_URL). `experiment` trains from `trainer/configs/bench.toml`
with only the objective's weights changed between arms; runs go to
benchmarks/results/trainer/<arm>-seed<k>/, the summary to
benchmarks/results/trainer_experiment.json and trainer_experiment.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

# The candidates measured for the default task (reasoning-gym names and difficulty).
CANDIDATES = [
    ("chain_sum", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}),
    ("chain_sum", {"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 1}),
    ("basic_arithmetic", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1, "allow_parentheses": False, "allow_negation": False}),
    ("leg_counting", {"min_animals": 1, "max_animals": 2, "min_instances": 1, "max_instances": 3}),
]

# The three objectives compared: only these weights differ between arms.
ARMS = {
    "grpo": {"alpha": 0.0, "beta": 1.0, "gamma": 0.0},
    "grpo_mig": {"alpha": 1.0, "beta": 1.0, "gamma": 0.0},
    "full": {"alpha": 1.0, "beta": 1.0, "gamma": 0.1},
}


def _machine() -> dict:
    return {"machine": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}


def baseline(args) -> dict:
    import torch
    from stepcredit_client import Client, ClientConfig

    from stepcredit_trainer.config import TaskConfig, TrainConfig
    from stepcredit_trainer.evaluate import evaluate
    from stepcredit_trainer.rollout import load_policy, resolve_policy_path
    from stepcredit_trainer.tasks import load_split

    defaults = TrainConfig()
    policy = load_policy(resolve_policy_path("default"))
    rows = []
    url = os.environ.get("STEPCREDIT_URL", "http://127.0.0.1:8000")
    with Client(url, config=ClientConfig(timeout=600)) as client:
        client.wait_until_ready()
        for name, params in CANDIDATES:
            for temperature in args.temperatures:
                torch.manual_seed(0)
                # The untrained policy has seen no training prompt: a one-question training split
                # keeps small problem spaces (2 one-digit terms: 100 questions) measurable.
                task = TaskConfig(name=name, params=params, train_size=1, eval_size=args.prompts)
                started = time.perf_counter()
                result = evaluate(
                    policy,
                    client,
                    load_split(task, "eval"),
                    system_prompt=task.system_prompt,
                    response_prefix=task.response_prefix,
                    max_new_tokens=args.max_new_tokens,
                    options={"format_weight": defaults.objective.format_weight},
                    samples=args.group,
                    temperature=temperature,
                )
                row = {"task": name, "params": params, "temperature": temperature, **result, "seconds": time.perf_counter() - started}
                rows.append(row)
                print(
                    f"{name:18s} {json.dumps(params):90s} T={temperature:.1f}  pass@1 {row['eval_pass@1']:.3f}  "
                    f"pass@{args.group} {row[f'eval_pass@{args.group}']:.3f}  format {row['eval_format']:.3f}  "
                    f"steps {row['eval_steps']:.2f}  tokens {row['eval_tokens']:.1f}  ({row['seconds']:.0f} s)",
                    flush=True,
                )
    out = {"what": "untrained SmolLM2-135M-Instruct on candidate tasks", "prompts": args.prompts, "group": args.group,
           "max_new_tokens": args.max_new_tokens, **_machine(), "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "trainer_baseline.json").write_text(json.dumps(out, indent=2))
    return out


def _final(records: list[dict], key: str) -> float:
    values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
    return values[-1] if values else math.nan


def _mean(values: list[float]) -> float:
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(values) / len(values) if values else math.nan


def experiment(args) -> dict:
    from stepcredit_trainer.config import load_config
    from stepcredit_trainer.plot import read_jsonl
    from stepcredit_trainer.train import train

    runs: dict[str, list[Path]] = {arm: [] for arm in args.arms}
    for seed in args.seeds:
        for arm in args.arms:
            out = RESULTS / "trainer" / f"{arm}-seed{seed}"
            if out.exists() and not args.resume:
                import shutil

                shutil.rmtree(out)
            if not (out / "done").exists():
                overrides = {"objective": ARMS[arm], "run": {"seed": seed, "name": f"{arm}-seed{seed}", "steps": args.steps}}
                config = load_config(args.config, overrides)
                started = time.perf_counter()
                train(config, out)
                print(f"{arm} seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)
                # Checkpoints are not results: keep the metrics, drop the weights.
                import shutil

                shutil.rmtree(out / "checkpoints", ignore_errors=True)
                (out / "done").write_text("finished\n")
            runs[arm].append(out)

    summary = []
    for arm, folders in runs.items():
        evals = [read_jsonl(f / "eval.jsonl") for f in folders]
        trains = [read_jsonl(f / "metrics.jsonl") for f in folders]
        summary.append({
            "arm": arm,
            "weights": ARMS[arm],
            "seeds": args.seeds,
            "eval_accuracy_start": _mean([e[0]["eval_accuracy"] for e in evals]),
            "eval_accuracy_end": _mean([_final(e, "eval_accuracy") for e in evals]),
            "eval_accuracy_end_per_seed": [_final(e, "eval_accuracy") for e in evals],
            "eval_format_end": _mean([_final(e, "eval_format") for e in evals]),
            "generated_tokens": _mean([_final(t, "generated_tokens") for t in trains]),
            "steps_per_completion_first": _mean([t[0]["steps_per_completion"] for t in trains]),
            "steps_per_completion_last": _mean([_mean([r["steps_per_completion"] for r in t[-3:]]) for t in trains]),
            "sft_rate": _mean([_mean([r["sft_rate"] for r in t]) for t in trains]),
            "train_accuracy": _mean([_mean([r["accuracy"] for r in t]) for t in trains]),
            "items_failed": sum(sum(r["items_failed"] for r in t) for t in trains),
            "seconds_per_step": _mean([_mean([r["step_time_s"] for r in t]) for t in trains]),
        })
    print("| arm | eval acc start | eval acc end (per seed) | eval format end | steps/completion first→last | SFT-gate rate | train acc | generated tokens | s/step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s in summary:
        seeds = ", ".join(f"{v:.3f}" for v in s["eval_accuracy_end_per_seed"])
        print(f"| {s['arm']} | {s['eval_accuracy_start']:.3f} | {s['eval_accuracy_end']:.3f} ({seeds}) | {s['eval_format_end']:.3f} | "
              f"{s['steps_per_completion_first']:.2f} → {s['steps_per_completion_last']:.2f} | {s['sft_rate']:.3f} | "
              f"{s['train_accuracy']:.3f} | {s['generated_tokens']:.0f} | {s['seconds_per_step']:.1f} |")
    out = {"config": str(Path(args.config).relative_to(ROOT)) if Path(args.config).is_absolute() else str(args.config),
           "steps": args.steps, **_machine(), "arms": summary}
    (RESULTS / "trainer_experiment.json").write_text(json.dumps(out, indent=2))
    _plot(runs, RESULTS / "trainer_experiment.png")
    return out


def _plot(runs: dict[str, list[Path]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stepcredit_trainer.plot import read_jsonl

    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    for arm, folders in runs.items():
        for i, folder in enumerate(folders):
            evals = read_jsonl(folder / "eval.jsonl")
            train = read_jsonl(folder / "metrics.jsonl")
            style = {"color": f"C{list(runs).index(arm)}", "alpha": 0.8, "label": arm if i == 0 else None,
                     "linestyle": ["-", "--", ":"][i % 3]}
            axes[0].plot([e["step"] for e in evals], [e["eval_accuracy"] for e in evals], marker="o", **style)
            axes[1].plot([e["generated_tokens"] for e in evals], [e["eval_accuracy"] for e in evals], marker="o", **style)
            axes[2].plot([t["step"] for t in train], [t["steps_per_completion"] for t in train], **style)
    for ax, (x, y) in zip(axes, [("step", "eval accuracy (greedy)"), ("generated tokens", "eval accuracy (greedy)"), ("step", "steps per completion")]):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("GRPO vs GRPO+MIG vs full (MIG + SFT); line style = seed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("baseline")
    b.add_argument("--prompts", type=int, default=32)
    b.add_argument("--group", type=int, default=8)
    b.add_argument("--max-new-tokens", type=int, default=96)
    b.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.7])
    e = sub.add_parser("experiment")
    e.add_argument("--config", type=Path, default=ROOT / "trainer" / "configs" / "bench.toml")
    e.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    e.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    e.add_argument("--steps", type=int, default=16)
    e.add_argument("--resume", action="store_true", help="keep finished runs")
    args = parser.parse_args()
    baseline(args) if args.command == "baseline" else experiment(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
