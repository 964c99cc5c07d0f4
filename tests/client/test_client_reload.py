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
    IncompleteBatchError,
    InvalidRequestError,
    MixedRevisionsError,
    ReloadResponse,
    Retry,
    ServiceUnavailableError,
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


class Reloading:
    """A service that reloads while a split batch runs: request n (0-based, in arrival
    order) is scored by `revisions[n]` (the last one from then on), and GET /v1/model
    answers the revision the next request would get."""

    def __init__(self, *revisions: str, refuse: int | None = None) -> None:
        self.revisions, self.scored, self.refuse = list(revisions), [], refuse
        """Request number `refuse` is answered 400."""

    def revision(self) -> str:
        return self.revisions[min(len(self.scored), len(self.revisions) - 1)]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, json={**MODEL, "revision": self.revision()})
        items = json.loads(request.content)["items"]
        revision = self.revision()
        self.scored.append([i["id"] for i in items])
        if len(self.scored) - 1 == self.refuse:
            return httpx.Response(400, json={"error": {"code": "invalid_request", "message": "refused"}})
        results = [{"id": i["id"], "status": "ok", "mig_reward": 0.5, "steps": []} for i in items]
        usage = {"items": len(items), "items_ok": len(items), "probes": 3 * len(items)}
        return httpx.Response(200, json={"results": results, "model": {**MODEL, "revision": revision}, "usage": usage})


def six(rescores: int, service: Reloading) -> tuple[list[dict], Client]:
    config = ClientConfig(chunk_size=2, max_concurrency=1, mixed_revision_rescores=rescores)
    client = Client("http://svc", config=config, transport=httpx.MockTransport(service))
    return [{**ITEM, "id": str(i)} for i in range(6)], client


def test_a_split_batch_scored_by_two_revisions_does_not_claim_one():
    items, client = six(0, Reloading("step-1", "step-2"))
    with pytest.raises(MixedRevisionsError) as info:
        client.score(items)
    error = info.value
    assert [r.id for r in error.results] == [str(i) for i in range(6)]
    assert [m.revision for m in error.models] == ["step-1", "step-1", "step-2", "step-2", "step-2", "step-2"]
    assert error.usage.items == 6
    assert "'step-1' for 2 items" in str(error) and "'step-2' for 4 items" in str(error)

    items, same = six(0, Reloading("step-2"))
    assert same.score(items).model.revision == "step-2"


def test_the_items_of_the_old_revision_are_scored_again_by_the_current_one():
    """Before: a reload between the requests of a TRL/slime/OpenRLHF batch raised in the
    middle of a training step. Now only the old revision's items go again."""
    service = Reloading("step-1", "step-2")
    items, client = six(1, service)
    response = client.score(items)
    assert response.model.revision == "step-2"
    assert [r.id for r in response.results] == [str(i) for i in range(6)]
    assert service.scored == [["0", "1"], ["2", "3"], ["4", "5"], ["0", "1"]]
    # Items are counted once each; the work counters keep both passes.
    assert (response.usage.items, response.usage.items_ok, response.usage.probes) == (6, 6, 3 * 8)


def test_a_rescore_that_fails_leaves_the_stale_items_without_a_result_in_batch_order():
    """Before: the re-score's IncompleteBatchError escaped with the re-scored subset's
    results (2 for a batch of 8), which a trainer zips with its rollouts."""
    service = Reloading("old", "old", "new", refuse=5)  # the re-score's second request fails
    config = ClientConfig(chunk_size=2, max_concurrency=1)
    client = Client("http://svc", config=config, transport=httpx.MockTransport(service))
    with pytest.raises(IncompleteBatchError) as info:
        client.score([{**ITEM, "id": str(i)} for i in range(8)])
    error = info.value
    assert service.scored[4:] == [["0", "1"], ["2", "3"]]  # after the batch's four requests
    assert [r.id if r else None for r in error.results] == ["0", "1", None, None, "4", "5", "6", "7"]
    assert list(error.errors) == [2] and "refused" in str(error.errors[2])
    assert error.usage.items == 6


def test_a_rescore_without_the_current_revision_raises_the_mixed_batch():
    service = Reloading("a", "b")

    def handler(request):
        if request.method == "GET":
            return httpx.Response(503, json={"error": {"code": "loading", "message": "no"}})
        return service(request)

    config = ClientConfig(chunk_size=2, retry=FAST)
    client = Client("http://svc", config=config, transport=httpx.MockTransport(handler))
    with pytest.raises(MixedRevisionsError) as info:
        client.score([{**ITEM, "id": str(i)} for i in range(4)])
    assert isinstance(info.value.__cause__, ServiceUnavailableError)


def test_a_batch_that_keeps_straddling_reloads_raises_after_its_rescores():
    # A reload before every request: no pass ever comes back from one revision.
    service = Reloading(*"abcdefghijkl")
    items, client = six(2, service)
    with pytest.raises(MixedRevisionsError) as info:
        client.score(items)
    # The batch (a, b, c), then all six again twice: the service was on d, then on g, each time.
    assert len(service.scored) == 3 + 3 + 3
    assert [m.revision for m in info.value.models] == ["g", "g", "h", "h", "i", "i"]
    assert (info.value.usage.items, info.value.usage.probes) == (6, 3 * 18)


async def test_the_async_client_rescores_the_same_way():
    service = Reloading("a", "b")

    async def handler(request):
        return service(request)

    config = ClientConfig(chunk_size=2, max_concurrency=1)  # the default: one re-score
    async with AsyncClient("http://svc", config=config, transport=httpx.MockTransport(handler)) as client:
        response = await client.score([{**ITEM, "id": str(i)} for i in range(4)])
        assert response.model.revision == "b" and service.scored[-1] == ["0", "1"]
    service = Reloading("a", "b")
    async with AsyncClient("http://svc", config=ClientConfig(chunk_size=2, mixed_revision_rescores=0),
                           transport=httpx.MockTransport(handler)) as client:  # fmt: skip
        with pytest.raises(MixedRevisionsError):
            await client.score([{**ITEM, "id": str(i)} for i in range(4)])


def test_a_negative_rescore_count_is_refused():
    with pytest.raises(ValueError, match="mixed_revision_rescores"):
        ClientConfig(mixed_revision_rescores=-1)


def test_reload_types_mirror_the_service():
    from stepcredit import protocol

    assert set(ReloadResponse.model_fields) == set(protocol.ReloadResponse.model_fields)
    assert "MixedRevisionsError" in stepcredit_client.__doc__
