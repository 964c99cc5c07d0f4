"""Remote vLLM backend: probes go as token ids to one or more `vllm serve` servers.

The service holds only the tokenizer (from `--model`, the same folder the
servers serve); at start-up it checks that every server serves a model of that
name and tokenizes a sample exactly as we do.

Endpoint: `/inference/v1/generate` when the server allows it (`vllm serve
--enable-scale-out --enable-prompt-tokens-details`): it takes a full
SamplingParams, so prompt-logprob requests may read the prefix cache, and it
reports `cached_tokens`, which the garbage-row guard needs. Otherwise
`/v1/completions` with `prompt_logprobs`, which never reads the cache.

All probes of one trajectory go to the same server (chosen by the trajectory's
first tokens), so that server's prefix cache serves them. Each call has a
timeout; connection errors, 429 and 5xx are retried with jittered backoff,
then the next server is tried, then the item fails with an error naming them.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from collections.abc import Sequence
from pathlib import Path

import httpx

from ..probes import TrajectoryProbes
from ..protocol import ModelInfo
from .base import Backend, BackendError, BatchLogliks

__all__ = ["VLLMRemoteBackend", "RemoteSetupError"]

log = logging.getLogger(__name__)

_SAMPLE = "StepCredit checks the tokenizer: 12 + 30 = 42.\n</think>\n<answer>"


class RemoteSetupError(RuntimeError):
    """A server is unreachable or serves another model/tokenizer at start-up."""


class _Server:
    def __init__(self, url: str, client: httpx.AsyncClient, concurrency: int) -> None:
        self.url = url.rstrip("/")
        self.client = client
        self.slots = asyncio.Semaphore(concurrency)
        self.generate_endpoint = False
        self.model_id = ""


class VLLMRemoteBackend(Backend):
    def __init__(
        self,
        model_path: Path | str,
        urls: Sequence[str],
        *,
        prefix_reuse: bool = True,
        timeout_s: float = 60.0,
        retries: int = 3,
        concurrency_per_server: int = 64,
        max_inflight_batches: int = 4,
        name: str | None = None,
    ) -> None:
        from transformers import AutoConfig, AutoTokenizer

        if not urls:
            raise ValueError("vllm-remote needs at least one server URL (--vllm-url)")
        path = Path(model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        config = AutoConfig.from_pretrained(path)
        self.prefix_reuse = prefix_reuse
        self.retries = retries
        self.max_inflight_batches = max_inflight_batches
        self._timeout = httpx.Timeout(timeout_s, connect=min(5.0, timeout_s))
        self._urls = list(urls)
        self._concurrency = concurrency_per_server
        self.servers: list[_Server] = []
        self.resubmissions = 0
        self.info = ModelInfo(
            name=name or path.name,
            path=str(path),
            backend="vllm-remote",
            strategy=("prefix-reuse" if prefix_reuse else "no-reuse") + f" x{len(urls)}",
            device="remote",
            dtype=str(getattr(config, "torch_dtype", None) or getattr(config, "dtype", "unknown")).replace("torch.", ""),
            vocab_size=len(self.tokenizer),
            max_context=int(getattr(config, "max_position_embeddings", 0) or 4096),
        )

    # ------------------------------------------------------------ start-up

    async def connect(self) -> None:
        """Reach every server, check its model and tokenizer, pick its endpoint."""
        limits = httpx.Limits(max_connections=self._concurrency, max_keepalive_connections=self._concurrency)
        for url in self._urls:
            server = _Server(url, httpx.AsyncClient(timeout=self._timeout, limits=limits), self._concurrency)
            await self._check(server)
            self.servers.append(server)
        log.info("vllm-remote: %s", ", ".join(f"{s.url} ({'generate' if s.generate_endpoint else 'completions'})" for s in self.servers))

    async def _check(self, server: _Server) -> None:
        try:
            models = (await server.client.get(f"{server.url}/v1/models")).raise_for_status().json()
        except (httpx.HTTPError, ValueError) as exc:
            raise RemoteSetupError(f"vLLM server {server.url} is not reachable: {exc}") from None
        ids = [m["id"] for m in models.get("data", [])]
        wanted = self.info.name
        match = [i for i in ids if i == wanted or Path(i).name == wanted or i == self.info.path]
        if not match:
            raise RemoteSetupError(f"{server.url} serves {ids}, not {wanted!r}")
        server.model_id = match[0]
        ours = self.tokenizer(_SAMPLE)["input_ids"]
        response = await server.client.post(f"{server.url}/tokenize", json={"model": server.model_id, "prompt": _SAMPLE})
        if response.status_code != 200 or response.json().get("tokens") != ours:
            raise RemoteSetupError(f"{server.url} tokenizes differently from {self.info.path}")
        probe = await server.client.post(
            f"{server.url}/inference/v1/generate",
            json={"token_ids": ours[:4], "sampling_params": self._params(read_cache=False)},
        )
        server.generate_endpoint = probe.status_code == 200
        if self.prefix_reuse and not server.generate_endpoint:
            log.warning(
                "%s has no /inference/v1/generate (start it with --enable-scale-out "
                "--enable-prompt-tokens-details): no prefix reuse there",
                server.url,
            )

    @staticmethod
    def _params(read_cache: bool) -> dict:
        return {
            "max_tokens": 1,
            "prompt_logprobs": 0,
            "detokenize": False,
            "skip_reading_prefix_cache": not read_cache,
        }

    # -------------------------------------------------------------- scoring

    def _server_for(self, traj: TrajectoryProbes) -> int:
        digest = hashlib.blake2b(repr(traj.trunk[:256]).encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") % len(self.servers)

    async def loglikelihoods(self, batch: Sequence[TrajectoryProbes]) -> BatchLogliks:
        if not self.servers:
            raise BackendError("vllm-remote is not connected: call start() first")
        outcomes = await asyncio.gather(*(self._trajectory(t) for t in batch), return_exceptions=True)
        return BatchLogliks.collect(outcomes)

    async def _trajectory(self, traj: TrajectoryProbes) -> tuple[list[list[float]], int]:
        first = self._server_for(traj)
        order = [self.servers[(first + i) % len(self.servers)] for i in range(len(self.servers))]
        rows, computed = [], 0
        for context in traj.contexts:
            head = await self._score(order, context, traj.references[0])
            rest = await asyncio.gather(*(self._score(order, context, r) for r in traj.references[1:]))
            scored = [head, *rest]
            rows.append([mean for mean, _ in scored])
            computed += sum(tokens for _, tokens in scored)
        return rows, computed

    async def _score(self, order: list[_Server], context: list[int], reference: list[int]) -> tuple[float, int]:
        prompt = context + reference
        errors = []
        for server in order:
            try:
                return await self._score_on(server, prompt, len(context), reference)
            except _Unavailable as exc:
                errors.append(f"{server.url}: {exc}")
        raise BackendError("every vLLM server failed: " + "; ".join(errors))

    async def _score_on(self, server: _Server, prompt: list[int], context_len: int, reference: list[int]) -> tuple[float, int]:
        reuse = self.prefix_reuse and server.generate_endpoint
        try:
            rows, cached = await self._request(server, prompt, read_cache=reuse)
        except _Garbage:
            # The garbage rows of cached positions can hold NaN or inf, which the
            # server then fails to serialize: read this probe without the cache.
            self.resubmissions += 1
            rows, cached = await self._request(server, prompt, read_cache=False)
            reuse = False
        if cached is None and reuse:
            reuse = False  # no cached-token count: the rows cannot be trusted
            rows, cached = await self._request(server, prompt, read_cache=False)
        if (cached or 0) > context_len - 1:
            self.resubmissions += 1
            rows, cached = await self._request(server, prompt, read_cache=False)
        values = []
        for i, token in enumerate(reference):
            row = rows[context_len + i] or {}
            entry = row.get(str(token))
            if entry is None:
                raise BackendError(f"{server.url} returned no logprob for reference token {token}")
            values.append(float(entry["logprob"]))
        return sum(values) / len(values), len(prompt) - (cached or 0)

    async def _request(self, server: _Server, prompt: list[int], read_cache: bool) -> tuple[list, int | None]:
        if server.generate_endpoint:
            url = f"{server.url}/inference/v1/generate"
            body = {"token_ids": prompt, "sampling_params": self._params(read_cache)}
        else:
            url = f"{server.url}/v1/completions"
            body = {"model": server.model_id, "prompt": prompt, "max_tokens": 1, "prompt_logprobs": 0}
        data = await self._post(server, url, body)
        if server.generate_endpoint:
            details = (data.get("usage") or {}).get("prompt_tokens_details") or {}
            return data["prompt_logprobs"], details.get("cached_tokens")
        return data["choices"][0]["prompt_logprobs"], 0

    async def _post(self, server: _Server, url: str, body: dict) -> dict:
        delay = 0.2
        for attempt in range(self.retries + 1):
            try:
                async with server.slots:
                    response = await server.client.post(url, json=body)
                if response.status_code == 200:
                    return response.json()
                if response.status_code == 400 and "not JSON compliant" in response.text:
                    raise _Garbage(response.text[:200])
                if response.status_code != 429 and response.status_code < 500:
                    raise BackendError(f"{server.url} rejected a probe ({response.status_code}): {response.text[:300]}")
                problem = f"HTTP {response.status_code}"
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if attempt == self.retries:
                raise _Unavailable(problem)
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay *= 2
        raise AssertionError("unreachable")

    async def start(self) -> None:
        await self.connect()

    async def aclose(self) -> None:
        for server in self.servers:
            await server.client.aclose()


class _Garbage(Exception):
    """The server could not serialize a cache-reading response (non-finite garbage rows)."""


class _Unavailable(Exception):
    """A server failed after its retries; the next one may still answer."""
