"""Structure parsing (SPEC section 2): format_ok, COT region, extracted answer."""

import time

import pytest

from stepcredit.structure import PatternTimeout, StructureError, find_boxes, parse_structure

EOS = "<|im_end|>"


@pytest.mark.parametrize(
    "text",
    [
        "<think>a</think><answer>1</answer>",
        "  <think>\nreason\n</think>\n\n<answer> 1 </answer>\n",
        f"<think>x</think>\n<answer>1</answer>{EOS}",
        f"<think>x</think>\n<answer>1</answer>\n{EOS}\n",
    ],
)
def test_well_formed_think_answer_is_format_ok(text):
    assert parse_structure(text, eos_text=EOS).format_ok


@pytest.mark.parametrize(
    "text",
    [
        "<think></think><answer>1</answer>",  # empty think
        "<think>a</think><answer>  </answer>",  # empty answer
        "hello <think>a</think><answer>1</answer>",  # text before
        "<think>a</think> so <answer>1</answer>",  # text between
        "<think>a</think><answer>1</answer> trailing",  # text after
        "<think>a</think><answer>1</answer><answer>2</answer>",  # two answers
        "<think>a</think><think>b</think><answer>1</answer>",  # two thinks
        "<answer>1</answer><think>a</think>",  # wrong order
        "<think>a</think><answer>1",  # unterminated answer
        f"<think>a</think><answer>1</answer>{EOS}{EOS}",  # EOS text twice
    ],
)
def test_malformed_think_answer_is_not_format_ok(text):
    assert not parse_structure(text, eos_text=EOS).format_ok


def test_cot_region_ends_at_close_then_answer_then_end():
    t = "<think>abc</think><answer>1</answer>"
    assert parse_structure(t).cot_span == (7, 10)
    t = "<think>abc<answer>1</answer>"
    assert parse_structure(t).cot_span == (7, 10)
    t = "<think>abc"
    assert parse_structure(t).cot_span == (7, 10)


def test_no_think_tag_means_no_cot_region_but_answer_is_still_extracted():
    s = parse_structure("<answer>7</answer>")
    assert s.cot_span is None and s.answer == "7" and not s.format_ok


def test_answer_block_with_boxed_yields_last_box_content():
    s = parse_structure(r"<think>a</think><answer>first \boxed{1}, then \boxed{\frac{1}{2}}</answer>")
    assert s.answer == r"\frac{1}{2}"


@pytest.mark.parametrize(
    "block",
    [r"\boxed{1}, no wait: \boxed{12", r"\boxed{12", r"\boxed{\frac{1}{2}} or \boxed{\frac{3}{4}"],
)
def test_unclosed_last_box_in_answer_block_extracts_nothing_not_an_earlier_box(block):
    # The model took the earlier box back; the last one is cut off: nothing to grade.
    assert parse_structure(f"<think>a</think><answer>{block}</answer>").answer is None
    s = parse_structure(f"<r>a</r><a>{block}</a>", "regex", cot_pattern=r"<r>(.*?)</r>", answer_pattern=r"<a>(.*?)</a>")
    assert s.answer is None


def test_boxed_format_unclosed_last_box_extracts_nothing_and_cot_ends_at_it():
    t = r"First \boxed{1}, no wait: \boxed{12"
    s = parse_structure(t, "boxed")
    assert s.answer is None and not s.format_ok and s.cot_span == (0, t.index(r"\boxed{12"))


def test_unterminated_answer_block_extracts_nothing():
    # A truncated answer must not be graded: "4" could be the cut-off start of "42".
    assert parse_structure("<think>a</think><answer>4").answer is None


def test_last_complete_answer_block_wins():
    assert parse_structure("<think>a</think><answer>1</answer><answer>2</answer>").answer == "2"


def test_find_boxes_balances_braces_and_skips_nested_boxes():
    text = r"a \boxed{\frac{1}{\boxed{2}}} b \boxed{3"
    boxes = find_boxes(text)
    assert [text[b.content_start : b.content_end] for b in boxes if b.end] == [r"\frac{1}{\boxed{2}}"]
    assert boxes[-1].end is None  # the unbalanced trailing box


def test_boxed_format_cot_is_text_before_last_box():
    t = r"We add 2 and 3.\nThe final answer is $\boxed{5}$."
    s = parse_structure(t, "boxed")
    assert s.format_ok and s.answer == "5" and t[: s.cot_span[1]].endswith("is $")


@pytest.mark.parametrize(
    "text",
    [r"\boxed{5}", r"reason \boxed{}", r"reason \boxed{5} and more words", r"reason \boxed{5"],
)
def test_boxed_format_rejects_missing_cot_empty_box_trailing_prose_or_unbalanced(text):
    assert not parse_structure(text, "boxed").format_ok


def test_boxed_format_without_box_keeps_whole_text_as_cot():
    s = parse_structure("just thinking", "boxed")
    assert s.cot_span == (0, 13) and s.answer is None and not s.format_ok


def test_regex_format_uses_first_capture_groups():
    t = "<r>\nthink\n</r>\n<a>42</a>"
    s = parse_structure(t, "regex", cot_pattern=r"<r>(.*?)</r>", answer_pattern=r"<a>(.*?)</a>")
    assert s.format_ok and s.answer == "42" and t[slice(*s.cot_span)] == "\nthink\n"


def test_regex_format_rejects_bad_patterns():
    with pytest.raises(StructureError, match="capture group"):
        parse_structure("x", "regex", cot_pattern="a", answer_pattern="(b)")
    with pytest.raises(StructureError, match="compile"):
        parse_structure("x", "regex", cot_pattern="(", answer_pattern="(b)")
    with pytest.raises(StructureError, match="needs"):
        parse_structure("x", "regex", cot_pattern=None, answer_pattern="(b)")


def test_regex_format_stops_catastrophic_backtracking():
    t0 = time.monotonic()
    with pytest.raises(PatternTimeout, match="time limit of 0.1 s") as stopped:
        parse_structure(
            "a" * 60 + "!", "regex", cot_pattern=r"((a|aa)+)$", answer_pattern=r"(b)", pattern_timeout_s=0.1
        )
    assert time.monotonic() - t0 < 0.5
    # A server limit over this text, not a mistake in the options.
    assert stopped.value.code == "limit_exceeded" and isinstance(stopped.value, StructureError)
