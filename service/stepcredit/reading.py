"""How an answer and a reference are read and compared: Math-Verify, made to read
the way models and datasets write answers. Pure; it runs inside the verify worker
processes (`verify.py`), which bound its time and memory.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["first_match"]


# How a text (an answer or a reference) is read.  Math-Verify's extraction on the raw text
# is how its README parses a model's answer: it finds 40 in "40 km/h", 1000.99 in "1000,99"
# and the formula in "Therefore $x \geq 5$ is the solution."  But it reads LaTeX only inside
# a math environment: on bare LaTeX it finds nothing (`\dfrac{3}{4}`, `(1,2)`) or, worse, a
# fragment (2 from `2\sqrt{2}`, 10 from `10^{10}`, 4 from `3, 4` or `x = 3 or x = 4`).  So
# a text is sorted by what stands outside its environments:
#
# * bare math (no word, no digit groups set apart by spaces, no \boxed{}; no environment,
#   or math outside them, as in a box's `12 $ and $13`): one LaTeX formula, read in $...$
#   and only so; a lone plain number (`1,22`) is also read raw (decimal comma), as either
#   reading is what was written;
# * a \boxed{}, or environments among prose or nothing: raw extraction, as Math-Verify's;
# * prose: raw extraction (the last number is the answer), except that a text offering
#   several answers ("4 or 5", "4 OR maybe 5", "$4$ $5$") gives no reading, and with math in it (`2\sqrt{2} meters`) the previous
#   reader, the whole text in $...$, must agree, since raw extraction may cut a fragment.
#
# Raw extraction that finds no value falls back to the whole text read as LaTeX, which can
# only match a reference that is that same formula.
_ENVIRONMENT = re.compile(r"(?<!\\)\$\$.+?(?<!\\)\$\$|(?<!\\)\$.+?(?<!\\)\$|\\\(.*?\\\)|\\\[.*?\\\]", re.DOTALL)
# \text{...}-like groups, environment names and escaped symbols are LaTeX, not prose; they
# are replaced by a mark that is neither a word nor a space ("6 \text{ and } 8" is no "6 8").
_LATEX_WORDS = re.compile(r"\\(?:text\w*|math\w+|mbox|operatorname|begin|end|color)\s*\{[^{}]*\}|\\[%$,;:! ]")
_MARK = "\x00"
# A word: 2+ letters (any script) standing apart, not glued to digits or braces, so that
# `2xy` and `\frac{dy}{dx}` stay math; "or"/"and" join a list in LaTeX too.
_WORD = re.compile(r"""(?<![^\s(\[,;:/"'\x00])(?!(?:or|and)\b)[^\W\d_]{2,}(?![^\s)\],.;:!?/"'²³\x00])""")
_DIGITS_APART = re.compile(r"\d\s+\d")  # "1 000": as LaTeX, a product nobody means
# Operators, braces and commands; a minus between operands, not a hyphen inside a word.
_MATH_SYNTAX = re.compile(
    r"[+*=<>^_|{}≤≥≠×÷·√]|\\[A-Za-z]+|(?<=\w)\s+-\s*(?=[\w(\\])|(?<=[\d)])-|(?<=[A-Za-z])-(?=\d)"
)
# Alternatives offered in prose ("4 or 5"): raw extraction would grade one of them.
_ALTERNATIVES = re.compile(r"\d\s+or\s+[-−]?\d")
# A hedge anywhere in a text read by raw extraction ("4 OR 5", "4 or maybe 5", "either 4,
# 5", "4 vs 5", "$4$ \text{or} $5$", "4 or five"): raw extraction grades the last value,
# so a hedge would earn the reward for whichever candidate is right. Also "4 and 5".
_HEDGE = re.compile(r"(?i)(?<![^\W_])(?:or|vs|versus|either|maybe|perhaps|possibly|oder|ou)(?![^\W_])")
# The value raw extraction would grade closes a list ("4 and 5.", "$4$ and $5$"); a list
# earlier in a worked answer ("the divisors are 1, 2, and 90 ... so 12") is prose.
_LIST_END = re.compile(r"(?i)\d\s*\$?\s*,?\s*and\s+(?:\$\s*)?[-−]?\s*\d[^0-9]*$")
_HEDGE_WORDS = re.compile(r"(?i)(?<![^\W_])(?:or|and|vs\.?|versus|either|oder|ou)(?![^\W_])")
_TEXT_GROUP = re.compile(r"\\(?:text\w*|mbox|operatorname)\s*\{([^{}]*)\}")
# A thin space between digit groups is a thousands separator, as {,} is.
_THIN_SPACE_GROUP = re.compile(r"(?<=\d)\\,(?=\d{3}(?!\d))")
# One number, as Math-Verify's expressions reader takes it: thousands groups, or one
# decimal point or comma ("1,22" is also the list 1, 22 as LaTeX; "1.2.3" is no number).
_PLAIN_NUMBER = re.compile(
    r"[-−]?(?:\\?\$|[€£¥])?\s*[-−]?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:[.,]\d+)?|\.\d+)\s*(?:\\?%)?\.?"
)


# Math-Verify strips a trailing unit from each formula (`40 km`, `5\text{ s}`), and its unit
# list holds single letters (t, h, c, s, m, ...) and `ab`, `bc`: so `2t`, `x+2t`, `6bc`
# and `2ab` read as 2, x+2, 6 and 2, and an answer that drops (or adds) the variable is
# graded right. A variable is not a unit: those names are left in the formula. A unit in
# \text{} (`5\text{ s}`) is still stripped (by its own rule), and so are the unit words.
_NOT_UNITS = {"ab", "bc"}


def keep_variables() -> None:
    """Take the variable names out of Math-Verify's unit list, in this process. Raises
    RuntimeError if latex2sympy2_extended no longer has the list this edits, or the edit
    does not take: every answer would then be graded wrong without a word."""
    from latex2sympy2_extended import math_normalization as mn

    original = getattr(mn, "_stepcredit_original_units_regex", None)
    if original is not None and mn.units_regex is not original:
        return  # done (an importlib.reload would have restored the original regex)
    try:
        units, before = list(mn.units), mn.units_regex
        kept = [u for u in units if len(u.strip()) > 1 and u.strip() not in _NOT_UNITS]
        patched = re.compile(rf"(\d|\}}|\s)\s*(?:(?:{'|'.join(kept)})(?:s|es)?)\s*$")
        config = mn.NormalizationConfig(units=True)
    except (AttributeError, TypeError) as exc:
        raise RuntimeError(f"latex2sympy2_extended changed: cannot keep variables out of its unit list: {exc}") from exc
    mn.units_regex = patched
    mn._stepcredit_original_units_regex = before
    if mn.normalize_latex("2t", config) != "2t" or mn.normalize_latex("40 km", config).strip() != "40":
        raise RuntimeError("latex2sympy2_extended changed: its unit stripping no longer reads as this verifier expects")


@dataclass(frozen=True)
class _Reading:
    parses: tuple[list, ...]
    """Math-Verify parse results, one per way of reading the text."""
    all_needed: bool = False
    """Every parse must match (prose mixed with math); otherwise any one may."""


def _read(text: str, answer: bool = False) -> _Reading:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse
    # boxed_match_priority=0, as Math-Verify's tests parse: a \boxed{} holds the answer.
    # parsing_timeout=None: no signals in a worker; the pool enforces the timeout.
    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    text = text.strip()

    def latex() -> list:
        # LaTeX only: the expressions reader would look inside for "answer ... 4" anchors.
        wrapped = f"${_THIN_SPACE_GROUP.sub('{,}', text)}$"
        return parse(wrapped, extraction_config=config[:1], parsing_timeout=None)

    def raw() -> list:
        return parse(text, extraction_config=config, parsing_timeout=None)

    outside = _ENVIRONMENT.sub(_MARK, text)  # what stands outside $...$, \(...\), \[...\]
    bare = _LATEX_WORDS.sub(_MARK, outside)
    prose = bool(_WORD.search(bare) or _DIGITS_APART.search(bare))
    syntax = bool(_MATH_SYNTAX.search(bare))
    in_environment = outside != text
    boxed = "\\boxed" in text  # Math-Verify finds the box wherever it stands
    # Bare math: no environment at all, or math outside the environments (then they are
    # text inside math, as in a box's `12 $ and $13`).
    if not boxed and not prose and (not in_environment or syntax or any(c.isdigit() for c in bare)):
        return _Reading((latex(), raw()) if _PLAIN_NUMBER.fullmatch(text) else (latex(),))
    found = raw()
    in_prose = prose and not (in_environment or boxed)
    if answer and _offers_several(text, bare):
        # A reference may list several values ("$1$ and $2$"); an answer that offers
        # several is read whole, as the list it is, or not at all.
        joined = _joined(text)
        return _Reading((parse(joined, extraction_config=config[:1], parsing_timeout=None),) if joined else ())
    if not any(not isinstance(p, str) for p in found):
        return _Reading((latex(),))
    if in_prose and syntax:
        # The previous reader (the whole text in $...$, either extractor) must agree.
        previous = parse(f"${text}$", extraction_config=config, parsing_timeout=None)
        return _Reading((found, previous), all_needed=True)
    return _Reading((found,))


def _offers_several(text: str, bare: str) -> bool:
    """The text offers more than one answer, so grading the one raw extraction picks
    would reward a hedge: a hedge word, or several different math environments with
    nothing but separators between them ("$4$ $5$", "$4$, $5$")."""
    plain = _TEXT_GROUP.sub(r" \1 ", text)
    if _ALTERNATIVES.search(bare) or _HEDGE.search(plain) or _LIST_END.search(plain):
        return True
    environments = {m.strip("$ ").removeprefix("\\(").removesuffix("\\)") for m in _ENVIRONMENT.findall(text)}
    return len(environments) > 1 and not _WORD.search(bare)


def _joined(text: str) -> str | None:
    """The values a hedging answer offers, as one LaTeX list ("4 or 5" -> "$4, 5$"), when
    nothing but values, hedge words and separators is there; else None."""
    plain = _TEXT_GROUP.sub(r" \1 ", text)
    plain = re.sub(r"(?<!\\)\$|\\[()\[\]]", " ", plain)  # drop the environments' delimiters
    plain = _HEDGE_WORDS.sub(",", plain)
    parts = [p.strip() for p in plain.split(",")]
    parts = [p.rstrip(".").strip() for p in parts if p.strip(" .")]
    if not parts or any(_WORD.search(p) for p in parts):
        return None
    return "$" + ", ".join(parts) + "$"


def _matches(gold: _Reading, target: _Reading) -> bool:
    from math_verify import verify

    def holds(pair: tuple[list, list]) -> bool:
        # Gold first: Math-Verify's comparison is not symmetric.
        return bool(pair[0]) and bool(pair[1]) and verify(pair[0], pair[1], timeout_seconds=None)

    def against_gold(t: list) -> bool:
        pairs = ((g, t) for g in gold.parses)
        return all(map(holds, pairs)) if gold.all_needed else any(map(holds, pairs))

    return (all if target.all_needed else any)(map(against_gold, target.parses))


def first_match(answer: str, references: Sequence[str]) -> int | None:
    keep_variables()  # outside the try: a failure here is the job's error, not "wrong"
    try:
        target = _read(answer, answer=True)
    except MemoryError:
        raise
    except Exception:
        return None
    for i, reference in enumerate(references):
        try:
            if _matches(_read(reference), target):
                return i
        except MemoryError:
            raise
        except Exception:  # a reference sympy cannot handle is just "not equivalent"
            continue
    return None
