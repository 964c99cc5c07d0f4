"""Property-based tests of structure parsing and step splitting (SPEC sections 2 and 3).

The unit tests pin chosen examples; these state the contract over generated text:
spans are offsets inside the completion, steps partition the chain of thought
(only whitespace between them, none overlapping, at most `max_steps` with the tail
merged and flagged), well-formed completions round-trip, and no text makes the
parser raise anything but its documented `StructureError`.
"""

from __future__ import annotations

import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stepcredit.structure import StructureError, find_boxes, parse_structure, split_steps

# Modest and deterministic in time: the whole file runs in a few seconds on 2 cores.
FAST = settings(max_examples=150, deadline=1000, suppress_health_check=[HealthCheck.too_slow], database=None)

EOS = "<|im_end|>"
TAGS = ("<think>", "</think>", "<answer>", "</answer>")
MODES = ("auto", "lines", "paragraphs", "markers")

# Text that often holds what the parser looks for: tags, blank lines, step markers,
# boxes and braces, EOS, unusual whitespace; glued between arbitrary snippets.
_PIECES = st.sampled_from(
    [*TAGS, "\n", "\n\n", " ", "\t", "\r\n", "\u2028", "\u00a0", "Step 1:", "## step 12", "STEP3"]
    + ["\\boxed{", "{", "}", "\\", EOS, "x", "12"]
)
completions = st.lists(st.one_of(_PIECES, st.text(max_size=8)), max_size=24).map("".join)


def _tagless(min_size: int = 0) -> st.SearchStrategy[str]:
    alphabet = st.characters(exclude_categories=["Cs"])
    return st.text(alphabet, min_size=min_size, max_size=40).filter(lambda s: not any(t in s for t in TAGS))


def _blank() -> st.SearchStrategy[str]:
    return st.text(st.sampled_from(" \n\t\r\u00a0\u3000"), max_size=4)


def _nonblank_tagless() -> st.SearchStrategy[str]:
    return _tagless(1).filter(lambda s: s.strip() and "\\boxed" not in s)


@st.composite
def text_and_region(draw) -> tuple[str, tuple[int, int]]:
    text = draw(completions)
    a = draw(st.integers(0, len(text)))
    b = draw(st.integers(a, len(text)))
    return text, (a, b)


# ------------------------------------------------------------------ parse_structure


@FAST
@given(completions, st.sampled_from(["think_answer", "boxed"]), st.sampled_from([None, EOS]))
def test_any_text_parses_without_raising_and_the_cot_span_lies_inside_it(text, fmt, eos):
    s = parse_structure(text, fmt, eos_text=eos)
    if s.cot_span is not None:
        start, end = s.cot_span
        assert 0 <= start <= end <= len(text)
    assert s.answer is None or s.answer.strip() == s.answer != ""
    assert isinstance(s.format_ok, bool)
    if s.format_ok:
        assert s.cot_span is not None and text[slice(*s.cot_span)].strip() and s.answer


@FAST
@given(completions)
def test_think_answer_cot_region_is_the_one_spec_2_defines(text):
    # Opens after the first <think>; ends at </think>, else <answer>, else the end.
    s = parse_structure(text)
    if "<think>" not in text:
        assert s.cot_span is None
        return
    start = text.index("<think>") + len("<think>")
    end = text.find("</think>", start)
    if end < 0:
        end = text.find("<answer>", start)
    if end < 0:
        end = len(text)
    assert s.cot_span == (start, end)


@FAST
@given(
    _blank(),
    _nonblank_tagless(),
    _blank(),
    _nonblank_tagless(),
    _blank(),
    st.sampled_from(["", EOS, "\n" + EOS + "\n"]),
)
def test_well_formed_think_answer_round_trips(before, cot, between, answer, after, eos_text):
    text = f"{before}<think>{cot}</think>{between}<answer>{answer}</answer>{after}{eos_text}"
    s = parse_structure(text, eos_text=EOS)
    assert s.format_ok
    assert text[slice(*s.cot_span)] == cot
    assert s.answer == answer.strip()


@FAST
@given(
    _nonblank_tagless(),
    _nonblank_tagless(),
    st.sampled_from(["before", "between", "after", "empty_cot", "empty_answer", "second_answer"]),
    st.text(min_size=1, max_size=6).filter(lambda s: s.strip() and s.strip() != EOS),
)
def test_one_defect_makes_a_think_answer_completion_not_format_ok(cot, answer, defect, junk):
    parts = {"before": "", "between": "\n", "after": ""}
    if defect in parts:
        parts[defect] = junk
    if defect == "empty_cot":
        cot = " \n"
    if defect == "empty_answer":
        answer = "\t"
    text = f"{parts['before']}<think>{cot}</think>{parts['between']}<answer>{answer}</answer>{parts['after']}"
    if defect == "second_answer":
        text += f"<answer>{answer}</answer>"
    assert not parse_structure(text, eos_text=EOS).format_ok


_BOX_CONTENT = st.text(st.characters(exclude_characters="{}\\", exclude_categories=["Cs"]), max_size=20)


@FAST
@given(_nonblank_tagless(), _BOX_CONTENT, _BOX_CONTENT, st.sampled_from(["", "$", "$.", " .", "\n" + EOS]))
def test_boxed_completion_round_trips(cot, content, inner, trailer):
    box = f"{content}{{{inner}}}" if inner else content  # a nested group stays in the answer
    text = f"{cot}\\boxed{{{box}}}{trailer}"
    s = parse_structure(text, "boxed", eos_text=EOS)
    assert s.cot_span == (0, len(cot))
    assert s.answer == (box.strip() or None)
    assert s.format_ok == bool(box.strip())


@FAST
@given(completions)
def test_boxes_are_found_in_order_inside_the_text(text):
    boxes = find_boxes(text)
    last_end = 0
    for box in boxes:
        assert last_end <= box.start < box.content_start <= len(text)
        if box.end is None:
            assert box is boxes[-1]  # an unbalanced box runs to the end: nothing follows it
            break
        assert box.content_start <= box.content_end < box.end <= len(text)
        assert text[box.content_end] == "}"
        last_end = box.end


@settings(FAST, max_examples=60)
@given(st.text(max_size=12), st.text(max_size=12), completions)
def test_user_patterns_fail_only_with_structure_error(cot_pattern, answer_pattern, text):
    # Any user regex (bad syntax, no capture group, anything) either parses or is a
    # StructureError the service turns into that item's error.
    try:
        s = parse_structure(text, "regex", cot_pattern=cot_pattern, answer_pattern=answer_pattern)
    except StructureError:
        return
    if s.cot_span is not None:
        assert 0 <= s.cot_span[0] <= s.cot_span[1] <= len(text)


@FAST
@given(st.text(max_size=12).filter(lambda f: f not in ("think_answer", "boxed", "regex")))
def test_an_unknown_format_is_a_structure_error(fmt):
    try:
        parse_structure("<think>a</think><answer>1</answer>", fmt)
    except StructureError:
        return
    raise AssertionError(f"format {fmt!r} was accepted")


# ------------------------------------------------------------------ split_steps


@FAST
@given(text_and_region(), st.sampled_from(MODES), st.integers(1, 8))
def test_steps_partition_the_cot_region(text_region, mode, max_steps):
    text, (start, end) = text_region
    spans, truncated = split_steps(text, (start, end), mode, max_steps)
    assert len(spans) <= max_steps
    cursor = start
    for a, b in spans:
        # In order, inside the region, no overlap; trimmed to non-whitespace at both ends (SPEC 3).
        assert cursor <= a < b <= end
        assert not text[a].isspace() and not text[b - 1].isspace()
        # What lies between two steps is whitespace only: no step text is lost.
        assert text[cursor:a].isspace() or cursor == a
        cursor = b
    assert text[cursor:end].isspace() or cursor == end
    if not spans:
        assert not text[start:end].strip() and not truncated


@FAST
@given(text_and_region(), st.sampled_from(MODES), st.integers(1, 8))
def test_max_steps_merges_the_tail_into_the_last_step_and_says_so(text_region, mode, max_steps):
    text, region = text_region
    full, full_truncated = split_steps(text, region, mode, 10_000)
    spans, truncated = split_steps(text, region, mode, max_steps)
    assert not full_truncated
    assert truncated == (len(full) > max_steps)
    if truncated:
        assert spans[:-1] == full[: max_steps - 1]
        assert spans[-1] == (full[max_steps - 1][0], full[-1][1])
    else:
        assert spans == full


@FAST
@given(text_and_region())
def test_auto_picks_markers_then_paragraphs_then_lines(text_region):
    # SPEC 3: `markers` when it finds 2 or more markers, else `paragraphs` when 2 or more,
    # else `lines`.
    text, (start, end) = text_region
    lines = text[start:end].split("\n")
    marker = re.compile(r"\s*(#+\s*)?step\s*\d+", re.IGNORECASE)
    n_markers = sum(marker.match(line) is not None for line in lines)
    steps = {mode: split_steps(text, (start, end), mode, 10_000)[0] for mode in MODES}
    if n_markers >= 2:
        expected = steps["markers"]
    elif len(steps["paragraphs"]) >= 2:
        expected = steps["paragraphs"]
    else:
        expected = steps["lines"]
    assert steps["auto"] == expected


@FAST
@given(text_and_region())
def test_lines_mode_gives_each_non_blank_line_one_step(text_region):
    text, (start, end) = text_region
    spans, _ = split_steps(text, (start, end), "lines", 10_000)
    assert [text[a:b] for a, b in spans] == [ln.strip() for ln in text[start:end].split("\n") if ln.strip()]


@FAST
@given(st.text(max_size=12).filter(lambda m: m not in MODES))
def test_an_unknown_step_split_is_a_structure_error(mode):
    try:
        split_steps("a\nb", (0, 3), mode)
    except StructureError:
        return
    raise AssertionError(f"step_split {mode!r} was accepted")
