"""Likelihood backends behind one small abstract class."""

from __future__ import annotations

from ..config import Settings
from ..models import resolve_model
from .base import Backend, BackendDeadError, BackendError, BatchLogliks

__all__ = ["Backend", "BackendDeadError", "BackendError", "BatchLogliks", "build_backend"]


def build_backend(settings: Settings) -> Backend:
    """Load the configured backend (blocking: loads the model, or only its tokenizer
    for vllm-remote, which then needs `await backend.start()` to connect)."""
    path = resolve_model(settings.model, settings.cache_dir)
    if settings.backend == "hf":
        from .hf import HFBackend

        return HFBackend(
            path,
            strategy=settings.strategy,
            device=settings.device,
            dtype=settings.dtype,
            max_batch_tokens=settings.max_batch_tokens,
            max_logit_rows=settings.max_logit_rows,
            max_batch_rows=settings.max_batch_rows,
            share_min_tokens=settings.share_min_tokens,
        )
    if settings.backend == "vllm":
        from .vllm_engine import VLLMBackend

        return VLLMBackend(
            path,
            device=settings.device,
            dtype=settings.dtype,
            prefix_reuse=settings.prefix_reuse,
            memory_utilization=settings.vllm_memory_utilization,
            block_size=settings.vllm_block_size,
            max_inflight_batches=settings.max_inflight_batches,
            max_images_per_prompt=settings.max_images_per_item,
        )
    if settings.backend == "vllm-remote":
        from .vllm_remote import VLLMRemoteBackend

        return VLLMRemoteBackend(
            path,
            settings.vllm_url,
            prefix_reuse=settings.prefix_reuse,
            timeout_s=settings.vllm_timeout_s,
            retries=settings.vllm_retries,
            cooloff_s=settings.vllm_cooloff_s,
            max_inflight_batches=settings.max_inflight_batches,
        )
    raise ValueError(f"unknown backend {settings.backend!r}")
