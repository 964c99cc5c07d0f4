"""`DecodeAlignment` where a character spans several byte tokens (an emoji on a
byte-level BPE): a prefix decode that stops inside the character holds U+FFFD
replacement characters, so only a prefix that reproduces the text counts. The
service's spans (`probes.token_cover`, reported when ids are sent) are the reference."""

from __future__ import annotations

from stepcredit_client import Client, DecodeAlignment, OffsetAlignment

from .conftest import PROMPT
from .policy_tokenizers import byte_bpe

# Each step ends in an emoji; 🎉 is 4 UTF-8 bytes, ✓ 3.
COMPLETION = (
    "<think>\nWe add 2 and 3 🎉\n2 + 3 = 5 ✓\nSo the sum is 5 🎉🎉\n</think>\n<answer>5</answer>"
)


def split_characters(tokenizer, ids) -> bool:
    """Whether some token holds only part of a character."""
    return any("\ufffd" in tokenizer.decode([t]) for t in ids)


def test_step_spans_agree_with_the_services_when_steps_end_in_an_emoji(live_server, tokenizer):
    ids = tokenizer(COMPLETION, add_special_tokens=False)["input_ids"]
    assert split_characters(tokenizer, ids)  # SmolLM2 splits the emoji: the case under test
    item = {"prompt": PROMPT, "completion": COMPLETION, "references": ["5"], "completion_token_ids": ids}
    with Client(live_server.url) as client:
        (result,) = client.score([item]).results
    assert result.status == "ok" and result.tokenization == "ids" and len(result.steps) == 3
    alignment = DecodeAlignment(tokenizer, ids, COMPLETION)
    for step in result.steps:
        assert COMPLETION[step.char_end - 1] in "🎉✓"
        assert alignment.span(step.char_start, step.char_end) == (step.token_start, step.token_end)
        assert alignment.last_token(step.char_end) == step.token_end - 1
        # The span's tokens decode to the whole step: no byte of its emoji is left out.
        assert tokenizer.decode(ids[: step.token_end]).endswith(COMPLETION[step.char_start : step.char_end])


def test_decoding_ids_agrees_with_offsets_on_a_tiny_byte_level_vocabulary():
    tok = byte_bpe()  # no merges for emoji bytes: one token per byte
    ids = tok(COMPLETION, add_special_tokens=False)["input_ids"]
    assert split_characters(tok, ids)
    by_ids = DecodeAlignment(tok, ids, COMPLETION)
    by_offsets = OffsetAlignment.from_tokenizer(tok, COMPLETION)
    for line in COMPLETION.split("\n")[1:4]:  # the three steps
        start = COMPLETION.index(line)
        end = start + len(line)
        assert by_ids.span(start, end) == by_offsets.span(start, end), line
        assert by_ids.last_token(end) == by_offsets.last_token(end)
        assert tok.decode(ids[: by_ids.last_token(end) + 1]) == COMPLETION[:end]


# Each step starts with an emoji, so its first token is part of a character split over
# several byte tokens: that token belongs to the step, not to what lies before it.
STARTS = "<think>\n🎉 We add 2 and 3\n✓ 2 + 3 = 5\n🎉🎉 So the sum is 5\n</think>\n<answer>5</answer>"


def test_a_step_that_starts_inside_a_split_character_owns_all_its_bytes(live_server, tokenizer):
    ids = tokenizer(STARTS, add_special_tokens=False)["input_ids"]
    assert split_characters(tokenizer, ids)
    item = {"prompt": PROMPT, "completion": STARTS, "references": ["5"], "completion_token_ids": ids}
    with Client(live_server.url) as client:
        (result,) = client.score([item]).results
    assert result.status == "ok" and len(result.steps) == 3
    alignment = DecodeAlignment(tokenizer, ids, STARTS)
    for step in result.steps:
        assert STARTS[step.char_start] in "🎉✓"
        assert alignment.span(step.char_start, step.char_end) == (step.token_start, step.token_end)
        # The step's tokens decode to the step itself: no stray byte before it, none missing.
        piece = tokenizer.decode(ids[step.token_start : step.token_end])
        assert "\ufffd" not in piece and piece.strip() == STARTS[step.char_start : step.char_end]
    # context_0 holds only the whole tokens before step 1: it ends on "\n", not half an emoji.
    assert "\ufffd" not in tokenizer.decode(ids[: result.steps[0].token_start])
