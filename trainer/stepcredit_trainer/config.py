"""The run's configuration: one TOML file, validated by one pydantic model.

Every field is documented here and range-checked; an unknown or bad field is
an error naming it (`task.group_size: ...`). Defaults follow TRL's GRPOConfig
(ε 0.2, ε_high = ε, KL β 0, token-mean "dapo" aggregation, group-scaled
advantages, temperature 1) except where BENCHMARKS.md says we measured
otherwise (the learning rate).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = ["ConfigError", "TrainConfig", "load_config"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServiceConfig(_Section):
    url: str | None = Field(None, description="Service base URL; unset: $STEPCREDIT_URL, else http://127.0.0.1:8000.")
    api_key_env: str = Field("STEPCREDIT_API_KEY", description="Environment variable holding the bearer token, if any.")
    timeout_s: float = Field(600.0, gt=0, le=86400, description="Read timeout of one scoring request.")
    ready_timeout_s: float = Field(600.0, gt=0, le=86400, description="How long to wait for /ready at start.")

    def resolved_url(self) -> str:
        return self.url or os.environ.get("STEPCREDIT_URL") or "http://127.0.0.1:8000"


class PolicyConfig(_Section):
    model: str = Field(
        "default",
        description="`default`: the embedded SmolLM2-135M-Instruct (converted by `stepcredit prepare-model`); "
        "else a local HF causal-LM folder, or a vision-language one (Qwen2-VL, Qwen2.5-VL, with its "
        "preprocessor_config.json) for tasks with images. Never downloaded.",
    )
    device: str = Field("cpu", description="torch device of the policy: cpu, cuda, cuda:1, ...")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Policy weights' dtype.")

    @field_validator("device")
    @classmethod
    def _torch_device(cls, value: str) -> str:
        import torch

        try:
            torch.device(value)
        except (RuntimeError, ValueError) as exc:  # "gpu", "cuda:x": a traceback at load time otherwise
            raise ValueError(f"not a torch device: {exc}") from None
        return value


class TaskConfig(_Section):
    name: str = Field(
        "chain_sum", min_length=1, description="Any reasoning-gym dataset name (default picked by measurement: "
        "BENCHMARKS.md), or `clevr_count`: seeded CLEVR-like scenes with counting questions (needs a VL policy)."
    )
    params: dict[str, object] = Field(
        default_factory=lambda: {"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 1},
        description="Difficulty keyword arguments for reasoning_gym.create_dataset (default: sums of three one-digit terms).",
    )
    train_size: int = Field(512, ge=1, le=1_000_000, description="Prompts in the training split.")
    eval_size: int = Field(64, ge=1, le=100_000, description="Prompts in the held-out eval split.")
    train_seed: int = Field(1, ge=0, description="Seed of the training split.")
    eval_seed: int = Field(
        2, ge=0, description="Seed of the held-out eval split; must differ from train_seed. Its items are drawn in "
        "order, skipping every question the training split holds (reasoning-gym's seed s+1 is seed s shifted by one item)."
    )
    system_prompt: str = Field(
        "You are a careful math assistant. Think step by step inside <think> and </think>, one short "
        "calculation per line. Then give only the final answer inside <answer> and </answer>.\n"
        "Example for 7 + 5 - 3:\n<think>\n7 + 5 = 12\n12 - 3 = 9\n</think>\n<answer>9</answer>",
        max_length=4000,
        description="System message of the chat template.",
    )
    response_prefix: str = Field(
        "<think>\n",
        max_length=200,
        description="Text forced at the start of every completion (part of the completion the service "
        "scores, never trained on). Empty: the policy writes everything.",
    )

    @model_validator(mode="after")
    def _seeds_differ(self) -> TaskConfig:
        if self.train_seed == self.eval_seed:
            raise ValueError("eval_seed must differ from train_seed (the eval split is held out)")
        return self


class RolloutConfig(_Section):
    group_size: int = Field(8, ge=2, le=256, description="G: completions sampled per prompt (GRPO's group).")
    prompts_per_step: int = Field(4, ge=1, le=4096, description="Prompts per update; B = prompts_per_step * G.")
    max_new_tokens: int = Field(256, ge=1, le=32768, description="Completion length cap (tokens).")
    temperature: float = Field(
        0.7, gt=0, le=10, description="Sampling temperature (TRL's default is 1.0; measured: SmolLM2-135M keeps the "
        "format 8x more often at 0.7, BENCHMARKS.md)."
    )
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling.")


class ObjectiveConfig(_Section):
    alpha: float = Field(1.0, ge=0, le=1e3, description="Weight of L_MIG (process credit, COT tokens only).")
    beta: float = Field(1.0, ge=0, le=1e3, description="Weight of L_outcome (GRPO on all completion tokens).")
    gamma: float = Field(0.1, ge=0, le=1e3, description="Weight of L_SFT (NLL on gated completions).")
    format_weight: float = Field(
        0.5, ge=0, le=1e3, description="Outcome reward = correct + format_weight * format_ok (the paper's "
        "accuracy + format; its weight is not public). Sent as the items' format_weight option."
    )
    kl_beta: float = Field(0.0, ge=0, le=1e3, description="KL to the initial policy (TRL's beta; 0 = no reference model).")
    mig_reading: Literal["sequence", "step"] = Field(
        "sequence", description="`sequence`: group-normalized mig_reward on every COT token (the paper); "
        "`step`: per-step gains as reward-to-go, normalized across the group (PRIME)."
    )
    aggregation: Literal["token", "sequence"] = Field(
        "token", description="`token`: sum over tokens / tokens in the batch (TRL's dapo); `sequence`: mean of per-sequence means (grpo)."
    )
    epsilon: float = Field(0.2, gt=0, lt=1, description="Lower clip: ratio >= 1 - epsilon.")
    epsilon_high: float | None = Field(None, gt=0, le=10, description="Upper clip: ratio <= 1 + epsilon_high (unset: epsilon).")
    scale_rewards: Literal["group", "batch", "none"] = Field("group", description="Divide advantages by this std.")

    @model_validator(mode="after")
    def _some_loss(self) -> ObjectiveConfig:
        if self.alpha == self.beta == self.gamma == 0:
            raise ValueError("alpha, beta and gamma are all 0: there is nothing to train on")
        return self


class OptimConfig(_Section):
    learning_rate: float = Field(1e-6, gt=0, le=1, description="AdamW learning rate (TRL's default 1e-6).")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, le=1e6, description="Gradient clipping norm.")
    warmup_steps: int = Field(0, ge=0, le=1_000_000, description="Linear warm-up, then linear decay to 0.")
    micro_batch_size: int = Field(8, ge=1, le=4096, description="Sequences per forward/backward (gradient accumulation).")


class RunConfig(_Section):
    name: str = Field("run", min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._-]+$", description="Run name (revisions, logs).")
    seed: int = Field(0, ge=0, description="Seeds sampling, prompt order and torch.")
    steps: int = Field(100, ge=1, le=10_000_000, description="Policy updates.")
    eval_every: int = Field(10, ge=0, le=10_000_000, description="Evaluate every N steps (and at start and end); 0: start and end only.")
    eval_prompts: int | None = Field(None, ge=1, le=100_000, description="Eval on the first N eval prompts (unset: all).")
    save_every: int = Field(0, ge=0, le=10_000_000, description="Keep a checkpoint every N steps (0: only the final one).")
    scorer: Literal["live", "frozen"] = Field(
        "live", description="`live`: the service scores with the policy being trained (reloaded every reload_every "
        "steps, and once at start); `frozen`: the service keeps its own model."
    )
    reload_every: int = Field(10, ge=1, le=10_000_000, description="Live scorer: save and reload every N steps.")
    keep_reload_checkpoints: int = Field(2, ge=1, le=1000, description="Reload checkpoints kept on disk.")
    log_every: int = Field(1, ge=1, le=1_000_000, description="Write metrics every N steps.")
    report_samples: int = Field(
        16, ge=0, le=5000, description="Completions of each evaluation shown on its step-credit page "
        "(reports/eval-step-N.html; the first N of the eval split); 0: no pages."
    )


class ValidateConfig(_Section):
    """`stepcredit-train validate`: the value-proxy check (is ℓ_k a value estimate?)."""

    problems: int = Field(50, ge=1, le=100_000, description="N: chains to measure (one per problem).")
    samples: int = Field(8, ge=1, le=1024, description="M: continuations sampled from every step prefix to estimate V_k.")
    chains: Literal["policy", "dataset"] = Field(
        "policy", description="`policy`: one sampled rollout of the policy per problem; `dataset`: the task's worked "
        "solutions (metadata[solution_field]), wrapped in the think/answer format."
    )
    solution_field: str = Field("answer_cot", min_length=1, description="chains = dataset: the metadata key of the worked solution.")
    min_steps: int = Field(
        2, ge=1, le=64, description="Chains with fewer steps are passed over. A within-chain rank needs 3 points: "
        "K >= 2 for the valuations (K + 1 prefixes), K >= 3 for the step credits (K steps)."
    )
    attempts: int = Field(
        4, ge=1, le=100, description="chains = policy: problems tried per wanted chain before giving up (rollouts with "
        "fewer than min_steps steps, or that the service fails, are passed over)."
    )
    seed: int = Field(3, ge=0, description="Seed of the problems' dataset (the default differs from the train and eval splits').")
    max_new_tokens: int | None = Field(None, ge=1, le=32768, description="Continuation length cap (unset: rollout.max_new_tokens).")
    temperature: float | None = Field(None, gt=0, le=10, description="Sampling temperature (unset: rollout.temperature).")
    batch_rows: int = Field(64, ge=1, le=4096, description="Sequences per generate call.")
    score_batch: int = Field(64, ge=1, le=4096, description="Items per scoring request.")
    max_without_verdict: float = Field(
        0.1, ge=0, le=1, description="Fail (after writing the files) when more than this share of continuations got no "
        "verdict (service errors, verification time-outs): V_k would rest on the rest."
    )
    bootstrap: int = Field(1000, ge=100, le=100_000, description="Bootstrap resamples (of chains) for the confidence intervals.")
    report_chains: int = Field(50, ge=0, le=5000, description="Chains shown on the step-credit page (chains.html).")


class TrainConfig(_Section):
    # `validate` is a BaseModel method's name: the field is `validate_`, read and written as `validate`.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_by_name=True, serialize_by_alias=True)

    service: ServiceConfig = ServiceConfig()
    policy: PolicyConfig = PolicyConfig()
    task: TaskConfig = TaskConfig()
    rollout: RolloutConfig = RolloutConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    optim: OptimConfig = OptimConfig()
    run: RunConfig = RunConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field."""


def load_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    """Read and validate a TOML config; `overrides` ({"run": {"seed": 3}}) are merged on top."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    for section, values in (overrides or {}).items():
        data.setdefault(section, {}).update(values)
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"]) or "config"
            lines.append(f"{where}: {error['msg']}")
        raise ConfigError(f"{path}: " + "; ".join(lines)) from None
