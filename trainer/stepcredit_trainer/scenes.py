"""A small visual reasoning task that runs offline: CLEVR-like scenes drawn with Pillow.

Each scene is a few flat shapes (circle, square, triangle; five colors; small or
large) placed without overlap on a plain background, with one question that needs
counting or comparing and its answer in the forms the service accepts (`3` and
`three`, `yes` and `Yes`). Everything follows from (seed, index): the same pair
gives the same objects, question and PNG bytes, and scene i of a seed never
depends on scene i-1 (unlike reasoning-gym's `seed + i`, which makes seed 2 the
seed-1 dataset shifted by one).

Drawing is aliasing-free on purpose: every pixel of a shape is exactly its color,
so a test can check the answer against the pixels, and the small default image
(224x168, a multiple of Qwen2-VL's 28-pixel merged patch) keeps CPU tests fast.

    python -m stepcredit_trainer.scenes --seed 1 --count 2   # one StepCredit item per line
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import sys
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "COLORS",
    "QUESTION_KINDS",
    "SYSTEM_PROMPT",
    "Scene",
    "SceneConfig",
    "SceneError",
    "SceneObject",
    "make_scene",
    "make_scenes",
]

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
}
BACKGROUND = (235, 235, 235)
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
QUESTION_KINDS = (
    "count_color",  # How many red shapes are there?
    "count_shape",  # How many circles are there?
    "count_color_shape",  # How many red circles are there?
    "count_size",  # How many large shapes are there?
    "more_shapes",  # Are there more circles than squares?
    "more_colors",  # Are there more red shapes than blue shapes?
    "left_of",  # How many shapes are to the left of the blue circle?
    "right_of",
)
QuestionKind = Literal[
    "count_color", "count_shape", "count_color_shape", "count_size", "more_shapes", "more_colors", "left_of", "right_of"
]
_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()

SYSTEM_PROMPT = (
    "You are a careful assistant who answers questions about images. Think step by step inside "
    "<think> and </think>, one short observation per line. Then give only the final answer (a number, "
    "or yes or no) inside <answer> and </answer>.\n"
    "Example for 'How many red shapes are there?':\n<think>\nlarge red circle: 1\nsmall red square: 2\n"
    "There are 2 red shapes.\n</think>\n<answer>2</answer>"
)


class SceneError(ValueError):
    pass


class SceneConfig(BaseModel):
    """How scenes are drawn and asked about (the task's `params`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    width: int = Field(224, ge=56, le=1024, description="Image width in pixels.")
    height: int = Field(168, ge=56, le=1024, description="Image height in pixels.")
    min_objects: int = Field(3, ge=1, le=12, description="Fewest shapes in a scene.")
    max_objects: int = Field(6, ge=1, le=12, description="Most shapes in a scene.")
    questions: tuple[QuestionKind, ...] = Field(
        QUESTION_KINDS, min_length=1, description="Question kinds, drawn uniformly (repeat one to weigh it)."
    )

    @model_validator(mode="after")
    def _range(self) -> SceneConfig:
        if self.min_objects > self.max_objects:
            raise ValueError(f"min_objects {self.min_objects} > max_objects {self.max_objects}")
        return self

    @property
    def radii(self) -> dict[str, int]:
        """Half the side of each size's bounding square, in pixels."""
        side = min(self.width, self.height)
        return {"small": max(4, round(side * 0.055)), "large": max(7, round(side * 0.095))}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    x: int
    """Center, pixels from the left edge."""
    y: int
    """Center, pixels from the top edge."""
    r: int
    """Half the side of the bounding square."""

    def describe(self) -> str:
        return f"{self.size} {self.color} {self.shape}"

    def box(self) -> tuple[int, int, int, int]:
        return (self.x - self.r, self.y - self.r, self.x + self.r, self.y + self.r)


@dataclass(frozen=True)
class Scene:
    seed: int
    index: int
    kind: str
    question: str
    answers: tuple[str, ...]
    """The answer first, then its equivalent forms (the item's `references`)."""
    solution: str
    """The counting steps, one per line (a worked chain for SFT-style tests)."""
    objects: tuple[SceneObject, ...]
    """Left to right."""
    png: bytes = field(repr=False)

    @property
    def image(self):
        """The drawn scene (a fresh PIL image, RGB, decoded from `png`)."""
        from PIL import Image

        return Image.open(io.BytesIO(self.png)).convert("RGB")

    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")

    def completion(self) -> str:
        """The worked solution in the think/answer format."""
        return f"<think>\n{self.solution}\n</think>\n<answer>{self.answers[0]}</answer>"

    def messages(self, system_prompt: str | None = SYSTEM_PROMPT) -> list[dict]:
        """OpenAI-style chat messages: the image as an inline `image_url` part, then the question."""
        user = {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": self.data_uri()}},
                {"type": "text", "text": self.question},
            ],
        }
        return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [user]

    def item(self, completion: str | None = None, system_prompt: str | None = SYSTEM_PROMPT) -> dict:
        """A StepCredit score item; the completion defaults to the worked solution."""
        return {
            "id": f"scene-{self.seed}-{self.index}",
            "messages": self.messages(system_prompt),
            "completion": self.completion() if completion is None else completion,
            "references": list(self.answers),
        }


def make_scene(seed: int, index: int = 0, config: SceneConfig | None = None) -> Scene:
    """Scene `index` of the dataset of `seed`."""
    config = config or SceneConfig()
    if seed < 0 or index < 0:
        raise SceneError(f"seed and index must be >= 0, got {seed}, {index}")
    # A string seed is hashed (SHA-512) by `random`: stable across runs and platforms.
    rng = random.Random(f"stepcredit-scenes/{seed}/{index}")
    objects = _place(rng, config)
    kind, question, answer, solution = _ask(rng, config, objects)
    return Scene(seed, index, kind, question, _forms(answer), solution, objects, _draw(config, objects))


def make_scenes(seed: int, count: int, config: SceneConfig | None = None) -> list[Scene]:
    if not 0 <= count <= 1_000_000:
        raise SceneError(f"count must lie in [0, 1000000], got {count}")
    return [make_scene(seed, i, config) for i in range(count)]


# --------------------------------------------------------------------------- placement


_GAP = 3  # pixels between the bounding squares of two shapes (and from the edge)


def _place(rng: random.Random, config: SceneConfig) -> tuple[SceneObject, ...]:
    """Non-overlapping shapes, by rejection; a crowded config is an error, never fewer shapes."""
    n = rng.randint(config.min_objects, config.max_objects)
    radii = config.radii
    for _ in range(50):  # restarts
        placed: list[SceneObject] = []
        for _ in range(n):
            size = rng.choice(SIZES)
            r = radii[size]
            shape, color = rng.choice(SHAPES), rng.choice(tuple(COLORS))
            for _ in range(200):
                x = rng.randint(r + _GAP, config.width - 1 - r - _GAP)
                y = rng.randint(r + _GAP, config.height - 1 - r - _GAP)
                # Distinct centers in x, so "left of" is defined for every pair.
                if all(_apart(x, y, r, o) and x != o.x for o in placed):
                    placed.append(SceneObject(shape, color, size, x, y, r))
                    break
            else:
                break
        if len(placed) == n:
            return tuple(sorted(placed, key=lambda o: o.x))
    raise SceneError(
        f"cannot place {n} shapes without overlap on {config.width}x{config.height}: "
        "lower max_objects or enlarge the image"
    )


def _apart(x: int, y: int, r: int, other: SceneObject) -> bool:
    reach = r + other.r + _GAP
    return abs(x - other.x) > reach or abs(y - other.y) > reach


def _draw(config: SceneConfig, objects: tuple[SceneObject, ...]) -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (config.width, config.height), BACKGROUND)
    draw = ImageDraw.Draw(image)  # no anti-aliasing: every shape pixel is exactly its color
    for o in objects:
        fill = COLORS[o.color]
        x0, y0, x1, y1 = o.box()
        if o.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif o.shape == "square":
            inset = round(o.r * 0.12)  # a square of the circle's width looks larger than it
            draw.rectangle((x0 + inset, y0 + inset, x1 - inset, y1 - inset), fill=fill)
        else:
            draw.polygon([(o.x, y0), (x1, y1), (x0, y1)], fill=fill)
    out = io.BytesIO()
    image.save(out, format="PNG")  # no metadata, fixed compression: same pixels, same bytes
    return out.getvalue()


# --------------------------------------------------------------------------- questions


def _plural(shape: str) -> str:
    return shape + "s"


def _forms(answer: str) -> tuple[str, ...]:
    if answer in ("yes", "no"):
        return (answer, answer.capitalize())
    n = int(answer)
    return (answer, _WORDS[n]) if n < len(_WORDS) else (answer,)


def _count_steps(matches: list[SceneObject], noun: str, empty: str) -> str:
    lines = [f"{o.describe()}: {i}" for i, o in enumerate(matches, 1)] or [empty]
    lines.append(f"There {'is' if len(matches) == 1 else 'are'} {len(matches)} {noun}.")
    return "\n".join(lines)


def _compare(a: int, b: int, noun_a: str, noun_b: str) -> tuple[str, str]:
    sign = ">" if a > b else "=" if a == b else "<"
    verdict = "there are more" if a > b else "there are not more"
    steps = f"{noun_a}: {a}\n{noun_b}: {b}\n{a} {sign} {b}, so {verdict} {noun_a} than {noun_b}."
    return ("yes" if a > b else "no"), steps


def _ask(rng: random.Random, config: SceneConfig, objects: tuple[SceneObject, ...]) -> tuple[str, str, str, str]:
    """(kind, question, answer, worked solution); `objects` are sorted left to right."""
    kind = rng.choice(config.questions)
    if kind in ("left_of", "right_of"):
        anchors = _anchors(objects)
        if not anchors:  # no shape is unique and clear of the others: ask a count instead
            kind = "count_shape"
    # The counted attribute is one a shape has, mostly, so answers are not mostly 0.
    pick = rng.choice(objects)
    color = pick.color if rng.random() < 0.8 else rng.choice(tuple(COLORS))
    shape = pick.shape if rng.random() < 0.8 else rng.choice(SHAPES)
    if kind == "count_color":
        matches = [o for o in objects if o.color == color]
        noun = f"{color} shapes" if len(matches) != 1 else f"{color} shape"
        steps = _count_steps(matches, noun, f"No shape is {color}.")
        return kind, f"How many {color} shapes are there?", str(len(matches)), steps
    if kind == "count_shape":
        matches = [o for o in objects if o.shape == shape]
        noun = _plural(shape) if len(matches) != 1 else shape
        steps = _count_steps(matches, noun, f"No shape is a {shape}.")
        return kind, f"How many {_plural(shape)} are there?", str(len(matches)), steps
    if kind == "count_color_shape":
        matches = [o for o in objects if o.color == color and o.shape == shape]
        noun = f"{color} {_plural(shape) if len(matches) != 1 else shape}"
        steps = _count_steps(matches, noun, f"No shape is a {color} {shape}.")
        return kind, f"How many {color} {_plural(shape)} are there?", str(len(matches)), steps
    if kind == "count_size":
        size = rng.choice(SIZES)
        matches = [o for o in objects if o.size == size]
        noun = f"{size} shapes" if len(matches) != 1 else f"{size} shape"
        steps = _count_steps(matches, noun, f"No shape is {size}.")
        return kind, f"How many {size} shapes are there?", str(len(matches)), steps
    if kind == "more_shapes":
        counts = {s: sum(o.shape == s for o in objects) for s in SHAPES}
        a, b = _pair(rng, counts)
        answer, steps = _compare(counts[a], counts[b], _plural(a), _plural(b))
        return kind, f"Are there more {_plural(a)} than {_plural(b)}?", answer, steps
    if kind == "more_colors":
        counts = {c: sum(o.color == c for o in objects) for c in COLORS}
        a, b = _pair(rng, counts)
        answer, steps = _compare(counts[a], counts[b], f"{a} shapes", f"{b} shapes")
        return kind, f"Are there more {a} shapes than {b} shapes?", answer, steps
    anchor = rng.choice(anchors)
    side = "left" if kind == "left_of" else "right"
    name = f"{anchor.color} {anchor.shape}"
    matches = [o for o in objects if (o.x < anchor.x if side == "left" else o.x > anchor.x)]
    place = objects.index(anchor) + 1
    first = f"The {name} is shape {place} of {len(objects)} from the left."
    noun = "shapes" if len(matches) != 1 else "shape"
    steps = first + "\n" + _count_steps(matches, noun, f"No shape is to its {side}.")
    return kind, f"How many shapes are to the {side} of the {name}?", str(len(matches)), steps


def _pair(rng: random.Random, counts: dict[str, int]) -> tuple[str, str]:
    """Two values to compare. Mostly two with different counts, in either order, so that
    "yes" and "no" come about equally often (ties, always "no", would tip the balance)."""
    pairs = [(a, b) for a in counts for b in counts if a != b]
    unequal = [(a, b) for a, b in pairs if counts[a] != counts[b]]
    return rng.choice(unequal if unequal and rng.random() < 0.8 else pairs)


def _anchors(objects: tuple[SceneObject, ...]) -> list[SceneObject]:
    """Shapes named without ambiguity by color and shape, with every other shape clearly
    to one side (its center at least the anchor's half-width away in x)."""
    out = []
    for o in objects:
        unique = sum(p.color == o.color and p.shape == o.shape for p in objects) == 1
        if unique and all(abs(p.x - o.x) >= o.r for p in objects if p is not o):
            out.append(o)
    return out


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stepcredit_trainer.scenes",
        description="Print StepCredit items (JSON lines) for seeded CLEVR-like scenes.",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--start", type=int, default=0, help="index of the first scene")
    parser.add_argument("--width", type=int, default=224)
    parser.add_argument("--height", type=int, default=168)
    parser.add_argument("--no-system", action="store_true", help="items without the system message")
    parser.add_argument("--save-dir", default=None, help="also write each scene as <id>.png here")
    args = parser.parse_args(argv)
    if not 0 <= args.count <= 100_000:
        print(f"error: --count must lie in [0, 100000], got {args.count}", file=sys.stderr)
        return 2
    try:
        config = SceneConfig(width=args.width, height=args.height)
        scenes = [make_scene(args.seed, args.start + i, config) for i in range(args.count)]
    except (SceneError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for scene in scenes:
        item = scene.item(system_prompt=None if args.no_system else SYSTEM_PROMPT)
        if args.save_dir:
            from pathlib import Path

            folder = Path(args.save_dir)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{item['id']}.png").write_bytes(scene.png)
        try:
            print(json.dumps(item), flush=True)
        except BrokenPipeError:  # `| head`: the reader has all it wants
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (Python's advice: no second error at exit)
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
