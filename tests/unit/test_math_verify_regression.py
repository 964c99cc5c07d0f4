"""Math-Verify's own regression cases, judged by the service's verifier.

The cases (``data/math_verify_cases.json``, made by ``scripts/import_math_verify_cases.py``
from Math-Verify's ``tests/``, Apache-2.0) are (gold, pred, expected verdict) triples. Each
is judged twice:

* plain Math-Verify, called the way its test calls it (``compare_strings`` with that test's
  extraction configs, precision, ``strict`` and ``allow_set_relation_comp``, or
  ``verify(parse(gold), parse(pred))``), on the texts as they are;
* the service: ``pred`` is a model's output, so it goes through the service's own answer
  extraction, as the content of an ``<answer>`` block (SPEC 6: the last top-level
  ``\\boxed{}``'s content if the block holds one, else the whole block), then through the
  checks the pool makes before parsing and the worker's ``_first_match`` against ``gold`` as
  the one reference.

Wherever plain Math-Verify returns the expected verdict, the service must too, except
where the difference is one the service makes on purpose, each found by asking Math-Verify
itself, never by our reader:

* ``knobs``: the test sets options the service does not use (``match_types`` other than
  LaTeX + expressions, ``precision`` other than 6, ``strict=False``,
  ``allow_set_relation_comp=True``) and plain Math-Verify with the service's options also
  misses the expected verdict;
* ``extraction``: plain Math-Verify given what the service extracted (in a ``\\boxed{}``
  where it came from one) also misses it: the service grades the last box (SPEC 6), where
  Math-Verify joins several boxes or prefers a later "final answer is" sentence;
* ``length``: the extracted answer is over the pool's 1,000-character limit.

And no case the previous reader (wrap in $...$ first) judged right may turn wrong.

The cases run in two spawned processes (CI has two cores): about 9 s on a quiet machine.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
from contextlib import contextmanager
from pathlib import Path

import pytest

from stepcredit.structure import find_boxes, parse_structure
from stepcredit.reading import first_match as _first_match
from stepcredit.verify import _wrong_unread

DATA = Path(__file__).parent / "data" / "math_verify_cases.json"
MAX_ANSWER_CHARS = 1000  # VerifierPool's default
SERVICE_KNOBS = {"match_types": ["latex", "expr"], "precision": 6, "strict": True, "allow_set_relation_comp": False}
TOTAL_TIMEOUT_S = 600  # a hung case fails the test instead of hanging CI


@contextmanager
def _as_shipped():
    """Math-Verify's own unit list while plain Math-Verify and the old reader judge: the
    service's workers take variable names out of it (`reading.keep_variables`), and these
    cases share a process with the service's reader."""
    from latex2sympy2_extended import math_normalization as mn

    ours, shipped = mn.units_regex, getattr(mn, "_stepcredit_original_units_regex", None)
    mn.units_regex = shipped or ours
    try:
        yield
    finally:
        mn.units_regex = ours


def _plain_math_verify(gold: str, pred: str, mv: dict) -> bool:
    """Plain Math-Verify, as the upstream test calls it (its own default timeouts: we are in a worker's main thread)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    if mv["call"] == "parse_verify":
        return bool(verify(parse(gold), parse(pred)))
    config = [
        LatexExtractionConfig(boxed_match_priority=0) if kind == "latex" else ExprExtractionConfig()
        for kind in mv["match_types"]
    ]
    return bool(
        verify(
            parse(gold, config),
            parse(pred, config),
            float_rounding=mv["precision"],
            strict=mv["strict"],
            allow_set_relation_comp=mv["allow_set_relation_comp"],
        )
    )


def _todays_reader(gold: str, answer: str) -> bool:
    """The reader before issue 8, kept as an oracle: each text wrapped in $...$ first, raw as the fallback."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    def read(text: str) -> list:
        config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
        first: list = []
        for candidate in (f"${text}$", text):
            parsed = parse(candidate, extraction_config=config)
            if any(not isinstance(p, str) for p in parsed):
                return parsed
            first = first or parsed
        return first

    target, reference = read(answer), read(gold)
    return bool(target) and bool(reference) and bool(verify(reference, target))


def _service_answer(pred: str) -> str | None:
    # An empty think block first, so that a "<think>" inside pred does not open the COT.
    return parse_structure(f"<think>\n</think>\n<answer>{pred}</answer>").answer


def _why_exempt(case: dict, answer: str | None) -> str | None:
    gold, pred, mv, expected = case["gold"], case["pred"], case["mv"], case["expected"]
    if answer is not None and len(answer) > MAX_ANSWER_CHARS:
        return "length"
    knobs = {k: mv.get(k) for k in SERVICE_KNOBS}
    service_call = {"call": "compare_strings", **SERVICE_KNOBS}
    if knobs != SERVICE_KNOBS and _plain_math_verify(gold, pred, service_call) != expected:
        return "knobs"
    extracted = "" if answer is None else (f"\\boxed{{{answer}}}" if find_boxes(pred) else answer)
    if _plain_math_verify(gold, extracted, mv) != expected:
        return "extraction"
    return None


def _judge(case: dict) -> dict:
    logging.disable(logging.WARNING)  # Math-Verify logs every timeout it handles
    answer = _service_answer(case["pred"])
    readable = not _wrong_unread(answer, MAX_ANSWER_CHARS)
    ours = readable and _first_match(answer, [case["gold"]]) is not None
    with _as_shipped():
        plain = _plain_math_verify(case["gold"], case["pred"], case["mv"])
        before = readable and _todays_reader(case["gold"], answer)
        exempt = _why_exempt(case, answer) if plain == case["expected"] != ours else None
    return {"id": case["id"], "plain": plain, "ours": ours, "before": before, "exempt": exempt, "answer": answer}


@pytest.fixture(scope="module")
def judged() -> tuple[list[dict], dict[str, dict]]:
    cases = json.loads(DATA.read_text())["cases"]
    with mp.get_context("spawn").Pool(2) as pool:
        results = pool.map_async(_judge, cases, chunksize=4).get(TOTAL_TIMEOUT_S)
    return cases, {r["id"]: r for r in results}


def test_data_file_names_its_source():
    header = json.loads(DATA.read_text())["header"]
    assert header["source"] == "https://github.com/huggingface/Math-Verify"
    assert len(header["commit"]) == 40 and header["license"].startswith("Apache-2.0")


def test_service_agrees_wherever_plain_math_verify_is_right(judged):
    cases, results = judged
    assert len(cases) >= 250
    failures, exempt, plain_right, ours_right = [], {}, 0, 0
    for case in cases:
        r = results[case["id"]]
        plain_right += r["plain"] == case["expected"]
        ours_right += r["ours"] == case["expected"]
        if r["plain"] == case["expected"] != r["ours"]:
            if r["exempt"] is None:
                failures.append(
                    f"{case['id']}: expected {case['expected']}, gold {case['gold'][:80]!r}, "
                    f"answer {r['answer']!r:.120}"
                )
            else:
                exempt[r["exempt"]] = exempt.get(r["exempt"], 0) + 1
    print(f"\n{len(cases)} cases: plain Math-Verify right on {plain_right}, service on {ours_right}; exempt {exempt}")
    assert not failures, "\n".join(failures)


def test_no_answer_the_previous_reader_got_right_turns_wrong(judged):
    # Same extraction, same checks before parsing: only the reader differs.
    cases, results = judged
    worse = [
        f"{c['id']}: expected {c['expected']}, answer {results[c['id']]['answer']!r:.120}"
        for c in cases
        if results[c["id"]]["before"] == c["expected"] != results[c["id"]]["ours"]
    ]
    before = sum(results[c["id"]]["before"] == c["expected"] for c in cases)
    print(f"\nprevious reader right on {before} of {len(cases)}")
    assert not worse, "\n".join(worse)
