"""The visual task: seeded CLEVR-like scenes drawn with Pillow, their questions and
answers, and the StepCredit items and trainer problems built from them.

The answers are checked twice over, against oracles that share no code with the
generator: the objects are read back from the pixels, and every question is parsed
from its text and answered from those objects."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from stepcredit_trainer import scenes
from stepcredit_trainer.config import TaskConfig
from stepcredit_trainer.scenes import COLORS, SceneConfig, SceneError, make_scene, make_scenes
from stepcredit_trainer.tasks import SCENE_TASK, TaskError, load_problems, load_split

WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()


def pixel_objects(image: Image.Image) -> list[tuple[str, str, int, int]]:
    """(color, shape, width, center x) of every shape in the picture, read from its
    pixels alone: one connected region of one exact palette color per shape; its shape
    from how much of its bounding box it fills (square ~1, circle ~pi/4, triangle ~1/2)."""
    pixels = np.asarray(image.convert("RGB"))
    found = []
    for name, rgb in COLORS.items():
        regions, n = ndimage.label((pixels == rgb).all(axis=-1))
        for box in ndimage.find_objects(regions):
            ys, xs = box
            width = xs.stop - xs.start
            fill = (regions[box] > 0).mean()
            shape = "square" if fill > 0.95 else "circle" if fill > 0.65 else "triangle"
            found.append((name, shape, width, (xs.start + xs.stop - 1) / 2))
    return sorted(found, key=lambda o: o[3])


def answer_from_question(question: str, objects: list[dict]) -> str:
    """Each question kind parsed from its text and answered from the object list."""
    def count(**want) -> int:
        return sum(all(o[k] == v for k, v in want.items()) for o in objects)

    if m := re.fullmatch(r"How many (\w+) shapes are there\?", question):
        word = m[1]
        return str(count(size=word) if word in ("small", "large") else count(color=word))
    if m := re.fullmatch(r"How many (\w+)s are there\?", question):
        return str(count(shape=m[1]))
    if m := re.fullmatch(r"How many (\w+) (\w+)s are there\?", question):
        return str(count(color=m[1], shape=m[2]))
    if m := re.fullmatch(r"Are there more (\w+)s than (\w+)s\?", question):
        return "yes" if count(shape=m[1]) > count(shape=m[2]) else "no"
    if m := re.fullmatch(r"Are there more (\w+) shapes than (\w+) shapes\?", question):
        return "yes" if count(color=m[1]) > count(color=m[2]) else "no"
    if m := re.fullmatch(r"How many shapes are to the (left|right) of the (\w+) (\w+)\?", question):
        (anchor,) = [o for o in objects if o["color"] == m[2] and o["shape"] == m[3]]  # named uniquely
        others = [o for o in objects if o is not anchor]
        # Unambiguous: every other shape's center is clearly to one side.
        assert all(abs(o["x"] - anchor["x"]) >= anchor["r"] for o in others)
        side = [o for o in others if (o["x"] < anchor["x"]) == (m[1] == "left")]
        return str(len(side))
    raise AssertionError(f"a question no oracle reads: {question!r}")


SCENES = make_scenes(11, 120)


def test_same_seed_and_index_give_the_same_png_bytes_in_a_fresh_interpreter():
    code = (
        "import hashlib, sys; from stepcredit_trainer.scenes import make_scene;"
        "s = make_scene(11, 7); sys.stdout.write(hashlib.sha256(s.png).hexdigest() + '|' + s.question)"
    )
    # A fresh interpreter with another hash seed: nothing may depend on str hashing or state.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout  # fmt: skip
    import hashlib

    assert out == hashlib.sha256(SCENES[7].png).hexdigest() + "|" + SCENES[7].question
    assert make_scene(11, 7) == SCENES[7]
    # Scene i does not depend on the ones before it, nor seed s+1 on seed s shifted (reasoning-gym's seed + i).
    assert make_scene(12, 6).png != SCENES[7].png and make_scene(11, 8).png != SCENES[7].png
    assert len({s.png for s in SCENES}) == len(SCENES)


def test_the_pixels_show_exactly_the_listed_objects():
    radii = SceneConfig().radii
    for scene in SCENES:
        image = scene.image
        assert image.size == (224, 168) and image.mode == "RGB"
        seen = pixel_objects(image)
        listed = [(o.color, o.shape, 2 * o.r + 1, o.x) for o in scene.objects]
        assert [(c, s, x) for c, s, _, x in seen] == [(c, s, x) for c, s, _, x in listed], scene.index
        # Sizes read from the pixels: a large shape is clearly wider than a small one.
        for (_, _, width, _), o in zip(seen, scene.objects):
            assert abs(width - (2 * radii[o.size] + 1)) <= 2 * round(radii[o.size] * 0.12) + 1
        # Nothing else is drawn: every pixel is the background or a palette color.
        pixels = np.asarray(image).reshape(-1, 3)
        allowed = np.array([scenes.BACKGROUND, *COLORS.values()])
        assert (pixels[:, None, :] == allowed[None]).all(-1).any(-1).all()


def test_every_answer_is_right_for_the_drawn_objects():
    kinds = set()
    for scene in SCENES:
        objects = [vars(o) for o in scene.objects]
        assert scene.answers[0] == answer_from_question(scene.question, objects), (scene.index, scene.question)
        kinds.add(scene.kind)
    assert kinds == set(scenes.QUESTION_KINDS)  # the sample covers every kind of question


def test_answers_come_with_their_variants_and_verify_as_equal():
    from stepcredit.reading import first_match

    for scene in SCENES[:40]:
        gold = scene.answers[0]
        if gold in ("yes", "no"):
            assert scene.answers == (gold, gold.capitalize())
        else:
            assert scene.answers == (gold, WORDS[int(gold)])
        # Each form is graded right against the references, the other yes/no answer wrong.
        for form in scene.answers:
            assert first_match(form, list(scene.answers)) is not None, (form, scene.answers)
        wrong = {"yes": "no", "no": "yes"}.get(gold) or str(int(gold) + 1)
        assert first_match(wrong, list(scene.answers)) is None


def test_worked_solution_is_one_step_per_line_in_the_think_answer_format():
    from stepcredit.structure import parse_structure, split_steps

    for scene in SCENES[:60]:
        completion = scene.completion()
        structure = parse_structure(completion, "think_answer")
        assert structure.format_ok and structure.answer == scene.answers[0]
        lines = scene.solution.splitlines()
        spans, _ = split_steps(completion, structure.cot_span)  # the service's own step split
        assert [completion[a:b].strip() for a, b in spans] == lines
        gold = scene.answers[0]
        if gold in ("yes", "no"):
            assert ("so there are more" in lines[-1]) == (gold == "yes")
            continue
        counted = lines[1:-1] if scene.kind in ("left_of", "right_of") else lines[:-1]
        if gold != "0":  # one line per counted shape, numbered 1..n, then the total
            assert [line.rsplit(": ", 1)[1] for line in counted] == [str(i) for i in range(1, int(gold) + 1)]
        assert re.fullmatch(rf"There (is|are) {gold} .+\.", lines[-1])


def decode(uri: str) -> Image.Image:
    head, _, data = uri.partition(",")
    assert head == "data:image/png;base64"
    return Image.open(io.BytesIO(base64.b64decode(data, validate=True)))


def test_items_have_the_interface_shape():
    scene = SCENES[0]
    item = scene.item()
    assert set(item) == {"id", "messages", "completion", "references"}
    system, user = item["messages"]
    assert system == {"role": "system", "content": scenes.SYSTEM_PROMPT}
    image_part, text_part = user["content"]
    assert image_part["type"] == "image_url" and text_part == {"type": "text", "text": scene.question}
    image = decode(image_part["image_url"]["url"])
    assert image.format == "PNG" and image.size == (224, 168)
    assert decode(scene.data_uri()).tobytes() == scene.image.tobytes()
    assert item["references"] == list(scene.answers) and item["completion"] == scene.completion()
    assert scene.item(system_prompt=None)["messages"] == [user]
    assert scene.item("<think>\nguess\n</think>\n<answer>7</answer>")["completion"].endswith("<answer>7</answer>")
    json.dumps(item)  # the wire form


def test_items_pass_the_services_parsing_and_image_checks():
    from stepcredit import media
    from stepcredit.config import Settings
    from stepcredit.protocol import ScoreItem

    item = ScoreItem.model_validate(SCENES[3].item())
    (ref,) = media.item_images(item, Settings().limits(), "items[0]")
    assert (ref.width, ref.height, ref.mime) == (224, 168, "image/png") and ref.data == SCENES[3].png


def test_cli_prints_one_item_per_line(capsys, tmp_path):
    assert scenes.main(["--seed", "11", "--count", "3", "--start", "5", "--save-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in lines] == [s.item() for s in SCENES[5:8]]
    assert (tmp_path / "scene-11-5.png").read_bytes() == SCENES[5].png
    assert scenes.main(["--count", "1", "--width", "10"]) == 2
    assert "width" in capsys.readouterr().err


def test_bad_configs_are_errors_naming_the_field():
    with pytest.raises(ValueError, match="max_objects"):
        SceneConfig(min_objects=5, max_objects=3)
    with pytest.raises(ValueError, match="questions"):
        SceneConfig(questions=("count_colour",))
    with pytest.raises(SceneError, match="cannot place 12 shapes"):
        make_scene(0, 0, SceneConfig(width=56, height=56, min_objects=12, max_objects=12))
    only = SceneConfig(questions=("more_shapes",))
    assert {make_scene(3, i, only).kind for i in range(10)} == {"more_shapes"}


def test_yes_and_no_are_balanced_and_counts_are_mostly_nonzero():
    answers = [s.answers[0] for s in make_scenes(2, 400, SceneConfig(questions=("more_shapes", "more_colors")))]
    assert 0.35 < answers.count("yes") / len(answers) < 0.65
    counts = [s.answers[0] for s in make_scenes(2, 400, SceneConfig(questions=("count_color", "count_shape")))]
    assert counts.count("0") / len(counts) < 0.25


# --------------------------------------------------------------------------- the trainer's task


def scene_task(**kw) -> TaskConfig:
    return TaskConfig(name=SCENE_TASK, params=kw.pop("params", {}), train_size=40, eval_size=10, **kw)


def test_the_scene_task_yields_problems_carrying_their_image():
    train, held_out = load_split(scene_task(), "train"), load_split(scene_task(), "eval")
    assert len(train) == 40 and len(held_out) == 10
    first = train[0]
    assert first.id == f"{SCENE_TASK}-train-1-0"
    scene = make_scene(1, 0)
    assert (first.question, first.references, first.images) == (scene.question, scene.answers, (scene.data_uri(),))
    assert not {p.key for p in train} & {p.key for p in held_out}
    # The same question about another picture is another problem (a text-only key would drop it).
    assert len({p.key for p in train}) == 40 and len({p.question for p in train}) < 40
    assert load_split(scene_task(), "train") == train  # seeded
    (worked,) = load_problems(scene_task(), 3, 1, "answer_cot")
    assert worked.solution == make_scene(3, 0).solution and worked.images == (make_scene(3, 0).data_uri(),)


def test_scene_task_params_are_checked():
    small = load_split(scene_task(params={"width": 112, "height": 112, "max_objects": 3}), "train")
    assert decode(small[0].images[0]).size == (112, 112)
    with pytest.raises(TaskError, match=r"task.params: 'clevr_count' takes .*min_terms"):
        load_split(TaskConfig(name=SCENE_TASK), "train")  # chain_sum's default params
    with pytest.raises(TaskError, match="cannot place"):
        load_split(scene_task(params={"width": 56, "height": 56, "min_objects": 12, "max_objects": 12}), "train")


def test_text_tasks_carry_no_images_and_keep_their_question_as_key():
    (problem,) = load_split(TaskConfig(train_size=1, eval_size=1), "train")
    assert problem.images == () and problem.key == problem.question
