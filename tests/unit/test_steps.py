"""Step splitting (SPEC section 3): modes, spans, max_steps merging."""

import pytest

from stepcredit.structure import split_steps


def texts(text, mode, max_steps=64):
    spans, truncated = split_steps(text, (0, len(text)), mode, max_steps)
    return [text[a:b] for a, b in spans], truncated


def test_lines_mode_makes_every_non_blank_line_a_step_trimmed():
    assert texts("  a \n\n b\n   \nc", "lines")[0] == ["a", "b", "c"]


def test_paragraphs_mode_splits_on_blank_lines():
    assert texts("a\nb\n\n\n  c\n \nd", "paragraphs")[0] == ["a\nb", "c", "d"]


def test_markers_mode_starts_a_step_at_each_marker_and_keeps_a_preamble():
    text = "Let us see.\nStep 1: x\ny\n## step 2 z\nSTEP3: w"
    assert texts(text, "markers")[0] == ["Let us see.", "Step 1: x\ny", "## step 2 z", "STEP3: w"]


def test_markers_must_start_a_line():
    assert texts("we do step 1 now\nok", "markers")[0] == ["we do step 1 now\nok"]


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Step 1: a\nb\n\nStep 2: c", ["Step 1: a\nb", "Step 2: c"]),  # markers win
        ("Step 1: a\n\nb\n\nc", ["Step 1: a", "b", "c"]),  # one marker: paragraphs
        ("a\nb\nc", ["a", "b", "c"]),  # one paragraph: lines
    ],
)
def test_auto_mode_prefers_markers_then_paragraphs_then_lines(text, expected):
    assert texts(text, "auto")[0] == expected


def test_spans_are_offsets_into_the_completion_within_the_region():
    text = "<think>\n  first\nsecond  \n</think>"
    spans, _ = split_steps(text, (7, text.index("</think>")), "lines")
    assert [text[a:b] for a, b in spans] == ["first", "second"]
    assert spans[0][0] == text.index("first")


def test_max_steps_merges_the_tail_into_the_last_step():
    steps, truncated = texts("a\nb\nc\nd\ne", "lines", max_steps=3)
    assert steps == ["a", "b", "c\nd\ne"] and truncated


def test_exactly_max_steps_is_not_truncated():
    assert texts("a\nb\nc", "lines", max_steps=3) == (["a", "b", "c"], False)


def test_blank_region_has_no_steps():
    assert texts(" \n \t\n", "auto") == ([], False)


def test_unicode_whitespace_is_trimmed():
    assert texts("\u00a0a\u3000\n", "lines")[0] == ["a"]
