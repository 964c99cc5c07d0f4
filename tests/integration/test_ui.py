"""`GET /ui`, the playground, and the API key as a browser sends it (HTTP Basic).
What the page does in a browser: tests/ui/test_ui_browser.py."""

from __future__ import annotations

import base64
import json
import re

import pytest
from pydantic import SecretStr

from stepcredit.api import create_app
from stepcredit.api.app import OPEN_ROUTES
from stepcredit.api.guard import token_ok
from stepcredit_client.report import example_items_text

from .conftest import asgi_client

KEY = "s3cret"
GOOD = {"prompt": "What is 2+3?", "completion": "<think>\n2+3 = 5\n</think>\n<answer>5</answer>", "references": ["5"]}


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def embedded(page: str) -> dict:
    block = re.search(r'<script type="application/json" id="stepcredit-data">(.*?)</script>', page, re.S)
    return json.loads(block.group(1))


@pytest.fixture
async def keyed(tiny_scorer, settings):
    app = create_app(settings.model_copy(update={"api_key": SecretStr(KEY)}), scorer=tiny_scorer)
    async with asgi_client(app) as c:
        yield c


def test_basic_credentials_carry_the_key_as_the_password_and_nothing_else_passes():
    key = SecretStr(KEY)

    def ok(header):
        return token_ok(header, key, allow_basic=True)

    assert ok(basic("anyone", KEY)["Authorization"])
    assert ok(basic("", KEY)["Authorization"])
    assert ok(basic("a:b", KEY)["Authorization"]) is False  # the password follows the first colon
    assert ok(f"Bearer {KEY}") and ok(f"bearer {KEY}")
    for wrong in (basic("u", "nope")["Authorization"], basic(KEY, "")["Authorization"],
                  "Basic " + base64.b64encode(KEY.encode()).decode(),  # no colon: no password at all
                  "Basic %%%not-base64", "Basic " + base64.b64encode(b"u:\xff\xfe").decode(),
                  "Basic \xe9\xe9",  # header bytes outside ASCII (read as latin-1): no 500
                  f"Bearer {KEY}x", f"Bearer {KEY[:-1]}", f"Token {KEY}", KEY, "", None):  # fmt: skip
        assert ok(wrong) is False, wrong
    # Where Basic is not allowed, the right Basic credentials open nothing.
    assert token_ok(basic("me", KEY)["Authorization"], key) is False
    assert token_ok(None, None)  # no key set: everything passes


def test_basic_is_taken_only_for_the_page_and_its_own_json_call():
    """A browser sends held Basic credentials with requests other sites' pages start: Basic
    must open no route a forged request could use (reload, compat routes), and /v1/score only
    as the page's own JSON fetch."""
    from stepcredit.api.guard import basic_allowed

    def allowed(method, path, **headers):
        lower = {k.replace("_", "-").lower(): v for k, v in headers.items()}
        return basic_allowed(method, path, lower.get)

    same = {"content_type": "application/json", "sec_fetch_site": "same-origin", "origin": "http://svc:8000", "host": "svc:8000"}
    assert allowed("GET", "/ui") and allowed("POST", "/v1/score", **same)
    assert allowed("POST", "/v1/score", content_type="application/json; charset=utf-8", host="svc:8000")  # no browser marks
    for method, path in (("POST", "/v1/admin/reload"), ("POST", "/get_reward"), ("POST", "/slime/reward"),
                         ("GET", "/metrics"), ("GET", "/v1/model"), ("GET", "/v1/score")):  # fmt: skip
        assert not allowed(method, path, **same), path
    assert not allowed("POST", "/v1/score", **{**same, "content_type": "text/plain"})  # a "simple" cross-site POST
    assert not allowed("POST", "/v1/score", **{**same, "sec_fetch_site": "cross-site"})
    assert not allowed("POST", "/v1/score", **{**same, "sec_fetch_site": "same-site"})
    assert not allowed("POST", "/v1/score", content_type="application/json", origin="http://evil.example", host="svc:8000")


async def test_ui_serves_the_playground_with_its_limits_example_and_csp(client, settings):
    response = await client.get("/ui")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "script-src 'sha256-" in csp
    assert response.headers["cache-control"] == "no-store" and response.headers["x-frame-options"] == "DENY"
    data = embedded(response.text)
    assert data["mode"] == "playground"
    assert data["playground"]["max_items_per_request"] == settings.max_items_per_request
    assert data["playground"]["example"] == example_items_text()
    assert "/ui" not in (await client.get("/openapi.json")).json()["paths"]  # a page, not an API


async def test_with_a_key_ui_asks_the_browser_for_basic_credentials(keyed):
    # Catches: a page a browser can never open (a Bearer challenge it cannot answer), and a
    # /ui left open when the service has a key.
    assert "/ui" not in OPEN_ROUTES
    anonymous = await keyed.get("/ui")
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"] == 'Basic realm="StepCredit"'
    assert anonymous.json()["error"]["code"] == "unauthorized"
    assert (await keyed.get("/ui", headers=basic("me", "wrong"))).status_code == 401
    assert (await keyed.get("/ui", headers=basic("me", KEY))).status_code == 200
    assert (await keyed.get("/ui", headers={"Authorization": f"Bearer {KEY}"})).status_code == 200


async def test_basic_opens_the_page_and_its_score_call_only_and_the_api_keeps_its_bearer_challenge(keyed):
    # The page's fetch to /v1/score carries the browser's Basic credentials.
    page_call = {**basic("me", KEY), "Sec-Fetch-Site": "same-origin"}
    scored = await keyed.post("/v1/score", json={"items": [GOOD]}, headers=page_call)
    assert scored.status_code == 200 and scored.json()["results"][0]["status"] == "ok"
    # Anything else a browser holding the credentials could be made to send: refused.
    for path in ("/v1/model", "/metrics", "/openapi.json"):
        assert (await keyed.get(path, headers=basic("x", KEY))).status_code == 401, path
    reload = await keyed.post("/v1/admin/reload", json={"path": "/tmp/x"}, headers=page_call)
    assert reload.status_code == 401
    forged = await keyed.post("/v1/score", content=json.dumps({"items": [GOOD]}),
                              headers={**basic("me", KEY), "Content-Type": "text/plain"})  # fmt: skip
    assert forged.status_code == 401
    cross = await keyed.post("/v1/score", json={"items": [GOOD]}, headers={**basic("me", KEY), "Sec-Fetch-Site": "cross-site"})
    assert cross.status_code == 401
    refused = await keyed.post("/v1/score", json={"items": [GOOD]})
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    assert refused.json()["error"]["message"] == "missing or wrong bearer token"
    assert (await keyed.post("/v1/score", json={"items": [GOOD]}, headers=basic("me", "no"))).status_code == 401
    # A non-ASCII Basic header is a 401, not a server error, on keyed and open routes alike.
    odd = {"Authorization": b"Basic \xe9"}
    assert (await keyed.get("/ui", headers=odd)).status_code == 401
    assert (await keyed.get("/ready", headers=odd)).status_code == 200


async def test_ui_requests_are_counted_under_their_own_route(keyed):
    await keyed.get("/ui")
    await keyed.get("/ui", headers=basic("me", KEY))
    text = (await keyed.get("/metrics", headers={"Authorization": f"Bearer {KEY}"})).text
    assert 'stepcredit_requests_total{route="/ui",status="401"} 1.0' in text
    assert 'stepcredit_requests_total{route="/ui",status="200"} 1.0' in text
