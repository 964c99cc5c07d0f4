"""One request's hostile items cost that request, not everyone (issue 10, item 1): user
regexes run in the pattern workers within a per-request budget, the cost model fails an
over-large item before any model work, and the verifier shares its workers fairly.
Each attack runs beside a normal one-item request, which must be answered promptly."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest

from stepcredit.api import create_app
from stepcredit.backends.base import Backend, BatchLogliks
from stepcredit.backends.hf import HFBackend
from stepcredit.engine import Scorer
from stepcredit.probes import TrajectoryProbes
from stepcredit.verify import VerifierPool

from .conftest import asgi_client

NORMAL = {
    "id": "normal",
    "prompt": "What is 2+3?",
    "completion": "<think>\n2 + 3 = 5\nSo 5.\n</think>\n<answer>5</answer>",
    "references": ["5"],
}
# The attack: `(.*?,){30}x` over a comma text, 20 items in a 6 KB request.
CATASTROPHIC = {
    "prompt": "List things.",
    "completion": "<r>" + "a," * 150 + "</r><a>5</a>",
    "references": ["5"],
    "options": {
        "format": "regex",
        "cot_pattern": r"(.*?,){30}x",
        "answer_pattern": r"<a>(.*?)</a>",
        "probe_prefix": "\nAnswer: ",
    },
}
REGEX_OK = {
    **CATASTROPHIC,
    "id": "regex-ok",
    "options": {**CATASTROPHIC["options"], "cot_pattern": r"<r>(.*?)</r>"},
}
# The tiny model answers a one-item request in well under a second; the attacks took
# 20 s (patterns) and 30 s (verification) before.
PROMPT_S = 3.0


async def post(client, *items, **options):
    body = {"items": list(items)} | ({"options": options} if options else {})
    response = await client.post("/v1/score", json=body)
    assert response.status_code == 200, response.text
    return response.json()["results"]


async def latency_beside(client, attack) -> tuple[float, dict, asyncio.Task]:
    """Send `attack`, then the normal item once the attack is under way."""
    attack_task = asyncio.create_task(attack)
    await asyncio.sleep(0.3)
    t0 = time.monotonic()
    (result,) = await post(client, NORMAL)
    return time.monotonic() - t0, result, attack_task


async def test_catastrophic_regexes_delay_neither_other_requests_nor_their_own_past_the_budget(client, settings):
    attack_started = time.monotonic()
    latency, normal, attack = await latency_beside(
        client, post(client, *({**CATASTROPHIC, "id": f"c{i}"} for i in range(20)))
    )
    assert normal["status"] == "ok"
    assert latency < PROMPT_S
    results = await attack
    assert time.monotonic() - attack_started < settings.max_pattern_s_per_request + PROMPT_S
    assert all(r["status"] == "error" and r["error"]["code"] == "limit_exceeded" for r in results)
    messages = [r["error"]["message"] for r in results]
    assert any("pattern_timeout_s=0.25" in m for m in messages)
    assert sum("max_pattern_s_per_request=1" in m for m in messages) >= 20 - 4


async def test_the_pattern_budget_is_per_request(client):
    hostile = asyncio.create_task(post(client, *({**CATASTROPHIC, "id": f"c{i}"} for i in range(6)), REGEX_OK))
    await asyncio.sleep(0.1)
    (other,) = await post(client, REGEX_OK)
    results = await hostile
    # The hostile request's own good regex item comes after its budget is spent ...
    assert results[-1]["error"]["code"] == "limit_exceeded"
    assert "max_pattern_s_per_request" in results[-1]["error"]["message"]
    # ... while another request's regex item is parsed and scored.
    assert other["status"] == "ok" and other["cot_span"] == [3, 303] and other["correct"]


class Recording(Backend):
    """The real backend, remembering every trajectory it was asked to score."""

    def __init__(self, inner: Backend) -> None:
        self.inner, self.seen = inner, []
        self.info, self.tokenizer = inner.info, inner.tokenizer

    async def loglikelihoods(self, batch: Sequence[TrajectoryProbes]) -> BatchLogliks:
        self.seen.extend(batch)
        return await self.inner.loglikelihoods(batch)


@pytest.fixture(scope="module")
def inner(tiny_model_path):
    backend = HFBackend(tiny_model_path, device="cpu")
    yield backend
    backend.shutdown()


def digits(n: int, seed: int) -> str:
    return "".join(str((i * 7 + seed) % 10) for i in range(n))


async def test_an_item_over_the_probe_token_limit_fails_before_any_model_work(inner, settings, verifier):
    recording = Recording(inner)
    scorer = Scorer(recording, settings, verifier=verifier)  # the default limit on a CPU
    scorer.ready = True
    huge = {
        **NORMAL,
        "id": "huge",
        "completion": "<think>\nstep one\nstep two\nstep three\n</think>\n<answer>5</answer>",
        "references": [digits(2000, 1), digits(2000, 2)],
    }
    async with asgi_client(create_app(settings, scorer=scorer)) as client:
        huge_result, normal = await post(client, huge, NORMAL)
    assert huge_result["status"] == "error" and huge_result["error"]["code"] == "limit_exceeded"
    assert scorer.max_probe_tokens == 1024
    assert huge_result["error"]["message"] == (
        "4 probes x 2 references x 2000 tokens = 16000 probe tokens, limit max_probe_tokens_per_item=1024"
    )
    assert normal["status"] == "ok"
    # The backend saw only the normal item's trajectory.
    assert len(recording.seen) == 1 and all(len(r) <= 2 for r in recording.seen[0].references)


async def test_long_references_with_few_steps_are_scored_under_the_limit(inner, settings, verifier):
    raised = settings.model_copy(update={"max_probe_tokens_per_item": 4096})
    scorer = Scorer(inner, raised, verifier=verifier)
    scorer.ready = True
    long_answer = digits(2000, 3)
    completion = f"<think>\none step\n</think>\n<answer>{long_answer}</answer>"
    item = {**NORMAL, "completion": completion, "references": [long_answer]}
    async with asgi_client(create_app(raised, scorer=scorer)) as client:
        (result,) = await post(client, item)
    assert result["status"] == "ok" and len(result["steps"]) == 1  # 2 probes x 2000 tokens


async def test_slow_answers_of_one_request_do_not_hold_every_verify_worker(inner, settings):
    # Its own pool: the slow answers keep their workers busy until the pool closes.
    pool = VerifierPool(workers=2, timeout_s=5.0)
    pool.start()
    try:
        allowing = settings.model_copy(update={"max_verify_timeout_s": 30.0})
        scorer = Scorer(inner, allowing, verifier=pool)
        scorer.ready = True
        slow = {
            **NORMAL,
            "completion": "<think>\nhuge\n</think>\n<answer>10^{10^{10^{10}}}</answer>",
            "options": {"verify_timeout_s": 30},
        }
        async with asgi_client(create_app(allowing, scorer=scorer)) as client:
            latency, normal, attack = await latency_beside(
                client, post(client, {**slow, "id": "s1"}, {**slow, "id": "s2"})
            )
            assert normal["status"] == "ok" and normal["correct"] is True
            assert latency < PROMPT_S  # before: 30 s, both workers held
            assert not attack.done()
            attack.cancel()  # the client goes away
            with pytest.raises(asyncio.CancelledError):
                await attack
            await asyncio.sleep(0.5)
            # Its waiting answer was dropped, not run for nobody on the worker it waited for.
            assert not pool._held and not pool._waiters
    finally:
        pool.close()
