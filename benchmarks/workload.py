"""Deterministic synthetic reasoning trajectories for benchmarks and equivalence tests.

Each trajectory works a running-total arithmetic problem step by step, so the
reference answer is known and the chain has exactly the number of steps asked
for. Formats, step layouts, reference variants and right/wrong answers vary
with the seed. `workload` groups rollouts by question, as a GRPO batch does.
"""

from __future__ import annotations

import random

__all__ = ["trajectory", "workload", "varied_items"]

_OPS = [("add", "+", lambda a, b: a + b), ("subtract", "-", lambda a, b: a - b), ("multiply by", "*", lambda a, b: a * b)]
_LAYOUTS = ["lines", "markers", "paragraphs", "sentences"]
# A system prompt of the length and kind RL recipes use (R1-Zero style), per format.
_SYSTEM = (
    "A conversation between a user and an assistant. The user asks a math question, and the "
    "assistant solves it. The assistant first works through the problem one step at a time, "
    "writing each intermediate result, and then states only the final number. {how}"
)
_HOW = {
    "think_answer": "The reasoning goes inside <think> </think> tags and the final answer inside "
    "<answer> </answer> tags, i.e. <think> reasoning here </think> <answer> answer here </answer>.",
    "boxed": "The reasoning comes first, then the final answer written as $\\boxed{answer}$.",
    "regex": "The reasoning goes inside <reasoning> </reasoning> tags and the final answer inside "
    "<final> </final> tags.",
}
_CHAT = "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"


def _question(rng: random.Random, n_steps: int) -> tuple[int, list[tuple[str, str, int]], str]:
    """(start value, [(op name, symbol, operand)], question text) of a chain of `n_steps`."""
    start = rng.randint(2, 20)
    ops = []
    for i in range(1, n_steps + 1):
        name, sym, _ = _OPS[0] if i % 3 else rng.choice(_OPS)
        ops.append((name, sym, rng.randint(2, 9) if sym != "*" else 2))
    question = " ".join([f"Start from {start}."] + [f"{name} {operand}" for name, _, operand in ops])
    return start, ops, question + " What is the result?"


def _chain(start: int, ops, layout: str, slip: tuple[int, int] | None = None) -> tuple[str, int]:
    """(COT text, final value); `slip` = (step, error) makes that step's result off by error."""
    fns = {sym: fn for _, sym, fn in _OPS}
    value, lines = start, []
    for i, (name, sym, operand) in enumerate(ops, 1):
        new = fns[sym](value, operand) + (slip[1] if slip and slip[0] == i else 0)
        if layout == "markers":
            lines.append(f"Step {i}: {name} {operand}.\n{value} {sym} {operand} = {new}")
        elif layout == "paragraphs":
            lines.append(f"Now we {name} {operand}.\nSo {value} {sym} {operand} = {new}.")
        elif layout == "sentences":
            lines.append(f"{value} {sym} {operand} is {new}.")
        else:
            lines.append(f"{value} {sym} {operand} = {new}")
        value = new
    joiner = "\n\n" if layout in ("paragraphs", "markers") else "\n"
    return joiner.join(lines), value


def _item(question: str, cot: str, answer: int, refs: list[str], fmt: str, item_id: str | None) -> dict:
    if fmt == "think_answer":
        completion = f"<think>\n{cot}\n</think>\n<answer>{answer}</answer>"
    elif fmt == "boxed":
        completion = f"{cot}\nThe final answer is $\\boxed{{{answer}}}$."
    else:  # regex
        completion = f"<reasoning>\n{cot}\n</reasoning>\n<final>{answer}</final>"
    prompt = _CHAT.format(system=_SYSTEM.format(how=_HOW[fmt]), q=question)
    item: dict = {"id": item_id, "prompt": prompt, "completion": completion, "references": refs}
    options: dict = {}
    if fmt != "think_answer":
        options["format"] = fmt
    if fmt == "regex":
        options.update(
            cot_pattern=r"<reasoning>(.*?)</reasoning>",
            answer_pattern=r"<final>(.*?)</final>",
            probe_prefix="\n</reasoning>\n<final>",
        )
    if options:
        item["options"] = options
    return item


def _references(value: int, n_refs: int) -> list[str]:
    return [str(value), f"{value}.0", f"\\boxed{{{value}}}"][: max(1, n_refs)]


def trajectory(
    rng: random.Random,
    n_steps: int,
    *,
    fmt: str = "think_answer",
    layout: str = "lines",
    n_refs: int = 2,
    wrong: bool = False,
    item_id: str | None = None,
) -> dict:
    """One item; `wrong` states a final answer other than the chain's result."""
    start, ops, question = _question(rng, n_steps)
    cot, value = _chain(start, ops, layout)
    answer = value + rng.randint(1, 5) if wrong else value
    return _item(question, cot, answer, _references(value, n_refs), fmt, item_id)


def workload(
    n: int = 16, min_steps: int = 10, max_steps: int = 30, max_refs: int = 3, group: int = 4, seed: int = 0
) -> list[dict]:
    """The benchmark workload, laid out like a GRPO batch: n // group questions of
    min..max steps with 1..max_refs references, `group` think_answer rollouts each
    (in order). Rollouts of one question differ in layout, and about 30% of them slip
    at a random step and carry the error to a wrong final answer."""
    rng = random.Random(seed)
    items: list[dict] = []
    for q in range((n + group - 1) // group):
        start, ops, question = _question(rng, rng.randint(min_steps, max_steps))
        refs = _references(_chain(start, ops, "lines")[1], rng.randint(1, max_refs))
        layouts = rng.sample(_LAYOUTS, len(_LAYOUTS))
        for r in range(min(group, n - len(items))):
            slip = (rng.randint(1, len(ops)), rng.choice([-2, -1, 1, 3])) if rng.random() < 0.3 else None
            cot, answer = _chain(start, ops, layouts[r % len(layouts)], slip)
            items.append(_item(question, cot, answer, refs, "think_answer", f"w{q}-{r}"))
    return items


def varied_items(seed: int = 0) -> list[dict]:
    """Every format and split mode, several references, and chains of 30+ steps."""
    rng = random.Random(seed)
    items = []
    for fmt in ("think_answer", "boxed", "regex"):
        for layout in ("lines", "markers", "paragraphs"):
            items.append(trajectory(rng, rng.randint(3, 8), fmt=fmt, layout=layout, n_refs=3, item_id=f"{fmt}-{layout}"))
    for split in ("lines", "paragraphs", "markers", "auto"):
        item = trajectory(rng, 6, layout="markers", n_refs=2, item_id=f"split-{split}")
        item["options"] = {"step_split": split}
        items.append(item)
    items.append(trajectory(rng, 34, layout="lines", n_refs=3, item_id="long-34"))
    items.append(trajectory(rng, 31, layout="markers", n_refs=2, wrong=True, item_id="long-31-wrong"))
    truncated = trajectory(rng, 12, n_refs=2, item_id="max-steps-5")
    truncated["options"] = {"max_steps": 5}
    items.append(truncated)
    items.append({"id": "no-think", "prompt": "2+2=", "completion": "<answer>4</answer>", "references": ["4"]})
    items.append({"id": "blank-cot", "prompt": "2+2=", "completion": "<think>  </think><answer>4</answer>", "references": ["4"]})
    items.append(
        {"id": "unterminated", "prompt": "2+2=", "completion": "<think>\n2+2 is 4\nso 4", "references": ["4", "four"]}
    )
    return items
