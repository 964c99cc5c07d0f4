"""One configuration object for timeouts, retries and batch splitting."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import httpx

__all__ = ["Retry", "ClientConfig", "DEFAULT_TIMEOUT"]

# Scoring a chunk of long chains on a CPU can take a minute; connecting should not.
DEFAULT_TIMEOUT = httpx.Timeout(120.0, connect=5.0)


@dataclass(frozen=True)
class Retry:
    """When and how long to wait before sending a request again.

    Retried: connection failures (refused, reset, dropped mid-response) and the
    statuses in `statuses` (429 overloaded, 503 loading). Never retried: other 4xx,
    other 5xx, timeouts. Scoring is a pure function of its input, so sending a
    request twice is safe.
    """

    max_attempts: int = 5
    """Tries per request, the first included; 1 disables retries."""
    backoff_s: float = 0.5
    """Base of the exponential backoff: attempt n waits about backoff_s * 2**n."""
    max_backoff_s: float = 30.0
    """Cap of one wait, for backoff and for Retry-After alike."""
    statuses: frozenset[int] = frozenset({429, 503})

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError("backoff times must not be negative")

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait after failed attempt `attempt` (0-based)."""
        if retry_after is not None:
            # The server knows when it will be ready: trust it, within the cap.
            return min(max(retry_after, 0.0), self.max_backoff_s)
        ceiling = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        # Equal jitter: keep half the wait, randomize the rest, so many trainer
        # workers that failed together do not come back together.
        return ceiling / 2 + random.uniform(0, ceiling / 2)


@dataclass(frozen=True)
class ClientConfig:
    """Everything that shapes how the client talks to the service."""

    timeout: httpx.Timeout | float = field(default_factory=lambda: DEFAULT_TIMEOUT)
    """An httpx.Timeout, or seconds for all of connect/read/write/pool."""
    retry: Retry = field(default_factory=Retry)
    chunk_size: int = 64
    """Items per request; keep it at or under the service's max_items_per_request."""
    max_concurrency: int = 4
    """Requests of one split batch in flight at once."""
    max_request_bytes: int = 16 * 1024 * 1024
    """Largest request body: a chunk is cut sooner when its items would pass it (images
    make items large). Keep it at or under the service's max_request_bytes (16 MiB by
    default), which answers a larger body with 413 for the whole request."""
    mixed_revision_rescores: int = 1
    """A split batch whose requests came back from two model revisions (the service
    reloaded while they ran): the items not scored by the service's current revision
    (GET /v1/model) are scored again, up to this many times, so the batch has one
    revision; then MixedRevisionsError. 0 raises at once."""

    def __post_init__(self) -> None:
        if self.chunk_size < 1 or self.max_concurrency < 1:
            raise ValueError("chunk_size and max_concurrency must be at least 1")
        if self.mixed_revision_rescores < 0:
            raise ValueError("mixed_revision_rescores must be at least 0")
        if self.max_request_bytes < 1024:
            raise ValueError("max_request_bytes must be at least 1024")
        if not isinstance(self.timeout, httpx.Timeout):
            object.__setattr__(self, "timeout", httpx.Timeout(self.timeout))
