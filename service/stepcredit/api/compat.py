"""Routes that speak trainers' own remote-reward protocols, so they need no glue code.

* `POST /get_reward`: OpenRLHF's remote reward model. Body
  `{"query": [prompt + response, ...], "prompts": [...], "labels": [...]}`; answer
  `{"rewards": [...], "scores": [...], "extra_logs": {name: [...]}}`. Matched to
  OpenRLHF openrlhf/utils/agent.py (`SingleTurnAgentExecutor._fetch_rewards_via_http`
  posts the body; `execute` reads "rewards", "scores", "extra_logs"), and
  openrlhf/trainer/ppo_utils/samples_generator.py (turns each into a tensor).
* `POST /slime/reward`: slime's `--rm-type remote_rm`. Body
  `{"prompt", "response", "label"}`; the whole JSON answer becomes
  `sample.reward`, so it is an object read with `--reward-key reward`. Matched to
  slime slime/rollout/rm_hub/__init__.py (`remote_rm`) and slime/utils/types.py
  (`Sample.get_reward_value`).

Both compose `reward = outcome_weight·outcome_reward + mig_weight·mig_reward`
(query parameters, default 1 and 1). An item the service cannot score is never
given a number: the request fails with 422 naming the item and code (503 with
Retry-After for a backend error, which may pass on retry), unless the caller
opted in to a stand-in with `?error_reward=X`, which is then flagged in
`stepcredit_failed`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Depends, FastAPI, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from ..config import Limits
from ..engine import Scorer
from ..protocol import ChatMessage, ScoreItem, ScoreRequest, ScoreResult, check_limits

__all__ = ["register_compat_routes", "split_query"]

log = logging.getLogger(__name__)

# Codes after which the same request may succeed: worth a trainer's retry.
_TRANSIENT = {"backend_error"}


# A dataset's answer column: text, a number, or a list of equivalent forms.
_Label = str | int | float | list[str | int | float]


class OpenRLHFRequest(BaseModel):
    # Trainers may add fields in later versions; ignore what we do not read.
    model_config = ConfigDict(extra="ignore")
    query: list[str] | str
    prompts: list[str] | str | None = None
    labels: list[_Label | None] | str | None = None


class SlimeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: str | list[ChatMessage]
    response: str
    label: _Label | None = None


class _Rejected(Exception):
    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.extra = status, code, extra


def split_query(query: str, prompt: str) -> tuple[str, str]:
    """(prompt as the policy saw it, completion) from OpenRLHF's `query`.

    OpenRLHF builds `query` by decoding prompt ids + response ids, so it normally
    starts with `prompt`. When the prompt was cut from the left to fit the
    context, the query starts with the prompt's tail instead: the longest suffix
    of `prompt` that begins `query` marks the cut. Anything else is refused
    rather than split at a guessed position.
    """
    if query.startswith(prompt):
        return prompt, query[len(prompt) :]
    overlap = _longest_suffix_prefix(prompt, query)
    if overlap == 0:
        raise ValueError("the query does not start with its prompt (nor with a tail of it)")
    return query[:overlap], query[overlap:]


def _longest_suffix_prefix(a: str, b: str) -> int:
    """Length of the longest suffix of `a` that is a prefix of `b` (KMP, linear time)."""
    pattern = b[: len(a)]
    fail = [0] * len(pattern)
    k = 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = fail[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        fail[i] = k
    k = 0
    for ch in a:  # run `a` through the automaton of `pattern`; the final state is the overlap
        while k and (k == len(pattern) or ch != pattern[k]):
            k = fail[k - 1]
        if k < len(pattern) and ch == pattern[k]:
            k += 1
    return k


def _references(label: _Label | None, where: str) -> list[str]:
    refs = [label] if isinstance(label, str | int | float) else list(label or [])
    refs = [str(r) for r in refs if str(r).strip()]
    if not refs:
        raise _Rejected(422, "missing_label", "a reference answer (label) is required", field=where)
    return refs


def _as_list(value: list | str | None, n: int, name: str) -> list:
    if value is None:
        raise _Rejected(422, "invalid_request", f"`{name}` is required", field=name)
    values = [value] if isinstance(value, str) else value
    if len(values) != n:
        raise _Rejected(422, "invalid_request", f"`{name}` has {len(values)} entries, `query` has {n}", field=name)
    return values


_SIGNAL_KEYS = (
    "reward",
    "outcome_reward",
    "mig_reward",
    "correct",
    "format_ok",
    "sft_gate",
    "num_steps",
    "stepcredit_failed",
)


def _signals(result: ScoreResult, outcome_weight: float, mig_weight: float) -> dict[str, float]:
    return {
        "reward": outcome_weight * result.outcome_reward + mig_weight * result.mig_reward,
        "outcome_reward": result.outcome_reward,
        "mig_reward": result.mig_reward,
        "correct": float(result.correct),
        "format_ok": float(result.format_ok),
        "sft_gate": float(result.sft_gate),
        "num_steps": float(len(result.steps)),
        "stepcredit_failed": 0.0,
    }


def _failed_signals(error_reward: float) -> dict[str, float]:
    # Only reached when the caller opted in to a stand-in reward. JSON has no NaN
    # and trainers turn every value into a tensor, so the other signals read 0
    # here; `stepcredit_failed` says they are not measurements.
    return {**dict.fromkeys(_SIGNAL_KEYS, 0.0), "reward": error_reward, "stepcredit_failed": 1.0}


def register_compat_routes(
    app: FastAPI,
    get_scorer: Callable[[], Scorer],
    authorize: Callable[..., Awaitable[None]],
    limits: Limits,
) -> None:
    """Add the OpenRLHF and slime routes to `app`.

    `get_scorer` returns the ready Scorer (or raises the app's not-ready error),
    `authorize` is the app's bearer-token dependency, `limits` bound every item.
    """

    async def score(items: list[ScoreItem], error_reward: float | None, weights: tuple[float, float]):
        scorer = get_scorer()
        check_limits(ScoreRequest(items=items), limits)  # LimitError -> the app's 413/422
        batch = await scorer.score(items)
        failed = [(i, r) for i, r in enumerate(batch.results) if r.status != "ok"]
        for i, r in failed:
            log.warning("compat item %d not scored: %s: %s", i, r.error.code, r.error.message)
        if failed and error_reward is None:
            transient = any(r.error.code in _TRANSIENT for _, r in failed)
            raise _Rejected(
                503 if transient else 422,
                "item_failed",
                f"{len(failed)} of {len(items)} items could not be scored; no reward is made up for them",
                items=[{"index": i, "code": r.error.code, "message": r.error.message} for i, r in failed],
            )
        return [_signals(r, *weights) if r.status == "ok" else _failed_signals(error_reward) for r in batch.results]

    def rejected(exc: _Rejected) -> JSONResponse:
        headers = {"Retry-After": "5"} if exc.status == 503 else None
        body = {"error": {"code": exc.code, "message": str(exc), **exc.extra}}
        return JSONResponse(body, exc.status, headers=headers)

    weight_params = {
        "outcome_weight": Query(1.0, ge=-1e6, le=1e6, description="weight of outcome_reward"),
        "mig_weight": Query(1.0, ge=-1e6, le=1e6, description="weight of mig_reward (λ)"),
        "error_reward": Query(None, description="opt-in stand-in reward for items that cannot be scored"),
    }

    @app.post("/get_reward", dependencies=[Depends(authorize)], tags=["compat"])
    async def openrlhf_get_reward(
        request: OpenRLHFRequest,
        outcome_weight: float = weight_params["outcome_weight"],
        mig_weight: float = weight_params["mig_weight"],
        error_reward: float | None = weight_params["error_reward"],
    ):
        """OpenRLHF remote reward: `rewards` (composed), `scores` (correctness in
        [0, 1], for dynamic filtering), `extra_logs` (one list per signal)."""
        try:
            queries = [request.query] if isinstance(request.query, str) else request.query
            if not queries:
                raise _Rejected(422, "invalid_request", "`query` is empty", field="query")
            prompts = _as_list(request.prompts, len(queries), "prompts")
            labels = _as_list(request.labels, len(queries), "labels")
            items = []
            for i, (query, prompt, label) in enumerate(zip(queries, prompts, labels)):
                try:
                    prompt_text, completion = split_query(query, prompt)
                except ValueError as exc:
                    raise _Rejected(422, "prompt_not_in_query", str(exc), field=f"query[{i}]") from None
                refs = _references(label, f"labels[{i}]")
                items.append(ScoreItem(prompt=prompt_text, completion=completion, references=refs))
            signals = await score(items, error_reward, (outcome_weight, mig_weight))
        except _Rejected as exc:
            return rejected(exc)
        extra_keys = [k for k in signals[0] if k != "reward"]
        return {
            "rewards": [s["reward"] for s in signals],
            # Dynamic filtering keeps groups whose mean score lies in a band of [0, 1].
            "scores": [s["correct"] if s["stepcredit_failed"] == 0.0 else s["reward"] for s in signals],
            "extra_logs": {k: [s[k] for s in signals] for k in extra_keys},
        }

    @app.post("/slime/reward", dependencies=[Depends(authorize)], tags=["compat"])
    async def slime_reward(
        request: SlimeRequest,
        outcome_weight: float = weight_params["outcome_weight"],
        mig_weight: float = weight_params["mig_weight"],
        error_reward: float | None = weight_params["error_reward"],
    ):
        """slime remote reward: an object; point `--reward-key` at `reward`."""
        try:
            refs = _references(request.label, "label")
            if isinstance(request.prompt, str):
                item = ScoreItem(prompt=request.prompt, completion=request.response, references=refs)
            else:
                item = ScoreItem(messages=request.prompt, completion=request.response, references=refs)
            (signals,) = await score([item], error_reward, (outcome_weight, mig_weight))
        except _Rejected as exc:
            return rejected(exc)
        return signals
