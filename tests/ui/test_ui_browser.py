"""`GET /ui` in a real browser against a real `stepcredit serve` (the tiny random model)
with an API key: the browser is asked for the key (HTTP Basic), loads the shipped example,
scores it through /v1/score in requests of the server's size and shows the page; request
errors are shown to the user."""

from __future__ import annotations

import json

import httpx
import pytest
from playwright.sync_api import Error as PlaywrightError

from stepcredit_client.report import example_items_text
from tests.e2e.processes import serve

KEY = "ui-s3cret"
CHUNK = 4  # the server's max_items_per_request: the 6 example items take two requests


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_model_path):
    log = tmp_path_factory.mktemp("ui") / "serve.log"
    args = ["--model", str(tiny_model_path), "--device", "cpu"]
    with serve(args, log, ready_s=120, STEPCREDIT_API_KEY=KEY, STEPCREDIT_MAX_ITEMS_PER_REQUEST=str(CHUNK)) as served:
        yield served.base


def test_without_credentials_the_browser_is_asked_for_them(new_page, service):
    # What the browser gets: 401 with a Basic challenge (a Bearer one it could not answer).
    anonymous = httpx.get(f"{service}/ui", headers={"Accept": "text/html"}, timeout=10)
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"] == 'Basic realm="StepCredit"'
    # A headless browser has nobody to type the key: the challenge ends the navigation
    # (Chromium's answer to a cancelled sign-in), and a wrong key gets the 401 again. No
    # playground is shown either way.
    with pytest.raises(PlaywrightError, match="ERR_INVALID_AUTH_CREDENTIALS"):
        new_page().page.goto(f"{service}/ui")
    wrong = new_page(http_credentials={"username": "me", "password": "wrong"})
    assert wrong.page.goto(f"{service}/ui").status == 401
    assert wrong.page.locator("[data-testid=score]").count() == 0


def test_signed_in_the_example_is_scored_by_the_live_service(new_page, service):
    watched = new_page(http_credentials={"username": "me", "password": KEY})
    page = watched.page
    posts = []
    page.on("request", lambda r: posts.append(r) if r.url.endswith("/v1/score") else None)
    response = page.goto(f"{service}/ui")
    assert response.status == 200 and "connect-src 'self'" in response.headers["content-security-policy"]
    page.click("[data-testid=load-example]")
    assert page.input_value("[data-testid=input]") == example_items_text()
    page.click("[data-testid=score]")
    page.wait_for_selector("[data-testid=status]:has-text('Scored')", timeout=120_000)
    assert page.locator("[data-testid=status]").inner_text() == "Scored 6 items (1 with an error)."
    # Two requests of at most the server's limit, with the browser's Basic credentials.
    assert [len(json.loads(p.post_data)["items"]) for p in posts] == [CHUNK, 6 - CHUNK]
    cards = page.locator("[data-testid=card]")
    assert cards.count() == 6
    assert page.locator("[data-testid=card][data-status=ok] [data-testid=curve]").count() == 5
    error = page.locator("[data-testid=card][data-status=error]")
    assert error.locator("[data-testid=error-code]").inner_text() == "invalid_item"
    assert "tiny" in page.locator("[data-testid=meta]").inner_text()  # the model that scored them
    page.select_option("[data-testid=sort]", "mig")
    page.select_option("[data-testid=order]", "desc")
    positions = page.eval_on_selector_all("[data-testid=card]", "cs => cs.map(c => c.dataset.status)")
    assert positions[-1] == "error"
    watched.screenshot("ui-scored-example")
    assert watched.errors == []


def test_request_errors_are_shown_and_the_key_field_is_sent_as_bearer(new_page, service):
    watched = new_page(http_credentials={"username": "me", "password": KEY})
    page = watched.page
    page.goto(f"{service}/ui")
    # An overloaded service: its 429 and Retry-After reach the user, nothing is made up.
    overloaded = json.dumps({"error": {"code": "overloaded", "message": "the scoring queue is full"}})
    page.route("**/v1/score", lambda route: route.fulfill(
        status=429, headers={"Retry-After": "7", "Content-Type": "application/json"}, body=overloaded))
    lines = example_items_text().splitlines()
    page.fill("[data-testid=input]", "\n".join(["{not json", lines[0]]))
    page.click("[data-testid=score]")
    status = page.locator("[data-testid=status]")
    status.locator("text=Scoring stopped").wait_for()
    assert "HTTP 429 overloaded: the scoring queue is full (Retry-After: 7 s)" in status.inner_text()
    assert "error" in status.get_attribute("class")
    codes = page.locator("[data-testid=error-code]").all_inner_texts()
    assert codes == ["invalid_item", "not_scored"]  # the bad line is its own error, never dropped
    assert "line 1: not JSON" in page.locator("[data-testid=card]").first.inner_text()
    watched.screenshot("ui-overloaded")

    # The key typed into the page is sent as a bearer token (for browsers that do not
    # reuse the page's Basic credentials), and the live service scores with it.
    page.unroute("**/v1/score")
    sent = []
    page.on("request", lambda r: sent.append(r.headers.get("authorization")) if r.url.endswith("/v1/score") else None)
    page.fill("#api-key", KEY)
    page.fill("[data-testid=input]", lines[0])
    page.click("[data-testid=score]")
    page.wait_for_selector("[data-testid=status]:has-text('Scored 1 items')", timeout=60_000)
    assert sent == [f"Bearer {KEY}"]
    assert page.locator("[data-testid=card][data-status=ok]").count() == 1
    assert [e for e in watched.errors if "429" not in e] == []  # the browser logs the refused request itself
