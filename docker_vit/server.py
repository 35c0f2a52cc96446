"""The HTTP API: requests in, the service's results out. Knows nothing of torch or of any model.

Routes: `POST /` (the seed's contract: multipart `file` or a raw image body, caption as text/plain),
`POST /v1/captions` (several images, JSON answer), `GET /v1/model`, the probes `/healthz`, `/readyz`
and `/ping`, `/metrics`, and the OpenAPI page at `/docs`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import metadata
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from docker_vit import errors, memory
from docker_vit.config import Settings
from docker_vit.handler import Handler, Result, description, load_handler
from docker_vit.middleware import RequestContext
from docker_vit.service import LOADING, READY, STALLED, Service

OPTION_PARAMS = [
    {"name": name, "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1}}
    for name in ("num_beams", "max_new_tokens")
]


MAX_JSON_COMMAS = 10_000  # options' values (a handler's prompt or labels); parsing 10,000 takes ~5 ms
MAX_DIGITS = 100  # an integer's, in JSON: turning 4,000 digits into an int takes the interpreter's lock


class _LongNumber(ValueError):
    pass


def _short_int(text: str) -> int:
    if len(text) > MAX_DIGITS:
        raise _LongNumber
    return int(text)


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
    app = FastAPI(title="Docker-ViT", summary=summary, version=_version(), lifespan=lifespan)
    app.state.service = service
    errors.install(app)
    app.add_middleware(
        RequestContext,
        metrics=service.metrics,
        max_body=_max_body(settings),
        read_timeout=settings.read_timeout,
        proxied=proxied,
    )
    _routes(app, service, settings)
    return app


def _routes(app: FastAPI, service: Service, settings: Settings) -> None:
    authorized = Depends(_api_key_check(settings.api_keys))

    @app.post("/", response_class=PlainTextResponse, dependencies=[authorized], openapi_extra=_upload_doc())
    async def caption(request: Request) -> PlainTextResponse:
        """The original contract: one image (multipart `file` or an image/* body) in, its caption as text."""
        with memory.in_use:  # what an upload leaves in the heap goes back to the OS once all are done
            inputs, raw = await _read_inputs(request, settings, json_allowed=False)
            results = await _run(request, service, settings, inputs[:1], raw)
        return PlainTextResponse(results[0].text)

    @app.post("/v1/captions", dependencies=[authorized], openapi_extra=_upload_doc(json=True))
    async def captions(request: Request) -> JSONResponse:
        """One or more images (repeated multipart `file`, or JSON `{"images": [base64, ...]}`)."""
        with memory.in_use:
            inputs, raw = await _read_inputs(request, settings, json_allowed=True)
            results = await _run(request, service, settings, inputs, raw)
        return JSONResponse({"model": service.handler.name, "captions": [r.to_json() for r in results]})

    @app.get("/v1/model")
    async def model() -> JSONResponse:
        base = Handler.describe(service.handler)  # name and class: what a describe() adds to
        try:
            info = {**base, **description(service.handler)}
        except Exception as exc:
            if service.state == READY:
                raise errors.from_service(exc) from None
            info = base  # a describe() that needs the loaded model, asked while it loads
        limits = info.get("limits") if isinstance(info.get("limits"), dict) else {}
        request = {"max_bytes": settings.max_bytes, "max_pixels": settings.max_pixels}
        request |= {"max_images": settings.max_images, "max_queue": settings.max_queue}
        return JSONResponse({**info, "limits": {**limits, **request}, "status": service.state})

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """`status` for probes; while not ready, the standard error object says why."""
        if service.ready:
            return JSONResponse({"status": READY})
        error = {"type": errors.TYPES[503], "message": service.not_ready}
        status = STALLED if service.state == READY else service.state
        return JSONResponse({"status": status, "error": error}, status_code=503, headers={"Retry-After": "5"})

    @app.get("/ping")
    async def ping() -> Response:
        """Runpod's load balancer: 200 when ready, 204 while loading, 503 when loading failed or stalled."""
        if service.ready:
            return JSONResponse({"status": "healthy"})
        if service.state != LOADING:
            return errors.error_response(503, service.not_ready)
        return Response(status_code=204)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    for probe, answer in (("/healthz", healthz), ("/readyz", readyz), ("/ping", ping)):
        # load balancers may probe with HEAD; one operation per route keeps the OpenAPI page clean
        app.add_api_route(probe, answer, methods=["HEAD"], include_in_schema=False)


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


async def _read_inputs(request: Request, settings: Settings, json_allowed: bool) -> tuple[list[bytes], dict]:
    """The request's images and options, from multipart, a raw image body, or JSON."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    options: dict[str, Any] = dict(request.query_params)
    if content_type == "multipart/form-data":
        inputs, fields = await _read_form(request, settings)
        options.update(fields)
    elif content_type.startswith("image/") or content_type == "application/octet-stream":
        inputs = [await _read_image_body(request, settings.max_bytes)]
    elif content_type == "application/json" and json_allowed:
        # parsing and base64 of a large body take CPU seconds: off the loop, other clients go on
        inputs, fields = await asyncio.to_thread(_read_json, await request.body(), settings)
        options.update(fields)
    else:
        wanted = "multipart field 'file'" + (", JSON {'images': [...]}" if json_allowed else "")
        raise errors.ApiError(
            400, f"send the image as {wanted}, or an image/* or application/octet-stream body"
        )
    if not inputs:
        how = {
            "multipart/form-data": "as a file in the multipart field 'file' (curl -F file=@image.jpg)",
            "application/json": 'in the "images" list',
        }.get(content_type, "as the request body")
        raise errors.ApiError(400, f"no image: send it {how}")
    if len(inputs) > settings.max_images:
        raise errors.ApiError(413, f"{len(inputs)} images in one request; the limit is {settings.max_images}")
    for data in inputs:
        if len(data) > settings.max_bytes:
            raise errors.ApiError(413, f"an image is {len(data)} bytes; the limit is {settings.max_bytes}")
    request.state.images = len(inputs)
    return inputs, options


async def _read_form(request: Request, settings: Settings) -> tuple[list[bytes], dict[str, str]]:
    try:
        form = await request.form(max_files=settings.max_images, max_fields=64)
    except HTTPException as exc:
        if "Too many files" in str(exc.detail):
            raise errors.ApiError(413, f"more than {settings.max_images} images in one request") from None
        raise errors.ApiError(400, f"malformed multipart body: {exc.detail}") from None
    try:
        files = [item for item in form.getlist("file") if isinstance(item, UploadFile)]
        fields = {key: value for key, value in form.items() if isinstance(value, str)}
        return [await upload.read() for upload in files], fields
    finally:
        await form.close()


async def _read_image_body(request: Request, max_bytes: int) -> bytes:
    """A raw body is one image: refused (413) as soon as it is longer than one image may be, not
    after the whole request body limit has been read into memory."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise errors.ApiError(
            413, f"an image is {int(declared)} bytes; the limit is {max_bytes}", headers=errors.CLOSE
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            message = f"an image is over {max_bytes} bytes; the limit is {max_bytes}"
            raise errors.ApiError(413, message, headers=errors.CLOSE)
        chunks.append(chunk)
    return b"".join(chunks)


def _read_json(body: bytes, settings: Settings) -> tuple[list[bytes], dict[str, Any]]:
    # Each JSON value costs the parser far more than its bytes, and it holds the interpreter lock
    # (the event loop stops too): millions of tiny values froze the server for seconds. Values are
    # separated by commas, and base64 has none: a body of images and options has few.
    if body.count(b",") > MAX_JSON_COMMAS + 2 * settings.max_images:
        raise errors.ApiError(
            413, f"the JSON body holds more than {MAX_JSON_COMMAS} values besides its images"
        )
    try:
        payload = json.loads(body, parse_int=_short_int)
    except _LongNumber:
        raise errors.ApiError(422, f"a number in the JSON body has more than {MAX_DIGITS} digits") from None
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        raise errors.ApiError(400, "the body is not valid JSON") from None
    images = payload.get("images") if isinstance(payload, dict) else None
    if not isinstance(images, list) or not all(isinstance(item, str) for item in images):
        raise errors.ApiError(400, 'JSON body must be {"images": [base64 strings]}')
    if len(images) > settings.max_images:  # before decoding any of them
        raise errors.ApiError(413, f"{len(images)} images in one request; the limit is {settings.max_images}")
    inputs = [errors.decode_base64(item, index, settings.max_bytes) for index, item in enumerate(images)]
    return inputs, {key: value for key, value in payload.items() if key != "images"}


async def _run(
    request: Request, service: Service, settings: Settings, inputs: list[bytes], raw: dict
) -> list[Result]:
    """Run the service, answering for every way it can go wrong; stop work for clients that left."""
    if service.state != READY:
        raise errors.ApiError(503, service.not_ready, headers={"Retry-After": "5"})
    try:
        options = service.options(raw)
    except Exception as exc:  # a client's mistake (422) or the handler's (500)
        raise errors.from_service(exc) from None
    work = asyncio.ensure_future(service.run(inputs, options))
    gone = asyncio.ensure_future(_disconnected(request))
    gone.add_done_callback(lambda task: task.cancelled() or task.exception())  # nobody else reads it
    try:
        done, _ = await asyncio.wait(
            {work, gone}, timeout=settings.request_timeout, return_when="FIRST_COMPLETED"
        )
    except asyncio.CancelledError:  # this request was cancelled (Ray does it when its client leaves)
        work.cancel()  # its images leave the queue
        raise
    finally:
        gone.cancel()
    if work not in done:
        work.cancel()
        if gone in done:
            raise ClientDisconnect()
        raise errors.ApiError(504, f"no answer within {settings.request_timeout:g} s")
    failure = work.exception()  # not re-raised here: its traceback would hold this frame, and so `work`
    if failure is not None:
        raise errors.from_service(failure)
    return work.result()


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone; the body is already read, so only a disconnect arrives."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _version() -> str:
    try:
        return metadata.version("docker-vit")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _max_body(settings: Settings) -> int:
    """Room for every allowed image in base64 (4/3) plus multipart or JSON framing."""
    return settings.max_bytes * settings.max_images * 4 // 3 + 1_000_000


def _upload_doc(json: bool = False) -> dict[str, Any]:
    content: dict[str, Any] = {
        "multipart/form-data": {
            "schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}}
        },
        "image/*": {"schema": {"type": "string", "format": "binary"}},
    }
    if json:
        images = {"type": "array", "items": {"type": "string", "format": "byte"}}
        content["application/json"] = {"schema": {"type": "object", "properties": {"images": images}}}
    return {"requestBody": {"content": content, "required": True}, "parameters": OPTION_PARAMS}
