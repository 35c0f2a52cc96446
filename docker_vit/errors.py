"""Every error a client sees has one shape: `{"error": {"type": ..., "message": ...}}`.

What a failure means to a client, for every front end alike; no web framework here (the Runpod worker
answers with the same objects), FastAPI's side of it is http_errors.py. Also here: the checks of
base64 images (JSON bodies, Runpod jobs) whose failures are these errors."""

from __future__ import annotations

import base64
import binascii

from docker_vit.batching import QueueFull, TooManyItems
from docker_vit.handler import OptionsError
from docker_vit.images import InputError

TYPES = {
    400: "invalid_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_parameters",
    499: "client_closed_request",
    500: "internal_error",
    503: "unavailable",
    504: "timeout",
}

CLIENT_GONE = 499
# A refused or stalled body may still be on its way: close the connection rather than read the rest.
CLOSE = {"Connection": "close"}


class ApiError(Exception):
    """Raise anywhere in request handling to answer `status` with the standard error body."""

    def __init__(
        self, status: int, message: str, type: str | None = None, headers: dict | None = None
    ) -> None:
        message = message.encode("utf-8", "backslashreplace").decode()  # JSON carries no lone surrogate
        super().__init__(message)
        self.status = status
        self.type = type or TYPES.get(status, "error")
        self.message = message
        self.headers = headers


def from_service(exc: Exception) -> ApiError:
    """What a failure inside `Service.run` means to a client: every adapter answers it the same way."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, InputError):  # a client's mistake, whatever status or type a handler gave it
        if type(exc.status) is int and 400 <= exc.status <= 499:
            return ApiError(
                exc.status, str(exc), exc.type if isinstance(exc.type, str) and exc.type else None
            )
        return ApiError(400, str(exc))  # its type went with the status it named
    if isinstance(exc, OptionsError):
        return ApiError(422, str(exc))
    if isinstance(exc, TooManyItems):
        return ApiError(413, str(exc))
    if isinstance(exc, QueueFull):
        return ApiError(503, str(exc), "overloaded", headers={"Retry-After": "1"})
    return ApiError(500, f"the model failed: {type(exc).__name__}: {exc}", "model_error")


def count_images(count: int, limit: int, per: str = "request") -> None:
    """Too many images are refused before any is decoded, however they came."""
    if count > limit:
        raise ApiError(413, f"{count} images in one {per}; the limit is {limit}")


def decode_images(texts: list[str], max_bytes: int) -> list[bytes]:
    """A JSON request's (or a Runpod job's) base64 images, once `count_images` has let them in."""
    return [decode_base64(text, index, max_bytes) for index, text in enumerate(texts)]


def decode_base64(text: str, index: int, max_bytes: int) -> bytes:
    """One base64 image (or a `data:` URL) to bytes; oversized ones are refused before decoding."""
    if text[:5].lower() == "data:":  # a data URL (the scheme is case-blind): its data follow the comma
        _, comma, text = text.partition(",")
        if not comma:
            raise ApiError(400, f"image {index} is a data URL without data")
    text = "".join(text.split())
    if len(text) // 4 * 3 > max_bytes + 3:
        raise ApiError(413, f"image {index} is over {max_bytes} bytes")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"image {index} is not valid base64") from None
    if len(data) > max_bytes:  # the length test above lets up to 2 bytes more through, by the padding
        raise ApiError(413, f"image {index} is {len(data)} bytes; the limit is {max_bytes}")
    return data


def error_body(type: str, message: str) -> dict[str, dict[str, str]]:
    """The one shape of every error answer: HTTP's, Runpod's, and the 400 for unparseable HTTP."""
    return {"error": {"type": type, "message": message}}
