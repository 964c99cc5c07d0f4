"""Wire types of the scoring contract, as the client sees them (docs/SPEC.md sections 1 and 7).

They mirror `stepcredit.protocol` without importing it, so the client installs
without the service. Requests forbid unknown fields (a typo must not be sent
silently); responses ignore them, so a newer service does not break an older client.

What the client checks of an image is what holds for every service: an inline data URI
of a type the service decodes, and as many images as bare `{"type": "image"}` parts.
Counts, bytes and pixels are the service's settings; it fails the item, naming the field.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from ._images import check_data_uri

__all__ = [
    "TextPart",
    "ImageUrl",
    "ImageUrlPart",
    "ImagePart",
    "ContentPart",
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


DataURI = Annotated[str, AfterValidator(check_data_uri)]
"""`data:image/<png|jpeg|webp|gif|bmp>;base64,...`: the service fetches no URL."""


class TextPart(_Request):
    type: Literal["text"] = "text"
    text: str


class ImageUrl(_Request):
    url: DataURI
    detail: Literal["auto", "low", "high"] | None = None
    """OpenAI's resolution hint; the service accepts and ignores it."""


class ImageUrlPart(_Request):
    """OpenAI's image part, the image inline: `{"type": "image_url", "image_url": {"url": "data:..."}}`."""

    type: Literal["image_url"] = "image_url"
    image_url: ImageUrl


class ImagePart(_Request):
    """TRL's bare placeholder `{"type": "image"}`: the k-th one takes the item's `images[k]`."""

    type: Literal["image"] = "image"


ContentPart = Annotated[TextPart | ImageUrlPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Request):
    role: str
    content: str | Annotated[list[ContentPart], Field(min_length=1, max_length=64)]
    """Text, or OpenAI-style content parts (text and images, in order)."""


class ItemOptions(_Request):
    """Per-request or per-item overrides of the service's scoring defaults."""

    format: Literal["think_answer", "boxed", "regex"] | None = None
    cot_pattern: str | None = None
    answer_pattern: str | None = None
    step_split: Literal["auto", "lines", "paragraphs", "markers"] | None = None
    max_steps: int | None = Field(None, ge=1)
    probe_prefix: str | None = None
    # Finite, as the service requires: JSON has no NaN, and the encoder would send null (the default).
    acc_weight: float | None = Field(None, allow_inf_nan=False)
    format_weight: float | None = Field(None, allow_inf_nan=False)
    verify_timeout_s: float | None = Field(None, gt=0, allow_inf_nan=False)


class ScoreItem(_Request):
    """One (prompt, completion, references) to score. Give `prompt` (as the policy saw
    it, chat template applied) or `messages` (rendered with the scorer's template).

    `images` (data URIs, `image_data_uri` makes them) go where the `prompt` marks them
    with the model's placeholder (Qwen2-VL: `<|vision_start|><|image_pad|><|vision_end|>`)
    or `<image>`, one mark per image in order; with `messages`, they fill the bare
    `{"type": "image"}` parts in order. `image_url` parts carry their own image."""

    id: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    images: list[DataURI] | None = None
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
        if self.messages is not None:
            bare = sum(
                isinstance(part, ImagePart)
                for message in self.messages
                if isinstance(message.content, list)
                for part in message.content
            )
            given = len(self.images or [])
            if bare != given:
                raise ValueError(
                    f'`messages` hold {bare} bare {{"type": "image"}} part{"s" if bare != 1 else ""} for {given} '
                    f'`images`: each bare part takes the next image (or send {{"type": "image_url", ...}} parts)'
                )
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
