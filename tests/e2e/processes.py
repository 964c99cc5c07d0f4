"""Starting a real `stepcredit serve` for the end-to-end tests: one helper for every file."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import cache_dir

STEPCREDIT = str(Path(sys.executable).parent / "stepcredit")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    base: str
    proc: subprocess.Popen
    log: Path
    """The process's stdout and stderr (a file: a pipe nobody reads would stall it once full)."""


@contextmanager
def serve(args: Sequence[str], log: Path, ready_s: float = 180, **env: str | None) -> Iterator[Served]:
    """`stepcredit serve ARGS --port P` with `env` on top of ours (None removes a variable);
    yields once /ready answers 200, and stops the process (SIGTERM, then kill) afterwards."""
    port = free_port()
    merged = {**os.environ, "STEPCREDIT_CACHE_DIR": str(cache_dir()), **env}
    full_env = {name: value for name, value in merged.items() if value is not None}
    with log.open("w") as output:
        proc = subprocess.Popen(
            [STEPCREDIT, "serve", *args, "--port", str(port)],
            env=full_env, stdout=output, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + ready_s
            while time.monotonic() < deadline:
                assert proc.poll() is None, log.read_text()
                try:
                    if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.3)
            else:
                pytest.fail(f"stepcredit serve did not become ready in {ready_s:.0f} s")
            yield Served(base, proc, log)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
