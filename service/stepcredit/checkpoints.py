"""What a reload (POST /v1/admin/reload) checks before it loads anything.

A trainer saves a checkpoint every N steps and asks the service to score with it:
the paper's likelihoods come from the policy being trained. Only a checkpoint of the
same architecture and tokenizer may replace the model that serves, because queued
items' probes were built with the serving tokenizer and bounded by its context. The
checks here read only the folder's small files (config, safetensors headers,
tokenizer); the swap itself is reload.py's.

Weights are read from safetensors only: a `.bin` file is a pickle, and unpickling a
file a client named could run any code.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .models import weights_revision

__all__ = [
    "Checkpoint",
    "IncompatibleModel",
    "InvalidCheckpoint",
    "ReloadError",
    "ReloadInProgress",
    "ReloadUnsupported",
    "available_memory",
    "check_architecture",
    "inspect_checkpoint",
    "tokenizer_difference",
]

log = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_MAX_WEIGHT_FILES = 10_000
_MAX_ENTRIES = 100_000
_TIED_HEAD = "lm_head.weight"
# Texts whose token ids two tokenizers must agree on: merges, normalization, BOS.
_SAMPLES = (
    "StepCredit checks the tokenizer: 12 + 30 = 42.\n</think>\n<answer>",
    " Hello  World\t\u00e9\u4e2d\U0001f600 \\frac{3}{4}",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
)


class ReloadError(RuntimeError):
    """A reload did not happen; the model that served before still serves."""

    code = "reload_failed"


class InvalidCheckpoint(ReloadError):
    """The folder is not a loadable checkpoint: missing, no config, no safetensors,
    unreadable weights, or weights that score non-finite likelihoods."""

    code = "invalid_checkpoint"


class IncompatibleModel(ReloadError):
    """A checkpoint of another architecture, vocabulary or tokenizer."""

    code = "incompatible_model"


class ReloadInProgress(ReloadError):
    code = "reload_in_progress"


class ReloadUnsupported(ReloadError):
    code = "reload_unsupported"


@dataclass(frozen=True)
class Checkpoint:
    """What a model folder holds, from its small files."""

    path: Path
    config: dict
    tensors: dict[str, tuple[int, ...]] | None
    """Tensor name -> shape from the safetensors headers (None: no safetensors)."""
    has_tokenizer: bool
    fingerprint: str
    """`models.weights_revision` of the folder when it was inspected."""

    @property
    def parameters(self) -> int:
        total = 0
        for shape in (self.tensors or {}).values():
            count = 1
            for dim in shape:
                count *= dim
            total += count
        return total

    def text_config(self) -> dict:
        # Multimodal configs keep the language model's fields one level down.
        nested = self.config.get("text_config")
        return nested if isinstance(nested, dict) else self.config


def inspect_checkpoint(path: Path, *, require_safetensors: bool = True, root: Path | None = None) -> Checkpoint:
    """Read a folder's config, safetensors headers and tokenizer presence (blocking, cheap:
    no tensor data is read). Raises InvalidCheckpoint with the reason."""
    path = Path(path)
    if not path.is_absolute():
        raise InvalidCheckpoint(f"{path}: the path must be absolute (it is read on the service's machine)")
    if root is not None:
        path = _confined(path, Path(root).resolve())
    if not path.is_dir():
        raise InvalidCheckpoint(f"{path} is not a folder on the service's machine")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidCheckpoint(f"{path} has no readable config.json: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise InvalidCheckpoint(f"{path}/config.json is not JSON: {exc}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise InvalidCheckpoint(f"{path}/config.json names no model_type")
    files = sorted(path.glob("*.safetensors"))
    if len(files) > _MAX_WEIGHT_FILES:
        raise InvalidCheckpoint(f"{path} holds {len(files)} safetensors files, limit {_MAX_WEIGHT_FILES}")
    tensors = _read_headers(files) if files else None
    if tensors is None and require_safetensors:
        raise InvalidCheckpoint(
            f"{path} holds no *.safetensors weights; a reload reads safetensors only "
            "(a .bin file is a pickle, and unpickling a file named over HTTP could run code)"
        )
    return Checkpoint(
        path=path,
        config=config,
        tensors=tensors,
        has_tokenizer=any((path / name).is_file() for name in _TOKENIZER_FILES),
        fingerprint=weights_revision(path),
    )


def _confined(path: Path, root: Path) -> Path:
    """`path` resolved, when it and every entry in it stay inside `root`. The loaders
    follow links: a `model.safetensors` or `tokenizer.json` linking out of the root
    would be read as if it were inside. The resolved path is what gets loaded, so a
    link changed after this check does not move the load."""
    resolved = path.resolve()
    outside = "is outside the folder reloads may read from (STEPCREDIT_ADMIN_RELOAD_ROOT)"
    if not resolved.is_relative_to(root):
        raise InvalidCheckpoint(f"{path} {outside}")
    if resolved.is_dir():
        for count, entry in enumerate(resolved.iterdir()):
            if count >= _MAX_ENTRIES:
                raise InvalidCheckpoint(f"{path} holds more than {_MAX_ENTRIES} entries")
            if not entry.resolve().is_relative_to(root):
                raise InvalidCheckpoint(f"{path}/{entry.name} links to a file that {outside}")
    return resolved


def _read_headers(files: list[Path]) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    tensors: dict[str, tuple[int, ...]] = {}
    for file in files:
        try:
            # safe_open checks that the header's offsets fit the file (a truncated write fails here).
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    tensors[name] = tuple(handle.get_slice(name).get_shape())
        except Exception as exc:
            raise InvalidCheckpoint(f"{file.name} is not a readable safetensors file: {exc}") from None
    return tensors


def check_architecture(serving: Checkpoint, new: Checkpoint) -> None:
    """Raise IncompatibleModel unless `new` has the serving model's architecture,
    vocabulary, context and tensors (names and shapes; dtypes may differ)."""
    old_text, new_text = serving.text_config(), new.text_config()
    for key in ("model_type", "architectures"):
        before, after = serving.config.get(key), new.config.get(key)
        if before is not None and after is not None and before != after:
            raise IncompatibleModel(f"{key} is {after!r}, the serving model's is {before!r}")
    if old_text.get("vocab_size") != new_text.get("vocab_size"):
        raise IncompatibleModel(
            f"vocab_size is {new_text.get('vocab_size')}, the serving model's is {old_text.get('vocab_size')}"
        )
    _check_tensors(serving, new)
    # Queued items were checked against the serving model's context: it may grow, not shrink.
    before, after = old_text.get("max_position_embeddings"), new_text.get("max_position_embeddings")
    if isinstance(before, int) and isinstance(after, int) and after < before:
        raise IncompatibleModel(f"max_position_embeddings is {after}, smaller than the serving model's {before}")


def _check_tensors(serving: Checkpoint, new: Checkpoint) -> None:
    if serving.tensors is None or new.tensors is None:
        return
    # A missing tensor would be left at random initialization by the loader, with a warning
    # only; an extra one means another architecture (one more layer, say). The exception is a
    # tied LM head, which some trainers save as a copy of the embeddings and others omit.
    missing = sorted(n for n in serving.tensors.keys() - new.tensors.keys() if not n.endswith(_TIED_HEAD))
    extra = sorted(n for n in new.tensors.keys() - serving.tensors.keys() if not n.endswith(_TIED_HEAD))
    if missing or extra:
        shown = [f"missing {n}" for n in missing[:3]] + [f"unexpected {n}" for n in extra[:3]]
        more = len(missing) + len(extra) - len(shown)
        listed = ", ".join(shown) + (f" and {more} more" if more else "")
        raise IncompatibleModel(f"the checkpoint's tensors are not the serving model's: {listed}")
    for name, shape in serving.tensors.items():
        if name not in new.tensors:
            continue
        if new.tensors[name] != shape:
            raise IncompatibleModel(
                f"tensor {name} has shape {list(new.tensors[name])}, the serving model's {list(shape)}"
            )


def tokenizer_difference(serving, new) -> str | None:
    """How `new` tokenizes differently from `serving`, or None when they agree on the
    vocabulary, the special tokens, the chat template and sample texts."""
    old_vocab, new_vocab = serving.get_vocab(), new.get_vocab()
    if old_vocab != new_vocab:
        changed = sorted(set(old_vocab.items()) ^ set(new_vocab.items()))[:3]
        return f"the vocabularies differ ({len(new_vocab)} vs {len(old_vocab)} tokens; e.g. {changed})"
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "special_tokens_map"):
        before, after = getattr(serving, attr, None), getattr(new, attr, None)
        if before != after:
            return f"{attr} is {after!r}, the serving tokenizer's is {before!r}"
    if getattr(serving, "chat_template", None) != getattr(new, "chat_template", None):
        return "the chat templates differ (items with `messages` would render another prompt)"
    for text in _SAMPLES:
        if serving(text)["input_ids"] != new(text)["input_ids"]:
            return f"the tokenizers split {text!r} differently"
    return None


def available_memory(device) -> int | None:
    """Bytes a second copy of the weights could take on `device` (a torch.device), or
    None when unknown: CUDA's free memory plus what torch's allocator holds unused,
    or the host's MemAvailable."""
    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
