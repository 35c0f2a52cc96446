"""The errors a client is answered with, and their one shape: `{"error": {"type": ..., "message": ...}}`.

Here are the failures that are the client's doing (a refused input or image, bad options, a full
queue), raised deep in the core, and what each failure means to a client, for every front end alike.
No web framework here (the Runpod worker answers with the same objects; FastAPI's side is
http_errors.py), and nothing of the package is imported, so every layer can raise these."""

from __future__ import annotations

import re
from http import HTTPStatus

TYPES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_parameters",
    429: "too_many_requests",
    431: "request_headers_too_large",
    499: "client_closed_request",
    500: "internal_error",
    503: "unavailable",
    504: "timeout",
}

CLIENT_GONE = 499
# A refused or stalled body may still be on its way: close the connection rather than read the rest.
CLOSE = {"Connection": "close"}


class InputError(Exception):
    """A client's input was refused (a 400; subclasses say otherwise). Handlers raise it from `prepare`
    for input that is the client's mistake, so that it is answered as such and not as a 500."""

    status = 400
    type = "invalid_request"


class ImageError(InputError):
    """A client's image was refused; `status` is the HTTP answer it deserves."""

    status = 415
    type = "unsupported_media_type"


class TooLarge(ImageError):
    """An image, or the work of decoding it, over a limit (413)."""

    status = 413
    type = "payload_too_large"

    # A default message, as its bases have: a handler's bare `raise TooLarge` is a 413, not a TypeError (500).
    def __init__(self, message: str = "the input is too large", setting: str | None = None) -> None:
        super().__init__(message)
        self.setting = setting  # the setting that raises the limit, where one does: `caption` says so


class NotAnImage(ImageError):
    """Bytes that are no picture this server decodes (415)."""


class OptionsError(ValueError):
    """A request's options are out of bounds or malformed (HTTP 422)."""


# What a handler raises for the client's mistake, from any hook: answered 4xx, never logged as a failure
CLIENT_ERRORS = (InputError, OptionsError)


class QueueFull(Exception):
    """The queue holds `max_queue` items already; the caller should answer 503 and retry later."""


class NotServing(Exception):
    """The model does not serve now (loading, its load or its device failed, a call stalled): 503, for a
    caller to retry or try elsewhere."""


class TooManyItems(Exception):
    """One request holds more items than the whole queue: retrying can never help (413)."""


def type_of(status: int) -> str:
    """The error type of a status: ours, else HTTP's own name for it (`conflict` for 409)."""
    if status in TYPES:
        return TYPES[status]
    try:
        return re.sub(r"\W+", "_", HTTPStatus(status).phrase.lower())
    except ValueError:  # a status HTTP does not name
        return "invalid_request" if 400 <= status <= 499 else "error"


class ApiError(Exception):
    """Raise anywhere in request handling to answer `status` with the standard error body."""

    def __init__(
        self, status: int, message: str, type: str | None = None, headers: dict | None = None
    ) -> None:
        message = message.encode("utf-8", "backslashreplace").decode()  # JSON carries no lone surrogate
        super().__init__(message)
        self.status = status
        self.type = type or type_of(status)
        self.message = message
        self.headers = headers


def from_service(exc: Exception) -> ApiError:
    """What a failure inside `Service.run` means to a client: every adapter answers it the same way."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, InputError):  # a client's mistake, whatever status or type a handler gave it
        if type(exc.status) is int and 400 <= exc.status <= 499:
            return ApiError(exc.status, str(exc), _own_type(exc))
        return ApiError(400, str(exc))  # its type went with the status it named
    if isinstance(exc, OptionsError):
        return ApiError(422, str(exc))
    if isinstance(exc, TooManyItems):
        return ApiError(413, str(exc))
    if isinstance(exc, NotServing):
        return ApiError(503, str(exc), headers={"Retry-After": "5"})
    if isinstance(exc, QueueFull):
        return ApiError(503, str(exc), "overloaded", headers={"Retry-After": "1"})
    return ApiError(500, f"the model failed: {type(exc).__name__}: {exc}", "model_error")


def _own_type(exc: InputError) -> str | None:
    """The `type` a handler's error names, unless it came with another status than the error's own: a
    subclass that sets only `status = 404` is a "not_found", not its base's "invalid_request"."""

    def set_at(name: str) -> int:  # how far from the error the attribute was set: -1 on the error itself
        mro = type(exc).__mro__
        return -1 if name in vars(exc) else next(i for i, c in enumerate(mro) if name in vars(c))

    if set_at("status") < set_at("type"):  # `status` set below where `type` was: not its type
        return None
    return exc.type if isinstance(exc.type, str) and exc.type else None


def error_body(type: str, message: str) -> dict[str, dict[str, str]]:
    """The one shape of every error answer: HTTP's, Runpod's, and the 400 for unparseable HTTP."""
    return {"error": {"type": type, "message": message}}
