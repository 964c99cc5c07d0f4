"""Images on the client side: `image_data_uri`, the item shapes the client accepts
and refuses before sending, what goes on the wire, and request bodies that images
make large. httpx.MockTransport plays the service (no model needed)."""

from __future__ import annotations

import base64
import io
import json
import sys

import httpx
import pytest
from PIL import Image

from stepcredit_client import (
    AsyncClient,
    ClientConfig,
    ItemOptions,
    ScoreItem,
    image_data_uri,
)

from .test_client_unit import FAST, ITEM, client_with, echo

QUESTION = "How many red squares are there?"


def picture(width=24, height=16, color=(220, 20, 20), mode="RGB") -> Image.Image:
    image = Image.new("RGB", (width, height), (255, 255, 255))
    image.paste(color, (2, 2, 10, 10))
    return image.convert(mode) if mode != "RGB" else image


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def decode(uri: str) -> tuple[str, bytes]:
    head, _, data = uri.partition(",")
    return head, base64.b64decode(data, validate=True)


def same_pixels(uri: str, image: Image.Image) -> bool:
    _, data = decode(uri)
    return Image.open(io.BytesIO(data)).convert("RGB").tobytes() == image.convert("RGB").tobytes()


# ------------------------------------------------------------ image_data_uri


def test_a_pil_image_becomes_a_png_data_uri_with_the_same_pixels():
    image = picture()
    uri = image_data_uri(image)
    head, data = decode(uri)
    assert head == "data:image/png;base64" and data.startswith(b"\x89PNG")
    assert same_pixels(uri, image)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK"])
def test_pil_images_of_any_mode_encode(mode):
    # CMYK has no PNG form: it goes through RGB rather than failing in the trainer.
    uri = image_data_uri(picture(mode=mode))
    assert uri.startswith("data:image/png;base64,") and Image.open(io.BytesIO(decode(uri)[1])).size == (24, 16)


@pytest.mark.parametrize("fmt,mime", [("PNG", "png"), ("JPEG", "jpeg"), ("GIF", "gif"), ("WEBP", "webp"),
                                      ("BMP", "bmp")])  # fmt: skip
def test_encoded_bytes_and_files_go_unchanged_with_their_type(tmp_path, fmt, mime):
    data = encoded(picture(), fmt)
    assert decode(image_data_uri(data)) == (f"data:image/{mime};base64", data)
    path = tmp_path / f"x.{mime}"
    path.write_bytes(data)
    for source in (path, str(path), f"file://{path}", bytearray(data), memoryview(data)):
        assert decode(image_data_uri(source))[1] == data


def test_other_formats_are_converted_to_png_when_pillow_is_there():
    tiff = encoded(picture(), "TIFF")
    uri = image_data_uri(tiff)
    assert uri.startswith("data:image/png;base64,") and same_pixels(uri, picture())


def test_without_pillow_only_the_conversion_needs_it(monkeypatch):
    png, tiff = encoded(picture(), "PNG"), encoded(picture(), "TIFF")
    monkeypatch.setitem(sys.modules, "PIL", None)  # import PIL now fails
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    assert decode(image_data_uri(png))[1] == png  # no Pillow needed to send a file as it is
    with pytest.raises(ImportError, match="pip install pillow"):
        image_data_uri(tiff)


def test_data_uris_pass_or_get_their_type_back():
    png = encoded(picture(), "PNG")
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    assert image_data_uri(uri) is uri
    # qwen-vl-utils writes "data:image;base64,...": the type is read from the bytes
    assert image_data_uri("data:image;base64," + base64.b64encode(png).decode()) == uri
    with pytest.raises(ValueError, match="not base64"):
        image_data_uri("data:image;base64,@@@")


def test_web_urls_and_non_images_are_refused_with_the_remedy():
    with pytest.raises(ValueError, match="fetches no URL.*data: URI"):
        image_data_uri("https://example.com/cat.png")
    with pytest.raises(ValueError, match="no image"):
        image_data_uri(b"just some text, not an image")
    with pytest.raises(TypeError, match="PIL image, bytes, a path"):
        image_data_uri(12)


# ------------------------------------------------------------- item shapes

URI = "data:image/png;base64," + base64.b64encode(encoded(picture(), "PNG")).decode()


def parts_item(**overrides) -> dict:
    item = {
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": URI, "detail": "low"}},
                                         {"type": "text", "text": QUESTION}]},
        ],
        "completion": ITEM["completion"],
        "references": ["1"],
    }  # fmt: skip
    return {**item, **overrides}


def test_items_take_content_parts_bare_placeholders_and_images():
    assert ScoreItem.model_validate(parts_item()).messages[0].content[0].image_url.detail == "low"
    bare = parts_item(
        messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a"}, {"type": "image"}]}],
        images=[URI, URI],
    )
    assert len(ScoreItem.model_validate(bare).images) == 2
    assert ScoreItem(prompt="<image>" + QUESTION, completion="c", references=["1"], images=[URI]).images == [URI]
    assert ScoreItem.model_validate(parts_item(messages=[{"role": "user", "content": "text"}])).messages[0].content


@pytest.mark.parametrize(
    "change,message",
    [
        ({"images": ["https://example.com/a.png"]}, "fetches no URL"),
        ({"images": ["file:///tmp/a.png"]}, "fetches no URL"),
        ({"images": ["data:image/svg+xml;base64,AAAA"]}, "not a data:image"),
        ({"images": ["data:image/tiff;base64,AAAA"]}, "image/tiff"),
        ({"images": [URI]}, 'hold 0 bare {"type": "image"} parts for 1'),
        ({"messages": [{"role": "user", "content": [{"type": "image"}]}]}, 'hold 1 bare {"type": "image"} part for 0'),
        ({"messages": [{"role": "user", "content": []}]}, "at least 1"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 65}]}, "at most 64"),
        ({"messages": [{"role": "user", "content": [{"type": "video", "video": "v.mp4"}]}]}, "does not match"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}]},
         "fetches no URL"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a", "extra": 1}]}]}, "Extra inputs"),
    ],
)  # fmt: skip
def test_item_shapes_the_service_would_refuse_fail_before_sending(change, message):
    calls = []
    client = client_with(lambda r: calls.append(r) or echo(r))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("{", r"\{")):
        client.score([parts_item(**change)])
    assert calls == []


def test_non_finite_option_weights_are_refused_not_sent_as_null():
    with pytest.raises(ValueError, match="finite"):
        ItemOptions(acc_weight=float("nan"))
    with pytest.raises(ValueError, match="finite"):
        client_with(echo).score([ITEM], {"verify_timeout_s": float("inf")})


# ------------------------------------------------------------------ the wire


def captured(handler_calls):
    def handler(request):
        handler_calls.append(json.loads(request.content))
        return echo(request)

    return handler


def test_parts_and_images_go_on_the_wire_as_given():
    sent = []
    bare = parts_item(
        messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}], images=[URI]
    )
    with_prompt = {"prompt": "<image>" + QUESTION, "completion": "c", "references": ["1"], "images": [URI]}
    client_with(captured(sent)).score([parts_item(), bare, with_prompt, ITEM])
    items = sent[0]["items"]
    assert items[0]["messages"] == parts_item()["messages"]  # type tags kept, detail kept
    assert items[1]["messages"][0]["content"] == [{"type": "image"}, {"type": "text", "text": QUESTION}]
    assert items[1]["images"] == [URI] and items[2]["images"] == [URI]
    assert "images" not in items[3]  # a text item is sent as before
    agent = client_with(echo)._headers["User-Agent"]  # a client that carries images: 0.3 or later
    assert agent.startswith("stepcredit-client/") and tuple(map(int, agent.split("/")[1].split(".")[:2])) >= (0, 3)


def test_image_url_detail_is_left_out_when_not_given():
    sent = []
    item = parts_item()
    del item["messages"][0]["content"][0]["image_url"]["detail"]
    client_with(captured(sent)).score([item])
    assert sent[0]["items"][0]["messages"][0]["content"][0] == {"type": "image_url", "image_url": {"url": URI}}


def big_image_item(i: int, n_bytes: int) -> dict:
    # A PNG header followed by padding: the client does not decode, the size is what counts here.
    data = b"\x89PNG\r\n\x1a\n" + bytes(n_bytes)
    return {"id": str(i), "prompt": "<image>q", "completion": "c", "references": ["1"], "images": [image_data_uri(data)]}


def test_requests_are_cut_before_they_pass_max_request_bytes():
    bodies = []

    def handler(request):
        bodies.append(len(request.content))
        return echo(request)

    limit = 64 * 1024
    items = [big_image_item(i, 15_000) for i in range(10)]  # ~20 kB each as base64
    response = client_with(handler, chunk_size=64, max_request_bytes=limit).score(items)
    assert [r.id for r in response.results] == [str(i) for i in range(10)]
    assert len(bodies) == 4 and max(bodies) <= limit  # 3 + 3 + 3 + 1, not one 200 kB request


async def test_the_async_client_cuts_by_bytes_too():
    bodies = []

    async def handler(request):
        bodies.append(len(request.content))
        return echo(request)

    config = ClientConfig(retry=FAST, max_request_bytes=64 * 1024)
    async with AsyncClient("http://svc", config=config, transport=httpx.MockTransport(handler)) as client:
        response = await client.score([big_image_item(i, 15_000) for i in range(10)])
    assert [r.id for r in response.results] == [str(i) for i in range(10)] and max(bodies) <= 64 * 1024


def test_an_item_larger_than_one_request_fails_before_anything_is_sent():
    calls = []
    client = client_with(lambda r: calls.append(r) or echo(r), max_request_bytes=32 * 1024)
    with pytest.raises(ValueError, match=r"items\[1\] is \d+ bytes as JSON.*max_request_bytes=32768"):
        client.score([big_image_item(0, 100), big_image_item(1, 40_000)])
    assert calls == []


def test_the_body_sent_is_the_items_and_options_json():
    sent = []
    client_with(captured(sent)).score([ITEM], {"format": "boxed", "acc_weight": 2})
    assert sent == [{"items": [ITEM], "options": {"format": "boxed", "acc_weight": 2.0}}]
