"""`stepcredit serve | score | report | prepare-model`.

Flags override `STEPCREDIT_*` environment variables, which override defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

__all__ = ["main"]


def _model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=["hf", "vllm", "vllm-remote"], help="likelihood backend (default: hf)")
    parser.add_argument("--vllm-url", help="vllm-remote: comma-separated `vllm serve` base URLs")
    parser.add_argument(
        "--no-prefix-reuse", dest="prefix_reuse", action="store_false", default=None,
        help="vLLM backends: recompute every probe's prefix (the baseline)",
    )
    parser.add_argument("--strategy", choices=["packed", "per-prefix"], help="probe strategy (default: packed)")
    parser.add_argument("--model", help="local HF causal-LM folder (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: auto)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: float32")
    parser.add_argument("--cache-dir", type=Path, help="where the default model is converted once")


def _settings(args: argparse.Namespace):
    from .config import Settings

    names = (
        "backend", "strategy", "model", "device", "dtype", "cache_dir", "host", "port", "log_level",
        "vllm_url", "prefix_reuse",
    )  # fmt: skip
    overrides = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    return Settings(**overrides)


def _serve(args: argparse.Namespace) -> int:
    from .api import create_app
    from .api.server import Server, build_config, run

    settings = _settings(args)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server: Server | None = None

    def stop() -> None:  # a model that cannot load, or a dead backend: no drain, status 1
        if server is not None:
            server.stop_now()

    app = create_app(settings, on_fatal=stop)
    base = f"http://{settings.host}:{settings.port}"
    auth = ' -H "Authorization: Bearer $STEPCREDIT_API_KEY"' if settings.api_key else ""
    print(
        f"StepCredit on {base} (model loads in the background; {base}/ready says when).\n"
        f"Score a completion:\n"
        f"  curl -s {base}/v1/score -H 'Content-Type: application/json'{auth} -d '"
        '{"items": [{"prompt": "What is 2+3?", "completion": "<think>\\n2+3 = 5\\n</think>\\n'
        '<answer>5</answer>", "references": ["5"]}]}\'\n'
        f"API docs: {base}/docs   metrics: {base}/metrics   playground: {base}/ui",
        flush=True,
    )

    def finish() -> int:
        # SIGTERM and SIGINT drain and end with 0; a fatal error is a crash (1), so
        # that the orchestrator restarts the process.
        error = app.state.load_state["error"]
        if error:
            print(f"stepcredit: {error}", file=sys.stderr, flush=True)
            return 1
        return 0

    server = Server(build_config(app, settings), app.state.drain)
    return run(server, finish)


def _parse_line(line: str, number: int, limits):
    """The line's ScoreItem, or its `invalid_item` result (the same checks as /v1/score)."""
    from .protocol import ScoreResult, parse_item

    try:
        raw = json.loads(line)
    except ValueError as exc:
        return ScoreResult.failure(None, "invalid_item", f"line {number}: not JSON ({exc})")
    return parse_item(raw, limits, f"line {number}")


def _jsonl_lines(data: bytes) -> list[tuple[int, str]]:
    """(line number, text) of each non-blank line.

    JSON strings may hold U+2028, U+2029 or U+0085 raw, which `str.splitlines`
    (and so any reader that uses it) would take for line ends: only "\n" ends
    a line here, with an optional "\r" before it.
    """
    # utf-8-sig: a byte-order mark some editors write is no part of line 1.
    lines = data.decode("utf-8-sig").split("\n")
    return [(n, line.removesuffix("\r")) for n, line in enumerate(lines, 1) if line.strip()]


async def _score_file(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .backends import build_backend
    from .engine import Scorer
    from .protocol import ScoreResult, Usage

    settings = _settings(args)
    try:
        lines = _jsonl_lines(Path(args.input).read_bytes())
    except (OSError, UnicodeDecodeError) as exc:
        print(f"stepcredit: cannot read {args.input}: {exc}", file=sys.stderr)
        return 1
    scorer = None
    try:
        # The same start-up as `serve` (backend, verifier pool, warm-up item), so
        # a model that cannot score fails here, once, not on every line.
        backend = await asyncio.to_thread(build_backend, settings)
        scorer = Scorer(backend, settings)
        await scorer.start()
    except Exception as exc:  # like `serve`: a model that cannot load ends with status 1
        print(f"stepcredit: the model could not start: {type(exc).__name__}: {exc}", file=sys.stderr)
        if scorer is not None:
            await scorer.close()
        return 1
    usage = Usage()
    limits = settings.limits()
    try:
        with open(args.output, "w", encoding="utf-8") as out, tqdm(
            total=len(lines), unit="item", disable=args.quiet
        ) as bar:
            for start in range(0, len(lines), args.batch_size):
                chunk = lines[start : start + args.batch_size]
                parsed = [_parse_line(text, number, limits) for number, text in chunk]
                items = [p for p in parsed if not isinstance(p, ScoreResult)]
                batch = await scorer.score(items) if items else None
                scored = iter(batch.results if batch else [])
                for p in parsed:
                    result = p if isinstance(p, ScoreResult) else next(scored)
                    out.write(result.model_dump_json() + "\n")
                    usage.items += 1
                    usage.items_ok += result.status == "ok"
                if batch:
                    usage.probes += batch.usage.probes
                    usage.reference_probes += batch.usage.reference_probes
                    usage.tokens_forwarded += batch.usage.tokens_forwarded
                    usage.forward_passes += batch.usage.forward_passes
                bar.update(len(parsed))
    finally:
        await scorer.close()
    usage.items_error = usage.items - usage.items_ok
    print(json.dumps({"output": str(args.output), "model": backend.info.name, **usage.model_dump()}), file=sys.stderr)
    return 0


def _report_rows(lines: list[tuple[int, str]], kind: str) -> list[tuple[int, object]]:
    """(line number, the line's JSON value, or the ValueError that says why it is not JSON)."""
    rows: list[tuple[int, object]] = []
    for number, text in lines:
        try:
            rows.append((number, json.loads(text)))
        except ValueError as exc:
            rows.append((number, ValueError(f"{kind} line {number}: not JSON ({exc})")))
    return rows


def _report_pair(item: tuple[int, object], result: tuple[int, object]) -> tuple[dict, dict]:
    """One (item, result) for the page: a line that is no JSON object is shown as that
    completion's error, never dropped (dropping it would pair every later line wrongly)."""
    (item_line, raw_item), (result_line, raw_result) = item, result
    problems = []
    if isinstance(raw_item, ValueError):
        problems.append(("invalid_item", str(raw_item)))
    elif not isinstance(raw_item, dict):
        problems.append(("invalid_item", f"ITEMS line {item_line}: a {type(raw_item).__name__}, not an object"))
    if isinstance(raw_result, ValueError):
        problems.append(("invalid_result", str(raw_result)))
    elif not isinstance(raw_result, dict):
        problems.append(("invalid_result", f"RESULTS line {result_line}: a {type(raw_result).__name__}, not an object"))
    page_item = raw_item if isinstance(raw_item, dict) else {}
    if not problems:
        return page_item, raw_result
    if isinstance(raw_result, dict) and raw_result.get("status") == "error" and isinstance(raw_result.get("error"), dict):
        problems.append((str(raw_result["error"].get("code")), str(raw_result["error"].get("message"))))
    code = problems[0][0]
    message = "; ".join(m for _, m in problems)
    return page_item, {"status": "error", "error": {"code": code, "message": message}}


def _report(args: argparse.Namespace) -> int:
    """Write the step-credit page of ITEMS and RESULTS (paired by line); no model is loaded."""
    from stepcredit_client.report import MAX_ITEMS, write_report

    try:  # only the lines shown are parsed (a results file can be large)
        items = _jsonl_lines(args.items.read_bytes())
        results = _jsonl_lines(args.results.read_bytes())
    except (OSError, UnicodeDecodeError) as exc:
        print(f"stepcredit: cannot read the input: {exc}", file=sys.stderr)
        return 1
    if len(items) != len(results):
        print(
            f"stepcredit: {args.items} has {len(items)} items and {args.results} has {len(results)} results; "
            "they pair line by line, so the counts must match",
            file=sys.stderr,
        )
        return 2
    limit = args.limit if args.limit is not None else len(items)
    if limit > MAX_ITEMS:
        print(f"stepcredit: {limit} items, a page holds at most {MAX_ITEMS}: pass --limit N", file=sys.stderr)
        return 2
    shown = zip(_report_rows(items[:limit], "ITEMS"), _report_rows(results[:limit], "RESULTS"))
    pairs = [_report_pair(item, result) for item, result in shown]
    meta = {"items": args.items.name, "results": args.results.name}
    if limit < len(items):
        meta["shown"] = f"the first {limit} of {len(items)}"
    try:
        path = write_report(args.output, [p[0] for p in pairs], [p[1] for p in pairs], title=args.title, meta=meta)
    except ValueError as exc:
        print(f"stepcredit: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"stepcredit: cannot write {args.output}: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _prepare_model(args: argparse.Namespace) -> int:
    from .config import Settings
    from .models import ensure_default_model

    cache_dir = args.cache_dir or Settings().cache_dir
    print(ensure_default_model(cache_dir))
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stepcredit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP service")
    _model_flags(serve)
    serve.add_argument("--host", help="default: 127.0.0.1")
    serve.add_argument("--port", type=int, help="default: 8000")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])

    score = sub.add_parser("score", help="score a JSONL file offline, one result line per item, same order")
    score.add_argument("input", type=Path, help="JSONL, one item (SPEC section 1) per line")
    score.add_argument("-o", "--output", type=Path, required=True, help="JSONL of results")
    score.add_argument("--batch-size", type=int, default=32, help="items per scoring batch (default: 32)")
    score.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _model_flags(score)

    report = sub.add_parser(
        "report", help="write the step-credit page (one self-contained HTML file) of items and their results"
    )
    report.add_argument("items", type=Path, help="JSONL of items, as given to `stepcredit score`")
    report.add_argument("results", type=Path, help="JSONL of results, as `stepcredit score` wrote them (same order)")
    report.add_argument("-o", "--output", type=Path, required=True, help="the HTML file to write")
    report.add_argument("--title", default="StepCredit: step credit", help="the page's title")
    report.add_argument("--limit", type=_positive, help="take only the first N items (a page holds at most 5,000)")

    prepare = sub.add_parser("prepare-model", help="convert the embedded default model once and print its folder")
    prepare.add_argument("--cache-dir", type=Path)

    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "score":
            return asyncio.run(_score_file(args))
        if args.command == "report":
            return _report(args)
        return _prepare_model(args)
    except ValidationError as exc:
        print(f"stepcredit: invalid configuration:\n{exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
