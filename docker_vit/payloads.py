"""A request's images as its body carries them: counted before any is read, and base64 text (a JSON
body's, a Runpod job's; data: URLs too) turned to bytes, each refused by its size before it is decoded.
Shared by the HTTP server's intake (uploads.py) and the Runpod worker."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Collection, Iterable

from docker_vit.errors import ApiError


def count_images(count: int, limit: int, per: str = "request") -> None:
    """Too many images are refused before any is decoded, however they came."""
    if count > limit:
        raise ApiError(413, f"{count} images in one {per}; the limit is {limit}")


def refuse_unknown(fields: Iterable[str], known: Collection[str] | None, what: str) -> None:
    """A JSON request's (or a Runpod job's) fields that the handler does not read are a 422: the body is
    the client's own document, where a misspelt `num_beam` would otherwise change nothing, unsaid. None:
    the handler reads every field. A few names, each cut short (a million long keys: no huge answer)."""
    unknown = sorted(set(fields) - set(fields if known is None else known))
    if unknown:
        named = ", ".join(name[:100] for name in unknown[:5])
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise ApiError(422, f"unknown {what}(s): {named}{more}")


def decode_images(texts: list[str], max_bytes: int) -> list[bytes]:
    """A JSON request's (or a Runpod job's) base64 images, once `count_images` has let them in."""
    return [decode_base64(text, index, max_bytes) for index, text in enumerate(texts)]


_WHITESPACE = b" \t\n\r\f\v"  # line breaks (MIME's 76 columns, `base64` without -w0) and padding


def decode_base64(text: str, index: int, max_bytes: int) -> bytes:
    """One base64 image (or a `data:` URL) to bytes; oversized ones are refused before decoding.
    Whitespace goes in one copy of the bytes: splitting the text made an object of each piece, so
    `"ab ab ab ..."` cost twenty times its size before the size test."""
    text = text.lstrip(_WHITESPACE.decode())
    invalid = f"image {index} is not valid base64"
    if text[:5].lower() == "data:":  # a data URL (the scheme is case-blind): its data follow the comma
        header, comma, text = text.partition(",")
        if not comma:
            raise ApiError(400, f"image {index} is a data URL without data")
        if "base64" not in (part.strip().lower() for part in header.split(";")[1:]):
            # percent-encoded bytes (RFC 2397) are not read; base64 without the marker is
            invalid += " (a data URL without ;base64: its bytes must be base64 all the same)"
    try:
        packed = text.encode("ascii").translate(None, _WHITESPACE)
    except UnicodeEncodeError:
        raise ApiError(400, invalid) from None
    if len(packed) // 4 * 3 > max_bytes + 3:
        raise ApiError(413, f"image {index} is over {max_bytes} bytes")
    try:
        data = base64.b64decode(packed, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, invalid) from None
    if len(data) > max_bytes:  # the length test above lets up to 2 bytes more through, by the padding
        raise ApiError(413, f"image {index} is {len(data)} bytes; the limit is {max_bytes}")
    return data
