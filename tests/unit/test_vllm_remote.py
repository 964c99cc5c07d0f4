"""vllm-remote against fake `vllm serve` servers (httpx.MockTransport): routing across
servers, cool-off of a failing server, recovery, and every server down.

The fake server scores token t at any position with the logprob -(t % 13 + 1) / 10, so
a probe's expected mean is known whichever server answers it.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from pathlib import Path

import httpx
import pytest

from stepcredit.backends.base import BackendError
from stepcredit.backends.vllm_remote import VLLMRemoteBackend
from stepcredit.probes import TrajectoryProbes

SYSTEM = list(range(100, 400))  # a 300-token system prompt every trajectory shares
URLS = ["http://gpu-a:8000", "http://gpu-b:8000", "http://gpu-c:8000"]


def logprob(token: int) -> float:
    return -((token % 13) + 1) / 10


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tokenizer and a config, all the remote backend loads (no weights)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("remote-model")
    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(100)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(path)
    config = LlamaConfig(vocab_size=101, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=1)
    config.save_pretrained(path)
    return path


class Fleet:
    """Fake servers by host. A server's `mode`: "ok", "timeout" (answers nothing for
    `hang_s`, then the client's read timeout fires), "refuse", an HTTP status to answer,
    or "cached" (a cache-reading request finds the whole prompt cached: garbage rows)."""

    def __init__(self, model_dir: Path, hang_s: float = 0.3) -> None:
        from transformers import AutoTokenizer

        self.name = model_dir.name
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.hang_s = hang_s
        self.mode: dict[str, object] = defaultdict(lambda: "ok")
        self.probes: list[tuple[str, list[int]]] = []
        """(host, prompt) of every probe request that reached a server."""
        self.spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
        """Per host: (start, end) of each probe request, on the event loop's clock."""
        self.reads: list[bool] = []
        """Whether each probe request asked to read the prefix cache."""

    def count(self, host: str) -> int:
        return sum(1 for h, _ in self.probes if h == host)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        host, path = request.url.host, request.url.path
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": self.name}]})
        body = json.loads(request.content)
        if path == "/tokenize":
            return httpx.Response(200, json={"tokens": self.tokenizer(body["prompt"])["input_ids"]})
        assert path == "/inference/v1/generate", path
        prompt = body["token_ids"]
        self.probes.append((host, prompt))
        self.reads.append(not body["sampling_params"]["skip_reading_prefix_cache"])
        loop = asyncio.get_running_loop()
        start = loop.time()
        mode = self.mode[host]
        if mode == "timeout":
            await asyncio.sleep(self.hang_s)
            self.spans[host].append((start, loop.time()))
            raise httpx.ReadTimeout("timed out", request=request)
        self.spans[host].append((start, loop.time()))
        if mode == "refuse":
            raise httpx.ConnectError("connection refused", request=request)
        if isinstance(mode, int):
            return httpx.Response(mode, text="overloaded")
        cached = len(prompt) if mode == "cached" and self.reads[-1] else 0
        rows = [None] + [{str(t): {"logprob": 0.0 if cached else logprob(t), "rank": 1}} for t in prompt[1:]]
        details = {"cached_tokens": cached}
        return httpx.Response(200, json={"prompt_logprobs": rows, "usage": {"prompt_tokens_details": details}})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def connected(model_dir, fleet, urls, **kwargs) -> VLLMRemoteBackend:
    kwargs = {"retries": 2, "cooloff_s": 30.0, "timeout_s": 5.0, **kwargs}
    backend = VLLMRemoteBackend(model_dir, urls, transport=httpx.MockTransport(fleet.handle), **kwargs)
    await backend.start()
    fleet.probes.clear()
    fleet.spans.clear()
    fleet.reads.clear()
    return backend


def trajectories(count: int, probes: int = 3, start: int = 0) -> list[TrajectoryProbes]:
    """`count` trajectories sharing SYSTEM, told apart by their token at position 300."""
    out = []
    for i in range(start, start + count):
        trunk = SYSTEM + [1000 + i] + [2000 + 7 * i + k for k in range(40)]
        contexts = [trunk[: 301 + 10 * k] + [50, 51] for k in range(probes)]
        out.append(TrajectoryProbes(trunk, contexts, [[60, 61], [62]]))
    return out


def expected(traj: TrajectoryProbes) -> list[list[float]]:
    return [[sum(logprob(t) for t in ref) / len(ref) for ref in traj.references] for _ in traj.contexts]


def assert_scored(batch, out) -> None:
    for traj, result in zip(batch, out.results, strict=True):
        assert not isinstance(result, Exception), result
        assert [x for row in result for x in row] == pytest.approx([x for row in expected(traj) for x in row])


def servers_of(fleet: Fleet) -> dict[int, set[str]]:
    """Trajectory (its token at position 300) -> hosts that scored its probes."""
    seen = defaultdict(set)
    for host, prompt in fleet.probes:
        seen[prompt[300]].add(host)
    return seen


async def test_trajectories_sharing_a_long_system_prompt_spread_over_all_servers(model_dir):
    fleet = Fleet(model_dir)
    backend = await connected(model_dir, fleet, URLS)
    batch = trajectories(12)
    out = await backend.loglikelihoods(batch)
    assert_scored(batch, out)
    per_traj = servers_of(fleet)
    assert len(per_traj) == 12
    # Each trajectory on one server (its prefix cache), the trajectories on all three.
    assert all(len(hosts) == 1 for hosts in per_traj.values()), per_traj
    assert sorted(fleet.count(h) for h in ("gpu-a", "gpu-b", "gpu-c")) == [24, 24, 24]
    await backend.aclose()


async def test_single_trajectory_batches_round_robin(model_dir):
    fleet = Fleet(model_dir)
    backend = await connected(model_dir, fleet, URLS)
    for i in range(6):
        assert_scored(trajectories(1, start=i), await backend.loglikelihoods(trajectories(1, start=i)))
    assert [fleet.count(h) for h in ("gpu-a", "gpu-b", "gpu-c")] == [12, 12, 12]
    await backend.aclose()


async def test_a_dead_server_costs_one_timeout_per_batch_then_none(model_dir):
    fleet = Fleet(model_dir, hang_s=0.4)
    backend = await connected(model_dir, fleet, URLS[:2])
    fleet.mode["gpu-a"] = "timeout"
    batch = trajectories(8, probes=4)
    out = await backend.loglikelihoods(batch)
    assert_scored(batch, out)  # gpu-b took over every trajectory gpu-a had
    dead = fleet.spans["gpu-a"]
    # At most one request per trajectory, all in flight together: one timeout of waiting.
    assert 1 <= len(dead) <= 8
    assert max(start for start, _ in dead) < min(end for _, end in dead)
    assert all(hosts == {"gpu-b"} or hosts == {"gpu-a", "gpu-b"} for hosts in servers_of(fleet).values())
    # The next batch, within the cool-off: nothing goes to gpu-a.
    fleet.probes.clear()
    out = await backend.loglikelihoods(trajectories(8, start=8))
    assert_scored(trajectories(8, start=8), out)
    assert fleet.count("gpu-a") == 0 and fleet.count("gpu-b") == 8 * 3 * 2
    await backend.aclose()


async def test_a_server_answering_5xx_is_retried_then_set_aside(model_dir):
    fleet = Fleet(model_dir)
    backend = await connected(model_dir, fleet, URLS[:2], retries=2)
    fleet.mode["gpu-a"] = 503
    batch = trajectories(6)
    assert_scored(batch, await backend.loglikelihoods(batch))
    routed_to_a = sum(1 for hosts in servers_of(fleet).values() if "gpu-a" in hosts)
    assert 1 <= routed_to_a and fleet.count("gpu-a") <= 3 * routed_to_a  # 1 try + 2 retries each
    fleet.probes.clear()
    assert_scored(batch, await backend.loglikelihoods(batch))
    assert fleet.count("gpu-a") == 0
    await backend.aclose()


async def test_a_passing_5xx_is_retried_on_the_same_server(model_dir):
    fleet = Fleet(model_dir)
    backend = await connected(model_dir, fleet, URLS[:1], retries=2)
    fleet.mode["gpu-a"] = 503
    batch = trajectories(1)
    task = asyncio.ensure_future(backend.loglikelihoods(batch))
    while not fleet.probes:
        await asyncio.sleep(0.01)
    fleet.mode["gpu-a"] = "ok"
    assert_scored(batch, await task)
    assert backend.servers[0].health.up
    await backend.aclose()


async def test_a_server_comes_back_after_its_cool_off(model_dir):
    fleet, clock = Fleet(model_dir), Clock()
    backend = await connected(model_dir, fleet, URLS[:2], clock=clock)
    fleet.mode["gpu-a"] = "refuse"
    assert_scored(trajectories(4), await backend.loglikelihoods(trajectories(4)))
    fleet.mode["gpu-a"] = "ok"  # restarted, but still cooling off
    fleet.probes.clear()
    assert_scored(trajectories(4), await backend.loglikelihoods(trajectories(4)))
    assert fleet.count("gpu-a") == 0
    clock.now += 31
    fleet.probes.clear()
    batch = trajectories(4, start=4)
    assert_scored(batch, await backend.loglikelihoods(batch))
    assert fleet.count("gpu-a") == 2 * 3 * 2  # the trial passed: a full share again
    assert backend.servers[0].health.up
    await backend.aclose()


async def test_after_the_cool_off_one_trial_request_probes_a_still_dead_server(model_dir):
    fleet, clock = Fleet(model_dir, hang_s=0.2), Clock()
    backend = await connected(model_dir, fleet, URLS[:2], clock=clock)
    fleet.mode["gpu-a"] = "timeout"
    assert_scored(trajectories(6), await backend.loglikelihoods(trajectories(6)))
    clock.now += 31
    fleet.probes.clear()
    batch = trajectories(6, start=6)
    assert_scored(batch, await backend.loglikelihoods(batch))
    # Three trajectories were routed to gpu-a; only the trial reached it.
    assert fleet.count("gpu-a") == 1
    fleet.probes.clear()
    assert_scored(batch, await backend.loglikelihoods(batch))
    assert fleet.count("gpu-a") == 0  # set aside again
    await backend.aclose()


async def test_every_server_down_fails_each_item_clearly_and_at_once(model_dir):
    fleet = Fleet(model_dir)
    backend = await connected(model_dir, fleet, URLS[:2])
    fleet.mode["gpu-a"] = fleet.mode["gpu-b"] = "refuse"
    out = await backend.loglikelihoods(trajectories(3))
    for result in out.results:
        assert isinstance(result, BackendError)
        message = str(result)  # each server named, with what went wrong there
        assert "http://gpu-a:8000: " in message and "http://gpu-b:8000: " in message
        assert message.count("ConnectError: connection refused") == 2
    fleet.probes.clear()
    # While both cool off: no request, no wait, an error that says so.
    out = await asyncio.wait_for(backend.loglikelihoods(trajectories(3)), timeout=2)
    assert fleet.probes == []
    for result in out.results:
        assert isinstance(result, BackendError) and "set aside for 30 s more" in str(result)
        assert "gpu-a" in str(result) and "gpu-b" in str(result)
    await backend.aclose()


async def test_a_cache_hit_into_the_reference_is_resubmitted(model_dir):
    fleet = Fleet(model_dir)
    backend = await connected(model_dir, fleet, URLS[:1])
    fleet.mode["gpu-a"] = "cached"
    batch = trajectories(1, probes=1)
    assert_scored(batch, await backend.loglikelihoods(batch))
    # Each of the two references: a cache read with garbage rows, then the same without.
    assert fleet.reads == [True, False, True, False] and backend.resubmissions == 2
    await backend.aclose()


async def test_an_abandoned_trajectory_sends_no_more_probes(model_dir):
    # Its client went away mid-call: the rest of the batch is scored, it costs nothing more.
    from stepcredit.backends.base import Abandoned

    fleet = Fleet(model_dir)
    backend = await connected(model_dir, fleet, URLS)
    batch = trajectories(4)
    gone = Abandoned()
    gone.add(range(1, 3))
    out = await backend.loglikelihoods(batch, abandoned=gone)
    assert isinstance(out.results[1], BackendError) and isinstance(out.results[2], BackendError)
    assert_scored([batch[0], batch[3]], type(out)(results=[out.results[0], out.results[3]]))
    assert len(fleet.probes) == 2 * len(batch[0].contexts) * len(batch[0].references)
    await backend.aclose()
