"""What wraps every request: its id, its body limits, its log line and its metrics.

A plain ASGI middleware (no BaseHTTPMiddleware) so that disconnects still reach the routes and the
request body streams through untouched, only counted and timed.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from typing import Any

from docker_vit.errors import ApiError, error_response
from docker_vit.metrics import Metrics

log = logging.getLogger("docker_vit.access")

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestContext:
    """Gives each request an id, enforces the body's size and arrival time, and reports its outcome."""

    def __init__(self, app: Any, *, metrics: Metrics, max_body: int, read_timeout: float) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body
        self.read_timeout = read_timeout

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _SAFE_ID.match(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        status = 500

        async def send_with_id(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            if _declared_length(headers) > self.max_body:
                response = error_response(413, f"request body exceeds {self.max_body} bytes")
                await response(scope, receive, send_with_id)
            else:
                await self.app(scope, self._limited(receive), send_with_id)
        finally:
            self._report(scope, request_id, status, time.perf_counter() - started)

    def _limited(self, receive: Any) -> Any:
        """Count body bytes as they arrive and give up on a client that stops sending."""
        received = 0
        complete = False

        async def wrapped() -> dict:
            nonlocal received, complete
            if complete:  # the body is in: later calls only wait for a disconnect
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout)
            except asyncio.TimeoutError:
                raise ApiError(408, f"request body not received within {self.read_timeout:g} s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received > self.max_body:
                    raise ApiError(413, f"request body exceeds {self.max_body} bytes")
            return message

        return wrapped

    def _report(self, scope: dict, request_id: str, status: int, seconds: float) -> None:
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        self.metrics.observe(route, status, seconds)
        images = scope.get("state", {}).get("images", 0)
        fields = {
            "method": scope.get("method"),
            "route": route,
            "status": status,
            "duration_ms": round(seconds * 1000, 1),
            "images": images,
            "request_id": request_id,
        }
        log.info(" ".join(f"{k}={v}" for k, v in fields.items()), extra={"fields": fields})


def _declared_length(headers: dict[bytes, bytes]) -> int:
    try:
        return int(headers.get(b"content-length", b"0"))
    except ValueError:
        return 0
