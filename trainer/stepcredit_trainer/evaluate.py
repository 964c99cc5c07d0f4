"""Score rollouts through the service, and measure a policy on a split.

`score_rollouts` is the trainer's only contact with the service: it sends the
policy's own token ids (the policy and the scorer share a tokenizer, checked
at start), so the service reports step ends as indices into those tokens. A
problem's images go with its items as `images` (inline data URIs); the prompt
marks their places with the chat template's placeholder, as the service expects.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from stepcredit_client import Client, ScoreResult

from .rollout import Policy, Rollout
from .tasks import Problem

__all__ = ["PageSample", "Scored", "evaluate", "mean", "score_rollouts"]


@dataclass
class Scored:
    results: list[ScoreResult | None]
    """One per rollout, in order; None where no result arrived (a failed request)."""
    revisions: list[str]
    """The model revision(s) that scored them."""
    request_error: str | None = None


def score_rollouts(client: Client, rollouts: Sequence[Rollout], options: dict) -> Scored:
    """Results in rollout order. A failed request does not stop training: its items
    come back as None (they are masked out, never rewarded 0)."""
    from stepcredit_client import IncompleteBatchError, MixedRevisionsError, StepCreditError

    items = [
        {
            "id": str(i),
            "prompt": r.prompt,
            "completion": r.completion,
            "references": list(r.problem.references),
            "completion_token_ids": r.completion_ids,
            **({"images": list(r.problem.images)} if r.problem.images else {}),
        }
        for i, r in enumerate(rollouts)
    ]
    try:
        # Someone reloading the service mid-batch: the client scores the old revision's
        # items again (rewards from two models' likelihoods are not one batch's).
        response = client.score(items, options)
    except MixedRevisionsError as exc:
        return Scored([None] * len(items), sorted({m.revision or "" for m in exc.models}), f"MixedRevisionsError: {exc}")
    except IncompleteBatchError as exc:
        return Scored(list(exc.results), [], f"{type(exc).__name__}: {exc}")
    except StepCreditError as exc:
        return Scored([None] * len(items), [], f"{type(exc).__name__}: {exc}")
    return Scored(list(response.results), [response.model.revision or ""])


class PageSample:
    """The first `size` scored rollouts of an evaluation, as the step-credit page's items
    and results; an item the service did not score is shown as an error, never dropped."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: list[dict] = []
        self.results: list[dict] = []
        self.revisions: set[str] = set()

    def __call__(self, rollouts: Sequence[Rollout], scored: Scored) -> None:
        if len(self.items) < self.size:
            self.revisions.update(scored.revisions)
        for rollout, result in zip(rollouts, scored.results):
            if len(self.items) >= self.size:
                return
            self.items.append({
                "id": rollout.problem.id,
                "prompt": rollout.prompt,
                "completion": rollout.completion,
                "references": list(rollout.problem.references),
                **({"images": list(rollout.problem.images)} if rollout.problem.images else {}),
            })  # fmt: skip
            if result is None:
                message = scored.request_error or "no result arrived for this item"
                self.results.append({"id": rollout.problem.id, "status": "error",
                                     "error": {"code": "request_failed", "message": message}})  # fmt: skip
            else:
                self.results.append(result.model_dump(mode="json"))

    def write(self, path, **kwargs) -> None:
        from stepcredit_client.report import write_report

        write_report(path, self.items, self.results, **kwargs)


def mean(values: Iterable[float]) -> float:
    """The mean, NaN (never 0) for no values: an empty batch has no accuracy."""
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def evaluate(
    policy: Policy,
    client: Client,
    problems: Sequence[Problem],
    *,
    system_prompt: str,
    response_prefix: str,
    max_new_tokens: int,
    options: dict,
    samples: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_prompts: int = 16,
    on_scored: Callable[[Sequence[Rollout], Scored], None] | None = None,
) -> dict[str, float]:
    """Accuracy of the policy on `problems`.

    samples == 1: greedy decoding, `accuracy` = fraction correct. samples > 1:
    sampled at `temperature`, `pass@1` (mean fraction correct per prompt, the
    unbiased estimator with n = k·samples) and `pass@{samples}` (prompts with any
    correct sample). Failed items are counted in `eval_errors` and left out.
    `on_scored` sees every chunk's rollouts and their results (the step-credit page).
    """
    greedy = samples == 1
    correct: list[list[bool]] = []
    formats, steps, tokens, migs, errors = [], [], [], [], 0
    for start in range(0, len(problems), batch_prompts):
        chunk = problems[start : start + batch_prompts]
        rollouts = policy.sample(
            chunk,
            system_prompt=system_prompt,
            response_prefix=response_prefix,
            group_size=samples,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            greedy=greedy,
        )
        scored = score_rollouts(client, rollouts, options)
        if on_scored is not None:
            on_scored(rollouts, scored)
        for p in range(len(chunk)):
            group = []
            for r, result in zip(rollouts[p * samples : (p + 1) * samples], scored.results[p * samples : (p + 1) * samples]):
                if result is None or result.status != "ok":
                    errors += 1
                    continue
                group.append(bool(result.correct))
                formats.append(float(bool(result.format_ok)))
                steps.append(float(len(result.steps)))
                migs.append(result.mig_reward)
                tokens.append(float(len(r.sampled_ids)))
            if group:
                correct.append(group)
    out = {
        "eval_format": mean(formats),
        "eval_steps": mean(steps),
        "eval_tokens": mean(tokens),
        "eval_mig": mean(migs),
        "eval_errors": float(errors),
        "eval_prompts": float(len(correct)),
    }
    if greedy:
        out["eval_accuracy"] = mean([float(g[0]) for g in correct])
    else:
        out["eval_pass@1"] = mean([sum(g) / len(g) for g in correct])
        out[f"eval_pass@{samples}"] = mean([float(any(g)) for g in correct])
    return out
