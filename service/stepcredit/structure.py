"""Completion text -> chain-of-thought region, extracted answer, steps (SPEC 2 and 3).

Pure functions over strings: no tokenizer, no model. Every span is a
half-open [start, end) range of character offsets into the completion.

The `regex` format runs user-given patterns: the service calls it only inside the
pattern worker processes (`patterns.py`), never on the shared preparation thread,
since compiling or matching a hostile pattern can take seconds and gigabytes.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import regex

__all__ = [
    "Structure",
    "StructureError",
    "PatternTimeout",
    "parse_structure",
    "split_steps",
    "find_boxes",
    "THINK_PROBE_PREFIX",
    "BOXED_PROBE_PREFIX",
]

THINK_PROBE_PREFIX = "\n</think>\n<answer>\n"
BOXED_PROBE_PREFIX = "\nThe final answer is $\\boxed{"

# User-given patterns run with the `regex` module, whose `timeout` stops a catastrophic
# backtracking pattern; this is the default of the service's `pattern_timeout_s`.
PATTERN_TIMEOUT_S = 0.25

_MARKER = re.compile(r"\s*(#+\s*)?step\s*\d+", re.IGNORECASE)
_BOX_OPEN = re.compile(r"\\boxed\s*\{")
# What may trail the last \boxed{...} in a well-formed `boxed` completion:
# closing math delimiters and sentence punctuation.
_BOXED_TRAILER = re.compile(r"(?:\s|\$|\\\]|\\\)|[.,;!])*")


class StructureError(ValueError):
    """The item's format options cannot be applied (bad user regex); `code` is the item's error code."""

    code = "invalid_options"


class PatternTimeout(StructureError):
    """The user patterns ran past their time limit over this completion (a server limit,
    not bad options: the same patterns may pass on a shorter text)."""

    code = "limit_exceeded"


@dataclass(frozen=True)
class Structure:
    format_ok: bool
    cot_span: tuple[int, int] | None
    answer: str | None
    """Extracted answer: the answer block's content, or its last \\boxed{} content."""


@dataclass(frozen=True)
class _Box:
    start: int  # offset of the backslash
    content_start: int
    content_end: int | None  # None when the braces never balance
    end: int | None  # just after the closing brace


def find_boxes(text: str) -> list[_Box]:
    """Top-level \\boxed{...} occurrences, left to right; a box nested in another is skipped."""
    boxes: list[_Box] = []
    pos = 0
    while (m := _BOX_OPEN.search(text, pos)) is not None:
        depth, i = 1, m.end()
        while i < len(text) and depth:
            if text[i] == "\\" and i + 1 < len(text):
                i += 2  # an escaped brace \{ or \} does not count
                continue
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth:
            boxes.append(_Box(m.start(), m.end(), None, None))
            break
        boxes.append(_Box(m.start(), m.end(), i - 1, i))
        pos = i
    return boxes


def _answer_from_block(block: str) -> str | None:
    """The block's last top-level \\boxed{} content, else the whole block; None when that box never closes.

    An unclosed last box is a cut-off or abandoned answer ("\\boxed{1}, no wait: \\boxed{12"):
    an earlier box would grade an answer the model took back, so nothing is extracted, as
    for an unterminated answer block.
    """
    boxes = find_boxes(block)
    if not boxes:
        return block.strip()
    last = boxes[-1]  # find_boxes stops at an unclosed box: it runs to the end of the text
    if last.end is None:
        return None
    return block[last.content_start : last.content_end].strip()


def _outside_ok(text: str, eos: str | None) -> bool:
    """Text outside the blocks: only whitespace, or the EOS token's text."""
    stripped = text.strip()
    return stripped == "" or (bool(eos) and stripped == eos)


def parse_structure(
    completion: str,
    fmt: str = "think_answer",
    *,
    eos_text: str | None = None,
    cot_pattern: str | None = None,
    answer_pattern: str | None = None,
    pattern_timeout_s: float = PATTERN_TIMEOUT_S,
) -> Structure:
    """`pattern_timeout_s` bounds compiling and matching both user patterns (`regex` format)."""
    if fmt == "think_answer":
        return _think_answer(completion, eos_text)
    if fmt == "boxed":
        return _boxed(completion, eos_text)
    if fmt == "regex":
        return _regex_pair(completion, eos_text, cot_pattern, answer_pattern, pattern_timeout_s)
    raise StructureError(f"unknown format {fmt!r}")


def _think_answer(text: str, eos: str | None) -> Structure:
    open_at = text.find("<think>")
    cot_span = None
    if open_at >= 0:
        start = open_at + len("<think>")
        end = text.find("</think>", start)
        if end < 0:
            end = text.find("<answer>", start)
        if end < 0:
            end = len(text)
        cot_span = (start, end)

    # The answer is the last complete block after the COT (anywhere without one).
    search_from = cot_span[1] if cot_span else 0
    blocks = list(re.finditer(r"<answer>(.*?)</answer>", text[search_from:], re.DOTALL))
    answer = _answer_from_block(blocks[-1].group(1)) if blocks else None

    counts = [text.count(tag) for tag in ("<think>", "</think>", "<answer>", "</answer>")]
    format_ok = False
    if counts == [1, 1, 1, 1]:
        m = re.fullmatch(r"(.*?)<think>(.*?)</think>(.*?)<answer>(.*?)</answer>(.*)", text, re.DOTALL)
        if m is not None:
            before, cot, between, ans, after = m.groups()
            format_ok = (
                before.strip() == ""
                and between.strip() == ""
                and bool(cot.strip())
                and bool(ans.strip())
                and _outside_ok(after, eos)
            )
    return Structure(format_ok, cot_span, answer if answer else None)


def _boxed(text: str, eos: str | None) -> Structure:
    boxes = find_boxes(text)
    if not boxes:
        # The COT opener of this format is the start of the text, so the COT
        # always exists; without a box it runs to the end.
        return Structure(False, (0, len(text)), None)
    last = boxes[-1]
    cot_span = (0, last.start)
    if last.end is None:
        return Structure(False, cot_span, None)
    content = text[last.content_start : last.content_end].strip()
    trailer = text[last.end :]
    if eos and trailer.rstrip().endswith(eos):
        trailer = trailer.rstrip()[: -len(eos)]
    format_ok = (
        bool(text[: last.start].strip())
        and bool(content)
        and _BOXED_TRAILER.fullmatch(trailer) is not None
    )
    return Structure(format_ok, cot_span, content or None)


def _compile(pattern: str | None, name: str) -> regex.Pattern:
    if not pattern:
        raise StructureError(f"format `regex` needs `{name}`")
    try:
        compiled = regex.compile(pattern, regex.DOTALL)
    except regex.error as exc:
        raise StructureError(f"`{name}` does not compile: {exc}") from None
    if compiled.groups < 1:
        raise StructureError(f"`{name}` needs a capture group around the text it selects")
    return compiled


def _time_left(deadline: float, limit_s: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise PatternTimeout(f"the user patterns ran past their time limit of {limit_s:g} s")
    return left


def _regex_pair(
    text: str, eos: str | None, cot_pattern: str | None, answer_pattern: str | None, timeout_s: float
) -> Structure:
    # One deadline for both patterns, compilation included (the regex timeout covers matching only).
    deadline = time.monotonic() + timeout_s
    cot_re = _compile(cot_pattern, "cot_pattern")
    ans_re = _compile(answer_pattern, "answer_pattern")
    try:
        cot_matches = list(cot_re.finditer(text, timeout=_time_left(deadline, timeout_s)))
        cot_end = cot_matches[0].end() if cot_matches else 0
        ans_matches = list(ans_re.finditer(text, pos=cot_end, timeout=_time_left(deadline, timeout_s)))
    except TimeoutError:
        raise PatternTimeout(f"the user patterns ran past their time limit of {timeout_s:g} s") from None

    cot_span = None
    if cot_matches and cot_matches[0].start(1) >= 0:
        cot_span = (cot_matches[0].start(1), cot_matches[0].end(1))
    answer = _answer_from_block(ans_matches[-1].group(1) or "") if ans_matches else None

    format_ok = False
    if len(cot_matches) == 1 and len(ans_matches) == 1 and cot_span is not None:
        cot, ans = cot_matches[0], ans_matches[0]
        format_ok = (
            text[: cot.start()].strip() == ""
            and text[cot.end() : ans.start()].strip() == ""
            and bool(cot.group(1).strip())
            and bool((ans.group(1) or "").strip())
            and _outside_ok(text[ans.end() :], eos)
        )
    return Structure(format_ok, cot_span, answer if answer else None)


# ---------------------------------------------------------------- steps


def _trim(text: str, start: int, end: int) -> tuple[int, int] | None:
    """Shrink [start, end) to its first and last non-whitespace characters."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return (start, end) if start < end else None


def _lines(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """[start, end) of every line (newline excluded) inside the region."""
    spans, pos = [], start
    while pos <= end:
        nl = text.find("\n", pos, end)
        stop = end if nl < 0 else nl
        spans.append((pos, stop))
        if nl < 0:
            break
        pos = nl + 1
    return spans


def _split_lines(text: str, start: int, end: int) -> list[tuple[int, int]]:
    return [s for a, b in _lines(text, start, end) if (s := _trim(text, a, b))]


def _split_paragraphs(text: str, start: int, end: int) -> list[tuple[int, int]]:
    steps, block_start, block_end = [], None, None
    for a, b in _lines(text, start, end):
        if text[a:b].strip():
            block_start = a if block_start is None else block_start
            block_end = b
        elif block_start is not None:
            steps.append(_trim(text, block_start, block_end))
            block_start = None
    if block_start is not None:
        steps.append(_trim(text, block_start, block_end))
    return [s for s in steps if s]


def _marker_starts(text: str, start: int, end: int) -> list[int]:
    return [a for a, b in _lines(text, start, end) if _MARKER.match(text, a, b)]


def _split_markers(text: str, start: int, end: int, starts: list[int]) -> list[tuple[int, int]]:
    # The text before the first marker becomes its own step when non-blank.
    bounds = [start, *starts, end]
    pieces = [_trim(text, a, b) for a, b in zip(bounds, bounds[1:])]
    return [p for p in pieces if p]


def split_steps(
    text: str, region: tuple[int, int], mode: str = "auto", max_steps: int = 64
) -> tuple[list[tuple[int, int]], bool]:
    """Split the COT region into step spans; returns (spans, truncated)."""
    start, end = region
    if mode == "lines":
        steps = _split_lines(text, start, end)
    elif mode == "paragraphs":
        steps = _split_paragraphs(text, start, end)
    elif mode == "markers":
        steps = _split_markers(text, start, end, _marker_starts(text, start, end))
    elif mode == "auto":
        markers = _marker_starts(text, start, end)
        if len(markers) >= 2:
            steps = _split_markers(text, start, end, markers)
        elif len(paragraphs := _split_paragraphs(text, start, end)) >= 2:
            steps = paragraphs
        else:
            steps = _split_lines(text, start, end)
    else:
        raise StructureError(f"unknown step_split {mode!r}")

    if len(steps) <= max_steps:
        return steps, False
    merged = (steps[max_steps - 1][0], steps[-1][1])
    return [*steps[: max_steps - 1], merged], True
