"""Probes of items with images on the tiny Qwen2-VL (tests/conftest.py), built the way the
engine builds them (vision.py expands each image, probes.py cuts the steps), for the vLLM
backends' tests and benchmarks."""

from __future__ import annotations

import base64
import hashlib
import io

from PIL import Image, ImageDraw

from stepcredit.probes import ProbeImage, ProbeMedia, TrajectoryProbes, text_probes

PREFIX = "\n</think>\n<answer>"
REFERENCES = ["3", "three"]


def scene(seed: int = 0, size: tuple[int, int] = (150, 100)) -> Image.Image:
    """A few colored shapes on grey (different seeds, different pictures)."""
    image = Image.new("RGB", size, (240, 240, 240))
    draw = ImageDraw.Draw(image)
    for k in range(3):
        x, y = (17 * (seed + k) + 10 * k) % (size[0] - 40), (29 * (seed + 2 * k)) % (size[1] - 40)
        color = ((90 * (seed + k)) % 256, (60 * k + 40 * seed) % 256, (150 + 30 * k) % 256)
        (draw.ellipse if (seed + k) % 2 else draw.rectangle)((x, y, x + 35, y + 35), fill=color)
    return image


def probe_image(image: Image.Image, grid, pixel_values) -> ProbeImage:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    return ProbeImage(uri, image, hashlib.sha256(data).hexdigest(), tuple(grid), pixel_values)


def vl_probes(tokenizer, vision, images, steps: int = 6, question: str = "How many shapes?") -> TrajectoryProbes:
    """One trajectory of `steps` steps about `images` (none: a text-only item on the VL model)."""
    parts = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": parts}], tokenize=False, add_generation_prompt=True
    )
    media = None
    if images:
        processed = vision.process(images)
        prompt = vision.place(prompt, [p.grid_thw for p in processed])
        media = ProbeMedia(tuple(probe_image(im, p.grid_thw, p.pixel_values) for im, p in zip(images, processed)))
    lines = [f"Shape {k + 1} is there, so the count is {k + 1}." for k in range(steps)]
    completion = "<think>\n" + "\n".join(lines) + "\n</think>\n<answer>3</answer>"
    cuts, at = [len("<think>\n")], len("<think>\n")
    for line in lines:
        at += len(line)
        cuts.append(at)
        at += 1
    return text_probes(tokenizer, prompt, completion, cuts, PREFIX, REFERENCES, media=media)
