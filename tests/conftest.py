"""Shared fixtures: the embedded SmolLM2 (converted once) and a tiny random Llama
built with SmolLM2's tokenizer, for fast tests of everything around the model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stepcredit.config import default_cache_dir
from stepcredit.models import ensure_default_model


def cache_dir() -> Path:
    return Path(os.environ.get("STEPCREDIT_CACHE_DIR") or default_cache_dir())


@pytest.fixture(scope="session")
def smol_path() -> Path:
    return ensure_default_model(cache_dir())


@pytest.fixture(scope="session")
def tokenizer(smol_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_path)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer random Llama (head size 64, as vLLM's CPU kernels need) with SmolLM2's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
