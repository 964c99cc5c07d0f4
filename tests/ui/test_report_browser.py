"""The report file in a real browser: what a person sees when opening `stepcredit report`'s
page of the shipped example items, scored by SmolLM2 through `stepcredit score` (16 s on
this CPU, three more than the tiny random model, whose gains are nearly all 0 and so show
no shading worth checking)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stepcredit_client.report import write_report
from tests.conftest import cache_dir

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
EXAMPLE = ROOT / "examples" / "items.jsonl"
TRANSPARENT = "rgba(0, 0, 0, 0)"


@pytest.fixture(scope="module")
def example_report(tmp_path_factory, smol_path) -> tuple[Path, list[dict]]:
    """The README's two commands on the shipped example: score, then report."""
    out = tmp_path_factory.mktemp("report")
    env = {**os.environ, "STEPCREDIT_CACHE_DIR": str(cache_dir())}
    results = out / "results.jsonl"
    score = [str(BIN / "stepcredit"), "score", str(EXAMPLE), "-o", str(results), "-q", "--model", str(smol_path),
             "--device", "cpu"]  # fmt: skip
    subprocess.run(score, check=True, env=env, timeout=300)
    page = out / "report.html"
    done = subprocess.run([str(BIN / "stepcredit"), "report", str(EXAMPLE), str(results), "-o", str(page)],
                          check=True, env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.stdout.strip() == str(page)
    return page, [json.loads(line) for line in results.read_text().splitlines()]


def visible_cards(page) -> list[dict]:
    return page.eval_on_selector_all(
        "[data-testid=card]:not([hidden])",
        "cards => cards.map(c => ({status: c.dataset.status, mig: c.dataset.mig, correct: c.dataset.correct, "
        "maxGain: c.dataset.maxGain, position: c.dataset.position}))",
    )


def test_the_example_report_shows_shaded_steps_curves_and_the_error(new_page, example_report):
    path, results = example_report
    watched = new_page()
    page = watched.page
    page.goto(path.as_uri())
    cards = page.locator("[data-testid=card]")
    assert cards.count() == len(results) == 6

    # Each step is shaded by its gain: gain > 0 a visible background, gain 0 none.
    steps = page.eval_on_selector_all(
        "[data-testid=step]",
        "spans => spans.map(s => ({gain: parseFloat(s.dataset.gain), bg: getComputedStyle(s).backgroundColor, "
        "title: s.title, text: s.textContent, width: s.getBoundingClientRect().width}))",
    )
    assert len(steps) == sum(len(r["steps"]) for r in results)
    shaded = [s for s in steps if s["gain"] > 0]
    assert shaded, "the example has steps that gained"
    for s in steps:
        assert (s["bg"] != TRANSPARENT) == (s["gain"] > 0), s
        assert s["width"] > 0 and "gain" in s["title"] and "watermark" in s["title"], s
    # A larger gain is a stronger shade.
    alpha = {s["gain"]: float(s["bg"].rsplit(",", 1)[1].rstrip(")")) for s in shaded}
    assert [alpha[g] for g in sorted(alpha)] == sorted(alpha.values())

    # Each scored completion with steps has its curve: ℓ_1..ℓ_K, the watermark and ℓ₀.
    for n, result in enumerate(results):
        card = page.locator(f"[data-testid=card][data-position='{n}']")
        if result["status"] != "ok":
            continue
        curve = card.locator("[data-testid=curve]")
        assert curve.count() == 1 and curve.bounding_box()["width"] > 100
        points = curve.locator("[data-testid=loglik]").get_attribute("points").split()
        assert len(points) == len(result["steps"])
        assert curve.locator("[data-testid=watermark]").get_attribute("d").count("L") == 2 * len(result["steps"])
        assert curve.locator("[data-testid=baseline]").count() == 1
        assert curve.locator("[data-testid=point]").count() == len(result["steps"])

    # The refused item is an error card: red, its code and message, no curve.
    error = page.locator("[data-testid=card][data-status=error]")
    assert error.count() == 1
    assert error.locator("[data-testid=error-code]").inner_text() == "invalid_item"
    assert "blank" in error.inner_text() and error.locator("[data-testid=curve]").count() == 0
    assert error.evaluate("c => getComputedStyle(c).borderTopColor") == "rgb(207, 34, 46)"
    # Text outside cot_span is set apart (the format failure's trailing text).
    outside = page.locator("[data-testid=card][data-position='2'] .outside-cot")
    assert "The answer is 25, I am sure." in outside.all_inner_texts()[-1]

    summary = page.locator("[data-testid=summary]")
    assert summary.locator("[data-testid=count-all] b").inner_text() == "6"
    assert summary.locator("[data-testid=count-error] b").inner_text() == "1"
    for hist in ("hist-outcome", "hist-mig", "hist-steps"):
        assert summary.locator(f"[data-testid={hist}] [data-testid=bar]").count() >= 1
    watched.screenshot("report-example")
    assert watched.errors == []
    assert watched.requests == [path.as_uri()]  # nothing fetched at view time


def test_sorting_and_filtering_reorder_and_hide_cards(new_page, example_report):
    path, results = example_report
    watched = new_page()
    page = watched.page
    page.goto(path.as_uri())
    page.select_option("[data-testid=sort]", "mig")
    page.select_option("[data-testid=order]", "desc")
    shown = visible_cards(page)
    migs = [float(c["mig"]) for c in shown if c["mig"]]
    assert migs == sorted(migs, reverse=True) and len(migs) == 5
    assert shown[-1]["status"] == "error"  # no reward: last, whatever the order
    assert [c["position"] for c in shown] != [str(n) for n in range(6)]  # the order did change
    watched.screenshot("report-sorted-by-mig")
    page.select_option("[data-testid=order]", "asc")
    migs = [float(c["mig"]) for c in visible_cards(page) if c["mig"]]
    assert migs == sorted(migs)

    page.select_option("[data-testid=filter]", "errors")
    assert [c["status"] for c in visible_cards(page)] == ["error"]
    page.select_option("[data-testid=filter]", "correct")
    correct = [c for c in visible_cards(page)]
    assert len(correct) == sum(r.get("correct") is True for r in results) and {c["correct"] for c in correct} == {"true"}
    page.select_option("[data-testid=filter]", "incorrect")
    assert {c["correct"] for c in visible_cards(page)} == {"false"}
    page.select_option("[data-testid=filter]", "all")

    threshold = sorted(max((s["gain"] for s in r["steps"]), default=0) for r in results if r["status"] == "ok")[-2]
    page.fill("[data-testid=min-gain]", str(threshold))
    assert len(visible_cards(page)) == 2 and all(float(c["maxGain"]) >= threshold for c in visible_cards(page))
    page.fill("[data-testid=min-gain]", "")
    page.fill("[data-testid=text-filter]", "apples")
    assert [c["position"] for c in visible_cards(page)] == ["3"]
    assert page.locator("[data-testid=shown]").inner_text() == "showing 1 of 6"
    assert watched.errors == []


HOSTILE = '</script><img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'


def test_a_hostile_completion_is_shown_as_text_and_runs_nothing(new_page, tmp_path):
    # Catches: model output reaching the page as markup (innerHTML), or breaking out of the
    # data block: either would run the completion's script in the viewer's browser.
    completion = f"<think>\nStep 1: {HOSTILE}\nStep 2: <b>bold?</b> &amp;\n</think>\n<answer>{HOSTILE}</answer>"
    first = completion.index("Step 1")
    second = completion.index("Step 2")
    steps = [
        {"index": 1, "char_start": first, "char_end": completion.index("\n", first), "token_start": None,
         "token_end": None, "loglik": -2.0, "best_reference": 0, "watermark": -2.0, "gain": 0.5},
        {"index": 2, "char_start": second, "char_end": completion.index("\n", second), "token_start": None,
         "token_end": None, "loglik": -3.0, "best_reference": 0, "watermark": -2.0, "gain": 0.0},
    ]  # fmt: skip
    result = {"id": HOSTILE, "status": "ok", "correct": False, "format_ok": True, "outcome_reward": 0.0,
              "mig_reward": 0.5, "baseline_loglik": -2.5, "extracted_answer": HOSTILE, "cot_span": [8, steps[1]["char_end"]],
              "steps": steps}  # fmt: skip
    error = {"id": "e", "status": "error", "error": {"code": HOSTILE, "message": HOSTILE}}
    items = [{"id": HOSTILE, "prompt": HOSTILE, "completion": completion, "references": [HOSTILE]},
             {"id": "e", "prompt": "p", "completion": HOSTILE, "references": ["1"]}]  # fmt: skip
    path = write_report(tmp_path / "hostile.html", items, [result, error], title=HOSTILE, meta={"model": HOSTILE})
    watched = new_page()
    page = watched.page
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(path.as_uri())
    assert page.evaluate("window.pwned") is None and dialogs == []
    assert page.locator("img").count() == 0 and page.locator("b:text('bold?')").count() == 0
    cards = page.locator("[data-testid=card]")
    assert cards.count() == 2
    assert HOSTILE in cards.nth(0).locator("[data-testid=completion]").inner_text()
    assert "<b>bold?</b> &amp;" in cards.nth(0).locator("[data-testid=step]").nth(1).inner_text()
    assert cards.nth(1).locator("[data-testid=error-code]").inner_text() == HOSTILE
    assert page.title() == HOSTILE
    watched.screenshot("report-hostile")
    assert watched.errors == [] and watched.requests == [path.as_uri()]


def test_steps_are_placed_by_the_services_code_point_offsets(new_page, tmp_path):
    # Catches: spans cut with JavaScript's UTF-16 indices, which shift by one after every
    # character outside the BMP (an emoji, a math letter) and shade the wrong text.
    completion = "<think>\n😀 Step 1: 𝑥 = 2 😀\nStep 2: 𝑥 + 1 = 3\n</think>\n<answer>3</answer>"
    spans = [(completion.index("Step 1"), completion.index("😀\n") + 1), (completion.index("Step 2"), completion.index("\n</think>"))]
    steps = [{"index": k, "char_start": a, "char_end": b, "token_start": None, "token_end": None, "loglik": -1.0 + k,
              "best_reference": 0, "watermark": -1.0 + k, "gain": 1.0} for k, (a, b) in enumerate(spans, 1)]  # fmt: skip
    result = {"status": "ok", "mig_reward": 2.0, "baseline_loglik": -1.0, "cot_span": [8, spans[1][1]], "steps": steps}
    path = write_report(tmp_path / "astral.html", [{"completion": completion, "references": ["3"]}], [result])
    watched = new_page()
    watched.page.goto(path.as_uri())
    shown = watched.page.locator("[data-testid=step]").all_inner_texts()
    assert shown == [completion[a:b] for a, b in spans]
    assert watched.errors == []


def test_a_multimodal_items_image_shows_on_its_card_and_nothing_is_fetched(new_page, tmp_path, tiny_vl_path):
    """Scene items scored by the tiny Qwen2-VL: each card shows its own picture (decoded
    by the browser from the embedded data URI); an image given as a URL is not loaded."""
    from stepcredit_trainer.scenes import make_scene

    scenes = [make_scene(5, i) for i in range(2)]
    items = [scene.item() for scene in scenes]
    items.append({**items[0], "id": "fetched", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}},
        {"type": "text", "text": "?"}]}]})  # fmt: skip
    src, results = tmp_path / "items.jsonl", tmp_path / "results.jsonl"
    src.write_text("".join(json.dumps(item) + "\n" for item in items))
    env = {**os.environ, "STEPCREDIT_CACHE_DIR": str(cache_dir()), "STEPCREDIT_VERIFY_WORKERS": "1"}
    score = [str(BIN / "stepcredit"), "score", str(src), "-o", str(results), "-q", "--model", str(tiny_vl_path),
             "--device", "cpu"]  # fmt: skip
    subprocess.run(score, check=True, env=env, timeout=300)
    scored = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["status"] for r in scored] == ["ok", "ok", "error"], scored
    page_path = write_report(tmp_path / "report.html", items, scored)

    watched = new_page()
    page = watched.page
    page.goto(page_path.as_uri())
    shown = page.eval_on_selector_all(
        "[data-testid=card] img.item-image",
        "imgs => imgs.map(i => ({w: i.naturalWidth, h: i.naturalHeight, complete: i.complete, src: i.src.slice(0, 22)}))",
    )
    assert [(s["w"], s["h"]) for s in shown] == [scene.image.size for scene in scenes], shown
    assert all(s["complete"] and s["src"] == "data:image/png;base64," for s in shown)
    assert page.get_by_text("image 1: not an inline image").count() == 1
    assert not [url for url in watched.requests if not url.startswith(("file:", "data:"))], watched.requests
    assert not watched.errors, watched.errors
    watched.screenshot("report-images")
