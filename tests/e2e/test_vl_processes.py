"""Items with images through real processes on the tiny random Qwen2-VL: `stepcredit serve`
over HTTP and `stepcredit score` on a JSONL file, with the fields of a text item."""

from __future__ import annotations

import json
import os
import subprocess

import httpx
from stepcredit_trainer.scenes import make_scene

from tests.e2e.processes import STEPCREDIT, serve


def items() -> list[dict]:
    image = make_scene(2).item()
    text = {**image, "id": "text", "messages": [{"role": "user", "content": "How many shapes are there?"}]}
    return [image, text]


def check(results: list[dict]) -> None:
    image, text = results
    assert image["status"] == "ok" and text["status"] == "ok", results
    assert set(image) == set(text)
    assert image["correct"] and image["format_ok"] and image["sft_gate"] and len(image["steps"]) >= 2
    assert image["mig_reward"] == sum(s["gain"] for s in image["steps"])


def test_serve_scores_an_image_item_over_http(tiny_vl_path, tmp_path):
    with serve(["--model", str(tiny_vl_path), "--device", "cpu"], tmp_path / "serve.log", STEPCREDIT_VERIFY_WORKERS="1") as served:
        response = httpx.post(f"{served.base}/v1/score", json={"items": items()}, timeout=120)
        assert response.status_code == 200, response.text
        check(response.json()["results"])
        model = httpx.get(f"{served.base}/v1/model", timeout=10).json()
        assert model["backend"] == "hf" and model["strategy"] == "packed"


def test_stepcredit_score_scores_an_image_item_from_a_file(tiny_vl_path, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(item) + "\n" for item in items()))
    subprocess.run(
        [STEPCREDIT, "score", str(src), "-o", str(out), "--model", str(tiny_vl_path), "--device", "cpu", "-q"],
        check=True, timeout=300, env={**os.environ, "STEPCREDIT_VERIFY_WORKERS": "1"},
    )  # fmt: skip
    check([json.loads(line) for line in out.read_text().splitlines()])
