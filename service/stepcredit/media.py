"""Inline images of an item: checked before any model work, decoded on demand.

An item carries images only inline, as base64 data URIs (`data:image/png;base64,...`): in
`image_url` content parts of its messages, or in its `images` list (taken by the bare
`{"type": "image"}` parts of its messages, or by the image placeholders of its `prompt`).
The service never fetches a URL: a request must not make it reach into its network or its
disk.

`item_images` runs where an item is parsed (`protocol.parse_item`, per item): it counts the
item's images, decodes their base64 and reads each header (format and size, no pixel
decoded) against the configured limits, so a bad image is its item's own error while the
other items are scored. `decode_image` does the full decode, later, in preparation.

Errors are `MediaError`s, `str()` = "<field>: <what>", with a `code`:

* `invalid_item`: the item breaks the wire format or a limit: a URL or other string where a
  data URI belongs, a data URI that is not base64 or declares a non-image type, bare image
  parts that do not match `images`, more than `max_images_per_item` images, an image over
  `max_image_bytes` (decoded) or `max_image_pixels` (width x height).
* `invalid_image`: the data is not what it claims: not strict base64, not a PNG, JPEG,
  WebP, GIF or BMP image, or (found by `decode_image`) truncated or corrupt.
"""

from __future__ import annotations

import binascii
import contextlib
import hashlib
import io
import re
from dataclasses import dataclass, field as dataclass_field
from typing import TYPE_CHECKING

from PIL import Image, ImageOps, UnidentifiedImageError

from .config import Limits

if TYPE_CHECKING:
    from .protocol import ScoreItem

__all__ = ["FORMATS", "ImageRef", "MediaError", "decode_image", "item_images"]

FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif", "BMP": "image/bmp"}
"""Pillow format -> MIME type of the images accepted. Still-image readers that decode in
this process, a subset of vLLM's allowlist (so what passes here also loads in a vLLM
server); Image.open is restricted to them, which keeps Pillow's other plugins (EPS would
run Ghostscript) away from untrusted bytes."""

_READERS = tuple(FORMATS)
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]{0,31}):")
_IMAGE_TYPE = re.compile(r"image/[a-z0-9][a-z0-9.+-]{0,126}")
# "data:image/<type>[;<param>]*;base64," is short: a `,` further in means no data URI.
_HEADER_CHARS = 256
_INLINE = "send the image inline as a data URI, data:image/png;base64,<data>"
_BASE64 = "not base64 (the standard alphabet with `=` padding, no whitespace or line breaks)"


class MediaError(ValueError):
    """An image of an item is refused. `code`: `invalid_item` or `invalid_image`;
    `field`: the JSON path of the offending value."""

    def __init__(self, code: str, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.code = code
        self.field = field


@dataclass(frozen=True)
class ImageRef:
    """One image of an item, checked (limits, base64, header) but not decoded."""

    field: str
    """Where the item holds it: `items[0].messages[1].content[0].image_url.url` or `items[0].images[1]`."""
    data_uri: str = dataclass_field(repr=False)
    """The image as a data URI naming its actual type, without parameters
    (`data:image/png;base64,...`): the item's own string when it already reads so."""
    data: bytes = dataclass_field(repr=False)
    """The bytes of the image file (base64-decoded)."""
    mime: str
    """The actual type, read from the bytes (the declared one may differ: it is not trusted)."""
    digest: str
    """sha256 hex of `data`: the image's identity for caches."""
    width: int
    """From the header, as stored (an EXIF orientation may swap it with `height` on decode)."""
    height: int


def item_images(item: ScoreItem, limits: Limits, where: str) -> list[ImageRef]:
    """The item's images in order of appearance, each checked against `limits` with its
    header read (no pixel decoded). Raises MediaError naming the field."""
    refs = []
    for field, uri in _sources(item, limits, where):
        payload = _payload(field, uri)
        data = _decode_base64(field, payload, limits)
        image_format, width, height = _read_header(field, data, limits)
        prefix = f"data:{FORMATS[image_format]};base64,"
        data_uri = uri if uri.startswith(prefix) else prefix + payload
        digest = hashlib.sha256(data).hexdigest()
        refs.append(ImageRef(field, data_uri, data, FORMATS[image_format], digest, width, height))
    return refs


def decode_image(ref: ImageRef) -> Image.Image:
    """The image's first frame, decoded in full, turned by its EXIF orientation, as RGB with
    any transparency over white: what vLLM's image loader makes of the same bytes, so every
    backend sees the same pixels. Raises MediaError(`invalid_image`) for truncated or
    corrupt data."""
    try:
        image = Image.open(io.BytesIO(ref.data), formats=_READERS)
        if image.size != (ref.width, ref.height):  # not the bytes item_images measured
            raise ValueError(f"size {image.size} differs from the checked {ref.width}x{ref.height}")
        # Frame 0 only; truncated data raises here (Pillow's LOAD_TRUNCATED_IMAGES is off).
        image.load()
        with contextlib.suppress(Exception):  # as vLLM: a broken EXIF block leaves it as stored
            image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except Exception as exc:  # crafted bytes can make a reader raise anything
        raise MediaError("invalid_image", ref.field, f"cannot be decoded ({_describe(exc)})") from None


def _sources(item: ScoreItem, limits: Limits, where: str) -> list[tuple[str, str]]:
    """(field, data URI) of each image of the item, in order of appearance; the counts checked."""
    images = item.images or []
    if item.messages is None:
        sources = [(f"{where}.images[{k}]", uri) for k, uri in enumerate(images)]
        count_field = f"{where}.images"
    else:
        sources, bare = [], 0
        for i, message in enumerate(item.messages):
            if isinstance(message.content, str):
                continue
            for j, part in enumerate(message.content):
                if part.type == "image_url":
                    sources.append((f"{where}.messages[{i}].content[{j}].image_url.url", part.image_url.url))
                elif part.type == "image":
                    if bare < len(images):
                        sources.append((f"{where}.images[{bare}]", images[bare]))
                    bare += 1
        if bare != len(images):
            raise MediaError(
                "invalid_item",
                f"{where}.images",
                f"{len(images)} images for {bare} bare image parts in `messages`: "
                'the k-th `{"type": "image"}` part takes `images[k]`',
            )
        count_field = f"{where}.messages"
    if len(sources) > limits.max_images_per_item:
        raise MediaError(
            "invalid_item", count_field, f"{len(sources)} images, limit max_images_per_item={limits.max_images_per_item}"
        )
    return sources


def _payload(field: str, uri: str) -> str:
    """The base64 data of a `data:image/...;base64,` URI; anything else is refused."""
    if uri[:5].lower() != "data:":
        scheme = _SCHEME.match(uri)
        what = f"a URL ({scheme.group(1).lower()}:)" if scheme else "not a data URI"
        raise MediaError("invalid_item", field, f"{what}; the service never fetches images: {_INLINE}")
    comma = uri.find(",", 5, _HEADER_CHARS)
    if comma < 0:
        raise MediaError("invalid_item", field, f"no `,` in its first {_HEADER_CHARS} characters: {_INLINE}")
    declared, *params = uri[5:comma].split(";")
    if not params or params[-1].lower() != "base64":
        raise MediaError("invalid_item", field, f"not a base64 data URI (`;base64,` before the data): {_INLINE}")
    if not _IMAGE_TYPE.fullmatch(declared.lower()):
        raise MediaError("invalid_item", field, f"declares the type {declared[:64]!r}, not an image type: {_INLINE}")
    return uri[comma + 1 :]


def _decode_base64(field: str, payload: str, limits: Limits) -> bytes:
    # The decoded size follows from the length: a huge string is refused before any of it is decoded.
    size = len(payload) // 4 * 3 - payload.endswith("=") - payload.endswith("==")
    if size > limits.max_image_bytes:
        raise MediaError("invalid_item", field, f"{size} bytes, limit max_image_bytes={limits.max_image_bytes}")
    try:
        data = binascii.a2b_base64(payload, strict_mode=True)
    except (binascii.Error, ValueError):  # ValueError: a character outside ASCII
        raise MediaError("invalid_image", field, _BASE64) from None
    if not data:
        raise MediaError("invalid_image", field, "no data after `base64,`")
    if len(data) > limits.max_image_bytes:  # the exact size (strict base64 cannot differ, but it is what we promise)
        raise MediaError("invalid_item", field, f"{len(data)} bytes, limit max_image_bytes={limits.max_image_bytes}")
    return data


def _read_header(field: str, data: bytes, limits: Limits) -> tuple[str, int, int]:
    """(Pillow format, width, height) from the header, the pixel limit checked; no pixel decoded."""
    if (canvas := _webp_canvas(data)) is not None:
        _check_pixels(field, *canvas, limits)
    try:
        image = Image.open(io.BytesIO(data), formats=_READERS)
    except Image.DecompressionBombError as exc:  # over twice Pillow's own (global) limit
        claimed = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{claimed.group(1)} pixels" if claimed else "too many pixels"
        raise MediaError(
            "invalid_item",
            field,
            f"{size} (refused by Pillow as a decompression bomb), limit max_image_pixels={limits.max_image_pixels}",
        ) from None
    except UnidentifiedImageError:
        raise MediaError("invalid_image", field, "not a PNG, JPEG, WebP, GIF or BMP image") from None
    except Exception as exc:  # crafted bytes can make a reader raise anything
        raise MediaError("invalid_image", field, f"unreadable image header ({_describe(exc)})") from None
    width, height = image.size
    image.close()
    _check_pixels(field, width, height, limits)
    return image.format, width, height


def _check_pixels(field: str, width: int, height: int, limits: Limits) -> None:
    if width < 1 or height < 1:
        raise MediaError("invalid_image", field, f"{width}x{height}: no pixels")
    if width * height > limits.max_image_pixels:
        raise MediaError(
            "invalid_item",
            field,
            f"{width}x{height} = {width * height} pixels, limit max_image_pixels={limits.max_image_pixels}",
        )


def _webp_canvas(data: bytes) -> tuple[int, int] | None:
    """The canvas size a WebP header declares (RFC 9649), or None for another format.

    Pillow's WebP reader creates libwebp's decoder, which allocates the whole canvas, inside
    Image.open, guarded only by Pillow's global limit of twice Image.MAX_IMAGE_PIXELS (179M
    pixels: over 1 GB for its two RGBA buffers); a 30-byte header may claim that much, so our
    limit is checked first. The other accepted formats allocate nothing on open."""
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP" or len(data) < 30:
        return None
    chunk = data[12:16]
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":  # lossy: 14-bit sizes after the start code
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    if chunk == b"VP8X":  # extended: 24-bit canvas size minus one
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    if chunk == b"VP8L" and data[20] == 0x2F:  # lossless: 14-bit sizes minus one after the signature
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparency pasted over white, as vLLM's `convert_image_mode` does, so a
    vLLM server that gets the data URI sees the same pixels."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        rgb = Image.new("RGB", rgba.size, (255, 255, 255))
        rgb.paste(rgba, mask=rgba.getchannel("A"))
        return rgb
    return image.convert("RGB")


def _describe(exc: Exception) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}"
