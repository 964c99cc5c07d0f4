"""The step-credit page without a browser: `render_report` / `write_report` (the client's
stdlib renderer) and `stepcredit report` (the CLI, which loads no model).
What a person sees in a browser: tests/ui/."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from stepcredit.cli import main
from stepcredit.protocol import ScoreResult
from stepcredit_client.report import MAX_ITEMS, render_playground, render_report, write_report

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_EXAMPLE = ROOT / "client" / "stepcredit_client" / "report" / "example.jsonl"
HOSTILE = '</script><img src=x onerror="window.pwned=1"><!-- <script>alert(1)</script> \u2028 & \u2029'


def item(completion: str = "<think>\nStep 1: 2+3 = 5\n</think>\n<answer>5</answer>", **extra) -> dict:
    return {"id": "a", "prompt": "What is 2+3?\n", "completion": completion, "references": ["5"], **extra}


def ok_result(**extra) -> dict:
    step = {"index": 1, "char_start": 8, "char_end": 21, "token_start": None, "token_end": None,
            "loglik": -1.0, "best_reference": 0, "watermark": -1.0, "gain": 0.5}  # fmt: skip
    base = {"id": "a", "status": "ok", "error": None, "format_ok": True, "correct": True, "verify_timeout": False,
            "extracted_answer": "5", "matched_reference": 0, "outcome_reward": 1.0, "mig_reward": 0.5,
            "baseline_loglik": -1.5, "format_gate": True, "correctness_gate": True, "sft_gate": True,
            "cot_span": [8, 21], "tokenization": "text", "steps_truncated": False, "steps": [step]}  # fmt: skip
    return {**base, **extra}


def embedded(page: str) -> dict:
    block = re.search(r'<script type="application/json" id="stepcredit-data">(.*?)</script>', page, re.S)
    assert block, "the data block is missing"
    return json.loads(block.group(1))


def scripts(page: str) -> list[str]:
    return re.findall(r"<script>(.*?)</script>", page, re.S)


# ------------------------------------------------------------------ render_report


def test_hostile_text_stays_inside_its_json_block_and_comes_back_unchanged():
    # Catches: a completion holding "</script>" ending the data block early (and the
    # markup after it running), and escaping that changes what the page shows.
    page = render_report([item(HOSTILE, id=HOSTILE)], [ok_result(extracted_answer=HOSTILE)], title=HOSTILE)
    data = embedded(page)
    assert data["rows"][0]["item"]["completion"] == HOSTILE
    assert data["rows"][0]["result"]["extracted_answer"] == HOSTILE
    assert data["title"] == HOSTILE
    assert "<img" not in page and "<script>alert" not in page and "<!--" not in page
    assert page.count("</script>") == 2  # the data block's end and the renderer's end, nothing else
    assert "<title>&lt;/script&gt;" in page  # the <title> is HTML-escaped, not raw


def test_the_page_loads_nothing_and_runs_only_its_own_script():
    # Catches: a CDN link, a font, a fetch from the report file, or a CSP that would let an
    # injected inline script run ('unsafe-inline' instead of the renderer's hash).
    page = render_report([item()], [ok_result()])
    csp = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)">', page).group(1)
    assert "default-src 'none'" in csp and "connect-src 'none'" in csp and "img-src data:" in csp
    (script,) = scripts(page)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in csp
    assert "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]
    assert not re.search(r"""(src|href)=["']?https?:""", page) and "@import" not in page
    assert not re.search(r"\.(innerHTML|outerHTML)\s*=|insertAdjacentHTML|document\.write|\beval\(|new Function", script)
    assert "<noscript>" in page


def test_items_and_results_pair_by_position_and_different_counts_are_refused():
    with pytest.raises(ValueError, match=r"2 items but 1 results"):
        render_report([item(), item()], [ok_result()])


def test_more_than_the_page_limit_is_refused():
    with pytest.raises(ValueError, match=rf"{MAX_ITEMS + 1} items, limit {MAX_ITEMS}"):
        render_report([item()] * (MAX_ITEMS + 1), [ok_result()] * (MAX_ITEMS + 1))


def test_pydantic_results_are_dumped_like_the_dicts_score_writes():
    # Catches: the trainer passing the client's (or the service's) models and getting a crash
    # or a different page than from `stepcredit score`'s JSONL.
    model = ScoreResult.model_validate(ok_result())
    assert embedded(render_report([item()], [model])) == embedded(render_report([item()], [ok_result()]))


def test_an_item_that_is_not_a_mapping_and_a_non_finite_number_are_errors_not_a_page():
    with pytest.raises(ValueError, match=r"results\[0\] is a str"):
        render_report([item()], ["ok"])
    with pytest.raises(ValueError, match="not finite"):
        render_report([item()], [ok_result(mig_reward=float("nan"))])


def test_token_ids_are_not_embedded_and_meta_is_bounded():
    page = render_report([item(completion_token_ids=list(range(5000)))], [ok_result()], meta={"model": "m", "step": 7})
    data = embedded(page)
    assert "completion_token_ids" not in data["rows"][0]["item"]
    assert data["meta"] == {"model": "m", "step": "7"}
    with pytest.raises(ValueError, match="meta has 40 entries"):
        render_report([item()], [ok_result()], meta={str(i): i for i in range(40)})


def test_write_report_is_atomic_and_leaves_no_temporary_file(tmp_path):
    path = write_report(tmp_path / "sub" / "report.html", [item()], [ok_result()], title="t")
    assert path == tmp_path / "sub" / "report.html" and path.read_text().startswith("<!DOCTYPE html>")
    assert path.stat().st_mode & 0o777 == 0o644
    with pytest.raises(ValueError):
        write_report(path, [item()], [], title="t")  # a failed render leaves the old page as it was
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]
    assert embedded(path.read_text())["title"] == "t"


def test_the_playground_embeds_the_request_limit_and_the_example_items():
    data = embedded(render_playground(max_items_per_request=7))
    assert data["mode"] == "playground" and data["playground"]["max_items_per_request"] == 7
    assert data["playground"]["example"] == PACKAGE_EXAMPLE.read_text()


# ------------------------------------------------------------------ the shipped example


def test_examples_items_is_the_package_copy():
    # Catches: the two copies of the example drifting apart (/ui loads the package's).
    assert (ROOT / "examples" / "items.jsonl").read_bytes() == PACKAGE_EXAMPLE.read_bytes()
    items = [json.loads(line) for line in PACKAGE_EXAMPLE.read_text().splitlines()]
    assert len(items) == 6 and any("messages" in i for i in items)
    assert any(i.get("options", {}).get("format") == "boxed" for i in items)


def test_a_non_editable_client_install_ships_the_page_assets(tmp_path):
    # Catches: package data missing from the pyproject, so a wheel (the image's install, a
    # trainer's) has a renderer without its template and /ui fails at start-up.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
         str(ROOT / "client")],
        check=True, cwd=tmp_path,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("stepcredit_client-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for asset in ("page.html", "report.css", "report.js", "example.jsonl", "__init__.py"):
        assert f"stepcredit_client/report/{asset}" in names


# ------------------------------------------------------------------ stepcredit report


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_cli_writes_the_page_and_prints_its_path(tmp_path, capsys):
    items = write_jsonl(tmp_path / "items.jsonl", [item(), item(id="b")])
    results = write_jsonl(tmp_path / "results.jsonl", [ok_result(), ok_result(id="b")])
    out = tmp_path / "report.html"
    assert main(["report", str(items), str(results), "-o", str(out), "--title", "run 7"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    data = embedded(out.read_text())
    assert data["title"] == "run 7" and [r["result"]["id"] for r in data["rows"]] == ["a", "b"]


def test_cli_refuses_different_counts_naming_both(tmp_path, capsys):
    items = write_jsonl(tmp_path / "items.jsonl", [item(), item()])
    results = write_jsonl(tmp_path / "results.jsonl", [ok_result()])
    assert main(["report", str(items), str(results), "-o", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert "2 items" in err and "1 results" in err
    assert not (tmp_path / "r.html").exists()


def test_cli_shows_a_line_that_is_not_json_as_that_items_error(tmp_path):
    # Catches: a broken line dropped silently, which would pair every later item with the
    # wrong result.
    items = write_jsonl(tmp_path / "items.jsonl", [item(id="x"), "{not json", item(id="z"), "[1, 2]"])
    results = write_jsonl(tmp_path / "results.jsonl", [ok_result(id="x"), ok_result(id="y"), "{nope", ok_result()])
    out = tmp_path / "r.html"
    assert main(["report", str(items), str(results), "-o", str(out)]) == 0
    rows = embedded(out.read_text())["rows"]
    assert [r["result"]["status"] for r in rows] == ["ok", "error", "error", "error"]
    assert rows[1]["result"]["error"]["code"] == "invalid_item" and "ITEMS line 2: not JSON" in rows[1]["result"]["error"]["message"]
    assert rows[2]["result"]["error"]["code"] == "invalid_result" and "RESULTS line 3: not JSON" in rows[2]["result"]["error"]["message"]
    assert rows[2]["item"]["id"] == "z"  # the item is still shown
    assert "ITEMS line 4: a list, not an object" in rows[3]["result"]["error"]["message"]


def test_cli_limit_takes_the_first_n_and_over_the_page_limit_asks_for_it(tmp_path, capsys):
    n = MAX_ITEMS + 1
    items = write_jsonl(tmp_path / "items.jsonl", [item(id=str(i)) for i in range(n)])
    results = write_jsonl(tmp_path / "results.jsonl", [ok_result(id=str(i)) for i in range(n)])
    out = tmp_path / "r.html"
    assert main(["report", str(items), str(results), "-o", str(out)]) == 2
    assert "--limit" in capsys.readouterr().err
    assert main(["report", str(items), str(results), "-o", str(out), "--limit", "3"]) == 0
    data = embedded(out.read_text())
    assert [r["result"]["id"] for r in data["rows"]] == ["0", "1", "2"]
    assert data["meta"]["shown"] == f"the first 3 of {n}"


def test_cli_limit_parses_only_the_lines_it_shows(tmp_path, monkeypatch):
    # Catches: every line of a large results file decoded to show its first few.
    import stepcredit.cli as cli

    items = write_jsonl(tmp_path / "items.jsonl", [item(id=str(i)) for i in range(200)])
    results = write_jsonl(tmp_path / "results.jsonl", [ok_result(id=str(i)) for i in range(200)])
    decoded = []
    loads = cli.json.loads
    monkeypatch.setattr(cli.json, "loads", lambda text, **kw: decoded.append(text) or loads(text, **kw))
    assert main(["report", str(items), str(results), "-o", str(tmp_path / "r.html"), "--limit", "2"]) == 0
    assert len(decoded) == 2 + 2


def test_cli_report_loads_no_model(tmp_path):
    # Catches: `stepcredit report` importing torch or a backend (seconds, and GBs on a laptop
    # that only wants to look at a results file).
    items = write_jsonl(tmp_path / "items.jsonl", [item()])
    results = write_jsonl(tmp_path / "results.jsonl", [ok_result()])
    code = (
        "import sys; from stepcredit.cli import main; "
        f"rc = main(['report', {str(items)!r}, {str(results)!r}, '-o', {str(tmp_path / 'r.html')!r}]); "
        "assert rc == 0; heavy = {'torch', 'transformers', 'fastapi'} & set(sys.modules); assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
