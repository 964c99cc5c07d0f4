"""Property-based tests of answer verification through the VerifierPool (SPEC section 6).

A generated integer or fraction is correct against itself and its equivalent forms
(`12` vs `12.0`, `3/4` vs `0.75` vs `\\frac{3}{4}`, either one the reference) and
wrong against a different number; arbitrary text always gets a verdict and never
breaks the pool. One pool serves the whole module: starting workers costs seconds.
"""

from __future__ import annotations

import asyncio
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stepcredit.verify import Verdict, VerifierPool

# A verdict takes a few ms; a worker replaced after a timeout takes seconds, so no deadline.
CHECKS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def verify():
    pool = VerifierPool(workers=2, timeout_s=TIMEOUT_S)
    pool.start()
    runner = asyncio.Runner()

    def run(answer, references) -> Verdict:
        return runner.run(pool.verify(answer, references))

    yield run
    runner.close()
    pool.close()


integers = st.integers(-10**6, 10**6)
# Denominators 2^a 5^b up to 100: every value has an exact decimal, and two different
# values differ by at least 1e-4, far above Math-Verify's float rounding.
_DENOMINATORS = sorted({2**a * 5**b for a in range(7) for b in range(3) if 1 < 2**a * 5**b <= 100})
fractions = st.builds(Fraction, st.integers(-999, 999), st.sampled_from(_DENOMINATORS)).filter(
    lambda f: f.denominator > 1
)


def integer_forms(n: int) -> list[str]:
    forms = [str(n), f"{n}.0", f"{n}.00"]
    if abs(n) >= 1000:
        forms.append(f"{n:,}")  # thousands separators, as datasets write them
    return forms


def decimal(f: Fraction) -> str:
    sign, f = ("-" if f < 0 else ""), abs(f)
    whole, rest = divmod(f.numerator, f.denominator)
    digits = ""
    while rest:
        rest *= 10
        digits += str(rest // f.denominator)
        rest %= f.denominator
    return f"{sign}{whole}.{digits}"


def fraction_forms(f: Fraction) -> list[str]:
    p, q = f.numerator, f.denominator
    frac = f"-\\frac{{{-p}}}{{{q}}}" if p < 0 else f"\\frac{{{p}}}{{{q}}}"
    return [f"{p}/{q}", frac, decimal(f)]


@CHECKS
@given(integers, st.data())
def test_an_integer_matches_its_equivalent_forms(verify, n, data):
    gold = data.draw(st.sampled_from(integer_forms(n)), label="reference")
    answer = data.draw(st.sampled_from(integer_forms(n)), label="answer")
    assert verify(answer, [gold]) == Verdict(True, 0, False)


@CHECKS
@given(fractions, st.data())
def test_a_fraction_matches_its_equivalent_forms(verify, f, data):
    gold = data.draw(st.sampled_from(fraction_forms(f)), label="reference")
    answer = data.draw(st.sampled_from(fraction_forms(f)), label="answer")
    assert verify(answer, [gold]) == Verdict(True, 0, False)


@CHECKS
@given(st.one_of(integers.map(Fraction), fractions), st.one_of(integers.map(Fraction), fractions), st.data())
def test_a_different_number_does_not_match(verify, x, y, data):
    if x == y:
        y = x + 1
    forms = lambda v: integer_forms(int(v)) if v.denominator == 1 else fraction_forms(v)  # noqa: E731
    gold = data.draw(st.sampled_from(forms(x)), label="reference")
    answer = data.draw(st.sampled_from(forms(y)), label="answer")
    assert verify(answer, [gold]) == Verdict(False, None, False)


@CHECKS
@given(integers, st.integers(0, 3), st.data())
def test_the_first_equivalent_reference_is_the_one_reported(verify, n, position, data):
    others = data.draw(st.lists(integers.filter(lambda m: m != n), min_size=3, max_size=3, unique=True))
    references = [str(m) for m in others]
    references.insert(position, f"{n}.0")
    assert verify(str(n), references) == Verdict(True, position, False)


# Text that looks like math often enough to reach the LaTeX parser and sympy. No `^` or
# `!`: towers and factorials are the pathological cases tests/unit/test_verify.py times out.
_TOKENS = [*"0123456789+-*/=(){}[],.$ x\\", "\\frac", "\\sqrt", "\\boxed{", "\\text{", " or ", "\\pi"]
_MATHY = st.lists(st.sampled_from(_TOKENS), max_size=16).map("".join)
texts = st.one_of(st.text(max_size=30), _MATHY)


@CHECKS
@given(texts, st.lists(texts, min_size=1, max_size=3))
def test_any_text_gets_a_verdict_and_the_pool_keeps_working(verify, answer, references):
    verdict = verify(answer, references)
    assert isinstance(verdict, Verdict)
    assert verdict.matched_reference is None or (verdict.correct and 0 <= verdict.matched_reference < len(references))
    assert not (verdict.correct and verdict.timed_out)
    # The pool still answers a known pair right after whatever it was given.
    assert verify("0.75", ["3/4"]) == Verdict(True, 0, False)
