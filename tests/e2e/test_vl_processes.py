"""Items with images through real processes on the tiny random Qwen2-VL: `stepcredit serve`
over HTTP and `stepcredit score` on a JSONL file, with the fields of a text item, and
`stepcredit-train validate` with the same model as a vision-language policy on the scene task."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import httpx
import pytest
from stepcredit_trainer.scenes import make_scene

from tests.e2e.processes import STEPCREDIT, serve
from tests.unit.test_report import embedded


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


@pytest.fixture(scope="module")
def served(tiny_vl_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("vl-serve") / "serve.log"
    with serve(["--model", str(tiny_vl_path), "--device", "cpu"], log, STEPCREDIT_VERIFY_WORKERS="1") as s:
        yield s.base


def test_serve_scores_an_image_item_over_http(served):
    response = httpx.post(f"{served}/v1/score", json={"items": items()}, timeout=120)
    assert response.status_code == 200, response.text
    check(response.json()["results"])
    model = httpx.get(f"{served}/v1/model", timeout=10).json()
    assert model["backend"] == "hf" and model["strategy"] == "packed"


def test_validate_continues_a_vl_policys_chains_from_every_prefix_with_their_images(served, tiny_vl_path, tmp_path):
    """Before: continuations from a step boundary lost the chain's pixel values (the
    policy's generate saw image pads and no image) and chain_items.jsonl had no images."""
    config = tmp_path / "validate.toml"
    config.write_text(
        f'[policy]\nmodel = "{tiny_vl_path}"\n'
        '[task]\nname = "clevr_count"\nparams = {width = 112, height = 112, max_objects = 4}\n'
        '[rollout]\nmax_new_tokens = 8\ntemperature = 1.0\n'
        '[validate]\nproblems = 2\nsamples = 2\nmin_steps = 1\nbootstrap = 100\n'
    )  # fmt: skip
    out = tmp_path / "out"
    done = subprocess.run(
        [str(Path(STEPCREDIT).parent / "stepcredit-train"), "validate", "--config", str(config), "--output-dir", str(out)],
        env={**os.environ, "STEPCREDIT_URL": served}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads((out / "figures.json").read_text())
    chains = [json.loads(line) for line in (out / "chains.jsonl").read_text().splitlines()]
    assert figures["chains"] == len(chains) == 2 and figures["continuations_without_verdict"] == 0
    assert all(c["verdicts"] == [2] * len(c["values"]) for c in chains)  # every continuation verified
    chain_items = [json.loads(line) for line in (out / "chain_items.jsonl").read_text().splitlines()]
    assert all(len(i["images"]) == 1 and i["images"][0].startswith("data:image/png;base64,") for i in chain_items)
    page = (out / "chains.html").read_text()
    assert page.count("data:image/png;base64,") >= 2  # each chain's scene is drawn on its page
    # Each card is titled by its result's id: the problem's id and its chain's V_k.
    rows = embedded(page)["rows"]
    assert all(" V = [" in r["result"]["id"] and r["result"]["id"] == r["item"]["id"] for r in rows), rows[0]["result"]["id"]


def test_stepcredit_score_scores_an_image_item_from_a_file(tiny_vl_path, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(item) + "\n" for item in items()))
    subprocess.run(
        [STEPCREDIT, "score", str(src), "-o", str(out), "--model", str(tiny_vl_path), "--device", "cpu", "-q"],
        check=True, timeout=300, env={**os.environ, "STEPCREDIT_VERIFY_WORKERS": "1"},
    )  # fmt: skip
    check([json.loads(line) for line in out.read_text().splitlines()])
