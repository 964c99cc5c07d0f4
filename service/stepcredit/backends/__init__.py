"""Likelihood backends behind one small abstract class."""

from __future__ import annotations

from ..config import Settings
from ..models import resolve_model
from .base import Backend, BackendDeadError, BackendError, BatchLogliks

__all__ = ["Backend", "BackendDeadError", "BackendError", "BatchLogliks", "build_backend"]


def build_backend(settings: Settings) -> Backend:
    """Load the configured backend (blocking: loads the model)."""
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
        )
    raise ValueError(f"unknown backend {settings.backend!r}")
