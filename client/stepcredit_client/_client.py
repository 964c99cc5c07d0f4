"""The sync and async clients. Both share `BaseClient`; only the I/O differs."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor

import httpx

from ._base import RELOAD_TIMEOUT, BaseClient, ItemLike
from ._config import ClientConfig
from ._exceptions import MixedRevisionsError, ServiceUnavailableError, StepCreditError
from ._models import ItemOptions, ModelInfo, ReloadResponse, ScoreItem, ScoreResponse

__all__ = ["Client", "AsyncClient"]


class Client(BaseClient):
    """Blocking client. Thread-safe; split batches go out on a small thread pool.

    >>> with Client("http://127.0.0.1:8000") as client:
    ...     response = client.score([{"prompt": p, "completion": c, "references": ["40"]}])
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        config: ClientConfig | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, api_key, config)
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=self._headers,
            timeout=self.config.timeout,
            transport=transport,
            limits=httpx.Limits(max_connections=self.config.max_concurrency),
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(
        self,
        method: str,
        path: str,
        body: dict | bytes | None = None,
        timeout: httpx.Timeout | float | None = None,
        idempotent: bool = True,
    ) -> httpx.Response:
        attempt = 0
        while True:
            cause = None
            try:
                response = self._http.request(method, path, **_body(body), timeout=_timeout(timeout))
            except httpx.TransportError as exc:
                cause, error = exc, self._transport_error(exc)
            else:
                if response.is_success:
                    return response
                error = self._status_error(response)
            delay = self._retry_delay(attempt, error, cause, idempotent)
            if delay is None:
                raise error
            time.sleep(delay)
            attempt += 1

    def score(self, items: Iterable[ItemLike], options: ItemOptions | Mapping | None = None) -> ScoreResponse:
        """Score items; results come back in their order.

        More than `config.chunk_size` items (or `config.max_request_bytes` of them) are
        split into requests sent at most `config.max_concurrency` at a time. A failed item comes back with
        `status: "error"`; a failed request raises (see the exception tree), and
        `IncompleteBatchError` carries the results that did arrive. A split batch that
        straddled a reload has its other revision's items scored again
        (`config.mixed_revision_rescores`), else raises `MixedRevisionsError`.
        """
        batch = self._items(items)
        if not batch:
            raise ValueError("nothing to score")
        try:
            return self._score_once(batch, options)
        except MixedRevisionsError as exc:
            mixed = exc
        for _ in range(self.config.mixed_revision_rescores):
            try:
                current = self.model()
            except StepCreditError as exc:  # the batch is whole, and still mixed
                raise mixed from exc
            stale = self._stale(mixed, current)
            try:
                again: ScoreResponse | MixedRevisionsError = self._score_once([batch[i] for i in stale], options)
            except MixedRevisionsError as exc:
                again = exc
            except StepCreditError as exc:
                raise self._rescore_failed(mixed, stale, exc) from exc
            try:
                return self._rescored(mixed, stale, again)
            except MixedRevisionsError as exc:
                mixed = exc
        raise mixed

    def _score_once(self, batch: list[ScoreItem], options: ItemOptions | Mapping | None) -> ScoreResponse:
        chunks = self._chunks(batch, options)

        def run(chunk: tuple[int, bytes, int]) -> ScoreResponse | StepCreditError:
            _, body, sent = chunk
            try:
                response = self._request("POST", "/v1/score", body)
                return self._check_count(sent, self._parse(response, ScoreResponse))
            except StepCreditError as exc:
                return exc

        if len(chunks) == 1:
            outcomes = [(0, run(chunks[0]))]
        else:
            with ThreadPoolExecutor(max_workers=self.config.max_concurrency) as pool:
                outcomes = [(chunk[0], outcome) for chunk, outcome in zip(chunks, pool.map(run, chunks))]
        return self._merge(len(batch), outcomes)

    def model(self) -> ModelInfo:
        """The scoring model (GET /v1/model)."""
        return self._parse(self._request("GET", "/v1/model"), ModelInfo)

    def reload(
        self, path: str | os.PathLike, revision: str | None = None, *, timeout: httpx.Timeout | float = RELOAD_TIMEOUT
    ) -> ReloadResponse:
        """Make the service score with the checkpoint folder at `path` (a path on the
        service's machine, safetensors weights) from its next batch on; `revision` is
        what every later response's `model.revision` says (default: a fingerprint of the
        folder). Returns once the new weights serve.

        A refused checkpoint raises InvalidRequestError (`code` "invalid_checkpoint" or
        "incompatible_model", 422), a reload already running raises it with
        "reload_in_progress" (409); neither is retried, and the old weights keep serving.
        A dropped connection is not retried either (the reload may have happened:
        `model()` tells).
        """
        body = self._reload_payload(path, revision)
        response = self._request("POST", "/v1/admin/reload", body, timeout=timeout, idempotent=False)
        return self._parse(response, ReloadResponse)

    def ready(self) -> bool:
        """True once the model is loaded and warmed. One try, no retry."""
        try:
            return self._http.get("/ready").status_code == 200
        except httpx.TransportError:
            return False

    def wait_until_ready(self, timeout_s: float = 300.0, poll_s: float = 1.0) -> None:
        """Block until /ready answers 200; raise ServiceUnavailableError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if time.monotonic() > deadline:
                raise ServiceUnavailableError(503, "not_ready", f"not ready after {timeout_s} s")
            time.sleep(poll_s)


class AsyncClient(BaseClient):
    """Asyncio client; split batches go out concurrently under a semaphore."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        config: ClientConfig | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, api_key, config)
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=self._headers,
            timeout=self.config.timeout,
            transport=transport,
            limits=httpx.Limits(max_connections=self.config.max_concurrency),
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(
        self,
        method: str,
        path: str,
        body: dict | bytes | None = None,
        timeout: httpx.Timeout | float | None = None,
        idempotent: bool = True,
    ) -> httpx.Response:
        attempt = 0
        while True:
            cause = None
            try:
                response = await self._http.request(method, path, **_body(body), timeout=_timeout(timeout))
            except httpx.TransportError as exc:
                cause, error = exc, self._transport_error(exc)
            else:
                if response.is_success:
                    return response
                error = self._status_error(response)
            delay = self._retry_delay(attempt, error, cause, idempotent)
            if delay is None:
                raise error
            await asyncio.sleep(delay)
            attempt += 1

    async def score(self, items: Iterable[ItemLike], options: ItemOptions | Mapping | None = None) -> ScoreResponse:
        """Score items; same contract as `Client.score`."""
        batch = self._items(items)
        if not batch:
            raise ValueError("nothing to score")
        try:
            return await self._score_once(batch, options)
        except MixedRevisionsError as exc:
            mixed = exc
        for _ in range(self.config.mixed_revision_rescores):
            try:
                current = await self.model()
            except StepCreditError as exc:  # the batch is whole, and still mixed
                raise mixed from exc
            stale = self._stale(mixed, current)
            try:
                again: ScoreResponse | MixedRevisionsError = await self._score_once([batch[i] for i in stale], options)
            except MixedRevisionsError as exc:
                again = exc
            except StepCreditError as exc:
                raise self._rescore_failed(mixed, stale, exc) from exc
            try:
                return self._rescored(mixed, stale, again)
            except MixedRevisionsError as exc:
                mixed = exc
        raise mixed

    async def _score_once(self, batch: list[ScoreItem], options: ItemOptions | Mapping | None) -> ScoreResponse:
        gate = asyncio.Semaphore(self.config.max_concurrency)

        async def run(start: int, body: bytes, sent: int) -> tuple[int, ScoreResponse | StepCreditError]:
            async with gate:
                try:
                    response = await self._request("POST", "/v1/score", body)
                    return start, self._check_count(sent, self._parse(response, ScoreResponse))
                except StepCreditError as exc:
                    return start, exc

        outcomes = await asyncio.gather(*(run(*chunk) for chunk in self._chunks(batch, options)))
        return self._merge(len(batch), list(outcomes))

    async def model(self) -> ModelInfo:
        """The scoring model (GET /v1/model)."""
        return self._parse(await self._request("GET", "/v1/model"), ModelInfo)

    async def reload(
        self, path: str | os.PathLike, revision: str | None = None, *, timeout: httpx.Timeout | float = RELOAD_TIMEOUT
    ) -> ReloadResponse:
        """Score with the checkpoint at `path` from now on; same contract as `Client.reload`."""
        body = self._reload_payload(path, revision)
        response = await self._request("POST", "/v1/admin/reload", body, timeout=timeout, idempotent=False)
        return self._parse(response, ReloadResponse)

    async def ready(self) -> bool:
        """True once the model is loaded and warmed. One try, no retry."""
        try:
            return (await self._http.get("/ready")).status_code == 200
        except httpx.TransportError:
            return False

    async def wait_until_ready(self, timeout_s: float = 300.0, poll_s: float = 1.0) -> None:
        """Wait until /ready answers 200; raise ServiceUnavailableError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while not await self.ready():
            if time.monotonic() > deadline:
                raise ServiceUnavailableError(503, "not_ready", f"not ready after {timeout_s} s")
            await asyncio.sleep(poll_s)


def _body(body: dict | bytes | None) -> dict:
    # Scoring bodies come serialized (their size decided the split); others are small dicts.
    if isinstance(body, bytes):
        return {"content": body, "headers": {"Content-Type": "application/json"}}
    return {} if body is None else {"json": body}


def _timeout(timeout: httpx.Timeout | float | None):
    return httpx.USE_CLIENT_DEFAULT if timeout is None else timeout
