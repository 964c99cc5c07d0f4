"""VerifierPool: Math-Verify equivalence in worker processes with a hard timeout."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from stepcredit.verify import Verdict, VerifierPool, VerifyError

# Pathological inputs get this per-call timeout so the file stays fast on 2 cores.
SHORT_TIMEOUT_S = 3.0
# Killing a worker and waiting for an idle one (its replacement imports sympy) takes a moment.
SLACK_S = 6.0


@pytest.fixture(scope="module")
def pool():
    p = VerifierPool(workers=2, timeout_s=20.0)
    p.start()
    yield p
    p.close()


@pytest.mark.parametrize(
    ("gold", "answer"),
    [
        (r"\frac{1}{2}", "0.5"),
        (r"\frac{1}{2}", "1/2"),
        ("0.5", r"\frac{1}{2}"),
        (r"\frac{\sqrt{2}}{2}", r"1/\sqrt{2}"),
        (r"\sqrt{2}/2", r"\frac{1}{\sqrt{2}}"),
        (r"3\pi", r"\pi*3"),
        ("x^2+1", "1+x^2"),
        ("(1, 2)", "(1,2)"),
        (r"\{1,2\}", r"\{2,1\}"),
        (r"\text{(B)}", "B"),
        ("1000", "1,000"),
        (r"\dfrac{3}{4}", "0.75"),
    ],
)
async def test_equivalent_forms_are_correct(pool, gold, answer):
    assert await pool.verify(answer, [gold]) == Verdict(True, 0, False)


@pytest.mark.parametrize(
    ("gold", "answer"),
    [("2", "3"), (r"\frac{1}{2}", r"\frac{1}{3}"), ("x^2+1", "x^2-1"), (r"\sqrt{2}", "2"), (r"\{1,2\}", r"\{1,3\}")],
)
async def test_non_equivalent_answers_are_wrong(pool, gold, answer):
    assert await pool.verify(answer, [gold]) == Verdict(False, None, False)


async def test_matched_reference_is_first_equivalent_index(pool):
    refs = ["7", r"\frac{1}{2}", "0.5", "x"]
    assert await pool.verify("1/2", refs) == Verdict(True, 1, False)
    assert await pool.verify("x", refs) == Verdict(True, 3, False)
    assert await pool.verify("8", refs) == Verdict(False, None, False)


async def test_unparseable_reference_is_skipped_not_fatal(pool):
    assert await pool.verify("2", [r"\frac{", "2"]) == Verdict(True, 1, False)


@pytest.mark.parametrize("answer", [None, "", "   ", "\n\t"])
async def test_missing_or_blank_answer_is_wrong_without_timeout(pool, answer):
    assert await pool.verify(answer, ["2"]) == Verdict(False, None, False)


async def test_no_references_is_wrong(pool):
    assert await pool.verify("2", []) == Verdict(False, None, False)


async def test_overlong_answer_is_wrong_without_parsing():
    # A pool that was never started: rejecting must not need a worker at all.
    p = VerifierPool(workers=1, max_answer_chars=10)
    try:
        assert await p.verify("1" + " " * 10, ["1"]) == Verdict(False, None, False)
        assert not p._live  # nothing was spawned
    finally:
        p.close()


PATHOLOGICAL = {
    "power_tower": "9^9^9^9",
    "latex_power_tower": "10^{10^{10^{10}}}",
    "nested_parentheses": "(" * 5000 + "1" + ")" * 5000,
    "nested_braces": "{" * 5000 + "1" + "}" * 5000,
    "5000_digit_number": "7" * 5000,
    "unbalanced_frac": r"\frac{",
    "huge_factorial": "100000!",
    "gigantic_factorial": "(10^{9})!",
}


@pytest.fixture(scope="module")
def pathological_pool():
    # Own pool: these inputs kill workers, and a generous character limit lets them through.
    p = VerifierPool(workers=2, timeout_s=SHORT_TIMEOUT_S, max_answer_chars=20_000)
    p.start()
    yield p
    p.close()


@pytest.mark.parametrize("answer", list(PATHOLOGICAL.values()), ids=list(PATHOLOGICAL))
async def test_pathological_answer_returns_within_bounded_time(pathological_pool, answer):
    t0 = time.monotonic()
    verdict = await pathological_pool.verify(answer, ["2"], timeout_s=SHORT_TIMEOUT_S)
    elapsed = time.monotonic() - t0
    assert verdict.correct is False and verdict.matched_reference is None
    assert elapsed < SHORT_TIMEOUT_S + SLACK_S


async def test_pathological_answers_concurrently_never_raise(pathological_pool):
    t0 = time.monotonic()
    verdicts = await asyncio.gather(
        *(pathological_pool.verify(a, ["2"], timeout_s=SHORT_TIMEOUT_S) for a in PATHOLOGICAL.values())
    )
    assert not any(v.correct for v in verdicts)
    # 2 workers: at most ceil(n/2) back-to-back timeouts plus respawns.
    assert time.monotonic() - t0 < len(PATHOLOGICAL) / 2 * (SHORT_TIMEOUT_S + SLACK_S)


async def test_timeout_kills_and_replaces_worker_and_pool_keeps_answering(pathological_pool):
    before = pathological_pool.restarts
    t0 = time.monotonic()
    verdict = await pathological_pool.verify("10^{10^{10^{10}}}", ["2"], timeout_s=1.0)
    assert verdict == Verdict(False, None, True)
    assert time.monotonic() - t0 < 1.0 + SLACK_S
    assert pathological_pool.restarts == before + 1
    # Enough calls to need both the surviving worker and the replacement.
    verdicts = await asyncio.gather(*(pathological_pool.verify(r"\frac{1}{2}", ["2", "0.5"]) for _ in range(4)))
    assert verdicts == [Verdict(True, 1, False)] * 4


async def test_many_concurrent_calls_all_answer_correctly(pool):
    answers = [f"{i}/2" for i in range(20)]
    refs = [[f"{i * 0.5}"] for i in range(20)]
    verdicts = await asyncio.gather(*(pool.verify(a, r) for a, r in zip(answers, refs)))
    assert verdicts == [Verdict(True, 0, False)] * 20
    wrong = await asyncio.gather(*(pool.verify(f"{i}", [f"{i + 1}"]) for i in range(20)))
    assert wrong == [Verdict(False, None, False)] * 20


def test_verify_from_event_loop_in_non_main_thread(pool):
    result: dict[str, object] = {}

    def run() -> None:
        try:
            result["verdict"] = asyncio.run(pool.verify(r"3\pi", ["4", r"\pi*3"]))
        except BaseException as e:  # surfaced by the assert below
            result["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join(60)
    assert "error" not in result, result.get("error")
    assert result["verdict"] == Verdict(True, 1, False)


async def test_cancelled_caller_leaves_pool_consistent(pool):
    task = asyncio.create_task(pool.verify(r"\frac{1}{2}", ["0.5"]))
    await asyncio.sleep(0)  # let it take a worker
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The cancelled job's reply must not leak into the next caller's answer.
    verdicts = await asyncio.gather(*(pool.verify("2", ["3", "2"]) for _ in range(4)))
    assert verdicts == [Verdict(True, 1, False)] * 4


async def test_close_then_verify_raises_verify_error():
    p = VerifierPool(workers=1)
    p.start()
    assert await p.verify("1", ["1"]) == Verdict(True, 0, False)
    procs = [w.proc for w in p._live]
    p.close()
    p.close()  # idempotent
    with pytest.raises(VerifyError):
        await p.verify("1", ["1"])
    with pytest.raises(VerifyError):
        p.start()
    for proc in procs:
        proc.join(5)
        assert not proc.is_alive()


async def test_close_fails_waiting_callers_instead_of_hanging():
    p = VerifierPool(workers=1, timeout_s=30.0, max_answer_chars=20_000)
    p.start()
    busy = asyncio.create_task(p.verify("10^{10^{10^{10}}}", ["2"]))
    waiting = asyncio.create_task(p.verify("1", ["1"]))
    await asyncio.sleep(0.2)
    p.close()
    for task in (busy, waiting):
        with pytest.raises(VerifyError):
            await asyncio.wait_for(task, 10)


async def test_worker_crash_raises_verify_error_and_is_replaced():
    p = VerifierPool(workers=1, timeout_s=30.0, max_answer_chars=20_000)
    p.start()
    try:
        (worker,) = p._live
        task = asyncio.create_task(p.verify("10^{10^{10^{10}}}", ["2"]))
        await asyncio.sleep(0.2)
        worker.proc.kill()  # dies for a reason that is not our timeout
        with pytest.raises(VerifyError):
            await asyncio.wait_for(task, 10)
        assert p.restarts == 1
        assert await asyncio.wait_for(p.verify("1/2", ["0.5"]), 30) == Verdict(True, 0, False)
    finally:
        p.close()


def test_workers_run_under_address_space_limit():
    p = VerifierPool(workers=1, memory_limit_mb=512)
    p.start()
    try:
        (worker,) = p._live
        with open(f"/proc/{worker.proc.pid}/limits") as f:
            line = next(line for line in f if line.startswith("Max address space"))
        soft = int(line.split()[3])
        # The budget comes on top of what the interpreter had mapped at start (well under 1 GiB).
        assert 512 * 2**20 <= soft < 1536 * 2**20
    finally:
        p.close()


async def test_answer_with_unbalanced_braces_never_matches(pool):
    # Math-Verify alone parses "2^{" as 2 and would call it equal to gold "2".
    assert await pool.verify("2^{", ["2"]) == Verdict(False, None, False)
    assert await pool.verify(r"\{1,2\}", [r"\{1,2\}"]) == Verdict(True, 0, False)
