"""The HTTP API: requests in, the service's results out. Knows nothing of torch or of any model.

Routes: `POST /` (the seed's contract: multipart `file` or a raw image body, caption as text/plain),
`POST /v1/captions` (several images, JSON answer), `GET /v1/model`, the probes `/healthz`, `/readyz`
and `/ping`, `/metrics`, and the OpenAPI page at `/docs`.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.requests import ClientDisconnect

from docker_vit import errors, frontend, http_errors, memory, uploads
from docker_vit.config import Settings
from docker_vit.handler import Handler, Result
from docker_vit.loader import load_handler
from docker_vit.middleware import RequestContext
from docker_vit.process import NAME, version
from docker_vit.service import FAILED, LOADING, READY, STALLED, Service


def create_app(settings: Settings, handler: Handler | None = None, proxied: bool = False) -> FastAPI:
    """The ASGI app for one handler; `docker-vit serve`, Ray Serve and the tests all run this.
    `proxied`: behind a proxy (Ray Serve's) that answers with its own `X-Request-ID` and cancels a
    request whose client left."""
    service = Service(settings, handler or load_handler(settings))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        yield
        await service.stop()

    summary = "Send a picture, get a sentence."
    # `/v1/captions/` is a 404 like any unknown route, not a redirect built from the client's Host header
    app = FastAPI(
        title="Docker-ViT", summary=summary, version=version(), lifespan=lifespan, redirect_slashes=False
    )
    app.state.service = service
    http_errors.install(app)
    app.add_middleware(
        RequestContext,
        metrics=service.metrics,
        max_body=_max_body(settings, settings.max_images),
        max_body_at={"/": _max_body(settings, 1)},  # the original's one image: the rest is never read
        read_timeout=settings.read_timeout,
        proxied=proxied,
    )
    _caption_routes(app, service, settings)
    _open_routes(app, service)
    return app


def _caption_routes(app: FastAPI, service: Service, settings: Settings) -> None:
    """`POST /` and `POST /v1/captions`, behind the API key check."""
    authorized = Depends(_api_key_check(settings.api_keys))

    names = tuple(service.handler.option_names or ())  # the fields its `options` reads, for /docs
    upload = _upload_doc(names)

    @app.post("/", response_class=PlainTextResponse, dependencies=[authorized], openapi_extra=upload)
    async def caption(request: Request) -> PlainTextResponse:
        """The original contract: one image (multipart `file` or an image/* body) in, its caption as text."""
        with memory.in_use:  # what an upload leaves in the heap goes back to the OS once all are done
            inputs, raw = await uploads.read_inputs(request, settings, json_allowed=False, first_only=True)
            results = await _run(request, service, inputs, raw)
        return PlainTextResponse(results[0].text)

    @app.post(
        "/v1/captions",
        dependencies=[authorized],
        openapi_extra=_upload_doc(names, json=True),
        responses=_answer(_CAPTIONS),
    )
    async def captions(request: Request) -> JSONResponse:
        """One or more images (repeated multipart `file`, or JSON `{"images": [base64, ...]}`)."""
        with memory.in_use:
            inputs, raw = await uploads.read_inputs(
                request, settings, json_allowed=True, option_names=service.handler.option_names
            )
            results = await _run(request, service, inputs, raw)
        return JSONResponse({"model": service.handler.name, "captions": [r.to_json() for r in results]})


def _open_routes(app: FastAPI, service: Service) -> None:
    """What is served and whether it serves: open to all (probes have no keys), HEAD too."""

    described = {
        500: {"description": "the handler's describe() failed", "content": _JSON_ERROR},
        504: {
            "description": "the handler's describe() did not answer within the request timeout",
            "content": _JSON_ERROR,
        },
    }

    @app.get("/v1/model", responses={**_answer(_MODEL), **described})
    async def model() -> JSONResponse:  # and what serves it, as Triton's server metadata says
        server = {"name": NAME, "version": app.version}
        return JSONResponse({**await frontend.model_info(service), "server": server})

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", responses={503: _NOT_READY})
    async def readyz() -> JSONResponse:
        """`status` for probes; while not ready, the standard error object says why."""
        if service.ready:
            return JSONResponse({"status": READY})
        why = _not_ready(service)
        body = {"status": service.status, **errors.error_body(why.type, why.message)}
        return JSONResponse(body, status_code=why.status, headers=why.headers)

    @app.get("/ping", responses={204: {"description": "loading"}, 503: _UNHEALTHY})
    async def ping() -> Response:
        """Runpod's load balancer: 200 when ready, 204 while loading, 503 when the load or the device
        failed, or a call stalled."""
        if service.ready:
            return JSONResponse({"status": "healthy"})
        if service.state != LOADING:
            raise _not_ready(service)
        return Response(status_code=204)

    @app.get("/metrics", response_class=PlainTextResponse)  # Prometheus text, on the OpenAPI page too
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    gets = {"/healthz": healthz, "/readyz": readyz, "/ping": ping, "/v1/model": model, "/metrics": metrics}
    for path, answer in gets.items():  # HEAD too (load balancers probe with it), off the OpenAPI page
        app.add_api_route(path, answer, methods=["HEAD"], include_in_schema=False)


def _not_ready(service: Service) -> errors.ApiError:
    """The one 503 of a model that is not serving: probes while it loads, failed or stalled, the
    captioning routes while it loads or failed (a stalled model's requests queue behind its call)."""
    return errors.from_service(errors.NotServing(service.why_not_ready))


def _api_key_check(keys: tuple[str, ...]) -> Any:
    expected = [key.encode() for key in keys]

    async def check(request: Request) -> None:
        if not expected:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        matched = False
        for key in expected:  # every key is compared, in constant time, whatever matches first
            matched |= hmac.compare_digest(token.strip().encode(), key)
        if scheme.lower() != "bearer" or not matched:
            raise errors.ApiError(401, "missing or invalid API key", headers={"WWW-Authenticate": "Bearer"})

    return check


async def _run(request: Request, service: Service, inputs: list[bytes], raw: dict) -> list[Result]:
    """The request through the service, while the model serves; work stops for a client that left."""
    if service.state != READY:
        raise _not_ready(service)
    try:
        return await frontend.answer(service, inputs, raw, gone=lambda: _disconnected(request))
    except frontend.ClientGone:
        raise ClientDisconnect() from None


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone; the body is already read, so only a disconnect arrives."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _max_body(settings: Settings, images: int) -> int:
    """Room for `images` images in base64 (4/3) plus multipart or JSON framing."""
    return settings.max_bytes * images * 4 // 3 + 1_000_000


_ERROR = {  # every error answer's body (http_errors.error_response)
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
        }
    },
}
_JSON_ERROR = {"application/json": {"schema": _ERROR}}
# `/v1/captions`' answer: a result per image, in input order; a handler's own data rides beside `text`
_RESULT = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}


def _answer(schema: dict[str, Any]) -> dict[int, Any]:
    """A route's 200 answer in the OpenAPI page: JSON of this schema."""
    return {200: {"content": {"application/json": {"schema": schema}}}}


def _numbers(*names: str) -> dict[str, Any]:
    """An object that holds at least these numbers: the server's own, beside what a handler adds."""
    return {
        "type": "object",
        "properties": {name: {"type": "number"} for name in names},
        "required": [*names],
    }


# `/v1/model`: what every answer holds (a handler's describe() adds to it, and may say its own `model`)
_MODEL = {
    "type": "object",
    "properties": {
        "handler": {"type": "string"},
        "options": {"type": "array", "items": {"type": "string"}},
        "limits": _numbers("max_bytes", "max_pixels", "max_images", "max_queue", "request_timeout"),
        "batching": _numbers("max_batch_size", "max_wait_ms"),
        "status": {"type": "string", "enum": [LOADING, READY, STALLED, FAILED]},
        "server": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "version": {"type": "string"}},
        },
    },
    "required": ["model", "handler", "limits", "batching", "status", "server"],
}
_CAPTIONS = {
    "type": "object",
    "properties": {"model": {"type": "string"}, "captions": {"type": "array", "items": _RESULT}},
    "required": ["model", "captions"],
}
_NOT_READY = {"description": "loading, failed (to load, or the device), or stalled", "content": _JSON_ERROR}
_UNHEALTHY = {"description": "failed (to load, or the device), or stalled", "content": _JSON_ERROR}
_ERRORS = {
    "400": "no image, or a malformed request",
    "401": "a missing or wrong API key (when the server has keys)",
    "408": "the body did not arrive within the read timeout",
    "413": "an image, a request or the count of images over a limit",
    "415": "not a picture this server decodes",
    "422": "an option out of bounds",
    "431": "a request line and headers over 64 KiB",
    "500": "the model failed on this input",
    "503": "the queue is full, or the model does not serve: loading, failed, stalled (Retry-After)",
    "504": "no caption within the request timeout",
}


def _upload_doc(option_names: tuple[str, ...], json: bool = False) -> dict[str, Any]:
    """What the routes read themselves (not through FastAPI's parameters), for /docs: the body, and
    the fields the handler's `options` reads (in the query, or as form fields)."""
    binary = {"type": "string", "format": "binary"}
    params = [{"name": name, "in": "query", "required": False, "schema": {}} for name in option_names]
    files = {"type": "array", "items": binary} if json else binary  # `/v1/captions` takes `file` repeated
    options = {name: {} for name in option_names}
    fields = {"file": files, **options}
    content: dict[str, Any] = {
        "multipart/form-data": {"schema": {"type": "object", "properties": fields}},
        "image/*": {"schema": binary},
        "application/octet-stream": {"schema": binary},
    }
    if json:  # the options ride in the body too (uploads._read_json passes its other keys on)
        item = {"type": "string", "description": "an image in base64, or a data: URL of one"}
        images = {"type": "array", "items": item, "minItems": 1}
        body = {"images": images, **options}
        content["application/json"] = {
            "schema": {"type": "object", "properties": body, "required": ["images"]}
        }
    answers = {status: {"description": text, "content": _JSON_ERROR} for status, text in _ERRORS.items()}
    return {
        "requestBody": {"content": content, "required": True},
        "parameters": params,
        "responses": answers,
    }
