"""A live StepCredit service (`stepcredit serve` on the tiny random Llama, a real
process on a real port) and a fault-injecting HTTP proxy in front of it."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.conftest import cache_dir

STEPCREDIT = str(Path(sys.executable).parent / "stepcredit")

PROMPT = "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
COMPLETION = "<think>\nWe add 2 and 3.\n2 + 3 = 5\nSo the sum is 5.\n</think>\n<answer>5</answer>"
ITEM = {"prompt": PROMPT, "completion": COMPLETION, "references": ["5", "5.0"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    url: str
    proc: subprocess.Popen

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)


def start_server(model_path: Path, api_key: str | None = None) -> LiveServer:
    port = free_port()
    env = {**os.environ, "STEPCREDIT_CACHE_DIR": str(cache_dir()), "STEPCREDIT_VERIFY_WORKERS": "1"}
    env.pop("STEPCREDIT_API_KEY", None)
    if api_key:
        env["STEPCREDIT_API_KEY"] = api_key
    proc = subprocess.Popen(
        [STEPCREDIT, "serve", "--model", str(model_path), "--port", str(port), "--device", "cpu",
         "--log-level", "warning"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"stepcredit serve exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return LiveServer(url, proc)
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("stepcredit serve was not ready within 180 s")


def stop_server(server: LiveServer) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.fixture(scope="session")
def live_server(tiny_model_path):
    server = start_server(tiny_model_path)
    yield server
    stop_server(server)


@pytest.fixture(scope="session")
def live_vl_server(tiny_vl_path):
    """The service on the tiny random Qwen2-VL (tests/conftest.py `build_tiny_vl`)."""
    server = start_server(tiny_vl_path)
    yield server
    stop_server(server)


@pytest.fixture
def doomed_server(tiny_model_path):
    """A server of its own, for tests that kill it."""
    server = start_server(tiny_model_path)
    yield server
    server.kill()


@dataclass
class FaultProxy:
    """Forwards to the live service, except for scripted faults, one per request:
    `("status", code, retry_after)` answers that status, `("delay", s)` waits
    before forwarding, `("pass",)` forwards. `seen` logs (time, path) per request."""

    upstream: str
    faults: deque = field(default_factory=deque)
    seen: list = field(default_factory=list)
    url: str = ""

    def script(self, *faults) -> None:
        self.faults.clear()
        self.faults.extend(faults)
        self.seen.clear()

    async def handle(self, request: Request) -> Response:
        self.seen.append((time.monotonic(), request.url.path))
        fault = self.faults.popleft() if self.faults else ("pass",)
        if fault[0] == "status":
            _, code, retry_after = fault
            headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
            return JSONResponse({"error": {"code": f"injected_{code}", "message": "fault"}}, code, headers=headers)
        if fault[0] == "delay":
            await asyncio.sleep(fault[1])
        async with httpx.AsyncClient(base_url=self.upstream, timeout=120) as upstream:
            forwarded = await upstream.request(
                request.method,
                request.url.path,
                content=await request.body(),
                headers={k: v for k, v in request.headers.items() if k.lower() in ("content-type", "authorization")},
            )
        return Response(forwarded.content, forwarded.status_code, media_type=forwarded.headers.get("content-type"))


@pytest.fixture(scope="session")
def fault_proxy(live_server):
    proxy = FaultProxy(live_server.url)
    routes = [Route("/{path:path}", proxy.handle, methods=["GET", "POST"])]
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(Starlette(routes=routes), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "proxy did not start"
        time.sleep(0.05)
    proxy.url = f"http://127.0.0.1:{port}"
    yield proxy
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def proxy(fault_proxy):
    fault_proxy.script()
    yield fault_proxy
    fault_proxy.script()
