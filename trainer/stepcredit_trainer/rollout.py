"""The policy's side: load it, sample G completions per prompt, score its own tokens.

Layout of a batch (generation and the training forward share it): prompts
left-padded to one width, then the completion (forced `response_prefix`
tokens, then the sampled ones, EOS included when sampled) right-padded to
the longest. Completion token t of every row then sits in the same column,
so per-token log-probs come out as one [B, T] tensor.

A vision-language policy (Qwen2-VL, Qwen2.5-VL) sees a problem's images as its
chat template's placeholder, expanded in the prompt ids to one `<|image_pad|>` per
merged patch of the image (what its processor, the service's `vision.py` and vLLM
do), with the image processor's pixel values beside them. `Rollout.prompt` keeps the
unexpanded placeholder: it goes to the service with the images, which expands it
with the same processor. The model's multimodal rotary positions come from
`get_rope_index`, which reads the attention mask, so padding works as for text.
torchvision is not needed: transformers' image auto class falls back to its
Pillow processors (`Qwen2VLImageProcessorPil`).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .tasks import Problem

__all__ = ["ImageInputs", "PolicyVision", "Rollout", "Policy", "load_policy", "resolve_policy_path"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VL_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
"""Vision-language families whose inputs this module builds (the service's `vision.py` reads the same)."""


@dataclass(frozen=True)
class ImageInputs:
    """One problem's images as the model takes them (shared by the rows of its group)."""

    pixel_values: torch.Tensor
    """[patches of all its images, channels * temporal * patch^2], from the image processor."""
    grid_thw: torch.Tensor
    """[images, 3]: each image's patch grid (temporal, height, width)."""


@dataclass(frozen=True)
class PolicyVision:
    """A vision-language policy's image conventions."""

    processor: object
    image_token: str
    image_token_id: int
    merge_size: int
    reserved_ids: tuple[int, ...]
    """The vision tokens (image and video pads, vision start and end): never sampled, as
    the service refuses a completion that holds one and the model would read it as an image slot."""

    def encode(self, problem: Problem) -> ImageInputs:
        """Decode the problem's data URIs and run the image processor, one image at a time
        (the processor concatenates patches across the images of one call)."""
        pixels, grids = [], []
        for k, uri in enumerate(problem.images):
            out = self.processor(images=[_decode(uri, f"{problem.id}: image {k}")], return_tensors="pt")
            pixels.append(out["pixel_values"])
            grids.append(out["image_grid_thw"])
        return ImageInputs(torch.cat(pixels), torch.cat(grids).long())

    def pads(self, grid: Sequence[int]) -> int:
        """Pad tokens of one image of patch grid (temporal, height, width): one per merged patch."""
        t, h, w = grid
        return t * h * w // self.merge_size**2

    def expand(self, prompt: str, images: ImageInputs) -> str:
        """The prompt with each image's placeholder token repeated once per merged patch."""
        pieces = prompt.split(self.image_token)
        if len(pieces) - 1 != len(images.grid_thw):
            raise ValueError(
                f"the chat template rendered {len(pieces) - 1} image placeholders for {len(images.grid_thw)} images"
            )
        out = [pieces[0]]
        for grid, piece in zip(images.grid_thw.tolist(), pieces[1:]):
            out += [self.image_token * self.pads(grid), piece]
        return "".join(out)


def _decode(uri: str, where: str):
    """An inline `data:image/...;base64,` URI as an RGB PIL image (never a fetched URL)."""
    from PIL import Image, UnidentifiedImageError

    head, comma, data = uri.partition(",")
    if not (comma and head.startswith("data:image/") and head.endswith(";base64")):
        raise ValueError(f"{where}: not an inline base64 image data URI ({uri[:40]!r}...)")
    try:
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        image.load()
    except (binascii.Error, UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{where}: undecodable image: {exc}") from None
    return image.convert("RGB")


@dataclass
class Rollout:
    problem: Problem
    prompt: str
    """Chat-templated text the policy saw (what the service is sent as `prompt`)."""
    prompt_ids: list[int]
    """The prompt's ids as the policy reads them (image placeholders expanded)."""
    prefix_ids: list[int]
    """Forced response-prefix tokens: scored by the service, never trained on."""
    sampled_ids: list[int]
    completion: str
    truncated: bool
    """Stopped by max_new_tokens, not by EOS."""
    images: ImageInputs | None = None
    """The problem's images as the policy's model takes them (None: a text problem)."""

    @property
    def completion_ids(self) -> list[int]:
        return self.prefix_ids + self.sampled_ids


def text_only_mismatch(policy: Policy, task: str, problems: Sequence[Problem]) -> str | None:
    """Why `policy` cannot answer these problems (a text-only model on a task with images), or None."""
    if policy.vision is None and any(p.images for p in problems):
        return (
            f"task {task!r} asks about images and policy.model is a text-only model: "
            f"use a vision-language policy ({', '.join(VL_MODEL_TYPES)})"
        )
    return None


def resolve_policy_path(model: str) -> Path:
    """`default` is the service's embedded model folder (converted once); else a local folder."""
    if model == "default":
        try:
            from stepcredit.config import Settings
            from stepcredit.models import ensure_default_model
        except ImportError:
            raise FileNotFoundError(
                "policy.model = 'default' needs the stepcredit service package (for its embedded model); "
                "set policy.model to a local HF model folder instead"
            ) from None
        return ensure_default_model(Settings().cache_dir)
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"policy.model: {path} is not a local HF model folder (no config.json)")
    return path


class Policy:
    def __init__(self, model, tokenizer, device: torch.device, vision: PolicyVision | None = None) -> None:
        self.model, self.tokenizer, self.device, self.vision = model, tokenizer, device, vision
        if tokenizer.eos_token_id is None:
            raise ValueError("the policy's tokenizer has no EOS token: completions could not stop")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def render(self, problem: Problem, system_prompt: str) -> str:
        """The chat-templated prompt; a problem's images come first in its user message, as
        TRL's bare `{"type": "image"}` parts (the template writes its placeholder for each)."""
        content: str | list[dict] = problem.question
        if problem.images:
            if self.vision is None:
                raise ValueError(
                    f"problem {problem.id} has images and the policy is a text-only model: "
                    f"use a vision-language policy ({', '.join(VL_MODEL_TYPES)})"
                )
            content = [{"type": "image"} for _ in problem.images] + [{"type": "text", "text": problem.question}]
        messages = [{"role": "user", "content": content}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode_prompt(self, text: str) -> list[int]:
        """The prompt's ids as the service reads the same text: the tokenizer's special
        tokens, except a BOS the chat template already rendered (never two)."""
        bos = self.tokenizer.bos_token
        add = not (bos and text.startswith(bos))
        return self.tokenizer(text, add_special_tokens=add)["input_ids"]

    def start(self, problem: Problem, prompt: str, prefix_ids: Sequence[int] = ()) -> Rollout:
        """A rollout of `problem` with its rendered `prompt` and `prefix_ids` so far: the
        prompt ids as the policy reads them (image placeholders expanded), its images encoded."""
        images = self.vision.encode(problem) if problem.images and self.vision else None
        ids = self.encode_prompt(self.vision.expand(prompt, images) if images is not None else prompt)
        return Rollout(problem, prompt, ids, list(prefix_ids), [], "", False, images)

    @torch.no_grad()
    def sample(
        self,
        problems: Sequence[Problem],
        *,
        system_prompt: str,
        response_prefix: str,
        group_size: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        greedy: bool = False,
    ) -> list[Rollout]:
        """`group_size` completions per problem, grouped contiguously in problem order."""
        prefix_ids = self.tokenizer(response_prefix, add_special_tokens=False)["input_ids"] if response_prefix else []
        firsts = [self.start(p, self.render(p, system_prompt), prefix_ids) for p in problems]
        starts = [first for first in firsts for _ in range(group_size)]  # continue_from copies each
        return self.continue_from(
            starts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, greedy=greedy
        )

    @torch.no_grad()
    def continue_from(
        self,
        starts: Sequence[Rollout],
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        greedy: bool = False,
    ) -> list[Rollout]:
        """Sample on from each start's prompt + forced `prefix_ids` (its `sampled_ids` are
        ignored): one new rollout per start, in order, the start's prefix forced again.
        The value-proxy check continues chains from each step boundary this way."""
        rows = [s.prompt_ids + s.prefix_ids for s in starts]
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([[self.pad_id] * (width - len(r)) + r for r in rows], device=self.device)
        attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        self.model.eval()
        sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
        output = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=max_new_tokens,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.pad_id,
            **self.image_inputs(starts, input_ids),
            **({"suppress_tokens": list(self.vision.reserved_ids)} if self.vision else {}),
            **sampling,
        )
        rollouts = []
        eos = self.tokenizer.eos_token_id
        for start, generated in zip(starts, output[:, width:].tolist()):
            sampled = generated[: generated.index(eos) + 1] if eos in generated else generated
            completion_ids = start.prefix_ids + sampled
            rollouts.append(
                Rollout(
                    problem=start.problem,
                    prompt=start.prompt,
                    prompt_ids=start.prompt_ids,
                    prefix_ids=list(start.prefix_ids),
                    sampled_ids=sampled,
                    completion=self.tokenizer.decode(completion_ids, skip_special_tokens=False),
                    truncated=eos not in sampled,
                    images=start.images,
                )
            )
        return rollouts

    def layout(self, rollouts: Sequence[Rollout]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(input_ids, attention_mask, completion_ids [B,T], sampled_mask [B,T], prompt width)."""
        width = max(len(r.prompt_ids) for r in rollouts)
        length = max(len(r.completion_ids) for r in rollouts)
        ids, attention, completion, sampled = [], [], [], []
        for r in rollouts:
            left = width - len(r.prompt_ids)
            right = length - len(r.completion_ids)
            ids.append([self.pad_id] * left + r.prompt_ids + r.completion_ids + [self.pad_id] * right)
            attention.append([0] * left + [1] * (len(r.prompt_ids) + len(r.completion_ids)) + [0] * right)
            completion.append(r.completion_ids + [self.pad_id] * right)
            sampled.append([0] * len(r.prefix_ids) + [1] * len(r.sampled_ids) + [0] * right)

        def tensor(rows, dtype=torch.long):
            return torch.tensor(rows, dtype=dtype, device=self.device)

        return tensor(ids), tensor(attention), tensor(completion), tensor(sampled, torch.float32), width

    def image_inputs(self, rollouts: Sequence[Rollout], input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model's image arguments for these rows of `input_ids` (rows in rollout order):
        the images of every row that has some, in row order, and the token types that tell
        the model where they go. Empty for a text-only policy."""
        if self.vision is None:
            return {}
        pads = input_ids == self.vision.image_token_id
        for rollout, row in zip(rollouts, pads.sum(dim=1).tolist()):
            # A row's pads without its pixel values would read as plain tokens: a silent blind rollout.
            grids = rollout.images.grid_thw.tolist() if rollout.images is not None else []
            wanted = sum(map(self.vision.pads, grids))
            if row != wanted:
                raise ValueError(
                    f"problem {rollout.problem.id}: {row} image pad tokens in its ids for images of {wanted} "
                    "(a rollout lost its images, or its prompt ids were not expanded for them)"
                )
        out: dict[str, torch.Tensor] = {"mm_token_type_ids": pads.int()}
        rows = [r.images for r in rollouts if r.images is not None]
        if rows:
            out["pixel_values"] = torch.cat([im.pixel_values for im in rows]).to(self.device)
            out["image_grid_thw"] = torch.cat([im.grid_thw for im in rows]).to(self.device)
        return out

    def token_logprobs(
        self, input_ids, attention_mask, completion_ids, temperature: float, rollouts: Sequence[Rollout] | None = None
    ) -> torch.Tensor:
        """log π(token) of every completion column, [B, T]; grads flow when enabled.

        Logits are divided by the sampling temperature, as TRL does, so the
        ratio compares the distribution the tokens were drawn from (top-p, and for a
        vision-language policy its suppressed vision tokens, aside: the full softmax is
        what is trained). A vision-language policy needs the `rollouts` of these rows
        (their images)."""
        length = completion_ids.shape[1]
        images: dict[str, torch.Tensor] = {}
        if self.vision is None:
            positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        else:
            if rollouts is None or len(rollouts) != input_ids.shape[0]:
                raise ValueError("a vision-language policy needs the rollouts of the rows it scores (their images)")
            images = self.image_inputs(rollouts, input_ids)
            # Multimodal rotary positions [3, B, L], read over the attention mask (left padding skipped).
            positions, _ = self.model.model.get_rope_index(
                input_ids, images["mm_token_type_ids"], images.get("image_grid_thw"), attention_mask=attention_mask
            )
        logits = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            logits_to_keep=length + 1,
            **images,
        ).logits[:, :-1, :]
        logits = logits.float() / temperature
        return torch.log_softmax(logits, dim=-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)


def load_policy(path: Path, device: str = "cpu", dtype: str = "float32") -> Policy:
    """A causal LM, or a vision-language model (Qwen2-VL, Qwen2.5-VL) with its image processor."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = torch.device(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    try:
        model_type = json.loads((Path(path) / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        model_type = None  # from_pretrained says what is wrong with the folder
    if model_type not in VL_MODEL_TYPES:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[dtype]).to(target)
        return Policy(model, tokenizer, target)
    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=_DTYPES[dtype]).to(target)
    try:
        processor = AutoImageProcessor.from_pretrained(path)
    except Exception as exc:  # no preprocessor_config.json, or a processor that needs torchvision
        raise ValueError(
            f"policy.model: {path} is a vision-language model without a usable image processor: {exc}"
        ) from exc
    image_token = "<|image_pad|>"
    image_token_id = model.config.image_token_id
    if tokenizer.convert_tokens_to_ids(image_token) != image_token_id:
        raise ValueError(
            f"policy.model: {path}: the tokenizer's {image_token} is not the model's image_token_id {image_token_id}"
        )
    # The names the service's vision.py reserves; it refuses a tokenizer without them, so do we.
    vocab = tokenizer.get_vocab()
    names = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    if missing := [t for t in names if t not in vocab]:
        raise ValueError(f"policy.model: {path}: the tokenizer lacks the vision tokens {missing}")
    reserved = tuple(vocab[t] for t in names)
    vision = PolicyVision(processor, image_token, image_token_id, int(getattr(processor, "merge_size", 2)), reserved)
    return Policy(model, tokenizer, target, vision)
