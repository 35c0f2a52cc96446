"""Every error a client sees has one shape: `{"error": {"type": ..., "message": ...}}`."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

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


class ApiError(Exception):
    """Raise anywhere in request handling to answer `status` with the standard error body."""

    def __init__(
        self, status: int, message: str, type: str | None = None, headers: dict | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type or TYPES.get(status, "error")
        self.message = message
        self.headers = headers


def error_response(
    status: int, message: str, type: str | None = None, headers: dict | None = None
) -> JSONResponse:
    body = {"error": {"type": type or TYPES.get(status, "error"), "message": message}}
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
        return error_response(500, f"internal error: {type(exc).__name__}")
