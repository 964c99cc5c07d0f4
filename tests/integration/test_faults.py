"""Faults inside a backend never become numbers: the real tiny-Llama backend is
wrapped so that one batch can come back non-finite, short, or not at all. Every
affected item is a `backend_error`; nothing is a 500 and nothing reads as
"no chain of thought"."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pytest

from stepcredit.api import create_app
from stepcredit.backends.base import Backend, BackendDeadError, BatchLogliks
from stepcredit.backends.hf import HFBackend
from stepcredit.engine import Scorer
from stepcredit.probes import TrajectoryProbes

from .conftest import asgi_client

ITEM = {
    "prompt": "What is 2+3?",
    "completion": "<think>\n2 + 3 = 5\nSo 5.\n</think>\n<answer>5</answer>",
    "references": ["5"],
}


class Faulty(Backend):
    """The real backend, with `corrupt` applied to each batch's results."""

    def __init__(self, inner: HFBackend, corrupt: Callable[[BatchLogliks], BatchLogliks]) -> None:
        self.inner, self.corrupt = inner, corrupt
        self.info, self.tokenizer = inner.info, inner.tokenizer

    async def loglikelihoods(self, batch: Sequence[TrajectoryProbes]) -> BatchLogliks:
        return self.corrupt(await self.inner.loglikelihoods(batch))


@pytest.fixture(scope="module")
def inner(tiny_model_path):
    backend = HFBackend(tiny_model_path, device="cpu")
    yield backend
    backend.shutdown()


async def score_with(inner, settings, verifier, corrupt, items):
    scorer = Scorer(Faulty(inner, corrupt), settings, verifier=verifier)
    scorer.ready = True
    async with asgi_client(create_app(settings, scorer=scorer)) as client:
        return await client.post("/v1/score", json={"items": items})


def _set(value: float, k: int = 1):
    def corrupt(out: BatchLogliks) -> BatchLogliks:
        out.results[0][k][0] = value
        return out

    return corrupt


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
async def test_a_non_finite_likelihood_is_a_backend_error_not_a_gain_of_zero(inner, settings, verifier, value):
    response = await score_with(inner, settings, verifier, _set(value), [ITEM, {**ITEM, "id": "fine"}])
    assert response.status_code == 200
    first, second = response.json()["results"]
    assert first["status"] == "error" and first["error"]["code"] == "backend_error"
    assert "non-finite" in first["error"]["message"] and first["mig_reward"] is None
    assert second["status"] == "ok" and second["mig_reward"] is not None


async def test_a_non_finite_baseline_is_caught_too(inner, settings, verifier):
    response = await score_with(inner, settings, verifier, _set(math.nan, k=0), [ITEM])
    (result,) = response.json()["results"]
    assert result["error"]["code"] == "backend_error"


def _drop_last(out: BatchLogliks) -> BatchLogliks:
    out.results.pop()
    return out


def _drop_probe(out: BatchLogliks) -> BatchLogliks:
    out.results[0].pop()
    return out


def _drop_reference(out: BatchLogliks) -> BatchLogliks:
    out.results[0][0].pop()
    return out


@pytest.mark.parametrize("corrupt", [_drop_last, _drop_probe, _drop_reference])
async def test_short_backend_results_are_errors_never_no_chain_of_thought(inner, settings, verifier, corrupt):
    response = await score_with(inner, settings, verifier, corrupt, [{**ITEM, "id": "a"}, {**ITEM, "id": "b"}])
    assert response.status_code == 200
    results = response.json()["results"]
    failed = [r for r in results if r["status"] == "error"]
    assert failed and all(r["error"]["code"] == "backend_error" for r in failed)
    assert all(r["mig_reward"] is None and r["steps"] == [] for r in failed)
    assert all(r["status"] == "ok" and r["baseline_loglik"] is not None for r in results if r not in failed)


def _explode(out: BatchLogliks) -> BatchLogliks:
    raise ValueError("shape mismatch in a kernel")


async def test_an_exception_inside_a_backend_batch_fails_its_items_not_the_request(inner, settings, verifier):
    no_cot = {**ITEM, "id": "no-cot", "completion": "<answer>5</answer>"}
    response = await score_with(inner, settings, verifier, _explode, [ITEM, no_cot])
    assert response.status_code == 200, response.text
    probed, plain = response.json()["results"]
    assert probed["status"] == "error" and probed["error"]["code"] == "backend_error"
    assert "shape mismatch" in probed["error"]["message"]
    # An item with no chain of thought needs no model: it is still scored.
    assert plain["status"] == "ok" and plain["correct"] is True


def _dead(out: BatchLogliks) -> BatchLogliks:
    raise BackendDeadError("device lost")


async def test_a_dead_backend_is_still_503_and_readiness_goes_false(inner, settings, verifier):
    fatal = []
    scorer = Scorer(Faulty(inner, _dead), settings, verifier=verifier)
    scorer.ready = True
    async with asgi_client(create_app(settings, scorer=scorer, on_fatal=lambda: fatal.append(1))) as client:
        response = await client.post("/v1/score", json={"items": [ITEM]})
    assert response.status_code == 503 and response.json()["error"]["code"] == "backend_dead"
    assert fatal and not scorer.ready


async def test_an_items_verify_timeout_is_capped_by_the_server(inner, settings, verifier):
    from stepcredit.engine import resolve_options
    from stepcredit.protocol import ItemOptions

    capped = settings.model_copy(update={"max_verify_timeout_s": 2.0})
    assert resolve_options(capped, ItemOptions(verify_timeout_s=100)).verify_timeout_s == 2.0
    assert resolve_options(capped, ItemOptions(verify_timeout_s=1)).verify_timeout_s == 1


async def test_a_failing_forward_pass_fails_only_the_trajectories_in_it(inner, settings, verifier, monkeypatch):
    import types

    real = HFBackend._forward

    def flaky(self, group, *args):
        if any(seg.traj == 0 for seg in group):
            raise ValueError("kernel refused this shape")  # not a RuntimeError
        return real(self, group, *args)

    monkeypatch.setattr(inner, "_forward", types.MethodType(flaky, inner))
    long = {**ITEM, "id": "long", "completion": "<think>\n" + "\n".join(f"step {i} adds 0" for i in range(30)) + "\n</think>\n<answer>5</answer>"}
    response = await score_with(inner, settings, verifier, lambda out: out, [ITEM, long])
    assert response.status_code == 200
    first, second = response.json()["results"]
    assert first["error"]["code"] == "backend_error" and "kernel refused" in first["error"]["message"]
    assert second["status"] == "ok" and len(second["steps"]) == 30
