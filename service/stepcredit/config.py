"""One Settings object for the service and the CLI.

Every field can be set from the environment with the ``STEPCREDIT_`` prefix
(``STEPCREDIT_PORT=9000``) and is overridden by the matching CLI flag.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["Settings", "Limits", "default_cache_dir"]


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "stepcredit"


class Limits(BaseSettings):
    """Bounds on every input, checked before any work is done."""

    model_config = SettingsConfigDict(env_prefix="STEPCREDIT_", extra="ignore", use_attribute_docstrings=True)

    max_request_bytes: int = Field(16 * 1024 * 1024, ge=1024, le=1 << 30)
    """Largest accepted HTTP body; larger bodies get 413."""
    max_items_per_request: int = Field(512, ge=1, le=100_000)
    """Most items in one /v1/score request; more get 413."""
    max_chars_per_item: int = Field(64_000, ge=100, le=2_000_000)
    """Most characters in prompt (or the messages' text) plus completion; more get 422.
    Images count against their own limits, not this one."""
    max_references_per_item: int = Field(16, ge=1, le=256)
    """Most answer variants per item; more get 422."""
    max_reference_chars: int = Field(2_000, ge=1, le=100_000)
    """Longest single reference string; longer get 422."""
    max_steps_limit: int = Field(256, ge=1, le=4096)
    """Largest `max_steps` an item may ask for; larger get 422."""
    max_token_ids: int = Field(32_768, ge=16, le=1_000_000)
    """Longest `completion_token_ids`; longer get 422."""
    max_pattern_chars: int = Field(500, ge=10, le=10_000)
    """Longest user-given regex for the `regex` format; longer get 422."""
    max_images_per_item: int = Field(8, ge=0, le=256)
    """Most images one item may carry (`images` entries and `image_url` parts together);
    more get the item's `invalid_item`. 0 refuses every image."""
    max_image_bytes: int = Field(8 * 1024 * 1024, ge=1024, le=1 << 30)
    """Largest image, decoded from base64, in bytes; larger get the item's `invalid_item`
    (checked from the base64 length before anything is decoded)."""
    # At most Pillow's own decompression-bomb threshold (Image.MAX_IMAGE_PIXELS,
    # 89_478_485): above it Pillow warns or refuses on its own before our check could run.
    max_image_pixels: int = Field(4096 * 4096, ge=1, le=89_478_485)
    """Most pixels (width x height, from the image header) in one image; more get the
    item's `invalid_item` before any pixel is decoded."""
    max_image_pixels_per_request: int = Field(4 * 4096 * 4096, ge=1, le=1 << 34)
    """Most pixels of all the images of one /v1/score request (headers): the items whose
    images would pass it get `invalid_item`. Every image is decoded and run through the
    image processor before any model work, on one preparation thread: about 0.5 s and
    50 MB of RGB per 4096² image on a CPU core, so this bounds one request's share of both."""
    max_probe_tokens_per_item: int | None = Field(None, ge=64, le=1 << 24)
    """Most reference tokens one item may ask the model to score: probes (steps + 1) x the
    sum of its references' tokens. More is that item's `limit_exceeded`, before any model work.
    Unset: 1024 when the model runs on a CPU (such an item holds SmolLM2 on 2 cores for about
    8 s), 32768 on a GPU or with vllm-remote."""
    pattern_timeout_s: float = Field(0.25, gt=0, le=10)
    """Time limit of the user regexes (compiling and matching both) over one completion;
    past it the item gets `limit_exceeded`."""
    max_pattern_s_per_request: float = Field(1.0, gt=0, le=60)
    """Regex time one request may spend in all; its regex items past it get `limit_exceeded`."""


class Settings(Limits):
    """Service configuration. Each field's docstring is its documentation."""

    model_config = SettingsConfigDict(env_prefix="STEPCREDIT_", extra="ignore", use_attribute_docstrings=True)

    # --- serving
    host: str = "127.0.0.1"
    """Interface to bind."""
    port: int = Field(8000, ge=1, le=65535)
    """TCP port to bind."""
    api_key: SecretStr | None = None
    """When set, /v1/* requires `Authorization: Bearer <api_key>`."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Log level of the service and uvicorn."""
    admin_reload: bool = True
    """Serve POST /v1/admin/reload (new weights while serving; behind `api_key` when set)."""
    admin_reload_root: Path | None = None
    """When set, a reload may read only folders inside this one."""

    # --- lifecycle and transport
    drain_timeout_s: float = Field(45.0, ge=0, le=3600)
    """On SIGTERM: how long accepted requests may run before their items get `shutting_down`
    errors and the process exits 0 (Kubernetes' grace period minus the preStop pause and a margin)."""
    header_timeout_s: float = Field(10.0, gt=0, le=600)
    """A connection that has not sent a whole request head in this time is closed."""
    body_timeout_s: float = Field(30.0, gt=0, le=3600)
    """A request whose body has not arrived in this time gets 408."""
    max_connections: int = Field(1024, ge=1, le=1_000_000)
    """Past this many open connections (or requests in progress) a request gets 503 (uvicorn's
    limit_concurrency); /health and /ready are always answered."""

    # --- model and backend
    backend: Literal["hf", "vllm", "vllm-remote"] = "hf"
    """Likelihood backend. `hf`: PyTorch/transformers in this process; `vllm`: vLLM's
    AsyncLLM in this process; `vllm-remote`: `vllm serve` servers at `vllm_url`."""
    strategy: Literal["packed", "per-prefix"] = "packed"
    """`packed`: all probes of a trajectory in one forward pass under a tree mask;
    `per-prefix`: one padded sequence per (probe, reference), the simple reference."""
    model: str | None = None
    """Local HF causal-LM folder; unset means the embedded SmolLM2-135M-Instruct."""
    device: str = "auto"
    """`cpu`, `cuda`, `cuda:N` or `auto` (CUDA when available)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights and activations dtype; log-softmax always runs in float32."""
    cache_dir: Path = Field(default_factory=default_cache_dir)
    """Where the embedded model is converted to a plain HF folder once."""
    max_batch_tokens: int = Field(4096, ge=64, le=1 << 20)
    """Token budget of one forward pass (all rows, padding included)."""
    max_logit_rows: int = Field(2048, ge=16, le=1 << 20)
    """Most positions whose full-vocabulary logits one forward pass materializes."""
    max_batch_rows: int = Field(64, ge=1, le=4096)
    """Most sequences (rows) in one forward pass."""
    share_min_tokens: int = Field(32, ge=0, le=1 << 20)
    """hf packed: trajectories of one batch whose first tokens agree (a GRPO group's
    prompt) compute them once when at least this many are shared; 0 turns it off."""

    prefix_reuse: bool = True
    """vLLM backends: let prompt-logprob requests read the prefix cache."""
    vllm_url: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """vllm-remote: server base URLs, comma-separated in the environment."""
    vllm_timeout_s: float = Field(60.0, gt=0, le=3600)
    """vllm-remote: timeout of one probe request."""
    vllm_retries: int = Field(3, ge=0, le=20)
    """vllm-remote: retries per server (connection errors, 429, 5xx) before the next server."""
    vllm_cooloff_s: float = Field(30.0, gt=0, le=3600)
    """vllm-remote: a server that times out, refuses connections or keeps answering 5xx is
    set aside this long; then one trial request decides whether it is back."""
    vllm_memory_utilization: float | None = Field(None, gt=0, le=1)
    """vllm: fraction of GPU memory (of RAM on CPU) for weights and KV cache; default 0.85 GPU, 0.25 CPU."""
    vllm_block_size: int | None = Field(None, ge=1, le=1024)
    """vllm: KV-cache block size (default 16 on GPU, 32 on CPU, the smallest its attention takes)."""
    max_inflight_batches: int = Field(4, ge=1, le=256)
    """Backend calls in flight at once for backends that batch internally (vLLM); hf runs one."""

    # --- cross-request batching
    batch_max_tokens: int = Field(16384, ge=64, le=1 << 24)
    """Estimated tokens that make the batcher send a backend call without waiting longer."""
    batch_max_wait_ms: float = Field(5.0, ge=0, le=10_000)
    """Longest a request waits for others to share its backend call."""
    max_queued_items: int = Field(4096, ge=1, le=1_000_000)
    """Trajectories that may wait for the backend; beyond it requests get 429."""
    max_queued_tokens: int = Field(262_144, ge=64, le=1 << 30)
    """Estimated probe tokens that may wait for the backend, counted after preparation;
    a request that would pass it gets 429 with a Retry-After from the measured drain rate."""
    max_queue_wait_s: float = Field(60.0, gt=0, le=3600)
    """Longest predicted wait for a request's scores (the backlog ahead of it plus its own
    work, at the measured drain rate); a request that would wait longer gets 429 with a
    Retry-After. Keep it well under the clients' timeout (the client's default is 120 s):
    work whose client has given up is wasted."""
    pattern_workers: int = Field(2, ge=1, le=64)
    """Worker processes that run user regexes (`regex` format), off the shared preparation
    thread; one request uses one at a time, so this many requests' patterns run at once."""
    pattern_memory_mb: int = Field(256, ge=64, le=65536)
    """Address-space limit of each pattern worker on top of its start-up size (a 17-character
    pattern such as `(x{65534}){65534}` asks the regex compiler for gigabytes)."""

    # --- verification
    verify_workers: int = Field(2, ge=1, le=64)
    """Math-Verify worker processes."""
    verify_timeout_s: float = Field(5.0, gt=0, le=120)
    """Hard timeout per item for answer verification (default of the item option)."""
    max_verify_timeout_s: float = Field(5.0, gt=0, le=120)
    """Largest `verify_timeout_s` an item may use; larger asks are capped to it. It is also
    how long slow answers of other requests can hold a verify worker."""
    verify_memory_mb: int = Field(2048, ge=256, le=65536)
    """Address-space limit of each verify worker."""

    # --- scoring defaults (each can be overridden per request and per item)
    default_format: Literal["think_answer", "boxed", "regex"] = "think_answer"
    """Structure format when the item does not name one."""
    default_step_split: Literal["auto", "lines", "paragraphs", "markers"] = "auto"
    """Step split mode when the item does not name one."""
    default_max_steps: int = Field(64, ge=1, le=4096)
    """Steps beyond this are merged into the last one."""
    default_acc_weight: float = Field(1.0, ge=-1e6, le=1e6)
    """Weight of correctness in outcome_reward."""
    default_format_weight: float = Field(0.0, ge=-1e6, le=1e6)
    """Weight of format_ok in outcome_reward."""

    @field_validator("vllm_url", mode="before")
    @classmethod
    def _split_urls(cls, value):
        if isinstance(value, str):
            return [u.strip() for u in value.split(",") if u.strip()]
        return value

    def limits(self) -> Limits:
        return Limits(**{name: getattr(self, name) for name in Limits.model_fields})
