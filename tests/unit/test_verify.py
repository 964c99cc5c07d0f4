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


# Answers as models write them in GSM8K/MATH-style RL (the answer block's content or the
# last box's), each against a reference as datasets store it.
MODEL_STYLE_CORRECT = [
    # units, currency, separators, trailing punctuation: prose read as Math-Verify reads it
    ("40", "40 km/h"),
    ("40", r"40 \text{ km/h}"),
    ("40", "40 dollars"),
    ("40", "$40"),
    ("40", r"\$40"),
    ("40", "40."),
    ("18.90", r"\$18.90"),
    ("12", "The answer is 12."),
    ("12", "12 apples"),
    ("1000", "1 000"),
    ("1000", r"1\,000"),
    ("1000", "1{,}000"),
    ("7425000", "7,425,000"),
    ("1000.99", "1000,99"),
    ("1000.99", "1,000.99"),
    # percentages
    (r"25\%", "25%"),
    (r"25\%", "25 percent"),
    ("0.25", "25%"),
    # assignments, fractions and decimals
    ("5", "x = 5"),
    ("5", "x=5"),
    (r"\frac{3}{4}", "3/4"),
    ("0.75", r"\dfrac{3}{4}"),
    (r"2\sqrt{2}", r"\sqrt{8}"),
    ("10^{10}", "10000000000"),
    # intervals, tuples, sets, negative numbers (Unicode minus)
    ("[0,1)", "[0, 1)"),
    ("(1,2)", "(1, 2)"),
    (r"\{1,2\}", "1, 2"),
    (r"6 \text{ and } 8", r"6 \text{ and } 8"),
    ("-3", "−3"),
    # multiple choice
    ("B", "(B)"),
    (r"\textbf{(B)}", "B"),
    ("(C)", "C"),
    # math inside a sentence
    (r"x \geq 5", r"Therefore $x \geq 5$ is the solution."),
    ("$x >= 5$", r"Therefore $x \geq 5$ is the solution."),
    (
        r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}",
        r"The matrix is $\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}$.",
    ),
    (r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}", r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}"),
    # A list answer offered with "and"/"or" is read whole, as the list it is.
    ("1, 2, 3", "$1$ and $2$ and $3$"),
    ("-2, 1", "-2 and 1"),
    ("4, 5", "4 or 5"),
    # Lists and "and" earlier in a worked answer are prose: the final value is graded.
    ("12", "The divisors are 1, 2, and 90, so there are 12."),
    ("18", "She sells 16 - 3 - 4 = 9 eggs and makes 9 * 2 = $18."),
]

# Hedges, fragments and other answers no sound reading makes equal to the reference.
MODEL_STYLE_WRONG = [
    ("4", "1, 2, 3, 4, 5"),  # Math-Verify alone reads the last number, 5
    ("4", "x = 3 or x = 4"),  # Math-Verify alone reads 4: a hedge, a set of two answers
    ("4", "3 or 4"),
    ("4", "3, 4"),
    ("4", "x=3, x=4"),
    ("B", "A or B"),
    ("4", "The answer is 4 or 5"),  # Math-Verify alone reads the 4 after "answer"
    ("5", "The answer is 4 or 5."),
    ("2", r"2\sqrt{2}"),  # Math-Verify alone reads 2
    (r"2\sqrt{2}", "2"),  # the same fragment on the reference's side
    ("10", "10^{10}"),
    ("1", "x - 1"),
    ("3", r"3\pi"),
    ("5", r"x \geq 5"),
    ("5", "x >= 5"),
    ("2", "ab + 2c"),
    ("2", r"2\sqrt{2} meters"),  # prose mixed with math: both readings must agree
    ("0", "1 000"),  # as bare LaTeX "1 000" is 1*000
    ("0", r"1\,000"),
    ("4", r"\{1,2,3,4\}"),
    ("3", r"3 \times 10^5"),
    ("1.2", "1.2.3"),  # no number: raw extraction would read 1.2
    # Hedges in any case, any wording, inside or between math environments: Math-Verify
    # alone grades the last value, so each of these would be rewarded.
    ("5", "4 OR 5"),
    ("5", "4 Or 5"),
    ("5", "4 or maybe 5"),
    ("5", "4 oder 5"),
    ("5", "either 4, 5"),
    ("5", "4 vs 5"),
    ("5", "4 vs. 5"),
    ("5", "no solution or 5"),
    ("5", "$4$ or maybe $5$"),
    ("5", r"$4$ \text{or} $5$"),
    ("5", r"$x=4$ \text{ or } $x=5$"),
    ("5", "$x = 4$ or $x = 5$"),
    ("5", "$4$ $5$"),
    ("5", "$4$, $5$"),
    ("3", "2 apples or 3 apples"),
    ("6", "costs $5 or $6"),
    ("4", "4 or five"),
    ("5", "4 and 5"),
    ("5", "The answer is 4 and 5."),
    ("5", "maybe 5"),
    ("3", "$1$ and $2$ and $3$"),
]


@pytest.mark.parametrize(("gold", "answer"), MODEL_STYLE_CORRECT)
async def test_model_style_answers_are_correct(pool, gold, answer):
    assert await pool.verify(answer, [gold]) == Verdict(True, 0, False)


@pytest.mark.parametrize(("gold", "answer"), MODEL_STYLE_WRONG)
async def test_hedges_and_fragments_stay_wrong(pool, gold, answer):
    assert await pool.verify(answer, [gold]) == Verdict(False, None, False)


@pytest.mark.parametrize(
    ("block", "gold", "correct"),
    [
        (r"The answer is $\boxed{\dfrac{3}{4}}$.", "0.75", True),
        (r"\boxed{40 \text{ km/h}}", "40", True),
        (r"\boxed{\boxed{5}}", "5", True),
        (r"\boxed{1}, no wait: \boxed{12", "1", False),  # an unclosed last box grades nothing
        (r"\boxed{1}, no wait: \boxed{12", "12", False),
    ],
)
async def test_box_inside_the_answer_block_is_graded_as_the_service_extracts_it(pool, block, gold, correct):
    from stepcredit.structure import parse_structure

    answer = parse_structure(f"<think>a</think><answer>{block}</answer>").answer
    assert (await pool.verify(answer, [gold])).correct is correct


@pytest.mark.parametrize(
    ("gold", "answer"),
    [("2", "3"), (r"\frac{1}{2}", r"\frac{1}{3}"), ("x^2+1", "x^2-1"), (r"\sqrt{2}", "2"), (r"\{1,2\}", r"\{1,3\}")],
)
async def test_non_equivalent_answers_are_wrong(pool, gold, answer):
    assert await pool.verify(answer, [gold]) == Verdict(False, None, False)


# Math-Verify's unit list holds single letters and `ab`, `bc`: before, `2t` read as 2, so
# an answer that dropped (or added) the variable was graded right.
@pytest.mark.parametrize(
    ("gold", "answer"),
    [("2", r"\boxed{2t}"), ("2t", "2"), ("x+2t", "x+2"), ("6bc", "6"), ("2", "$2ab$"), ("7ab", "7"),
     ("3", "3h"), ("2t", "2s"), (r"\frac{1}{2}h", r"\frac{1}{2}")],
)  # fmt: skip
async def test_a_variable_is_never_stripped_as_a_unit(pool, gold, answer):
    assert await pool.verify(answer, [gold]) == Verdict(False, None, False)


@pytest.mark.parametrize(
    ("gold", "answer"),
    [("2t", "2t"), ("2t", r"t \cdot 2"), ("x+2t", "2t+x"), ("6bc", "6cb"), ("10", r"10\text{ cm}"),
     ("5", r"5\text{ s}"), ("40", "40 km"), ("5", "5 seconds"), ("3", r"\boxed{3 \text{ m}}")],
)  # fmt: skip
async def test_variables_compare_as_symbols_and_units_are_still_stripped(pool, gold, answer):
    assert await pool.verify(answer, [gold]) == Verdict(True, 0, False)


def test_a_library_whose_unit_list_changed_is_an_error_never_a_wrong_grade(monkeypatch):
    """Before the check, an edit that no longer applied made every answer "wrong" in silence."""
    from latex2sympy2_extended import math_normalization as mn

    from stepcredit.reading import first_match

    monkeypatch.setattr(mn, "_stepcredit_original_units_regex", None, raising=False)
    monkeypatch.delattr(mn, "units")
    with pytest.raises(RuntimeError, match="latex2sympy2_extended changed"):
        first_match("2", ["2"])


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


# --------------------------------------------------------------------------- fairness between owners


async def test_one_owners_slow_answers_leave_a_worker_for_another_owner():
    # Before owners, two slow answers of one request held both workers for their whole timeout.
    p = VerifierPool(workers=2, timeout_s=30.0)
    p.start()
    try:
        attacker = object()
        slow = [asyncio.create_task(p.verify("10^{10^{10^{10}}}", ["2"], owner=attacker)) for _ in range(2)]
        await asyncio.sleep(0.5)  # one holds a worker, the other waits for its owner's turn
        t0 = time.monotonic()
        verdict = await asyncio.wait_for(p.verify("1/2", ["0.5"], owner=object()), 10)
        assert verdict == Verdict(True, 0, False)
        assert time.monotonic() - t0 < 3.0
        assert not slow[0].done() and not slow[1].done()
        for task in slow:
            task.cancel()
    finally:
        p.close()


async def test_owners_take_turns_on_a_single_worker():
    # With one worker an owner may hold it, but a freed worker goes to the next owner in
    # turn: B's one answer is checked right after A's first, not after all of A's.
    p = VerifierPool(workers=1, timeout_s=30.0)
    p.start()
    try:
        done: list[str] = []

        async def check(name: str, owner: object) -> None:
            await p.verify("3", ["3"], owner=owner)
            done.append(name)

        a, b = object(), object()
        tasks = [asyncio.create_task(check(f"a{i}", a)) for i in range(5)]
        await asyncio.sleep(0)  # A's first takes the worker, the others queue
        tasks.append(asyncio.create_task(check("b", b)))
        await asyncio.gather(*tasks)
        assert done.index("b") <= 1, done
    finally:
        p.close()



async def test_an_abandoned_slow_answer_frees_its_worker_within_a_second():
    # Before: the worker ran the answer nobody waited for until its whole timeout (30 s).
    p = VerifierPool(workers=1, timeout_s=30.0)
    p.start()
    try:
        slow = asyncio.create_task(p.verify("10^{10^{10^{10}}}", ["2"]))
        await asyncio.sleep(0.5)
        slow.cancel()
        t0 = time.monotonic()
        verdict = await asyncio.wait_for(p.verify("1/2", ["0.5"]), 20)
        assert verdict == Verdict(True, 0, False)
        assert time.monotonic() - t0 < 1.0 + SLACK_S  # the grace, then a fresh worker's start
        assert p.restarts == 1
    finally:
        p.close()
