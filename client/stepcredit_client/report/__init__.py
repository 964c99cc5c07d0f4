"""The step-credit page: one self-contained HTML file per set of scored completions.

    from stepcredit_client.report import write_report

    write_report("report.html", items, results, meta={"model": "my-scorer", "step": 100})

`items` are the request items (SPEC section 1), `results` the ScoreResults of the same
items in the same order (dicts as `stepcredit score` writes them, or pydantic models).
The page shows each completion with its steps shaded by their gain, the ℓ_k curve with
the watermark and ℓ₀, outcome and gates, errors as errors, and a summary; it sorts and
filters. It loads nothing at view time (its Content-Security-Policy forbids it).

One renderer: the page's JavaScript (report.js, package data) draws everything from the
data embedded as JSON, so the report file and the service's playground (`GET /ui`,
`render_playground`) are the same view. Stdlib only: the trainer and the service both
import this module, and the client package depends on httpx and pydantic only.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from functools import cache
from importlib import resources
from pathlib import Path

__all__ = [
    "MAX_ITEMS",
    "MAX_PAGE_BYTES",
    "example_items_text",
    "playground_csp",
    "render_playground",
    "render_report",
    "write_report",
]

MAX_ITEMS = 5000
"""Completions one page holds: past a few thousand cards a browser drags. Take a sample."""
MAX_PAGE_BYTES = 64 * 1024 * 1024
"""Embedded data one page holds (5,000 completions of ~12 KB each)."""
_MAX_META = 32
_MAX_META_CHARS = 500
_ITEM_FIELDS = ("id", "prompt", "messages", "images", "completion", "references", "options")
"""What the page shows of an item; completion_token_ids are left out (large, not drawn)."""

# A string inside <script> ends at "</script" and HTML comments can change how it is
# parsed; a JSON string may hold both. Escaping <, > and & leaves no way out; U+2028/29
# are escaped for older JavaScript parsers.
_UNSAFE = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_UNSAFE_RE = re.compile("[<>&\u2028\u2029]")
_SLOT = re.compile(r"@@(CSP|TITLE|CSS|DATA|JS)@@")


@cache
def _asset(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def example_items_text() -> str:
    """The shipped example items (JSONL): what `examples/items.jsonl` holds and /ui loads."""
    return _asset("example.jsonl")


def _csp(connect_src: str) -> str:
    # The script is allowed by its hash, not by 'unsafe-inline': if data ever escaped its
    # JSON block, no script it injected would run.
    digest = base64.b64encode(hashlib.sha256(_asset("report.js").encode("utf-8")).digest()).decode()
    return (
        f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; img-src data:; "
        f"connect-src {connect_src}; base-uri 'none'; form-action 'none'"
    )


def playground_csp() -> str:
    """The Content-Security-Policy header of /ui: the page may talk to its own origin only."""
    return _csp("'self'")


def _plain(value: object, what: str) -> object:
    """A dict from a mapping or a pydantic model (`model_dump(mode="json")`)."""
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    if not isinstance(value, Mapping):
        raise ValueError(f"{what} is a {type(value).__name__}, not a mapping")
    return dict(value)


def _meta(meta: Mapping[str, object] | None) -> dict[str, str]:
    if meta is None:
        return {}
    if len(meta) > _MAX_META:
        raise ValueError(f"meta has {len(meta)} entries, limit {_MAX_META}")
    return {str(k)[:100]: str(v)[:_MAX_META_CHARS] for k, v in meta.items()}


def _page(title: str, data: dict, csp: str) -> str:
    try:
        payload = json.dumps(data, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    except ValueError as exc:  # NaN or infinity: never a number on the page
        raise ValueError(f"the data holds a number that is not finite: {exc}") from None
    payload = _UNSAFE_RE.sub(lambda m: _UNSAFE[m[0]], payload)
    if len(payload) > MAX_PAGE_BYTES:
        raise ValueError(f"the page's data is {len(payload)} bytes, limit {MAX_PAGE_BYTES}: report fewer items")
    parts = {
        "CSP": html.escape(csp, quote=False).replace('"', "&quot;"),  # its own ' stay readable
        "TITLE": html.escape(title),
        "CSS": _asset("report.css"),
        "DATA": payload,
        "JS": _asset("report.js"),
    }
    # One pass: text put into one slot is never searched for another.
    return _SLOT.sub(lambda m: parts[m[1]], _asset("page.html"))


def render_report(
    items: Sequence[object],
    results: Sequence[object],
    *,
    title: str = "StepCredit: step credit",
    meta: Mapping[str, object] | None = None,
) -> str:
    """The report page (one HTML string, self-contained) of `items` and their `results`,
    paired by position. ValueError for different lengths, more than MAX_ITEMS items, an
    item or result that is not a mapping (or pydantic model), or a non-finite number."""
    items, results = list(items), list(results)
    if len(items) != len(results):
        raise ValueError(f"{len(items)} items but {len(results)} results: they are paired by position")
    if len(items) > MAX_ITEMS:
        raise ValueError(f"{len(items)} items, limit {MAX_ITEMS} per page: report a sample")
    rows = []
    for n, (item, result) in enumerate(zip(items, results)):
        item = _plain(item, f"items[{n}]")
        rows.append(
            {
                "item": {k: item[k] for k in _ITEM_FIELDS if k in item},
                "result": _plain(result, f"results[{n}]"),
            }
        )
    data = {"mode": "report", "title": str(title), "meta": _meta(meta), "rows": rows}
    return _page(str(title), data, _csp("'none'"))


def render_playground(
    *, max_items_per_request: int, title: str = "StepCredit playground", meta: Mapping[str, object] | None = None
) -> str:
    """The page of `GET /ui`: paste, upload or load the example items, score them through
    the service's own /v1/score (in requests of at most `max_items_per_request`), and see
    the same view as the report. Send it with `playground_csp()` as its CSP header."""
    if max_items_per_request < 1:
        raise ValueError(f"max_items_per_request must be at least 1, not {max_items_per_request}")
    data = {
        "mode": "playground",
        "title": str(title),
        "meta": _meta(meta),
        "rows": [],
        "playground": {
            "max_items_per_request": int(max_items_per_request),
            "max_items": MAX_ITEMS,
            "example": example_items_text(),
        },
    }
    return _page(str(title), data, playground_csp())


def write_report(path: str | os.PathLike[str], items, results, **kwargs) -> Path:
    """`render_report(items, results, **kwargs)` written to `path` atomically (a reader
    never sees half a page); returns the path."""
    path = Path(path)
    page = render_report(items, results, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the page from a web server or a colleague
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(page)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
