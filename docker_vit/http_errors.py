"""FastAPI's and Starlette's own errors, and ours, answered in the one shape of errors.py."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from docker_vit.errors import CLIENT_GONE, ApiError, error_body, type_of

log = logging.getLogger("docker_vit.errors")


def error_response(
    status: int, message: str, type: str | None = None, headers: dict | None = None
) -> JSONResponse:
    body = error_body(type or type_of(status), message)
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
        return error_response(exc.status_code, str(exc.detail), headers=_with_head(exc.headers))

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


def _with_head(headers: dict[str, str] | None) -> dict[str, str] | None:
    """A 405's `Allow` names the methods of the first route on the path: every GET route here answers
    HEAD too, from a route of its own, which Starlette leaves out."""
    allow = (headers or {}).get("Allow", "")
    methods = [method.strip() for method in allow.split(",")]
    if "GET" in methods and "HEAD" not in methods:
        return {**headers, "Allow": ", ".join([*methods, "HEAD"])}
    return headers
