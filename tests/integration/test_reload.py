"""POST /v1/admin/reload on real tiny checkpoints (ASGI): new weights score, the
revision says which, bad checkpoints are refused while the old weights keep serving,
and requests that arrive during a reload are all answered by one model each."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import httpx
import pytest
import torch
from pydantic import SecretStr

from benchmarks.workload import workload
from stepcredit.api import create_app
from stepcredit.backends.hf import HFBackend
from stepcredit.checkpoints import tokenizer_difference
from stepcredit.engine import Scorer

from .conftest import asgi_client

ITEM = {
    "id": "q",
    "prompt": "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n",
    "completion": "<think>\nWe add 2 and 3.\n2 + 3 = 5\nSo the sum is 5.\n</think>\n<answer>5</answer>",
    "references": ["5", "5.0"],
}


def save_llama(path: Path, tokenizer, seed: int, **overrides) -> Path:
    """A tiny random Llama like `tiny_model_path`'s (same config unless `overrides`), other weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    fields = dict(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=4096,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    LlamaForCausalLM(LlamaConfig(**{**fields, **overrides})).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer, tiny_model_path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reload")
    made = {"a": tiny_model_path, "b": save_llama(root / "b", tokenizer, seed=1)}
    # Queued items were checked against a's 4096-token context.
    made["short-context"] = save_llama(root / "short", tokenizer, seed=1, max_position_embeddings=2048)
    made["deeper"] = save_llama(root / "deeper", tokenizer, seed=1, num_hidden_layers=3)

    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(2)
    qwen = Qwen2ForCausalLM(
        Qwen2Config(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=64, tie_word_embeddings=True)
    )  # fmt: skip
    qwen.save_pretrained(root / "qwen")
    tokenizer.save_pretrained(root / "qwen")
    made["qwen"] = root / "qwen"

    # Same weights as b, a tokenizer with one more special token.
    other = root / "other-tokenizer"
    shutil.copytree(made["b"], other)
    from transformers import AutoTokenizer

    changed = AutoTokenizer.from_pretrained(made["b"])
    changed.add_special_tokens({"additional_special_tokens": ["<|step|>"]})
    changed.save_pretrained(other)
    made["other-tokenizer"] = other

    # b's weights with a NaN layer norm: loads, but scores nothing finite.
    nan = root / "nan"
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(made["b"])
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(nan)
    tokenizer.save_pretrained(nan)
    made["nan"] = nan

    # Only pickled weights: never loaded from a path a client names.
    pickled = root / "pickled"
    pickled.mkdir()
    shutil.copy(made["b"] / "config.json", pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    made["pickled"] = pickled

    # A write cut short: the safetensors header promises more than the file holds.
    truncated = root / "truncated"
    shutil.copytree(made["b"], truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    made["truncated"] = truncated

    # b without its weights: a config and a tokenizer only.
    bare = root / "bare"
    shutil.copytree(made["b"], bare)
    (bare / "model.safetensors").unlink()
    made["bare"] = bare

    # b's weights without a tokenizer: the serving tokenizer is kept.
    untokenized = root / "no-tokenizer"
    untokenized.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(made["b"] / name, untokenized)
    made["no-tokenizer"] = untokenized
    return made


@pytest.fixture
async def make_app(tiny_model_path, settings, verifier):
    """An app on a fresh scorer of checkpoint a (reloads change it: never the shared one)."""
    scorers = []

    async def make(**overrides):
        backend = HFBackend(tiny_model_path, device="cpu", strategy="packed")
        scorer = Scorer(backend, settings, verifier=verifier)
        await scorer.start()
        scorers.append(scorer)
        return create_app(settings.model_copy(update=overrides), scorer=scorer), scorer

    yield make
    for scorer in scorers:
        async with scorer.reloader.lock:
            pass
        await scorer.batcher.close()
        scorer.backend.shutdown()


async def score(client: httpx.AsyncClient, items=(ITEM,), headers=None) -> dict:
    response = await client.post("/v1/score", json={"items": list(items)}, headers=headers)
    assert response.status_code == 200, response.text
    body = response.json()
    assert response.headers["x-stepcredit-revision"] == body["model"]["revision"]
    return body


def numbers(result: dict) -> list[float]:
    return [result["baseline_loglik"], *(s["loglik"] for s in result["steps"])]


async def reload(client: httpx.AsyncClient, path: Path | str, revision: str | None = None, headers=None):
    body = {"path": str(path)} if revision is None else {"path": str(path), "revision": revision}
    return await client.post("/v1/admin/reload", json=body, headers=headers)


async def test_a_reload_scores_with_the_new_weights_and_the_revision_names_them(make_app, checkpoints):
    app, _ = await make_app()
    async with asgi_client(app) as client:
        before = await score(client)
        response = await reload(client, checkpoints["b"], "step-100")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"]["revision"] == "step-100" and body["model"]["path"] == str(checkpoints["b"])
        assert body["previous_revision"] == before["model"]["revision"]
        assert body["mode"] == "beside" and body["load_s"] > 0
        after = await score(client)
        assert after["model"]["revision"] == "step-100"
        assert (await client.get("/v1/model")).json()["revision"] == "step-100"
        # Different weights, different likelihoods for the same item; the outcome is the verifier's.
        assert numbers(after["results"][0]) != pytest.approx(numbers(before["results"][0]), abs=1e-3)
        assert after["results"][0]["correct"] == before["results"][0]["correct"]

        # Back to a: its own numbers again, under a fingerprint of its folder when no revision is given.
        response = await reload(client, checkpoints["a"])
        assert response.status_code == 200, response.text
        again = await score(client)
        assert again["model"]["revision"] == before["model"]["revision"]
        assert numbers(again["results"][0]) == pytest.approx(numbers(before["results"][0]), abs=1e-5)


async def test_a_checkpoint_without_a_tokenizer_keeps_the_serving_one(make_app, checkpoints):
    app, _ = await make_app()
    async with asgi_client(app) as client:
        response = await reload(client, checkpoints["no-tokenizer"], "weights-only")
        assert response.status_code == 200, response.text
        b = await score(client)
        await reload(client, checkpoints["b"], "b")
        assert numbers((await score(client))["results"][0]) == pytest.approx(numbers(b["results"][0]), abs=1e-5)


@pytest.mark.parametrize(
    ("name", "code", "message"),
    [
        ("missing", "invalid_checkpoint", "is not a folder"),
        ("relative", "invalid_checkpoint", "must be absolute"),
        ("bare", "invalid_checkpoint", "no *.safetensors"),
        ("pickled", "invalid_checkpoint", "a .bin file is a pickle"),
        ("truncated", "invalid_checkpoint", "not a readable safetensors file"),
        ("nan", "invalid_checkpoint", "not finite"),
        ("qwen", "incompatible_model", "model_type is 'qwen2'"),
        ("short-context", "incompatible_model", "max_position_embeddings is 2048"),
        ("deeper", "incompatible_model", "unexpected model.layers.2."),
        ("other-tokenizer", "incompatible_model", "tokenizer differs"),
    ],
)
async def test_a_bad_reload_is_an_explicit_error_and_the_old_model_keeps_serving(
    make_app, checkpoints, tmp_path, name, code, message
):
    app, _ = await make_app()
    path = {"missing": tmp_path / "nothing-here", "relative": "checkpoints/step-1"}.get(name) or checkpoints[name]
    async with asgi_client(app) as client:
        before = await score(client)
        response = await reload(client, path, "bad")
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == code and message in error["message"], error
        after = await score(client)
        assert after["model"] == before["model"]
        assert numbers(after["results"][0]) == pytest.approx(numbers(before["results"][0]), abs=1e-5)
        metrics = (await client.get("/metrics")).text
        assert f'stepcredit_reloads_total{{outcome="{code}"}} 1.0' in metrics


async def test_a_missing_tensor_is_refused_a_tied_head_saved_as_a_copy_is_not(make_app, checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    def variant(name, change):
        path = tmp_path / name
        shutil.copytree(checkpoints["b"], path)
        tensors = load_file(path / "model.safetensors")
        change(tensors)
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        return path

    # The loader would leave the missing one at random initialization.
    partial = variant("partial", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    # Some trainers save a tied LM head twice: the same weights.
    doubled = variant("doubled", lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    app, _ = await make_app()
    async with asgi_client(app) as client:
        response = await reload(client, partial)
        assert response.status_code == 422
        error = response.json()["error"]
        assert error["code"] == "incompatible_model"
        assert "tensors are not the serving model's: missing model.layers.1.mlp.up_proj.weight" in error["message"]
        still_a = await score(client)
        assert (await reload(client, checkpoints["b"], "b")).status_code == 200
        expected = numbers((await score(client))["results"][0])
        assert (await reload(client, doubled, "doubled")).status_code == 200
        assert numbers((await score(client))["results"][0]) == pytest.approx(expected, abs=1e-5)
        assert numbers(still_a["results"][0]) != pytest.approx(expected, abs=1e-3)


def test_tokenizers_that_split_or_template_differently_are_told_apart(tokenizer):
    import copy

    assert tokenizer_difference(tokenizer, copy.deepcopy(tokenizer)) is None
    templated = copy.deepcopy(tokenizer)
    templated.chat_template = "{{ messages[0]['content'] }}"
    assert "chat templates differ" in tokenizer_difference(tokenizer, templated)
    eos = copy.deepcopy(tokenizer)
    eos.eos_token = "<|endoftext|>"
    assert "eos_token_id" in tokenizer_difference(tokenizer, eos)


async def test_reload_needs_the_api_key_when_one_is_set(make_app, checkpoints):
    app, _ = await make_app(api_key=SecretStr("secret"))
    async with asgi_client(app) as client:
        good = {"Authorization": "Bearer secret"}
        before = await score(client, headers=good)
        for headers in (None, {"Authorization": "Bearer wrong"}):
            response = await reload(client, checkpoints["b"], "step-1", headers=headers)
            assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"
        assert (await score(client, headers=good))["model"] == before["model"]
        response = await reload(client, checkpoints["b"], "step-1", headers=good)
        assert response.status_code == 200 and response.json()["model"]["revision"] == "step-1"


async def test_reload_can_be_turned_off_and_kept_inside_a_folder(make_app, checkpoints):
    app, _ = await make_app(admin_reload=False)
    async with asgi_client(app) as client:
        response = await reload(client, checkpoints["b"])
        assert response.status_code == 403 and response.json()["error"]["code"] == "reload_disabled"
    app, _ = await make_app(admin_reload_root=checkpoints["b"].parent)
    async with asgi_client(app) as client:
        response = await reload(client, checkpoints["a"])  # the session's tiny model lives elsewhere
        assert response.status_code == 422 and "outside the folder" in response.json()["error"]["message"]
        assert (await reload(client, checkpoints["b"])).status_code == 200


async def test_a_keyless_service_on_the_network_refuses_reloads_without_a_root(make_app, checkpoints):
    # Before: anyone who could reach 0.0.0.0:8000 could make it load any folder on its machine.
    app, _ = await make_app(host="0.0.0.0")
    async with asgi_client(app) as client:
        response = await reload(client, checkpoints["b"])
        assert response.status_code == 403 and response.json()["error"]["code"] == "reload_disabled"
        assert "STEPCREDIT_API_KEY" in response.json()["error"]["message"]
    for settings in ({"host": "0.0.0.0", "admin_reload_root": checkpoints["b"].parent}, {"host": "::1"}):
        app, _ = await make_app(**settings)
        async with asgi_client(app) as client:
            assert (await reload(client, checkpoints["b"])).status_code == 200, settings


async def test_request_fields_are_bounded(make_app):
    app, _ = await make_app()
    async with asgi_client(app) as client:
        for body in (
            {"path": ""},
            {"path": "/x" * 3000},
            {"path": "/a\x00b"},
            {"path": "/a", "revision": "has space"},
            {"path": "/a", "revision": "r" * 129},
            {"path": "/a", "extra": 1},
        ):
            response = await client.post("/v1/admin/reload", json=body)
            assert response.status_code == 422, body
            assert response.json()["error"]["code"] == "invalid_request"


async def test_a_second_reload_while_one_runs_is_refused_with_409(make_app, checkpoints):
    app, _ = await make_app()
    async with asgi_client(app) as client:
        first, second = await asyncio.gather(
            reload(client, checkpoints["b"], "first"), reload(client, checkpoints["b"], "second")
        )
        assert sorted([first.status_code, second.status_code]) == [200, 409]
        refused = first if first.status_code == 409 else second
        assert refused.json()["error"]["code"] == "reload_in_progress"


async def test_vllm_remote_says_it_cannot_reload(tmp_path, settings, verifier):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    from stepcredit.backends.vllm_remote import VLLMRemoteBackend

    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(20)}}
    words = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]").save_pretrained(tmp_path)
    config = LlamaConfig(vocab_size=21, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=1)
    config.save_pretrained(tmp_path)
    never = httpx.MockTransport(lambda request: httpx.Response(500))  # reached by nothing here
    backend = VLLMRemoteBackend(tmp_path, ["http://gpu:8000"], transport=never)
    scorer = Scorer(backend, settings, verifier=verifier)
    scorer.ready = True
    async with asgi_client(create_app(settings, scorer=scorer)) as client:
        response = await reload(client, tmp_path)
    assert response.status_code == 501
    error = response.json()["error"]
    assert error["code"] == "reload_unsupported" and "remote vLLM servers" in error["message"]
    await scorer.batcher.close()


@pytest.mark.parametrize("mode", ["beside", "drain"])
async def test_requests_during_a_reload_are_all_answered_each_by_one_model(make_app, checkpoints, monkeypatch, mode):
    if mode == "drain":  # no room for two copies: the old weights are freed first
        monkeypatch.setattr(HFBackend, "memory_available", lambda self: 0)
    app, scorer = await make_app()
    requests = [[{**i, "id": f"{r}-{k}"} for k, i in enumerate(workload(n=2, min_steps=2, max_steps=4, seed=r))]
                for r in range(6)]  # fmt: skip
    async with asgi_client(app) as client:
        # Each request's numbers on each checkpoint, scored alone.
        expected = {}
        for revision, path in (("A", checkpoints["a"]), ("B", checkpoints["b"])):
            assert (await reload(client, path, revision)).status_code == 200
            for items in requests:
                for result in (await score(client, items))["results"]:
                    expected[revision, result["id"]] = numbers(result)

        assert (await reload(client, checkpoints["a"], "A")).status_code == 200
        # The model of every backend call, in the order the calls start.
        calls, execute = [], scorer.batcher._execute
        def recording(batch, backend):  # noqa: E306
            calls.append(backend.info.revision)
            return execute(batch, backend)
        monkeypatch.setattr(scorer.batcher, "_execute", recording)

        send = lambda: asyncio.create_task(score(client, requests[len(sent) % len(requests)]))  # noqa: E731
        sent = []
        sent += [send(), send()]  # in flight when the reload starts
        reloading = asyncio.create_task(reload(client, checkpoints["b"], "B"))
        while not reloading.done():
            sent.append(send())
            await asyncio.sleep(0.01)
        response = await reloading
        assert response.status_code == 200 and response.json()["mode"] == mode
        after = [send(), send()]  # sent once the reload has answered
        answers = await asyncio.gather(*sent)  # every one answered (score() asserts 200)
        answered_after = await asyncio.gather(*after)

    revisions = [a["model"]["revision"] for a in answers]
    assert set(revisions) == {"A", "B"}, revisions  # they straddled the swap
    # Once a call runs on B, none runs on A again. (Requests are prepared on worker
    # threads, so the order they were sent in is not the order they reach the batcher.)
    assert set(calls) == {"A", "B"} and calls == sorted(calls), calls
    assert [a["model"]["revision"] for a in answered_after] == ["B", "B"]
    answers += answered_after
    for answer in answers:
        revision = answer["model"]["revision"]
        for result in answer["results"]:
            # Every item's numbers are those of the revision its response names.
            assert numbers(result) == pytest.approx(expected[revision, result["id"]], abs=1e-4), result["id"]


async def test_a_failed_reload_after_draining_reads_the_old_weights_back(make_app, checkpoints, monkeypatch):
    monkeypatch.setattr(HFBackend, "memory_available", lambda self: 0)
    app, scorer = await make_app()
    async with asgi_client(app) as client:
        before = await score(client)
        old = scorer.backend
        response = await reload(client, checkpoints["nan"], "bad")
        assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_checkpoint"
        assert scorer.backend is not old  # the old weights were freed, then read again
        after = await score(client)
        assert after["model"]["revision"] == before["model"]["revision"]
        assert numbers(after["results"][0]) == pytest.approx(numbers(before["results"][0]), abs=1e-5)


async def test_compat_routes_report_the_revision_that_scored(make_app, checkpoints):
    app, _ = await make_app()
    body = {"query": [ITEM["prompt"] + ITEM["completion"]], "prompts": [ITEM["prompt"]], "labels": ["5"]}
    async with asgi_client(app) as client:
        assert (await reload(client, checkpoints["b"], "step-7")).status_code == 200
        response = await client.post("/get_reward", json=body)
        assert response.status_code == 200 and response.headers["x-stepcredit-revision"] == "step-7"
        slime = {"prompt": ITEM["prompt"], "response": ITEM["completion"], "label": "5"}
        response = await client.post("/slime/reward", json=slime)
        assert response.status_code == 200 and response.headers["x-stepcredit-revision"] == "step-7"


async def test_metrics_count_reloads_and_show_one_current_revision(make_app, checkpoints):
    app, _ = await make_app()
    async with asgi_client(app) as client:
        await reload(client, checkpoints["b"], "step-1")
        await reload(client, checkpoints["b"], "step-2")
        await reload(client, checkpoints["qwen"])
        metrics = (await client.get("/metrics")).text
    assert 'stepcredit_reloads_total{outcome="ok"} 2.0' in metrics
    assert 'stepcredit_reloads_total{outcome="incompatible_model"} 1.0' in metrics
    info = [line for line in metrics.splitlines() if line.startswith("stepcredit_model_info{")]
    assert len(info) == 1 and 'revision="step-2"' in info[0], info
    assert json.dumps("step-1") not in "".join(info)


async def test_a_file_linking_out_of_the_reload_root_is_refused(make_app, checkpoints, tmp_path):
    """The root confines what a reload reads, not only the folder named: a checkpoint
    inside it whose weights link to a file outside is refused, and the old model serves."""
    root = tmp_path / "root"
    linked = root / "linked"
    linked.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(checkpoints["b"] / name, linked)
    (linked / "model.safetensors").symlink_to(checkpoints["b"] / "model.safetensors")
    inside = shutil.copytree(checkpoints["b"], root / "inside")
    app, _ = await make_app(admin_reload_root=root)
    async with asgi_client(app) as client:
        before = await score(client)
        response = await reload(client, linked, "linked")
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_checkpoint"
        assert "model.safetensors links to a file that is outside" in error["message"]
        assert str(checkpoints["b"]) not in error["message"]  # where the link points is not told
        assert (await score(client))["model"] == before["model"]
        # A link to the folder from inside the root is followed to where it really is.
        (root / "alias").symlink_to(inside)
        response = await reload(client, root / "alias", "alias")
        assert response.status_code == 200 and response.json()["model"]["path"] == str(inside.resolve())


@pytest.mark.parametrize("mode", ["beside", "drain"])
async def test_the_old_weights_are_freed_after_a_reload(make_app, checkpoints, monkeypatch, mode):
    import gc
    import weakref

    if mode == "drain":
        monkeypatch.setattr(HFBackend, "memory_available", lambda self: 0)
    app, scorer = await make_app()
    async with asgi_client(app) as client:
        await score(client)
        old = weakref.ref(scorer.backend.model)
        assert (await reload(client, checkpoints["b"], "b")).status_code == 200
        await score(client)
    gc.collect()
    assert old() is None  # nothing (backend, batcher, reloader, cache) still holds the old model
