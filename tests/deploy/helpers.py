"""What the deployment tests share: the repo's files, the tools that check them, and the
app facts (settings, routes, metric names) the files must agree with."""

from __future__ import annotations

import ast
import functools
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = sorted(p.name for p in (DEPLOY / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
SETTINGS_PREFIX = "STEPCREDIT_"


def tool(name: str, package: str) -> str:
    """The executable `name`: the one the venv's package installed, else one on PATH.

    A missing tool fails the test (never skips it): CI must run these checks.
    """
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"`{name}` is not installed: `pip install {package}` (the test extra of pyproject.toml)")
    return found


# ------------------------------------------------------------------ the app's side


@functools.cache
def app_routes() -> frozenset[str]:
    from stepcredit.api import create_app
    from stepcredit.config import Settings

    return frozenset(route.path for route in create_app(Settings()).routes)


@functools.cache
def exported_metric_names() -> frozenset[str]:
    """Every sample name the service's /metrics can show (counters as `_total`, ...)."""
    from stepcredit.api.metrics import Metrics

    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "info": ("_info",),
        "summary": ("", "_count", "_sum", "_created"),
    }
    names = set()
    for family in Metrics().registry.collect():
        names.update(family.name + suffix for suffix in suffixes[family.type])
    return frozenset(names)


def settings_fields() -> set[str]:
    from stepcredit.config import Settings

    return set(Settings.model_fields)


def build_settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch):
    """Settings as a container with exactly these variables would read them.

    Fails on a STEPCREDIT_* name that is no Settings field (pydantic-settings would
    silently ignore it) and on a value Settings refuses (a port of 80000, a backend
    spelled `vllm_remote`, ...).
    """
    from stepcredit.config import Settings

    ours = {k: v for k, v in env.items() if k.startswith(SETTINGS_PREFIX)}
    unknown = sorted(k for k in ours if k.removeprefix(SETTINGS_PREFIX).lower() not in settings_fields())
    assert not unknown, f"no such setting in stepcredit.config.Settings: {unknown}"
    for name in [n for n in os.environ if n.startswith(SETTINGS_PREFIX)]:
        monkeypatch.delenv(name)
    for name, value in ours.items():
        monkeypatch.setenv(name, value)
    return Settings()


@functools.cache
def e2e_vllm_server_flags() -> frozenset[str]:
    """The `--enable-*` flags the e2e tests start their `vllm serve` with (tests/e2e/processes.py):
    the configuration the vllm-remote backend is tested against. Read from the source."""
    tree = ast.parse((ROOT / "tests" / "e2e" / "processes.py").read_text())
    function = next(
        n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "vllm_server_command"
    )
    flags = {
        n.value
        for n in ast.walk(function)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.startswith("--enable-")
    }
    assert flags, "vllm_server_command has no --enable-* flags: the test's reading of it is out of date"
    return frozenset(flags)


# ------------------------------------------------------------------ the Dockerfile


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)
    """(INSTRUCTION, arguments), continuation lines joined."""


def dockerfile_stages(text: str) -> tuple[dict[str, str], dict[str, Stage]]:
    """(global ARG defaults, stages by name) of a Dockerfile: enough to follow USER, ENV,
    COPY and HEALTHCHECK through `FROM <stage>`."""
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), parts[0])
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else f"stage{len(stages)}"
            current = stages[name] = Stage(name, base)
        elif current is None:
            if keyword == "ARG":
                name, _, default = rest.partition("=")
                args[name.strip()] = default.strip()
        else:
            current.instructions.append((keyword, rest.strip()))
    return args, stages


def effective(stages: dict[str, Stage], name: str, keyword: str) -> list[str]:
    """Every `keyword` instruction's arguments that apply in stage `name`, inherited first."""
    stage = stages[name]
    inherited = effective(stages, stage.base, keyword) if stage.base in stages else []
    return inherited + [rest for kw, rest in stage.instructions if kw == keyword]


def env_of(stages: dict[str, Stage], name: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for rest in effective(stages, name, "ENV"):
        for key, value in re.findall(r"(\w+)=(\"[^\"]*\"|\S+)", rest):
            env[key] = value.strip('"')
    return env


# ------------------------------------------------------------------ .dockerignore


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    # Go's filepath.Match, as Docker uses it: `*` and `?` stay inside one path segment,
    # `**` crosses segments.
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            if pattern.startswith("/", i):
                out += "/?"
                i += 1
            continue
        ch = pattern[i]
        out += "[^/]*" if ch == "*" else "[^/]" if ch == "?" else re.escape(ch)
        i += 1
    return re.compile(out + r"\Z")


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Whether Docker leaves `path` (relative to the context) out of the build context.

    The last pattern that matches the path or one of its parent folders decides; `!`
    patterns re-include.
    """
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        regex = _pattern_regex(pattern.strip("/"))
        if any(regex.match(candidate) for candidate in candidates):
            excluded = not negate
    return excluded


def dockerignore_patterns(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
