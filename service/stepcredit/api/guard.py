"""The ASGI middleware every request meets first, before any body byte is read.

In order:
1. it names the request's route template for the metrics (`/v1/score`; every unknown
   path shares `unmatched`, so random URLs cannot grow `/metrics`);
2. with an API key set, every path but the open ones needs the key as a bearer token, or
   as the password of HTTP Basic (what a browser sends) on the page and its own JSON call
   only (`basic_allowed`): 401 before the body is read (a client cannot hold the server on
   a body it never sends). The browser page (/ui) answers it with a Basic challenge, so the
   browser asks for the key; the API keeps its Bearer one;
3. while draining, new work (scoring, reload) gets 503 `draining` with Retry-After;
4. the body is read under the byte limit (413) and the body timeout (408), then
   replayed to the app.

Answers given before the body was read say `Connection: close`: the unread rest of
the body would otherwise be taken for the next request.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
from collections.abc import Callable, Collection
from urllib.parse import urlsplit

from pydantic import SecretStr
from starlette.routing import Match, Router

from .drain import RETRY_AFTER_S, Drain
from .errors import error
from .metrics import Metrics

__all__ = ["BASIC_CHALLENGE", "BASIC_ROUTES", "Guard", "basic_allowed", "token_ok", "UNMATCHED"]

UNMATCHED = "unmatched"
"""The route label of every path no route serves."""

_CLOSE = {"Connection": "close"}


BASIC_CHALLENGE = 'Basic realm="StepCredit"'
"""The 401 challenge of the browser pages: a browser cannot send a bearer header when it
navigates, but it asks for a user and password on this and sends them with every later
request to the service, the page's own fetches included."""


BASIC_ROUTES = {("GET", "/ui"), ("POST", "/v1/score")}
"""Where HTTP Basic is taken: the page and the one call it makes. A browser sends Basic
credentials it holds with any request to the origin, also one a page of another site
starts (cross-site request forgery); elsewhere (reload, compat routes, metrics) only a
bearer token, which a browser never adds by itself, opens the route."""


def basic_allowed(method: str, path: str, header: Callable[[str], str | None]) -> bool:
    """May this request authenticate with Basic? Only on BASIC_ROUTES, and a POST only as
    the page's own fetch: JSON (another site's page cannot send JSON without a CORS
    preflight, which this service never grants), and not marked as coming from another
    site (`Sec-Fetch-Site`, or an `Origin` whose host is not this one)."""
    if (method, path) not in BASIC_ROUTES:
        return False
    if method == "GET":
        return True
    content_type = (header("content-type") or "").split(";")[0].strip().lower()
    if content_type != "application/json":
        return False
    site = header("sec-fetch-site")
    if site is not None and site.lower() != "same-origin":
        return False
    origin = header("origin")
    if origin is not None and urlsplit(origin).netloc.lower() != (header("host") or "").lower():
        return False
    return True


def _same(given: str, key: SecretStr) -> bool:
    # Digests of equal length: compare_digest on the raw strings would leak the key's length.
    return secrets.compare_digest(
        hashlib.sha256(given.encode("utf-8", "surrogateescape")).digest(),
        hashlib.sha256(key.get_secret_value().encode()).digest(),
    )


def token_ok(authorization: str | None, api_key: SecretStr | None, *, allow_basic: bool = False) -> bool:
    """True when no key is set, or `authorization` is `Bearer <key>`, or (where
    `allow_basic`: see `basic_allowed`) `Basic base64(<any user>:<key>)`."""
    if api_key is None:
        return True
    scheme, _, token = (authorization or "").partition(" ")
    scheme, token = scheme.lower(), token.strip()
    if scheme == "basic" and allow_basic:
        try:  # RFC 7617: the password is what follows the first colon; any user
            _, colon, password = base64.b64decode(token, validate=True).decode("utf-8").partition(":")
        except ValueError:  # bad base64, non-ASCII header bytes, not UTF-8
            return False
        return bool(colon) and _same(password, api_key)
    return scheme == "bearer" and _same(token, api_key)


class Guard:
    def __init__(
        self,
        app,
        *,
        router: Router,
        metrics: Metrics,
        drain: Drain,
        api_key: SecretStr | None,
        open_routes: Collection[str],
        work_routes: Collection[str],
        page_routes: Collection[str] = (),
        max_bytes: int,
        body_timeout_s: float,
    ) -> None:
        self.app, self.router, self.metrics, self.drain = app, router, metrics, drain
        self.api_key, self.open_routes, self.work_routes = api_key, frozenset(open_routes), frozenset(work_routes)
        self.page_routes = frozenset(page_routes)
        self.max_bytes, self.body_timeout_s = max_bytes, body_timeout_s

    def route_of(self, scope) -> str:
        """The template of the route that serves this path (any method), else UNMATCHED."""
        for route in self.router.routes:
            match, _ = route.matches(scope)
            if match is not Match.NONE:
                return route.path
        return UNMATCHED

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = self.route_of(scope)
        status = {"code": None}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if route in self.work_routes:
                with self.drain.work():
                    await self._handle(scope, receive, counting_send, route)
            else:
                await self._handle(scope, receive, counting_send, route)
        except Exception:
            status["code"] = status["code"] or 500  # answered by the outermost middleware
            raise
        finally:
            if status["code"] is not None:  # a client that left before any answer is not counted
                self.metrics.requests.labels(route, str(status["code"])).inc()

    async def _handle(self, scope, receive, send, route: str) -> None:
        headers = dict(scope["headers"])
        if route not in self.open_routes:
            authorization = headers.get(b"authorization", b"").decode("latin-1")

            def header(name: str) -> str | None:
                value = headers.get(name.encode())
                return None if value is None else value.decode("latin-1")

            allow_basic = basic_allowed(scope["method"], route, header)
            if not token_ok(authorization, self.api_key, allow_basic=allow_basic):
                message = "missing or wrong bearer token"
                challenge = "Bearer"
                if route in self.page_routes:
                    message, challenge = "sign in with the API key as the password (any user name)", BASIC_CHALLENGE
                response = error(401, "unauthorized", message, headers={"WWW-Authenticate": challenge, **_CLOSE})
                return await response(scope, receive, send)
        if route in self.work_routes and self.drain.draining:
            response = error(
                503, "draining", "the service is shutting down; retry on another replica",
                headers={"Retry-After": str(RETRY_AFTER_S), **_CLOSE},
            )  # fmt: skip
            return await response(scope, receive, send)
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        if declared > self.max_bytes:
            message = f"body is {declared} bytes, limit {self.max_bytes}"
            return await error(413, "body_too_large", message, headers=_CLOSE)(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        body = await self._read_body(scope, receive, send)
        if body is None:
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read_body(self, scope, receive, send) -> bytes | None:
        """The whole body, or None once an error was answered (or the client left)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout_s
        chunks, size, more = [], 0, True
        while more:
            message = await self._receive_until(receive, deadline)
            if message is None:
                if self.drain.expired:
                    response = error(503, "draining", "the service shut down before the body arrived",
                                     headers={"Retry-After": str(RETRY_AFTER_S), **_CLOSE})  # fmt: skip
                else:
                    message = f"the body did not arrive within {self.body_timeout_s:g} s"
                    response = error(408, "body_timeout", message, headers=_CLOSE)
                await response(scope, receive, send)
                return None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                message = f"body exceeds {self.max_bytes} bytes"
                await error(413, "body_too_large", message, headers=_CLOSE)(scope, receive, send)
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)

    async def _receive_until(self, receive, deadline: float):
        """The next message, or None at `deadline` or when the drain deadline passes."""
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            return None
        message = asyncio.ensure_future(receive())
        expiry = asyncio.ensure_future(self.drain.wait_expired())
        try:
            await asyncio.wait({message, expiry}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        finally:
            expiry.cancel()
            if not message.done():
                message.cancel()
        return message.result() if message.done() and not message.cancelled() else None
