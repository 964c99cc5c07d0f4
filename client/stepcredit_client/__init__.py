"""Thin client for the StepCredit reward service (httpx + pydantic only).

    from stepcredit_client import Client, RewardWeights, scalar_rewards

    with Client("http://127.0.0.1:8000", api_key=None) as client:
        response = client.score(items)             # any number of items
    rewards = scalar_rewards(response.results, RewardWeights(outcome=1.0, mig=0.5))

`Client` and `AsyncClient` share one base and one `ClientConfig` (timeout,
`Retry`, `chunk_size`, `max_concurrency`). Large batches are split into
requests of `chunk_size` items sent at most `max_concurrency` at a time.
Connection failures, 429 and 503 are retried with jittered exponential backoff,
honouring Retry-After; other 4xx are never retried; timeouts are not retried.

Images travel inline: `image_data_uri(path | bytes | PIL image)` makes the data URI
for an item's `images` or an `image_url` content part; the service fetches no URL.

A failed item is never a reward of 0: the service marks it `status: "error"`,
`scalar_rewards` turns it into None, and `scalar_reward` / `token_rewards`
raise `ItemFailedError`.

`client.reload(checkpoint_dir, revision="step-100")` makes the service score with
the policy's new checkpoint; every later response's `model.revision` names it. A
split batch whose requests straddled a reload has the old revision's items scored
again (`ClientConfig.mixed_revision_rescores`); one that still holds two revisions
raises `MixedRevisionsError` rather than claim one revision for all its items.

Exceptions:

    StepCreditError                  base of everything raised here
    ├── TransportError               no usable HTTP response
    │   ├── ConnectionFailed         refused, reset, dropped mid-response (after retries)
    │   └── RequestTimeout           read/write/pool timeout (not retried)
    ├── APIError                     an error status; .status .code .message .body .retry_after
    │   ├── AuthenticationError      401
    │   ├── PayloadTooLargeError     413
    │   ├── InvalidRequestError      422 and other 4xx (never retried)
    │   ├── RateLimitError           429 (after retries)
    │   ├── ServiceUnavailableError  503 (after retries): loading, or backend dead
    │   └── ServerError              other 5xx
    ├── ResponseFormatError          a 2xx whose body is not the contract
    ├── IncompleteBatchError         some requests of a split batch failed;
    │                                .results has None for their items, .errors says why
    ├── MixedRevisionsError          a split batch still held two model revisions (reloads) after
    │                                its re-scores; .results and .models (per item) say which
    ├── ItemFailedError              a reward was asked of a failed or missing result
    └── AlignmentError               steps cannot be placed on the policy's tokens

Trainer adapters live in `stepcredit_client.adapters` (trl, verl, openrlhf, slime);
each imports its trainer only when used.
"""

from ._client import AsyncClient, Client
from ._config import DEFAULT_TIMEOUT, ClientConfig, Retry
from ._exceptions import (
    AlignmentError,
    APIError,
    AuthenticationError,
    ConnectionFailed,
    IncompleteBatchError,
    InvalidRequestError,
    ItemFailedError,
    MixedRevisionsError,
    PayloadTooLargeError,
    RateLimitError,
    RequestTimeout,
    ResponseFormatError,
    ServerError,
    ServiceUnavailableError,
    StepCreditError,
    TransportError,
)
from ._images import image_data_uri
from ._models import (
    ChatMessage,
    ContentPart,
    ErrorInfo,
    ImagePart,
    ImageUrl,
    ImageUrlPart,
    ItemOptions,
    ModelInfo,
    ReloadResponse,
    ScoreItem,
    ScoreResponse,
    ScoreResult,
    StepResult,
    TextPart,
    Usage,
)
from ._version import __version__  # noqa: F401  (the package's version)
from .alignment import DecodeAlignment, OffsetAlignment, TokenAlignment
from .rewards import RewardWeights, TokenRewards, require_ok, scalar_reward, scalar_rewards, token_rewards

__all__ = [
    "Client",
    "AsyncClient",
    "ClientConfig",
    "Retry",
    "DEFAULT_TIMEOUT",
    "ChatMessage",
    "ContentPart",
    "TextPart",
    "ImageUrlPart",
    "ImageUrl",
    "ImagePart",
    "image_data_uri",
    "ItemOptions",
    "ScoreItem",
    "ScoreResult",
    "StepResult",
    "ErrorInfo",
    "ModelInfo",
    "Usage",
    "ScoreResponse",
    "ReloadResponse",
    "RewardWeights",
    "TokenRewards",
    "require_ok",
    "scalar_reward",
    "scalar_rewards",
    "token_rewards",
    "TokenAlignment",
    "OffsetAlignment",
    "DecodeAlignment",
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
