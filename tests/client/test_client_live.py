"""The client against a live service: `stepcredit serve` on the tiny random Llama,
a real process on a real port, with a fault-injecting proxy where a fault is needed."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

from stepcredit_client import (
    AsyncClient,
    Client,
    ClientConfig,
    ConnectionFailed,
    IncompleteBatchError,
    ItemFailedError,
    RateLimitError,
    RequestTimeout,
    Retry,
    scalar_reward,
    scalar_rewards,
)

from .conftest import ITEM

FAST = Retry(max_attempts=3, backoff_s=0.05, max_backoff_s=0.2)


def assert_same(a, b):
    """Equal results; floats within 1e-4, since how the service batches requests moves float32 noise."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, float):
        assert a == pytest.approx(b, abs=1e-4)
    else:
        assert a == b


def items(n: int) -> list[dict]:
    return [{**ITEM, "id": f"q{i}"} for i in range(n)]


def test_sync_client_scores_a_split_batch_in_order(live_server):
    with Client(live_server.url, config=ClientConfig(chunk_size=4, max_concurrency=2)) as client:
        response = client.score(items(10))
        direct = httpx.post(f"{live_server.url}/v1/score", json={"items": items(10)}, timeout=60).json()
    assert [r.id for r in response.results] == [f"q{i}" for i in range(10)]
    for mine, theirs in zip(response.results, direct["results"]):
        assert_same(mine.model_dump(mode="json"), theirs)
    assert response.usage.items == 10 and response.usage.items_ok == 10
    assert response.model.backend == "hf"


async def test_async_client_gives_the_same_numbers_as_the_sync_client(live_server):
    async with AsyncClient(live_server.url, config=ClientConfig(chunk_size=3, max_concurrency=3)) as client:
        response = await client.score(items(7))
        assert await client.ready() and (await client.model()).max_context > 0
    with Client(live_server.url) as client:
        reference = client.score(items(7))
    for mine, theirs in zip(response.results, reference.results):
        assert_same(mine.model_dump(mode="json"), theirs.model_dump(mode="json"))


def test_a_failed_item_is_none_or_an_exception_never_zero(live_server):
    bad = {**ITEM, "id": "bad", "completion_token_ids": [1, 2, 3]}  # ids that do not decode to the text
    with Client(live_server.url) as client:
        results = client.score([{**ITEM, "id": "good"}, bad]).results
    assert results[1].status == "error" and results[1].error.code == "token_ids_mismatch"
    rewards = scalar_rewards(results)
    assert rewards[0] == pytest.approx(results[0].outcome_reward + results[0].mig_reward)
    assert rewards[1] is None
    with pytest.raises(ItemFailedError, match="token_ids_mismatch"):
        scalar_reward(results[1])


@pytest.mark.parametrize("status", [429, 503])
def test_429_and_503_with_retry_after_are_waited_out_then_scored(proxy, status):
    proxy.script(("status", status, "0.4"), ("status", status, "0.4"))
    with Client(proxy.url, config=ClientConfig(retry=Retry(max_attempts=4, backoff_s=0.0))) as client:
        response = client.score(items(2))
    assert [r.status for r in response.results] == ["ok", "ok"]
    times = [t for t, _ in proxy.seen]
    assert len(times) == 3 and times[1] - times[0] >= 0.39 and times[2] - times[1] >= 0.39


def test_429_without_end_raises_rate_limit_after_the_retries(proxy):
    proxy.script(*[("status", 429, None)] * 3)
    with Client(proxy.url, config=ClientConfig(retry=FAST)) as client, pytest.raises(RateLimitError):
        client.score(items(1))
    assert len(proxy.seen) == 3


def test_a_slow_service_raises_a_timeout_and_is_not_retried(proxy):
    proxy.script(("delay", 3.0))
    started = time.monotonic()
    config = ClientConfig(timeout=httpx.Timeout(0.5, connect=2.0), retry=FAST)
    with Client(proxy.url, config=config) as client, pytest.raises(RequestTimeout):
        client.score(items(1))
    assert time.monotonic() - started < 2.5 and len(proxy.seen) == 1


class _KillDuringRequest(httpx.HTTPTransport):
    """A real transport that kills the server while request number `n` is in flight:
    the server is frozen (SIGSTOP) as the request goes out, so it cannot answer
    first, and killed `after_s` later, while the client waits for the response."""

    def __init__(self, server, n: int, after_s: float) -> None:
        super().__init__()
        self.server, self.n, self.after_s, self.count = server, n, after_s, 0
        self.failures: list[type] = []

    def handle_request(self, request):
        if request.url.path == "/v1/score":
            self.count += 1
            if self.count == self.n:
                os.kill(self.server.proc.pid, signal.SIGSTOP)
                threading.Timer(self.after_s, self.server.kill).start()
        try:
            return super().handle_request(request)
        except httpx.TransportError as exc:
            self.failures.append(type(exc))
            raise


def test_a_server_that_dies_mid_batch_gives_explicit_errors_and_no_zeros(doomed_server):
    # 3 chunks of 4 items, one at a time; the server dies while the second is in
    # flight. The first chunk's results must survive; the others must be missing,
    # with the connection failure as the reason, and never become rewards of 0.
    batch = items(12)
    transport = _KillDuringRequest(doomed_server, n=2, after_s=0.5)
    config = ClientConfig(chunk_size=4, max_concurrency=1, retry=FAST)
    with Client(doomed_server.url, config=config, transport=transport) as client:
        with pytest.raises(IncompleteBatchError) as info:
            client.score(batch)
    results = info.value.results
    assert all(r is not None and r.status == "ok" for r in results[:4])
    assert results[4:] == [None] * 8
    assert set(info.value.errors) == {4, 8}
    assert all(isinstance(e, ConnectionFailed) for e in info.value.errors.values())
    # The second request died in flight, then every retry found nobody listening.
    assert transport.failures[0] in (httpx.RemoteProtocolError, httpx.ReadError)
    assert set(transport.failures[1:]) == {httpx.ConnectError}
    rewards = scalar_rewards(results)
    assert all(r is not None for r in rewards[:4]) and rewards[4:] == [None] * 8
    assert doomed_server.proc.poll() is not None


def test_a_dead_service_raises_connection_failed(doomed_server):
    doomed_server.kill()
    with Client(doomed_server.url, config=ClientConfig(retry=FAST)) as client:
        with pytest.raises(ConnectionFailed):
            client.score(items(1))
        assert not client.ready()
