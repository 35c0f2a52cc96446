"""uvicorn's HTTP protocol, bounded: request headers get a deadline and a size cap (431 past it).

uvicorn times out an idle keep-alive connection, but neither a fresh connection that never completes
its headers nor a slow trickle of header bytes (slowloris), and httptools sets no bound on their size.
This is the one layer below the ASGI app (`middleware.RequestContext`) where those can be held.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

import h11
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from docker_vit.errors import TYPES, error_body
from docker_vit.metrics import Metrics
from docker_vit.middleware import report, request_id_of

log = logging.getLogger("docker_vit.access")

MAX_HEADER_BYTES = 64 * 1024  # request line and headers; h11 allows 16 KiB, nginx 32 KiB
LINGER = 2.0  # seconds a connection answered below the app reads and drops what still comes
# httptools parses a request pipelined behind a running one as its bytes come (h11 waits, and
# bounds headers itself): those headers must be counted too.
PARSES_AHEAD = AutoHTTPProtocol.__name__ == "HttpToolsProtocol"
# h11 parses a chunked body in Python, ~8 us a chunk: one client's 1-byte chunks at ~1 MB/s held the
# event loop, and every other request with it. A chunked body of more chunks than this under
# SMALL_CHUNK bytes each is refused (400, closed); curl's and httpx's chunks are kilobytes.
MAX_SMALL_CHUNKS = 1024
SMALL_CHUNK = 512


def header_deadline(timeout: float, metrics: Metrics | None = None) -> type[HeaderDeadline]:
    """uvicorn's HTTP protocol, closing connections whose request headers are not complete `timeout`
    seconds after the connection opened, or after the first bytes of a keep-alive connection's next
    request, and answering 431 to request headers past MAX_HEADER_BYTES; `metrics` counts its
    answers (400 for unparseable requests, 431).

    uvicorn times out an idle keep-alive connection (`--idle-timeout`), but never a fresh connection
    or a slow trickle of header bytes (slowloris): without this, such sockets stay open forever. A
    pipelined request whose headers came in with an earlier one's is not timed again.
    """
    return type("HeaderDeadline", (HeaderDeadline,), {"timeout": timeout, "metrics": metrics})


class HeaderDeadline(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """See `header_deadline`; its subclass holds the settings."""

    timeout: float = 10.0
    metrics: Metrics | None = None
    _deadline: asyncio.TimerHandle | None = None
    _waiting_for: Any = None  # the cycle that was current when we started waiting for headers
    _ahead_of: Any = None  # the running cycle whose successor's headers are being counted
    _header_bytes = 0
    _h11_status = 400
    _refused = False
    _small_chunks: int | None = None  # h11: a chunked body's chunks under SMALL_CHUNK (None: not chunked)
    _chunk_bytes = 0  # the bytes of its chunk being read
    _in_message = False  # httptools: between a request's headers and its end (its body, its trailers)
    _body_bytes = 0  # httptools: body bytes parsed on this connection
    _not_body = 0  # httptools: bytes of a message since the last read that held any of its body

    def data_received(self, data: bytes) -> None:
        """httptools sets no bound on header size: cap the bytes sent while headers are incomplete,
        and the size of headers that arrived whole in one chunk. That holds as well for the headers
        of a request pipelined behind a running one (bytes after its body), which httptools reads
        on until they are complete."""
        if self._refused:  # answered below the app: what still comes is read and dropped
            return
        current = self.cycle
        waiting = current is self._waiting_for
        # The rest of a body answered early (a 404 before its upload was read) is not headers.
        leftover = waiting and getattr(current, "more_body", False)
        ahead = PARSES_AHEAD and not waiting and not getattr(current, "more_body", True)
        if ahead and self._ahead_of is not current:
            self._ahead_of, self._header_bytes = current, 0
        if waiting and self._deadline is None:  # the next request starts on a kept-alive connection
            self._arm()
        in_body, body_before = PARSES_AHEAD and self._in_message, self._body_bytes
        super().data_received(data)
        if self.transport.is_closing() or self._refused:
            return
        if (waiting or ahead) and not in_body:
            self._measure(current, 0 if leftover else len(data))
        elif in_body and self._in_message:
            self._between_chunks(len(data), self._body_bytes > body_before)

    def _between_chunks(self, received: int, with_body: bool) -> None:
        """httptools keeps a chunked body's trailer fields (header lines after its last chunk) as
        headers, uncounted, and builds a long one by joining its pieces, a copy per read: one client
        held the event loop for seconds and the heap grew by gigabytes within the read timeout. Reads
        of a message that bring none of its body are bounded as headers are (h11 refuses past 16 KiB);
        a read with body bytes starts the count again, so chunk lines between chunks never add up."""
        self._not_body = 0 if with_body else self._not_body + received
        if self._not_body <= MAX_HEADER_BYTES:
            return
        log.debug("closing a connection that sent over %d bytes between chunks", MAX_HEADER_BYTES)
        if not self._closed_if_answered():
            self._refuse(400)

    def _closed_if_answered(self) -> bool:
        """A request answered early (before its body was in) gets no second answer on its
        connection when the rest of its body is refused, only the connection's end."""
        if self.cycle is None or not self.cycle.response_complete:
            return False
        self._refused = True
        self.transport.close()
        return True

    def on_headers_complete(self) -> None:
        """httptools: a request's body (and trailers) follow."""
        super().on_headers_complete()
        self._in_message, self._not_body = True, 0

    def on_body(self, body: bytes) -> None:
        """httptools: counted before uvicorn drops the rest of a body answered early."""
        self._body_bytes += len(body)
        super().on_body(body)

    def _measure(self, before: Any, received: int) -> None:
        """Bytes received while headers are still incomplete (the cycle is still `before`) count;
        headers completed in a chunk are measured whole as uvicorn picks their app (`app`)."""
        if self.cycle is before:
            self._header_bytes += received
            if self._header_bytes > MAX_HEADER_BYTES:
                self._too_big()

    def _too_big(self) -> None:
        """Headers still incomplete past the cap: answered 431 and never read further; behind a
        request still running on this connection (httptools reads ahead), only closed, as an
        answer now would pass for that request's."""
        log.debug("closing a connection that sent over %d bytes of headers", MAX_HEADER_BYTES)
        if self.cycle is None or self.cycle.response_complete:
            self._refuse(431)
        else:
            self.transport.close()

    @property
    def app(self) -> Any:
        """The app for the request whose headers uvicorn has just parsed (it reads this once for
        each, pipelined ones included): one whose headers are over the cap is answered 431."""
        if _head_size(self.scope or {}) > MAX_HEADER_BYTES:
            return self._headers_too_large
        return self._app

    @app.setter
    def app(self, app: Any) -> None:
        self._app = app

    async def _headers_too_large(self, scope: dict, receive: Any, send: Any) -> None:
        """A 431 in uvicorn's own response cycle, so that a pipelined one waits for its turn."""
        request_id = request_id_of(dict(scope.get("headers") or []))  # the head was parsed: the id is known
        head, body = _refusal(431, request_id)
        await send({"type": "http.response.start", "status": 431, "headers": head})
        await send({"type": "http.response.body", "body": body})
        self._count(scope.get("method"), 431, request_id)

    def on_message_complete(self) -> None:
        """httptools' end of a request: uvicorn leaves `more_body` set on a request answered before
        its body was read, so the end of that body (Content-Length or chunked) is marked here:
        what follows is the next request's headers, and counted."""
        self._in_message = False
        if self.cycle is not None and self.cycle.response_complete:
            self.cycle.more_body = False
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes it cannot parse as HTTP, in every other error's JSON shape, with
        a request id, a log line and a count like every other answer. A parser that gave up on a
        head past the cap (h11's buffer, httptools' URL) gets the cap's own status."""
        self._refuse(431 if self._head_overflowed() else 400)

    def _head_overflowed(self) -> bool:
        if getattr(self, "conn", None) is not None:  # h11, which said why (`_h11_event`)
            return self._h11_status == 431
        # httptools' URL parser gives up before the scope has the path: the URL as received counts
        return len(getattr(self, "url", b"")) + _rest_of_head(getattr(self, "headers", [])) > MAX_HEADER_BYTES

    def _h11_event(self) -> Any:
        """h11's next event; when it gives up on a request's head, what it hints the status should
        be (431 past its limit), which uvicorn does not pass on to `send_400_response`. Its hint for
        a body's line (a chunk size past the limit) is not about headers: that stays a 400."""
        reading_head = self.conn.their_state is h11.IDLE
        try:
            event = self._h11_next_event()
        except h11.RemoteProtocolError as exc:  # answered by uvicorn
            self._h11_status = exc.error_status_hint if reading_head else 400
            raise
        if isinstance(event, h11.Request):
            names = {name for name, _ in event.headers}  # h11 gives them in lower case
            if {b"transfer-encoding", b"content-length"} <= names:
                # Two framings (RFC 9112 6.3: a smuggling attempt, and the connection must close): h11
                # reads the chunks and keeps the connection, so a proxy that went by the length passes
                # the rest on as another request. httptools refuses it: alike here.
                self._h11_status = 400
                raise h11.RemoteProtocolError("both Transfer-Encoding and Content-Length", 400)
            chunked = any(
                name == b"transfer-encoding" and b"chunked" in value.lower() for name, value in event.headers
            )
            self._small_chunks = 0 if chunked else None
        elif isinstance(event, h11.Data) and self._small_chunks is not None:
            return self._counted(event)
        return event

    def _counted(self, data: Any) -> Any:
        """A piece of a chunked body (h11 gives a chunk that arrives over several reads in as many
        pieces): refused once too many of its chunks were small."""
        self._chunk_bytes = len(data.data) + (0 if data.chunk_start else self._chunk_bytes)
        if data.chunk_end and self._chunk_bytes < SMALL_CHUNK:
            self._small_chunks += 1
            if self._small_chunks > MAX_SMALL_CHUNKS:
                if self._closed_if_answered():
                    return h11.NEED_DATA
                self._h11_status = 400
                raise h11.RemoteProtocolError("a chunked body in too many small chunks", 400)
        return data

    def _refuse(self, status: int) -> None:
        """Answer below the app, then close once the client has had the answer: a socket closed
        with input unread is reset, and the reset can overtake the answer the client has not read
        yet (a lingering close, as nginx's). Its rest is read and dropped for LINGER seconds at most,
        or until the client closes its side. Once a running request's answer has begun, another
        cannot be put in its stream: the connection only closes; before that, the running request
        is given up (its app reads a disconnect and writes nothing)."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if cycle.response_started:
                self.transport.close()
                return
            cycle.disconnected = True  # uvicorn drops what its app still sends (no write after EOF)
            cycle.message_event.set()  # an app waiting for its body hears it at once
        request_id = uuid.uuid4().hex
        head, body = _refusal(status, request_id)
        lines = [f"HTTP/1.1 {status} {_REASONS[status]}"] + [f"{k.decode()}: {v.decode()}" for k, v in head]
        self.transport.write("\r\n".join(lines).encode() + b"\r\n\r\n" + body)
        self._count(None, status, request_id)
        self._refused = True
        self._disarm()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._deadline = self.loop.call_later(LINGER, self.transport.close)

    def _count(self, method: str | None, status: int, request_id: str) -> None:
        if self.metrics is not None:
            report(self.metrics, method, "unmatched", status, 0.0, 0, request_id)

    def connection_made(self, transport: Any) -> None:
        conn = getattr(self, "conn", None)
        if conn is not None:  # h11's parser, one per connection
            self._h11_next_event, conn.next_event = conn.next_event, self._h11_event
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
        if self._refused:  # lingering (h11 refuses inside on_response_complete): its close stays set
            return
        self._disarm()
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a pipelined request's headers are in: it runs, or waits for its turn
        self._waiting_for, self._header_bytes = self.cycle, 0

    def _arm(self) -> None:
        self._deadline = self.loop.call_later(self.timeout, self._drop_if_waiting, self.cycle)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _drop_if_waiting(self, cycle: Any) -> None:
        """No new request started since the timer was set (`cycle` unchanged): give up on it."""
        if self.cycle is cycle and not self.transport.is_closing():
            log.debug("closing a connection whose request headers took over %g s", self.timeout)
            self.transport.close()


_REASONS = {400: "Bad Request", 431: "Request Header Fields Too Large"}
_MESSAGES = {400: "malformed HTTP request", 431: f"request line and headers over {MAX_HEADER_BYTES} bytes"}


def _refusal(status: int, request_id: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Headers and body of an answer given below the app: JSON, a request id, the connection closed."""
    body = json.dumps(error_body(TYPES[status], _MESSAGES[status]), separators=(",", ":")).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return head + [(b"x-request-id", request_id.encode()), (b"connection", b"close")], body


def _head_size(scope: dict) -> int:
    """Bytes of a parsed request line and headers, as sent: exact for `Name: value` headers and an
    origin-form target (the parser keeps neither the spaces around a value nor a bare `?`)."""
    query = scope.get("query_string", b"")
    target = len(scope.get("raw_path") or b"") + (len(query) + 1 if query else 0)  # and its `?`
    return len(scope.get("method", "")) + target + _rest_of_head(scope.get("headers", []))


def _rest_of_head(headers: list[tuple[bytes, bytes]]) -> int:
    """A head's bytes besides its method and target: the request line's version, spaces and end, each
    header line, and the blank line that ends them."""
    return 14 + sum(len(name) + len(value) + 4 for name, value in headers)
