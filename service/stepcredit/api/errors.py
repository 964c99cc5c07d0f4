"""The one error shape every route answers with, and its OpenAPI documentation.

Every status the service itself sends (not uvicorn's own 400 for unparseable HTTP or its
503 past `max_connections`, which never reach the app) carries
`{"error": {"code", "message", "field"?, "errors"?, "items"?}}`.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

__all__ = ["ErrorBody", "error", "error_responses", "SHUTTING_DOWN"]

SHUTTING_DOWN = (
    "the service is draining for shutdown and stopped before this item was scored; "
    "retry it (another replica will take it)"
)
"""The message of an item's `shutting_down` error: what a trainer should do about it."""


class FieldError(BaseModel):
    field: str = Field(description="where in the request, e.g. `options.acc_weight`")
    message: str


class ItemFailure(BaseModel):
    index: int = Field(description="position of the item in the request")
    code: str = Field(description="the item's error code, as in a `/v1/score` result")
    message: str


class ErrorDetail(BaseModel):
    code: str = Field(
        description="machine-readable cause: `invalid_request`, `limit_exceeded`, `body_too_large`, "
        "`body_timeout`, `unauthorized`, `overloaded`, `not_ready`, `draining`, `shutting_down`, "
        "`backend_dead`, a reload code, `item_failed` (compat routes), `not_found`, `method_not_allowed`"
    )
    message: str = Field(description="for people; never echoes input values")
    field: str | None = Field(None, description="the request field at fault, when there is one")
    errors: list[FieldError] | None = Field(None, description="422 `invalid_request`: up to 10 field errors")
    items: list[ItemFailure] | None = Field(None, description="compat routes' `item_failed`: the items not scored")


class ErrorBody(BaseModel):
    error: ErrorDetail


def error(status: int, code: str, message: str, headers: dict | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, **extra}}, status, headers=headers)


_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}

_DESCRIPTIONS = {
    401: ("`unauthorized`: missing or wrong bearer token (only when the service has an API key)", False),
    403: ("`reload_disabled`: reloads are turned off on this service", False),
    404: ("`not_found`", False),
    408: ("`body_timeout`: the body did not arrive within `STEPCREDIT_BODY_TIMEOUT_S`", False),
    409: ("`reload_in_progress`: another reload is running", False),
    413: ("`body_too_large` (over `STEPCREDIT_MAX_REQUEST_BYTES`) or `limit_exceeded` (too many items)", False),
    422: ("`invalid_request` (malformed body or request-level options), or a code naming the field at fault", False),
    429: (
        "`overloaded`: the scoring queue is full, or this request's scores would take longer than "
        "`STEPCREDIT_MAX_QUEUE_WAIT_S` (Retry-After: when the backlog will have drained enough)",
        True,
    ),
    500: ("`reload_failed`: out of memory while loading", False),
    501: ("`reload_unsupported`: the backend cannot reload (`vllm-remote`)", False),
    503: (
        "`not_ready` (the model is loading or failed), `draining` (the service is shutting down: retry "
        "on another replica), `backend_dead`, or an item that may pass on retry (compat routes)",
        True,
    ),
}


def error_responses(*statuses: int, by_reference: bool = False) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses=` for these statuses, each with the error body's schema.

    `by_reference`: for a route whose own answer is not JSON (FastAPI would document its
    errors in the route's media type); the app's other routes put ErrorBody in the schema."""
    # Bytes that are not HTTP never reach the app: the HTTP server answers them itself.
    out: dict[int | str, dict[str, Any]] = {
        400: {
            "description": "the request is not valid HTTP/1.1 (answered by the HTTP server before the app, "
            "as text/plain; a malformed JSON body is 422)",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    }
    for status in statuses:
        description, retry = _DESCRIPTIONS[status]
        if by_reference:
            body = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
        else:
            body = {"model": ErrorBody}
        out[status] = {**body, "description": description, **({"headers": _RETRY_AFTER} if retry else {})}
    return out
