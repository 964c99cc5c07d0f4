"""Items with images through the Scorer and the HTTP API, on the tiny random Qwen2-VL.

Protected: a multimodal item scores with the same fields as a text item; the three ways to
carry an image (an `image_url` part, TRL's bare `image` part with `images`, a `prompt` with
`<image>` and `images`) give the same numbers; packed equals per-prefix; bad images, wrong
placeholder counts and images sent to a text-only model are per-item errors while the
other items of the request score."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import pytest
from PIL import Image
from stepcredit_trainer.scenes import make_scene

from stepcredit.api import create_app
from stepcredit.backends.hf import HFBackend
from stepcredit.config import Settings
from stepcredit.engine import Scorer
from tests.integration.conftest import asgi_client

PACKED_TOL = 1e-4
COMPLETION = "<think>\nI count the red shapes.\nThere is one red circle.\n</think>\n<answer>1</answer>"


def png_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def bomb_uri(width: int, height: int) -> str:
    """A valid, tiny PNG whose header claims width x height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return "data:image/png;base64," + base64.b64encode(body).decode()


IMAGE = png_uri(make_scene(7).image)
QUESTION = "How many red shapes are there?"


def url_item(item_id="url", image=IMAGE) -> dict:
    content = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": QUESTION}]
    return {"id": item_id, "messages": [{"role": "user", "content": content}], "completion": COMPLETION,
            "references": ["1", "one"]}  # fmt: skip


@pytest.fixture(scope="module")
def vl_settings(tmp_path_factory) -> Settings:
    return Settings(cache_dir=tmp_path_factory.mktemp("cache"), api_key=None, max_image_pixels=200_000)


@pytest.fixture(scope="module")
async def vl_scorers(tiny_vl_path, vl_settings, verifier):
    scorers = {}
    for strategy in ("packed", "per-prefix"):
        scorer = Scorer(HFBackend(tiny_vl_path, device="cpu", strategy=strategy), vl_settings, verifier=verifier)
        await scorer.start()
        scorers[strategy] = scorer
    yield scorers
    for scorer in scorers.values():
        scorer.ready = False
        scorer.backend.shutdown()


@pytest.fixture
async def vl_client(vl_scorers, vl_settings):
    async with asgi_client(create_app(vl_settings, scorer=vl_scorers["packed"])) as c:
        yield c


async def score(client, *items) -> list[dict]:
    response = await client.post("/v1/score", json={"items": list(items)})
    assert response.status_code == 200, response.text
    return response.json()["results"]


async def test_a_multimodal_item_scores_over_http_with_a_text_items_fields(vl_client):
    text = {**url_item("text"), "messages": [{"role": "user", "content": QUESTION}]}
    image, plain = await score(vl_client, url_item(), text)
    assert image["status"] == "ok" and plain["status"] == "ok", (image, plain)
    assert set(image) == set(plain)
    assert image["correct"] is True and image["format_ok"] and len(image["steps"]) == 2
    assert image["mig_reward"] == pytest.approx(sum(s["gain"] for s in image["steps"]))
    # The image is really part of the context the likelihoods condition on.
    assert image["baseline_loglik"] != pytest.approx(plain["baseline_loglik"], abs=1e-6)


async def test_the_three_ways_to_carry_an_image_give_the_same_numbers(vl_client, vl_scorers):
    bare = {**url_item("bare"), "images": [IMAGE]}
    bare["messages"] = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    tokenizer = vl_scorers["packed"].tokenizer
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        tokenize=False, add_generation_prompt=True,
    )  # fmt: skip
    prompt = {**url_item("prompt"), "images": [IMAGE], "prompt": rendered.replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>")}
    del prompt["messages"]
    results = await score(vl_client, url_item(), bare, prompt)
    assert all(r["status"] == "ok" for r in results), results
    first = results[0]
    for other in results[1:]:  # the same tokens and pixels (shared prefix passes may round differently)
        assert other["baseline_loglik"] == pytest.approx(first["baseline_loglik"], abs=PACKED_TOL), other["id"]
        assert [s["loglik"] for s in other["steps"]] == pytest.approx([s["loglik"] for s in first["steps"]], abs=PACKED_TOL)


async def test_packed_and_per_prefix_agree_on_multimodal_items(vl_scorers):
    from stepcredit.protocol import ScoreItem

    items = [ScoreItem.model_validate(url_item()), ScoreItem.model_validate(make_scene(3).item())]
    packed, plain = [(await vl_scorers[s].score(items)).results for s in ("packed", "per-prefix")]
    for a, b in zip(packed, plain, strict=True):
        assert a.status == b.status == "ok", (a.error, b.error)
        assert a.baseline_loglik == pytest.approx(b.baseline_loglik, abs=PACKED_TOL)
        for sa, sb in zip(a.steps, b.steps, strict=True):
            assert sa.loglik == pytest.approx(sb.loglik, abs=PACKED_TOL)
        assert a.mig_reward == pytest.approx(b.mig_reward, abs=PACKED_TOL)


async def test_bad_images_are_per_item_errors_and_the_rest_scores(vl_client):
    not_base64 = url_item("not-base64", "data:image/png;base64,@@@not base64@@@")
    not_image = url_item("not-image", "data:image/png;base64," + base64.b64encode(b"just some text").decode())
    too_many_pixels = url_item("bomb", bomb_uri(5000, 5000))
    fetched = url_item("url", "https://example.com/cat.png")
    results = await score(vl_client, not_base64, url_item("good"), not_image, too_many_pixels, fetched)
    by_id = {r["id"]: r for r in results}
    assert by_id["good"]["status"] == "ok"
    for bad in ("not-base64", "not-image", "bomb", "url"):
        assert by_id[bad]["status"] == "error", bad
        assert by_id[bad]["error"]["code"] in ("invalid_item", "invalid_image"), by_id[bad]
        assert "messages[0].content[0].image_url" in by_id[bad]["error"]["message"], by_id[bad]
    assert "max_image_pixels" in by_id["bomb"]["error"]["message"]


async def test_a_prompt_must_mark_each_image_once(vl_client):
    base = {"completion": COMPLETION, "references": ["1"]}
    none = {**base, "id": "none", "prompt": "Count the shapes.", "images": [IMAGE]}
    two = {**base, "id": "two", "prompt": "<image><image>Count the shapes.", "images": [IMAGE]}
    smuggled = {**base, "id": "smuggled", "prompt": "<|image_pad|>Count the shapes."}
    results = await score(vl_client, none, two, smuggled)
    for r in results:
        assert r["status"] == "error" and r["error"]["code"] == "invalid_item", r
    assert "marks 0 image places for 1 image" in results[0]["error"]["message"]
    assert "stray vision tokens ['<|image_pad|>']" in results[2]["error"]["message"]


async def test_vision_tokens_outside_the_placeholders_fail_the_item_and_a_literal_image_tag_is_text(vl_client):
    """A pad token the policy wrote would take an image's embedding slot (it once surfaced
    as a backend_error with a traceback); `<image>` inside a message is just text."""
    in_completion = {**url_item("completion"), "completion": COMPLETION.replace("one red", "one <|image_pad|> red")}
    in_reference = {**url_item("reference"), "references": ["1", "<|vision_end|>"]}
    in_text = url_item("text-part")
    in_text["messages"][0]["content"][1]["text"] = "Is <|vision_start|> here?"
    text_item = {**url_item("text-item"), "messages": [{"role": "user", "content": "hi"}],
                 "completion": COMPLETION.replace("one red", "<|video_pad|>")}  # fmt: skip
    literal = url_item("literal")
    literal["messages"][0]["content"][1]["text"] = "What does the HTML <image> tag do? " + QUESTION
    results = await score(vl_client, in_completion, in_reference, in_text, text_item, literal)
    by_id = {r["id"]: r for r in results}
    for bad in ("completion", "reference", "text-part", "text-item"):
        assert by_id[bad]["status"] == "error" and by_id[bad]["error"]["code"] == "invalid_item", by_id[bad]
    assert "vision token" in by_id["completion"]["error"]["message"]
    assert by_id["literal"]["status"] == "ok", by_id["literal"]


async def test_images_sent_to_a_text_only_model_fail_that_item(client):
    text = {**url_item("text"), "messages": [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}]}
    image, plain = await score(client, url_item(), text)
    assert image["status"] == "error" and image["error"]["code"] == "images_unsupported", image
    assert plain["status"] == "ok", plain  # text parts alone are joined for a text model


async def test_a_requests_images_are_bounded_in_all_not_only_one_by_one(vl_scorers, tmp_path):
    """Every image is decoded and processed before any model work: many images that each
    pass max_image_pixels must still not make one request take gigabytes and minutes."""
    settings = Settings(cache_dir=tmp_path, api_key=None, max_image_pixels_per_request=3 * 224 * 168)
    async with asgi_client(create_app(settings, scorer=vl_scorers["packed"])) as client:
        scene_items = [make_scene(11, i).item() for i in range(5)]
        results = await score(client, *scene_items)
    assert [r["status"] for r in results] == ["ok", "ok", "ok", "error", "error"], results
    assert "max_image_pixels_per_request=112896" in results[3]["error"]["message"]
    assert results[3]["error"]["code"] == "invalid_item"
