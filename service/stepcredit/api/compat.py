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
Retry-After for a backend error or a `shutting_down` item, which may pass on
retry), unless the caller opted in to a stand-in with `?error_reward=X` (a finite
number), which is then flagged in `stepcredit_failed`. Input that is wrong as sent (a label that is no
reference answer, text that is not valid Unicode, a prompt missing from its
query, a limit exceeded) is a 422 naming the request's own field whatever
`error_reward` says: a stand-in covers a failure to score, not a broken dataset.
Error bodies never echo input values (they may be non-finite or unencodable).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Discriminator, Tag, TypeAdapter, ValidationError, WithJsonSchema

from ..config import Limits
from ..engine import ScoreBatch, Scorer
from ..media import MediaError, item_images
from ..protocol import REVISION_HEADER, ChatMessage, LimitError, ScoreItem, ScoreResult, check_item
from .errors import error_responses

__all__ = ["register_compat_routes", "split_query"]

log = logging.getLogger(__name__)

# Codes after which the same request may succeed: worth a trainer's retry
# (`shutting_down`: on the replica that takes over from one draining).
_TRANSIENT = {"backend_error", "shutting_down"}


# A dataset's answer column: text, a number, or a list of equivalent forms. The
# schema documents that; `_references` checks it, because pydantic's lax modes
# would read `false` as the reference "0" and let NaN through as "nan".
_LABEL_SCHEMA = TypeAdapter(str | int | float | list[str | int | float]).json_schema()
# A null label is let through validation only to be answered with `missing_label`; the
# schema shows what is accepted.
_Label = Annotated[Any, WithJsonSchema(_LABEL_SCHEMA)]


class OpenRLHFRequest(BaseModel):
    # Trainers may add fields in later versions; ignore what we do not read.
    model_config = ConfigDict(extra="ignore")
    query: list[str] | str
    prompts: list[str] | str
    labels: list[_Label] | str


# Text or a message list; the tag picks the branch, so an error names only that
# branch (`prompt.messages[0].content`), not every member of the union.
_SlimePrompt = Annotated[
    Annotated[str, Tag("text")] | Annotated[list[ChatMessage], Tag("messages")],
    Discriminator(lambda v: "text" if isinstance(v, str) else "messages"),
]


def _label_required(schema: dict) -> None:
    schema.setdefault("required", []).append("label")


class SlimeRequest(BaseModel):
    # `label` may be null or missing in the model only so that the route answers it with
    # its own code (`missing_label`); the schema says what is accepted: a label, required.
    model_config = ConfigDict(extra="ignore", json_schema_extra=_label_required)
    prompt: _SlimePrompt
    response: str
    label: _Label = None


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


def _references(label: Any, where: str) -> list[str]:
    """The label as reference texts; blank or null entries are no reference."""
    values = label if isinstance(label, list) else [label]
    refs = []
    for j, value in enumerate(values):
        field = f"{where}[{j}]" if isinstance(label, list) else where
        if isinstance(value, bool):  # before int: bool is an int subclass
            raise _Rejected(422, "invalid_label", "a boolean is not a reference answer", field=field)
        if isinstance(value, float) and not math.isfinite(value):
            raise _Rejected(422, "invalid_label", "a reference number must be finite", field=field)
        if value is not None and not isinstance(value, str | int | float):
            raise _Rejected(422, "invalid_label", "a reference is text or a number", field=field)
        if value is not None and str(value).strip():
            refs.append(str(value))
    if not refs:
        raise _Rejected(422, "missing_label", "a reference answer (label) is required", field=where)
    return refs


def _item(fields: dict[str, str], where: str, limits: Limits, **given: Any) -> ScoreItem:
    """A checked ScoreItem. What it refuses is a 422 naming the request's own field:
    `fields` maps ScoreItem's fields to the route's (`where` for the item as a whole)."""
    try:
        item = ScoreItem(**given)
    except ValidationError as exc:
        error = exc.errors(include_input=False, include_url=False)[0]
        loc = error["loc"]  # messages were checked with the request: only the list's length is left
        field = fields.get(str(loc[0]), where) if loc else where
        # A position in the message counts in the item's field, which may be part of the route's.
        part = f" ({loc[0]})" if loc and str(loc[0]) not in fields else ""
        raise _Rejected(422, "invalid_item", f"{field}{part}: {error['msg']}", field=field) from None
    try:
        check_item(item, limits, where)
    except LimitError as exc:
        detail = str(exc).removeprefix(f"{exc.field}: ")
        field = fields["references"] if ".references" in exc.field else exc.field
        raise _Rejected(exc.status, "limit_exceeded", f"{field}: {detail}", field=field) from None
    try:  # images in a message: refused here, naming the field, before any model work
        item_images(item, limits, where)
    except MediaError as exc:
        raise _Rejected(422, exc.code, str(exc), field=exc.field) from None
    return item


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
    score_items: Callable[[Request, Scorer, list[ScoreItem]], Awaitable[ScoreBatch]],
    dependencies: Sequence[Any],
    limits: Limits,
) -> None:
    """Add the OpenRLHF and slime routes to `app`.

    `get_scorer` returns the ready Scorer (or raises the app's not-ready error),
    `score_items` scores as /v1/score does (cancelled when the client leaves, items
    `shutting_down` at the drain deadline), `dependencies` are the app's bearer-token
    check, `limits` bound every item.
    """

    async def score(
        raw: Request,
        items: list[ScoreItem],
        error_reward: float | None,
        weights: tuple[float, float],
        response: Response,
    ):
        scorer = get_scorer()
        batch = await score_items(raw, scorer, items)
        # As on /v1/score: the weights that scored every item of this answer.
        response.headers[REVISION_HEADER] = batch.model.revision or ""
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
        "error_reward": Query(
            None, ge=-1e6, le=1e6, allow_inf_nan=False,
            description="opt-in stand-in reward for items that cannot be scored (finite)",
        ),  # fmt: skip
    }

    errors = error_responses(401, 408, 413, 422, 429, 503)

    @app.post("/get_reward", dependencies=list(dependencies), tags=["compat"], responses=errors)
    async def openrlhf_get_reward(
        request: OpenRLHFRequest,
        raw: Request,
        response: Response,
        outcome_weight: float = weight_params["outcome_weight"],
        mig_weight: float = weight_params["mig_weight"],
        error_reward: float | None = weight_params["error_reward"],
    ):
        """OpenRLHF remote reward: `rewards` (composed), `scores` (correctness in
        [0, 1], for dynamic filtering), `extra_logs` (one list per signal)."""
        try:
            queries = [request.query] if isinstance(request.query, str) else request.query
            if len(queries) > limits.max_items_per_request:
                limit = limits.max_items_per_request
                raise _Rejected(413, "limit_exceeded", f"{len(queries)} queries, limit {limit}", field="query")
            prompts = _as_list(request.prompts, len(queries), "prompts")
            labels = _as_list(request.labels, len(queries), "labels")
            items = []
            for i, (query, prompt, label) in enumerate(zip(queries, prompts, labels)):
                try:
                    prompt_text, completion = split_query(query, prompt)
                except ValueError as exc:
                    raise _Rejected(422, "prompt_not_in_query", str(exc), field=f"query[{i}]") from None
                refs = _references(label, f"labels[{i}]")
                fields = {"references": f"labels[{i}]"}  # prompt and completion both come from the query
                items.append(_item(fields, f"query[{i}]", limits, prompt=prompt_text, completion=completion,
                                   references=refs))  # fmt: skip
            # With several reward URLs, OpenRLHF shards one sample across them and
            # the others get empty lists; an error there would fail the sample.
            signals = await score(raw, items, error_reward, (outcome_weight, mig_weight), response) if items else []
        except _Rejected as exc:
            return rejected(exc)
        extra_keys = [k for k in _SIGNAL_KEYS if k != "reward"]
        return {
            "rewards": [s["reward"] for s in signals],
            # Dynamic filtering keeps groups whose mean score lies in a band of [0, 1].
            "scores": [s["correct"] if s["stepcredit_failed"] == 0.0 else s["reward"] for s in signals],
            "extra_logs": {k: [s[k] for s in signals] for k in extra_keys},
        }

    @app.post("/slime/reward", dependencies=list(dependencies), tags=["compat"], responses=errors)
    async def slime_reward(
        request: SlimeRequest,
        raw: Request,
        response: Response,
        outcome_weight: float = weight_params["outcome_weight"],
        mig_weight: float = weight_params["mig_weight"],
        error_reward: float | None = weight_params["error_reward"],
    ):
        """slime remote reward: an object; point `--reward-key` at `reward`."""
        try:
            refs = _references(request.label, "label")
            prompt = {"prompt" if isinstance(request.prompt, str) else "messages": request.prompt}
            fields = {"prompt": "prompt", "messages": "prompt", "completion": "response", "references": "label"}
            item = _item(fields, "prompt", limits, **prompt, completion=request.response, references=refs)
            (signals,) = await score(raw, [item], error_reward, (outcome_weight, mig_weight), response)
        except _Rejected as exc:
            return rejected(exc)
        return signals
