"""Cross-request batching: coalescing, back-pressure (429) and cancellation."""

from __future__ import annotations

import asyncio

import pytest

from benchmarks.workload import workload
from stepcredit.api import create_app
from stepcredit.backends.hf import HFBackend
from stepcredit.engine import Overloaded, Scorer
from stepcredit.protocol import ScoreItem

from .conftest import asgi_client


@pytest.fixture
async def make_scorer(tiny_model_path, settings, verifier):
    made = []

    async def make(**overrides) -> Scorer:
        backend = HFBackend(tiny_model_path, device="cpu")
        scorer = Scorer(backend, settings.model_copy(update=overrides), verifier=verifier)
        scorer.ready = True
        made.append(scorer)
        return scorer

    yield make
    for scorer in made:
        await scorer.batcher.close()
        scorer.backend.shutdown()


def items(n, seed=0):
    return [ScoreItem(**i) for i in workload(n=n, min_steps=3, max_steps=6, seed=seed)]


async def test_concurrent_requests_share_backend_calls_and_get_their_own_results(make_scorer):
    scorer = await make_scorer(batch_max_wait_ms=200)
    requests = [items(2, seed=s) for s in range(8)]
    alone = [await (await make_scorer(batch_max_wait_ms=0)).score(r) for r in requests]
    before = scorer.batcher.batches
    together = await asyncio.gather(*(scorer.score(r) for r in requests))
    assert scorer.batcher.batches - before < len(requests)
    for a, b in zip(alone, together):
        assert [r.id for r in a.results] == [r.id for r in b.results]
        for ra, rb in zip(a.results, b.results):
            assert rb.mig_reward == pytest.approx(ra.mig_reward, abs=1e-4)
            assert [s.loglik for s in rb.steps] == pytest.approx([s.loglik for s in ra.steps], abs=1e-4)
        assert b.usage.tokens_forwarded > 0
    # Counted per trajectory, with a prefix shared across requests (the workload's
    # system prompt and questions) computed once and split among its sharers.
    total = lambda batches: sum(b.usage.tokens_forwarded for b in batches)  # noqa: E731
    assert total(together) < total(alone)


async def test_full_queue_answers_429_with_retry_after(make_scorer, settings):
    scorer = await make_scorer(batch_max_wait_ms=500, max_queued_items=3)
    app = create_app(settings, scorer=scorer)
    body = {"items": [i.model_dump(exclude_none=True) for i in items(2)]}
    async with asgi_client(app) as c:
        first = asyncio.create_task(c.post("/v1/score", json=body))
        await asyncio.sleep(0.1)  # the first request's 2 trajectories wait in the queue
        second = await c.post("/v1/score", json=body)
        assert second.status_code == 429
        assert int(second.headers["retry-after"]) >= 1
        assert second.json()["error"]["code"] == "overloaded"
        assert (await first).status_code == 200


async def test_overloaded_is_raised_before_any_work(make_scorer):
    scorer = await make_scorer(max_queued_items=1)
    with pytest.raises(Overloaded):
        await scorer.score(items(2))
    assert scorer.batcher.queued == 0


async def test_a_request_cancelled_while_queued_costs_no_model_time(make_scorer):
    scorer = await make_scorer(batch_max_wait_ms=400)
    task = asyncio.create_task(scorer.score(items(3)))
    await asyncio.sleep(0.15)
    assert scorer.batcher.queued == 3
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert scorer.batcher.queued == 0
    await asyncio.sleep(0.5)
    assert scorer.batcher.batches == 0
