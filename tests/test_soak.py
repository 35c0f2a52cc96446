"""A real `docker-vit serve` process under hostile connections: vanishing clients, stalled uploads,
idle sockets and slowloris headers. Meanwhile a normal client must still be answered (not hung: no
timing target beyond a generous bound). Loopback only, bounded in count and time.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import free_port, ready

from docker_vit.process import cpu_threads
from docker_vit.protocol import LINGER, MAX_HEADER_BYTES

TESTS = Path(__file__).parent
READ_TIMEOUT, IDLE_TIMEOUT = 1.0, 1.0
PROMPT = 10.0  # "promptly": generous, only proves nothing hangs


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    yield from serving(READ_TIMEOUT, IDLE_TIMEOUT)


@pytest.fixture(scope="module", params=["httptools", "h11"])
def each_parser(request: pytest.FixtureRequest) -> Iterator[str]:
    """The server under each of uvicorn's HTTP parsers: httptools where installed (uvicorn[standard]),
    h11 otherwise (a plain install, the container), which read pipelined and early-answered requests
    differently."""
    if request.param == "httptools":
        pytest.importorskip("httptools")
    yield from serving(READ_TIMEOUT, IDLE_TIMEOUT, parser=request.param)


# `python -m docker_vit.cli` as it runs where httptools is not installed
WITHOUT_HTTPTOOLS = (
    "import sys; sys.modules['httptools'] = None; from docker_vit.cli import main; sys.exit(main())"
)


def serving(
    read_timeout: float, idle_timeout: float, parser: str = "", log: Path | None = None
) -> Iterator[str]:
    port = free_port()
    launch = ["-c", WITHOUT_HTTPTOOLS] if parser == "h11" else ["-m", "docker_vit.cli"]
    command = [sys.executable, *launch, "serve", "--handler", "fake_handlers:Echo"]
    command += ["--port", str(port), "--read-timeout", str(read_timeout), "--idle-timeout", str(idle_timeout)]
    command += ["--max-batch-size", "1", "--max-wait-ms", "0", "--log-level", "warning"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    stderr = log.open("wb") if log else subprocess.PIPE
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log.read_text() if log else process.stderr.read().decode()
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server never became ready"
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
        (stderr if log else process.stderr).close()


def answered_promptly(url: str, text: str = "still here") -> None:
    response = httpx.post(
        f"{url}/", content=text.encode(), headers={"content-type": "image/x"}, timeout=PROMPT
    )
    assert response.status_code == 200 and response.text == text


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=PROMPT)
    return sock


def upload_head(length: int, path: str = "/") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        f"Content-Length: {length}\r\n\r\n--b\r\nContent-Disposition: form-data; name=file; filename=a\r\n\r\n"
    ).encode()


def closed_by_server(sock: socket.socket, within: float) -> bytes:
    """Everything the server sent until it closed the connection; fails if it is still open `within`."""
    sock.settimeout(within)
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def flooded(sock: socket.socket, limit: int, running: bool = False) -> int:
    """Header lines sent without end, until the server refuses them (a 4xx, then it hangs up; a
    reset counts) or `limit` bytes are out; the bytes sent, or `limit` when the connection was still
    open after them. `running`: a request ahead of the flood may still be answered (a 200 of its own)."""
    flood, sent, answered = b"X-Junk: " + b"a" * 1000 + b"\r\n", 0, b""
    try:
        while sent < limit and b"HTTP/1.1 4" not in answered:
            sock.sendall(flood)
            sent += len(flood)
            if select.select([sock], [], [], 0)[0]:
                answered += sock.recv(65536)
        assert running or not answered.startswith(b"HTTP/1.1 2"), answered[:100]
        sock.settimeout(PROMPT)
        while chunk := sock.recv(65536):  # an answer (a 431) may come first; then the close
            assert running or not chunk.startswith(b"HTTP/1.1 2"), chunk[:100]
    except OSError:  # reset, broken pipe: the server hung up
        return sent
    return sent


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=PROMPT).text
    found = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_vanishing_clients_cost_nothing(server: str) -> None:
    for _ in range(30):
        sock = connect(server)
        sock.sendall(upload_head(100_000) + b"\xff\xd8" * 500)  # half an upload, then gone
        sock.close()
    answered_promptly(server)  # asserts a 200 within PROMPT seconds


def test_a_stalled_upload_gets_408_and_the_connection_closes(server: str) -> None:
    stalled = [connect(server) for _ in range(5)]
    for sock in stalled:
        sock.sendall(upload_head(100_000) + b"\xff\xd8" * 100)
    answered_promptly(server)
    for sock in stalled:
        reply = closed_by_server(sock, READ_TIMEOUT + PROMPT)
        sock.close()
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert b"request_timeout" in reply


def test_idle_and_slowloris_connections_are_closed_and_others_served(server: str) -> None:
    idle = [connect(server) for _ in range(100)]
    slow = connect(server)
    slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    answered_promptly(server)
    started = time.monotonic()
    slow.settimeout(0.2)
    closed = False
    while time.monotonic() - started < READ_TIMEOUT + PROMPT:  # one header byte at a time
        try:
            slow.sendall(b"X")
            if slow.recv(1) == b"":
                closed = True
                break
        except TimeoutError:
            continue
        except OSError:  # reset by the server: closed as well
            closed = True
            break
    slow.close()
    assert closed, "a slowloris connection stayed open"
    for sock in idle:
        assert closed_by_server(sock, READ_TIMEOUT + PROMPT) == b""
        sock.close()
    answered_promptly(server)


def test_idle_keep_alive_connections_close_after_idle_timeout(server: str) -> None:
    sock = connect(server)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    reply = closed_by_server(sock, IDLE_TIMEOUT + PROMPT)
    sock.close()
    assert reply.startswith(b"HTTP/1.1 200") and b'{"status":"ok"}' in reply


def test_pipelined_requests_are_not_timed_as_headers_again(each_parser: str) -> None:
    """Two requests sent at once, each slower than the header timeout, the second with a body larger
    than any header limit: both are answered in turn on the one connection."""
    body = b"a" * 100_000
    first = b"POST /?delay=1.5 HTTP/1.1\r\nHost: x\r\nContent-Type: image/x\r\nContent-Length: 5\r\n\r\nfirst"
    second = b"POST /?delay=1.5 HTTP/1.1\r\nHost: x\r\nContent-Type: image/x\r\n"
    second += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body
    sock = connect(each_parser)
    sock.sendall(first + second)
    reply = closed_by_server(sock, 3 * PROMPT)
    sock.close()
    assert reply.count(b"HTTP/1.1 200") == 2, reply[:300]
    assert b"\r\n\r\nfirst" in reply and reply.endswith(body)


def test_an_idle_timeout_longer_than_the_read_timeout_holds() -> None:
    for url in serving(read_timeout=1.0, idle_timeout=4.0):
        sock = connect(url)
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        sock.sendall(request)
        assert one_reply(sock).startswith(b"HTTP/1.1 200")
        time.sleep(2.5)  # idle past the read timeout, within the idle timeout
        sock.sendall(request)
        assert one_reply(sock).startswith(b"HTTP/1.1 200"), "the kept-alive connection was closed"
        sock.close()


def one_reply(sock: socket.socket) -> bytes:
    """One whole response (head and Content-Length bytes of body) from a kept-alive connection."""
    received = b""
    while b"\r\n\r\n" not in received and (chunk := sock.recv(65536)):
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: (\d+)", head, re.IGNORECASE).group(1))
    while len(body) < length and (chunk := sock.recv(65536)):
        body += chunk
    return head + b"\r\n\r\n" + body


def test_queued_work_of_clients_that_left_never_reaches_the_model(server: str) -> None:
    """While one request keeps the model busy, five more queue up and hang up: the model skips them."""
    gone = 'docker_vit_requests_total{route="/",status="499"}'
    ran_before, gone_before = metric(server, "docker_vit_batch_size_sum"), metric(server, gone)
    busy = connect(server)
    busy.sendall(
        b"POST /?delay=4 HTTP/1.1\r\nHost: x\r\nContent-Type: image/x\r\nContent-Length: 4\r\n\r\nbusy"
    )
    deadline = time.monotonic() + 3 * PROMPT  # a generous bound for a busy machine, not a target
    while metric(server, "docker_vit_batch_size_sum") == ran_before:  # "busy" is in the model
        assert time.monotonic() < deadline
        time.sleep(0.02)
    leaving = [connect(server) for _ in range(5)]
    for sock in leaving:
        sock.sendall(
            b"POST /?delay=4 HTTP/1.1\r\nHost: x\r\nContent-Type: image/x\r\nContent-Length: 4\r\n\r\ngone"
        )
    while metric(server, "docker_vit_queue_depth") < 5:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    for sock in leaving:
        sock.close()
    assert closed_by_server(busy, IDLE_TIMEOUT + PROMPT).endswith(b"busy")
    busy.close()
    answered_promptly(server, "after")
    assert metric(server, "docker_vit_batch_size_sum") == ran_before + 2  # "busy" and "after", no "gone"
    assert metric(server, gone) == gone_before + 5  # logged and counted as 499, not as server errors


def _answer(sock: socket.socket) -> bytes:
    """One HTTP answer read off a raw socket: its status line and body (by Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head.split(b"\r\n")[0] + b" " + body


@pytest.mark.parametrize(("path", "chunked"), [("/nope", False), ("/healthz", False), ("/nope", True)])
def test_an_early_answer_keeps_the_connection_for_the_next_request(
    each_parser: str, path: str, chunked: bool
) -> None:
    """A 404 or 405 answered before its 2 MB body was read: the rest of that body, arriving after the
    answer, is not the next request's headers, so the next request on the connection is answered."""
    body = b"x" * 2_000_000
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(body)}"
    if chunked:
        parts = [body[i : i + 8192] for i in range(0, len(body), 8192)]
        body = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts)
        body += b"0\r\n\r\n"
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: image/x\r\n{framing}\r\n\r\n"
    with connect(each_parser) as sock:
        sock.sendall(head.encode())
        first = _answer(sock)  # answered from the headers alone
        assert first.startswith((b"HTTP/1.1 404", b"HTTP/1.1 405")), first
        sock.sendall(body)  # the rest of the first request, after its answer
        for _ in range(2):
            sock.sendall(
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: image/x\r\nContent-Length: 4\r\n\r\nnext"
            )
            assert _answer(sock) == b"HTTP/1.1 200 OK next"


def test_an_upload_pipelined_behind_a_running_request_is_answered(each_parser: str) -> None:
    """Its headers and body arrive while the first request runs: none of it is counted as headers
    (h11 parses the next request only once the first is done: counting it cut the connection)."""
    body = b"b" * 100_000
    with connect(each_parser) as sock:
        sock.sendall(
            b"POST /?delay=1.5 HTTP/1.1\r\nHost: x\r\nContent-Type: image/x\r\nContent-Length: 5\r\n\r\nfirst"
        )
        time.sleep(0.3)
        second = f"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: image/x\r\nContent-Length: {len(body)}\r\n\r\n"
        sock.sendall(second.encode() + body)
        time.sleep(0.1)
        third = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: image/x\r\nContent-Length: 5\r\n"
        sock.sendall(third + b"Connection: close\r\n\r\nthird")
        replies = closed_by_server(sock, 3 * PROMPT)
    assert replies.count(b"HTTP/1.1 200") == 3 and replies.endswith(b"third")
    assert replies.index(b"\r\n\r\nfirst") < replies.index(body) < replies.index(b"\r\n\r\nthird")


def test_endless_headers_after_an_early_answer_are_cut_off(each_parser: str) -> None:
    """The unread body of a request answered early is not headers, but only up to its end: httptools
    never marked such a body finished, so everything after it went uncounted."""
    with connect(each_parser) as sock:
        sock.sendall(b"POST /nope HTTP/1.1\r\nHost: x\r\nContent-Type: image/x\r\nContent-Length: 5\r\n\r\n")
        assert _answer(sock).startswith(b"HTTP/1.1 404")
        sock.sendall(b"abcdeGET /healthz HTTP/1.1\r\nHost: x\r\n")
        assert flooded(sock, 4_000_000) < 4_000_000
    answered_promptly(each_parser)


def test_endless_headers_are_cut_off(each_parser: str) -> None:
    """httptools bounds neither header size nor count: a flood of header bytes closes the connection."""
    with connect(each_parser) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        assert flooded(sock, 8_000_000) < 8_000_000
    answered_promptly(each_parser)


def test_endless_headers_behind_a_running_request_are_cut_off(
    each_parser: str, request: pytest.FixtureRequest
) -> None:
    """The next request's headers, pipelined behind one the model is running, are bounded too:
    httptools kept every header line in memory until the first request ended (gigabytes, an audit).
    h11 stops reading meanwhile (the kernel's buffers take the flood) and refuses it after."""
    with connect(each_parser) as sock:
        sock.sendall(
            b"POST /?delay=3 HTTP/1.1\r\nHost: x\r\nContent-Type: image/x\r\nContent-Length: 1\r\n\r\na"
        )
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        sent = flooded(sock, 4_000_000, running=True)  # h11 may answer the POST once the flood is in
    if request.node.callspec.params["each_parser"] == "httptools":
        assert sent < 4_000_000  # cut while the first request runs
    answered_promptly(each_parser)


@pytest.mark.parametrize("long_line", [False, True])
def test_endless_trailers_are_cut_off(each_parser: str, long_line: bool) -> None:
    """Header lines after a chunked body's last chunk (trailer fields): httptools kept them all,
    uncounted, and joined one long line's pieces a copy per read, so one client held the event loop
    for seconds and the heap grew by gigabytes within the read timeout (an audit). They are refused
    as headers are (h11 refuses them itself)."""
    head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: image/x\r\nTransfer-Encoding: chunked\r\n\r\n"
    limit = 4_000_000
    with connect(each_parser) as sock:
        sock.sendall(head + b"1\r\nA\r\n0\r\n")
        if long_line:
            sock.sendall(b"X-Trailer: ")
            sent, answered = 0, b""
            try:
                while sent < limit and not answered:
                    sock.sendall(b"a" * 65536)
                    sent += 65536
                    if select.select([sock], [], [], 0)[0]:
                        answered = sock.recv(65536)
                answered += closed_by_server(sock, PROMPT)
            except OSError:  # reset, broken pipe: the server hung up
                pass
        else:
            sent, answered = flooded(sock, limit), b""
    assert sent < limit
    assert not answered or answered.startswith(b"HTTP/1.1 400"), answered[:200]
    answered_promptly(each_parser)


def test_a_chunked_body_of_tiny_chunks_is_refused_not_parsed_chunk_by_chunk(
    each_parser: str, request: pytest.FixtureRequest
) -> None:
    """h11 parses each chunk in Python: one client's 1-byte chunks at ~1 MB/s held the event loop, and
    every other request with it. Under h11 such a body is a 400 after 1,024 small chunks; chunks of
    a kilobyte, as clients send them, are read, and so is one chunk that arrives in many small reads
    (httptools parses in C, and reads them all)."""
    h11 = request.node.callspec.params["each_parser"] == "h11"
    head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: image/x\r\nTransfer-Encoding: chunked\r\n\r\n"
    with connect(each_parser) as sock:
        sock.sendall(head + b"1\r\nA\r\n" * 3000 + b"0\r\n\r\n")
        answer = closed_by_server(sock, PROMPT) if h11 else _answer(sock)
    if h11:
        assert answer.startswith(b"HTTP/1.1 400") and b"application/json" in answer, answer[:200]
    else:
        assert answer == b"HTTP/1.1 200 OK " + b"A" * 3000, answer[:200]
    kilobytes = b"".join(b"%x\r\n%s\r\n" % (1024, b"B" * 1024) for _ in range(1100)) + b"0\r\n\r\n"
    with connect(each_parser) as sock:
        sock.sendall(head + kilobytes)
        assert _answer(sock) == b"HTTP/1.1 200 OK " + b"B" * 1024 * 1100
    one_chunk = b"%x\r\n%s\r\n0\r\n\r\n" % (300_000, b"C" * 300_000)
    with connect(each_parser) as sock:  # a slow uplink: one chunk in 1,500 reads
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(head)
        # Paced by the clock, within half the read timeout: a fixed sleep of 0.5 ms per piece took
        # 0.7 ms on some kernels, and the upload then outlasted the timeout (a 408, a reset).
        started, pace = time.monotonic(), READ_TIMEOUT / 2 / 1500
        for piece, at in enumerate(range(0, len(one_chunk), 200)):
            sock.sendall(one_chunk[at : at + 200])
            time.sleep(max(0.0, started + piece * pace - time.monotonic()))
        assert _answer(sock) == b"HTTP/1.1 200 OK " + b"C" * 300_000
    answered_promptly(each_parser)


def test_tiny_chunks_after_an_early_answer_get_no_second_answer(each_parser: str) -> None:
    """Refused after its 404 was sent, the body's connection ends; a stray 400 on it would be read as
    the answer to the client's next request."""
    head = b"POST /nope HTTP/1.1\r\nHost: x\r\nContent-Type: image/x\r\nTransfer-Encoding: chunked\r\n\r\n"
    with connect(each_parser) as sock:
        sock.sendall(head)
        assert _answer(sock).startswith(b"HTTP/1.1 404")
        sock.sendall(b"1\r\nA\r\n" * 3000 + b"0\r\n\r\n")
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: image/x\r\nContent-Length: 4\r\n\r\nnext")
        rest = b""
        sock.settimeout(PROMPT)
        try:
            while chunk := sock.recv(65536):
                rest += chunk
                if rest.endswith(b"next"):
                    break
        except ConnectionResetError:
            pass
    assert rest == b"" or rest.startswith(b"HTTP/1.1 200"), rest[:200]  # closed, or the next answered
    answered_promptly(each_parser)


def test_a_websocket_upgrade_is_answered_as_plain_http(each_parser: str) -> None:
    """No route takes WebSockets: uvicorn must not answer the upgrade itself (an empty 403 or a text
    405, no request id, no log line), the app answers it like any request."""
    upgrade = "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
    key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    for line, want in [("GET /healthz", b"200"), ("POST /", b"400"), ("GET /nowhere", b"404")]:
        with connect(each_parser) as sock:
            sock.sendall(f"{line} HTTP/1.1\r\nHost: x\r\n{upgrade}{key}Content-Length: 0\r\n\r\n".encode())
            head = sock.recv(65536).split(b"\r\n\r\n")[0].lower()
        assert head.startswith(b"http/1.1 " + want), head
        assert b"content-type: application/json" in head and b"x-request-id: " in head, head


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"post / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",  # lowercase method
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
def test_unparseable_http_gets_a_json_400(server: str, request_bytes: bytes) -> None:
    """Bytes that are not HTTP never reach the app; their 400 still has the JSON error shape, a
    request id and a count."""
    counted = metric(server, 'docker_vit_requests_total{route="unmatched",status="400"}')
    sock = connect(server)
    sock.sendall(request_bytes)
    answer = closed_by_server(sock, PROMPT)
    sock.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head
    assert re.search(rb"\r\nx-request-id: [0-9a-f]{32}\r\n", head)
    assert metric(server, 'docker_vit_requests_total{route="unmatched",status="400"}') == counted + 1
    assert json.loads(body)["error"]["type"] == "invalid_request"
    answered_promptly(server)


def refused_431(answer: bytes, request_id: bytes = rb"[0-9a-f]{32}") -> None:
    """A JSON 431 with a request id, and nothing after it."""
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 ") and b"application/json" in head, answer[:300]
    assert re.search(rb"\r\nx-request-id: " + request_id + rb"\r\n", head), head[:300]
    assert b"connection: close" in head.lower()
    assert json.loads(body)["error"]["type"] == "request_headers_too_large"
    assert body.startswith(b'{"error":{"type":')  # compact, as every other answer's JSON


@pytest.mark.parametrize("size", [70_000, 100_000])
def test_oversized_headers_in_one_chunk_are_refused(each_parser: str, size: int) -> None:
    """Headers over 64 KiB that arrive whole (one send) are parsed at once: they get a 431 all the
    same, counted, with the client's request id, and the app never sees them."""
    counted = metric(each_parser, 'docker_vit_requests_total{route="unmatched",status="431"}')
    with connect(each_parser) as sock:
        head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-ID: trace-42\r\nX-Big: "
        sock.sendall(head + b"a" * size + b"\r\n\r\n")
        refused_431(closed_by_server(sock, PROMPT), b"trace-42")
    assert metric(each_parser, 'docker_vit_requests_total{route="unmatched",status="431"}') == counted + 1
    answered_promptly(each_parser)


@pytest.mark.parametrize(
    "target", [b"http://x/healthz", b"HTTPS://x:1/healthz?q=1", b"//healthz", b"http://x//healthz"]
)
def test_a_target_in_absolute_form_is_served_by_its_path(each_parser: str, target: bytes) -> None:
    """What proxies send (RFC 9112 has a server accept it): h11 left it whole, and no route matched.
    Leading slashes count as one, in either form (the original's Flask routed `//` to `/`)."""
    with connect(each_parser) as sock:
        sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = closed_by_server(sock, PROMPT)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b'{"status":"ok"}'), answer[:300]


@pytest.mark.parametrize("target", [b"/healthz", b"/healthz?q=1"])
def test_the_header_cap_holds_to_the_byte(each_parser: str, target: bytes) -> None:
    """64 KiB of request line and headers, the blank line that ends them included, is served; one byte
    more is a 431."""
    for size, served in ((MAX_HEADER_BYTES, True), (MAX_HEADER_BYTES + 1, False)):
        head = b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: "
        with connect(each_parser) as sock:
            sock.sendall(head + b"a" * (size - len(head) - 4) + b"\r\n\r\n")
            answer = closed_by_server(sock, PROMPT)
        if served:
            assert answer.startswith(b"HTTP/1.1 200 "), (size, answer[:200])
        else:
            refused_431(answer)


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /healthz?" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /healthz?" + b"a" * 65_527 + b" HTTP/1.0\r\n\r\n",  # a URL of 64 KiB exactly
    ],
)
def test_a_request_line_over_the_cap_is_refused_as_headers_are(
    each_parser: str, request_bytes: bytes
) -> None:
    """httptools' URL parser gives up at 64 KiB itself: still the cap's 431, not a malformed 400."""
    with connect(each_parser) as sock:
        sock.sendall(request_bytes)
        refused_431(closed_by_server(sock, PROMPT))


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST / HTTP/1.1\r\nHost: x\r\nBad Header\r\nContent-Length: 70000\r\n\r\n" + b"a" * 70_000,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nNOT HTTP AT ALL\r\n\r\n" + b"a" * 70_000,
        # a chunk-size line without end: h11 hints 431 for it too, but no header is too big
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: image/x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"a" * 70_000,
    ],
)
def test_malformed_http_with_much_behind_it_is_still_400(each_parser: str, request_bytes: bytes) -> None:
    """h11 took the bytes left behind a malformed head (a body, pipelined ones) for headers past the cap."""
    with connect(each_parser) as sock:
        sock.sendall(request_bytes)
        answer = closed_by_server(sock, PROMPT)
    last = answer[answer.rindex(b"HTTP/1.1 ") :]
    assert last.startswith(b"HTTP/1.1 400 ") and b'"invalid_request"' in last, answer[:300]


def test_a_body_framed_by_both_length_and_chunks_is_refused_and_closed(each_parser: str) -> None:
    """RFC 9112 6.3: both framings mean a smuggling attempt, and the connection must close. h11 read
    the chunks, kept the connection and answered the bytes behind them as a request of its own, which
    a proxy that went by the length would have sent on as another client's."""
    with connect(each_parser) as sock:
        sock.sendall(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: image/x\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        answer = closed_by_server(sock, LINGER + PROMPT)
    assert answer.startswith(b"HTTP/1.1 400 ") and b"malformed HTTP request" in answer, answer[:300]
    assert answer.count(b"HTTP/1.1 ") == 1, answer[:600]
    answered_promptly(each_parser)


def test_a_refusal_reaches_a_client_that_is_still_sending(each_parser: str) -> None:
    """A megabyte of header bytes in one send: the 431 went out at the cap and the socket closed
    with the rest unread, and the reset that followed often overtook the answer (ECONNRESET)."""
    with connect(each_parser) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Junk: " + b"a" * 1_000_000)
        refused_431(closed_by_server(sock, LINGER + PROMPT))
    answered_promptly(each_parser)


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_a_refused_connection_lingers_briefly_and_its_running_request_writes_nothing(
    parser: str, tmp_path: Path
) -> None:
    """A malformed chunked body (its request still running) and garbage pipelined behind a GET: the
    app's late answer was written after the refusal's end of stream (two tracebacks each), and under
    h11 the linger's timer was cancelled, leaving the connection to the idle timeout."""
    if parser == "httptools":
        pytest.importorskip("httptools")
    log = tmp_path / "server.log"
    chunked = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: image/x\r\nTransfer-Encoding: chunked\r\n\r\n"
    for server in serving(READ_TIMEOUT, 30.0, parser, log):
        for request in (
            chunked + b"4\r\nabcd\r\nZZZ\r\n",
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n\x00junk\r\n\r\n",
        ):
            with connect(server) as sock:
                sock.sendall(request)
                started = time.monotonic()
                answer = closed_by_server(sock, LINGER + PROMPT)
                assert time.monotonic() - started < LINGER + 2, "open past the linger"
            assert answer[answer.rindex(b"HTTP/1.1 ") :].startswith(b"HTTP/1.1 400 "), answer[:300]
        time.sleep(READ_TIMEOUT + 0.5)  # the chunked request's body deadline, had it still waited
        answered_promptly(server)
    assert "Traceback" not in log.read_text()


def test_oversized_headers_arriving_in_pieces_are_refused(each_parser: str) -> None:
    """Headers still incomplete past 64 KiB, sent as a network delivers them: a 431, then the close."""
    with connect(each_parser) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: image/x\r\n")
        line = b"Cookie: " + b"a" * 1400 + b"\r\n"
        for _ in range(47):  # just past 64 KiB, no end of headers: the server has read it all
            sock.sendall(line)
            time.sleep(0.002)
        refused_431(closed_by_server(sock, PROMPT))
    answered_promptly(each_parser)


def test_headers_under_the_cap_arriving_in_pieces_are_read(each_parser: str) -> None:
    """30 KB of headers, sent as a network delivers them: h11 refused what was still incomplete past
    16 KiB (its default) with a 400, though the cap is 64 KiB."""
    request = (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nCookie: " + b"a" * 30_000 + b"\r\nConnection: close\r\n\r\n"
    )
    with connect(each_parser) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for start in range(0, len(request), 1460):
            sock.sendall(request[start : start + 1460])
            time.sleep(0.002)
        answer = closed_by_server(sock, PROMPT)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]


def test_oversized_headers_read_with_the_next_request_are_refused(each_parser: str) -> None:
    """Two pipelined requests in one read: the first's 97 KiB of headers were never measured. It gets
    its 431 and the connection closes: the second is not run."""
    first = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 97_000 + b"\r\n\r\n"
    with connect(each_parser) as sock:
        sock.sendall(first + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        refused_431(closed_by_server(sock, PROMPT))
    answered_promptly(each_parser)


def test_oversized_headers_pipelined_behind_a_request_wait_for_its_answer(each_parser: str) -> None:
    """The 431 of a request pipelined behind a running one comes after that one's answer, in turn."""
    first = b"POST /?delay=0.5 HTTP/1.1\r\nHost: x\r\nContent-Type: image/x\r\nContent-Length: 5\r\n\r\nfirst"
    second = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
    with connect(each_parser) as sock:
        sock.sendall(first + second)
        answer = closed_by_server(sock, 3 * PROMPT)
    assert answer.startswith(b"HTTP/1.1 200") and b"\r\n\r\nfirst" in answer, answer[:300]
    refused_431(answer[answer.index(b"first") + 5 :])


def test_shutdown_timeout_bounds_a_long_model_call() -> None:
    """SIGTERM while a model call runs past the shutdown timeout: the caller gets a JSON 503 and the
    process exits 0 without waiting for the call to finish."""
    port = free_port()
    command = [sys.executable, "-m", "docker_vit.cli", "serve", "--handler", "fake_handlers:Echo"]
    command += ["--port", str(port), "--shutdown-timeout", "1", "--log-level", "warning"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url, answers = f"http://127.0.0.1:{port}", []
    try:
        deadline = time.monotonic() + 60
        while not ready(url):  # warmed up
            assert process.poll() is None and time.monotonic() < deadline, "the server never became ready"
            time.sleep(0.1)
        slow = threading.Thread(
            target=lambda: answers.append(
                httpx.post(f"{url}/?delay=60", content=b"x", headers={"content-type": "image/x"}, timeout=90)
            )
        )
        slow.start()
        while "docker_vit_batch_size_count 1.0" not in _metrics(url):  # the slow call is in the model
            assert time.monotonic() < deadline, "the slow request never reached the model"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0  # well before the 60 s call could end
        slow.join(30)
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()
    assert answers and answers[0].status_code == 503
    assert answers[0].json()["error"]["message"] == "the server is shutting down"
    assert answers[0].headers["retry-after"] == "1"


@contextlib.contextmanager
def stuck_server(handler: str, warmed: bool = True) -> Iterator[str]:
    """`serve --handler fake_handlers:HANDLER` (1 s timeouts) in a process, listening (and warmed up):
    its URL. At the end it must exit 0 on SIGTERM, saying a handler call was left unfinished."""
    port = free_port()
    command = [sys.executable, "-m", "docker_vit.cli", "serve", "--handler", f"fake_handlers:{handler}"]
    command += ["--port", str(port), "--request-timeout", "1", "--shutdown-timeout", "1"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not (ready(url) if warmed else "docker_vit_" in _metrics(url)):
            assert process.poll() is None and time.monotonic() < deadline, "the server never became ready"
            time.sleep(0.1)
        yield url
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        assert "exiting with a handler call unfinished" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()


@pytest.mark.parametrize("body", [b"stuck", b"answer-stuck"])
def test_a_handler_call_stuck_in_prepare_or_respond_does_not_keep_the_process_alive(body: bytes) -> None:
    """Their threads would be joined at exit (asyncio's default pool, the decoding pool): forever."""
    with stuck_server("Stuck") as url:

        def stuck() -> int:
            return httpx.post(
                f"{url}/", content=body, headers={"content-type": "image/x"}, timeout=30
            ).status_code

        assert stuck() == 504
        more = cpu_threads() - 1  # calls it takes to hold the pool's other threads too
        if more:
            assert httpx.get(f"{url}/readyz", timeout=5).status_code == 200  # a thread is left: no stall
            with ThreadPoolExecutor(more) as pool:
                assert list(pool.map(lambda _: stuck(), range(more))) == [504] * more
        deadline = time.monotonic() + 5  # every thread is held, soon past the request timeout
        while (ready := httpx.get(f"{url}/readyz", timeout=5)).status_code == 200:
            assert time.monotonic() < deadline, "never stalled"
            time.sleep(0.05)
        assert ready.status_code == 503 and ready.json()["status"] == "stalled", ready.text
        assert ready.json()["error"]["message"].startswith("every thread of a pool (prepare's or respond's)")


def test_a_stuck_example_does_not_keep_the_process_alive() -> None:
    """It ran in asyncio's default pool, which the event loop joins at exit: forever."""
    with stuck_server("StuckExample", warmed=False) as url:
        time.sleep(0.5)
        assert httpx.get(f"{url}/readyz", timeout=5).json()["status"] == "loading"


def test_a_stuck_describe_times_out_alone_and_does_not_keep_the_process_alive() -> None:
    with stuck_server("StuckDescribe") as url:
        for _ in range(3):  # more than its pool's threads: the next ones wait, and time out too
            answer = httpx.get(f"{url}/v1/model", timeout=30)
            assert answer.status_code == 504 and "describe()" in answer.json()["error"]["message"]
        captioned = httpx.post(f"{url}/v1/captions", json={"images": ["aGk="]}, timeout=30)
        assert captioned.status_code == 200 and httpx.get(f"{url}/readyz", timeout=5).status_code == 200


def _metrics(url: str) -> str:
    try:
        return httpx.get(f"{url}/metrics", timeout=2).text
    except httpx.TransportError:
        return ""
