"""HTTP for `docker-vit caption --url`, standard library only: an opener that never follows a
redirect and reads an answer given before the upload was in, what a failed call says, and when to try
again.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import random
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from docker_vit.runner import CaptionError

MAX_DELAY = 30.0  # seconds, the longest wait between two tries, whatever Retry-After says


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an error: urllib would follow it with the API key to whatever host it names,
    and turn an upload into an empty GET."""

    def redirect_request(self, *args: Any) -> None:
        return None


class _ReadsEarlyAnswers:
    """A connection that reads the server's answer when the upload breaks off. A server (or a proxy
    in front of it) may refuse a request from its head alone, a wrong key (401) or a body over its
    limit (413), answer, and close without reading the rest: sending the rest of a photo then fails
    with a broken pipe or a reset, which would be retried as a dropped connection, the answer never
    read. Where the server gave none, reading fails as such a dropped connection, tried again."""

    broken: tuple[type[OSError], ...] = (BrokenPipeError, ConnectionResetError)

    def send(self, data: Any) -> None:
        with contextlib.suppress(*self.broken):  # getresponse() reads what the server said
            super().send(data)  # before it closed, or fails as a dropped connection


class _Connection(_ReadsEarlyAnswers, http.client.HTTPConnection):
    pass


class _HTTP(urllib.request.HTTPHandler):
    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_Connection, req)


_handlers: list[Any] = [_NoRedirects, _HTTP]
if hasattr(urllib.request, "HTTPSHandler"):  # Python built with ssl
    import ssl

    class _TLSConnection(_ReadsEarlyAnswers, http.client.HTTPSConnection):
        # OpenSSL mostly reports the closed socket as an EOF, not as the reset or broken pipe
        broken = (*_ReadsEarlyAnswers.broken, ssl.SSLEOFError)

    class _HTTPS(urllib.request.HTTPSHandler):
        def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(_TLSConnection, req, context=self._context)

    _handlers.append(_HTTPS)

open_url = urllib.request.build_opener(*_handlers).open


def parse_json(data: bytes) -> Any:
    """`json.loads`, where an answer nested deeper than Python's stack (a broken or hostile server's)
    is bad JSON like any other, not a RecursionError that ends the run with a traceback."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def redirected(exc: urllib.error.HTTPError, url: str) -> CaptionError | None:
    """A redirect's error, naming the --url to give instead (the target less the route asked for)."""
    if not 300 <= exc.code < 400:
        return None
    location = exc.headers.get("Location")
    if not location:
        return CaptionError(f"{url} answered {exc.code}, a redirect without a Location")
    target = urllib.parse.urljoin(exc.url, location)
    place = target.split("?")[0]
    route = exc.url[len(url) :].split("?")[0]  # /readyz, /v1/model or /v1/captions
    base = place.removesuffix(route) if route else ""
    usable = base.startswith(("http://", "https://")) and base not in (url, place)
    hint = f": give --url {base}" if usable else ""
    return CaptionError(f"{url} answered {exc.code}, redirecting to {target}{hint}")


def retry_after(exc: urllib.error.HTTPError, attempt: int) -> float:
    """The server's Retry-After where it says a second or more; else (0, a date, none) the doubling
    backoff: every worker trying again at once, again and again, only adds to a busy server's load."""
    try:
        seconds = float(exc.headers.get("Retry-After", ""))
    except ValueError:
        seconds = 0.0
    return min(seconds, MAX_DELAY) if 1.0 <= seconds < math.inf else backoff(attempt)


def connection_problem(exc: Exception) -> str:
    """What went wrong with a connection, in words: the reason, or what kind of broken answer came."""
    if isinstance(exc, http.client.HTTPException):
        return f"not a complete HTTP answer ({type(exc).__name__})"
    return str(getattr(exc, "reason", exc))


def backoff(attempt: int) -> float:
    """Doubling, and jittered: images that failed in one batch are not sent back into one batch again."""
    return min(0.5 * 2**attempt, MAX_DELAY) * random.uniform(0.5, 1.0)


def error_of(exc: urllib.error.HTTPError) -> tuple[dict[str, Any], str]:
    """The error's JSON body (read once) and its message: the server's `error.message`, else the reason."""
    try:
        body = parse_json(exc.read() or b"{}")
    except (ValueError, OSError, http.client.HTTPException):
        body = {}
    finally:
        exc.close()
    body = body if isinstance(body, dict) else {}
    error = body.get("error")
    message = error.get("message") if isinstance(error, dict) else None
    return body, str(message) if message else str(exc.reason)
