"""What wraps every request: its id, its body limits, its log line and its metrics.

A plain ASGI middleware (no BaseHTTPMiddleware) so that disconnects still reach the routes and the
request body streams through untouched, only counted and timed. `header_deadline` does the same job one
layer down, for the request headers, which uvicorn itself never times out.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from typing import Any

from docker_vit.errors import CLIENT_GONE, CLOSE, TYPES, ApiError, error_body, error_response
from docker_vit.metrics import Metrics

log = logging.getLogger("docker_vit.access")

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
MAX_HEADER_BYTES = 64 * 1024  # request line and headers; h11 allows 16 KiB, nginx 32 KiB


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
    ) -> None:
        self.app = app
        self.proxied = proxied  # Ray's proxy: it sets X-Request-ID, and cancels requests whose client left
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
        if not self.proxied:  # for the answer to an unhandled error, sent from outside this middleware
            state["echoed_id"] = request_id
        status, answered = 500, False
        declared = _declared_length(headers)

        async def send_with_id(message: dict) -> None:
            nonlocal status, answered
            if message["type"] == "http.response.start":
                status, answered = message["status"], True
                given = list(message.get("headers", []))
                extra = [] if self.proxied else [(b"x-request-id", request_id.encode())]
                closing = any(name.lower() == b"connection" for name, _ in given)
                if declared > self.max_body and not closing:  # a body too large to read, on a route
                    extra.append((b"connection", b"close"))  # that never read it: no next request
                message["headers"] = [*given, *extra]
            await send(message)

        try:
            limited = self._limited(receive, started + self.read_timeout, declared)
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

    def _limited(self, receive: Any, deadline: float, declared: int) -> Any:
        """Count body bytes as they arrive and give up on a client whose body is not in by `deadline`
        (a total, not a per-chunk wait: a trickle of bytes does not keep a request alive forever).

        A body declared larger than the limit is refused when the route first reads it, unread: after
        routing and the API-key check, so a stranger gets 401 and the refusal counts for its route."""
        received = 0
        complete = False
        too_large = f"request body exceeds {self.max_body} bytes"  # as declared, or as it arrives

        async def wrapped() -> dict:
            nonlocal received, complete
            if complete:  # the body is in: later calls only wait for a disconnect
                return await receive()
            if declared > self.max_body:
                raise ApiError(413, too_large, headers=CLOSE)
            try:
                message = await asyncio.wait_for(receive(), deadline - time.perf_counter())
            except (TimeoutError, asyncio.TimeoutError):  # one class from 3.11, two on 3.10
                text = f"request body not received within {self.read_timeout:g} s"
                raise ApiError(408, text, headers=CLOSE) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received > self.max_body:
                    raise ApiError(413, too_large, headers=CLOSE)
            return message

        return wrapped

    def _report(self, scope: dict, request_id: str, status: int, seconds: float) -> None:
        route = getattr(scope.get("route"), "path", None) or "unmatched"
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
    log.info(" ".join(f"{k}={v}" for k, v in fields.items()), extra={"fields": fields})


def _declared_length(headers: dict[bytes, bytes]) -> int:
    try:
        return int(headers.get(b"content-length", b"0"))
    except ValueError:
        return 0


def header_deadline(timeout: float, metrics: Metrics | None = None) -> type:
    """uvicorn's HTTP protocol, closing connections whose request headers are not complete `timeout`
    seconds after the connection opened, or after the first bytes of a keep-alive connection's next
    request, or that run past MAX_HEADER_BYTES.

    uvicorn times out an idle keep-alive connection (`--idle-timeout`), but never a fresh connection
    or a slow trickle of header bytes (slowloris): without this, such sockets stay open forever. A
    pipelined request whose headers came in with an earlier one's is not timed again.
    """
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    # httptools parses a request pipelined behind a running one as its bytes come (h11 waits, and
    # bounds headers itself): those headers must be counted too.
    parses_ahead = AutoHTTPProtocol.__name__ == "HttpToolsProtocol"

    class HeaderDeadline(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        _deadline: asyncio.TimerHandle | None = None
        _waiting_for: Any = None  # the cycle that was current when we started waiting for headers
        _ahead_of: Any = None  # the running cycle whose successor's headers are being counted
        _header_bytes = 0

        def data_received(self, data: bytes) -> None:
            """httptools sets no bound on header size: cap the bytes sent while headers are incomplete,
            and the size of headers that arrived whole in one chunk. That holds as well for the headers
            of a request pipelined behind a running one (bytes after its body), which httptools reads
            on until they are complete."""
            current = self.cycle
            waiting = current is self._waiting_for
            # The rest of a body answered early (a 404 before its upload was read) is not headers.
            leftover = waiting and getattr(current, "more_body", False)
            ahead = parses_ahead and not waiting and not getattr(current, "more_body", True)
            if ahead and self._ahead_of is not current:
                self._ahead_of, self._header_bytes = current, 0
            if waiting and self._deadline is None:  # the next request starts on a kept-alive connection
                self._arm()
            super().data_received(data)
            if not (waiting or ahead) or self.transport.is_closing():
                return
            if self.cycle is current:  # still incomplete
                self._header_bytes += 0 if leftover else len(data)
                if self._header_bytes > MAX_HEADER_BYTES:
                    self._too_big()
            elif _head_size(self.cycle.scope) > MAX_HEADER_BYTES:  # completed in this chunk: measure
                self._too_big(self.cycle)  # (h11 bounds only headers still incomplete)

        def on_headers_complete(self) -> None:
            """httptools' end of each request's headers: measured here too, as several requests read
            at once (pipelined) would otherwise have only the last one's headers measured."""
            super().on_headers_complete()
            cycle = self.cycle
            if cycle is not None and cycle.scope is self.scope and _head_size(self.scope) > MAX_HEADER_BYTES:
                self._too_big(cycle)

        def _too_big(self, cycle: Any = None) -> None:
            """Close the connection; `cycle`, a request whose headers were too big, must not run: it
            reads a disconnect, not the body."""
            if cycle is not None:
                cycle.disconnected = True
            log.debug("closing a connection that sent over %d bytes of headers", MAX_HEADER_BYTES)
            self.transport.close()

        def on_message_complete(self) -> None:
            """httptools' end of a request: uvicorn leaves `more_body` set on a request answered before
            its body was read, so the end of that body (Content-Length or chunked) is marked here:
            what follows is the next request's headers, and counted."""
            if self.cycle is not None and self.cycle.response_complete:
                self.cycle.more_body = False
            super().on_message_complete()

        def send_400_response(self, msg: str) -> None:
            """uvicorn's answer to bytes it cannot parse as HTTP, in every other error's JSON shape,
            with a request id, a log line and a count like every other answer."""
            request_id = uuid.uuid4().hex
            body = json.dumps(error_body(TYPES[400], "malformed HTTP request"))
            head = "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
            head += f"content-length: {len(body)}\r\nx-request-id: {request_id}\r\nconnection: close\r\n\r\n"
            self.transport.write((head + body).encode())
            self.transport.close()
            if metrics is not None:
                report(metrics, None, "unmatched", 400, 0.0, 0, request_id)

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._expect_headers()
            self._arm()

        def on_response_complete(self) -> None:
            """Idle time until the next request is uvicorn's keep-alive timeout; its headers are timed
            from its first bytes on."""
            super().on_response_complete()
            self._expect_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _expect_headers(self) -> None:
            self._disarm()
            if self.cycle is not None and not self.cycle.response_complete:
                return  # a pipelined request's headers are in: it runs, or waits for its turn
            self._waiting_for, self._header_bytes = self.cycle, 0

        def _arm(self) -> None:
            self._deadline = self.loop.call_later(timeout, self._drop_if_waiting, self.cycle)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _drop_if_waiting(self, cycle: Any) -> None:
            """No new request started since the timer was set (`cycle` unchanged): give up on it."""
            if self.cycle is cycle and not self.transport.is_closing():
                log.debug("closing a connection whose request headers took over %g s", timeout)
                self.transport.close()

    return HeaderDeadline


def _head_size(scope: dict) -> int:
    """Bytes of a parsed request line and headers, as sent (give or take the spaces)."""
    line = (
        len(scope.get("method", "")) + len(scope.get("raw_path") or b"") + len(scope.get("query_string", b""))
    )
    return line + 12 + sum(len(name) + len(value) + 4 for name, value in scope.get("headers", []))
