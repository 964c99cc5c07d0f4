"""What a vision-language scorer needs before any model work: images -> placeholder tokens.

The service tokenizes every probe itself, so the image placeholders are expanded here, on
the prepare thread, with the model folder's own image processor: one `<|image_pad|>` per
merged patch (grid_t * grid_h * grid_w / merge^2), between `<|vision_start|>` and
`<|vision_end|>`, exactly as the model's processor (and vLLM's) would. The processor also
gives the pixel values the hf backend encodes, once per trajectory.

Supported families: Qwen2-VL and Qwen2.5-VL (multimodal rotary positions, see hf.py). A
model folder without a vision tower has no `Vision`; its items with images fail with
`images_unsupported`.

transformers' image processors come in a torchvision and a Pillow flavour; the auto class
falls back to the Pillow one (`Qwen2VLImageProcessorPil`) where torchvision is missing, as
on this project's CPU machines.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .probes import ProbeError

__all__ = ["Vision", "ProcessedImage", "load_vision", "VL_MODEL_TYPES", "GENERIC_PLACEHOLDER"]

VL_MODEL_TYPES = {"qwen2_vl", "qwen2_5_vl"}

GENERIC_PLACEHOLDER = "<image>"
"""What verl and LLaVA-style prompts write where an image goes; read as the model's own."""


@dataclass(frozen=True)
class ProcessedImage:
    pixel_values: object
    """numpy array [patches, channels * temporal * patch^2], as the image processor gives it."""
    grid_thw: tuple[int, int, int]


@dataclass(frozen=True)
class Vision:
    """One vision-language model's image conventions."""

    processor: object
    image_token: str
    image_token_id: int
    placeholder: str
    """What the chat template writes for one image, before expansion."""
    merge_size: int
    model_type: str
    reserved: tuple[str, ...] = ()
    """Every vision special token (image and video pads, start and end): text may hold
    them only where the placeholders put them."""
    reserved_ids: frozenset[int] = frozenset()

    def tokens_per_image(self, grid_thw: Sequence[int]) -> int:
        t, h, w = grid_thw
        return t * h * w // (self.merge_size**2)

    def process(self, images: Sequence[object]) -> list[ProcessedImage]:
        """Pixel values and patch grid of each (decoded, RGB) image."""
        out = []
        for image in images:  # one at a time: the processor concatenates patches across images
            try:
                batch = self.processor(images=[image], return_tensors="np")
            except Exception as exc:  # a processor may refuse an aspect ratio (Qwen: 200:1)
                raise ProbeError("invalid_image", f"the model's image processor refused an image: {exc}") from None
            grid = tuple(int(x) for x in batch["image_grid_thw"][0])
            out.append(ProcessedImage(batch["pixel_values"], grid))
        return out

    def check_text(self, text: str, field: str) -> None:
        """Text the policy or the trainer wrote (a completion, a reference) may not hold
        vision tokens: they would stand for pixels no image gives."""
        for token in self.reserved:
            if token in text:
                raise ProbeError("invalid_item", f"{field} holds the vision token {token!r}, which only an image may fill")

    def place(self, prompt: str, grids: Sequence[Sequence[int]], generic: bool = False) -> str:
        """The prompt with each image's placeholder expanded to its pad tokens. The prompt
        marks each image with the model's placeholder (or, where `generic`, a raw `prompt`
        sent with images, `<image>`), exactly once per image; no other vision token."""
        text = prompt.replace(GENERIC_PLACEHOLDER, self.placeholder) if generic else prompt
        found = text.count(self.placeholder)
        others = [t for t in self.reserved if text.count(t) != (found if t in self.placeholder else 0)]
        if found != len(grids) or others:
            marks = f"{found} image place{'s' if found != 1 else ''}"
            if others:
                marks += f" and stray vision tokens {others}"
            how = f"write {self.placeholder!r}" + (f" (or {GENERIC_PLACEHOLDER!r})" if generic or not grids else "")
            raise ProbeError(
                "invalid_item",
                f"the prompt marks {marks} for {len(grids)} image{'s' if len(grids) != 1 else ''}: "
                f"{how} once where each image goes, in order, and no other vision token",
            )
        if not grids:
            return text
        pieces = text.split(self.image_token)
        out = [pieces[0]]
        for grid, piece in zip(grids, pieces[1:], strict=True):
            out.append(self.image_token * self.tokens_per_image(grid))
            out.append(piece)
        return "".join(out)


def _config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def is_vision_model(path: Path | str) -> bool:
    return _config(Path(path)).get("model_type") in VL_MODEL_TYPES


def load_vision(path: Path | str, tokenizer) -> Vision | None:
    """The model's `Vision`, or None for a text-only model. Raises ValueError for a
    vision-language folder StepCredit cannot feed (no image processor, unknown tokens)."""
    path = Path(path)
    config = _config(path)
    if config.get("model_type") not in VL_MODEL_TYPES:
        return None
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(path)
    except Exception as exc:
        raise ValueError(f"{path}: a vision-language model without a usable image processor: {exc}") from exc
    vocab = tokenizer.get_vocab()
    names = {"image": "<|image_pad|>", "start": "<|vision_start|>", "end": "<|vision_end|>", "video": "<|video_pad|>"}
    missing = [token for token in names.values() if token not in vocab]
    if missing:
        raise ValueError(f"{path}: the tokenizer lacks the vision tokens {missing}")
    image_id = config.get("image_token_id", vocab[names["image"]])
    if vocab[names["image"]] != image_id:
        raise ValueError(f"{path}: the tokenizer's {names['image']} is {vocab[names['image']]}, the model's {image_id}")
    merge = int(getattr(processor, "merge_size", None) or config.get("vision_config", {}).get("spatial_merge_size", 2))
    return Vision(
        processor=processor,
        image_token=names["image"],
        image_token_id=int(image_id),
        placeholder=names["start"] + names["image"] + names["end"],
        merge_size=merge,
        model_type=config["model_type"],
        reserved=tuple(names.values()),
        reserved_ids=frozenset(vocab[token] for token in names.values()),
    )
