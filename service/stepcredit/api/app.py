"""FastAPI app factory: routes are thin, errors map to status codes in one place.

`create_app(settings, scorer=None)` builds the app. Without a scorer the model
loads in the background after start-up, so /health answers at once and /ready
turns 200 when the model is loaded and warmed. Tests inject a scorer.

What reaches a route has passed the Guard (guard.py): bearer token, drain, body size
and body time. `app.state.drain` is the drain SIGTERM starts (server.py runs it).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import signal
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal, TypeVar

from fastapi import Depends, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from stepcredit_client.report import playground_csp, render_playground

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
from .drain import RETRY_AFTER_S, Drain, DrainExpired
from .errors import SHUTTING_DOWN, error, error_responses
from .guard import BASIC_CHALLENGE, Guard, basic_allowed, token_ok
from .metrics import Metrics

__all__ = ["create_app"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_RELOAD_STATUS = {
    "invalid_checkpoint": 422,
    "incompatible_model": 422,
    "reload_in_progress": 409,
    "reload_unsupported": 501,
    "reload_disabled": 403,
}  # any other ReloadError (out of memory while loading): 500

OPEN_ROUTES = ("/health", "/ready")
"""Answered without the API key: the orchestrator's liveness and readiness probes.
/ready gives its details (model, error) only with the key."""
WORK_ROUTES = ("/v1/score", "/v1/admin/reload", "/get_reward", "/slime/reward")
"""Refused while draining; the drain waits for those accepted before."""
PAGE_ROUTES = ("/ui",)
"""Opened by a browser, which cannot send a bearer header when it navigates: with an API key
set, they answer 401 with a Basic challenge, and the key is the password."""

CLOSE_BOUND_S = 5.0
"""Longest the scorer may take to close at shutdown. A backend call running in a worker
thread cannot be interrupted; past this the process exits without waiting for it."""


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "loading", "failed", "draining"]
    model: ModelInfo | None = None
    """With the API key (or when none is set): the model that scores the next batch."""
    error: str | None = None
    """With the API key (or when none is set): why the model failed to load."""


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
    drain = Drain(settings.drain_timeout_s)
    state: dict = {"scorer": scorer, "error": None}

    def is_ready() -> bool:
        current = state["scorer"]
        return current is not None and current.ready and not drain.draining

    metrics.ready.set_function(lambda: float(is_ready()))
    metrics.draining.set_function(lambda: float(drain.draining))

    def of_scorer(read: Callable[[Scorer], float | None]) -> Callable[[], float]:
        """A gauge that reads the scorer serving now (0 before one exists)."""
        return lambda: float((read(state["scorer"]) or 0.0) if state["scorer"] is not None else 0.0)

    metrics.queue_depth.set_function(of_scorer(lambda s: s.queue_depth))
    metrics.queued_tokens.set_function(of_scorer(lambda s: s.batcher.queued_tokens))
    metrics.drain_rate.set_function(of_scorer(lambda s: s.batcher.drain_rate))

    async def load() -> None:
        try:
            current = state["scorer"]
            if current is None:
                backend = await asyncio.to_thread(build_backend, settings)
                current = Scorer(backend, settings)
                state["scorer"] = current
            if not current.ready:
                await current.start()
            metrics.set_model(current.backend.info)
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
        # A model still loading runs on in its thread, which the process must not wait for.
        closed = loader.done()
        loader.cancel()
        if scorer is None and state["scorer"] is not None:
            try:
                await asyncio.wait_for(state["scorer"].close(), CLOSE_BOUND_S)
            except TimeoutError:
                log.warning("the scorer did not close within %g s (a backend call still runs)", CLOSE_BOUND_S)
                closed = False
        app.state.closed = closed

    app = FastAPI(
        title="StepCredit",
        version="0.1.0",
        description="Process (MIG) and outcome rewards for RL on multi-step reasoning. With an API key "
        "set, every route but /health and /ready needs `Authorization: Bearer <key>`.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    _document_limits(app, limits)
    app.state.load_state = state
    app.state.drain = drain
    app.state.closed = False
    """True once the scorer closed at shutdown with no thread of ours left running."""

    def ready_scorer() -> Scorer:
        current = state["scorer"]
        if current is None or not current.ready:
            raise _NotReady()
        return current

    async def authorize(request: Request) -> None:
        # The Guard has checked already, before the body; this keeps every route safe
        # on its own.
        allow_basic = basic_allowed(request.method, request.url.path, request.headers.get)
        if not token_ok(request.headers.get("authorization"), settings.api_key, allow_basic=allow_basic):
            raise _Unauthorized()

    protected = [Depends(authorize)]
    if settings.api_key is not None:  # documents the scheme (and the docs' "Authorize" button)
        protected.append(Security(HTTPBearer(auto_error=False, description="the service's API key")))

    async def score_items(raw: Request, current: Scorer, items: list[ScoreItem], options=None) -> ScoreBatch:
        """`current.score(items)`, stopped when its client leaves (_ClientGone) or when the
        drain deadline passes: then every item is a `shutting_down` error, never a reward."""
        try:
            return await _until_done(current.score(items, options), drain, raw)
        except DrainExpired:
            log.warning("drain deadline: %d items of a running request get shutting_down", len(items))
            results = [ScoreResult.failure(item.id, "shutting_down", SHUTTING_DOWN) for item in items]
            usage = Usage(items=len(items), items_error=len(items))
            return ScoreBatch(results, usage, model=current.backend.info)

    @app.exception_handler(_NotReady)
    async def _not_ready(request: Request, exc: _NotReady) -> JSONResponse:
        message = state["error"] or "the model is loading"
        return error(503, "not_ready", message, headers={"Retry-After": "5"})

    @app.exception_handler(_Unauthorized)
    async def _unauthorized(request: Request, exc: _Unauthorized) -> JSONResponse:
        if request.url.path in PAGE_ROUTES:
            message = "sign in with the API key as the password (any user name)"
            return error(401, "unauthorized", message, headers={"WWW-Authenticate": BASIC_CHALLENGE})
        return error(401, "unauthorized", "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

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
        return error(422, "invalid_request", message or "malformed request", field=field, errors=details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        # A body Python's JSON reader refuses after FastAPI's own checks (an integer of
        # more than 4,300 digits) comes as a bare 400: answer it like any malformed body.
        if exc.status_code == 400 and "parsing the body" in str(exc.detail):
            return error(422, "invalid_request", "the body could not be parsed as JSON", field="body")
        # Everything else (404, 405) in the one error shape too.
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error(exc.status_code, code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(LimitError)
    async def _limit(request: Request, exc: LimitError) -> JSONResponse:
        return error(exc.status, "limit_exceeded", str(exc), field=exc.field)

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        retry = str(max(1, math.ceil(exc.retry_after_s)))
        return error(429, "overloaded", str(exc), headers={"Retry-After": retry})

    @app.exception_handler(ReloadError)
    async def _reload_failed(request: Request, exc: ReloadError) -> JSONResponse:
        metrics.reloads.labels(exc.code).inc()
        return error(_RELOAD_STATUS.get(exc.code, 500), exc.code, str(exc))

    @app.exception_handler(BackendDeadError)
    async def _dead(request: Request, exc: BackendDeadError) -> JSONResponse:
        log.error("backend dead, shutting down: %s", exc)
        state["error"] = f"backend dead: {exc}"
        if state["scorer"] is not None:
            state["scorer"].ready = False
        on_fatal()
        return error(503, "backend_dead", str(exc))

    @app.post(
        "/v1/score",
        response_model=ScoreResponse,
        dependencies=protected,
        responses=error_responses(401, 408, 413, 422, 429, 503),
    )
    async def score(request: ScoreRequest, raw: Request, response: Response) -> ScoreResponse:
        """Score a batch of items: MIG per step, outcome, gates and spans (SPEC section 7).
        An item the service could not score before a shutdown is its own `shutting_down` error."""
        current = ready_scorer()
        check_limits(request, limits)
        if request.items:  # a full queue refuses before the items cost any validation
            current.batcher.check_capacity(len(request.items))
        # Each item is validated on its own: a bad one is its own `invalid_item` error.
        parsed = parse_items(request.items, limits)
        valid = [p for p in parsed if isinstance(p, ScoreItem)]
        started = time.perf_counter()
        batch = ScoreBatch([], Usage())
        if valid:
            batch = await score_items(raw, current, valid, request.options)
        scored = iter(batch.results)
        batch.results = [p if isinstance(p, ScoreResult) else next(scored) for p in parsed]
        batch.usage.items = len(batch.results)
        batch.usage.items_ok = sum(r.status == "ok" for r in batch.results)
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

    @app.post(
        "/v1/admin/reload",
        response_model=ReloadResponse,
        dependencies=protected,
        responses=error_responses(401, 403, 408, 409, 413, 422, 500, 501, 503),
    )
    async def reload(request: ReloadRequest) -> ReloadResponse:
        """Score with the weights in `path` from the next batch on (a trainer's new
        checkpoint). Batches in flight finish on the old weights; on any failure the
        old weights keep serving."""
        if not settings.admin_reload:
            raise _ReloadDisabled("reloads are turned off on this service (STEPCREDIT_ADMIN_RELOAD=false)")
        if settings.api_key is None and settings.admin_reload_root is None and not _loopback(settings.host):
            # Anyone on the network could make the service read any folder on its machine.
            raise _ReloadDisabled(
                f"reloads on a service listening on {settings.host} need STEPCREDIT_API_KEY or "
                "STEPCREDIT_ADMIN_RELOAD_ROOT"
            )
        current = ready_scorer()
        try:
            # Shielded: a client that gives up must not leave a swap half done.
            work = asyncio.shield(current.reload(Path(request.path), request.revision, root=settings.admin_reload_root))
            outcome = await _until_done(work, drain)
        except BackendDeadError:  # the old weights were freed and could not be read again
            metrics.reloads.labels("backend_dead").inc()
            raise
        except DrainExpired:
            metrics.reloads.labels("shutting_down").inc()
            message = "the service shut down before the reload finished; reload on the replica that replaces it"
            return error(503, "shutting_down", message, headers={"Retry-After": str(RETRY_AFTER_S)})
        metrics.reloads.labels("ok").inc()
        metrics.reload_latency.observe(outcome.load_s)
        metrics.set_model(outcome.model)
        return ReloadResponse(
            model=outcome.model, previous_revision=outcome.previous_revision, mode=outcome.mode, load_s=outcome.load_s
        )

    @app.get("/v1/model", response_model=ModelInfo, dependencies=protected, responses=error_responses(401, 503))
    async def model() -> ModelInfo:
        """The scoring model and how it runs."""
        return ready_scorer().backend.info

    @app.get("/health", response_model=Health)
    async def health() -> Health:
        """Liveness: 200 while the process runs, draining included (the model may still be loading)."""
        return Health(status="ok")

    @app.get(
        "/ready",
        response_model=Readiness,
        response_model_exclude_none=True,
        responses={503: {"model": Readiness, "description": "`loading`, `failed` or `draining`"}},
    )
    async def ready(request: Request) -> JSONResponse:
        """Readiness: 200 once the model is loaded and warmed; 503 before, after a fatal
        error, and from SIGTERM on (`draining`). Without the API key only `status`."""
        current = state["scorer"]
        if drain.draining:
            status = "draining"
        elif current is not None and current.ready:
            status = "ready"
        else:
            status = "failed" if state["error"] else "loading"
        body: dict = {"status": status}
        if token_ok(request.headers.get("authorization"), settings.api_key):
            if current is not None and current.ready:
                body["model"] = json.loads(current.backend.info.model_dump_json())
            if status != "ready":
                body["error"] = state["error"]
        return JSONResponse(body, 200 if status == "ready" else 503)

    @app.get(
        "/metrics",
        dependencies=protected,
        response_class=PlainTextResponse,
        responses=error_responses(401, by_reference=True),
    )
    async def prometheus() -> Response:
        """Prometheus text exposition (behind the API key when one is set)."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    ui_page = render_playground(max_items_per_request=limits.max_items_per_request)  # constant: built once

    @app.get("/ui", response_class=HTMLResponse, include_in_schema=False)
    async def playground(request: Request) -> Response:
        """The playground: paste, upload or load the example items, score them through
        /v1/score and see the step-credit page (the report's renderer)."""
        if not token_ok(request.headers.get("authorization"), settings.api_key, allow_basic=True):  # the Guard checked already
            raise _Unauthorized()
        headers = {
            "Content-Security-Policy": playground_csp(),
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "X-Frame-Options": "DENY",
        }
        return HTMLResponse(ui_page, headers=headers)

    register_compat_routes(app, ready_scorer, score_items, protected, limits)
    app.add_middleware(
        Guard,
        router=app.router,
        metrics=metrics,
        drain=drain,
        api_key=settings.api_key,
        open_routes=OPEN_ROUTES,
        work_routes=WORK_ROUTES,
        page_routes=PAGE_ROUTES,
        max_bytes=limits.max_request_bytes,
        body_timeout_s=settings.body_timeout_s,
    )
    return app


def _document_limits(app: FastAPI, limits) -> None:
    """Put this service's configured limits into its OpenAPI (maxItems, maximum,
    maxLength), so a client (or a schema fuzzer) knows what will be refused."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schemas = build()["components"]["schemas"]  # FastAPI caches this very dict

            def bound(prop: dict, **keywords) -> None:
                for branch in prop.get("anyOf", [prop]):  # the non-null branch of `X | None`
                    if branch.get("type") not in (None, "null"):
                        branch.update(keywords)

            request_items = schemas["ScoreRequest"]["properties"]["items"]
            request_items["maxItems"] = limits.max_items_per_request
            for item in (schemas["ScoreItem"], request_items["items"]):
                props = item["properties"]
                bound(props["references"], maxItems=limits.max_references_per_item)
                props["references"]["items"]["maxLength"] = limits.max_reference_chars
                bound(props["completion_token_ids"], maxItems=limits.max_token_ids)
                bound(props["images"], maxItems=limits.max_images_per_item)
            options = schemas["ItemOptions"]["properties"]
            bound(options["max_steps"], maximum=limits.max_steps_limit)
            for name in ("cot_pattern", "answer_pattern"):
                bound(options[name], maxLength=limits.max_pattern_chars)
        return app.openapi_schema

    app.openapi = openapi


def _field(error: dict) -> str:
    """`items`, `options.acc_weight`, or `body` for the body as a whole."""
    if error.get("type") == "json_invalid":
        return "body"  # its location is a character offset
    return field_path([p for p in error.get("loc", ()) if p != "body"])


async def _until_done(work: Awaitable[T], drain: Drain, request: Request | None = None) -> T:
    """`work`'s result. `work` is cancelled (queued probes are dropped) when the drain
    deadline passes (DrainExpired) or, given `request`, when its client disconnects
    (_ClientGone)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watchers = {asyncio.ensure_future(drain.wait_expired())}
    if request is not None:
        watchers.add(asyncio.ensure_future(disconnected()))
    try:
        await asyncio.wait({task, *watchers}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        for watcher in watchers:
            watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    if drain.expired:
        raise DrainExpired()
    log.info("client disconnected; its scoring was cancelled")
    raise _ClientGone()


class _ClientGone(Exception):
    pass


def _loopback(host: str) -> bool:
    """Only this machine can connect (`localhost`, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


class _ReloadDisabled(ReloadError):
    code = "reload_disabled"


class _NotReady(Exception):
    pass


class _Unauthorized(Exception):
    pass
