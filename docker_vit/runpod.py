"""Runpod serverless worker: Runpod jobs in, the same service the HTTP server runs, captions out.

    python -m docker_vit.runpod                                  # the worker, as a Runpod endpoint runs it
    python -m docker_vit.runpod --test_input '{"input": {"image": "<base64>"}}'   # the SDK's local test

A job's input is `{"image": base64}` or `{"images": [base64, ...]}` (data URLs work too), optionally
with `num_beams` and `max_new_tokens`; the output is `{"captions": [{"text": ...}], "model": ...}`, or
`{"error": {"type": ..., "message": ...}}` with the types the HTTP API uses. The adapter only
translates: settings (`DOCKER_VIT_*`), the handler, image intake, limits and batching all come from
the core, so a Runpod worker and `docker-vit serve` answer alike.

The service lives on its own event loop in a background thread. `main` loads and warms the model
before it enters the SDK's job loop, as Runpod workers do: a worker takes no job it cannot run yet,
and one whose model failed to load exits 1 (Runpod replaces it) instead of failing every job it
takes. Concurrent jobs share model batches; a job whose images do not fit the queue waits for room
(Runpod's own queue is the buffer, so a queued job is never failed as `overloaded`).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import signal
import sys
import threading
from collections.abc import Mapping
from typing import Any

from docker_vit import errors, frontend, memory, payloads
from docker_vit.config import SERVING, Settings, env_name
from docker_vit.environment import ignored_variables
from docker_vit.handler import Handler, HandlerError
from docker_vit.loader import load_handler
from docker_vit.logs import configure
from docker_vit.naming import named
from docker_vit.process import Terminated, exit_now, raise_if_terminated, terminate
from docker_vit.service import FAILED, Service


class Worker:
    """A started `Service` and the job handler Runpod calls (`worker.handle`, async)."""

    def __init__(self, settings: Settings, handler: Handler | None = None) -> None:
        self.settings = settings
        handler = handler or load_handler(settings)  # a bad one fails before the loop's thread starts
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="docker-vit-runpod", daemon=True)
        self._thread.start()
        self.service = Service(settings, handler)
        self.on_refresh: Any = lambda: None  # main(): have the SDK itself stop taking jobs and exit
        self._submit(self.service.start()).result()

    def wait_ready(self) -> bool:
        """Block until the model is loaded and warm (True) or has failed to load (False)."""
        settled = self._submit(self.service.settled())
        try:
            while True:
                done = concurrent.futures.wait([settled], timeout=0.5).done
                raise_if_terminated()  # a SIGTERM whose raise went astray, in the worker's start or here
                if done:
                    return settled.result()
        finally:
            settled.cancel()  # after Ctrl-C: nothing left pending on the loop

    @property
    def concurrency(self) -> int:
        """Jobs to hold at once: enough single-image jobs to fill a model batch, no more than the queue
        holds (a job taken beyond it would wait here, and time out, rather than in Runpod's queue)."""
        return min(self.service.batch_size, self.settings.max_queue)

    def _submit(self, coroutine: Any) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    async def handle(self, job: Mapping[str, Any]) -> dict[str, Any]:
        """Runpod's handler: one job, answered on the service's loop whatever loop Runpod runs."""
        return await asyncio.wrap_future(self._submit(self._answer(job)))

    async def _answer(self, job: Mapping[str, Any]) -> dict[str, Any]:
        with memory.in_use:  # what a job leaves in the heap goes back to the OS once all are done
            return await self._answered(job)

    async def _answered(self, job: Mapping[str, Any]) -> dict[str, Any]:
        try:  # base64 of up to max_images x max_bytes: decoded off the loop that runs the batches
            names = self.service.handler.option_names
            inputs, raw = await asyncio.to_thread(_read_job, job, self.settings, names)
            await self._wait_ready()
            results = await frontend.answer(self.service, inputs, raw, patient=True)
        except errors.ApiError as exc:
            answer: dict[str, Any] = errors.error_body(exc.type, exc.message)  # Runpod's error object
            # A model call hung past the timeout (every job would wait behind it), or the device
            # failed for good: Runpod replaces this worker.
            if (exc.status == 504 and self.service.stalled) or self.service.state == FAILED:
                answer["refresh_worker"] = True
                self.on_refresh()
            return answer
        return {"captions": [result.to_json() for result in results], "model": self.service.handler.name}

    async def _wait_ready(self) -> None:
        """Jobs that arrive during the cold start wait for the model, up to the request timeout."""
        if not await self.service.settled(self.settings.request_timeout):
            raise errors.from_service(errors.NotServing(self.service.why_not_ready))

    def close(self) -> None:
        """Stop the service and its loop (idempotent; runs at exit, as the SDK leaves by sys.exit)."""
        if self.loop.is_running():
            self._submit(self.service.stop()).result(timeout=30)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=30)
        if not self.loop.is_running() and not self.loop.is_closed():
            self.loop.close()


def _read_job(
    job: Mapping[str, Any], settings: Settings, option_names: tuple[str, ...] | None = None
) -> tuple[list[bytes], dict[str, Any]]:
    """A job's images (decoded) and the handler's options, or an ApiError naming what is wrong."""
    payload = job.get("input") if isinstance(job, Mapping) else None
    if not isinstance(payload, Mapping):
        raise errors.ApiError(400, 'the job needs an "input" object')
    has_one, has_many = "image" in payload, "images" in payload
    if has_one == has_many:
        raise errors.ApiError(400, 'input needs exactly one of "image" (base64) or "images" (list of base64)')
    images = [payload["image"]] if has_one else payload["images"]
    if not isinstance(images, list) or not images or not all(isinstance(item, str) for item in images):
        raise errors.ApiError(400, '"image" must be a base64 string and "images" a non-empty list of them')
    payloads.count_images(len(images), settings.max_images, "job")  # a 413 before a 422, as HTTP answers
    options = {name: value for name, value in payload.items() if name not in ("image", "images")}
    payloads.refuse_unknown(options, option_names, "input field")
    return payloads.decode_images(images, settings.max_bytes), options


_shared: Worker | None = None  # `handler`'s worker, made at its first job
_making = threading.Lock()


async def handler(job: Mapping[str, Any]) -> dict[str, Any]:
    """Runpod's handler as the module-level function its examples call `handler`, for a start script of
    one's own (`runpod.serverless.start({"handler": docker_vit.runpod.handler})`): the worker the
    `DOCKER_VIT_*` settings describe, made and warmed at the first job, which waits for it. `main` (the
    image's command) is the worker with everything around it: jobs held at once, a failed load's exit."""
    return await (await asyncio.to_thread(_shared_worker)).handle(job)


def _shared_worker() -> Worker:
    """One worker for every job, made once: concurrent first jobs wait for it under the lock. Logs go
    to the `docker_vit` logger alone, as in a Ray replica: the process's logging is the script's."""
    global _shared
    with _making:
        if _shared is None:
            worker = _configured(logger="docker_vit")
            atexit.register(worker.close)
            worker.wait_ready()  # a failed load answers each job with its error, as a server's 503
            _shared = worker
    return _shared


def main() -> None:
    try:
        import runpod  # the optional extra
    except ImportError:
        sys.exit(
            "docker_vit.runpod: the runpod SDK is not installed: pip install 'docker-vit[runpod]' "
            "(in the image: build it with --build-arg EXTRAS=runpod)"
        )
    worker: Worker | None = None
    code = 0
    # As a container's start command the worker is PID 1, which never sees a SIGTERM it has no handler
    # for: a stop while the model loads would wait for the runtime's SIGKILL. Only while it loads: the
    # SDK's job loop installs its own, its local test mode none (a stop there is no success), and the
    # ping process it forks must not inherit this one.
    signal.signal(signal.SIGTERM, terminate)
    try:
        worker = _worker()
        atexit.register(worker.close)
        ready = worker.wait_ready()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if ready:
            # Concurrent jobs are what fills the batcher's model calls.
            start = {"handler": worker.handle, "concurrency_modifier": lambda _: worker.concurrency}
            # a job's own refresh_worker only asks Runpod's side to stop the pod; the SDK's config flag
            # also makes the SDK stop taking jobs and return once the jobs in progress end
            worker.on_refresh = lambda: start.__setitem__("refresh_worker", True)
            runpod.serverless.start(start)
        else:
            code = 1  # the service has logged why
    except KeyboardInterrupt:  # Ctrl-C, say while the model loads (or while the worker starts it)
        code = 130
    except SystemExit as exc:  # the SDK's test mode, and its Ctrl-C, leave by sys.exit; past a hung
        if worker is None:  # call too (below). A setting refused before: its line, as it is
            raise
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Terminated:  # no job taken yet: nothing to drain
        code = 0
    finally:  # the SDK leaves by sys.exit: stop the service before the interpreter starts to shut
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a stop now need not interrupt the clean-up
        if worker is not None:  # down, so a load still running is cancelled, not reported as a failure
            worker.close()
    if worker is None or worker.service.busy:  # a load may run on the device thread: exiting
        exit_now(code)  # normally would join it and wait
    sys.exit(code)


def _worker() -> Worker:
    """The worker its settings describe, or exit with one line naming the bad setting."""
    try:
        return _configured()
    except ValueError as exc:
        sys.exit(f"docker_vit.runpod: error: {exc}")


def _configured(logger: str = "") -> Worker:
    """The worker the `DOCKER_VIT_*` variables describe, its logging set up, unknown variables said; a
    bad setting is a ValueError naming the variable, not a flag."""
    try:
        settings = Settings.load(None, SERVING)
        configure(settings.log_format, settings.log_level, logger=logger)
        for line in ignored_variables(names=SERVING):
            logging.getLogger("docker_vit").warning(line)
        return Worker(settings)
    except HandlerError as exc:
        raise ValueError(exc.said_as(env_name("handler"))) from None
    except (ValueError, TypeError) as exc:
        raise ValueError(named(exc, flags=False)) from None


if __name__ == "__main__":
    main()
