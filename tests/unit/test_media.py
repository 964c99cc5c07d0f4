"""Inline images of an item (issue 12): the wire format, the limits, and hostile payloads.

Every refusal is that item's own error naming the field (`invalid_item` for the wire format
and the limits, `invalid_image` for data that is not an image), found before any model
work, while the other items of the request are scored.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import random
import struct
import time
import zlib

import pytest
from PIL import Image

from stepcredit import media
from stepcredit.config import Limits, Settings
from stepcredit.media import MediaError, decode_image, item_images
from stepcredit.protocol import ChatMessage, ScoreItem, ScoreResult, parse_item, parse_items

LIMITS = Limits()


# ------------------------------------------------------------------ helpers


def image_bytes(size=(8, 6), mode="RGB", color=(200, 30, 40), fmt="PNG", **save) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, fmt, **save)
    return buf.getvalue()


def noise_png(size=(64, 64)) -> bytes:
    """A PNG that compresses badly, so its pixel data spans many bytes."""
    buf = io.BytesIO()
    Image.frombytes("RGB", size, random.Random(0).randbytes(size[0] * size[1] * 3)).save(buf, "PNG")
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png_chunk(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))


def crafted_png(width: int, height: int) -> bytes:
    """A PNG of a few dozen bytes whose IHDR claims width x height RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def crafted_webp(width: int, height: int) -> bytes:
    """An extended (VP8X) WebP header claiming a width x height canvas, and nothing else."""
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\0\0\0\0" + (width - 1).to_bytes(3, "little")
    vp8x += (height - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x


def prompt_item(*images: str, **extra) -> dict:
    return {"prompt": "<image>" * len(images) + " How many?", "images": list(images), "completion": "3",
            "references": ["3"], **extra}


def parts_item(*parts: dict, images: list[str] | None = None) -> dict:
    item = {"messages": [{"role": "user", "content": list(parts)}], "completion": "3", "references": ["3"]}
    if images is not None:
        item["images"] = images
    return item


def url_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


BARE = {"type": "image"}
TEXT = {"type": "text", "text": "How many red cubes?"}
PNG = image_bytes()
PNG_URI = data_uri(PNG)


def refs_of(raw: dict, limits: Limits = LIMITS, where: str = "items[0]") -> list[media.ImageRef]:
    return item_images(ScoreItem.model_validate(raw), limits, where)


def refused(raw: dict, limits: Limits = LIMITS, where: str = "items[0]") -> MediaError:
    with pytest.raises(MediaError) as caught:
        refs_of(raw, limits, where)
    return caught.value


def failure(raw: object, limits: Limits = LIMITS, where: str = "items[0]") -> tuple[str, str]:
    result = parse_item(raw, limits, where)
    assert isinstance(result, ScoreResult), "the item was accepted"
    return result.error.code, result.error.message


# ------------------------------------------------------------------ the wire format


def test_an_image_url_part_is_read_with_its_field_type_size_and_digest():
    (ref,) = refs_of(parts_item(url_part(PNG_URI), TEXT))
    assert ref.field == "items[0].messages[0].content[0].image_url.url"
    assert (ref.mime, ref.width, ref.height) == ("image/png", 8, 6)
    assert ref.data == PNG and ref.digest == hashlib.sha256(PNG).hexdigest()
    assert ref.data_uri is PNG_URI  # already canonical: the item's own string, not a copy


def test_prompt_images_are_taken_in_order():
    jpeg = data_uri(image_bytes(fmt="JPEG"), "image/jpeg")
    refs = refs_of(prompt_item(PNG_URI, jpeg))
    assert [r.field for r in refs] == ["items[0].images[0]", "items[0].images[1]"]
    assert [r.mime for r in refs] == ["image/png", "image/jpeg"]


def test_bare_parts_take_images_in_order_of_appearance_among_image_url_parts():
    a, b, c = (data_uri(image_bytes(color=(i, i, i))) for i in (1, 2, 3))
    raw = {
        "messages": [
            {"role": "system", "content": "Count."},
            {"role": "user", "content": [url_part(a), BARE]},
            {"role": "user", "content": [TEXT, BARE]},
        ],
        "images": [b, c],
        "completion": "3",
        "references": ["3"],
    }
    refs = refs_of(raw)
    assert [r.field for r in refs] == [
        "items[0].messages[1].content[0].image_url.url",
        "items[0].images[0]",
        "items[0].images[1]",
    ]
    assert [r.digest for r in refs] == [hashlib.sha256(base64.b64decode(u.split(",")[1])).hexdigest() for u in (a, b, c)]


@pytest.mark.parametrize("fmt, mime", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp"),
                                       ("GIF", "image/gif"), ("BMP", "image/bmp")])
def test_every_documented_format_is_accepted(fmt, mime):
    (ref,) = refs_of(prompt_item(data_uri(image_bytes(fmt=fmt), mime)))
    assert (ref.mime, ref.width, ref.height) == (mime, 8, 6)
    assert decode_image(ref).size == (8, 6)


def test_a_declared_type_that_differs_from_the_bytes_is_fine_and_the_actual_one_is_reported():
    jpeg = image_bytes(fmt="JPEG")
    (ref,) = refs_of(prompt_item(data_uri(jpeg, "image/png")))
    assert ref.mime == "image/jpeg"
    assert ref.data_uri == data_uri(jpeg, "image/jpeg")  # what a vLLM server is then sent


def test_data_uri_parameters_and_case_are_accepted_and_the_uri_canonicalized():
    payload = base64.b64encode(PNG).decode()
    (ref,) = refs_of(prompt_item(f"DATA:Image/PNG;name=cubes.png;BASE64,{payload}"))
    # vLLM's data-URL reader takes no parameters: the canonical form is what backends send.
    assert ref.data_uri == PNG_URI


def test_an_item_without_images_needs_no_image_work(monkeypatch):
    monkeypatch.setattr(media.Image, "open", lambda *a, **k: pytest.fail("opened an image"))
    assert refs_of({"prompt": "2+2?", "completion": "4", "references": ["4"]}) == []
    assert refs_of(parts_item(TEXT, {"type": "text", "text": "!"})) == []


def test_openai_detail_is_accepted_and_other_values_are_refused():
    part = {"type": "image_url", "image_url": {"url": PNG_URI, "detail": "low"}}
    assert isinstance(parse_item(parts_item(part), LIMITS, "items[0]"), ScoreItem)
    part["image_url"]["detail"] = "ultra"
    code, message = failure(parts_item(part))
    assert code == "invalid_item" and message.startswith("items[0].messages[0].content[0].image_url.detail:")


def test_the_schema_documents_content_parts_and_images():
    schema = ScoreItem.model_json_schema()
    content = schema["$defs"]["ChatMessage"]["properties"]["content"]
    string, parts = content["oneOf"]
    assert string == {"type": "string"} and (parts["minItems"], parts["maxItems"]) == (1, 64)
    assert [p["$ref"].rsplit("/", 1)[1] for p in parts["items"]["oneOf"]] == ["TextPart", "ImageUrlPart", "ImagePart"]
    images = schema["properties"]["images"]["anyOf"][0]
    assert images["items"]["pattern"].startswith("^data:image/") and "never fetches" in images["items"]["description"]
    assert all(schema["$defs"][name]["additionalProperties"] is False
               for name in ("TextPart", "ImageUrl", "ImageUrlPart", "ImagePart"))


# ------------------------------------------------------------------ URLs are never fetched


@pytest.mark.parametrize("url, scheme", [
    ("http://169.254.169.254/latest/meta-data/cat.png", "http"),
    ("https://example.com/cat.png", "https"),
    ("file:///etc/passwd", "file"),
    ("FTP://example.com/cat.png", "ftp"),
])
def test_a_url_fails_its_item_and_is_never_fetched(url, scheme, monkeypatch):
    import socket

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("the service reached out"))
    monkeypatch.setattr("builtins.open", lambda *a, **k: pytest.fail("the service opened a file"))
    for raw, field in ((parts_item(url_part(url)), "items[0].messages[0].content[0].image_url.url"),
                       (prompt_item(url), "items[0].images[0]")):
        code, message = failure(raw)
        assert code == "invalid_item"
        assert message.startswith(f"{field}: a URL ({scheme}:)") and "never fetches" in message
        assert "data:image/png;base64," in message  # says what to send instead


@pytest.mark.parametrize("uri, says", [
    ("cat.png", "not a data URI"),
    ("data:image/png," + "%89PNG", "not a base64 data URI"),
    ("data:" + "x" * 300, "no `,` in its first 256 characters"),
    ("data:text/plain;base64,aGVsbG8=", "declares the type 'text/plain', not an image type"),
    ("data:;base64," + base64.b64encode(PNG).decode(), "declares the type '', not an image type"),
])
def test_a_string_that_is_no_base64_image_data_uri_is_an_invalid_item(uri, says):
    code, message = failure(prompt_item(uri))
    assert code == "invalid_item" and message.startswith("items[0].images[0]: " + says)


# ------------------------------------------------------------------ data that is not an image


@pytest.mark.parametrize("payload", [
    "not base64 at all!",
    base64.b64encode(PNG).decode().rstrip("="),  # padding removed
    base64.encodebytes(noise_png()).decode(),  # MIME-style line breaks
    base64.b64encode(PNG).decode()[:40] + " " + base64.b64encode(PNG).decode()[40:],
    base64.urlsafe_b64encode(b"\xfb\xff" * 40).decode(),  # the URL-safe alphabet
    "iVBORw0KGgo=" + "AAAA",  # data after the padding
    "iVBOR\u00e9w0KGgo=",  # not ASCII
])
def test_data_that_is_not_strict_base64_is_an_invalid_image(payload):
    code, message = failure(prompt_item("data:image/png;base64," + payload))
    assert code == "invalid_image"
    assert message == f"items[0].images[0]: {media._BASE64}"


@pytest.mark.parametrize("data", [
    b"The answer is 3: there are three red cubes.",
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",  # no Ghostscript is ever run
    image_bytes(fmt="TIFF"),  # an image, but not a documented format
    b"GIF89a",
])
def test_base64_of_something_that_is_no_accepted_image_is_an_invalid_image(data):
    assert failure(prompt_item(data_uri(data))) == (
        "invalid_image", "items[0].images[0]: not a PNG, JPEG, WebP, GIF or BMP image")


def test_an_empty_payload_is_an_invalid_image():
    assert failure(prompt_item("data:image/png;base64,")) == (
        "invalid_image", "items[0].images[0]: no data after `base64,`")


def test_a_png_cut_inside_its_header_fails_at_parse_time():
    code, message = failure(prompt_item(data_uri(PNG[:20])))
    assert code == "invalid_image" and message.startswith("items[0].images[0]:")


def test_a_truncated_png_passes_the_header_read_and_fails_to_decode_as_invalid_image():
    png = noise_png()
    assert len(png) > 12_000
    truncated = png[: len(png) // 2]
    (ref,) = refs_of(prompt_item(data_uri(truncated)))  # the header is whole: size known, nothing decoded
    assert (ref.width, ref.height) == (64, 64)
    with pytest.raises(MediaError) as caught:
        decode_image(ref)
    assert caught.value.code == "invalid_image"
    assert str(caught.value).startswith("items[0].images[0]: cannot be decoded (OSError: image file is truncated")


def test_a_png_with_corrupt_pixel_data_is_an_invalid_image_on_decode():
    png = bytearray(noise_png())
    start = png.index(b"IDAT") + 8
    png[start : start + 200] = b"\xff" * 200
    (ref,) = refs_of(prompt_item(data_uri(bytes(png))))
    with pytest.raises(MediaError) as caught:
        decode_image(ref)
    assert caught.value.code == "invalid_image" and caught.value.field == "items[0].images[0]"


# ------------------------------------------------------------------ limits


def test_a_decompression_bomb_png_is_refused_from_its_header_without_decoding():
    bomb = crafted_png(100_000, 100_000)  # 1e10 pixels in under 100 bytes
    assert len(bomb) < 100
    started = time.perf_counter()
    code, message = failure(prompt_item(data_uri(bomb)))
    assert time.perf_counter() - started < 1.0
    assert (code, message) == ("invalid_item", "items[0].images[0]: 10000000000 pixels (refused by Pillow as a "
                               "decompression bomb), limit max_image_pixels=16777216")


def test_too_many_pixels_is_an_invalid_item_naming_the_size_and_the_limit():
    code, message = failure(parts_item(TEXT, url_part(data_uri(crafted_png(5000, 5000)))), where="items[2]")
    assert code == "invalid_item"
    assert message == (
        "items[2].messages[0].content[1].image_url.url: 5000x5000 = 25000000 pixels, limit max_image_pixels=16777216"
    )


def test_the_pixel_limit_is_configurable_and_inclusive():
    assert refs_of(prompt_item(PNG_URI), Limits(max_image_pixels=48))  # 8x6 = 48: at the limit
    code, message = failure(prompt_item(PNG_URI), Limits(max_image_pixels=47))
    assert (code, message) == ("invalid_item", "items[0].images[0]: 8x6 = 48 pixels, limit max_image_pixels=47")


def test_a_webp_canvas_is_checked_before_pillow_allocates_it(monkeypatch):
    # libwebp's decoder allocates the whole canvas inside Image.open, which guards only with
    # Pillow's own global limit (179M pixels): 144M pixels claimed by a 30-byte header.
    monkeypatch.setattr(media.Image, "open", lambda *a, **k: pytest.fail("Image.open ran on the bomb"))
    code, message = failure(prompt_item(data_uri(crafted_webp(12_000, 12_000), "image/webp")))
    assert (code, message) == (
        "invalid_item", "items[0].images[0]: 12000x12000 = 144000000 pixels, limit max_image_pixels=16777216")


@pytest.mark.parametrize("kind", ["lossy", "lossless", "alpha", "animated"])
def test_the_webp_canvas_read_agrees_with_pillow_for_every_kind_of_webp(kind, monkeypatch):
    buf = io.BytesIO()
    frame = Image.new("RGBA" if kind == "alpha" else "RGB", (7, 5), (1, 2, 3))
    if kind == "animated":
        frame.save(buf, "WEBP", save_all=True, append_images=[Image.new("RGB", (7, 5))], duration=10)
    else:
        frame.save(buf, "WEBP", lossless=kind == "lossless")
    webp = buf.getvalue()
    (ref,) = refs_of(prompt_item(data_uri(webp, "image/webp")))
    assert (ref.width, ref.height) == (7, 5)
    # One pixel over the limit is refused by the canvas read alone, before Pillow opens it.
    monkeypatch.setattr(media.Image, "open", lambda *a, **k: pytest.fail("Image.open ran first"))
    code, message = failure(prompt_item(data_uri(webp, "image/webp")), Limits(max_image_pixels=34))
    assert (code, message) == ("invalid_item", "items[0].images[0]: 7x5 = 35 pixels, limit max_image_pixels=34")


def test_too_large_bytes_is_an_invalid_item():
    png = noise_png((32, 32))
    assert len(png) > 2048
    code, message = failure(prompt_item(data_uri(png)), Limits(max_image_bytes=2048))
    assert (code, message) == ("invalid_item", f"items[0].images[0]: {len(png)} bytes, limit max_image_bytes=2048")


def test_the_byte_limit_is_checked_from_the_base64_length_before_decoding(monkeypatch):
    monkeypatch.setattr(binascii, "a2b_base64", lambda *a, **k: pytest.fail("decoded an oversized image"))
    huge = "data:image/png;base64," + "A" * (4 * 1024 * 1024)  # 3 MiB once decoded
    code, message = failure(prompt_item(huge), Limits(max_image_bytes=1024 * 1024))
    assert (code, message) == ("invalid_item", "items[0].images[0]: 3145728 bytes, limit max_image_bytes=1048576")


def test_the_byte_limit_counts_decoded_bytes_exactly():
    png = noise_png((24, 24))  # over 1 KiB; its base64 ends with padding or not, either is exact
    for pad_png in (png, png + b"\0", png + b"\0\0"):  # trailing bytes after IEND: 0, 1 and 2 `=` of padding
        assert refs_of(prompt_item(data_uri(pad_png)), Limits(max_image_bytes=len(pad_png)))
        code, message = failure(prompt_item(data_uri(pad_png)), Limits(max_image_bytes=len(pad_png) - 1))
        assert message == f"items[0].images[0]: {len(pad_png)} bytes, limit max_image_bytes={len(pad_png) - 1}"


def test_too_many_images_is_an_invalid_item_counting_parts_and_images_together():
    two = Limits(max_images_per_item=2)
    assert len(refs_of(prompt_item(PNG_URI, PNG_URI), two)) == 2
    assert failure(prompt_item(PNG_URI, PNG_URI, PNG_URI), two) == (
        "invalid_item", "items[0].images: 3 images, limit max_images_per_item=2")
    mixed = parts_item(url_part(PNG_URI), BARE, url_part(PNG_URI), images=[PNG_URI])
    assert failure(mixed, two) == ("invalid_item", "items[0].messages: 3 images, limit max_images_per_item=2")


def test_the_count_is_refused_before_any_image_is_decoded(monkeypatch):
    monkeypatch.setattr(binascii, "a2b_base64", lambda *a, **k: pytest.fail("decoded an image"))
    code, _ = failure(prompt_item(*[PNG_URI] * 9))
    assert code == "invalid_item"


def test_max_images_zero_refuses_every_image_and_keeps_text_items():
    none = Limits(max_images_per_item=0)
    assert failure(prompt_item(PNG_URI), none)[0] == "invalid_item"
    assert isinstance(parse_item({"prompt": "2+2?", "completion": "4", "references": ["4"]}, none, "x"), ScoreItem)


@pytest.mark.parametrize("parts, images, counted", [
    ([BARE, BARE], [PNG_URI], "1 images for 2 bare image parts"),
    ([BARE], None, "0 images for 1 bare image parts"),
    ([TEXT], [PNG_URI], "1 images for 0 bare image parts"),
    ([url_part(PNG_URI)], [PNG_URI], "1 images for 0 bare image parts"),  # an image_url part takes none
])
def test_bare_image_parts_must_match_images_one_to_one(parts, images, counted):
    code, message = failure(parts_item(*parts, images=images))
    assert code == "invalid_item" and message.startswith(f"items[0].images: {counted} in `messages`")


def test_max_chars_per_item_counts_text_parts_only():
    limits = Limits(max_chars_per_item=100)
    big_image = data_uri(noise_png((32, 32)))  # thousands of characters, none of them text
    assert len(big_image) > 100
    assert isinstance(parse_item(parts_item(TEXT, url_part(big_image)), limits, "items[0]"), ScoreItem)
    long_text = parts_item({"type": "text", "text": "x" * 60}, {"type": "text", "text": "y" * 60})
    code, message = failure(long_text, limits)
    assert code == "invalid_item" and "121 characters, limit 100" in message  # 120 + the completion


def test_the_limits_come_from_the_environment_like_the_others(monkeypatch):
    monkeypatch.setenv("STEPCREDIT_MAX_IMAGES_PER_ITEM", "3")
    monkeypatch.setenv("STEPCREDIT_MAX_IMAGE_BYTES", "65536")
    monkeypatch.setenv("STEPCREDIT_MAX_IMAGE_PIXELS", "1000000")
    limits = Settings().limits()
    assert (limits.max_images_per_item, limits.max_image_bytes, limits.max_image_pixels) == (3, 65536, 1_000_000)
    defaults = Limits.model_fields
    assert (defaults["max_images_per_item"].default, defaults["max_image_bytes"].default,
            defaults["max_image_pixels"].default) == (8, 8 * 1024 * 1024, 16_777_216)


def test_a_pixel_limit_above_pillows_own_guard_is_refused():
    # Above Image.MAX_IMAGE_PIXELS Pillow warns or refuses before our check could speak.
    assert Image.MAX_IMAGE_PIXELS == 89_478_485
    with pytest.raises(ValueError):
        Limits(max_image_pixels=Image.MAX_IMAGE_PIXELS + 1)


# ------------------------------------------------------------------ shape: strict models, Unicode, field paths


@pytest.mark.parametrize("part, field", [
    ({"type": "text", "text": "a", "image": PNG_URI}, "content[0].image"),
    ({"type": "image_url", "image_url": {"url": PNG_URI}, "uuid": "x"}, "content[0].uuid"),
    ({"type": "image_url", "image_url": {"url": PNG_URI, "width": 8}}, "content[0].image_url.width"),
    ({"type": "image", "image": PNG_URI}, "content[0].image"),  # TRL's inline PIL slot: send `images`
])
def test_extra_keys_in_content_parts_are_refused_naming_them(part, field):
    code, message = failure(parts_item(part, images=[PNG_URI] if part["type"] == "image" else None))
    assert code == "invalid_item"
    assert message == f"items[0].messages[0].{field}: Extra inputs are not permitted"


@pytest.mark.parametrize("content, says", [
    ([{"type": "video", "video": "x"}], "content[0]: a content part is an object whose `type` is"),
    ([{"text": "no type"}], "content[0]: a content part is an object whose `type` is"),
    (["a string among parts"], "content[0]: a content part is an object whose `type` is"),
    ([{"type": "image_url"}], "content[0].image_url: Field required"),
    ([{"type": "image_url", "image_url": PNG_URI}], "content[0].image_url: Input should be"),
    ([{"type": "text"}], "content[0].text: Field required"),
    ([], "content: List should have at least 1 item"),
    ([TEXT] * 65, "content: List should have at most 64 items"),
    (5, "content: `content` is a string or a list of content parts"),
    (None, "content: `content` is a string or a list of content parts"),
])
def test_malformed_content_is_an_invalid_item_whose_field_reads_like_the_json(content, says):
    raw = {"messages": [{"role": "user", "content": content}], "completion": "3", "references": ["3"]}
    code, message = failure(raw)
    assert code == "invalid_item" and message.startswith(f"items[0].messages[0].{says}"), message


@pytest.mark.parametrize("raw, field", [
    (parts_item({"type": "text", "text": "cubes \ud800"}), "items[0].messages[0].content[0].text"),
    (parts_item(url_part("data:image/png;base64,\udfff")), "items[0].messages[0].content[0].image_url.url"),
    (prompt_item("data:image/png;base64,\ud83d"), "items[0].images[0]"),
])
def test_lone_surrogates_in_parts_and_images_are_invalid_items(raw, field):
    code, message = failure(raw)
    assert code == "invalid_item" and message.startswith(f"{field}: Value error, text holds a lone surrogate")


def test_images_must_be_strings():
    code, message = failure(prompt_item(123))
    assert code == "invalid_item" and message.startswith("items[0].images[0]: Input should be a valid string")


def test_string_content_is_unchanged():
    message = ChatMessage.model_validate({"role": "user", "content": "plain"})
    assert message.content == "plain"


# ------------------------------------------------------------------ a bad image fails alone


def test_an_item_with_a_bad_image_fails_alone_among_good_items():
    good_text = {"id": "t", "prompt": "2+2?", "completion": "4", "references": ["4"]}
    good_image = prompt_item(PNG_URI, id="g")
    bad_data = prompt_item("data:image/png;base64,bm90IGFuIGltYWdl", id="bad")  # "not an image"
    bad_url = parts_item(url_part("https://example.com/a.png")) | {"id": "url"}
    good_parts = parts_item(TEXT, BARE, images=[PNG_URI]) | {"id": "p"}
    results = parse_items([good_text, good_image, bad_data, bad_url, good_parts], LIMITS)
    assert [type(r).__name__ for r in results] == ["ScoreItem", "ScoreItem", "ScoreResult", "ScoreResult", "ScoreItem"]
    assert (results[2].id, results[2].error.code) == ("bad", "invalid_image")
    assert results[2].error.message == "items[2].images[0]: not a PNG, JPEG, WebP, GIF or BMP image"
    assert (results[3].id, results[3].error.code) == ("url", "invalid_item")
    assert results[3].error.message.startswith("items[3].messages[0].content[0].image_url.url: a URL (https:)")
    assert all(r.mig_reward is None and r.outcome_reward is None for r in results[2:4])


# ------------------------------------------------------------------ decoding


def first_ref(data: bytes, mime: str = "image/png") -> media.ImageRef:
    return refs_of(prompt_item(data_uri(data, mime)))[0]


def test_transparency_is_pasted_over_white_as_vllm_does():
    rgba = decode_image(first_ref(image_bytes(mode="RGBA", color=(255, 0, 0, 128))))
    assert rgba.mode == "RGB" and rgba.getpixel((0, 0)) == (255, 127, 127)
    clear = decode_image(first_ref(image_bytes(mode="LA", color=(0, 0))))
    assert clear.getpixel((0, 0)) == (255, 255, 255)


def test_palette_transparency_and_grey_and_cmyk_become_rgb():
    buf = io.BytesIO()
    Image.new("P", (4, 4), 0).save(buf, "GIF", transparency=0)
    assert decode_image(first_ref(buf.getvalue(), "image/gif")).getpixel((1, 1)) == (255, 255, 255)
    assert decode_image(first_ref(image_bytes(mode="L", color=90))).getpixel((0, 0)) == (90, 90, 90)
    cmyk = decode_image(first_ref(image_bytes(mode="CMYK", color=(0, 0, 0, 0), fmt="JPEG"), "image/jpeg"))
    assert cmyk.mode == "RGB" and all(v > 245 for v in cmyk.getpixel((0, 0)))


def test_an_animated_gif_decodes_its_first_frame():
    buf = io.BytesIO()
    red, blue = Image.new("RGB", (6, 4), (255, 0, 0)), Image.new("RGB", (6, 4), (0, 0, 255))
    red.save(buf, "GIF", save_all=True, append_images=[blue], duration=50)
    image = decode_image(first_ref(buf.getvalue(), "image/gif"))
    assert image.getpixel((0, 0)) == (255, 0, 0)


def test_the_exif_orientation_is_applied_on_decode_as_vllm_does():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    ref = first_ref(image_bytes(size=(8, 4), fmt="JPEG", exif=exif.tobytes()), "image/jpeg")
    assert (ref.width, ref.height) == (8, 4)  # as stored
    assert decode_image(ref).size == (4, 8)  # as displayed


def test_decode_returns_an_independent_rgb_image():
    image = decode_image(first_ref(PNG))
    assert image.mode == "RGB" and image.size == (8, 6) and image.getpixel((7, 5)) == (200, 30, 40)
    image.load()  # still usable: nothing was closed under it


def _parity_cases() -> dict[str, bytes]:
    exif = Image.Exif()
    exif[0x0112] = 6
    gif, animated, webp = io.BytesIO(), io.BytesIO(), io.BytesIO()
    Image.new("P", (4, 4), 0).save(gif, "GIF", transparency=0)
    Image.new("RGB", (6, 4), (255, 0, 0)).save(
        animated, "GIF", save_all=True, append_images=[Image.new("RGB", (6, 4), (0, 0, 255))]
    )
    Image.new("RGBA", (5, 5), (0, 255, 0, 60)).save(webp, "WEBP")
    return {
        "rgba": image_bytes(mode="RGBA", color=(255, 0, 0, 128)),
        "grey-alpha": image_bytes(mode="LA", color=(30, 77)),
        "palette-transparency": gif.getvalue(),
        "cmyk-jpeg": image_bytes(mode="CMYK", color=(10, 20, 30, 40), fmt="JPEG"),
        "exif-rotated": image_bytes(size=(8, 4), fmt="JPEG", exif=exif.tobytes()),
        "animated-gif": animated.getvalue(),
        "16-bit": image_bytes(mode="I;16", color=3000),
        "webp-alpha": webp.getvalue(),
        "noise": noise_png(),
    }


@pytest.mark.parametrize("name", list(_parity_cases()))
def test_decoded_pixels_equal_what_a_vllm_server_makes_of_the_data_uri(name):
    # vllm-remote sends the data URI and the server decodes it; hf and in-process vLLM get
    # decode_image's pixels: both must be the same image.
    pytest.importorskip("vllm", reason="vLLM is not installed")
    from vllm.multimodal.media.image import ImageMediaIO

    data = _parity_cases()[name]
    ours = decode_image(first_ref(data))
    theirs = ImageMediaIO(image_mode="RGB").load_bytes(data)
    theirs = getattr(theirs, "media", theirs)  # newer vLLM wraps it with its bytes
    assert (ours.mode, ours.size) == (theirs.mode, theirs.size)
    assert ours.tobytes() == theirs.tobytes()
