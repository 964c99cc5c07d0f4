"""What the adapters share: settings for adapters a trainer loads by path (no
constructor arguments: keyword arguments win, then STEPCREDIT_* environment
variables), one async client per event loop, references, images, logged signals."""

from __future__ import annotations

import asyncio
import math
import os
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .._client import AsyncClient
from .._config import ClientConfig, Retry
from .._images import image_data_uri
from .._models import ItemOptions, ScoreResult
from ..rewards import RewardWeights, scalar_reward

__all__ = [
    "AdapterSettings",
    "client_for_loop",
    "references_of",
    "extra_signals",
    "image_uri",
    "image_uris",
    "chat_images",
    "has_image_payload",
    "message_text",
]


@dataclass(frozen=True)
class AdapterSettings:
    url: str = "http://127.0.0.1:8000"
    api_key: str | None = None
    weights: RewardWeights = RewardWeights()
    timeout_s: float = 120.0
    max_attempts: int = 5
    options: ItemOptions | None = None

    @classmethod
    def load(cls, overrides: Mapping[str, Any] | None = None) -> AdapterSettings:
        """From `overrides` (url, api_key, outcome_weight, mig_weight, timeout_s,
        max_attempts, options), else STEPCREDIT_URL, STEPCREDIT_API_KEY,
        STEPCREDIT_OUTCOME_WEIGHT, STEPCREDIT_MIG_WEIGHT, STEPCREDIT_TIMEOUT_S,
        STEPCREDIT_MAX_ATTEMPTS; defaults otherwise."""
        given = dict(overrides or {})

        def pick(name: str, default, cast=str):
            if given.get(name) is not None:
                return cast(given[name])
            env = os.environ.get(f"STEPCREDIT_{name.upper()}")
            return cast(env) if env not in (None, "") else default

        options = given.get("options")
        return cls(
            url=pick("url", cls.url),
            api_key=pick("api_key", None),
            weights=RewardWeights(
                outcome=pick("outcome_weight", RewardWeights.outcome, float),
                mig=pick("mig_weight", RewardWeights.mig, float),
            ),
            timeout_s=pick("timeout_s", cls.timeout_s, float),
            max_attempts=pick("max_attempts", cls.max_attempts, int),
            options=ItemOptions.model_validate(dict(options)) if options else None,
        )

    def client_config(self) -> ClientConfig:
        return ClientConfig(timeout=self.timeout_s, retry=Retry(max_attempts=self.max_attempts))


_CLIENTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def client_for_loop(settings: AdapterSettings) -> AsyncClient:
    """One AsyncClient per event loop and service: httpx clients are bound to the loop that uses them."""
    per_loop = _CLIENTS.setdefault(asyncio.get_running_loop(), {})
    key = (settings.url, settings.api_key, settings.timeout_s, settings.max_attempts)
    if key not in per_loop:
        per_loop[key] = AsyncClient(settings.url, api_key=settings.api_key, config=settings.client_config())
    return per_loop[key]


def references_of(answer: Any) -> list[str]:
    """A trainer's label or ground truth as references: a string or number, or a
    list (or array) of equivalent ones; blank or null entries are skipped. A missing
    answer is an error, not a guess, and so is a value that is no answer at all (a
    boolean, a NaN or infinity, a nested container): `str` would make "False" or
    "nan" a reference."""
    answer = _plain(answer)
    if isinstance(answer, Mapping):  # iterating it would make its keys the references
        raise ValueError("a reference answer is text or a number, not a mapping")
    values = [answer] if answer is None or isinstance(answer, str | int | float) else list(answer)
    refs = []
    for value in map(_plain, values):
        if isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value)):
            raise ValueError(f"{value!r} is not a reference answer")
        if value is not None and not isinstance(value, str | int | float):
            raise ValueError(f"a reference answer is text or a number, not {type(value).__name__}")
        if value is not None and str(value).strip():
            refs.append(str(value))
    if not refs:
        raise ValueError("no reference answer (label / ground truth) for this sample")
    return refs


def _plain(value: Any) -> Any:
    # A NumPy scalar (verl hands ground truth over as arrays) as the Python value.
    return value.item() if getattr(value, "ndim", None) == 0 and hasattr(value, "item") else value


def extra_signals(result: ScoreResult, weights: RewardWeights) -> dict[str, float]:
    """The scalar signals logged beside the reward (same keys for every sample)."""
    return {
        "score": scalar_reward(result, weights),
        "outcome_reward": float(result.outcome_reward),
        "mig_reward": float(result.mig_reward),
        "correct": float(result.correct),
        "format_ok": float(result.format_ok),
        "sft_gate": float(result.sft_gate),
        "num_steps": float(len(result.steps)),
    }


# ------------------------------------------------------------------ images
# Trainers hand images over as PIL images (TRL, verl, slime), paths or URLs in content
# parts (verl, slime via qwen-vl-utils), or datasets' undecoded {"bytes", "path"} rows.
# All become inline data URIs here: the service fetches nothing.

_PAYLOAD_KEYS = ("bytes", "image", "image_url", "path", "url")
"""Where a part or a row keeps its image, in order of preference: the file's own bytes
first (verl keeps them beside the decoded PIL image), so they go unchanged."""


def image_uri(value: Any) -> str:
    """One image, in any form a trainer gives, as a data URI (`image_data_uri`); a mapping
    is a datasets / verl row (`bytes`, `path`) or an OpenAI `image_url` object (`url`)."""
    if isinstance(value, Mapping):
        for key in _PAYLOAD_KEYS:
            if value.get(key) is not None:
                return image_uri(value[key])
        raise ValueError(f"an image mapping holds none of {list(_PAYLOAD_KEYS)}: keys {sorted(value)}")
    return image_data_uri(value)


def image_uris(images: Any) -> list[str] | None:
    """A row's images (one image, a list or array of them, or None) as data URIs; None for none."""
    if images is None:
        return None
    if getattr(images, "ndim", 0) >= 1 and hasattr(images, "tolist"):  # a NumPy array (verl's batches)
        images = images.tolist()
    if not isinstance(images, list | tuple):
        images = [images]
    uris = [image_uri(image) for image in images if image is not None]
    return uris or None


def _payload(part: Mapping) -> Any:
    return next((part[key] for key in _PAYLOAD_KEYS if part.get(key) is not None), None)


def has_image_payload(messages: Sequence[Mapping]) -> bool:
    """Whether any image part of `messages` carries its image (rather than a bare placeholder)."""
    return any(
        isinstance(part, Mapping) and part.get("type") in ("image", "image_url") and _payload(part) is not None
        for message in messages
        if isinstance(message.get("content"), list)
        for part in message["content"]
    )


def chat_images(messages: Sequence[Mapping], images: Sequence[str] | None = None) -> tuple[list[dict], list[str]]:
    """(messages in the wire shape, their images in order). Text parts stay text parts;
    an image part that carries its image (`image`, `image_url`, verl's `bytes`/`path`)
    becomes an inline `image_url` part; a bare `{"type": "image"}` takes the next of
    `images` (data URIs), as TRL fills its placeholders. Sizing hints beside an image
    (qwen-vl-utils' `min_pixels`, ...) are dropped: the scorer's own processor sizes it.
    Video or audio parts raise: the service scores text and images."""
    queue = list(images or [])
    wire, uris = [], []
    for message in messages:
        content = message.get("content")
        if getattr(content, "ndim", 0) >= 1:  # a list read back from parquet as an array
            content = content.tolist()
        if not isinstance(content, list):
            wire.append({"role": message["role"], "content": "" if content is None else str(content)})
            continue
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "text":
                parts.append({"type": "text", "text": str(part.get("text") or "")})
                continue
            if kind not in ("image", "image_url"):
                raise ValueError(f"a {kind!r} content part cannot be scored: StepCredit takes text and image parts")
            payload = _payload(part)
            if payload is None:
                if not queue:
                    given = len(images or [])
                    raise ValueError(f"more image placeholders in the messages than the {given} images given")
                uri = queue.pop(0)
            else:
                uri = image_uri(payload)
            uris.append(uri)
            parts.append({"type": "image_url", "image_url": {"url": uri}})
        wire.append({"role": message["role"], "content": parts})
    if queue:
        raise ValueError(f"{len(queue)} of the {len(images or [])} images given have no placeholder in the messages")
    return wire, uris


def message_text(message: Mapping) -> str:
    """A completion message's text. An image in a completion (a tool's answer) raises:
    the completion is scored as text."""
    content = message.get("content")
    if not isinstance(content, list):
        return "" if content is None else str(content)
    if any(isinstance(part, Mapping) and part.get("type") != "text" for part in content):
        raise ValueError("a completion holding images cannot be scored: StepCredit scores completions as text")
    return "".join(str(part.get("text") or "") for part in content)
