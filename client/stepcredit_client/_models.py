"""Wire types of the scoring contract, as the client sees them (docs/SPEC.md sections 1 and 7).

They mirror `stepcredit.protocol` without importing it, so the client installs
without the service. Requests forbid unknown fields (a typo must not be sent
silently); responses ignore them, so a newer service does not break an older client.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "ChatMessage",
    "ItemOptions",
    "ScoreItem",
    "StepResult",
    "ErrorInfo",
    "ScoreResult",
    "ModelInfo",
    "Usage",
    "ScoreResponse",
    "ReloadResponse",
]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Response(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ChatMessage(_Request):
    role: str
    content: str


class ItemOptions(_Request):
    """Per-request or per-item overrides of the service's scoring defaults."""

    format: Literal["think_answer", "boxed", "regex"] | None = None
    cot_pattern: str | None = None
    answer_pattern: str | None = None
    step_split: Literal["auto", "lines", "paragraphs", "markers"] | None = None
    max_steps: int | None = Field(None, ge=1)
    probe_prefix: str | None = None
    acc_weight: float | None = None
    format_weight: float | None = None
    verify_timeout_s: float | None = Field(None, gt=0)


class ScoreItem(_Request):
    """One (prompt, completion, references) to score. Give `prompt` (as the policy saw
    it, chat template applied) or `messages` (rendered with the scorer's template)."""

    id: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
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


class StepResult(_Response):
    index: int
    char_start: int
    char_end: int
    token_start: int | None = None
    token_end: int | None = None
    loglik: float
    best_reference: int
    watermark: float
    gain: float


class ErrorInfo(_Response):
    code: str
    message: str


class ScoreResult(_Response):
    """One item's result. When `status` is "error", every reward field is None."""

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

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class ModelInfo(_Response):
    name: str
    path: str
    backend: str
    strategy: str
    device: str
    dtype: str
    vocab_size: int
    max_context: int
    revision: str | None = None
    """The weights that scored: the name `Client.reload` gave them, else a fingerprint of
    their folder; changes whenever the service loads new weights (None from older services)."""


class Usage(_Response):
    items: int = 0
    items_ok: int = 0
    items_error: int = 0
    probes: int = 0
    reference_probes: int = 0
    tokens_forwarded: int = 0
    forward_passes: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(**{name: getattr(self, name) + getattr(other, name) for name in Usage.model_fields})


class ScoreResponse(_Response):
    """`results` in the order of the items sent, however many requests carried them."""

    results: list[ScoreResult]
    model: ModelInfo
    usage: Usage


class ReloadResponse(_Response):
    """What `Client.reload` returns: the model that scores from now on."""

    model: ModelInfo
    previous_revision: str | None = None
    mode: str
    """`beside` (loaded while the old weights served) or `drain` (requests waited while
    the old weights were freed and the new ones loaded)."""
    load_s: float
    """Seconds the service took, checks included."""
