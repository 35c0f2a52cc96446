"""`docker-vit caption --url`: the same folder captioning, sent to a running Docker-ViT server.

HTTP through the standard library (urllib and threads), so the client needs nothing beyond the core
install, nor torch. Each image is one raw-body request to `POST /v1/captions`, several in flight at
once; the server's batcher turns concurrent requests into full batches. Answers come back in input
order, so the output matches a local run line for line.

Errors: 429, 502/503/504 and dropped connections are retried (honouring Retry-After, bounded: a full
queue is waited for, up to ten minutes an image); a refused image (400, 413, 415), a failed one (500)
or one that still times out (504) after its last try is skipped with a warning, but a model failing on three batches' worth in a row ends the run;
401/403/404/405, 422 (the options) and 501 stop the run, since every other image would meet the same
answer. Files over the server's byte limit are skipped without being sent.
"""

from __future__ import annotations

import http.client
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Collection, Generator, Mapping
from typing import Any

from docker_vit.captions_file import record
from docker_vit.config import Settings
from docker_vit.errors import InputError
from docker_vit.ordered import in_order
from docker_vit.process import NAME
from docker_vit.runner import (
    GIVE_UP_AFTER,
    CaptionError,
    Outcome,
    describe_error,
    generation_defaults,
    read_file,
)
from docker_vit.transport import (
    backoff,
    connection_problem,
    error_of,
    open_url,
    parse_json,
    redirected,
    retry_after,
)

ATTEMPTS = 8  # tries per image while the server answers 504 or drops the connection
BUSY_WAIT = 600.0  # seconds an image keeps being offered to a server answering 503 (queue full) or 429
DESCRIBE_WAIT = 30.0  # seconds for `/v1/model`: a server without it answers 404 at once
TIMEOUT = 300.0  # seconds for one request: the server's own request_timeout answers long before
MARGIN = 30.0  # seconds past a server's own longer request_timeout (its /v1/model says) for one request
READY_WAIT = 600.0  # seconds to wait for a server that is still loading its model
FATAL = (401, 403, 404, 405, 422, 501)  # every other image would get the same answer


def _plain(value: Any) -> bool:
    """A default a query can carry as the server wrote it (odd values of a handler's describe() are
    recorded as they are, never sent back)."""
    return isinstance(value, int | str) and not isinstance(value, bool)


class _Skip(Exception):
    """This image was refused or failed on the server; the others may still go through."""

    def __init__(self, message: str, broke: bool = False) -> None:
        super().__init__(message)
        self.broke = broke  # the server's model failed on it (5xx)


class RemoteRunner:
    """Captions through `settings.url` with `settings.concurrency` requests in flight."""

    def __init__(
        self,
        settings: Settings,
        params: Mapping[str, Any],
        chosen: Collection[str] = (),
        warn: Callable[[str], None] = lambda message: print(f"docker-vit: {message}", file=sys.stderr),
    ) -> None:
        self.warn = warn  # a line on stderr, drawn around the progress bar
        self.url = settings.url.rstrip("/")  # checked to be http(s) with a host by Settings
        self.concurrency = settings.concurrency
        self.headers = {"Content-Type": "application/octet-stream", "Accept": "application/json"}
        if settings.api_key:
            self.headers["Authorization"] = f"Bearer {settings.api_key}"
        self._said_retrying = threading.Event()  # one line per run, not one per image
        self._wait_ready()
        model, failed = self._model()
        self.params, self.recorded = self._options(model, failed, params, chosen)
        limits = model.get("limits") if isinstance(model.get("limits"), dict) else {}
        # a server that may take longer than TIMEOUT answers its own 504 (a skip), not our timeout (an end)
        served = limits.get("request_timeout")
        usable = isinstance(served, int | float) and not isinstance(served, bool) and 0 < served < 86_400
        self.timeout = max(TIMEOUT, served + MARGIN) if usable else TIMEOUT
        limit = limits.get("max_bytes")
        # the server's limit holds; one of this run's own (a flag, a variable) holds where it is lower
        limit = limit if isinstance(limit, int) and not isinstance(limit, bool) else None
        lower = "max_bytes" in chosen and (limit is None or settings.max_bytes < limit)
        self.servers_limit = limit is not None and limit > 0 and not lower
        self.max_bytes = limit if self.servers_limit else settings.max_bytes

    def run(self, paths: list[str]) -> Generator[list[Outcome], None, None]:
        """As a local run: a model that fails on every image of GIVE_UP_AFTER batches' worth in a row is
        broken, and the run ends rather than send every other image to it."""
        in_a_row, limit, ahead = 0, GIVE_UP_AFTER * self.concurrency, []
        results = in_order(self._caption, paths, self.concurrency, ahead)
        try:
            for outcome in results:
                in_a_row = in_a_row + 1 if outcome.broke else 0
                yield [outcome]
                if in_a_row >= limit:
                    raise CaptionError(
                        f"the server's model failed on {limit} images in a row: {outcome.error}"
                    )
        except (Exception, KeyboardInterrupt):  # the run ends (in a request, here, or at a Ctrl-C while
            results.close()  # the last outcome was written): what came back behind it is written first,
            if ahead:  # not made again on resume
                yield ahead
            raise

    def _caption(self, path: str) -> Outcome:
        try:
            answer = self._send(read_file(path, self.max_bytes, self.servers_limit))  # none it would refuse
        except (OSError, InputError) as exc:
            return Outcome(path, error=describe_error(exc))
        except _Skip as exc:
            return Outcome(path, error=str(exc), broke=exc.broke)
        entry = dict(answer["captions"][0])
        text = entry.pop("text")
        return Outcome(path, entry=record(path, text, answer.get("model", ""), self.recorded, entry))

    def _send(self, data: bytes) -> dict[str, Any]:
        query = urllib.parse.urlencode(self.params)
        failures, busy, deadline = 0, 0, time.monotonic() + BUSY_WAIT
        while True:
            request = urllib.request.Request(
                f"{self.url}/v1/captions{'?' if query else ''}{query}",
                data=data,
                headers=self.headers,
                method="POST",
            )
            try:
                with open_url(request, timeout=self.timeout) as response:
                    return self._captions(
                        response.read(), framed=response.chunked or response.length is not None
                    )
            except urllib.error.HTTPError as exc:
                if redirect := redirected(exc, self.url):
                    raise redirect from None
                problem = f"{exc.code} {error_of(exc)[1]}"
                if exc.code in FATAL:
                    routed = exc.code == 404 and self.url.rstrip("/").endswith("/v1/captions")
                    hint = " (give --url without /v1/captions: it is added)" if routed else ""
                    raise CaptionError(f"{self.url} answered {problem}{hint}") from None
                if exc.code not in (429, 502, 503, 504):
                    raise _Skip(f"the server answered {problem}", broke=exc.code >= 500) from None
                waiting = exc.code in (429, 503)  # a busy server is waited for, up to BUSY_WAIT
                failures, busy = failures + (not waiting), busy + waiting
                delay = retry_after(exc, busy if waiting else failures)
                last = failures >= ATTEMPTS or time.monotonic() + delay > deadline  # a slow 504 too
                if last and exc.code == 504:  # the server is up and answers: this image outruns it
                    raise _Skip(f"the server answered {problem} on the last try", broke=True) from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                problem = connection_problem(exc)  # a dropped connection or a cut-off answer: try again
                failures += 1
                delay = backoff(failures)
            if failures >= ATTEMPTS or time.monotonic() + delay > deadline:
                raise CaptionError(f"{self.url} still failing: {problem}")
            self._say_retrying(problem)
            time.sleep(delay)

    def _say_retrying(self, problem: str) -> None:
        """A server that is down or hung is retried for minutes: say so once, not silently."""
        if not self._said_retrying.is_set():
            self._said_retrying.set()
            minutes = BUSY_WAIT / 60
            self.warn(
                f"{self.url}: {problem}; trying again (after {ATTEMPTS} failed tries or {minutes:g} min an "
                "image still timed out is skipped, and a server still failing otherwise ends the run; a "
                "full queue is no failure)"
            )

    def _captions(self, body: bytes, framed: bool = True) -> dict[str, Any]:
        """The server's answer, if it has the shape of one: anything else stops the run, as every
        other request would get the same; but an answer without a length that ends at a closed
        connection may be one cut short (its head, even): tried again, as a dropped connection is."""
        try:
            answer = parse_json(body)
            if len(answer["captions"]) == 1 and isinstance(answer["captions"][0]["text"], str):
                return answer  # one image sent, one caption back
        except ValueError:
            if not framed and body.lstrip()[:1] in (b"", b"{"):  # JSON cut short, not another page
                raise http.client.IncompleteRead(body) from None
        except (LookupError, TypeError):
            pass
        raise CaptionError(f"{self.url}/v1/captions did not answer with captions: is it a Docker-ViT server?")

    def _options(
        self, model: dict[str, Any], failed: str | None, params: Mapping[str, Any], chosen: Collection[str]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The options sent and those records show. A Docker-ViT server's own defaults hold for what
        the user did not set (and of what was set, only the fields its handler reads, when it names
        them), also where its handler cannot say them; a server without the route gets the client's
        own, so that records stay true. The defaults it says, of the options its handler names, are
        sent too, as read now: a server restarted mid-run with other defaults still captions as the
        records say (or refuses them, a 422 that ends the run), never otherwise."""
        if _docker_vit(model):
            names = model.get("options")
            known = names if isinstance(names, list) else chosen
            sent = {name: value for name, value in params.items() if name in chosen and name in known}
            recorded = {**generation_defaults(model), **sent}
            pinned = {name: value for name, value in recorded.items() if name in known and _plain(value)}
            return {**pinned, **sent}, recorded
        if failed is not None:
            self.warn(f"{self.url}/v1/model failed ({failed[:200]}): sending only the options set")
            sent = {name: value for name, value in params.items() if name in chosen}
            return sent, sent
        return dict(params), dict(params)

    def _model(self) -> tuple[dict[str, Any], str | None]:
        """What the server says of itself (`GET /v1/model`): its defaults and limits ({} if it won't
        say), and why its handler's `describe()` could not say them: Docker-ViT's 5xx, or no answer in
        DESCRIBE_WAIT (a server without the route answers 404 at once)."""
        hung = f"no answer in {DESCRIBE_WAIT:g} s"
        try:
            request = urllib.request.Request(f"{self.url}/v1/model", headers=self.headers)
            with open_url(request, timeout=DESCRIBE_WAIT) as response:
                model = parse_json(response.read())
        except urllib.error.HTTPError as exc:
            body, message = error_of(exc)
            return {}, message if exc.code >= 500 and isinstance(body.get("error"), dict) else None
        except TimeoutError:
            return {}, hung
        except urllib.error.URLError as exc:
            return {}, hung if isinstance(exc.reason, TimeoutError) else None
        except (OSError, http.client.HTTPException, ValueError):
            return {}, None
        return (model if isinstance(model, dict) else {}), None

    def _wait_ready(self) -> None:
        """Fail fast on a wrong URL; wait (bounded) while the server loads its model."""
        deadline, waiting = time.monotonic() + READY_WAIT, False
        while True:
            try:
                probe = urllib.request.Request(f"{self.url}/readyz", headers=self.headers)  # a gateway's key
                with open_url(probe, timeout=30) as response:
                    response.read()
                return
            except urllib.error.HTTPError as exc:
                if redirect := redirected(exc, self.url):
                    raise redirect from None
                body, message = error_of(exc)
                if exc.code == 404:
                    return  # no readiness probe there (a proxy in front?): the captions will tell
                passing = exc.code in (502, 503, 504) and body.get("status") != "failed"  # loading, or
                if not passing or time.monotonic() > deadline:  # a proxy whose server restarts
                    detail = body.get("error") if isinstance(body.get("error"), str) else message
                    raise CaptionError(f"{self.url} is not ready: {exc.code} {detail}") from None
                if not waiting:
                    waiting = True
                    why = {
                        "loading": "is loading its model",
                        "stalled": "has a handler call running past its request timeout",
                    }.get(body.get("status"), f"answers {exc.code}")
                    minutes = READY_WAIT / 60
                    self.warn(f"{self.url} {why}; waiting up to {minutes:g} min")
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                refused = isinstance(getattr(exc, "reason", exc), ConnectionRefusedError)
                hint = (
                    " (is it started? a server opens its port a few seconds after it starts)"
                    if refused
                    else ""
                )
                raise CaptionError(f"cannot reach {self.url}: {connection_problem(exc)}{hint}") from None
            time.sleep(1.0)


def _docker_vit(model: Mapping[str, Any]) -> bool:
    """Whether a `GET /v1/model` answer is Docker-ViT's: its `server` entry, which no handler replaces,
    says so (its `model` is what the handler's describe() makes it, any JSON: an id and a revision,
    say); a server from before that entry, by the model id it gave."""
    server = model.get("server")
    named = isinstance(server, dict) and server.get("name") == NAME
    return named or isinstance(model.get("model"), str)
