"""Probe construction (SPEC section 4) with SmolLM2's tokenizer, no model."""

from __future__ import annotations

import pytest

from stepcredit.probes import ProbeError, encode_text, ids_probes, text_probes
from stepcredit.structure import THINK_PROBE_PREFIX, parse_structure, split_steps

PROMPT = "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
COMPLETION = "<think>\nWe add.\n2 + 3 = 5\nSo 5. 😀\n</think>\n<answer>5</answer>"


def cuts_and_steps(completion=COMPLETION):
    s = parse_structure(completion)
    steps, _ = split_steps(completion, s.cot_span, "lines")
    return [steps[0][0]] + [e for _, e in steps], steps


def test_probe_k_is_prompt_plus_completion_up_to_step_end_plus_prefix(tokenizer):
    cuts, _ = cuts_and_steps()
    probes = text_probes(tokenizer, PROMPT, COMPLETION, cuts, THINK_PROBE_PREFIX, ["5", "five"])
    assert len(probes.contexts) == 4
    for cut, ctx in zip(cuts, probes.contexts):
        assert ctx == tokenizer(PROMPT + COMPLETION[:cut] + THINK_PROBE_PREFIX)["input_ids"]
    assert tokenizer.decode(probes.contexts[0]).endswith("<think>\n" + THINK_PROBE_PREFIX)
    assert probes.trunk == tokenizer(PROMPT + COMPLETION[: cuts[-1]])["input_ids"]


def test_references_are_tokenized_alone_without_special_tokens(tokenizer):
    cuts, _ = cuts_and_steps()
    probes = text_probes(tokenizer, PROMPT, COMPLETION, cuts, THINK_PROBE_PREFIX, ["5", r"\frac{1}{2}"])
    assert probes.references == [tokenizer(r, add_special_tokens=False)["input_ids"] for r in ["5", r"\frac{1}{2}"]]


class WithBos:
    """SmolLM2 adds no BOS; this wrapper behaves like a tokenizer that does."""

    bos_token = "<|im_start|>"

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, texts, add_special_tokens=True):
        ids = self.tok(texts, add_special_tokens=False)["input_ids"]
        bos = self.tok.convert_tokens_to_ids(self.bos_token)
        return {"input_ids": [[bos, *x] for x in ids] if add_special_tokens else ids}


def test_a_prompt_already_starting_with_bos_gets_no_second_bos(tokenizer):
    wrapped = WithBos(tokenizer)
    bos = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert encode_text(wrapped, ["plain text"])[0][0] == bos
    assert encode_text(wrapped, [PROMPT])[0][:2] != [bos, bos]


def test_ids_path_reports_token_spans_that_cover_each_step(tokenizer):
    cuts, steps = cuts_and_steps()
    ids = tokenizer(COMPLETION, add_special_tokens=False)["input_ids"]
    probes, spans = ids_probes(tokenizer, PROMPT, COMPLETION, ids, cuts[0], steps, THINK_PROBE_PREFIX, ["5"])
    for (a, b), (ts, te) in zip(steps, spans):
        covered = tokenizer.decode(ids[ts:te])
        assert COMPLETION[a:b] in covered
        assert COMPLETION[a:b] not in tokenizer.decode(ids[ts + 1 : te])  # no token too many at the start
        assert COMPLETION[a:b] not in tokenizer.decode(ids[ts : te - 1])  # nor at the end
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    prefix_ids = tokenizer(THINK_PROBE_PREFIX, add_special_tokens=False)["input_ids"]
    assert probes.contexts[-1] == prompt_ids + ids[: spans[-1][1]] + prefix_ids
    assert probes.contexts[0] == prompt_ids + ids[: spans[0][0]] + prefix_ids


def test_ids_path_handles_a_multibyte_character_split_across_tokens(tokenizer):
    completion = "<think>\nfirst 😀\nsecond 😀😀\n</think><answer>1</answer>"
    cuts, steps = cuts_and_steps(completion)
    ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    _, spans = ids_probes(tokenizer, "", completion, ids, cuts[0], steps, "\n", ["1"])
    for (a, b), (ts, te) in zip(steps, spans):
        assert completion[a:b] in tokenizer.decode(ids[ts:te])


@pytest.mark.parametrize(
    "mutate,code",
    [(lambda ids: ids[:-1], "token_ids_mismatch"), (lambda ids: [*ids, 10**7], "invalid_token_ids"), (lambda ids: [-1, *ids], "invalid_token_ids")],
)
def test_ids_that_do_not_match_the_completion_are_rejected(tokenizer, mutate, code):
    cuts, steps = cuts_and_steps()
    ids = mutate(tokenizer(COMPLETION, add_special_tokens=False)["input_ids"])
    with pytest.raises(ProbeError) as err:
        ids_probes(tokenizer, PROMPT, COMPLETION, ids, cuts[0], steps, THINK_PROBE_PREFIX, ["5"])
    assert err.value.code == code


def test_reference_that_tokenizes_to_nothing_is_an_error(tokenizer):
    cuts, _ = cuts_and_steps()
    with pytest.raises(ProbeError) as err:
        text_probes(tokenizer, PROMPT, COMPLETION, cuts, THINK_PROBE_PREFIX, [""])
    assert err.value.code == "empty_reference"


class CountingTokenizer:
    """The real tokenizer, counting the texts it is asked to tokenize."""

    def __init__(self, inner) -> None:
        self.inner, self.texts = inner, 0

    def __call__(self, texts, **kwargs):
        self.texts += len(texts) if isinstance(texts, list) else 1
        return self.inner(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_the_cost_model_fails_an_item_before_its_contexts_are_tokenized(tokenizer):
    cuts, steps = cuts_and_steps()  # 4 probes
    refs = ["7" * 300, "12"]  # 300 + 1 tokens: SmolLM2 reads digits one by one
    counting = CountingTokenizer(tokenizer)
    with pytest.raises(ProbeError) as err:
        text_probes(counting, PROMPT, COMPLETION, cuts, THINK_PROBE_PREFIX, refs, max_probe_tokens=1024)
    assert err.value.code == "limit_exceeded"
    assert str(err.value) == (
        "4 probes x 2 references of 300 + 2 tokens = 1208 probe tokens, limit max_probe_tokens_per_item=1024"
    )
    assert counting.texts == len(refs)  # only the references were tokenized
    with pytest.raises(ProbeError, match="4 probes x 2 references of 300 \\+ 2 tokens"):
        ids_probes(
            tokenizer, PROMPT, COMPLETION, tokenizer(COMPLETION, add_special_tokens=False)["input_ids"],
            cuts[0], steps, THINK_PROBE_PREFIX, refs, max_probe_tokens=1024,
        )  # fmt: skip
    probes = text_probes(tokenizer, PROMPT, COMPLETION, cuts, THINK_PROBE_PREFIX, refs, max_probe_tokens=1208)
    assert probes.probe_tokens == 1208  # at the limit is fine


def test_a_trajectory_longer_than_the_context_fails_after_one_context(tokenizer):
    cuts, _ = cuts_and_steps()
    counting = CountingTokenizer(tokenizer)
    with pytest.raises(ProbeError) as err:
        text_probes(counting, PROMPT, COMPLETION, cuts, THINK_PROBE_PREFIX, ["5"], max_context=20)
    assert err.value.code == "context_too_long"
    assert counting.texts == 2  # the reference and the last (longest) context
