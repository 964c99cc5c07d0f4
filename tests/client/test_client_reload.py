"""`Client.reload` / `AsyncClient.reload` and split batches that straddle a reload
(httpx.MockTransport plays the service)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

import stepcredit_client
from stepcredit_client import (
    AsyncClient,
    Client,
    ClientConfig,
    ConnectionFailed,
    InvalidRequestError,
    MixedRevisionsError,
    ReloadResponse,
    Retry,
)

FAST = Retry(max_attempts=4, backoff_s=0.001, max_backoff_s=0.01)
MODEL = {
    "name": "m", "path": "/ckpt/step-100", "backend": "hf", "strategy": "packed", "device": "cpu",
    "dtype": "float32", "vocab_size": 10, "max_context": 100,
}  # fmt: skip
ITEM = {"prompt": "p", "completion": "<think>\na\n</think>\n<answer>1</answer>", "references": ["1"]}


def reloaded(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    model = {**MODEL, "path": body["path"], "revision": body.get("revision", "fingerprint")}
    return httpx.Response(200, json={"model": model, "previous_revision": "old", "mode": "beside", "load_s": 1.5})


def client_with(handler) -> Client:
    return Client("http://svc", api_key="k", config=ClientConfig(retry=FAST), transport=httpx.MockTransport(handler))


def test_reload_posts_the_path_and_revision_and_returns_the_new_model():
    seen = []

    def handler(request):
        seen.append(request)
        return reloaded(request)

    result = client_with(handler).reload(Path("/ckpt/step-100"), revision="step-100")
    assert isinstance(result, ReloadResponse)
    assert result.model.revision == "step-100" and result.previous_revision == "old" and result.mode == "beside"
    (request,) = seen
    assert request.method == "POST" and request.url.path == "/v1/admin/reload"
    assert json.loads(request.content) == {"path": "/ckpt/step-100", "revision": "step-100"}
    assert request.headers["authorization"] == "Bearer k"
    # Loading a big checkpoint takes minutes: the scoring timeout does not apply.
    assert request.extensions["timeout"]["read"] == 900.0
    assert json.loads(client_with(reloaded).reload("/ckpt/x").model_dump_json())["model"]["revision"] == "fingerprint"


@pytest.mark.parametrize(
    ("status", "code"), [(409, "reload_in_progress"), (422, "invalid_checkpoint"), (422, "incompatible_model")]
)
def test_a_refused_reload_raises_with_its_code_and_is_not_retried(status, code):
    calls = []

    def handler(request):
        calls.append(request)
        return httpx.Response(status, json={"error": {"code": code, "message": "refused"}})

    with pytest.raises(InvalidRequestError) as info:
        client_with(handler).reload("/ckpt/bad")
    assert info.value.status == status and info.value.code == code
    assert len(calls) == 1


def test_a_reload_sent_before_the_model_is_ready_is_retried():
    answers = iter([httpx.Response(503, json={"error": {"code": "not_ready", "message": "loading"}})])

    def handler(request):
        return next(answers, None) or reloaded(request)

    assert client_with(handler).reload("/ckpt/a").model.path == "/ckpt/a"


def test_a_reload_whose_connection_dropped_is_not_sent_again():
    calls = []

    def dropped(request):
        calls.append(request)
        raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)

    # The service may be loading the first one: a second would only get 409.
    with pytest.raises(ConnectionFailed):
        client_with(dropped).reload("/ckpt/a")
    assert len(calls) == 1

    refused = []

    def refuse_once(request):
        refused.append(request)
        if len(refused) == 1:
            raise httpx.ConnectError("connection refused", request=request)
        return reloaded(request)

    assert client_with(refuse_once).reload("/ckpt/a").mode == "beside"  # nothing reached the service: safe
    assert len(refused) == 2


async def test_async_reload_has_the_same_contract():
    async def handler(request):
        return reloaded(request)

    async with AsyncClient("http://svc", transport=httpx.MockTransport(handler)) as client:
        result = await client.reload("/ckpt/step-2", revision="step-2")
    assert result.model.revision == "step-2"

    async def busy(request):
        return httpx.Response(409, json={"error": {"code": "reload_in_progress", "message": "busy"}})

    async with AsyncClient("http://svc", transport=httpx.MockTransport(busy)) as client:
        with pytest.raises(InvalidRequestError, match="reload_in_progress"):
            await client.reload("/ckpt/step-2")


def scored_by(revision_of):
    """A service whose chunk starting with item id `i` was scored by `revision_of(i)`."""

    def handler(request):
        items = json.loads(request.content)["items"]
        revision = revision_of(int(items[0]["id"]))
        results = [{"id": i["id"], "status": "ok", "mig_reward": 0.5, "steps": []} for i in items]
        return httpx.Response(
            200, json={"results": results, "model": {**MODEL, "revision": revision}, "usage": {"items": len(items)}}
        )

    return handler


def test_a_split_batch_scored_by_two_revisions_does_not_claim_one():
    items = [{**ITEM, "id": str(i)} for i in range(6)]
    client = Client("http://svc", config=ClientConfig(chunk_size=2), transport=httpx.MockTransport(
        scored_by(lambda first: "step-1" if first < 2 else "step-2")
    ))  # fmt: skip
    with pytest.raises(MixedRevisionsError) as info:
        client.score(items)
    error = info.value
    assert [r.id for r in error.results] == [str(i) for i in range(6)]
    assert [m.revision for m in error.models] == ["step-1", "step-1", "step-2", "step-2", "step-2", "step-2"]
    assert error.usage.items == 6
    assert "'step-1' for 2 items" in str(error) and "'step-2' for 4 items" in str(error)

    same = Client("http://svc", config=ClientConfig(chunk_size=2), transport=httpx.MockTransport(
        scored_by(lambda first: "step-2")
    ))  # fmt: skip
    assert same.score(items).model.revision == "step-2"


async def test_the_async_client_merges_revisions_the_same_way():
    items = [{**ITEM, "id": str(i)} for i in range(4)]
    handler = scored_by(lambda first: "a" if first == 0 else "b")

    async def async_handler(request):
        return handler(request)

    config = ClientConfig(chunk_size=2)
    async with AsyncClient("http://svc", config=config, transport=httpx.MockTransport(async_handler)) as client:
        with pytest.raises(MixedRevisionsError):
            await client.score(items)


def test_reload_types_mirror_the_service():
    from stepcredit import protocol

    assert set(ReloadResponse.model_fields) == set(protocol.ReloadResponse.model_fields)
    assert "MixedRevisionsError" in stepcredit_client.__doc__
