"""`stepcredit-train --config FILE [--output-dir DIR]`: run the reference trainer.

`stepcredit-train validate --config FILE [--output-dir DIR]`: the value-proxy check
(is the step likelihood ℓ_k a value estimate for this policy and task?).
"""

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
        description="GRPO with MIG process credit and dual-gated SFT, scored by a running StepCredit service. "
        "`stepcredit-train validate --config FILE`: the value-proxy check.",
    )
    parser.add_argument("--config", required=True, type=Path, help="TOML config (see trainer/configs/tiny.toml)")
    parser.add_argument("--output-dir", type=Path, help="where metrics, checkpoints and plots go (default: runs/<run.name>)")
    parser.add_argument("--seed", type=int, help="override run.seed")
    parser.add_argument("--steps", type=int, help="override run.steps")
    parser.add_argument("--no-plot", action="store_true", help="do not write plots/ at the end")
    return parser


def _validate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stepcredit-train validate",
        description="The value-proxy check: Spearman ρ of the step likelihood ℓ_k (and of MIG's gains) against "
        "Monte-Carlo step values V_k estimated by sampling the policy from every step prefix.",
    )
    parser.add_argument("--config", type=Path, help="TOML config; its [validate] section (trainer/configs/validate.toml)")
    parser.add_argument(
        "--reanalyze", type=Path, metavar="DIR",
        help="recompute the statistics of a finished run in DIR from its chains.jsonl (no sampling, no service)",
    )
    parser.add_argument("--output-dir", type=Path, help="where figures.json, scatter.png and the pages go (default: runs/<run.name>-validate)")
    parser.add_argument("--problems", type=int, help="override validate.problems (N)")
    parser.add_argument("--samples", type=int, help="override validate.samples (M)")
    parser.add_argument("--seed", type=int, help="override validate.seed")
    return parser


def _quiet_transformers() -> None:
    # transformers' own bars (loading, writing shards) would tear through the progress bar.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _validate(argv: list[str]) -> int:
    parser = _validate_parser()
    args = parser.parse_args(argv)
    if args.reanalyze is not None:
        from .validate import ValidateError, markdown_table, reanalyze

        try:
            figures = reanalyze(args.reanalyze)
        except ValidateError as exc:
            print(f"stepcredit-train validate: {exc}", file=sys.stderr)
            return 1
        print(markdown_table(figures))
        return 0
    if args.config is None:
        parser.error("--config is required (or --reanalyze DIR)")
    overrides = {name: getattr(args, name) for name in ("problems", "samples", "seed") if getattr(args, name) is not None}
    try:
        config = load_config(args.config, {"validate": overrides} if overrides else None)
    except ConfigError as exc:
        print(f"stepcredit-train validate: {exc}", file=sys.stderr)
        return 2
    output = args.output_dir or Path("runs") / f"{config.run.name}-validate"
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _quiet_transformers()

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from stepcredit_client import StepCreditError

    from .tasks import TaskError
    from .validate import ValidateError, markdown_table, validate

    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()
    ) as progress:
        bars: dict[str, int] = {}

        def on_progress(phase: str, done: int, total: int) -> None:
            if phase not in bars:
                bars[phase] = progress.add_task(phase, total=total)
            progress.update(bars[phase], completed=done, total=total)

        try:
            figures = validate(config, output, on_progress=on_progress)
        except (ValidateError, TaskError, StepCreditError, FileNotFoundError) as exc:
            print(f"stepcredit-train validate: {exc}", file=sys.stderr)
            return 1
    print(markdown_table(figures))
    print(f"done: {output} (figures.json, scatter.png, validate.html, chains.html)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["validate"]:
        return _validate(argv[1:])
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
    _quiet_transformers()

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
