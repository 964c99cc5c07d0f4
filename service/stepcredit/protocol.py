"""Wire types of the scoring contract (SPEC sections 1 and 7).

Shape checks live here (pydantic). A request is validated in two layers: the
envelope (`items` a non-empty list, request `options`) is the request's own
(HTTP 422 when it is wrong), and each item is validated on its own by
`parse_items`, so a bad item becomes that item's `invalid_item` error, naming
the field, while the other items are scored. Limits that depend on
configuration are checked by `check_item`, which names the offending field,
and the item's inline images by `media.item_images` (count, bytes, pixels,
data-URI form, image header), so a bad image fails its item before any model work.

Every text field must be encodable as UTF-8 (JSON lets a request carry a lone
surrogate such as "\ud800", which no tokenizer or JSON encoder accepts), and
every number must be finite.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    SkipValidation,
    Strict,
    StrictFloat,
    Tag,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

from . import media
from .config import Limits

__all__ = [
    "ChatMessage",
    "TextPart",
    "ImageUrl",
    "ImageUrlPart",
    "ImagePart",
    "ItemOptions",
    "ScoreItem",
    "ScoreRequest",
    "StepResult",
    "ErrorInfo",
    "ScoreResult",
    "ModelInfo",
    "Usage",
    "ScoreResponse",
    "ReloadRequest",
    "ReloadResponse",
    "REVISION_HEADER",
    "LimitError",
    "check_limits",
    "check_item",
    "parse_item",
    "parse_items",
    "describe_validation_error",
    "field_path",
    "text_chars",
]

Format = Literal["think_answer", "boxed", "regex"]
StepSplit = Literal["auto", "lines", "paragraphs", "markers"]


def _utf8(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text holds a lone surrogate at character {exc.start}: not valid Unicode") from None
    return text


Text = Annotated[str, AfterValidator(_utf8)]
"""A string that can be encoded (JSON allows lone surrogates; UTF-8 does not)."""
def _whole_number(value: object) -> object:
    """JSON Schema's `integer` admits 5.0; a boolean or 5.5 is still refused (StrictInt)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    return value


def whole_number(minimum: int) -> object:
    """An integer of at least `minimum` as JSON Schema defines integers: 5 or 5.0, never
    `true`, "5" or 5.5 (the bound goes before the validator, so the schema shows it)."""
    return Annotated[int, Strict(), Field(ge=minimum), BeforeValidator(_whole_number)]
# Strict: a JSON boolean is no number (lax mode read `true` as a weight of 1.0); ints are.
Weight = Annotated[StrictFloat, Field(ge=-1e6, le=1e6, allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


DATA_URI_DOC = (
    "An image inline as a base64 data URI, `data:image/<png|jpeg|webp|gif|bmp>;base64,<data>` "
    "(standard alphabet, `=` padding, no whitespace). The service never fetches a URL: "
    "`http(s)://`, `file://` and any other scheme fail the item."
)
# The schema states the form; `media.item_images` checks it (with a message that says
# why a URL is refused), so the item fails alone as `invalid_item`, like the limits.
DataUri = Annotated[
    Text,
    WithJsonSchema({"type": "string", "pattern": r"^data:image/[^;,]+(;[^;,]*)*;base64,", "description": DATA_URI_DOC}),
]


class TextPart(_Strict):
    """Text of a message given as content parts."""

    type: Literal["text"]
    text: Text


class ImageUrl(_Strict):
    url: DataUri
    detail: Literal["auto", "low", "high"] | None = Field(
        None, description="OpenAI's resolution hint: accepted and ignored (the scorer's image processor decides)."
    )


class ImageUrlPart(_Strict):
    """An image inline in the message (OpenAI's `image_url` content part)."""

    type: Literal["image_url"]
    image_url: ImageUrl


class ImagePart(_Strict):
    """A bare image placeholder (TRL's conversational shape): the k-th one of the item
    takes the item's `images[k]`."""

    type: Literal["image"]


# Each union below is chosen by a tag, so an error names only the branch the input took.
# Pydantic puts the tag into the error location; these tag names are dropped from the
# field paths we report (`field_path`), which then read like the JSON
# (`messages[0].content[1].image_url.url`).
_PART_TAGS = {"text": "type=text", "image_url": "type=image_url", "image": "type=image"}
_CONTENT_TAGS = {"text": "content=text", "parts": "content=parts"}
_UNION_TAGS = frozenset(_PART_TAGS.values()) | frozenset(_CONTENT_TAGS.values())


def _part_tag(value: object) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return _PART_TAGS.get(kind) if isinstance(kind, str) else None


def _content_tag(value: object) -> str | None:
    if isinstance(value, str):
        return _CONTENT_TAGS["text"]
    return _CONTENT_TAGS["parts"] if isinstance(value, list) else None


ContentPart = Annotated[
    Annotated[TextPart, Tag(_PART_TAGS["text"])]
    | Annotated[ImageUrlPart, Tag(_PART_TAGS["image_url"])]
    | Annotated[ImagePart, Tag(_PART_TAGS["image"])],
    Discriminator(
        _part_tag,
        custom_error_type="content_part_type",
        custom_error_message="a content part is an object whose `type` is `text`, `image_url` or `image`",
    ),
]
Content = Annotated[
    Annotated[Text, Tag(_CONTENT_TAGS["text"])]
    | Annotated[list[ContentPart], Field(min_length=1, max_length=64), Tag(_CONTENT_TAGS["parts"])],
    Discriminator(
        _content_tag,
        custom_error_type="content_type",
        custom_error_message="`content` is a string or a list of content parts",
    ),
]


class ChatMessage(_Strict):
    role: Text = Field(min_length=1, max_length=64)
    content: Content = Field(
        description="A string, or 1 to 64 content parts: `{type: text, text}`, "
        "`{type: image_url, image_url: {url: <data URI>}}`, or `{type: image}` (takes the item's next `images` entry)."
    )


def text_chars(content: str | list) -> int:
    """Characters of a message's text: its string, or the sum of its text parts (images
    have limits of their own)."""
    if isinstance(content, str):
        return len(content)
    return sum(len(part.text) for part in content if isinstance(part, TextPart))


class ItemOptions(_Strict):
    """Overrides of the scoring defaults; request-level options apply to every
    item, item-level options win over them."""

    format: Format | None = None
    cot_pattern: Text | None = None
    """`regex` format: pattern whose first capture group is the chain of thought."""
    answer_pattern: Text | None = None
    """`regex` format: pattern whose first capture group is the answer."""
    step_split: StepSplit | None = None
    max_steps: whole_number(1) | None = None
    probe_prefix: Text | None = Field(None, max_length=1000)
    acc_weight: Weight | None = None
    format_weight: Weight | None = None
    verify_timeout_s: StrictFloat | None = Field(None, gt=0, le=120, allow_inf_nan=False)
    """Capped by the server's `max_verify_timeout_s`."""


class ScoreItem(_Strict):
    id: Text | None = Field(None, max_length=512)
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=512)
    completion: Text
    references: list[Text] = Field(min_length=1)
    completion_token_ids: list[whole_number(0)] | None = None
    options: ItemOptions | None = None
    images: list[DataUri] | None = Field(
        None,
        description="Inline images as data URIs. With `prompt`: one per image placeholder in the prompt "
        "(`<image>` or the model's own, e.g. Qwen2-VL's `<|vision_start|><|image_pad|><|vision_end|>`), in order. "
        "With `messages`: one per bare `{type: image}` part, in order. At most `max_images_per_item` images "
        "per item (parts included), each at most `max_image_bytes` decoded and `max_image_pixels` pixels.",
    )

    @model_validator(mode="after")
    def _one_prompt_form(self) -> ScoreItem:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        if any(not ref.strip() for ref in self.references):
            raise ValueError("`references` must not contain blank strings")
        return self


class ScoreRequest(_Strict):
    """A batch of items. The schema documents each item's fields; items are
    validated one at a time (`parse_items`), so a bad item fails alone."""

    items: list[SkipValidation[ScoreItem]]
    """May be empty (a trainer's empty shard): the answer is then an empty `results`."""
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
    revision: str | None = None
    """The weights that scored: the name a reload gave them, else a fingerprint of their
    folder (config, weight files' names, sizes and modification times), so it changes
    whenever new weights are loaded."""


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


REVISION_HEADER = "X-StepCredit-Revision"
"""Response header of every scoring route (compat routes too): the `revision` of the
weights that scored the answer."""


def _printable_path(text: str) -> str:
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise ValueError("the path holds a control character")
    return text


class ReloadRequest(_Strict):
    """POST /v1/admin/reload: score with the weights in `path` from the next batch on."""

    path: Annotated[Text, AfterValidator(_printable_path)] = Field(min_length=1, max_length=4096)
    """Absolute path of a Hugging Face model folder on the service's machine (safetensors weights)."""
    revision: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[!-~]+$")
    """What `model.revision` reports from now on (printable ASCII, no spaces), e.g. the
    trainer's step; default: a fingerprint of the folder."""


class ReloadResponse(BaseModel):
    model: ModelInfo
    """The model that scores from now on."""
    previous_revision: str | None
    mode: Literal["beside", "drain"]
    """`beside`: loaded while the old weights served; `drain`: loaded after they were
    freed, while requests waited (not enough memory for both, or vLLM)."""
    load_s: float
    """Seconds from the request to the swap, checks included."""


class LimitError(ValueError):
    """An input exceeds a configured bound. `status` is the HTTP status to answer."""

    def __init__(self, status: int, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.status = status
        self.field = field


def field_path(loc: Sequence[str | int], where: str = "") -> str:
    """A pydantic error location as a field name: ("references", 0) under "items[3]"
    is "items[3].references[0]"; an empty one is `where`, or "body"."""
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc if p not in _UNION_TAGS)
    return f"{where}{path}".lstrip(".") or "body"


def describe_validation_error(exc: ValidationError, where: str = "", most: int = 3) -> str:
    """The first few errors, each naming its field; never the input value (it may
    be huge, non-finite or not encodable)."""
    parts = []
    for error in exc.errors(include_input=False, include_url=False)[:most]:
        parts.append(f"{field_path(error['loc'], where)}: {error['msg']}")
    more = exc.error_count() - most
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def _echo_id(raw: Any) -> str | None:
    """The item's id, when it is one we can send back."""
    item_id = raw.get("id") if isinstance(raw, dict) else None
    if isinstance(item_id, str) and len(item_id) <= 512:
        try:
            return _utf8(item_id)
        except ValueError:
            return None
    return None


def parse_item(raw: Any, limits: Limits, where: str) -> ScoreItem | ScoreResult:
    """Validate one raw item: a ScoreItem, or its `invalid_item` (or `invalid_image`) result
    naming the field. Its images are decoded from base64 and their headers read here (no
    pixel is decoded), so a bad image fails before any model work."""
    return _parse_item(raw, limits, where)[0]


def _parse_item(raw: Any, limits: Limits, where: str) -> tuple[ScoreItem | ScoreResult, int]:
    """`parse_item`, and the pixels of the item's images."""
    if not isinstance(raw, dict):
        return ScoreResult.failure(None, "invalid_item", f"{where}: an item must be a JSON object"), 0
    try:
        item = ScoreItem.model_validate(raw)
    except ValidationError as exc:
        return ScoreResult.failure(_echo_id(raw), "invalid_item", describe_validation_error(exc, where)), 0
    try:
        check_item(item, limits, where)
    except LimitError as exc:
        return ScoreResult.failure(item.id, "invalid_item", str(exc)), 0
    try:
        refs = media.item_images(item, limits, where)
    except media.MediaError as exc:
        return ScoreResult.failure(item.id, exc.code, str(exc)), 0
    return item, sum(ref.width * ref.height for ref in refs)


def parse_items(raw_items: list[Any], limits: Limits, where: str = "items") -> list[ScoreItem | ScoreResult]:
    """Validate each raw item on its own, so a bad one fails alone; the items whose images
    would take the request past `max_image_pixels_per_request` fail too (in order)."""
    out: list[ScoreItem | ScoreResult] = []
    pixels = 0
    for i, raw in enumerate(raw_items):
        parsed, own = _parse_item(raw, limits, f"{where}[{i}]")
        if own and pixels + own > limits.max_image_pixels_per_request:
            parsed = ScoreResult.failure(
                parsed.id,
                "invalid_item",
                f"{where}[{i}]: its images ({own} pixels) take the request's images past "
                f"max_image_pixels_per_request={limits.max_image_pixels_per_request} ({pixels} before it)",
            )
        else:
            pixels += own
        out.append(parsed)
    return out


def check_limits(request: ScoreRequest, limits: Limits) -> None:
    """The request's own limits (item count, request options); each item's are
    checked by `parse_item`."""
    if len(request.items) > limits.max_items_per_request:
        raise LimitError(
            413, "items", f"{len(request.items)} items, limit {limits.max_items_per_request}"
        )
    if request.options is not None:
        check_options(request.options, limits, "options")


def check_item(item: ScoreItem, limits: Limits, where: str) -> None:
    """The item's configured text limits. `max_chars_per_item` counts text only (the
    prompt or the messages' text parts, and the completion); images are checked by
    `media.item_images` against their own limits."""
    prompt_chars = len(item.prompt or "") + sum(text_chars(m.content) for m in item.messages or [])
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
