"""Images as the service takes them: inline `data:image/<type>;base64,...` URIs.

The service never fetches a URL, so every image travels inside the request. A file or
encoded bytes go as they are (their type read from the first bytes, no decoding, no
Pillow needed); a PIL image is encoded as PNG (Pillow, imported only then). Whether the
image decodes, and how many bytes and pixels it may have, the service checks: those
limits are its settings (STEPCREDIT_MAX_IMAGE_BYTES, ...), so the client does not guess them.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
from typing import Any

__all__ = ["image_data_uri", "IMAGE_MIME_TYPES", "check_data_uri"]

IMAGE_MIME_TYPES = ("png", "jpeg", "webp", "gif", "bmp")
"""The `image/<type>` the service decodes."""

_DATA_URI = re.compile(r"data:image/(?P<mime>[a-z]+)(;[^;,]*)*;base64,", re.IGNORECASE)

# The service's five types, from their file signatures (RIFF is WEBP only with "WEBP" at 8).
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
)


def check_data_uri(url: str) -> str:
    """`url` if it is an inline image the service can take; a ValueError saying what to send otherwise.
    Only the header is read: decoding is the service's (it names the item that fails)."""
    match = _DATA_URI.match(url)
    if match is None:
        head = url[:40] + ("..." if len(url) > 40 else "")
        if re.match(r"[a-z][a-z0-9+.-]*://", url, re.IGNORECASE):
            raise ValueError(
                f"{head!r}: the service fetches no URL; send the image inline as a data: URI "
                "(stepcredit_client.image_data_uri(path_or_bytes_or_pil))"
            )
        raise ValueError(f"{head!r} is not a data:image/<type>;base64,... URI")
    if match["mime"].lower() not in IMAGE_MIME_TYPES:
        raise ValueError(f"image/{match['mime']}: the service decodes image/{{{','.join(IMAGE_MIME_TYPES)}}}")
    return url


def image_data_uri(image: Any) -> str:
    """A `data:image/<type>;base64,...` URI for `image`:

    * a PIL image: encoded as PNG (needs Pillow, which any PIL image implies);
    * bytes of a PNG, JPEG, WEBP, GIF or BMP file: sent as they are;
    * a path (str or os.PathLike, `file://` accepted) to such a file: its bytes;
    * a data URI: returned as is when its type is one of those, else re-typed from its bytes.

    Bytes in another format (TIFF, ...) are converted to PNG when Pillow is installed.
    A web URL raises: the service never fetches one, and neither does the client.
    """
    if _is_pil(image):
        return _png_uri(image)
    if isinstance(image, bytes | bytearray | memoryview):
        return _bytes_uri(bytes(image))
    if isinstance(image, str) and image[:5].lower() == "data:":
        return _normalize_data_uri(image)
    if isinstance(image, str) and image[:7].lower() == "file://":
        image = image[7:]
    if isinstance(image, str) and re.match(r"[a-z][a-z0-9+.-]*://", image, re.IGNORECASE):
        check_data_uri(image)  # raises, naming the remedy
    if isinstance(image, str | os.PathLike):
        with open(image, "rb") as f:
            return _bytes_uri(f.read())
    raise TypeError(f"an image is a PIL image, bytes, a path or a data URI, not {type(image).__name__}")


def _is_pil(image: Any) -> bool:
    # No import: a PIL image can only exist where Pillow is installed.
    return any(cls.__module__.startswith("PIL.") and cls.__name__ == "Image" for cls in type(image).__mro__)


def _sniff(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((mime for magic, mime in _SIGNATURES if data.startswith(magic)), None)


def _bytes_uri(data: bytes) -> str:
    mime = _sniff(data)
    if mime is not None:
        return f"data:image/{mime};base64,{base64.b64encode(data).decode('ascii')}"
    pil = _pillow("to convert an image that is not PNG, JPEG, WEBP, GIF or BMP")
    try:
        with pil.Image.open(io.BytesIO(data)) as opened:
            opened.load()
            return _png_uri(opened)
    except pil.UnidentifiedImageError:
        raise ValueError(f"{len(data)} bytes that are no image Pillow can read") from None


def _normalize_data_uri(uri: str) -> str:
    match = _DATA_URI.match(uri)
    if match is not None and match["mime"].lower() in IMAGE_MIME_TYPES:
        return uri
    head, sep, payload = uri.partition(",")
    if not sep or not head.lower().endswith(";base64"):
        raise ValueError(f"{head[:40]!r}: only base64 data URIs carry an image")
    try:
        data = base64.b64decode(payload, validate=True)
    except binascii.Error:
        raise ValueError(f"{head[:40]!r}: the data is not base64") from None
    return _bytes_uri(data)


def _png_uri(image) -> str:
    # PNG stores these modes as they are; others (CMYK, YCbCr, F, ...) go through RGB.
    if image.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"):
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _pillow(why: str):
    try:
        import PIL.Image
    except ImportError:
        raise ImportError(f"Pillow is needed {why}: pip install pillow") from None
    return PIL
