"""Dynamic batching: concurrent requests become one model call.

Items wait in a bounded queue grouped by their options (waiting.py, which also decides which group goes
next and when). One worker per device takes the next batch and runs it on the device's thread
(device.py), so the next batch forms during the current one. Items whose caller gave up (timeout,
disconnect) are dropped before the model sees them, and a running batch whose callers have all gone
stops at its `predict`'s next step. A batch that fails is retried in halves, so one poison item fails
only itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from typing import Any

from docker_vit.abandon import Abandoned
from docker_vit.calls import WrongOutputs, device_lost, drop_frames, splittable
from docker_vit.device import DeviceThread
from docker_vit.errors import CLIENT_ERRORS
from docker_vit.waiting import Entry, Waiting

log = logging.getLogger("docker_vit.batching")

Predict = Callable[[Sequence[Any], Hashable], Sequence[Any]]


class Batcher:
    """Gathers items into batches for `predict` and resolves each caller's future with its output."""

    def __init__(
        self,
        predict: Predict,
        *,
        max_batch_size: int,
        max_wait: float,
        max_queue: int,
        on_batch: Callable[[list[float]], None] = lambda waits: None,
        on_call: Callable[[float], None] = lambda seconds: None,
        on_outputs: Callable[[int], None] = lambda count: None,
        on_device_lost: Callable[[Exception], None] = lambda exc: None,
    ) -> None:
        self.predict = predict
        self.waiting = Waiting(max_batch_size=max_batch_size, max_wait=max_wait, max_queue=max_queue)
        self.on_batch = on_batch  # a model call starts: the seconds each of its items waited in the queue
        self.on_call = on_call  # it ended (or failed) after this many seconds on the device
        self.on_outputs = on_outputs  # it gave this many outputs, also for callers gone meanwhile
        self.on_device_lost = on_device_lost  # it failed so that no later call can run (`device_lost`)
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.device = DeviceThread()  # where every batch (and the model's load) runs
        self._batch_started: float | None = None  # monotonic start of the batch on the device
        self._running: list[Entry] = []  # the batch taken for the device, for stop() to answer
        self._refusal: Callable[[], Exception] | None = None  # set by `refuse`: no model call runs now

    @property
    def max_batch_size(self) -> int:
        return self.waiting.max_batch_size

    @property
    def running_for(self) -> float:
        """Seconds the batch on the device has run so far (0 with none running)."""
        started = self._batch_started  # read once: another thread (a health check) may ask
        return 0.0 if started is None else time.monotonic() - started

    @property
    def depth(self) -> int:
        """Items waiting for the model (not counting the batch it is running)."""
        return self.waiting.depth

    @property
    def pending(self) -> int:
        """Items admitted, not yet in a model call (queued or being decoded): what `max_queue` bounds."""
        return self.waiting.pending

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="docker-vit-batcher")

    async def stop(self, last: Callable[[], Any] | None = None) -> Future | None:
        """Answer every caller (cancelled) and end the device thread, `last` its final call (whose
        future this returns)."""
        running = self._running  # the batch on the device: its callers are answered too
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        entries = [*self.waiting, *running]
        self.waiting.clear()
        for entry in entries:
            entry.future.cancel()  # no-op for the answered ones
        return self.device.shutdown(last)

    def refuse(self, error: Callable[[], Exception]) -> None:
        """Run no model call from now on: every caller still queued, and each of a batch still to run
        (the other half of one retried in halves), gets a fresh `error()` at once. For a device that
        failed for good, which would fail them too, but only later and one model call each."""
        self._refusal = error
        for entry in self.waiting:
            if not entry.future.done():
                entry.future.set_exception(error())

    def admit(self, count: int, options: Hashable) -> None:
        """Hold room for `count` items that are still being prepared (decoded), or raise QueueFull: load
        is shed before the costly preparation. `withdraw` gives the room back, then `submit` queues."""
        self.waiting.admit(count, options)

    def withdraw(self, count: int, options: Hashable) -> None:
        self.waiting.withdraw(count, options)

    def submit(self, items: Sequence[Any], options: Hashable) -> list[asyncio.Future]:
        """Queue all of one request's items, or none of them when they don't fit."""
        if self._task is None or self._wake is None:
            raise RuntimeError("Batcher.start() has not been called")
        self.waiting.check_room(len(items))
        if not items:
            return []
        futures = self.waiting.add(items, options)
        self._wake.set()
        return futures

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            if not self.waiting:
                self._wake.clear()
                continue
            options, batch = await self.waiting.next_batch()
            if not self.waiting:
                self._wake.clear()
            self._running = batch  # with the retried halves of it, should it fail: for stop() to answer
            try:
                await self._execute(batch, options)
            except Exception as exc:  # a bug here must not end the batcher: every later request would wait
                log.exception("a batch could not be answered")
                _fail(self._running, exc)
            finally:
                self._running = batch = []  # a done batch's items are not kept until the next one

    async def _execute(self, batch: list[Entry], options: Hashable) -> None:
        batch = [entry for entry in batch if not entry.future.done()]  # callers gone since: not run
        if self._refusal is not None:
            for entry in batch:
                entry.future.set_exception(self._refusal())
            return
        if not batch:
            return
        started = time.monotonic()
        _report(self.on_batch, [started - entry.born for entry in batch])  # before the state changes
        self.waiting.device_busy()
        self._batch_started = started
        failure: Exception | None = None
        try:
            # asked between decoding steps, on the device thread (a future's state is one attribute)
            gone = lambda: all(entry.future.done() for entry in batch)  # noqa: E731
            outputs = await self.device.run(self.predict, [e.item for e in batch], options, gone=gone)
            if len(outputs) != len(batch):
                raise WrongOutputs(f"predict returned {len(outputs)} outputs for {len(batch)} items")
        except Exception as exc:
            failure = exc
        finally:
            self.waiting.device_idle()
            self._batch_started = None
            _report(self.on_call, time.monotonic() - started)
        if failure is not None:  # retried outside the except block, which would hold the failure's frames
            await self._recover(batch, options, failure)
            return
        _report(self.on_outputs, len(outputs))
        for entry, output in zip(batch, outputs, strict=True):
            if not entry.future.done():
                entry.future.set_result(output)

    async def _recover(self, batch: list[Entry], options: Hashable, exc: Exception) -> None:
        """Split a failed batch in halves and retry, so one poison item or an out-of-memory error
        fails only the items that really cannot run."""
        live = [entry for entry in batch if not entry.future.done()]
        if isinstance(exc, Abandoned) and not live:
            log.info("batch of %d stopped: every caller has gone", len(batch))
            drop_frames(exc)  # they hold the stopped decode's caches, in a cycle with this frame
            return
        if len(batch) > 1 and live and splittable(exc):  # callers who left meanwhile are not retried
            refused = isinstance(exc, CLIENT_ERRORS)  # an input the client sent: no failure
            failed = f"batch of {len(batch)} failed ({type(exc).__name__}: {exc}); retrying in halves"
            log.log(logging.INFO if refused else logging.WARNING, "%s", failed)
            drop_frames(exc)  # the failed call's memory (activations, caches) must be free for the halves
            for entry in live:  # the halves' queue wait starts now: the failed call was model time
                entry.born = time.monotonic()
            middle = len(live) // 2
            for half in (live[:middle], live[middle:]):
                await self._execute(half, options)  # drops an empty half, and callers gone since
            return
        if isinstance(exc, CLIENT_ERRORS):  # a handler refusing an input in predict: 4xx
            log.info("model call refused its input: %s: %s", type(exc).__name__, exc)
        else:
            log.error("model call failed", exc_info=exc)
        drop_frames(exc)  # the callers get the error, not the failed call's tensors
        _fail(live, exc)
        if device_lost(exc):  # said before the next batch is taken: the device can run none
            _report(self.on_device_lost, exc)


def _report(callback: Callable[[Any], None], value: Any) -> None:
    """A metrics callback: its failure is logged, never the batch's (nor the batcher's state's)."""
    try:
        callback(value)
    except Exception:
        log.exception("metrics callback %s failed", getattr(callback, "__qualname__", callback))


def _fail(entries: Sequence[Entry], exc: Exception) -> None:
    for entry in entries:
        if not entry.future.done():
            entry.future.set_exception(exc)
