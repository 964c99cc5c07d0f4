"""OpenRLHF's and slime's remote-reward protocols, on the real tiny-model Scorer.

Neither trainer installs on this CPU machine (OpenRLHF needs flash-attn and
vLLM; slime is not on PyPI and needs SGLang + Megatron), so these tests hold
the routes to the field names and types those trainers' current code reads:
OpenRLHF openrlhf/utils/agent.py + openrlhf/trainer/ppo_utils/samples_generator.py,
slime slime/rollout/rm_hub/__init__.py + slime/utils/types.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import SecretStr

from stepcredit.api import create_app
from stepcredit.api.compat import split_query
from stepcredit.config import Settings

from .conftest import asgi_client

PROMPT = "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
RESPONSE = "<think>\nWe add 2 and 3.\n2 + 3 = 5\n</think>\n<answer>5</answer><|im_end|>"
SIGNALS = {"outcome_reward", "mig_reward", "correct", "format_ok", "sft_gate", "num_steps", "stepcredit_failed"}


async def v1_result(client, prompt, completion, label):
    body = {"items": [{"prompt": prompt, "completion": completion, "references": [label]}]}
    return (await client.post("/v1/score", json=body)).json()["results"][0]


def openrlhf_consume(rewards_info: dict) -> dict:
    """What OpenRLHF does with one answer (agent.py `execute`, samples_generator.py)."""
    score_value = rewards_info.get("scores")
    if score_value is None:
        score_value = rewards_info.get("rewards")
    reward_val, extra_logs = rewards_info.get("rewards"), rewards_info.get("extra_logs") or {}
    info = {"reward": torch.tensor([reward_val]), "score": torch.tensor([score_value])}
    for key, value in extra_logs.items():
        if isinstance(value, torch.Tensor):
            value = value.flatten()[0].item()
        info[key] = torch.tensor([value])
    return info


async def test_openrlhf_get_reward_answers_in_openrlhfs_format(client):
    # One sample per request, as OpenRLHF's SingleTurnAgentExecutor sends it.
    body = {"query": [PROMPT + RESPONSE], "prompts": [PROMPT], "labels": ["5"]}
    response = await client.post("/get_reward?mig_weight=0.5", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert set(answer) == {"rewards", "scores", "extra_logs"}
    expected = await v1_result(client, PROMPT, RESPONSE, "5")
    assert answer["rewards"] == [pytest.approx(expected["outcome_reward"] + 0.5 * expected["mig_reward"])]
    assert answer["scores"] == [1.0]  # correctness, in [0, 1] for dynamic filtering
    assert set(answer["extra_logs"]) == SIGNALS
    assert answer["extra_logs"]["mig_reward"] == [pytest.approx(expected["mig_reward"])]
    info = openrlhf_consume(answer)
    assert info["reward"].dtype == torch.float32 and info["reward"].numel() == 1
    assert all(t.numel() == 1 for t in info.values())


async def test_openrlhf_batched_requests_get_equal_length_lists(client):
    # Older OpenRLHF versions split a whole batch across servers: lists of any length.
    wrong = RESPONSE.replace("<answer>5", "<answer>7")
    body = {"query": [PROMPT + RESPONSE, PROMPT + wrong, PROMPT + RESPONSE], "prompts": [PROMPT] * 3,
            "labels": ["5", "5", "5"]}  # fmt: skip
    answer = (await client.post("/get_reward", json=body)).json()
    assert len(answer["rewards"]) == len(answer["scores"]) == 3
    assert all(len(v) == 3 for v in answer["extra_logs"].values())
    assert answer["scores"] == [1.0, 0.0, 1.0]
    # Where an item sits in a batch moves float32 noise.
    assert answer["rewards"][0] == pytest.approx(answer["rewards"][2], abs=1e-4)


async def test_query_is_split_at_the_prompt_not_at_a_later_copy_of_it(client):
    # A response that repeats the prompt text: `query.replace(prompt, "")` would eat it.
    response_text = "<think>\n" + PROMPT + "\n2 + 3 = 5\n</think>\n<answer>5</answer>"
    body = {"query": [PROMPT + response_text], "prompts": [PROMPT], "labels": ["5"]}
    answer = (await client.post("/get_reward?mig_weight=1", json=body)).json()
    expected = await v1_result(client, PROMPT, response_text, "5")
    assert answer["rewards"] == [pytest.approx(expected["outcome_reward"] + expected["mig_reward"])]
    assert answer["extra_logs"]["num_steps"] == [float(len(expected["steps"]))]


async def test_a_left_truncated_prompt_is_split_at_its_surviving_tail(client):
    tail = PROMPT[10:]  # OpenRLHF keeps the last max_prompt_length prompt tokens
    body = {"query": [tail + RESPONSE], "prompts": [PROMPT], "labels": ["5"]}
    answer = (await client.post("/get_reward", json=body)).json()
    expected = await v1_result(client, tail, RESPONSE, "5")
    assert answer["rewards"] == [pytest.approx(expected["outcome_reward"] + expected["mig_reward"])]


def test_split_query_cases():
    assert split_query("PQRS-completion", "PQRS") == ("PQRS", "-completion")
    assert split_query("RS-completion", "PQRS") == ("RS", "-completion")
    assert split_query("aaab", "aaa") == ("aaa", "b")
    with pytest.raises(ValueError):
        split_query("completely different", "PQRS")


async def test_a_query_without_its_prompt_is_refused_not_guessed(client):
    body = {"query": ["something else entirely"], "prompts": [PROMPT], "labels": ["5"]}
    response = await client.post("/get_reward", json=body)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "prompt_not_in_query"
    assert response.json()["error"]["field"] == "query[0]"


@pytest.mark.parametrize(
    "body,field",
    [
        ({"query": [PROMPT + RESPONSE], "prompts": [PROMPT], "labels": [""]}, "labels[0]"),
        ({"query": [PROMPT + RESPONSE], "prompts": [PROMPT]}, "labels"),
        ({"query": [PROMPT + RESPONSE, PROMPT], "prompts": [PROMPT], "labels": ["5"]}, "prompts"),
    ],
)
async def test_missing_or_misaligned_fields_are_422_naming_the_field(client, body, field):
    response = await client.post("/get_reward", json=body)
    assert response.status_code == 422 and response.json()["error"]["field"] == field


async def test_an_unscorable_item_fails_the_request_instead_of_getting_a_number(client):
    too_long = "<think>\n" + "one two three four five\n" * 1500 + "</think>\n<answer>5</answer>"
    body = {"query": [PROMPT + RESPONSE, PROMPT + too_long], "prompts": [PROMPT] * 2, "labels": ["5", "5"]}
    response = await client.post("/get_reward", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "item_failed" and error["items"][0]["index"] == 1
    assert error["items"][0]["code"] == "context_too_long"

    opted_in = (await client.post("/get_reward?error_reward=-1", json=body)).json()
    assert opted_in["rewards"][1] == -1.0 and opted_in["extra_logs"]["stepcredit_failed"] == [0.0, 1.0]


async def test_slime_remote_rm_answers_an_object_read_with_reward_key(client):
    body = {"prompt": PROMPT, "response": RESPONSE, "label": "5"}
    response = await client.post("/slime/reward?mig_weight=0.25", json=body)
    assert response.status_code == 200, response.text
    reward = response.json()  # slime: sample.reward = await resp.json()
    expected = await v1_result(client, PROMPT, RESPONSE, "5")
    # slime/utils/types.py Sample.get_reward_value with `--reward-key reward`:
    assert reward["reward"] == pytest.approx(expected["outcome_reward"] + 0.25 * expected["mig_reward"])
    assert set(reward) == SIGNALS | {"reward"} and all(isinstance(v, float) for v in reward.values())
    assert torch.tensor([reward["reward"]], dtype=torch.float).shape == (1,)  # slime/ray/rollout.py


async def test_slime_accepts_a_message_list_prompt_and_refuses_a_missing_label(client):
    body = {"prompt": [{"role": "user", "content": "What is 2+3?"}], "response": RESPONSE, "label": "5"}
    assert (await client.post("/slime/reward", json=body)).json()["correct"] == 1.0
    response = await client.post("/slime/reward", json={**body, "label": None})
    assert response.status_code == 422 and response.json()["error"]["code"] == "missing_label"


async def test_compat_routes_are_behind_the_api_key(tiny_scorer, tmp_path):
    settings = Settings(cache_dir=tmp_path, api_key=SecretStr("k"))
    async with asgi_client(create_app(settings, scorer=tiny_scorer)) as c:
        body = {"query": [PROMPT + RESPONSE], "prompts": [PROMPT], "labels": ["5"]}
        assert (await c.post("/get_reward", json=body)).status_code == 401
        slime_body = {"prompt": PROMPT, "response": "x", "label": "5"}
        assert (await c.post("/slime/reward", json=slime_body)).status_code == 401
        ok = await c.post("/get_reward", json=body, headers={"Authorization": "Bearer k"})
        assert ok.status_code == 200


async def test_compat_items_obey_the_per_item_limits(client):
    body = {"query": [PROMPT + RESPONSE], "prompts": [PROMPT], "labels": ["5" * 3000]}
    response = await client.post("/get_reward", json=body)
    assert response.status_code == 422 and response.json()["error"]["code"] == "limit_exceeded"


async def test_numeric_labels_are_taken_as_reference_text(client):
    # A dataset's answer column may hold numbers; JSON then carries them as numbers.
    body = {"query": [PROMPT + RESPONSE], "prompts": [PROMPT], "labels": [5]}
    assert (await client.post("/get_reward", json=body)).json()["scores"] == [1.0]
    slime = {"prompt": PROMPT, "response": RESPONSE, "label": 5}
    assert (await client.post("/slime/reward", json=slime)).json()["correct"] == 1.0


def openrlhf_shards(queries: list, prompts: list, labels: list, n_servers: int) -> list[dict]:
    """The bodies OpenRLHF posts, one per reward URL (agent.py `_fetch_rewards_via_http`):
    a ceil-sized slice each, so with one sample the extra servers get empty lists."""
    size = (len(queries) + n_servers - 1) // n_servers
    return [
        {"query": queries[i * size : (i + 1) * size], "prompts": prompts[i * size : (i + 1) * size],
         "labels": labels[i * size : (i + 1) * size]}
        for i in range(n_servers)
    ]  # fmt: skip


async def test_openrlhf_with_several_reward_urls_gets_empty_lists_for_an_empty_shard(client):
    bodies = openrlhf_shards([PROMPT + RESPONSE], [PROMPT], ["5"], n_servers=3)
    assert bodies[1] == bodies[2] == {"query": [], "prompts": [], "labels": []}
    # OpenRLHF gathers every server's answer (a failure on any fails the sample),
    # then reads the first.
    responses = [await client.post("/get_reward", json=body) for body in bodies]
    assert [r.status_code for r in responses] == [200, 200, 200], responses[1].text
    empty = responses[1].json()
    assert empty == {"rewards": [], "scores": [], "extra_logs": {key: [] for key in SIGNALS}}
    info = openrlhf_consume(responses[0].json())
    assert info["score"].item() == 1.0


async def test_an_empty_shard_still_needs_aligned_fields(client):
    response = await client.post("/get_reward", json={"query": [], "prompts": ["x"], "labels": []})
    assert response.status_code == 422 and response.json()["error"]["field"] == "prompts"


async def test_too_many_queries_are_413(client, settings):
    n = settings.limits().max_items_per_request + 1
    body = {"query": [PROMPT + RESPONSE] * n, "prompts": [PROMPT] * n, "labels": ["5"] * n}
    response = await client.post("/get_reward", json=body)
    assert response.status_code == 413 and response.json()["error"]["field"] == "query"


@pytest.mark.parametrize(
    "prompt",
    [[], [{"role": "user", "content": "What is 2+3?"}] * 513, "x" * 70_000],
    ids=["empty-messages", "too-many-messages", "too-long-text"],
)
async def test_slime_empty_or_overlong_prompt_is_422_naming_the_prompt(client, prompt):
    response = await client.post("/slime/reward", json={"prompt": prompt, "response": RESPONSE, "label": "5"})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == "prompt" and error["code"] in ("invalid_item", "limit_exceeded")


SURROGATE = "\ud800"  # json.dumps writes it as the escape "\ud800", which JSON allows


def raw_json(body: dict) -> bytes:
    return json.dumps(body).encode("ascii")  # ensure_ascii: lone surrogates become escapes


@pytest.mark.parametrize(
    "route,body,field",
    [
        ("/slime/reward", {"prompt": PROMPT + SURROGATE, "response": RESPONSE, "label": "5"}, "prompt"),
        ("/slime/reward", {"prompt": PROMPT, "response": RESPONSE + SURROGATE, "label": "5"}, "response"),
        ("/slime/reward", {"prompt": PROMPT, "response": RESPONSE, "label": SURROGATE + "5"}, "label"),
        ("/slime/reward", {"prompt": PROMPT, "response": RESPONSE, "label": ["5", SURROGATE]}, "label"),
        ("/slime/reward", {"prompt": [{"role": "user", "content": SURROGATE}], "response": RESPONSE, "label": "5"},
         "prompt"),
        ("/get_reward", {"query": [PROMPT + RESPONSE + SURROGATE], "prompts": [PROMPT], "labels": ["5"]},
         "query[0]"),
        ("/get_reward", {"query": [SURROGATE + PROMPT + RESPONSE], "prompts": [SURROGATE + PROMPT],
                         "labels": ["5"]}, "query[0]"),
        ("/get_reward", {"query": [PROMPT + RESPONSE], "prompts": [PROMPT], "labels": [SURROGATE]}, "labels[0]"),
        ("/get_reward", {"query": [PROMPT + RESPONSE], "prompts": [PROMPT + SURROGATE], "labels": ["5"]},
         "query[0]"),
    ],
)  # fmt: skip
async def test_a_lone_surrogate_in_any_text_is_422_naming_the_field(client, route, body, field):
    response = await client.post(route, content=raw_json(body), headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"].startswith(field), error
    response.content.decode("utf-8")  # the body echoes no surrogate


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999", "-Infinity"])
async def test_a_non_finite_error_reward_is_422(client, value):
    # With an item that fails, the stand-in would be sent: JSON has no NaN.
    too_long = "<think>\n" + "one two three four five\n" * 1500 + "</think>\n<answer>5</answer>"
    body = {"query": [PROMPT + too_long], "prompts": [PROMPT], "labels": ["5"]}
    response = await client.post(f"/get_reward?error_reward={value}", json=body)
    assert response.status_code == 422 and response.json()["error"]["field"].endswith("error_reward")
    slime = {"prompt": PROMPT, "response": RESPONSE, "label": "5"}
    response = await client.post(f"/slime/reward?error_reward={value}", json=slime)
    assert response.status_code == 422 and response.json()["error"]["field"].endswith("error_reward")


@pytest.mark.parametrize(
    "label,field",
    [
        ("false", "{}"),
        ("[false]", "{}[0]"),
        ('["5", true]', "{}[1]"),
        ("NaN", "{}"),
        ("[Infinity]", "{}[0]"),
        ("-Infinity", "{}"),
        ("1e999", "{}"),
        ('{"answer": "5"}', "{}"),
        ('[["5"]]', "{}[0]"),
    ],
)
async def test_a_label_that_is_no_answer_is_422_naming_it(client, label, field):
    # pydantic would read `false` as 0 and NaN as "nan": references no dataset meant.
    slime = '{"prompt": %s, "response": %s, "label": %s}' % (json.dumps(PROMPT), json.dumps(RESPONSE), label)
    openrlhf = '{"query": [%s], "prompts": [%s], "labels": [%s]}' % (
        json.dumps(PROMPT + RESPONSE), json.dumps(PROMPT), label
    )
    for route, body, name in [("/slime/reward", slime, "label"), ("/get_reward", openrlhf, "labels[0]")]:
        response = await client.post(route, content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 422, (route, response.text)
        error = response.json()["error"]
        assert error["code"] == "invalid_label" and error["field"] == field.format(name), (route, error)


async def test_a_huge_numeric_label_is_a_limit_naming_the_label(client):
    huge = "9" * 4000  # under Python's int-string limit, over the reference length limit
    body = '{"query": [%s], "prompts": [%s], "labels": [%s]}' % (json.dumps(PROMPT + RESPONSE), json.dumps(PROMPT), huge)
    response = await client.post("/get_reward", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "limit_exceeded" and response.json()["error"]["field"] == "labels[0]"
