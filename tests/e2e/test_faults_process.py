"""Faults in real processes: a verify worker of a running `stepcredit serve` killed or
hung while it checks an answer. Each affected item gets an explicit result (a timeout
verdict or `verify_failed`), never a made-up reward, and the service then scores
correctly again without a restart. (A remote `vllm serve` killed mid-batch: the last
test of tests/e2e/test_vllm.py, on that file's server.)"""

from __future__ import annotations

import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from tests.e2e.processes import serve

ITEM = {
    "prompt": "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n",
    "completion": "<think>\nWe add 2 and 3.\n2 + 3 = 5\n</think>\n<answer>5</answer>",
    "references": ["5"],
}
# An answer that keeps sympy busy far longer than any timeout used here.
BUSY = {**ITEM, "id": "busy", "completion": ITEM["completion"].replace(">5<", ">10^{10^{10^{10}}}<")}


def post(base: str, items: list[dict], timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{base}/v1/score", json={"items": items}, timeout=timeout)


# ------------------------------------------------------------------ verify workers


@pytest.fixture(scope="module")
def scoring(tiny_model_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("faults") / "serve.log"
    args = ["--model", str(tiny_model_path), "--device", "cpu"]
    with serve(args, log, STEPCREDIT_VERIFY_WORKERS="2") as served:
        served.workers = len(idle_workers(served.proc))
        yield served
        assert served.proc.poll() is None, "a worker fault took the service down"


def pool_workers(server: subprocess.Popen) -> list[psutil.Process]:
    """The service's worker processes (Math-Verify, user patterns): its children started by
    multiprocessing's spawn (the other child is spawn's resource tracker)."""
    workers = []
    for child in psutil.Process(server.pid).children():
        try:
            if "spawn_main" in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                workers.append(child)
        except psutil.NoSuchProcess:
            continue
    return workers


def cpu_seconds(process: psutil.Process) -> float:
    try:
        times = process.cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return times.user + times.system


def idle_workers(server: subprocess.Popen, count: int | None = None, within_s: float = 60) -> list[psutil.Process]:
    """The worker processes once none is busy (a replacement imports its libraries first)
    and, when given, `count` of them."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        workers = pool_workers(server)
        before = [cpu_seconds(w) for w in workers]
        time.sleep(0.5)
        idle = all(cpu_seconds(w) - b < 0.05 for w, b in zip(workers, before))
        if workers and idle and (count is None or len(workers) == count):
            return workers
    pytest.fail(f"no {count or 'set of'} idle workers within {within_s:.0f} s: {pool_workers(server)}")


def busy_worker(server: subprocess.Popen, within_s: float = 30) -> psutil.Process:
    """The worker that is burning CPU on an answer now."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        workers = pool_workers(server)
        before = [cpu_seconds(w) for w in workers]
        # Half a second, a third of it on the CPU: a loaded 2-core machine starves the
        # worker too, and a shorter window missed it for 30 s.
        time.sleep(0.5)
        busy = [w for w, b in zip(workers, before) if cpu_seconds(w) - b > 0.15]
        if len(busy) == 1:
            return busy[0]
    pytest.fail(f"no verify worker got busy within {within_s:.0f} s")


def assert_scores_normally(base: str) -> None:
    response = post(base, [ITEM])
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    assert result["status"] == "ok" and result["correct"] is True and result["verify_timeout"] is False


def test_a_verify_worker_killed_mid_answer_fails_only_that_item_then_the_service_recovers(scoring):
    idle_workers(scoring.proc, scoring.workers)
    busy = {**BUSY, "options": {"verify_timeout_s": 30}}
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post, scoring.base, [busy, {**ITEM, "id": "fine"}])
        victim = busy_worker(scoring.proc)
        killed_at = time.monotonic()
        victim.send_signal(signal.SIGKILL)
        response = pending.result()
    answered_in = time.monotonic() - killed_at
    assert response.status_code == 200, response.text
    failed, fine = response.json()["results"]
    # Explicit: the crash is that item's `verify_failed`, not a wrong answer or a 500.
    assert failed["status"] == "error" and failed["error"]["code"] == "verify_failed", failed
    assert failed["outcome_reward"] is None and failed["mig_reward"] is None
    assert fine["status"] == "ok" and fine["correct"] is True
    assert answered_in < 10, "the request waited for the dead worker's timeout"
    # Recovery: the pool replaced the worker and answers as before.
    replaced = idle_workers(scoring.proc, scoring.workers)
    assert victim.pid not in {w.pid for w in replaced}
    assert_scores_normally(scoring.base)


def test_hung_verify_workers_time_out_explicitly_then_the_service_recovers(scoring):
    # Every worker stopped (SIGSTOP): a hang that no answer of the item causes.
    hung = idle_workers(scoring.proc, scoring.workers)
    for worker in hung:
        worker.send_signal(signal.SIGSTOP)
    try:
        items = [{**ITEM, "id": f"hung-{i}", "options": {"verify_timeout_s": 2}} for i in range(2)]
        started = time.monotonic()
        response = post(scoring.base, items)
        took = time.monotonic() - started
    finally:
        for worker in hung:  # the ones the pool did not replace (pattern workers) go on
            try:
                worker.send_signal(signal.SIGCONT)
            except psutil.NoSuchProcess:
                pass
    assert response.status_code == 200, response.text
    for result in response.json()["results"]:
        # SPEC 6: a timeout is a verdict, not an error; the model's numbers still come back.
        assert result["status"] == "ok" and result["verify_timeout"] is True and result["correct"] is False
        assert result["mig_reward"] is not None and result["outcome_reward"] == 0.0
    assert took < 2 * 2 + 10, f"the hung workers held the request {took:.1f} s"
    # The hung workers that held the items were killed and replaced; the next request is
    # scored normally.
    replaced = idle_workers(scoring.proc, scoring.workers)
    assert {w.pid for w in hung} - {w.pid for w in replaced}, "no hung worker was replaced"
    assert_scores_normally(scoring.base)
