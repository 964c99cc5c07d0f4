"""The HTTP layer against hostile clients: head and body timeouts, auth before the body,
bounded metrics labels, the drain as routes see it, and the documented error shapes.

Socket-level tests run the real server (uvicorn with our protocol bounds) in a thread,
on both of uvicorn's HTTP/1.1 protocols; the rest go through the ASGI app.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import socket
import string
import threading
import time
from contextlib import contextmanager

import pytest
from pydantic import SecretStr
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from stepcredit.api import create_app
from stepcredit.api.server import MAX_HEAD_BYTES, Server, build_config

from .conftest import asgi_client

GOOD = {
    "id": "good",
    "prompt": "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n",
    "completion": "<think>\nWe add 2 and 3.\n2 + 3 = 5\n</think>\n<answer>5</answer>",
    "references": ["5"],
}
KEY = {"Authorization": "Bearer s3cret"}
PROTOCOLS = pytest.mark.parametrize("http", [H11Protocol, HttpToolsProtocol], ids=["h11", "httptools"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(settings, http, **overrides):
    """The real server on a free port, in a thread, for an app without a model (lifespan
    off): what these tests check happens before any route runs."""
    settings = settings.model_copy(update={"port": _free_port(), **overrides})
    app = create_app(settings)
    config = build_config(app, settings, http=http)
    config.lifespan = "off"
    server = Server(config, app.state.drain)
    thread = threading.Thread(target=server.run, daemon=True)  # off the main thread: no signal handlers
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield settings.port, app
    finally:
        server.should_exit = True
        thread.join(10)


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (the socket's timeout
    fails the test when it never does). A reset is a close: the server closed with bytes
    of ours unread."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def _get(port: int, path: str, headers: dict | None = None) -> tuple[int, bytes]:
    lines = [f"GET {path} HTTP/1.1", "Host: t", "Connection: close", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    with _connect(port) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        raw = _read_until_closed(sock)
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


# ------------------------------------------------------------------ request heads


@PROTOCOLS
def test_a_request_head_not_whole_within_header_timeout_is_closed(settings, http):
    with running(settings, http, header_timeout_s=0.5) as (port, app):
        partial, silent = _connect(port), _connect(port)
        partial.sendall(b"POST /v1/score HTTP/1.1\r\nHost: t\r\nContent-Type: appl")
        started = time.monotonic()
        assert _read_until_closed(partial) == b""  # closed, nothing answered
        assert 0.4 <= time.monotonic() - started < 3
        assert _read_until_closed(silent) == b""  # a connection that never sends a byte too
        assert _get(port, "/health")[0] == 200  # whole heads are served as before
        metrics = _get(port, "/metrics")[1].decode()
        assert 'stepcredit_head_rejections_total{reason="timeout"} 2.0' in metrics
        partial.close()
        silent.close()


@PROTOCOLS
def test_the_head_timer_starts_again_for_the_next_request_on_a_kept_alive_connection(settings, http):
    with running(settings, http, header_timeout_s=0.5) as (port, app), _connect(port) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        assert b"200 OK" in sock.recv(65536)
        time.sleep(0.3)
        sock.sendall(b"GET /health HTTP/1.1\r\nHos")  # the second head, never finished
        started = time.monotonic()
        assert _read_until_closed(sock) == b""
        assert 0.4 <= time.monotonic() - started < 3


@PROTOCOLS
def test_a_request_head_over_the_size_bound_is_refused(settings, http):
    with running(settings, http) as (port, app), _connect(port) as sock:
        sock.settimeout(5)  # well under header_timeout_s (10): the size ends it, not the time
        sock.sendall(b"GET /" + b"a" * (2 * MAX_HEAD_BYTES))
        answer = _read_until_closed(sock)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 400")  # h11 answers 400 itself


# ------------------------------------------------------------------ bodies and auth


@PROTOCOLS
def test_a_body_not_received_within_body_timeout_gets_408(settings, http):
    with running(settings, http, body_timeout_s=0.5) as (port, app), _connect(port) as sock:
        sock.sendall(b"POST /v1/score HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"items\": [")  # fmt: skip
        started = time.monotonic()
        raw = _read_until_closed(sock)  # answered, then closed: the rest of the body is never read
        assert 0.4 <= time.monotonic() - started < 3
        assert raw.startswith(b"HTTP/1.1 408")
        assert json.loads(raw.partition(b"\r\n\r\n")[2])["error"]["code"] == "body_timeout"


@PROTOCOLS
def test_a_missing_token_gets_401_before_the_body_is_read(settings, http):
    key = SecretStr("s3cret")
    with running(settings, http, api_key=key, body_timeout_s=60) as (port, app), _connect(port) as sock:
        sock.settimeout(3)  # the body never comes: only an answer given before reading it arrives in time
        sock.sendall(b"POST /v1/score HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 16000000\r\n\r\n")  # fmt: skip
        raw = _read_until_closed(sock)
        assert raw.startswith(b"HTTP/1.1 401")
        assert json.loads(raw.partition(b"\r\n\r\n")[2])["error"]["code"] == "unauthorized"


@PROTOCOLS
def test_connections_beyond_max_connections_get_503_but_the_probes_are_answered(settings, http):
    # Found in review: past the cap uvicorn answered 503 to /health too, so slow clients
    # holding every connection could get the pod restarted by its liveness probe.
    with running(settings, http, max_connections=2) as (port, app):
        idle = [_connect(port), _connect(port)]
        assert _get(port, "/metrics") == (503, b"Service Unavailable")  # uvicorn's own answer
        assert _get(port, "/health")[0] == 200
        assert json.loads(_get(port, "/ready")[1])["status"] == "loading"  # the app answered
        for sock in idle:
            sock.close()


# ------------------------------------------------------------------ metrics labels


async def test_random_urls_share_one_route_label_and_metrics_stay_small(settings):
    app = create_app(settings.model_copy(update={"api_key": SecretStr("s3cret")}))
    rng = random.Random(0)
    async with asgi_client(app) as c:
        for _ in range(300):
            path = "/" + "".join(rng.choices(string.ascii_letters, k=4000))
            assert (await c.get(path)).status_code == 401  # no key: refused, and nothing learned
            assert (await c.get(path, headers=KEY)).status_code == 404
        await c.post("/v1/score", json={"items": []})
        text = (await c.get("/metrics", headers=KEY)).text
    assert len(text) < 20_000, len(text)
    assert 'stepcredit_requests_total{route="unmatched",status="401"} 300.0' in text
    assert 'stepcredit_requests_total{route="unmatched",status="404"} 300.0' in text
    assert 'stepcredit_requests_total{route="/v1/score",status="401"} 1.0' in text


async def test_a_404_has_the_error_shape(client):
    response = await client.get("/nothing/here")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


# ------------------------------------------------------------------ OpenAPI and what the key hides


async def test_openapi_documents_every_routes_error_responses_with_the_error_schema(client):
    schema = (await client.get("/openapi.json")).json()
    expected = {
        ("post", "/v1/score"): {"401", "408", "413", "422", "429", "503"},
        ("post", "/v1/admin/reload"): {"401", "403", "408", "409", "413", "422", "500", "501", "503"},
        ("get", "/v1/model"): {"401", "503"},
        ("get", "/metrics"): {"401"},
        ("post", "/get_reward"): {"401", "408", "413", "422", "429", "503"},
        ("post", "/slime/reward"): {"401", "408", "413", "422", "429", "503"},
    }
    for (method, path), statuses in expected.items():
        responses = schema["paths"][path][method]["responses"]
        assert statuses <= set(responses), (path, set(responses))
        for status in statuses:
            ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
            assert ref.endswith("/ErrorBody"), (path, status, ref)
        if "429" in statuses:
            assert "Retry-After" in responses["429"]["headers"] and "Retry-After" in responses["503"]["headers"]
        # 400 too: the HTTP server's own answer to bytes that are not HTTP (text/plain).
        assert "text/plain" in responses["400"]["content"], path
    detail = schema["components"]["schemas"]["ErrorDetail"]
    assert {"code", "message", "field", "errors", "items"} <= set(detail["properties"])
    assert set(detail["required"]) == {"code", "message"}
    assert "HTTPValidationError" not in schema["components"]["schemas"]  # our 422 is not FastAPI's
    ready = schema["paths"]["/ready"]["get"]["responses"]["503"]["content"]["application/json"]["schema"]
    assert ready["$ref"].endswith("/Readiness")


async def test_with_an_api_key_docs_metrics_and_readiness_details_need_it(tiny_scorer, settings):
    app = create_app(settings.model_copy(update={"api_key": SecretStr("s3cret")}), scorer=tiny_scorer)
    async with asgi_client(app) as c:
        for path in ("/docs", "/redoc", "/openapi.json", "/metrics", "/v1/model"):
            assert (await c.get(path)).status_code == 401, path
            assert (await c.get(path, headers=KEY)).status_code == 200, path
        assert (await c.get("/health")).json() == {"status": "ok"}  # no pid, nothing else
        anonymous = await c.get("/ready")
        assert anonymous.status_code == 200 and anonymous.json() == {"status": "ready"}
        detailed = (await c.get("/ready", headers=KEY)).json()
        assert detailed["status"] == "ready" and detailed["model"]["path"] == tiny_scorer.backend.info.path
        openapi = (await c.get("/openapi.json", headers=KEY)).json()
    assert openapi["paths"]["/v1/score"]["post"]["security"] == [{"HTTPBearer": []}]


async def test_readiness_of_a_model_that_failed_names_the_error_only_with_the_key(tiny_scorer, settings):
    app = create_app(settings.model_copy(update={"api_key": SecretStr("s3cret")}), scorer=tiny_scorer)
    app.state.load_state.update(scorer=None, error="OSError: /secret/path/model is not a folder")
    async with asgi_client(app) as c:
        anonymous = await c.get("/ready")
        assert anonymous.status_code == 503 and anonymous.json() == {"status": "failed"}
        detailed = await c.get("/ready", headers=KEY)
        assert detailed.json() == {"status": "failed", "error": "OSError: /secret/path/model is not a folder"}


# ------------------------------------------------------------------ the drain, as routes see it


@pytest.mark.parametrize("path", ["/v1/score", "/v1/admin/reload", "/get_reward", "/slime/reward"])
async def test_while_draining_new_work_gets_503_draining_and_probes_answer(tiny_scorer, settings, path):
    app = create_app(settings, scorer=tiny_scorer)
    async with asgi_client(app) as c:
        assert (await c.get("/ready")).status_code == 200
        app.state.drain.begin()
        response = await c.post(path, json={"items": [GOOD]})
        assert response.status_code == 503 and response.json()["error"]["code"] == "draining"
        assert int(response.headers["retry-after"]) >= 1
        ready = await c.get("/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        assert (await c.get("/health")).status_code == 200  # liveness: do not restart a draining process
        assert (await c.get("/v1/model")).status_code == 200
        metrics = (await c.get("/metrics")).text
    assert "stepcredit_draining 1.0" in metrics and "stepcredit_ready 0.0" in metrics


async def _queued(scorer, request) -> None:
    """Wait until `request`'s trajectories wait in the batcher."""
    for _ in range(500):
        if scorer.queue_depth > 0:
            return
        assert not request.done(), request.result().text
        await asyncio.sleep(0.01)
    pytest.fail("the request never reached the batcher")


async def test_at_the_drain_deadline_running_items_get_shutting_down_errors_not_rewards(tiny_scorer, settings):
    app = create_app(settings.model_copy(update={"drain_timeout_s": 0}), scorer=tiny_scorer)
    drain = app.state.drain
    async with asgi_client(app) as c, tiny_scorer.batcher.drained():  # no backend call starts: it stays queued
        request = asyncio.ensure_future(c.post("/v1/score", json={"items": [GOOD, {**GOOD, "id": "b"}, {"id": "x"}]}))
        await _queued(tiny_scorer, request)
        drain.begin()
        assert drain.tick() is False  # the deadline (now) passed; the request still runs
        response = await request
        assert drain.inflight == 0 and drain.tick() is True  # answered: the server may stop
        assert tiny_scorer.queue_depth == 0  # its queued trajectories were dropped
    assert response.status_code == 200
    first, second, bad = response.json()["results"]
    for result in (first, second):
        assert result["status"] == "error" and result["error"]["code"] == "shutting_down"
        assert "draining" in result["error"]["message"] and result["mig_reward"] is None
    assert bad["error"]["code"] == "invalid_item"  # answered by validation, before the drain
    assert response.json()["usage"]["items_error"] == 3


async def test_at_the_drain_deadline_compat_routes_answer_503_naming_the_items(tiny_scorer, settings):
    app = create_app(settings.model_copy(update={"drain_timeout_s": 0}), scorer=tiny_scorer)
    body = {"prompt": GOOD["prompt"], "response": GOOD["completion"], "label": "5"}
    async with asgi_client(app) as c, tiny_scorer.batcher.drained():
        request = asyncio.ensure_future(c.post("/slime/reward", json=body))
        await _queued(tiny_scorer, request)
        app.state.drain.begin()
        app.state.drain.tick()
        response = await request
    assert response.status_code == 503 and response.headers["retry-after"]
    error = response.json()["error"]
    assert error["code"] == "item_failed" and error["items"][0]["code"] == "shutting_down"


def test_a_second_signal_cuts_the_drain_short_and_a_third_stops_waiting(settings):
    app = create_app(settings.model_copy(update={"drain_timeout_s": 30}))
    server = Server(build_config(app, settings), app.state.drain)
    drain = app.state.drain
    server.handle_exit(signal.SIGTERM, None)
    assert drain.draining and not server.should_exit  # draining, not stopping
    assert drain.deadline > time.monotonic() + 25
    with drain.work():  # a request in flight
        assert drain.tick() is False and not drain.expired
        server.handle_exit(signal.SIGINT, None)
        assert drain.tick() is False and drain.expired  # its items now get shutting_down
    assert drain.tick() is True
    server.should_exit = True
    server.handle_exit(signal.SIGTERM, None)
    assert server.force_exit
