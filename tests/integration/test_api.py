"""The HTTP API on a real (tiny, random) Llama through an ASGI client."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from stepcredit.api import create_app
from stepcredit.config import Settings

from .conftest import asgi_client

GOOD = {
    "id": "good",
    "prompt": "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n",
    "completion": "<think>\nWe add 2 and 3.\n2 + 3 = 5\nSo it is 5.\n</think>\n<answer>5</answer>",
    "references": ["5", "5.0"],
}
RESULT_FIELDS = {
    "id", "status", "error", "format_ok", "correct", "verify_timeout", "extracted_answer",
    "matched_reference", "outcome_reward", "mig_reward", "baseline_loglik", "format_gate",
    "correctness_gate", "sft_gate", "cot_span", "tokenization", "steps_truncated", "steps",
}  # fmt: skip
STEP_FIELDS = {
    "index", "char_start", "char_end", "token_start", "token_end", "loglik", "best_reference", "watermark", "gain"
}  # fmt: skip


async def score(client, *items, options=None, expect=200):
    body = {"items": list(items)}
    if options is not None:
        body["options"] = options
    response = await client.post("/v1/score", json=body)
    assert response.status_code == expect, response.text
    return response.json()


async def test_score_returns_every_spec_field_for_a_well_formed_item(client):
    body = await score(client, GOOD)
    (result,) = body["results"]
    assert set(result) == RESULT_FIELDS
    assert result["status"] == "ok" and result["error"] is None
    assert result["format_ok"] and result["correct"] and result["sft_gate"]
    assert result["extracted_answer"] == "5" and result["matched_reference"] == 0
    assert result["outcome_reward"] == 1.0 and result["tokenization"] == "text"
    steps = result["steps"]
    assert [GOOD["completion"][s["char_start"] : s["char_end"]] for s in steps] == [
        "We add 2 and 3.",
        "2 + 3 = 5",
        "So it is 5.",
    ]
    assert all(set(s) == STEP_FIELDS and s["token_start"] is None for s in steps)
    assert result["mig_reward"] == pytest.approx(sum(s["gain"] for s in steps))
    assert result["mig_reward"] == pytest.approx(max(0.0, steps[-1]["watermark"] - result["baseline_loglik"]))
    start, end = result["cot_span"]
    assert GOOD["completion"][start:end].strip().startswith("We add")
    assert body["model"]["backend"] == "hf" and body["model"]["strategy"] == "packed"
    usage = body["usage"]
    assert usage["items"] == 1 and usage["items_ok"] == 1
    assert usage["probes"] == 4 and usage["reference_probes"] == 8 and usage["tokens_forwarded"] > 0


async def test_same_request_twice_gives_identical_output(client):
    items = [GOOD, {**GOOD, "id": "b", "completion": GOOD["completion"].replace("5</answer>", "6</answer>")}]
    first = await score(client, *items)
    second = await score(client, *items)
    assert first["results"] == second["results"]


async def test_wrong_answer_is_scored_but_gated_out(client):
    (result,) = (await score(client, {**GOOD, "completion": GOOD["completion"].replace("<answer>5", "<answer>7")}))[
        "results"
    ]
    assert result["status"] == "ok" and not result["correct"] and not result["sft_gate"]
    assert result["matched_reference"] is None and result["outcome_reward"] == 0.0


async def test_weights_from_request_and_item_options_compose(client):
    bad_format = {**GOOD, "completion": "oops " + GOOD["completion"]}
    body = await score(
        client,
        bad_format,
        {**GOOD, "id": "w", "options": {"acc_weight": 2.0}},
        options={"format_weight": 0.5},
    )
    first, second = body["results"]
    assert not first["format_ok"] and first["correct"] and first["outcome_reward"] == 1.0
    assert second["outcome_reward"] == 2.5  # 2.0 * correct + 0.5 * format_ok


async def test_messages_are_rendered_with_the_scorers_chat_template(client, tokenizer):
    messages = [{"role": "user", "content": "What is 2+3?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    with_messages = {k: v for k, v in GOOD.items() if k != "prompt"} | {"messages": messages}
    a, b = (await score(client, with_messages, {**GOOD, "prompt": prompt}))["results"]
    assert a["steps"] == b["steps"] and a["baseline_loglik"] == b["baseline_loglik"]


async def test_token_ids_path_reports_token_spans_and_matches_the_text_path(client, tokenizer):
    ids = tokenizer(GOOD["completion"], add_special_tokens=False)["input_ids"]
    text_result, ids_result = (await score(client, GOOD, {**GOOD, "completion_token_ids": ids}))["results"]
    assert ids_result["tokenization"] == "ids"
    for text_step, step in zip(text_result["steps"], ids_result["steps"]):
        covered = tokenizer.decode(ids[step["token_start"] : step["token_end"]])
        assert GOOD["completion"][step["char_start"] : step["char_end"]] in covered
        # SmolLM2's tokenizer splits at these cuts, so both paths see the same tokens.
        assert step["loglik"] == pytest.approx(text_step["loglik"], abs=1e-5)


async def test_bad_items_get_errors_while_the_rest_of_the_batch_is_scored(client, tokenizer):
    ids = tokenizer(GOOD["completion"], add_special_tokens=False)["input_ids"]
    items = [
        {**GOOD, "id": "mismatch", "completion_token_ids": ids[:-1]},
        {**GOOD, "id": "oov", "completion_token_ids": [*ids[:-1], 10**9]},
        {**GOOD, "id": "regex-no-prefix", "options": {"format": "regex", "cot_pattern": "(a)", "answer_pattern": "(b)"}},
        {**GOOD, "id": "regex-no-group", "options": {"format": "regex", "cot_pattern": "a", "answer_pattern": "(b)", "probe_prefix": "x"}},
        {**GOOD, "id": "too-long", "completion": "<think>\n" + "word " * 5000 + "\n</think><answer>5</answer>"},
        GOOD,
    ]
    results = (await score(client, *items))["results"]
    codes = [r["error"]["code"] if r["error"] else None for r in results]
    assert codes == [
        "token_ids_mismatch",
        "invalid_token_ids",
        "invalid_options",
        "invalid_options",
        "context_too_long",
        None,
    ]
    for r in results[:-1]:
        assert r["status"] == "error" and r["mig_reward"] is None and r["outcome_reward"] is None
    assert results[-1]["status"] == "ok"


async def test_no_think_block_runs_no_probes(client):
    (result,) = (await score(client, {**GOOD, "completion": "<answer>5</answer>"}))["results"]
    assert result["cot_span"] is None and result["steps"] == [] and result["baseline_loglik"] is None
    assert result["mig_reward"] == 0.0 and result["correct"] and not result["format_ok"]


async def test_blank_cot_gives_baseline_but_no_steps(client):
    (result,) = (await score(client, {**GOOD, "completion": "<think> \n </think><answer>5</answer>"}))["results"]
    assert result["steps"] == [] and result["baseline_loglik"] is not None and result["mig_reward"] == 0.0


async def test_pathological_answer_times_out_verification_without_failing_the_item(client):
    item = {**GOOD, "completion": "<think>\nhuge\n</think><answer>10^{10^{10^{10}}}</answer>", "options": {"verify_timeout_s": 1.0}}
    (result,) = (await score(client, item))["results"]
    assert result["status"] == "ok" and result["verify_timeout"] and not result["correct"]


@pytest.mark.parametrize(
    "bad,field",
    [
        ({"prompt": "p", "references": ["1"]}, "items[0].completion"),
        ({"completion": "c", "references": ["1"]}, "items[0]: Value error, give exactly one of `prompt` or `messages`"),
        ({"prompt": "p", "messages": [{"role": "user", "content": "x"}], "completion": "c", "references": ["1"]}, "exactly one of"),
        ({"prompt": "p", "completion": "c", "references": []}, "items[0].references"),
        ({"prompt": "p", "completion": "c", "references": ["  "]}, "blank"),
        ({"prompt": "p", "completion": "c", "references": [False]}, "items[0].references[0]"),
        ({"prompt": "p", "completion": 5, "references": ["1"]}, "items[0].completion"),
        ({"prompt": "p", "completion": "c", "references": ["1"], "bogus": 1}, "items[0].bogus"),
        ({"prompt": "p", "completion": "c", "references": ["1"], "options": {"step_split": "words"}}, "items[0].options.step_split"),
        ({"prompt": "p", "completion": "c", "references": ["1"], "completion_token_ids": [True]}, "items[0].completion_token_ids[0]"),
        ({"prompt": "p", "completion": "c", "references": ["1"], "completion_token_ids": [-1]}, "items[0].completion_token_ids[0]"),
        ({"prompt": "p", "completion": "c", "references": ["1"], "options": {"acc_weight": "NaN"}}, "items[0].options.acc_weight"),
        ("not an object", "items[0]: an item must be a JSON object"),
        (None, "items[0]: an item must be a JSON object"),
    ],
)
async def test_a_bad_item_is_its_own_invalid_item_error_and_the_others_are_scored(client, bad, field):
    body = await score(client, bad, GOOD)
    first, second = body["results"]
    assert first["status"] == "error" and first["error"]["code"] == "invalid_item"
    assert field in first["error"]["message"]
    assert first["outcome_reward"] is None and first["mig_reward"] is None
    assert second["status"] == "ok" and second["id"] == "good" and second["correct"]
    assert body["usage"]["items"] == 2 and body["usage"]["items_ok"] == 1 and body["usage"]["items_error"] == 1


async def test_an_empty_batch_is_answered_with_no_results(client):
    body = await score(client)
    assert body["results"] == [] and body["usage"]["items"] == 0 and body["model"]["revision"]


async def test_a_bad_item_keeps_its_id_when_the_id_itself_is_fine(client):
    body = await score(client, {"id": "mine", "prompt": "p", "completion": "c", "references": []})
    (result,) = body["results"]
    assert result["id"] == "mine" and result["error"]["code"] == "invalid_item"


async def test_a_request_of_only_bad_items_answers_every_one_without_touching_the_model(client):
    body = await score(client, {"prompt": "p"}, {"completion": "c"})
    assert [r["error"]["code"] for r in body["results"]] == ["invalid_item", "invalid_item"]
    assert body["usage"]["items_error"] == 2 and body["usage"]["forward_passes"] == 0


RAW_GOOD = (
    '{"id": "good", "prompt": "What is 2+3?", "completion": "<think>\\n2+3=5\\n</think><answer>5</answer>", '
    '"references": ["5"]}'
)


@pytest.mark.parametrize(
    "raw_item,field",
    [
        # JSON may carry a lone surrogate; no tokenizer and no JSON encoder takes one.
        ('{"prompt": "p", "completion": "<think>a\\ud800</think><answer>1</answer>", "references": ["1"]}', "items[0].completion"),
        ('{"prompt": "p\\udfff", "completion": "c", "references": ["1"]}', "items[0].prompt"),
        ('{"prompt": "p", "completion": "c", "references": ["1\\ud800"]}', "items[0].references[0]"),
        ('{"id": "\\ud800", "prompt": "p", "completion": "c", "references": ["1"]}', "items[0].id"),
        ('{"messages": [{"role": "user", "content": "\\ud800"}], "completion": "c", "references": ["1"]}', "items[0].messages[0].content"),
        ('{"prompt": "p", "completion": "c", "references": ["1"], "options": {"probe_prefix": "\\ud800"}}', "items[0].options.probe_prefix"),
        # Python's JSON reader turns 1e999 into inf and reads NaN / Infinity literals.
        ('{"prompt": "p", "completion": "c", "references": ["1"], "options": {"acc_weight": 1e999}}', "items[0].options.acc_weight"),
        ('{"prompt": "p", "completion": "c", "references": ["1"], "options": {"format_weight": NaN}}', "items[0].options.format_weight"),
        ('{"prompt": "p", "completion": "c", "references": ["1"], "options": {"verify_timeout_s": Infinity}}', "items[0].options.verify_timeout_s"),
    ],
)
async def test_unencodable_text_and_non_finite_numbers_are_item_errors_not_500(client, raw_item, field):
    raw = f'{{"items": [{raw_item}, {RAW_GOOD}]}}'
    response = await client.post("/v1/score", content=raw.encode(), headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    first, second = response.json()["results"]
    assert first["status"] == "error" and first["error"]["code"] == "invalid_item"
    assert field in first["error"]["message"], first["error"]["message"]
    assert first["id"] is None or first["id"] == "good"
    assert second["status"] == "ok"


@pytest.mark.parametrize(
    "raw,field",
    [
        ('{"items": "nope"}', "items"),
        ('{"item": []}', "items"),
        ('[1, 2]', "body"),
        ('{"items": [{}], "options": {"acc_weight": 1e999}}', "options.acc_weight"),
        ('{"items": [{}], "options": {"acc_weight": NaN}}', "options.acc_weight"),
        ('{"items": [{}], "options": {"probe_prefix": "\\ud800"}}', "options.probe_prefix"),
        ('{"items": [{}], "options": {"step_split": "words"}}', "options.step_split"),
        ('{not json', "body"),
        ('{"items": [{"id": ' + "9" * 5000 + '}]}', "body"),  # past Python's int-string limit
    ],
)
async def test_malformed_request_is_422_naming_the_field(client, raw, field):
    response = await client.post("/v1/score", content=raw.encode(), headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and error["field"].startswith(field), error


async def test_openapi_still_documents_every_item_field(client):
    schema = (await client.get("/openapi.json")).json()
    body = schema["paths"]["/v1/score"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].endswith("/ScoreRequest")
    request = schema["components"]["schemas"]["ScoreRequest"]
    item = request["properties"]["items"]["items"]
    if "$ref" in item:
        item = schema["components"]["schemas"][item["$ref"].rsplit("/", 1)[1]]
    assert {"id", "prompt", "messages", "completion", "references", "completion_token_ids", "options"} <= set(item["properties"])
    assert set(item["required"]) == {"completion", "references"}


@pytest.mark.parametrize(
    "limits,item,field",
    [
        ({"max_chars_per_item": 140}, {**GOOD, "completion": "x" * 200}, "items[0]: prompt plus completion"),
        ({"max_references_per_item": 1}, GOOD, "items[0].references: 2 references, limit 1"),
        ({"max_reference_chars": 3}, {**GOOD, "references": ["12345"]}, "items[0].references[0]"),
        ({"max_steps_limit": 10}, {**GOOD, "options": {"max_steps": 11}}, "items[0].options.max_steps"),
        ({"max_token_ids": 16}, {**GOOD, "completion_token_ids": list(range(17))}, "items[0].completion_token_ids"),
    ],
)
async def test_an_item_over_a_limit_is_an_item_error_naming_the_field(tiny_scorer, settings, limits, item, field):
    app = create_app(settings.model_copy(update=limits), scorer=tiny_scorer)
    within = {**GOOD, "id": "within", "references": ["5"]}
    async with asgi_client(app) as c:
        response = await c.post("/v1/score", json={"items": [item, within]})
    assert response.status_code == 200, response.text
    over, ok = response.json()["results"]
    assert over["status"] == "error" and over["error"]["code"] == "invalid_item"
    assert field in over["error"]["message"], over["error"]["message"]
    assert ok["status"] == "ok" and ok["id"] == "within"


async def test_too_many_items_is_413_for_the_request(tiny_scorer, settings):
    app = create_app(settings.model_copy(update={"max_items_per_request": 2}), scorer=tiny_scorer)
    async with asgi_client(app) as c:
        response = await c.post("/v1/score", json={"items": [GOOD] * 3})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "limit_exceeded" and response.json()["error"]["field"] == "items"


async def test_body_over_the_byte_limit_is_413(tiny_scorer, settings):
    app = create_app(settings.model_copy(update={"max_request_bytes": 2048}), scorer=tiny_scorer)
    async with asgi_client(app) as c:
        response = await c.post("/v1/score", json={"items": [{**GOOD, "completion": "x" * 4000}]})
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"


async def test_bearer_token_is_required_when_an_api_key_is_set(tiny_scorer, settings):
    app = create_app(settings.model_copy(update={"api_key": SecretStr("s3cret")}), scorer=tiny_scorer)
    async with asgi_client(app) as c:
        assert (await c.post("/v1/score", json={"items": [GOOD]})).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert (await c.post("/v1/score", json={"items": [GOOD]}, headers=wrong)).status_code == 401
        right = {"Authorization": "Bearer s3cret"}
        assert (await c.post("/v1/score", json={"items": [GOOD]}, headers=right)).status_code == 200
        assert (await c.get("/v1/model")).status_code == 401
        assert (await c.get("/health")).status_code == 200  # probes stay open for orchestrators


async def test_health_ready_model_and_docs(client):
    assert (await client.get("/health")).json()["status"] == "ok"
    ready = await client.get("/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    model = (await client.get("/v1/model")).json()
    assert model["vocab_size"] > 0 and model["device"] == "cpu"
    assert "/v1/score" in (await client.get("/openapi.json")).json()["paths"]
    assert (await client.get("/docs")).status_code == 200


async def test_not_ready_scorer_answers_503_with_retry_after(tiny_model_path, settings, verifier):
    from stepcredit.backends.hf import HFBackend
    from stepcredit.engine import Scorer

    cold = Scorer(HFBackend(tiny_model_path, device="cpu"), settings, verifier=verifier)
    async with asgi_client(create_app(settings, scorer=cold)) as c:
        assert (await c.get("/ready")).status_code == 503
        response = await c.post("/v1/score", json={"items": [GOOD]})
        assert response.status_code == 503 and response.headers["retry-after"]


async def test_metrics_count_requests_items_errors_and_tokens(client):
    await score(client, GOOD, {**GOOD, "id": "x", "completion_token_ids": [1, 2]})
    text = (await client.get("/metrics")).text
    assert 'stepcredit_requests_total{route="/v1/score",status="200"}' in text
    assert 'stepcredit_items_total{status="ok"} 1.0' in text
    assert 'stepcredit_item_errors_total{code="token_ids_mismatch"} 1.0' in text
    assert "stepcredit_probe_tokens_total" in text and "stepcredit_queue_depth" in text
    assert "stepcredit_request_latency_seconds_bucket" in text
    # What admission decides on, and what Retry-After is computed from.
    assert "stepcredit_queued_tokens 0.0" in text
    rate = next(line for line in text.splitlines() if line.startswith("stepcredit_drain_rate_tokens_per_second "))
    assert float(rate.split()[1]) > 0


async def test_garbage_completions_never_crash_and_never_get_made_up_rewards(client):
    import random

    rng = random.Random(0)
    pieces = [
        "<think>", "</think>", "<answer>", "</answer>", "\\boxed{", "}", "{", "\n", "\n\n", "Step 1:",
        "## step 22", " ", "\u0000", "😀", "\u202e", "9^9^9^9", "(" * 50, "x" * 300, "<|im_end|>", "$", "\\",
    ]  # fmt: skip
    items = []
    for i in range(40):
        completion = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        fmt = rng.choice(["think_answer", "boxed"])
        items.append({**GOOD, "id": f"g{i}", "completion": completion, "options": {"format": fmt, "verify_timeout_s": 2}})
    body = await score(client, *items)
    assert [r["id"] for r in body["results"]] == [i["id"] for i in items]
    for r in body["results"]:
        if r["status"] == "ok":
            assert r["outcome_reward"] is not None and r["mig_reward"] is not None
            assert r["mig_reward"] == pytest.approx(sum(s["gain"] for s in r["steps"]), abs=1e-9)
        else:
            assert r["error"]["code"] and r["outcome_reward"] is None and r["mig_reward"] is None


async def test_integers_are_json_schema_integers_and_booleans_are_no_numbers(client):
    # Found by schema fuzzing: `max_steps: 2.0` (an integer in JSON Schema) was refused, and
    # `format_weight: true` was read as a weight of 1.0.
    body = await score(client, {**GOOD, "options": {"max_steps": 2.0}})
    assert len(body["results"][0]["steps"]) == 2
    for options in ({"max_steps": True}, {"max_steps": 2.5}, {"acc_weight": True}, {"verify_timeout_s": False}):
        (result,) = (await score(client, {**GOOD, "options": options}))["results"]
        assert result["status"] == "error" and result["error"]["code"] == "invalid_item", options
    await score(client, GOOD, options={"format_weight": True}, expect=422)


async def test_the_openapi_states_this_services_limits(tiny_scorer, tmp_path):
    # Found by schema fuzzing: a schema-valid `max_steps: 595` was refused (limit 256), and
    # nothing in the schema said so.
    settings = Settings(cache_dir=tmp_path, api_key=None, max_steps_limit=100, max_items_per_request=7)
    async with asgi_client(create_app(settings, scorer=tiny_scorer)) as c:
        schemas = (await c.get("/openapi.json")).json()["components"]["schemas"]
    assert schemas["ScoreRequest"]["properties"]["items"]["maxItems"] == 7
    assert schemas["ItemOptions"]["properties"]["max_steps"]["anyOf"][0]["maximum"] == 100
    assert schemas["ScoreItem"]["properties"]["references"]["maxItems"] == settings.max_references_per_item
