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
    assert token_ok(basic("anyone", KEY)["Authorization"], key)
    assert token_ok(basic("", KEY)["Authorization"], key)
    assert token_ok(basic("a:b", KEY)["Authorization"], key) is False  # the password follows the first colon
    assert token_ok(f"Bearer {KEY}", key) and token_ok(f"bearer {KEY}", key)
    for wrong in (basic("u", "nope")["Authorization"], basic(KEY, "")["Authorization"],
                  "Basic " + base64.b64encode(KEY.encode()).decode(),  # no colon: no password at all
                  "Basic %%%not-base64", "Basic " + base64.b64encode(b"u:\xff\xfe").decode(),
                  f"Token {KEY}", KEY, "", None):  # fmt: skip
        assert token_ok(wrong, key) is False, wrong
    assert token_ok(None, None)  # no key set: everything passes


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


async def test_basic_credentials_open_every_keyed_route_and_the_api_keeps_its_bearer_challenge(keyed):
    # The page's fetch to /v1/score carries the browser's Basic credentials.
    scored = await keyed.post("/v1/score", json={"items": [GOOD]}, headers=basic("me", KEY))
    assert scored.status_code == 200 and scored.json()["results"][0]["status"] == "ok"
    for path in ("/v1/model", "/metrics", "/openapi.json"):
        assert (await keyed.get(path, headers=basic("x", KEY))).status_code == 200, path
    refused = await keyed.post("/v1/score", json={"items": [GOOD]})
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    assert refused.json()["error"]["message"] == "missing or wrong bearer token"
    assert (await keyed.post("/v1/score", json={"items": [GOOD]}, headers=basic("me", "no"))).status_code == 401
    ready = (await keyed.get("/ready", headers=basic("me", KEY))).json()
    assert "model" in ready  # the key, however it is sent, shows the readiness details


async def test_ui_requests_are_counted_under_their_own_route(keyed):
    await keyed.get("/ui")
    await keyed.get("/ui", headers=basic("me", KEY))
    text = (await keyed.get("/metrics", headers=basic("me", KEY))).text
    assert 'stepcredit_requests_total{route="/ui",status="401"} 1.0' in text
    assert 'stepcredit_requests_total{route="/ui",status="200"} 1.0' in text
