"""Real processes: `stepcredit serve` on the embedded SmolLM2 over HTTP, and `stepcredit score`."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.e2e.processes import STEPCREDIT, free_port, serve
ITEM = {
    "id": "e2e",
    "messages": [{"role": "user", "content": "What is 2+3?"}],
    "completion": "<think>\nWe add 2 and 3.\n2 + 3 = 5\n</think>\n<answer>5</answer>",
    "references": ["5", "five"],
}


@pytest.fixture(scope="module")
def server(smol_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with serve(["--device", "cpu"], log, ready_s=240, STEPCREDIT_API_KEY="e2e-key") as served:
        yield served


@pytest.mark.slow
def test_serve_scores_over_http_on_smollm2(server):
    base = server.base
    headers = {"Authorization": "Bearer e2e-key"}
    response = httpx.post(f"{base}/v1/score", json={"items": [ITEM]}, headers=headers, timeout=120)
    assert response.status_code == 200, response.text
    body = response.json()
    (result,) = body["results"]
    assert result["status"] == "ok" and result["correct"] and result["format_ok"] and result["sft_gate"]
    assert len(result["steps"]) == 2 and result["baseline_loglik"] < 0
    assert result["mig_reward"] == pytest.approx(sum(s["gain"] for s in result["steps"]))
    assert body["model"]["name"] == "SmolLM2-135M-Instruct" and body["model"]["dtype"] == "float32"
    assert httpx.post(f"{base}/v1/score", json={"items": [ITEM]}, timeout=30).status_code == 401
    assert httpx.get(f"{base}/metrics", timeout=10).status_code == 401  # behind the key too
    metrics = httpx.get(f"{base}/metrics", headers=headers, timeout=10).text
    assert "stepcredit_ready 1.0" in metrics


@pytest.mark.slow
def test_serve_exits_cleanly_on_sigterm(server):
    proc = server.proc
    proc.send_signal(signal.SIGTERM)
    # A drained stop is a clean exit, not death by signal (an orchestrator reads it).
    assert proc.wait(timeout=60) == 0
    output = server.log.read_text()
    assert "Application shutdown complete" in output
    assert "curl" in output  # it printed how to call it


def test_serve_exits_with_status_1_when_the_model_cannot_load(tmp_path):
    run = subprocess.run(
        [STEPCREDIT, "serve", "--port", str(free_port()), "--model", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1
    assert "not a local HF model folder" in run.stderr


def test_score_cli_writes_one_result_per_line_in_order(tmp_path, tiny_model_path):
    lines = [
        json.dumps({**ITEM, "id": "a"}),
        "{not json",
        json.dumps({"id": "c", "prompt": "x", "references": ["1"]}),  # no completion
        json.dumps({**ITEM, "id": "d", "completion": ITEM["completion"].replace(">5<", ">6<")}),
    ]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(lines) + "\n")
    run = subprocess.run(
        [STEPCREDIT, "score", str(src), "-o", str(out), "--model", str(tiny_model_path), "--device", "cpu", "-q"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["status"] for r in results] == ["ok", "error", "error", "ok"]
    assert [r["id"] for r in results] == ["a", None, "c", "d"]
    assert results[1]["error"]["code"] == results[2]["error"]["code"] == "invalid_item"
    assert "completion" in results[2]["error"]["message"]
    assert results[0]["correct"] and not results[3]["correct"]
    summary = json.loads(run.stderr.strip().splitlines()[-1])
    assert summary["items"] == 4 and summary["items_ok"] == 2 and summary["tokens_forwarded"] > 0


def run_score(src: Path, out: Path, model: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [STEPCREDIT, "score", str(src), "-o", str(out), "--model", str(model), "--device", "cpu", "-q"],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_score_cli_splits_lines_on_newline_only(tmp_path, tiny_model_path):
    # JSON strings may hold these raw; `str.splitlines` would cut the item apart.
    separators = "\u2028\u2029\x85"
    completion = ITEM["completion"].replace("We add 2 and 3.", f"We add 2{separators}and 3.")
    lines = [
        json.dumps({**ITEM, "id": "raw-separators", "completion": completion}, ensure_ascii=False),
        json.dumps({**ITEM, "id": "crlf"}),
        json.dumps({"id": "bad\ud800", "prompt": "x", "references": ["1"]}),  # no completion, odd id
    ]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    # A byte-order mark (some editors write one) is no part of line 1.
    src.write_bytes(b"\xef\xbb\xbf" + (lines[0] + "\n" + lines[1] + "\r\n\n" + lines[2] + "\n").encode("utf-8"))
    assert separators in src.read_text(encoding="utf-8")
    run = run_score(src, out, tiny_model_path)
    assert run.returncode == 0, run.stderr
    results = [json.loads(line) for line in out.read_text(encoding="utf-8").split("\n") if line]
    assert [r["id"] for r in results] == ["raw-separators", "crlf", None]
    assert [r["status"] for r in results] == ["ok", "ok", "error"]
    assert results[0]["correct"] and results[0]["steps"][0]["char_end"] > completion.index(separators)


def test_score_cli_refuses_input_that_is_not_utf8_with_a_message(tmp_path, tiny_model_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(json.dumps(ITEM).encode() + b"\n\xff\xfe{}\n")
    run = run_score(src, out, tiny_model_path)
    assert run.returncode == 1 and "cannot read" in run.stderr and "Traceback" not in run.stderr


def test_score_cli_exits_with_status_1_and_a_message_when_the_model_cannot_load(tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps(ITEM) + "\n")
    run = run_score(src, out, tmp_path / "missing")
    assert run.returncode == 1
    assert "not a local HF model folder" in run.stderr and "Traceback" not in run.stderr
    assert not out.exists()


def test_score_cli_starts_the_scorer_as_serve_does(tmp_path, tiny_model_path, monkeypatch, capsys):
    # In-process, to see the start-up path: `Scorer.start` (backend, verifier pool,
    # warm-up item) is what `serve` runs before it reports ready.
    from stepcredit import cli
    from stepcredit.engine import Scorer

    started = []
    original = Scorer.start

    async def spy(self):
        await original(self)
        started.append(self.ready)

    monkeypatch.setattr(Scorer, "start", spy)
    monkeypatch.setenv("STEPCREDIT_VERIFY_WORKERS", "1")
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps(ITEM) + "\n")
    argv = ["score", str(src), "-o", str(out), "--model", str(tiny_model_path), "--device", "cpu", "-q"]
    assert cli.main(argv) == 0
    assert started == [True]  # started once, warm-up passed
    assert json.loads(out.read_text())["status"] == "ok"

    async def failing_start(self):
        raise RuntimeError("warm-up scoring failed: injected")

    monkeypatch.setattr(Scorer, "start", failing_start)
    assert cli.main(argv) == 1
    assert "warm-up scoring failed: injected" in capsys.readouterr().err
