"""The HF backend on other dtypes and on CUDA (skipped without a GPU)."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.workload import varied_items

from .test_packed_equivalence import assert_same, score_both

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is visible")


async def test_bfloat16_scores_are_finite_and_near_float32(tiny_model_path, settings, verifier):
    from stepcredit.backends.hf import HFBackend
    from stepcredit.engine import Scorer
    from stepcredit.protocol import ScoreItem

    items = [ScoreItem(**i) for i in varied_items(seed=5)[:4]]
    runs = {}
    for dtype in ("float32", "bfloat16"):
        backend = HFBackend(tiny_model_path, device="cpu", dtype=dtype)
        runs[dtype] = await Scorer(backend, settings, verifier=verifier).score(items)
        assert backend.info.dtype == dtype
    for a, b in zip(runs["float32"].results, runs["bfloat16"].results):
        for sa, sb in zip(a.steps, b.steps):
            assert math.isfinite(sb.loglik)
            assert sb.loglik == pytest.approx(sa.loglik, abs=0.1)


@needs_cuda
async def test_packed_equals_per_prefix_on_cuda_in_float32(tiny_model_path, settings, verifier):
    packed, reference = await score_both(tiny_model_path, settings, verifier, varied_items(seed=11), device="cuda")
    assert_same(packed, reference)


@needs_cuda
async def test_cuda_matches_cpu_in_float32(tiny_model_path, settings, verifier):
    items = varied_items(seed=12)
    cuda, _ = await score_both(tiny_model_path, settings, verifier, items, device="cuda")
    cpu, _ = await score_both(tiny_model_path, settings, verifier, items)
    for a, b in zip(cuda.results, cpu.results):
        for sa, sb in zip(a.steps, b.steps):
            assert sa.loglik == pytest.approx(sb.loglik, abs=2e-3)
