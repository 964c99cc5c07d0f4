"""Images in vLLM prompts: what both vLLM backends (`vllm`, `vllm-remote`) send with a
probe of a trajectory that has images. Pure code, no engine.

Placeholders. The service's probes hold each image already expanded, one
`<|image_pad|>` per merged patch (vision.py). vLLM 0.32 expands a token prompt that
comes with `multi_modal_data` itself, always: its multimodal processor replaces every
match of the model's target (one `<|image_pad|>` for Qwen2-VL) with the full run, and
never checks whether the prompt is expanded already. Sent expanded, an image of N pads
becomes 2N - 1 (measured: 20 pads came back as 39, the prompt 19 tokens longer), so
every row after the image would be read at the wrong position. Each run of pads is
therefore collapsed to one pad before sending, and vLLM's expansion is checked against
ours on every answer (its length; in-process, the ids).

Identity. Each image goes with `uuid` = the sha256 of its bytes, so vLLM hashes no
pixels: its processor cache and encoder cache serve every probe of the trajectory after
the first, and the prefix cache's block hashes (which include the hashes of the images
a block covers) match across them.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path

from ..probes import TrajectoryProbes
from .base import BackendError

__all__ = ["collapse_images", "check_expansion", "content_parts", "route_key", "vllm_vision_problem"]


def collapse_images(prompt: Sequence[int], image_token_id: int, tokens: Sequence[int]) -> list[int]:
    """`prompt` (a probe context + a reference) with each image's run of pad tokens cut to
    one pad, as vLLM wants it. `tokens[i]`: the pads image i must have. A run that is not
    an image's exact size (a pad token in the completion or a reference, a run that
    another tokenizer split) is an error, never a guess."""
    out: list[int] = []
    runs: list[int] = []
    for token in prompt:
        if token == image_token_id:
            if out and out[-1] == image_token_id:
                runs[-1] += 1
                continue
            runs.append(1)
        out.append(token)
    if runs != list(tokens):
        raise BackendError(
            f"a probe holds image pad runs of {runs} tokens where its {len(tokens)} image(s) take "
            f"{list(tokens)}: a pad token outside the images cannot be sent to vLLM"
        )
    return out


def check_expansion(got: int, want: int, where: str) -> None:
    """vLLM's expanded prompt must be ours, token for token, or every row is misread."""
    if got != want:
        raise BackendError(
            f"{where} expanded this probe's images to a {got}-token prompt, the service's image processor to "
            f"{want}: both must read the same model folder (preprocessor_config.json: min_pixels, max_pixels)"
        )


def content_parts(media) -> list[dict]:
    """A trajectory's images (`TrajectoryProbes.media`) as `/inference/v1/generate` takes
    them beside `token_ids`; vLLM's server resolves only `type`, `url` and `uuid`."""
    return [{"type": "image_url", "url": image.data_uri, "uuid": image.digest} for image in media.images]


def route_key(traj: TrajectoryProbes, image_token_id: int | None) -> list[int]:
    """The trunk as the router should compare it: each image's pads replaced by a token of
    its own (negative, so no real token), so that trajectories with the same text but
    other images are not counted as sharing the prefix cache past their first image."""
    media = getattr(traj, "media", None)
    if media is None or image_token_id is None:
        return traj.trunk
    marks = iter(-1 - int(image.digest[:8], 16) for image in media.images)
    out, mark = [], None
    for token in traj.trunk:
        if token == image_token_id:
            if mark is None:
                mark = next(marks, -1)
            out.append(mark)
        else:
            mark = None
            out.append(token)
    return out


def vllm_vision_problem(path: Path, model_type: str) -> str | None:
    """Why this vLLM cannot run the vision-language model in `path` (None: it can): the
    two things vLLM needs that this service does not, tried the way vLLM does them.

    vLLM 0.32's Qwen2-VL and Qwen2.5-VL modules import transformers' torchvision image
    processor at import time, and vLLM builds the model's HF processor, which loads the
    torchvision video processor: without a torchvision built for the installed torch
    (none is, for the CPU torch this project pins), the engine cannot even inspect the
    model class ("Model architectures [...] failed to be inspected")."""
    try:
        importlib.import_module(f"vllm.model_executor.models.{model_type}")
    except Exception as exc:  # whatever vLLM's model module fails to import
        return f"vLLM cannot import its {model_type} model: {type(exc).__name__}: {exc}"
    try:
        import transformers

        getattr(transformers, _PROCESSORS[model_type]).from_pretrained(path)
    except Exception as exc:  # the processor vLLM builds, as it builds it
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"transformers cannot build the {_PROCESSORS[model_type]} vLLM uses: {type(exc).__name__}: {first}"
    return None


_PROCESSORS = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}
