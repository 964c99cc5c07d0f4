"""FastAPI app factory: routes are thin, errors map to status codes in one place.

`create_app(settings, scorer=None)` builds the app. Without a scorer the model
loads in the background after start-up, so /health answers at once and /ready
turns 200 when the model is loaded and warmed. Tests inject a scorer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import secrets
import signal
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..backends import BackendDeadError, build_backend
from ..checkpoints import ReloadError
from ..config import Settings
from ..engine import Overloaded, ScoreBatch, Scorer
from ..protocol import (
    REVISION_HEADER,
    LimitError,
    ModelInfo,
    ReloadRequest,
    ReloadResponse,
    ScoreItem,
    ScoreRequest,
    ScoreResponse,
    ScoreResult,
    Usage,
    check_limits,
    field_path,
    parse_items,
)
from .compat import register_compat_routes
from .metrics import Metrics

__all__ = ["create_app"]

log = logging.getLogger(__name__)


def _error(status: int, code: str, message: str, headers: dict | None = None, **extra) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, **extra}}, status, headers=headers)


_RELOAD_STATUS = {
    "invalid_checkpoint": 422,
    "incompatible_model": 422,
    "reload_in_progress": 409,
    "reload_unsupported": 501,
    "reload_disabled": 403,
}  # any other ReloadError (out of memory while loading): 500


class _Guard:
    """ASGI middleware: bounds the body size (413) and counts requests by route and status."""

    def __init__(self, app, max_bytes: int, metrics: Metrics) -> None:
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            declared = int(dict(scope["headers"]).get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        if declared > self.max_bytes:
            response = _error(413, "body_too_large", f"body is {declared} bytes, limit {self.max_bytes}")
            await response(scope, receive, counting_send)
        else:
            # Read the whole body under the limit, then replay it to the app.
            chunks, size, more = [], 0, scope["method"] in ("POST", "PUT", "PATCH")
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_bytes:
                    response = _error(413, "body_too_large", f"body exceeds {self.max_bytes} bytes")
                    await response(scope, receive, counting_send)
                    break
                chunks.append(chunk)
                more = message.get("more_body", False)
            else:
                body = b"".join(chunks)
                replayed = False

                async def replay():
                    nonlocal replayed
                    if not replayed:
                        replayed = True
                        return {"type": "http.request", "body": body, "more_body": False}
                    return await receive()

                await self.app(scope, replay, counting_send)
        self.metrics.requests.labels(scope["path"], str(status["code"])).inc()


def _terminate() -> None:
    signal.raise_signal(signal.SIGTERM)


def create_app(
    settings: Settings | None = None,
    scorer: Scorer | None = None,
    on_fatal: Callable[[], None] = _terminate,
) -> FastAPI:
    """`on_fatal` is called when the model cannot load or the backend dies, so the
    process exits and its orchestrator restarts it (default: SIGTERM to self)."""
    settings = settings or Settings()
    limits = settings.limits()
    metrics = Metrics()
    state: dict = {"scorer": scorer, "error": None}

    async def load() -> None:
        try:
            current = state["scorer"]
            if current is None:
                backend = await asyncio.to_thread(build_backend, settings)
                current = Scorer(backend, settings)
                state["scorer"] = current
            if not current.ready:
                await current.start()
            metrics.ready.set(1)
            metrics.set_model(current.backend.info)
            metrics.queue_depth.set_function(lambda: current.queue_depth)
            log.info("ready: %s", current.backend.info.model_dump_json())
        except Exception as exc:  # the orchestrator restarts a process that cannot load
            log.exception("model failed to load")
            state["error"] = f"{type(exc).__name__}: {exc}"
            if scorer is None:
                on_fatal()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = asyncio.create_task(load())
        yield
        loader.cancel()
        metrics.ready.set(0)
        if scorer is None and state["scorer"] is not None:
            await state["scorer"].close()

    app = FastAPI(
        title="StepCredit",
        version="0.1.0",
        description="Process (MIG) and outcome rewards for RL on multi-step reasoning.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.load_state = state

    def ready_scorer() -> Scorer:
        current = state["scorer"]
        if current is None or not current.ready:
            raise _NotReady()
        return current

    async def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            token.encode(), settings.api_key.get_secret_value().encode()
        ):
            raise _Unauthorized()

    @app.exception_handler(_NotReady)
    async def _not_ready(request: Request, exc: _NotReady) -> JSONResponse:
        message = state["error"] or "the model is loading"
        return _error(503, "not_ready", message, headers={"Retry-After": "5"})

    @app.exception_handler(_Unauthorized)
    async def _unauthorized(request: Request, exc: _Unauthorized) -> JSONResponse:
        return _error(401, "unauthorized", "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(_ClientGone)
    async def _gone(request: Request, exc: _ClientGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default body echoes the input, which may hold NaN or a lone
        # surrogate that no JSON encoder writes (a 500 instead of the 422).
        errors = exc.errors()
        details = [{"field": _field(e), "message": e.get("msg", "")} for e in errors[:10]]
        message = "; ".join(f"{d['field']}: {d['message']}" for d in details[:3])
        field = details[0]["field"] if details else "body"
        return _error(422, "invalid_request", message or "malformed request", field=field, errors=details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        # A body Python's JSON reader refuses after FastAPI's own checks (an integer of
        # more than 4,300 digits) comes as a bare 400: answer it like any malformed body.
        if exc.status_code == 400 and "parsing the body" in str(exc.detail):
            return _error(422, "invalid_request", "the body could not be parsed as JSON", field="body")
        return await http_exception_handler(request, exc)

    @app.exception_handler(LimitError)
    async def _limit(request: Request, exc: LimitError) -> JSONResponse:
        return _error(exc.status, "limit_exceeded", str(exc), field=exc.field)

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        retry = str(max(1, math.ceil(exc.retry_after_s)))
        return _error(429, "overloaded", str(exc), headers={"Retry-After": retry})

    @app.exception_handler(ReloadError)
    async def _reload_failed(request: Request, exc: ReloadError) -> JSONResponse:
        metrics.reloads.labels(exc.code).inc()
        return _error(_RELOAD_STATUS.get(exc.code, 500), exc.code, str(exc))

    @app.exception_handler(BackendDeadError)
    async def _dead(request: Request, exc: BackendDeadError) -> JSONResponse:
        log.error("backend dead, shutting down: %s", exc)
        state["error"] = f"backend dead: {exc}"
        metrics.ready.set(0)
        if state["scorer"] is not None:
            state["scorer"].ready = False
        on_fatal()
        return _error(503, "backend_dead", str(exc))

    @app.post("/v1/score", response_model=ScoreResponse, dependencies=[Depends(authorize)])
    async def score(request: ScoreRequest, raw: Request, response: Response) -> ScoreResponse:
        """Score a batch of items: MIG per step, outcome, gates and spans (SPEC section 7)."""
        current = ready_scorer()
        check_limits(request, limits)
        # Each item is validated on its own: a bad one is its own `invalid_item` error.
        parsed = parse_items(request.items, limits)
        valid = [p for p in parsed if isinstance(p, ScoreItem)]
        started = time.perf_counter()
        batch = ScoreBatch([], Usage())
        if valid:
            batch = await _unless_disconnected(raw, current.score(valid, request.options))
        scored = iter(batch.results)
        batch.results = [p if isinstance(p, ScoreResult) else next(scored) for p in parsed]
        batch.usage.items = len(batch.results)
        batch.usage.items_error = len(batch.results) - batch.usage.items_ok
        metrics.request_latency.observe(time.perf_counter() - started)
        if "backend_s" in batch.timings:
            metrics.backend_latency.observe(batch.timings["backend_s"])
        metrics.probe_tokens.inc(batch.usage.tokens_forwarded)
        metrics.probes.inc(batch.usage.probes)
        for result in batch.results:
            metrics.items.labels(result.status).inc()
            if result.error is not None:
                metrics.item_errors.labels(result.error.code).inc()
        # The model that scored these items: a reload may have swapped it since.
        model = batch.model or current.backend.info
        response.headers[REVISION_HEADER] = model.revision or ""
        return ScoreResponse(results=batch.results, model=model, usage=batch.usage)

    @app.post("/v1/admin/reload", response_model=ReloadResponse, dependencies=[Depends(authorize)])
    async def reload(request: ReloadRequest) -> ReloadResponse:
        """Score with the weights in `path` from the next batch on (a trainer's new
        checkpoint). Batches in flight finish on the old weights; on any failure the
        old weights keep serving."""
        if not settings.admin_reload:
            raise _ReloadDisabled("reloads are turned off on this service (STEPCREDIT_ADMIN_RELOAD=false)")
        current = ready_scorer()
        try:
            # Shielded: a client that gives up must not leave a swap half done.
            outcome = await asyncio.shield(
                current.reload(Path(request.path), request.revision, root=settings.admin_reload_root)
            )
        except BackendDeadError:  # the old weights were freed and could not be read again
            metrics.reloads.labels("backend_dead").inc()
            raise
        metrics.reloads.labels("ok").inc()
        metrics.reload_latency.observe(outcome.load_s)
        metrics.set_model(outcome.model)
        return ReloadResponse(
            model=outcome.model, previous_revision=outcome.previous_revision, mode=outcome.mode, load_s=outcome.load_s
        )

    @app.get("/v1/model", response_model=ModelInfo, dependencies=[Depends(authorize)])
    async def model() -> ModelInfo:
        """The scoring model and how it runs."""
        return ready_scorer().backend.info

    @app.get("/health")
    async def health() -> dict:
        """The process is alive (the model may still be loading)."""
        return {"status": "ok", "pid": os.getpid()}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        """200 once the model is loaded and warmed; 503 before, or after a fatal error."""
        current = state["scorer"]
        if current is not None and current.ready:
            return JSONResponse({"status": "ready", "model": json.loads(current.backend.info.model_dump_json())})
        status = "failed" if state["error"] else "loading"
        return JSONResponse({"status": status, "error": state["error"]}, 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        """Prometheus text exposition."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(_Guard, max_bytes=limits.max_request_bytes, metrics=metrics)
    register_compat_routes(app, ready_scorer, authorize, limits)
    return app


def _field(error: dict) -> str:
    """`items`, `options.acc_weight`, or `body` for the body as a whole."""
    if error.get("type") == "json_invalid":
        return "body"  # its location is a character offset
    return field_path([p for p in error.get("loc", ()) if p != "body"])


async def _unless_disconnected(request: Request, work):
    """Run `work`, cancelling it when the client disconnects (queued probes are dropped)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        log.info("client disconnected; its scoring was cancelled")
        raise _ClientGone()
    return task.result()


class _ClientGone(Exception):
    pass


class _ReloadDisabled(ReloadError):
    code = "reload_disabled"


class _NotReady(Exception):
    pass


class _Unauthorized(Exception):
    pass
