"""Client behaviour that needs no server: httpx.MockTransport plays the service."""

from __future__ import annotations

import json
import time

import httpx
import pytest

import stepcredit_client
from stepcredit_client import (
    AsyncClient,
    AuthenticationError,
    Client,
    ClientConfig,
    ConnectionFailed,
    IncompleteBatchError,
    InvalidRequestError,
    PayloadTooLargeError,
    RateLimitError,
    ResponseFormatError,
    Retry,
    ScoreItem,
    ServerError,
    ServiceUnavailableError,
    StepCreditError,
)
from stepcredit_client._models import ScoreResult as ClientResult

MODEL = {
    "name": "m", "path": "/m", "backend": "hf", "strategy": "packed", "device": "cpu", "dtype": "float32",
    "vocab_size": 10, "max_context": 100,
}  # fmt: skip
ITEM = {"prompt": "p", "completion": "<think>\na\n</think>\n<answer>1</answer>", "references": ["1"]}
FAST = Retry(max_attempts=4, backoff_s=0.001, max_backoff_s=0.01)


def ok_result(item_id):
    return {"id": item_id, "status": "ok", "outcome_reward": 1.0, "mig_reward": 0.5, "format_ok": True,
            "correct": True, "sft_gate": True, "steps": []}  # fmt: skip


def echo(request: httpx.Request) -> httpx.Response:
    items = json.loads(request.content)["items"]
    return httpx.Response(200, json={"results": [ok_result(i.get("id")) for i in items], "model": MODEL,
                                     "usage": {"items": len(items), "items_ok": len(items)}})  # fmt: skip


def client_with(handler, **config) -> Client:
    return Client("http://svc", config=ClientConfig(retry=config.pop("retry", FAST), **config),
                  transport=httpx.MockTransport(handler))  # fmt: skip


def test_every_public_name_is_exported_and_documented():
    for name in stepcredit_client.__all__:
        assert hasattr(stepcredit_client, name), name
    for name in ("ConnectionFailed", "RequestTimeout", "IncompleteBatchError", "ItemFailedError", "AlignmentError"):
        assert name in stepcredit_client.__doc__


def test_client_wire_types_have_the_service_fields():
    # The client mirrors SPEC section 7 without importing the service: keep the two in step.
    from stepcredit import protocol

    names = ("ScoreResult", "StepResult", "ScoreItem", "ItemOptions", "Usage", "ModelInfo", "ErrorInfo",
             "ChatMessage", "TextPart", "ImageUrl", "ImageUrlPart", "ImagePart")  # fmt: skip
    for name in names:
        server, client = getattr(protocol, name), getattr(stepcredit_client, name)
        assert set(client.model_fields) == set(server.model_fields), name


def test_big_batches_are_split_into_chunks_and_reassembled_in_order():
    sizes = []

    def handler(request):
        sizes.append(len(json.loads(request.content)["items"]))
        return echo(request)

    items = [{**ITEM, "id": str(i)} for i in range(10)]
    response = client_with(handler, chunk_size=3, max_concurrency=2).score(items)
    assert sorted(sizes) == [1, 3, 3, 3]
    assert [r.id for r in response.results] == [str(i) for i in range(10)]
    assert response.usage.items == 10


def test_concurrency_never_exceeds_the_bound():
    import threading

    lock, state = threading.Lock(), {"now": 0, "peak": 0}

    def handler(request):
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        time.sleep(0.2)  # long enough for all three workers to overlap on a busy machine
        with lock:
            state["now"] -= 1
        return echo(request)

    client_with(handler, chunk_size=1, max_concurrency=3).score([ITEM] * 9)
    assert state["peak"] == 3


async def test_async_client_bounds_concurrency_too():
    import asyncio

    state = {"now": 0, "peak": 0}

    async def handler(request):
        state["now"] += 1
        state["peak"] = max(state["peak"], state["now"])
        await asyncio.sleep(0.02)
        state["now"] -= 1
        return echo(request)

    config = ClientConfig(chunk_size=2, max_concurrency=2, retry=FAST)
    async with AsyncClient("http://svc", config=config, transport=httpx.MockTransport(handler)) as client:
        response = await client.score([{**ITEM, "id": str(i)} for i in range(8)])
    assert state["peak"] == 2 and [r.id for r in response.results] == [str(i) for i in range(8)]


@pytest.mark.parametrize("status", [429, 503])
def test_429_and_503_are_retried_then_succeed(status):
    calls = []

    def handler(request):
        calls.append(request)
        if len(calls) < 3:
            return httpx.Response(status, json={"error": {"code": "busy", "message": "later"}})
        return echo(request)

    assert client_with(handler).score([ITEM]).results[0].status == "ok"
    assert len(calls) == 3


@pytest.mark.parametrize("status,error", [(429, RateLimitError), (503, ServiceUnavailableError)])
def test_retries_give_up_after_max_attempts_with_the_typed_error(status, error):
    calls = []

    def handler(request):
        calls.append(1)
        return httpx.Response(status, json={"error": {"code": "busy", "message": "later"}})

    with pytest.raises(error) as info:
        client_with(handler).score([ITEM])
    assert len(calls) == FAST.max_attempts and info.value.code == "busy"


@pytest.mark.parametrize(
    "status,error", [(401, AuthenticationError), (413, PayloadTooLargeError), (422, InvalidRequestError),
                     (400, InvalidRequestError), (500, ServerError)]
)  # fmt: skip
def test_other_errors_are_not_retried(status, error):
    calls = []

    def handler(request):
        calls.append(1)
        return httpx.Response(status, json={"error": {"code": "nope", "message": "bad", "field": "items[0]"}})

    with pytest.raises(error) as info:
        client_with(handler).score([ITEM])
    assert len(calls) == 1 and info.value.status == status and info.value.body["error"]["field"] == "items[0]"


def test_fastapi_validation_detail_becomes_the_message():
    detail = [{"loc": ["body", "items", 0, "completion"], "msg": "Field required"}]
    client = client_with(lambda r: httpx.Response(422, json={"detail": detail}))
    with pytest.raises(InvalidRequestError, match="completion"):
        client.score([ITEM])


def test_retry_after_header_sets_the_wait():
    calls = []

    def handler(request):
        calls.append(time.monotonic())
        if len(calls) == 1:
            return httpx.Response(429, headers={"Retry-After": "0.3"}, json={"error": {"code": "x", "message": ""}})
        return echo(request)

    client_with(handler, retry=Retry(max_attempts=2, backoff_s=0.0)).score([ITEM])
    assert calls[1] - calls[0] >= 0.29


def test_retry_after_is_capped_by_max_backoff():
    assert Retry(max_backoff_s=2.0).delay(0, retry_after=3600) == 2.0


def test_backoff_is_jittered_and_grows():
    retry = Retry(backoff_s=1.0, max_backoff_s=100.0)
    waits = [retry.delay(3, None) for _ in range(200)]
    assert all(4.0 <= w <= 8.0 for w in waits)  # equal jitter on a ceiling of 1·2³
    assert len({round(w, 6) for w in waits}) > 100


def test_connection_errors_are_retried():
    calls = []

    def handler(request):
        calls.append(1)
        if len(calls) < 3:
            raise httpx.ConnectError("refused", request=request)
        return echo(request)

    assert client_with(handler).score([ITEM]).results[0].status == "ok"
    assert len(calls) == 3


def test_a_dead_service_raises_connection_failed_after_retries():
    def handler(request):
        raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)

    with pytest.raises(ConnectionFailed):
        client_with(handler).score([ITEM])


def test_partial_failure_keeps_the_results_that_arrived_and_none_for_the_rest():
    def handler(request):
        items = json.loads(request.content)["items"]
        if items[0]["id"] == "2":
            return httpx.Response(400, json={"error": {"code": "bad", "message": "chunk refused"}})
        return echo(request)

    with pytest.raises(IncompleteBatchError) as info:
        client_with(handler, chunk_size=2).score([{**ITEM, "id": str(i)} for i in range(6)])
    results = info.value.results
    assert [r.id if r else None for r in results] == ["0", "1", None, None, "4", "5"]
    assert list(info.value.errors) == [2] and isinstance(info.value.errors[2], InvalidRequestError)
    assert info.value.usage.items == 4


def test_a_wrong_body_on_success_is_a_format_error_not_a_result():
    with pytest.raises(ResponseFormatError):
        client_with(lambda r: httpx.Response(200, text="<html>proxy</html>")).score([ITEM])
    short = {"results": [], "model": MODEL, "usage": {}}
    with pytest.raises(ResponseFormatError, match="sent 1 items, got 0"):
        client_with(lambda r: httpx.Response(200, json=short)).score([ITEM])


def test_api_key_is_sent_as_bearer_token():
    seen = []

    def handler(request):
        seen.append(request.headers.get("authorization"))
        return echo(request)

    Client("http://svc", api_key="k", transport=httpx.MockTransport(handler)).score([ITEM])
    assert seen == ["Bearer k"]


def test_items_are_validated_before_anything_is_sent():
    with pytest.raises(ValueError, match="exactly one of"):
        client_with(echo).score([{"completion": "x", "references": ["1"]}])
    with pytest.raises(ValueError, match="blank"):
        ScoreItem(prompt="p", completion="c", references=[" "])


def test_every_client_error_derives_from_stepcredit_error():
    for name in stepcredit_client.__all__:
        obj = getattr(stepcredit_client, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, StepCreditError), name


def test_error_results_parse_with_every_reward_field_none():
    result = ClientResult.model_validate(
        {"id": "x", "status": "error", "error": {"code": "context_too_long", "message": "m"}, "steps": []}
    )
    assert not result.ok and result.outcome_reward is None and result.mig_reward is None
