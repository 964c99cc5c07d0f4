"""`stepcredit-train --config FILE [--output-dir DIR]`: run the reference trainer."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

from .config import ConfigError, load_config

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stepcredit-train",
        description="GRPO with MIG process credit and dual-gated SFT, scored by a running StepCredit service.",
    )
    parser.add_argument("--config", required=True, type=Path, help="TOML config (see trainer/configs/tiny.toml)")
    parser.add_argument("--output-dir", type=Path, help="where metrics, checkpoints and plots go (default: runs/<run.name>)")
    parser.add_argument("--seed", type=int, help="override run.seed")
    parser.add_argument("--steps", type=int, help="override run.steps")
    parser.add_argument("--no-plot", action="store_true", help="do not write plots/ at the end")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides: dict = {}
    if args.seed is not None:
        overrides.setdefault("run", {})["seed"] = args.seed
    if args.steps is not None:
        overrides.setdefault("run", {})["steps"] = args.steps
    try:
        config = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"stepcredit-train: {exc}", file=sys.stderr)
        return 2
    output = args.output_dir or Path("runs") / config.run.name
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # transformers' own bars (loading, writing shards) would tear through the progress bar.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from stepcredit_client import StepCreditError

    from .tasks import TaskError
    from .train import TrainError, train

    def fmt(value) -> str:
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"

    with Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeRemainingColumn(),
    ) as progress:
        bar = progress.add_task("train", total=config.run.steps, status=f"waiting for {config.service.resolved_url()}")

        def on_step(record: dict) -> None:
            status = (
                f"reward {fmt(record.get('reward_outcome'))} mig {fmt(record.get('reward_mig'))} "
                f"acc {fmt(record.get('accuracy'))} {record.get('step_time_s', 0):.1f}s/step"
            )
            if "eval_accuracy" in record:
                status += f" eval {fmt(record['eval_accuracy'])}"
            progress.update(bar, completed=record["step"], status=status)

        try:
            last = train(config, output, on_step=on_step)
        except (TrainError, TaskError, StepCreditError, FileNotFoundError) as exc:
            print(f"stepcredit-train: {exc}", file=sys.stderr)
            return 1
    print(f"done: {output} (final eval accuracy {fmt(last.get('eval_accuracy'))})")
    if not args.no_plot:
        from .plot import plot_runs

        for path in plot_runs([output], output / "plots"):
            print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
