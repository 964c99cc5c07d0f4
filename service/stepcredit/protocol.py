"""Wire types of the scoring contract (SPEC sections 1 and 7).

Shape checks live here (pydantic). Limits that depend on configuration are
checked by `check_limits`, which names the offending field so the HTTP layer
can answer 413/422 with a useful message.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .config import Limits

__all__ = [
    "ChatMessage",
    "ItemOptions",
    "ScoreItem",
    "ScoreRequest",
    "StepResult",
    "ErrorInfo",
    "ScoreResult",
    "ModelInfo",
    "Usage",
    "ScoreResponse",
    "LimitError",
    "check_limits",
]

Format = Literal["think_answer", "boxed", "regex"]
StepSplit = Literal["auto", "lines", "paragraphs", "markers"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChatMessage(_Strict):
    role: str = Field(min_length=1, max_length=64)
    content: str


class ItemOptions(_Strict):
    """Overrides of the scoring defaults; request-level options apply to every
    item, item-level options win over them."""

    format: Format | None = None
    cot_pattern: str | None = None
    """`regex` format: pattern whose first capture group is the chain of thought."""
    answer_pattern: str | None = None
    """`regex` format: pattern whose first capture group is the answer."""
    step_split: StepSplit | None = None
    max_steps: int | None = Field(None, ge=1)
    probe_prefix: str | None = Field(None, max_length=1000)
    acc_weight: float | None = Field(None, ge=-1e6, le=1e6)
    format_weight: float | None = Field(None, ge=-1e6, le=1e6)
    verify_timeout_s: float | None = Field(None, gt=0, le=120)


class ScoreItem(_Strict):
    id: str | None = Field(None, max_length=512)
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=512)
    completion: str
    references: list[str] = Field(min_length=1)
    completion_token_ids: list[int] | None = None
    options: ItemOptions | None = None

    @model_validator(mode="after")
    def _one_prompt_form(self) -> ScoreItem:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        if any(not ref.strip() for ref in self.references):
            raise ValueError("`references` must not contain blank strings")
        return self


class ScoreRequest(_Strict):
    items: list[ScoreItem] = Field(min_length=1)
    options: ItemOptions | None = None


class StepResult(BaseModel):
    index: int
    char_start: int
    char_end: int
    token_start: int | None
    token_end: int | None
    loglik: float
    best_reference: int
    watermark: float
    gain: float


class ErrorInfo(BaseModel):
    code: str
    message: str


class ScoreResult(BaseModel):
    id: str | None = None
    status: Literal["ok", "error"]
    error: ErrorInfo | None = None
    format_ok: bool | None = None
    correct: bool | None = None
    verify_timeout: bool | None = None
    extracted_answer: str | None = None
    matched_reference: int | None = None
    outcome_reward: float | None = None
    mig_reward: float | None = None
    baseline_loglik: float | None = None
    format_gate: bool | None = None
    correctness_gate: bool | None = None
    sft_gate: bool | None = None
    cot_span: tuple[int, int] | None = None
    tokenization: Literal["text", "ids"] | None = None
    steps_truncated: bool | None = None
    steps: list[StepResult] = Field(default_factory=list)

    @classmethod
    def failure(cls, item_id: str | None, code: str, message: str) -> ScoreResult:
        return cls(id=item_id, status="error", error=ErrorInfo(code=code, message=message))


class ModelInfo(BaseModel):
    name: str
    path: str
    backend: str
    strategy: str
    device: str
    dtype: str
    vocab_size: int
    max_context: int


class Usage(BaseModel):
    items: int = 0
    items_ok: int = 0
    items_error: int = 0
    probes: int = 0
    """Prefix probes run: K + 1 per scored item."""
    reference_probes: int = 0
    """(probe, reference) pairs whose likelihood was computed."""
    tokens_forwarded: int = 0
    """Tokens that went through the model, padding excluded; a prefix shared with other
    trajectories of the batch is split among them."""
    forward_passes: int = 0


class ScoreResponse(BaseModel):
    results: list[ScoreResult]
    model: ModelInfo
    usage: Usage


class LimitError(ValueError):
    """An input exceeds a configured bound. `status` is the HTTP status to answer."""

    def __init__(self, status: int, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.status = status
        self.field = field


def check_limits(request: ScoreRequest, limits: Limits) -> None:
    if len(request.items) > limits.max_items_per_request:
        raise LimitError(
            413, "items", f"{len(request.items)} items, limit {limits.max_items_per_request}"
        )
    if request.options is not None:
        check_options(request.options, limits, "options")
    for i, item in enumerate(request.items):
        check_item(item, limits, f"items[{i}]")


def check_item(item: ScoreItem, limits: Limits, where: str) -> None:
    prompt_chars = len(item.prompt or "") + sum(len(m.content) for m in item.messages or [])
    chars = prompt_chars + len(item.completion)
    if chars > limits.max_chars_per_item:
        raise LimitError(
            422, where, f"prompt plus completion is {chars} characters, limit {limits.max_chars_per_item}"
        )
    if len(item.references) > limits.max_references_per_item:
        raise LimitError(
            422,
            f"{where}.references",
            f"{len(item.references)} references, limit {limits.max_references_per_item}",
        )
    for j, ref in enumerate(item.references):
        if len(ref) > limits.max_reference_chars:
            raise LimitError(
                422, f"{where}.references[{j}]", f"{len(ref)} characters, limit {limits.max_reference_chars}"
            )
    if item.completion_token_ids is not None and len(item.completion_token_ids) > limits.max_token_ids:
        raise LimitError(
            422,
            f"{where}.completion_token_ids",
            f"{len(item.completion_token_ids)} ids, limit {limits.max_token_ids}",
        )
    if item.options is not None:
        check_options(item.options, limits, f"{where}.options")


def check_options(options: ItemOptions, limits: Limits, where: str) -> None:
    if options.max_steps is not None and options.max_steps > limits.max_steps_limit:
        raise LimitError(
            422, f"{where}.max_steps", f"{options.max_steps} steps, limit {limits.max_steps_limit}"
        )
    for name in ("cot_pattern", "answer_pattern"):
        pattern = getattr(options, name)
        if pattern is not None and len(pattern) > limits.max_pattern_chars:
            raise LimitError(
                422, f"{where}.{name}", f"{len(pattern)} characters, limit {limits.max_pattern_chars}"
            )
