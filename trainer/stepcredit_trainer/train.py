"""The training loop, top to bottom (nanoGPT's train.py is the model for its shape).

    for step in 1..steps:
        1. take the next prompts of the training split
        2. sample G completions per prompt from the policy
        3. score them through the service (the only contact with it)
        4. place rewards on the policy's tokens; advantages and masks
        5. loss = α·L_MIG + β·L_outcome + γ·L_SFT (+ KL); backward; optimizer step
        6. log; 7. evaluate; 8. save and (live scorer) reload the service

Outputs under the run directory: config.json, run.json (service model and the
revisions that scored each step), metrics.jsonl, eval.jsonl, checkpoints/, reports/
(a step-credit page of each evaluation's first `run.report_samples` completions),
plots/ (after the run) and TensorBoard events when tensorboard is installed.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from stepcredit_client import Client, ClientConfig, RewardWeights, token_rewards
from stepcredit_client import StepCreditError

from .config import TrainConfig
from .evaluate import PageSample, evaluate, mean, score_rollouts
from .objective import LossWeights, build_targets, total_loss
from .rollout import Policy, load_policy, resolve_policy_path, text_only_mismatch
from .tasks import load_split

__all__ = ["TrainError", "lr_factor", "train"]


class TrainError(RuntimeError):
    pass


class _Log:
    """metrics.jsonl / eval.jsonl, plus TensorBoard when it is installed."""

    def __init__(self, out: Path) -> None:
        # A run starts its logs afresh: appended to an earlier run's in the same folder,
        # its steps would repeat and the plots would draw both as one.
        self.metrics = (out / "metrics.jsonl").open("w", encoding="utf-8")
        self.evals = (out / "eval.jsonl").open("w", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            self.board = None

    def write(self, record: dict, kind: str = "train") -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        stream = self.metrics if kind == "train" else self.evals
        stream.write(json.dumps(clean) + "\n")
        stream.flush()
        if self.board is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                    self.board.add_scalar(f"{kind}/{key}", value, record["step"])

    def close(self) -> None:
        self.metrics.close()
        self.evals.close()
        if self.board is not None:
            self.board.close()


def _check_same_tokenizer(policy: Policy, client: Client) -> None:
    """The loop sends the policy's token ids: the scorer must read them the same way."""
    info = client.model()
    if info.vocab_size is not None and info.vocab_size < len(policy.tokenizer):
        raise TrainError(
            f"the service's model ({info.name}, vocab {info.vocab_size}) cannot read the policy's token ids "
            f"(vocab {len(policy.tokenizer)}): serve a model with the policy's tokenizer"
        )


def _save(policy: Policy, folder: Path, meta: dict | None = None) -> Path:
    """Write a checkpoint atomically (the service may be reading the previous one),
    with the run's config and the revision that scored its last step beside the weights."""
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    policy.model.save_pretrained(staging, safe_serialization=True)
    policy.tokenizer.save_pretrained(staging)
    if policy.vision is not None:  # the service (and a reload of the policy) reads images with it
        policy.vision.processor.save_pretrained(staging)
    if meta is not None:
        (staging / "stepcredit_trainer.json").write_text(json.dumps(meta, indent=2, default=str))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)
    return folder


def _reload(client: Client, policy: Policy, out: Path, revision: str, kept: list[Path], keep: int) -> str:
    """Save the policy and have the service score with it; keep the last `keep` folders
    (in the order they were written: file times can be too coarse to tell)."""
    folder = _save(policy, out / "checkpoints" / "scorer" / revision)
    try:
        info = client.reload(str(folder.resolve()), revision=revision)
    except StepCreditError as exc:
        raise TrainError(f"the service refused to reload {folder}: {exc}") from exc
    kept.append(folder)
    while len(kept) > keep:
        shutil.rmtree(kept.pop(0), ignore_errors=True)
    return info.model.revision or revision


def train(
    config: TrainConfig,
    output_dir: str | Path,
    *,
    client: Client | None = None,
    on_step: Callable[[dict], None] | None = None,
) -> dict:
    """Run the loop; returns the last metrics record (with the final eval's)."""
    out = Path(output_dir)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(config.model_dump_json(indent=2))
    random.seed(config.run.seed)
    torch.manual_seed(config.run.seed)

    # 0. tasks, policy, service
    train_split = load_split(config.task, "train")
    eval_split = load_split(config.task, "eval")[: config.run.eval_prompts]
    policy = load_policy(resolve_policy_path(config.policy.model), config.policy.device, config.policy.dtype)
    if mismatch := text_only_mismatch(policy, config.task.name, [*train_split, *eval_split]):
        raise TrainError(mismatch)
    reference = None
    if config.objective.kl_beta > 0:
        reference = copy.deepcopy(policy.model).eval().requires_grad_(False)
    own_client = client is None
    if client is None:
        api_key = os.environ.get(config.service.api_key_env) or None
        client = Client(
            config.service.resolved_url(), api_key=api_key, config=ClientConfig(timeout=config.service.timeout_s)
        )
    client.wait_until_ready(config.service.ready_timeout_s)
    _check_same_tokenizer(policy, client)
    options = {"format": "think_answer", "acc_weight": 1.0, "format_weight": config.objective.format_weight}

    optimizer = torch.optim.AdamW(
        policy.model.parameters(), lr=config.optim.learning_rate, weight_decay=config.optim.weight_decay
    )
    warmup, total = config.optim.warmup_steps, config.run.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total))
    weights = LossWeights(
        alpha=config.objective.alpha,
        beta=config.objective.beta,
        gamma=config.objective.gamma,
        kl_beta=config.objective.kl_beta,
    )
    sampling = {
        "system_prompt": config.task.system_prompt,
        "response_prefix": config.task.response_prefix,
        "max_new_tokens": config.rollout.max_new_tokens,
    }
    log = _Log(out)
    run = {"service": client.model().model_dump(), "revisions": {}, "started": time.time()}
    revision = run["service"].get("revision")
    scorer_folders: list[Path] = []
    if config.run.scorer == "live":
        revision = _reload(
            client, policy, out, f"{config.run.name}-step-0", scorer_folders, config.run.keep_reload_checkpoints
        )
    run["initial_revision"] = revision
    (out / "run.json").write_text(json.dumps(run, indent=2, default=str))

    def run_eval(step: int, generated: int) -> dict:
        page = PageSample(config.run.report_samples)
        result = evaluate(policy, client, eval_split, options=options, on_scored=page, **sampling)
        record = {"step": step, "generated_tokens": generated, **result}
        log.write(record, "eval")
        if page.items:
            meta = {"run": config.run.name, "step": step, "scored by": ", ".join(sorted(page.revisions)) or None,
                    "eval accuracy": result.get("eval_accuracy")}  # fmt: skip
            page.write(out / "reports" / f"eval-step-{step}.html", title=f"{config.run.name}: eval at step {step}", meta=meta)
        return record

    generated_tokens = 0
    last = run_eval(0, 0)
    order: list[int] = []
    group = config.rollout.group_size
    for step in range(1, config.run.steps + 1):
        started = time.perf_counter()
        # 1. the next prompts (a fresh shuffle of the split each epoch)
        while len(order) < config.rollout.prompts_per_step:
            epoch = list(range(len(train_split)))
            random.shuffle(epoch)
            order.extend(epoch)
        problems = [train_split[i] for i in order[: config.rollout.prompts_per_step]]
        del order[: config.rollout.prompts_per_step]

        # 2. G completions per prompt, sampled from the current policy
        rollouts = policy.sample(
            problems,
            group_size=group,
            temperature=config.rollout.temperature,
            top_p=config.rollout.top_p,
            **sampling,
        )
        generated_tokens += sum(len(r.sampled_ids) for r in rollouts)

        # 3. score through the service
        scored = score_rollouts(client, rollouts, options)
        if scored.revisions:
            run["revisions"][str(step)] = scored.revisions

        # 4. rewards on the policy's own tokens -> advantages and masks
        input_ids, attention, completion_ids, sampled_mask, _ = policy.layout(rollouts)
        placed = []
        for rollout, result in zip(rollouts, scored.results):
            if result is None or result.status != "ok":
                placed.append(None)
                continue
            placed.append(token_rewards(result, n_tokens=len(rollout.completion_ids), weights=RewardWeights(1.0, 1.0)))
        targets = build_targets(
            placed,
            group,
            mig_reading=config.objective.mig_reading,
            scale_rewards=config.objective.scale_rewards,
            sampled_mask=sampled_mask.cpu(),
        ).to(policy.device)

        # 5. loss over micro-batches (normalized over the whole batch), one optimizer step
        policy.model.train()
        optimizer.zero_grad(set_to_none=True)
        parts_sum: dict[str, float] = {}
        denominators = targets.denominators(config.objective.aggregation)
        size = config.optim.micro_batch_size
        for lo in range(0, len(rollouts), size):
            rows = slice(lo, lo + size)
            batch = (input_ids[rows], attention[rows], completion_ids[rows])
            logp = policy.token_logprobs(*batch, config.rollout.temperature, rollouts[rows])
            ref_logp = None
            if reference is not None:
                with torch.no_grad():
                    ref_logp = _ref_logprobs(reference, policy, *batch, rollouts[rows], config)
            loss, parts = total_loss(
                logp,
                None,
                ref_logp,
                targets.rows(rows),
                weights,
                epsilon=config.objective.epsilon,
                epsilon_high=config.objective.epsilon_high,
                aggregation=config.objective.aggregation,
                denominators=denominators,
            )
            loss.backward()
            for key, value in parts.items():
                parts_sum[key] = parts_sum.get(key, 0.0) + value
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.model.parameters(), config.optim.max_grad_norm)
        lr = optimizer.param_groups[0]["lr"]  # this update's (after scheduler.step() it is the next one's)
        optimizer.step()
        scheduler.step()

        # 6. log
        ok = [r for r in scored.results if r is not None and r.status == "ok"]
        record = {
            "step": step,
            "generated_tokens": generated_tokens,
            "step_time_s": time.perf_counter() - started,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "reward_outcome": mean([r.outcome_reward for r in ok]),
            "reward_mig": mean([r.mig_reward for r in ok]),
            "accuracy": mean([float(bool(r.correct)) for r in ok]),
            "format": mean([float(bool(r.format_ok)) for r in ok]),
            "sft_rate": mean([float(bool(r.sft_gate)) for r in ok]),
            "steps_per_completion": mean([float(len(r.steps)) for r in ok]),
            "completion_tokens": mean([float(len(r.sampled_ids)) for r in rollouts]),
            "truncated": mean([float(r.truncated) for r in rollouts]),
            "items_failed": float(len(rollouts) - len(ok)),
            "request_error": scored.request_error,
            "revision": scored.revisions[0] if len(scored.revisions) == 1 else scored.revisions,
            **{f"loss/{k}": v for k, v in parts_sum.items() if k in ("loss", "outcome", "mig", "sft", "kl")},
            **{f"targets/{k}": v for k, v in targets.stats.items()},
        }
        if step % config.run.log_every == 0 or step == config.run.steps:
            log.write(record)
        last = record

        # 7. evaluate
        if step == config.run.steps or (config.run.eval_every and step % config.run.eval_every == 0):
            last = {**record, **run_eval(step, generated_tokens)}
        if on_step is not None:
            on_step(last)

        # 8. checkpoints, and the scorer follows the policy
        if config.run.save_every and step % config.run.save_every == 0:
            _save(policy, out / "checkpoints" / f"step-{step}", _meta(config, step, record))
        if config.run.scorer == "live" and step % config.run.reload_every == 0 and step < config.run.steps:
            name = f"{config.run.name}-step-{step}"
            _reload(client, policy, out, name, scorer_folders, config.run.keep_reload_checkpoints)

    _save(policy, out / "checkpoints" / "final", _meta(config, config.run.steps, last))
    run["finished"] = time.time()
    (out / "run.json").write_text(json.dumps(run, indent=2, default=str))
    log.close()
    if own_client:
        client.close()
    return last


def _ref_logprobs(
    reference, policy: Policy, input_ids, attention, completion_ids, rollouts, config: TrainConfig
) -> torch.Tensor:
    """The initial policy's log-probs of the same tokens (for the KL term)."""
    live = policy.model
    policy.model = reference
    try:
        return policy.token_logprobs(input_ids, attention, completion_ids, config.rollout.temperature, rollouts)
    finally:
        policy.model = live


def _meta(config: TrainConfig, step: int, record: dict) -> dict:
    return {"step": step, "scored_by_revision": record.get("revision"), "config": config.model_dump()}


def lr_factor(index: int, warmup: int, total: int) -> float:
    """The learning rate of update `index` (0-based) over the configured one: linear
    warm-up over `warmup` updates, then linear decay towards 0 at update `total`."""
    return min((index + 1) / max(warmup, 1), max(0.0, (total - index) / max(total - warmup, 1)))

