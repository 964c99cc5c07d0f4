"""Remote vLLM backend: probes go as token ids to one or more `vllm serve` servers.

The service holds only the tokenizer (from `--model`, the same folder the
servers serve); at start-up it checks that every server serves a model of that
name and tokenizes a sample exactly as we do.

Endpoint: `/inference/v1/generate` when the server allows it (`vllm serve
--enable-scale-out --enable-prompt-tokens-details`): it takes a full
SamplingParams, so prompt-logprob requests may read the prefix cache, and it
reports `cached_tokens`, which the cached-row guard (prefix_cache.py) needs.
Otherwise `/v1/completions` with `prompt_logprobs`, which never reads the cache.

Routing and failures (the pure parts are in routing.py): each batch is planned
over the servers that are up, all probes of a trajectory on one server so its
prefix cache serves them, trajectories spread by the work in flight, GRPO groups
kept together where that costs no balance. 429 and 5xx answers and dropped
connections are retried with jittered backoff; a timeout or a refused
connection is not. A server that still fails is set aside for `cooloff_s` and
its trajectories move to the least-loaded server that is up; after the cool-off
one trial request decides whether it is back. With no server left the items
fail with `backend_error` naming every server and why.

Images (a vision-language model, vision.py). A probe of a trajectory with images
goes to `/inference/v1/generate` with its placeholders collapsed (vllm_media.py) and
the images beside the token ids as `content_parts` (`{"type": "image_url", "url":
data URI, "uuid": sha256}`): the server decodes and expands them as the in-process
engine does, and its prefix cache serves the trajectory's probes. `/v1/completions`
takes no images with token ids, so on a server without the generate endpoint such a
trajectory fails, naming the flags to start it with.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx

from ..probes import TrajectoryProbes
from ..models import weights_revision
from ..protocol import ModelInfo
from ..vision import load_vision
from .base import Abandoned, Backend, BackendError, BatchLogliks, abandoned_error
from .prefix_cache import UnreadableRows, read_probe, reference_logprobs
from .routing import CoolOff, plan_routes
from .vllm_media import check_expansion, collapse_images, content_parts, route_key

__all__ = ["VLLMRemoteBackend", "RemoteSetupError"]

log = logging.getLogger(__name__)

_SAMPLE = "StepCredit checks the tokenizer: 12 + 30 = 42.\n</think>\n<answer>"
_FLAGS = "--enable-scale-out --enable-prompt-tokens-details"


class RemoteSetupError(RuntimeError):
    """A server is unreachable or serves another model/tokenizer at start-up."""


class _Server:
    def __init__(self, index: int, url: str, client: httpx.AsyncClient, concurrency: int, health: CoolOff) -> None:
        self.index = index
        self.url = url.rstrip("/")
        self.client = client
        self.slots = asyncio.Semaphore(concurrency)
        self.generate_endpoint = False
        self.model_id = ""
        self.health = health
        self.trial_done = asyncio.Event()
        self.inflight = 0
        """Estimated tokens of the trajectories now routed here."""
        self.served = 0
        """Estimated tokens of every trajectory ever routed here (ties go to the least served)."""


class _Route:
    """Where one trajectory's probes go, and the servers that already failed it."""

    def __init__(self, server: _Server, cost: int) -> None:
        self.server = server
        self.cost = cost
        self.failures: dict[int, str] = {}
        """Server index -> why it failed this trajectory."""


def _cost(traj: TrajectoryProbes) -> int:
    # Beyond the trunk each probe adds its probe prefix (a few tokens) and its references.
    return len(traj.contexts) * (8 + sum(len(r) for r in traj.references))


def _logprob_of(row: dict, token: int) -> float | None:
    # JSON rows map str(token id) -> {"logprob": ..., "rank": ...}.
    entry = row.get(str(token))
    return None if entry is None else entry.get("logprob")


class VLLMRemoteBackend(Backend):
    drops_abandoned = True
    reload_refusal = (
        "vllm-remote cannot reload: the weights live in the remote vLLM servers. Reload them there "
        "(vLLM's /collective_rpc reload_weights, or a restart on the new folder), then restart this "
        "service on that folder so its tokenizer and revision follow"
    )

    def __init__(
        self,
        model_path: Path | str,
        urls: Sequence[str],
        *,
        prefix_reuse: bool = True,
        timeout_s: float = 60.0,
        retries: int = 3,
        cooloff_s: float = 30.0,
        concurrency_per_server: int = 64,
        max_inflight_batches: int = 4,
        name: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`transport` and `clock` are for tests (httpx.MockTransport, a fake clock)."""
        from transformers import AutoConfig, AutoTokenizer

        if not urls:
            raise ValueError("vllm-remote needs at least one server URL (--vllm-url)")
        path = Path(model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        config = AutoConfig.from_pretrained(path)
        # The service expands image placeholders with the folder's own image processor.
        self.vision = load_vision(path, self.tokenizer)
        self.prefix_reuse = prefix_reuse
        self.retries = retries
        self.cooloff_s = cooloff_s
        self.max_inflight_batches = max_inflight_batches
        self._timeout = httpx.Timeout(timeout_s, connect=min(5.0, timeout_s))
        self._urls = list(urls)
        self._concurrency = concurrency_per_server
        self._transport = transport
        self._clock = clock
        self.servers: list[_Server] = []
        self.resubmissions = 0
        self.info = ModelInfo(
            name=name or path.name,
            path=str(path),
            backend="vllm-remote",
            strategy=("prefix-reuse" if prefix_reuse else "no-reuse") + f" x{len(urls)}",
            device="remote",
            dtype=str(getattr(config, "dtype", None) or "unknown").replace("torch.", ""),
            vocab_size=len(self.tokenizer),
            max_context=int(getattr(config.get_text_config(), "max_position_embeddings", 0) or 4096),
            revision=weights_revision(path),
        )

    # ------------------------------------------------------------ start-up

    async def connect(self) -> None:
        """Reach every server, check its model and tokenizer, pick its endpoint."""
        limits = httpx.Limits(max_connections=self._concurrency, max_keepalive_connections=self._concurrency)
        for index, url in enumerate(self._urls):
            client = httpx.AsyncClient(timeout=self._timeout, limits=limits, transport=self._transport)
            server = _Server(index, url, client, self._concurrency, CoolOff(self.cooloff_s, self._clock))
            try:
                await self._check(server)
            except BaseException:
                await client.aclose()
                raise
            self.servers.append(server)
        endpoints = (f"{s.url} ({'generate' if s.generate_endpoint else 'completions'})" for s in self.servers)
        log.info("vllm-remote: %s", ", ".join(endpoints))

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
        try:
            sample = {"model": server.model_id, "prompt": _SAMPLE}
            response = await server.client.post(f"{server.url}/tokenize", json=sample)
            if response.status_code != 200 or response.json().get("tokens") != ours:
                raise RemoteSetupError(f"{server.url} tokenizes differently from {self.info.path}")
            probe = await server.client.post(
                f"{server.url}/inference/v1/generate",
                json={"token_ids": ours[:4], "sampling_params": self._params(read_cache=False)},
            )
        except (httpx.HTTPError, ValueError) as exc:
            raise RemoteSetupError(f"vLLM server {server.url} failed during the start-up checks: {exc!r}") from None
        server.generate_endpoint = probe.status_code == 200
        if self.prefix_reuse and not server.generate_endpoint:
            log.warning(
                "%s has no /inference/v1/generate (start it with %s): no prefix reuse there%s",
                server.url,
                _FLAGS,
                ", and no item with images" if self.vision is not None else "",
            )

    @staticmethod
    def _params(read_cache: bool) -> dict:
        return {
            "max_tokens": 1,
            "prompt_logprobs": 0,
            "detokenize": False,
            "skip_reading_prefix_cache": not read_cache,
        }

    # -------------------------------------------------------------- routing

    def _ranked(self) -> list[_Server]:
        """Servers the planner may use, least served first (its tie-break)."""
        return sorted((s for s in self.servers if s.health.available), key=lambda s: (s.served, s.index))

    def _nobody_left(self, tried: dict[int, str]) -> BackendError:
        why = [f"{s.url}: {tried.get(s.index) or s.health.describe()}" for s in self.servers]
        return BackendError("no vLLM server could score this item: " + "; ".join(why))

    def _move(self, route: _Route, failed: _Server, reason: str) -> None:
        """Send the rest of a trajectory to the least-loaded server that has not failed it."""
        route.failures[failed.index] = reason
        if route.server is not failed:
            return  # a sibling probe already moved it
        left = [s for s in self.servers if s.index not in route.failures and s.health.available]
        if not left:
            raise self._nobody_left(route.failures)
        target = min(left, key=lambda s: (s.inflight, s.served, s.index))
        failed.inflight -= route.cost
        target.inflight += route.cost
        target.served += route.cost
        route.server = target

    # -------------------------------------------------------------- scoring

    async def loglikelihoods(
        self, batch: Sequence[TrajectoryProbes], abandoned: Abandoned | None = None
    ) -> BatchLogliks:
        if not self.servers:
            raise BackendError("vllm-remote is not connected: call start() first")
        ranked = self._ranked()
        if not ranked:
            error = self._nobody_left({})
            return BatchLogliks.collect([BackendError(str(error)) for _ in batch])
        extra = [_cost(t) for t in batch]
        image_token = self.vision.image_token_id if self.vision is not None else None
        plan = plan_routes([route_key(t, image_token) for t in batch], extra, [s.inflight for s in ranked])
        routes = []
        for traj_cost, choice in zip((len(t.trunk) + e for t, e in zip(batch, extra)), plan, strict=True):
            server = ranked[choice]
            server.inflight += traj_cost
            server.served += traj_cost
            routes.append(_Route(server, traj_cost))
        abandoned = abandoned or Abandoned()
        trajectories = (
            self._trajectory(t, r, lambda i=i: i in abandoned) for i, (t, r) in enumerate(zip(batch, routes, strict=True))
        )
        outcomes = await asyncio.gather(*trajectories, return_exceptions=True)
        return BatchLogliks.collect(outcomes)

    async def _trajectory(
        self, traj: TrajectoryProbes, route: _Route, gone=lambda: False
    ) -> tuple[list[list[float]], int]:
        media = getattr(traj, "media", None)
        try:
            if media is not None and self.vision is None:
                raise BackendError(f"the scoring model ({self.info.name}) takes no images")
            rows, computed = [], 0
            for context in traj.contexts:
                if gone():  # its client went away: send no more of its probes
                    raise abandoned_error()
                # The first reference writes this context into the cache; the rest read it.
                head = await self._score(route, context, traj.references[0], media)
                rest = await asyncio.gather(
                    *(self._score(route, context, r, media) for r in traj.references[1:])
                )
                scored = [head, *rest]
                rows.append([mean for mean, _ in scored])
                computed += sum(tokens for _, tokens in scored)
            return rows, computed
        finally:
            route.server.inflight -= route.cost

    async def _score(self, route: _Route, context: list[int], reference: list[int], media=None) -> tuple[float, int]:
        while True:
            server = route.server
            try:
                return await self._score_on(server, context, reference, media)
            except _Unavailable as exc:
                self._move(route, server, str(exc))

    async def _score_on(
        self, server: _Server, context: list[int], reference: list[int], media=None
    ) -> tuple[float, int]:
        prompt = context + reference
        images = None
        if media is not None:
            if not server.generate_endpoint:
                raise BackendError(
                    f"{server.url} has no /inference/v1/generate, and /v1/completions takes no images with "
                    f"token ids: start that server with `vllm serve MODEL {_FLAGS}` to score items with images"
                )
            sizes = [self.vision.tokens_per_image(image.grid_thw) for image in media.images]
            images = (collapse_images(prompt, self.vision.image_token_id, sizes), content_parts(media))

        async def fetch(read_cache: bool):
            rows, cached = await self._request(server, prompt, read_cache, images)
            if images is not None and isinstance(rows, list):  # the server expanded the images: as we did?
                check_expansion(len(rows), len(prompt), server.url)
            return rows, cached

        try:
            probe = await read_probe(fetch, len(context), read_cache=self.prefix_reuse and server.generate_endpoint)
        except UnreadableRows as exc:
            raise BackendError(f"{server.url} could not serialize prompt logprobs without cache reads: {exc}") from None
        self.resubmissions += probe.resubmitted
        try:
            values = reference_logprobs(probe.rows, len(context), reference, _logprob_of)
        except BackendError as exc:
            raise BackendError(f"{server.url}: {exc}") from None
        return sum(values) / len(values), len(prompt) - probe.cached_tokens

    async def _request(
        self, server: _Server, prompt: list[int], read_cache: bool, images: tuple[list[int], list[dict]] | None = None
    ) -> tuple[list, int | None]:
        """`images`: (the prompt with its placeholders collapsed, the content parts)."""
        if server.generate_endpoint:
            url = f"{server.url}/inference/v1/generate"
            body = {"token_ids": prompt, "sampling_params": self._params(read_cache)}
            if images is not None:
                body["token_ids"], body["content_parts"] = images
        else:
            url = f"{server.url}/v1/completions"
            body = {"model": server.model_id, "prompt": prompt, "max_tokens": 1, "prompt_logprobs": 0}
        data = await self._post(server, url, body)
        try:
            if server.generate_endpoint:
                details = (data.get("usage") or {}).get("prompt_tokens_details") or {}
                return data["prompt_logprobs"], details.get("cached_tokens")
            return data["choices"][0]["prompt_logprobs"], 0
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise BackendError(f"{server.url} answered without prompt logprobs ({exc!r})") from None

    # ---------------------------------------------------------- one request

    async def _admit(self, server: _Server) -> bool:
        """Wait until a request may go to `server`; True when it is the cool-off's trial."""
        while True:
            verdict = server.health.admit()
            if verdict == "go":
                return False
            if verdict == "trial":
                server.trial_done = asyncio.Event()
                return True
            if verdict == "no":
                raise _Unavailable(server.health.describe())
            await server.trial_done.wait()

    def _failed(self, server: _Server, problem: str, trial: bool) -> _Unavailable:
        if server.health.up:
            log.warning("vllm-remote: setting %s aside for %.0f s: %s", server.url, self.cooloff_s, problem)
        elif server.health.trial:
            log.warning("vllm-remote: %s still fails (%s): aside for %.0f s more", server.url, problem, self.cooloff_s)
        server.health.failed(problem, trial=trial)
        return _Unavailable(problem)

    async def _post(self, server: _Server, url: str, body: dict) -> dict:
        trial = await self._admit(server)
        try:
            return await self._send(server, url, body, trial)
        finally:
            if trial:
                if server.health.trial:  # cancelled or failed in a way that says nothing of the server
                    server.health.trial_abandoned()
                server.trial_done.set()

    async def _send(self, server: _Server, url: str, body: dict, trial: bool) -> dict:
        delay = 0.2
        for attempt in range(self.retries + 1):
            async with server.slots:
                # Queued behind other requests while a sibling found the server dead: do not send.
                if not trial and not server.health.up:
                    raise _Unavailable(server.health.describe())
                try:
                    response = await server.client.post(url, json=body)
                except (httpx.TimeoutException, httpx.ConnectError) as exc:
                    # Not retried: a hung server would cost a timeout per attempt, and one
                    # that refuses connections is down; the cool-off's trial finds it back.
                    raise self._failed(server, f"{type(exc).__name__}: {exc or 'no detail'}", trial) from None
                except httpx.TransportError as exc:  # e.g. a kept-alive connection dropped
                    response, problem = None, f"{type(exc).__name__}: {exc}"
            if response is not None:
                if response.status_code != 429 and response.status_code < 500:
                    if trial:
                        log.info("vllm-remote: %s answers again", server.url)
                        server.health.trial_passed()
                        trial = False
                    if response.status_code == 200:
                        try:
                            return response.json()
                        except ValueError:
                            raise BackendError(f"{server.url} answered a probe with invalid JSON") from None
                    if response.status_code == 400 and "not JSON compliant" in response.text:
                        # Non-finite garbage in cached rows the server could not serialize.
                        raise UnreadableRows(response.text[:200])
                    raise BackendError(f"{server.url} rejected a probe ({response.status_code}): {response.text[:300]}")
                problem = f"HTTP {response.status_code}"
            if attempt == self.retries:
                raise self._failed(server, f"{problem} after {attempt + 1} attempts", trial)
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay *= 2
        raise AssertionError("unreachable")

    async def start(self) -> None:
        await self.connect()

    async def aclose(self) -> None:
        for server in self.servers:
            await server.client.aclose()


class _Unavailable(Exception):
    """A server failed or is set aside; the trajectory moves to another."""
