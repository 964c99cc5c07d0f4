"""What the sync and async clients share: request building, error mapping at one
boundary, the retry decision, batch splitting and merging. No I/O here."""

from __future__ import annotations

import email.utils
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import httpx
from pydantic import ValidationError

from ._config import ClientConfig
from ._exceptions import (
    APIError,
    AuthenticationError,
    ConnectionFailed,
    IncompleteBatchError,
    InvalidRequestError,
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
from ._models import ItemOptions, ModelInfo, ScoreItem, ScoreResponse, ScoreResult, Usage
from ._version import __version__

__all__ = ["BaseClient", "ItemLike", "RELOAD_TIMEOUT"]

ItemLike = ScoreItem | Mapping[str, Any]

# Loading a checkpoint of billions of parameters from disk takes minutes, not seconds.
RELOAD_TIMEOUT = httpx.Timeout(900.0, connect=5.0)

_STATUS_ERRORS: dict[int, type[APIError]] = {
    401: AuthenticationError,
    413: PayloadTooLargeError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


class BaseClient:
    def __init__(self, base_url: str, api_key: str | None, config: ClientConfig | None) -> None:
        self.base_url = base_url.rstrip("/")
        self.config = config or ClientConfig()
        self._headers = {"User-Agent": f"stepcredit-client/{__version__}"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"

    # ------------------------------------------------------------ requests

    @staticmethod
    def _items(items: Iterable[ItemLike]) -> list[ScoreItem]:
        return [item if isinstance(item, ScoreItem) else ScoreItem.model_validate(item) for item in items]

    def _chunks(
        self, items: Sequence[ScoreItem], options: ItemOptions | Mapping | None
    ) -> list[tuple[int, bytes, int]]:
        """(first item's index, JSON body, item count) per request: at most `chunk_size`
        items and `max_request_bytes` bytes each. Each item is serialized once, here."""
        opts = options if options is None or isinstance(options, ItemOptions) else ItemOptions.model_validate(options)
        tail = b"]}" if opts is None else b'],"options":' + opts.model_dump_json(exclude_none=True).encode() + b"}"
        envelope = len(b'{"items":[') + len(tail)
        limit, size = self.config.max_request_bytes, self.config.chunk_size
        chunks: list[tuple[int, list[bytes]]] = []
        body_bytes = 0
        for index, item in enumerate(items):
            encoded = item.model_dump_json(exclude_none=True).encode()
            if envelope + len(encoded) > limit:
                raise ValueError(
                    f"items[{index}] is {len(encoded)} bytes as JSON, more than one request may carry "
                    f"(max_request_bytes={limit}, the service's limit too): send smaller images, or raise "
                    "the limit on both sides"
                )
            last = chunks[-1][1] if chunks else None
            if last is None or len(last) == size or body_bytes + 1 + len(encoded) > limit:
                chunks.append((index, [encoded]))
                body_bytes = envelope + len(encoded)
            else:
                last.append(encoded)
                body_bytes += 1 + len(encoded)
        return [(start, b'{"items":[' + b",".join(parts) + tail, len(parts)) for start, parts in chunks]

    @staticmethod
    def _reload_payload(path: str | os.PathLike, revision: str | None) -> dict:
        # The path is the service machine's: sent as given, never resolved here.
        body: dict = {"path": os.fspath(path)}
        if revision is not None:
            body["revision"] = revision
        return body

    # ------------------------------------------------- errors, one boundary

    @staticmethod
    def _transport_error(exc: httpx.TransportError) -> TransportError:
        # A connect timeout means nothing reached the server: retry it like a refusal.
        if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
            return RequestTimeout(f"{type(exc).__name__}: {exc}")
        if isinstance(exc, httpx.NetworkError | httpx.RemoteProtocolError | httpx.ConnectTimeout):
            return ConnectionFailed(f"{type(exc).__name__}: {exc}")
        return TransportError(f"{type(exc).__name__}: {exc}")

    @staticmethod
    def _status_error(response: httpx.Response) -> APIError:
        try:
            body = response.json()
        except ValueError:
            body = response.text
        code, message = f"http_{response.status_code}", response.reason_phrase
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            code = str(body["error"].get("code", code))
            message = str(body["error"].get("message", message))
        elif isinstance(body, dict) and "detail" in body:  # FastAPI's 422 names the field here
            code, message = "invalid_request", str(body["detail"])
        status = response.status_code
        if status in _STATUS_ERRORS:
            cls = _STATUS_ERRORS[status]
        else:
            cls = ServerError if status >= 500 else InvalidRequestError
        return cls(status, code, message, body, _retry_after(response))

    def _retry_delay(
        self, attempt: int, error: StepCreditError, cause: httpx.TransportError | None = None, idempotent: bool = True
    ) -> float | None:
        """Seconds to wait before trying again, or None to give up with `error`. A request
        that is not `idempotent` is sent again after a connection failure only when the
        connection was never made (`cause` a connect error): the first may have been done."""
        retry = self.config.retry
        if attempt + 1 >= retry.max_attempts:
            return None
        if isinstance(error, ConnectionFailed):
            if not idempotent and not isinstance(cause, httpx.ConnectError | httpx.ConnectTimeout):
                return None
            return retry.delay(attempt, None)
        if isinstance(error, APIError) and error.status in retry.statuses:
            return retry.delay(attempt, error.retry_after)
        return None

    @staticmethod
    def _parse(response: httpx.Response, model):
        try:
            return model.model_validate(response.json())
        except (ValueError, ValidationError) as exc:
            raise ResponseFormatError(f"{response.request.url}: not a {model.__name__}: {exc}") from None

    # ------------------------------------------------------- batch merging

    @staticmethod
    def _merge(n_items: int, outcomes: list[tuple[int, ScoreResponse | StepCreditError]]) -> ScoreResponse:
        """One response for a split batch. A reload between its requests may have scored
        them with different weights: then no single `model` is true (MixedRevisionsError)."""
        results: list[ScoreResult | None] = [None] * n_items
        models: list[ModelInfo | None] = [None] * n_items
        errors: dict[int, StepCreditError] = {}
        usage, model = Usage(), None
        for start, outcome in outcomes:
            if isinstance(outcome, StepCreditError):
                errors[start] = outcome
                continue
            results[start : start + len(outcome.results)] = outcome.results
            models[start : start + len(outcome.results)] = [outcome.model] * len(outcome.results)
            usage, model = usage + outcome.usage, model or outcome.model
        if errors:
            if model is None:  # nothing succeeded: the first failure says why
                raise errors[min(errors)]
            raise IncompleteBatchError(results, errors, usage)
        if len({m.revision for m in models}) > 1:
            raise MixedRevisionsError(results, models, usage)
        return ScoreResponse(results=results, model=model, usage=usage)

    @staticmethod
    def _stale(mixed: MixedRevisionsError, current: ModelInfo) -> list[int]:
        """The items of a mixed batch not scored by the `current` revision."""
        return [i for i, model in enumerate(mixed.models) if model.revision != current.revision]

    @staticmethod
    def _rescored(
        mixed: MixedRevisionsError, stale: list[int], again: ScoreResponse | MixedRevisionsError
    ) -> ScoreResponse:
        """The batch with its `stale` items' results replaced by `again`'s; raises
        MixedRevisionsError while it still holds two revisions."""
        results, models = list(mixed.results), list(mixed.models)
        if isinstance(again, MixedRevisionsError):
            fresh = list(zip(again.results, again.models))
        else:
            fresh = [(result, again.model) for result in again.results]
        for i, (result, model) in zip(stale, fresh):
            results[i], models[i] = result, model
        usage = _item_counts(results, mixed.usage + again.usage)
        if len({m.revision for m in models}) > 1:
            raise MixedRevisionsError(results, models, usage)
        return ScoreResponse(results=results, model=models[stale[0]], usage=usage)

    @staticmethod
    def _rescore_failed(mixed: MixedRevisionsError, stale: list[int], exc: StepCreditError) -> IncompleteBatchError:
        """A re-score that failed: the batch as an IncompleteBatchError in the caller's
        item order. The stale items keep no result of the old revision: each has the
        new one that arrived, or None with its failure in `errors`."""
        results: list[ScoreResult | None] = list(mixed.results)
        for i in stale:
            results[i] = None
        usage = mixed.usage
        if isinstance(exc, IncompleteBatchError):
            for i, result in zip(stale, exc.results):
                results[i] = result
            errors = {stale[start]: error for start, error in exc.errors.items()}
            usage = usage + exc.usage
        else:
            errors = {stale[0]: exc}
        return IncompleteBatchError(results, errors, _item_counts(results, usage))

    @staticmethod
    def _check_count(sent: int, response: ScoreResponse) -> ScoreResponse:
        if len(response.results) != sent:
            raise ResponseFormatError(f"sent {sent} items, got {len(response.results)} results")
        return response


def _item_counts(results: list[ScoreResult | None], usage: Usage) -> Usage:
    """`usage` with its item counts those of `results` (one per result, however often its
    item was scored); the work counters (probes, tokens, forward passes) keep every pass."""
    ok = sum(r is not None and r.status == "ok" for r in results)
    error = sum(r is not None and r.status != "ok" for r in results)
    return usage.model_copy(update={"items": ok + error, "items_ok": ok, "items_error": error})


def _retry_after(response: httpx.Response) -> float | None:
    """Retry-After as seconds: delta-seconds (fractions accepted) or an HTTP date."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
