"""Deterministic synthetic reasoning trajectories for benchmarks and equivalence tests.

Each trajectory works a running-total arithmetic problem step by step, so the
reference answer is known and the chain has exactly the number of steps asked
for. Formats, step layouts, reference variants and right/wrong answers vary
with the seed.
"""

from __future__ import annotations

import random

__all__ = ["trajectory", "workload", "varied_items"]

_OPS = [("add", "+", lambda a, b: a + b), ("subtract", "-", lambda a, b: a - b), ("multiply by", "*", lambda a, b: a * b)]
_CHAT = "<|im_start|>system\nYou are a careful math tutor.<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"


def _steps(rng: random.Random, n_steps: int, layout: str) -> tuple[str, int, str]:
    """(COT text, final value, question) for a chain of `n_steps` steps."""
    value = rng.randint(2, 20)
    question = [f"Start from {value}."]
    lines = []
    for i in range(1, n_steps + 1):
        name, sym, fn = _OPS[0] if i % 3 else rng.choice(_OPS)
        operand = rng.randint(2, 9) if sym != "*" else 2
        new = fn(value, operand)
        question.append(f"{name} {operand}")
        if layout == "markers":
            lines.append(f"Step {i}: {name} {operand}.\n{value} {sym} {operand} = {new}")
        elif layout == "paragraphs":
            lines.append(f"Now we {name} {operand}.\nSo {value} {sym} {operand} = {new}.")
        else:
            lines.append(f"{value} {sym} {operand} = {new}")
        value = new
    joiner = "\n\n" if layout in ("paragraphs", "markers") else "\n"
    return joiner.join(lines), value, " ".join(question) + " What is the result?"


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
    cot, value, question = _steps(rng, n_steps, layout)
    answer = value + rng.randint(1, 5) if wrong else value
    refs = [str(value), f"{value}.0", f"\\boxed{{{value}}}"][: max(1, n_refs)]
    if fmt == "think_answer":
        completion = f"<think>\n{cot}\n</think>\n<answer>{answer}</answer>"
    elif fmt == "boxed":
        completion = f"{cot}\nThe final answer is $\\boxed{{{answer}}}$."
    else:  # regex
        completion = f"<reasoning>\n{cot}\n</reasoning>\n<final>{answer}</final>"
    item: dict = {"id": item_id, "prompt": _CHAT.format(q=question), "completion": completion, "references": refs}
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


def workload(n: int = 16, min_steps: int = 10, max_steps: int = 30, max_refs: int = 3, seed: int = 0) -> list[dict]:
    """The benchmark workload: `n` think_answer trajectories of min..max steps, 1..max_refs references."""
    rng = random.Random(seed)
    return [
        trajectory(
            rng,
            rng.randint(min_steps, max_steps),
            layout=rng.choice(["lines", "markers", "paragraphs"]),
            n_refs=rng.randint(1, max_refs),
            wrong=rng.random() < 0.3,
            item_id=f"w{i}",
        )
        for i in range(n)
    ]


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
