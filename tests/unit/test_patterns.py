"""PatternPool: user regexes in worker processes, with a time limit per item, a time
budget per request, a memory limit, and fair turns between requests."""

from __future__ import annotations

import asyncio
import time

import pytest

from stepcredit.patterns import PatternJob, PatternPool
from stepcredit.structure import PatternTimeout, StructureError, parse_structure

TIMEOUT_S, BUDGET_S = 0.25, 1.0
# A worker answers within a pattern's time plus pickling; a loaded 2-core box adds some.
SLACK_S = 1.0

TEXT = "<r>" + "a," * 150 + "</r><a>5</a>"
GOOD = PatternJob(TEXT, None, r"<r>(.*?)</r>", r"<a>(.*?)</a>")
# Backtracks through C(150, 30) ways to place 30 commas before failing on "x" (the pattern).
CATASTROPHIC = PatternJob(TEXT, None, r"(.*?,){30}x", r"<a>(.*?)</a>")
# 17 characters that ask the regex compiler for gigabytes.
COMPILE_BOMB = PatternJob(TEXT, None, r"(x{65534}){65534}", r"<a>(.*?)</a>")


@pytest.fixture(scope="module")
def pool():
    p = PatternPool(workers=2, timeout_s=TIMEOUT_S, budget_s=BUDGET_S)
    p.start()
    yield p
    p.close()


async def test_the_pool_gives_the_structure_parse_structure_gives(pool):
    out = await pool.parse({7: GOOD})
    assert out == {7: parse_structure(TEXT, "regex", cot_pattern=GOOD.cot_pattern, answer_pattern=GOOD.answer_pattern)}
    assert out[7].answer == "5" and out[7].format_ok


async def test_a_pattern_that_is_wrong_is_invalid_options(pool):
    (error,) = (await pool.parse({0: PatternJob(TEXT, None, r"<r>.*</r>", r"<a>(.*?)</a>")})).values()
    assert isinstance(error, StructureError) and error.code == "invalid_options" and "capture group" in str(error)


async def test_a_catastrophic_pattern_fails_its_item_naming_pattern_timeout_s(pool):
    t0 = time.monotonic()
    (error,) = (await pool.parse({0: CATASTROPHIC})).values()
    assert time.monotonic() - t0 < TIMEOUT_S + SLACK_S
    assert isinstance(error, PatternTimeout) and error.code == "limit_exceeded"
    assert "pattern_timeout_s=0.25" in str(error)


async def test_a_request_spends_at_most_its_budget_then_its_items_fail_at_once(pool):
    jobs = {i: CATASTROPHIC for i in range(20)} | {20: GOOD}
    t0 = time.monotonic()
    out = await pool.parse(jobs)
    elapsed = time.monotonic() - t0
    # Today's code spent 1 s on each of 20 patterns.
    assert elapsed < BUDGET_S + SLACK_S
    assert all(isinstance(e, PatternTimeout) and e.code == "limit_exceeded" for e in out.values())
    on_timeout = [k for k, e in out.items() if "pattern_timeout_s" in str(e)]
    over_budget = [k for k, e in out.items() if "max_pattern_s_per_request=1" in str(e)]
    assert 1 <= len(on_timeout) <= BUDGET_S / TIMEOUT_S
    assert sorted(on_timeout + over_budget) == list(range(21))  # the good item after the budget too
    # The budget is the request's: the next one parses.
    assert (await pool.parse({0: GOOD}))[0].answer == "5"


async def test_a_compile_bomb_is_stopped_by_the_memory_limit_and_the_pool_recovers(pool):
    before = pool.restarts
    out = await pool.parse({0: COMPILE_BOMB, 1: GOOD})
    assert out[0].code == "limit_exceeded" and "pattern_memory_mb=256" in str(out[0])
    # A pattern that cost a worker is not tried on the request's other items.
    assert out[1].code == "limit_exceeded" and "max_pattern_s_per_request" in str(out[1])
    assert pool.restarts == before + 1
    assert (await asyncio.wait_for(pool.parse({0: GOOD}), 60))[0].answer == "5"


async def _latency_beside_a_hostile_request(pool: PatternPool) -> tuple[float, object]:
    hostile = asyncio.create_task(pool.parse({i: CATASTROPHIC for i in range(12)}))
    await asyncio.sleep(0.1)  # it holds a worker now
    t0 = time.monotonic()
    out = await pool.parse({0: GOOD})
    latency = time.monotonic() - t0
    hostile.cancel()
    with pytest.raises(asyncio.CancelledError):
        await hostile
    return latency, out[0]


async def test_a_request_does_not_wait_for_another_requests_patterns():
    # Two workers, one per request at a time: the other worker is free at once.
    with PatternPool(workers=2, timeout_s=TIMEOUT_S, budget_s=10.0) as pool:
        latency, structure = await _latency_beside_a_hostile_request(pool)
    assert structure.answer == "5"
    assert latency < 0.5 * TIMEOUT_S + SLACK_S / 2  # not behind any catastrophic item


async def test_requests_take_turns_on_a_single_worker():
    # 12 catastrophic items would take 3 s; the other request waits for one item at most.
    with PatternPool(workers=1, timeout_s=TIMEOUT_S, budget_s=10.0) as pool:
        latency, structure = await _latency_beside_a_hostile_request(pool)
        assert structure.answer == "5"
        assert latency < TIMEOUT_S + SLACK_S
        # Cancelled, the hostile request runs no further item: the worker is free again.
        await asyncio.sleep(TIMEOUT_S + 0.1)
        t0 = time.monotonic()
        await pool.parse({0: GOOD})
        assert time.monotonic() - t0 < 0.5
