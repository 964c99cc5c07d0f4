"""Prompts and reference answers from reasoning-gym's procedural datasets, and
StepCredit's own visual task.

`reasoning_gym.create_dataset(name, size=, seed=, **params)` generates the
questions offline; the train and eval splits use different seeds. Each
answer is sent to the service with its equivalent forms (integer 12 and 12.0,
a fraction and its decimal): the step likelihood takes the best variant, the
verdict accepts any (SPEC 4 and 6).

`task.name = "clevr_count"` is the visual task (`scenes.py`): a seeded CLEVR-like
scene per problem, carried as an inline PNG in `Problem.images`, with a counting or
comparing question; `task.params` are `scenes.SceneConfig`'s fields.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from fractions import Fraction

from .config import TaskConfig

__all__ = ["SCENE_TASK", "Problem", "TaskError", "load_problems", "load_split", "reference_variants"]

SCENE_TASK = "clevr_count"
"""The visual task's name (not a reasoning-gym dataset)."""


class TaskError(ValueError):
    pass


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    references: tuple[str, ...]
    """The dataset's answer first, then its equivalent forms."""
    solution: str | None = None
    """A worked solution from the dataset's metadata, when one was asked for (validate)."""
    images: tuple[str, ...] = ()
    """Inline images (`data:image/png;base64,...`) the question is about, shown before it."""

    @property
    def key(self) -> str:
        """What makes two problems the same: the question, and the images it is asked of."""
        if not self.images:
            return self.question
        digests = ",".join(hashlib.sha256(uri.encode("ascii")).hexdigest()[:16] for uri in self.images)
        return f"{self.question}\x00{digests}"


_INTEGER = re.compile(r"[+-]?\d{1,60}")
_DECIMAL = re.compile(r"[+-]?\d{0,60}\.\d{1,60}")
_FRACTION = re.compile(r"([+-]?\d{1,60})\s*/\s*(\d{1,60})")


def _decimal_text(value: Fraction) -> str | None:
    """The exact decimal of a fraction whose denominator has only 2s and 5s."""
    denominator = value.denominator
    for p in (2, 5):
        while denominator % p == 0:
            denominator //= p
    if denominator != 1:
        return None
    digits = 0
    while (value * 10**digits).denominator != 1:
        digits += 1
    scaled = abs(value.numerator * 10**digits // value.denominator)
    whole, frac = divmod(scaled, 10**digits)
    sign = "-" if value < 0 else ""
    return f"{sign}{whole}.{frac:0{digits}d}" if digits else f"{sign}{whole}"


def reference_variants(answer: str) -> tuple[str, ...]:
    """The answer and its equivalent numeric forms, answer first, no duplicates.

    Numbers are read by pattern and `fractions.Fraction` (never evaluated);
    anything else (expressions, words, lists) stays the answer alone.
    """
    text = answer.strip()
    forms = [text]
    if _INTEGER.fullmatch(text):
        forms.append(f"{int(text)}.0")
    elif _DECIMAL.fullmatch(text):
        value = Fraction(text)
        if value.denominator == 1:
            forms.append(str(value.numerator))
        else:
            forms.append(f"{value.numerator}/{value.denominator}")
    elif match := _FRACTION.fullmatch(text):
        numerator, denominator = int(match[1]), int(match[2])
        if denominator != 0:
            value = Fraction(numerator, denominator)
            if value.denominator == 1:
                forms.append(str(value.numerator))
            decimal = _decimal_text(value)
            if decimal is not None:
                forms.append(decimal)
    out: list[str] = []
    for form in forms:
        if form and form not in out:
            out.append(form)
    return tuple(out)


def load_split(task: TaskConfig, split: str) -> list[Problem]:
    """The `train` or `eval` split of the configured reasoning-gym dataset.

    The eval split holds no question of the training split. A different seed is not
    enough: reasoning-gym seeds item i with `Random(seed + i)`, so the split of seed
    2 is the split of seed 1 shifted by one item, and small problem spaces repeat
    questions anyway. Eval items are drawn in order from `eval_seed`'s dataset,
    skipping every question the training split (or an earlier eval item) holds.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be train or eval, not {split!r}")
    train = _problems(task, "train", task.train_seed, task.train_size, task.train_size)
    if split == "train":
        return train
    # Enough candidates to get past the whole training range even when eval_seed sits inside it.
    candidates = task.train_size + 8 * task.eval_size
    held_out = _problems(task, "eval", task.eval_seed, task.eval_size, candidates, {p.key for p in train})
    if len(held_out) < task.eval_size:
        raise TaskError(
            f"task {task.name!r}: only {len(held_out)} of {candidates} eval candidates are questions the "
            f"training split does not hold, task.eval_size is {task.eval_size}: lower task.eval_size or "
            "task.train_size, or widen task.params"
        )
    return held_out


def load_problems(task: TaskConfig, seed: int, size: int, solution_field: str | None = None) -> list[Problem]:
    """The first `size` distinct questions of the dataset of `seed`; with `solution_field`,
    each carries the worked solution its metadata holds under that key (an item without one
    is an error naming the key: the check would otherwise quietly measure fewer chains)."""
    return _problems(task, "validate", seed, size, 4 * size, set(), solution_field)


def _problems(
    task: TaskConfig,
    split: str,
    seed: int,
    size: int,
    candidates: int,
    exclude: set[str] | None = None,
    solution_field: str | None = None,
) -> list[Problem]:
    """Up to `size` problems from the first `candidates` items of the dataset of `seed`,
    leaving out problems whose `key` is in `exclude` (and repeats, when `exclude` is given)."""
    entry_at = _scene_entries(task, seed) if task.name == SCENE_TASK else _gym_entries(task, seed, candidates)
    problems: list[Problem] = []
    for index in range(candidates):
        if len(problems) == size:
            break
        entry = entry_at(index)
        question, answer = entry.get("question"), entry.get("answer")
        if not isinstance(question, str) or not question.strip():
            raise TaskError(f"task {task.name!r} item {index} has no question string")
        if not isinstance(answer, str) or not answer.strip():
            raise TaskError(f"task {task.name!r} item {index} has no answer string; it cannot be scored")
        images = tuple(entry.get("images", ()))
        if exclude is not None:
            key = Problem("", question, (), images=images).key
            if key in exclude:
                continue
            exclude.add(key)
        solution = None
        if solution_field is not None:
            solution = (entry.get("metadata") or {}).get(solution_field)
            if not isinstance(solution, str) or not solution.strip():
                raise TaskError(
                    f"task {task.name!r} item {index} has no worked solution under metadata[{solution_field!r}]: "
                    "use validate.chains = 'policy', or a task whose items carry one (gsm_symbolic: answer_cot)"
                )
        # The scene task gives its own answer forms ("3", "three"); reasoning-gym one answer.
        references = tuple(entry["references"]) if "references" in entry else reference_variants(answer)
        problems.append(Problem(f"{task.name}-{split}-{seed}-{index}", question, references, solution, images))
    return problems


def _gym_entries(task: TaskConfig, seed: int, candidates: int):
    """Item `index` of reasoning-gym's dataset of `seed`, as a dict (question, answer, metadata)."""
    import reasoning_gym

    try:
        dataset = reasoning_gym.create_dataset(task.name, size=candidates, seed=seed, **task.params)
    except Exception as exc:  # unknown name, or params the dataset's config refuses
        raise TaskError(f"task.name / task.params: reasoning-gym cannot make {task.name!r}: {exc}") from None

    def entry_at(index: int) -> dict:
        try:
            return dataset[index]
        except Exception as exc:  # params the config accepted but generation cannot use (2.5 terms)
            reason = f"{type(exc).__name__}: {exc}"
            raise TaskError(f"task.params: reasoning-gym's {task.name!r} fails on item {index}: {reason}") from None

    return entry_at


def _scene_entries(task: TaskConfig, seed: int):
    """Scene `index` of the visual task's dataset of `seed`, in reasoning-gym's entry shape,
    plus its image and answer forms; the counting steps are its `answer_cot` (validate)."""
    from pydantic import ValidationError

    from .scenes import SceneConfig, SceneError, make_scene

    try:
        config = SceneConfig.model_validate(task.params)
    except ValidationError as exc:
        reasons = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'params'}: {e['msg']}" for e in exc.errors())
        raise TaskError(f"task.params: {SCENE_TASK!r} takes scenes.SceneConfig's fields: {reasons}") from None

    def entry_at(index: int) -> dict:
        try:
            scene = make_scene(seed, index, config)
        except SceneError as exc:
            raise TaskError(f"task.params: {SCENE_TASK!r} fails on item {index}: {exc}") from None
        return {
            "question": scene.question,
            "answer": scene.answers[0],
            "references": scene.answers,
            "images": (scene.data_uri(),),
            "metadata": {"answer_cot": scene.solution, "kind": scene.kind},
        }

    return entry_at
