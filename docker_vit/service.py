"""The running model service: load once, warm up, then turn input bytes into results through the batcher.

Knows neither HTTP nor torch; the web server, the Ray and Runpod adapters all drive a `Service`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from functools import partial
from typing import Any

from docker_vit.batching import Batcher
from docker_vit.calls import contained, description, predict_all, read_options, respond
from docker_vit.closing import closed
from docker_vit.config import Settings
from docker_vit.errors import CLIENT_ERRORS, InputError, NotServing, TooLarge
from docker_vit.handler import Handler, Result
from docker_vit.loader import batch_size, check_attributes, sync_result
from docker_vit.metrics import Metrics
from docker_vit.pools import Pools
from docker_vit.process import cpu_threads

log = logging.getLogger("docker_vit.service")

LOADING, READY, FAILED = "loading", "ready", "failed"
STALLED = "stalled"  # ready, but a model call, or the calls holding a pool, outran the request timeout


class Unanswered(Exception):
    """A call beside the request path (describe) ran past the request timeout: 504."""


class WarmUpError(RuntimeError):
    """The first call, on the handler's own `example()`, failed: the model is not fit to serve."""


class LimitsTooLow(WarmUpError):
    """The limits refuse even the handler's own small example (`--max-pixels 1000`): a setting to
    change, said in one line."""


class Service:
    """One handler, its batcher and its readiness."""

    def __init__(self, settings: Settings, handler: Handler) -> None:
        check_attributes(handler)  # a handler object handed in directly, too
        self.settings = settings
        self.handler = handler
        self.metrics = Metrics()
        self.state = LOADING
        self.error: str | None = None
        self.failure = "the model failed to load"  # what `error`, once set, is the reason for
        self.on_failed: Callable[[], None] = lambda: None
        self._loading: asyncio.Task | None = None  # the load, from `start`
        self._loaded = False  # the handler's load returned: its close() is due at the end
        workers = cpu_threads()
        self.pools = Pools(workers)
        # One request's images take at most all but one of the pool's threads at a time, so a request
        # of many large images cannot make every other request's decoding wait for all of them.
        self._cpu_share = max(1, workers - 1)
        self.batcher = Batcher(
            partial(predict_all, handler),
            max_batch_size=batch_size(handler, settings),
            max_wait=settings.max_wait_ms / 1000,
            max_queue=settings.max_queue,
            on_batch=self._served(self.metrics.batch_started),
            on_call=self._served(self.metrics.model_seconds.observe),
            on_outputs=self._served(self.metrics.images.inc),
            on_device_lost=self._lose_device,
        )
        self.metrics.queue_depth.set_function(lambda: self.batcher.pending)

    def _served(self, record: Callable[[Any], None]) -> Callable[[Any], None]:
        """A batch metric that leaves out the warm-up's call: no client sent it (the captioning routes
        refuse while loading), and a counter of images captioned must count clients' images only."""
        return lambda value: None if self.state == LOADING else record(value)

    async def start(self) -> None:
        """Start batching and load the model in the background; probes answer meanwhile."""
        self.batcher.start()
        self._loading = asyncio.get_running_loop().create_task(self._load())

    async def stop(self) -> None:
        """Answer what waits (cancelled), then the handler's close() after its last call on the device."""
        if self._loading is not None:
            self._loading.cancel()
        # Only a close() of its own is waited for: nothing else holds up an exit behind a hung call.
        close = getattr(self.handler, "close", None)  # a method, or one set on the instance (in load)
        closes = callable(close) and getattr(close, "__func__", close) is not Handler.close
        final = await self.batcher.stop(self._close if closes else None)
        self.pools.shutdown()
        if final is not None:
            await closed(final)

    def _close(self) -> None:
        if self._loaded:  # on the device thread, so after a load still running when the stop came
            sync_result("close", self.handler.close())

    @property
    def busy(self) -> bool:
        """A handler call still runs (a model call, a load, a stuck prepare or respond): a process that
        exits normally joins its thread, so it would wait for the call to finish."""
        return self.batcher.device.busy or self.pools.busy

    async def describe(self) -> dict[str, Any]:
        """The handler's describe(), off the loop and off the request path, within the request timeout
        (Unanswered past it): a hung one must hold up neither the probes, the answers nor an exit."""
        work = asyncio.ensure_future(self.pools.run(self.pools.side, description, self.handler))
        try:  # not wait_for: a TimeoutError of the handler's own is its failure, not ours
            done, _ = await asyncio.wait({work}, timeout=self.settings.request_timeout)
        finally:  # the caller gone (Ray cancels a request whose client left) or timed out: not left behind
            work.cancel()
        if not done:
            raise Unanswered("the handler's describe() did not answer within the request timeout")
        return work.result()

    async def _load(self) -> None:
        try:
            started = time.perf_counter()
            await self.batcher.device.run(self._load_handler)
            seconds = time.perf_counter() - started
            self.metrics.load_seconds.set(seconds)
            log.info("loaded %s in %.1f s", self.handler.name, seconds)
            await self._warm_up()
        except Exception as exc:
            self.state, self.error = FAILED, _said(exc)
            # A missing file or no network says all in its message; anything else may be a bug.
            plain = isinstance(exc, OSError | LimitsTooLow)
            log.error("loading the model failed: %s", self.error, exc_info=not plain)
            self.on_failed()
            return
        self.state = READY

    def _load_handler(self) -> None:
        sync_result("load", self.handler.load())
        self._loaded = True

    async def _warm_up(self) -> None:
        """One real call through the whole path, so the first client doesn't pay for lazy setup."""
        preparing = False
        try:
            example = await self.pools.run(self.pools.pre, contained, self.handler.example)
            options = self.options({})
            started = time.perf_counter()  # the whole path, once: what a client's first request costs
            preparing = True
            items = await self._pre([example], options)
            preparing = False
            await self._post(await self._core(items, options))
        except TooLarge as exc:
            raise LimitsTooLow(f"the limits refuse even the warm-up input, example(): {exc}") from None
        except Exception as exc:
            hint = ""
            if preparing and type(self.handler).example is Handler.example:  # it fits a failed prepare only
                hint = " (the default example() is a PNG image: a handler of other inputs overrides it)"
            raise WarmUpError(f"the call on example() failed: {type(exc).__name__}: {exc}{hint}") from exc
        seconds = time.perf_counter() - started
        log.info("warm-up call in %.2f s (%.1f inputs/s)", seconds, 1 / seconds)

    async def settled(self, timeout: float = float("inf")) -> bool:
        """Wait for the load to end, at most `timeout` seconds: True once the model is ready. Polled,
        so a caller on another event loop (a Ray health check, a Runpod job) can wait too."""
        deadline = time.monotonic() + timeout
        while self.state == LOADING and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.state == READY

    @property
    def stalled(self) -> bool:
        """The model call on the device has outrun the request timeout, or the calls holding every
        thread of a pool (prepare's, respond's) have (a hung handler, say): every request waiting behind
        them times out, so probes must send traffic elsewhere (or have Ray replace the replica) until
        they end."""
        return self.overran()

    def overran(self, timeouts: float = 1.0) -> bool:
        """The request path has been held by the same handler calls for `timeouts` request timeouts."""
        held = max(self.batcher.running_for, self.pools.jammed_for)
        return held > timeouts * self.settings.request_timeout

    @property
    def batch_size(self) -> int:
        """The most items one model call takes."""
        return self.batcher.max_batch_size

    @property
    def ready(self) -> bool:
        return self.state == READY and not self.stalled

    @property
    def status(self) -> str:
        """What `/readyz` and `/v1/model` report: the load state, or `stalled` while a call overruns."""
        return STALLED if self.state == READY and self.stalled else self.state

    @property
    def why_not_ready(self) -> str:
        """What a caller turned away while the model is not ready reads: loading, failed and why, or
        stalled."""
        if self.error:
            return f"{self.failure}: {self.error}"
        if self.state == READY:
            model, pools = self.batcher.running_for, self.pools.jammed_for
            held = (
                f"a model call has run for {model:.1f} s"
                if model >= pools
                else (f"every thread of a pool (prepare's or respond's) has been held for {pools:.1f} s")
            )
            return f"{held}, past the request timeout ({self.settings.request_timeout:g} s); requests wait behind it"
        return f"the model is {self.state}"

    def options(self, raw: Mapping[str, Any]) -> Hashable:
        """The handler's reading of a request's options: OptionsError (422) for the client's mistakes."""
        return read_options(self.handler, raw)

    async def run(self, inputs: Sequence[bytes], options: Hashable) -> list[Result]:
        """Bytes in, results out, in input order: pre (CPU pool), core (the batcher, on the device
        thread), post (CPU pool), so that one request's decoding overlaps another's model call."""
        return await self._post(await self._core(await self._pre(inputs, options), options))

    async def _pre(self, inputs: Sequence[bytes], options: Hashable) -> list[Any]:
        """Every input decoded and preprocessed in the CPU pool, with queue room held meanwhile (load
        is shed before decoding, not after); the first bad input raises."""
        self.batcher.admit(len(inputs), options)
        share = asyncio.Semaphore(self._cpu_share)

        async def one(index: int, data: bytes) -> Any:
            try:
                async with share:
                    return await self.pools.run(
                        self.pools.pre, contained, self.handler.prepare, data, options
                    )
            except InputError as exc:
                if len(inputs) > 1:  # say which image of the request it was
                    exc.args = (f"image {index}: {exc}",)
                raise

        jobs = [asyncio.ensure_future(one(index, data)) for index, data in enumerate(inputs)]
        try:
            return list(await asyncio.gather(*jobs))
        except CLIENT_ERRORS:  # the client's: answered 4xx, as from options()
            raise
        except Exception:
            log.exception("prepare failed")  # the client gets a 500: the log says why
            raise
        finally:
            _cancel(jobs)
            del jobs  # a failed job's error holds this frame: a cycle that would keep the uploads
            self.batcher.withdraw(len(inputs), options)

    async def _core(self, items: list[Any], options: Hashable) -> list[Any]:
        """The items through the batcher: the model's outputs, in order."""
        if self.state == FAILED:  # decoded while the device failed: not queued for a dead one
            raise NotServing(self.why_not_ready)
        futures = self.batcher.submit(items, options)
        try:
            return list(await asyncio.gather(*futures))
        finally:
            _cancel(futures)
            del futures  # as in `_pre`: a model error must not hold this frame's inputs in a cycle

    def _lose_device(self, exc: Exception) -> None:
        """A device that every later call would fail on (the batcher says so as the call fails): not
        ready from now on, the queued callers answered 503, and the entry point's `on_failed` stops
        serving (`serve` exits 1, Runpod replaces the worker, Ray the replica)."""
        if self.state != READY:
            return  # the warm-up's failure is the load's
        self.state, self.error = FAILED, _said(exc)
        self.failure = "the device failed"
        log.error("the device failed: %s; serving stops, so that this process is replaced", self.error)
        self.batcher.refuse(lambda: NotServing(self.why_not_ready))  # 503s: try elsewhere
        self.on_failed()

    async def _post(self, outputs: list[Any]) -> list[Result]:
        """`respond` in its own pool, off the event loop, which a slow `respond` (or the check
        of a big result) would stall."""
        return await self.pools.run(self.pools.post, self._respond, outputs)

    def _respond(self, outputs: Sequence[Any]) -> list[Result]:
        try:
            return [respond(self.handler, output) for output in outputs]
        except CLIENT_ERRORS:  # the client's, answered 4xx: no failure to log
            raise
        except Exception:
            log.exception("respond failed")
            raise


def _said(exc: Exception) -> str:
    """A failure's reason as `/readyz` can carry it (JSON holds no lone surrogate), in one line, as the
    log says it: transformers' "couldn't connect" and others span lines."""
    said = " ".join(f"{type(exc).__name__}: {exc}".split())
    return said.encode("utf-8", "backslashreplace").decode()


def _cancel(futures: Sequence[asyncio.Future]) -> None:
    """Cancel each; in a function of its own, so no loop variable is left in the caller's frame holding
    a failed future (whose error holds that frame: a cycle)."""
    for future in futures:
        future.cancel()
