"""Every error a client sees has one shape: `{"error": {"type": ..., "message": ...}}`."""

from __future__ import annotations

import base64
import binascii
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from docker_vit.batching import QueueFull, TooManyItems
from docker_vit.handler import OptionsError
from docker_vit.images import InputError

log = logging.getLogger("docker_vit.errors")

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
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"image {index} is not valid base64") from None


def error_body(type: str, message: str) -> dict[str, dict[str, str]]:
    """The one shape of every error answer: HTTP's, Runpod's, and the 400 for unparseable HTTP."""
    return {"error": {"type": type, "message": message}}


def error_response(
    status: int, message: str, type: str | None = None, headers: dict | None = None
) -> JSONResponse:
    body = error_body(type or TYPES.get(status, "error"), message)
    return JSONResponse(body, status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    """Route FastAPI's and Starlette's own errors through the same shape."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.type, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return error_response(422, details or "invalid parameters")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        """Nobody is left to answer: not a server error. 499 (nginx's code) shows up in logs and metrics."""
        return Response(status_code=CLIENT_GONE)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s", request.url.path, exc_info=exc)
        # Starlette answers this from its outermost middleware, outside RequestContext: echo the id here
        request_id = request.scope.get("state", {}).get("echoed_id")
        headers = {"X-Request-ID": request_id} if request_id else None
        return error_response(500, f"internal error: {type(exc).__name__}", headers=headers)
