#!/usr/bin/env python3
"""Import Math-Verify's regression cases into tests/unit/data/math_verify_cases.json.

    python scripts/import_math_verify_cases.py GIT_DIR [--rev HEAD] [--out PATH]

GIT_DIR is a clone (or bare mirror) of https://github.com/huggingface/Math-Verify. Its
``tests/*.py`` are imported (they need pytest and math_verify), and every
``@pytest.mark.parametrize`` case of (gold, pred, expected) becomes one record, together
with the way that test calls Math-Verify: ``compare_strings`` with its keyword arguments
(read from the test function's body, resolved per case where they name a parameter), or
plain ``verify(parse(gold), parse(pred))``. CI has no internet, so the result is committed.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "unit" / "data" / "math_verify_cases.json"
UPSTREAM = "https://github.com/huggingface/Math-Verify"

# compare_strings' own defaults in Math-Verify's tests/test_all.py.
COMPARE_DEFAULTS = {"match_types": ["latex", "expr"], "precision": 6, "strict": True, "allow_set_relation_comp": False}


def _git(git_dir: str, *args: str) -> str:
    return subprocess.run(["git", f"--git-dir={git_dir}", *args], check=True, capture_output=True, text=True).stdout


def _call_of(func: ast.FunctionDef) -> tuple[str, dict[str, object]] | None:
    """How a test function calls Math-Verify: ("compare_strings", kwargs) or ("parse_verify", {})."""
    for node in ast.walk(func):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
            continue
        if node.func.id == "compare_strings":
            kwargs: dict[str, object] = {}
            for kw in node.keywords:
                if isinstance(kw.value, ast.Name):
                    kwargs[kw.arg] = {"param": kw.value.id}  # resolved per case
                else:
                    kwargs[kw.arg] = ast.literal_eval(kw.value)
            return "compare_strings", kwargs
        if node.func.id == "verify" and all(
            isinstance(a, ast.Call) and getattr(a.func, "id", "") == "parse" and len(a.args) == 1 and not a.keywords
            for a in node.args
        ):
            return "parse_verify", {}
    return None


def collect(tests_dir: Path) -> list[dict]:
    cases = []
    sys.path.insert(0, str(tests_dir.parent))
    for path in sorted(tests_dir.glob("test_*.py")):
        tree = ast.parse(path.read_text())
        calls = {f.name: _call_of(f) for f in tree.body if isinstance(f, ast.FunctionDef)}
        module = importlib.import_module(f"tests.{path.stem}")
        for name, call in calls.items():
            if call is None:
                continue  # parse-only or config tests: no (gold, pred, verdict) triple
            helper, kwargs = call
            for mark in getattr(getattr(module, name), "pytestmark", []):
                if mark.name != "parametrize":
                    continue
                names = mark.args[0]
                argnames = [a.strip() for a in names.split(",")] if isinstance(names, str) else list(names)
                for i, values in enumerate(mark.args[1]):
                    params = dict(zip(argnames, values, strict=True))
                    expected = params.get("expected", params.get("result"))
                    record = {
                        "id": f"{path.name}::{name}[{i}]",
                        "gold": params["gold"],
                        "pred": params["pred"],
                        "expected": bool(expected),
                    }
                    if helper == "compare_strings":
                        resolved = dict(COMPARE_DEFAULTS)
                        for key, value in kwargs.items():
                            resolved[key] = params[value["param"]] if isinstance(value, dict) else value
                        record["mv"] = {"call": "compare_strings", **resolved}
                    else:
                        record["mv"] = {"call": "parse_verify"}
                    cases.append(record)
    return cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("git_dir")
    ap.add_argument("--rev", default="HEAD")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    commit = _git(args.git_dir, "rev-parse", args.rev).strip()
    with tempfile.TemporaryDirectory() as tmp:
        tests_dir = Path(tmp) / "tests"
        tests_dir.mkdir()
        for name in _git(args.git_dir, "ls-tree", "--name-only", f"{commit}:tests").split():
            if name.endswith(".py"):
                (tests_dir / name).write_text(_git(args.git_dir, "show", f"{commit}:tests/{name}"))
        cases = collect(tests_dir)

    header = {
        "source": UPSTREAM,
        "commit": commit,
        "license": (
            "Apache-2.0 (the repository's LICENCE file; tests/test_all.py also carries an MIT notice, "
            "Copyright (c) 2024 The HuggingFace Team); the cases are copied verbatim from its tests/"
        ),
        "generated_by": "scripts/import_math_verify_cases.py",
        "fields": "gold, pred and expected as in the upstream parametrize lists; mv: how that test calls Math-Verify",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"header": header, "cases": cases}, indent=1, ensure_ascii=False) + "\n")
    print(f"{len(cases)} cases from {commit[:12]} -> {args.out}")


if __name__ == "__main__":
    main()
