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


# Qwen2-VL's chat template, in short: an image part (OpenAI `image_url` or TRL's bare
# `image`) becomes the vision placeholder the processor expands to one pad per merged patch.
VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def vl_tokenizer(smol: Path):
    """SmolLM2's tokenizer with the vision tokens and the Qwen2-VL-style chat template, and
    the config fields naming those tokens (what every test and benchmark VL model shares)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol)
    tok.add_tokens(VISION_TOKENS, special_tokens=True)
    tok.chat_template = VL_CHAT_TEMPLATE
    ids = {t: tok.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    tokens = dict(
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )  # fmt: skip
    return tok, tokens


def build_tiny_vl(path: Path, smol: Path, family: str = "qwen2_vl") -> Path:
    """A 2-layer random Qwen2-VL (vision tower of 2 blocks, head size 64, mrope sections
    summing to head_dim / 2) with SmolLM2's tokenizer plus the vision tokens, and the
    torchvision-free image processor (`Qwen2VLImageProcessorPil`), sized so an image is at
    most 64 merged patches."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok, tokens = vl_tokenizer(smol)
    torch.manual_seed(0)
    text = dict(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, max_position_embeddings=4096, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 10000.0},
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    vision = dict(
        depth=2, embed_dim=64, num_heads=2, hidden_size=128, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
        temporal_patch_size=2, in_channels=3,
    )  # fmt: skip
    if family == "qwen2_5_vl":  # windowed vision attention with full-attention blocks between
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        vision = dict(
            depth=4, hidden_size=64, out_hidden_size=128, intermediate_size=128, num_heads=2, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=56, fullatt_block_indexes=[1, 3],
        )  # fmt: skip
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **tokens)
        model = Qwen2_5_VLForConditionalGeneration(config)
    else:
        config = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **tokens)
        model = Qwen2VLForConditionalGeneration(config)
    model.eval().save_pretrained(path)
    tok.save_pretrained(path)
    Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_vl_path(tmp_path_factory, smol_path) -> Path:
    return build_tiny_vl(tmp_path_factory.mktemp("tiny-qwen2-vl"), smol_path)
