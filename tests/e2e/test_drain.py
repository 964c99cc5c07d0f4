"""SIGTERM on a real `stepcredit serve` (tiny random model): a bounded drain, then exit 0.

Plain uvicorn closed its socket at once (new clients: connection refused), waited for
requests in flight without a bound and exited with the signal as its status.
"""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.e2e.processes import serve

ITEM = {
    "id": "q",
    "prompt": "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n",
    "completion": "<think>\nWe add 2 and 3.\n2 + 3 = 5\n</think>\n<answer>5</answer>",
    "references": ["5"],
}


def _heavy_items(n: int) -> list[dict]:
    """Items that keep the tiny model busy for many seconds on a 2-core CPU (about 0.3 s each)."""
    lines = "\n".join(f"Step {i}: we compute {i} plus {i}, which is {2 * i}, and go on" for i in range(60))
    completion = f"<think>\n{lines}\n</think>\n<answer>7</answer>"
    return [{"id": f"h{i}", "prompt": f"Question {i}?", "completion": completion, "references": ["7", "seven"]}
            for i in range(n)]  # fmt: skip


def _metric(base: str, line_start: str) -> str | None:
    for line in httpx.get(f"{base}/metrics", timeout=5).text.splitlines():
        if line.startswith(line_start):
            return line
    return None


def _until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout_s} s")
        time.sleep(0.05)


def test_sigterm_lets_running_work_finish_answers_new_work_503_and_exits_0(tiny_model_path, tmp_path):
    # Each scoring request waits 2.5 s in the batcher for company: a slow request, cheaply.
    args = ["--model", str(tiny_model_path), "--device", "cpu"]
    env = {"STEPCREDIT_BATCH_MAX_WAIT_MS": "2500", "STEPCREDIT_DRAIN_TIMEOUT_S": "30", "STEPCREDIT_API_KEY": None}
    with serve(args, tmp_path / "serve.log", **env) as served, ThreadPoolExecutor(1) as pool:
        base, proc = served.base, served.proc
        slow = pool.submit(httpx.post, f"{base}/v1/score", json={"items": [ITEM]}, timeout=60)
        _until(lambda: _metric(base, "stepcredit_queue_depth ") == "stepcredit_queue_depth 1.0", 10, "queueing")
        proc.send_signal(signal.SIGTERM)
        _until(lambda: httpx.get(f"{base}/ready", timeout=5).status_code == 503, 2, "/ready turning 503")
        assert httpx.get(f"{base}/ready", timeout=5).json()["status"] == "draining"

        refused = httpx.post(f"{base}/v1/score", json={"items": [ITEM]}, timeout=10)  # accepted, then refused
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
        assert int(refused.headers["retry-after"]) >= 1
        assert httpx.get(f"{base}/health", timeout=5).status_code == 200
        assert _metric(base, "stepcredit_draining ") == "stepcredit_draining 1.0"

        answered = slow.result()
        finished = time.monotonic()
        assert answered.status_code == 200, answered.text
        assert answered.json()["results"][0]["status"] == "ok"
        assert proc.wait(timeout=20) == 0
        assert time.monotonic() - finished < 10  # it stopped once the work was done, not at the deadline
    log = served.log.read_text()
    assert "draining: 1 requests in flight" in log and "Application shutdown complete" in log


def test_at_the_drain_deadline_running_items_get_shutting_down_and_the_process_exits_0(tiny_model_path, tmp_path):
    drain_s = 2.0
    args = ["--model", str(tiny_model_path), "--device", "cpu"]
    env = {"STEPCREDIT_DRAIN_TIMEOUT_S": str(drain_s), "STEPCREDIT_API_KEY": None}
    with serve(args, tmp_path / "serve.log", **env) as served, ThreadPoolExecutor(1) as pool:
        base, proc = served.base, served.proc
        items = _heavy_items(64)  # about 20 s of model time: far past the deadline
        heavy = pool.submit(httpx.post, f"{base}/v1/score", json={"items": items}, timeout=120)
        time.sleep(1.0)  # accepted and scoring
        assert not heavy.done(), heavy.result().text
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()

        answered = heavy.result()
        assert drain_s - 0.5 < time.monotonic() - signalled < drain_s + 3
        assert answered.status_code == 200, answered.text
        results = answered.json()["results"]
        assert len(results) == 64
        for result in results:  # every item explicit; none a made-up reward
            assert result["status"] == "error" and result["error"]["code"] == "shutting_down", result
            assert result["mig_reward"] is None and result["outcome_reward"] is None
        assert proc.wait(timeout=drain_s + 15) == 0
        assert time.monotonic() - signalled < drain_s + 10
