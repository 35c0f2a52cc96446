"""What wraps every request: its id, its body limits, its log line and its metrics.

A plain ASGI middleware (no BaseHTTPMiddleware) so that disconnects still reach the routes and the
request body streams through untouched, only counted and timed. `protocol.header_deadline` does the
same job one layer down, for the request headers, which uvicorn itself never times out.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Mapping
from typing import Any

from docker_vit.errors import CLIENT_GONE, CLOSE, ApiError
from docker_vit.http_errors import error_response
from docker_vit.metrics import Metrics

log = logging.getLogger("docker_vit.access")

_SAFE_ID = re.compile(r"[!-~]{1,128}")  # printable ASCII, no spaces: UUIDs, hex and base64 ids alike


def request_id_of(headers: Mapping[bytes, bytes]) -> str:
    """The client's `X-Request-ID` where it is a plain token, else a fresh one."""
    given = headers.get(b"x-request-id", b"").decode("latin-1")
    return given if _SAFE_ID.fullmatch(given) else uuid.uuid4().hex


class RequestContext:
    """Gives each request an id, enforces the body's size and arrival time, and reports its outcome."""

    def __init__(
        self,
        app: Any,
        *,
        metrics: Metrics,
        max_body: int,
        read_timeout: float,
        proxied: bool = False,
        max_body_at: Mapping[str, int] | None = None,
    ) -> None:
        self.app = app
        self.proxied = proxied  # Ray's proxy: it sets X-Request-ID, and cancels requests whose client left
        self.metrics = metrics
        self.max_body = max_body
        self.max_body_at = dict(max_body_at or {})  # paths whose bodies hold less (`POST /`: one image)
        self.read_timeout = read_timeout

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope = _origin_form(scope)
        started = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        request_id = request_id_of(headers)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        if not self.proxied:  # for the answer to an unhandled error, sent from outside this middleware
            state["echoed_id"] = request_id
        status, answered = 500, False
        declared = _declared_length(headers)
        max_body = self._max_body_of(scope)

        async def send_with_id(message: dict) -> None:
            nonlocal status, answered
            if message["type"] == "http.response.start":
                status, answered = message["status"], True
                given = list(message.get("headers", []))
                extra = [] if self.proxied else [(b"x-request-id", request_id.encode())]
                closing = any(name.lower() == b"connection" for name, _ in given)
                if declared > max_body and not closing:  # a body too large to read, on a route
                    extra.append((b"connection", b"close"))  # that never read it: no next request
                message["headers"] = [*given, *extra]
            await send(message)

        try:
            limited = self._limited(receive, started + self.read_timeout, declared, max_body)
            await self.app(scope, limited, send_with_id)
        except asyncio.CancelledError:
            # uvicorn cancels the requests still running when the shutdown timeout is up: they get a
            # JSON answer too (uvicorn's own would be a plain-text 500). Behind a proxy a cancelled
            # request is a client that left: nobody is there to answer.
            if self.proxied and not answered:
                status = CLIENT_GONE
            if answered or self.proxied:
                raise
            headers = {**CLOSE, "Retry-After": "1"}  # another replica, or this one restarted, may answer
            response = error_response(503, "the server is shutting down", headers=headers)
            await response(scope, receive, send_with_id)
        finally:
            self._report(scope, request_id, status, time.perf_counter() - started)

    def _max_body_of(self, scope: dict) -> int:
        """The body limit of the request's path, as routed (without a prefix: Ray's)."""
        path, prefix = scope.get("path", ""), scope.get("root_path", "")
        return self.max_body_at.get((path.removeprefix(prefix) if prefix else path) or "/", self.max_body)

    def _limited(self, receive: Any, deadline: float, declared: int, max_body: int) -> Any:
        """Count body bytes as they arrive and give up on a client whose body is not in by `deadline`
        (a total, not a per-chunk wait: a trickle of bytes does not keep a request alive forever).

        A body declared larger than the limit is refused when the route first reads it, unread: after
        routing and the API-key check, so a stranger gets 401 and the refusal counts for its route."""
        received = 0
        complete = False
        too_large = f"request body exceeds {max_body} bytes"  # as declared, or as it arrives

        async def wrapped() -> dict:
            nonlocal received, complete
            if complete:  # the body is in: later calls only wait for a disconnect
                return await receive()
            if declared > max_body:
                raise ApiError(413, too_large, headers=CLOSE)
            try:
                message = await asyncio.wait_for(receive(), deadline - time.perf_counter())
            except (TimeoutError, asyncio.TimeoutError):  # one class from 3.11, two on 3.10
                text = f"request body not received within {self.read_timeout:g} s"
                raise ApiError(408, text, headers=CLOSE) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received > max_body:
                    raise ApiError(413, too_large, headers=CLOSE)
            return message

        return wrapped

    def _report(self, scope: dict, request_id: str, status: int, seconds: float) -> None:
        # FastAPI's routes set "route"; Starlette's own (/docs, /openapi.json, /redoc) only "endpoint",
        # and their paths are fixed, so the label stays bounded. Anything else is a 404: "unmatched".
        route = getattr(scope.get("route"), "path", None)
        if route is None and "endpoint" in scope:  # the path as routed, without a prefix (Ray's)
            path, prefix = scope.get("path", ""), scope.get("root_path", "")
            route = path.removeprefix(prefix) if prefix else path
        route = route or "unmatched"
        images = scope.get("state", {}).get("images", 0)
        report(self.metrics, scope.get("method"), route, status, seconds, images, request_id)


def report(
    metrics: Metrics,
    method: str | None,
    route: str,
    status: int,
    seconds: float,
    images: int,
    request_id: str,
) -> None:
    """One request's metrics and its access-log line."""
    metrics.observe(route, status, seconds)
    fields = {
        "method": method,
        "route": route,
        "status": status,
        "duration_ms": round(seconds * 1000, 1),
        "images": images,
        "request_id": request_id,
    }
    # no method (bytes that were not HTTP) reads `-` in the text line, as in a web server's access log
    text = " ".join(f"{key}={'-' if value is None else value}" for key, value in fields.items())
    log.info(text, extra={"fields": fields})


def _declared_length(headers: dict[bytes, bytes]) -> int:
    try:
        return int(headers.get(b"content-length", b"0"))
    except ValueError:
        return 0


def _origin_form(scope: dict) -> dict:
    """A target in absolute form (`GET http://host/path`, as proxies send it, which RFC 9112 has a
    server accept) by its path: httptools parses it so, h11 leaves it whole, and no route matched.

    Leading slashes count as one (`POST //` is `POST /`), as the original's Flask (Werkzeug) routed
    them: a script's `curl -F file=@x "$URL/"` with a `URL` that ends in `/` got its caption there."""
    path, raw = scope.get("path", ""), scope.get("raw_path") or b""
    if raw[:8].lower().startswith((b"http://", b"https://")):
        path = path.split("//", 1)[1].partition("/")[2]  # the path is the raw one, unquoted
        raw = raw.split(b"//", 1)[1].partition(b"/")[2]
    elif not path.startswith("//"):
        return scope
    return {**scope, "path": "/" + path.lstrip("/"), "raw_path": b"/" + raw.lstrip(b"/")}
