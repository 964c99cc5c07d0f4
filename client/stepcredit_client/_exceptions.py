"""The client's exceptions. The tree is documented in the package docstring."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._models import ModelInfo, ScoreResult, Usage

__all__ = [
    "StepCreditError",
    "TransportError",
    "ConnectionFailed",
    "RequestTimeout",
    "APIError",
    "AuthenticationError",
    "PayloadTooLargeError",
    "InvalidRequestError",
    "RateLimitError",
    "ServiceUnavailableError",
    "ServerError",
    "ResponseFormatError",
    "IncompleteBatchError",
    "MixedRevisionsError",
    "ItemFailedError",
    "AlignmentError",
]


class StepCreditError(Exception):
    """Base of every error the client raises."""


class TransportError(StepCreditError):
    """No usable HTTP response arrived."""


class ConnectionFailed(TransportError):
    """The connection could not be made or was dropped before the response ended
    (refused, reset, server gone). Retried with backoff before it is raised."""


class RequestTimeout(TransportError):
    """The service did not answer within the read/write/pool timeout. Not retried:
    a slow service would only get more load."""


class APIError(StepCreditError):
    """The service answered with an error status. `code` and `message` come from
    its `{"error": {...}}` body when it has one."""

    def __init__(
        self, status: int, code: str, message: str, body: object = None, retry_after: float | None = None
    ) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status, self.code, self.message, self.body = status, code, message, body
        self.retry_after = retry_after
        """Seconds the service asked to wait (Retry-After), if it said."""


class AuthenticationError(APIError):
    """401: missing or wrong API key."""


class PayloadTooLargeError(APIError):
    """413: the body or the number of items is over the service's limit (lower `chunk_size`)."""


class InvalidRequestError(APIError):
    """422 or another 4xx: the request is malformed or over a per-item limit. Never retried."""


class RateLimitError(APIError):
    """429: the service is overloaded; raised once the retries are spent."""


class ServiceUnavailableError(APIError):
    """503: the model is loading or the backend died; raised once the retries are spent."""


class ServerError(APIError):
    """Another 5xx."""


class ResponseFormatError(StepCreditError):
    """A success status whose body is not the contract's (wrong service, proxy page)."""


class IncompleteBatchError(StepCreditError):
    """Some requests of a split batch failed while others succeeded.

    `results[i]` is the result of item i, or None where its request failed (never a
    made-up score); `errors` maps the first item index of each failed chunk to its
    exception; `usage` sums what the successful requests reported.
    """

    def __init__(self, results: list[ScoreResult | None], errors: dict[int, StepCreditError], usage: Usage) -> None:
        missing = sum(r is None for r in results)
        first = next(iter(errors.values()))
        super().__init__(f"{missing} of {len(results)} items have no result; first error: {first}")
        self.results, self.errors, self.usage = results, errors, usage


class MixedRevisionsError(StepCreditError):
    """The requests of a split batch were scored by different model revisions (the
    service reloaded its weights while they ran), so no one revision describes the batch.

    `results` holds every item's result, `models[i]` the model that scored item i, and
    `usage` the sum. Rewards of one batch from two policies' likelihoods are not
    comparable: score the items again (they get the current revision) or keep the
    results knowingly.
    """

    def __init__(self, results: list[ScoreResult], models: list[ModelInfo], usage: Usage) -> None:
        counts: dict[str | None, int] = {}
        for model in models:
            counts[model.revision] = counts.get(model.revision, 0) + 1
        said = ", ".join(f"{revision!r} for {n} items" for revision, n in counts.items())
        super().__init__(
            f"the batch was scored by {len(counts)} model revisions ({said}): the service reloaded its "
            "weights while the batch ran; score the items again for one revision"
        )
        self.results, self.models, self.usage = results, models, usage


class ItemFailedError(StepCreditError):
    """A reward was asked of a result whose status is "error" (or that is missing)."""

    def __init__(self, item_id: str | None, code: str, message: str) -> None:
        super().__init__(f"item {item_id!r} failed: {code}: {message}")
        self.item_id, self.code, self.message = item_id, code, message


class AlignmentError(StepCreditError):
    """Step boundaries cannot be placed on the policy's tokens: the text the service
    scored is not what the tokens decode to. Raised instead of guessing a position."""
