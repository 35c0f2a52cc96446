"""Dynamic batching: concurrent requests become one model call.

Items wait in a bounded queue grouped by their options. One worker per device takes, of the groups
that are full or have waited `max_wait` seconds to fill, the one whose first item is oldest (so steady
traffic in one group never starves another, and a full group never waits behind one still filling), and
runs it on the device's thread (device.py), so the next batch forms during the current one. Items
whose caller gave up (timeout, disconnect) are dropped before the model sees them, and a running batch
whose callers have all gone stops at its `predict`'s next step.

Two refinements keep batches full under steady load. The wait counts only idle device time: items
queued during a batch still wait `max_wait` once it ends (clients it answered have a moment to send
their next images), while an item that has had its wait goes as soon as the device is free. And items
of the same options admitted but still being decoded are waited for, at most `HOLD` seconds longer,
rather than left to trail in a batch of their own (not when `max_wait` is 0). A lone request pays
neither. Admission counts the items being decoded too, so a burst is refused before decoding.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from docker_vit.abandon import Abandoned
from docker_vit.calls import WrongOutputs, device_lost, drop_frames, splittable
from docker_vit.device import DeviceThread
from docker_vit.errors import CLIENT_ERRORS, QueueFull, TooManyItems

log = logging.getLogger("docker_vit.batching")

Predict = Callable[[Sequence[Any], Hashable], Sequence[Any]]
HOLD = 0.1  # seconds a batch may wait beyond max_wait for images still being decoded


@dataclass(eq=False)  # found in its group by identity: an item (a tensor) has no plain `==`
class _Entry:
    item: Any
    future: asyncio.Future
    options: Hashable
    idle_mark: float  # the batcher's idle clock when the item arrived
    born: float = field(default_factory=time.monotonic)
    queued: bool = True


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
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait
        self.max_queue = max_queue
        self.on_batch = on_batch  # a model call starts: the seconds each of its items waited in the queue
        self.on_call = on_call  # it ended (or failed) after this many seconds on the device
        self.on_outputs = on_outputs  # it gave this many outputs, also for callers gone meanwhile
        self.on_device_lost = on_device_lost  # it failed so that no later call can run (`device_lost`)
        self._groups: OrderedDict[Hashable, deque[_Entry]] = OrderedDict()
        self._queued = 0
        self._incoming: Counter[Hashable] = Counter()  # admitted items still being prepared, by options
        self._passed: set[_Entry] = set()  # first items of groups a younger, fuller group went ahead of
        self._idle_since: float | None = time.monotonic()  # None while a batch runs
        self._idle_before = 0.0  # seconds of idle device before the current idle spell
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.device = DeviceThread()  # where every batch (and the model's load) runs
        self._batch_started: float | None = None  # monotonic start of the batch on the device
        self._running: list[_Entry] = []  # the batch taken for the device, for stop() to answer
        self._refusal: Callable[[], Exception] | None = None  # set by `refuse`: no model call runs now

    @property
    def running_for(self) -> float:
        """Seconds the batch on the device has run so far (0 with none running)."""
        started = self._batch_started  # read once: another thread (a health check) may ask
        return 0.0 if started is None else time.monotonic() - started

    @property
    def depth(self) -> int:
        """Items waiting for the model (not counting the batch it is running)."""
        return self._queued

    @property
    def pending(self) -> int:
        """Items admitted, not yet in a model call (queued or being decoded): what `max_queue` bounds."""
        return self._queued + self._incoming.total()

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
        for entry in [*(e for group in self._groups.values() for e in group), *running]:
            entry.queued = False  # counted out here: the cancellations' callbacks must not again
            entry.future.cancel()  # no-op for the answered ones
        self._groups.clear()
        self._queued = 0
        return self.device.shutdown(last)

    def refuse(self, error: Callable[[], Exception]) -> None:
        """Run no model call from now on: every caller still queued, and each of a batch still to run
        (the other half of one retried in halves), gets a fresh `error()` at once. For a device that
        failed for good, which would fail them too, but only later and one model call each."""
        self._refusal = error
        for entry in [e for group in self._groups.values() for e in group]:
            if not entry.future.done():
                entry.future.set_exception(error())

    def admit(self, count: int, options: Hashable) -> None:
        """Hold room for `count` items that are still being prepared (decoded), or raise QueueFull: load
        is shed before the costly preparation. `withdraw` gives the room back, then `submit` queues."""
        self._check_room(count)
        self._incoming[options] += count

    def withdraw(self, count: int, options: Hashable) -> None:
        self._incoming[options] -= count
        if self._incoming[options] <= 0:
            del self._incoming[options]

    def _check_room(self, count: int) -> None:
        if count > self.max_queue:
            raise TooManyItems(f"{count} images in one request; the queue holds at most {self.max_queue}")
        taken = self.pending
        if taken + count > self.max_queue:
            raise QueueFull(f"the queue is full ({taken} image{'s' * (taken != 1)} waiting or being decoded)")

    def submit(self, items: Sequence[Any], options: Hashable) -> list[asyncio.Future]:
        """Queue all of one request's items, or none of them when they don't fit."""
        if self._task is None or self._wake is None:
            raise RuntimeError("Batcher.start() has not been called")
        self._check_room(len(items))
        if not items:
            return []
        loop = asyncio.get_running_loop()
        entries = [_Entry(item, loop.create_future(), options, self._idle_clock()) for item in items]
        for entry in entries:
            entry.future.add_done_callback(lambda _, entry=entry: self._leave(entry))
        self._groups.setdefault(options, deque()).extend(entries)
        self._queued += len(entries)
        self._wake.set()
        return [entry.future for entry in entries]

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            if not self._groups:
                self._wake.clear()
                continue
            options, batch = await self._next_batch()
            if not self._groups:
                self._wake.clear()
            self._running = batch  # with the retried halves of it, should it fail: for stop() to answer
            try:
                await self._execute(batch, options)
            except Exception as exc:  # a bug here must not end the batcher: every later request would wait
                log.exception("a batch could not be answered")
                _fail(self._running, exc)
            finally:
                self._running = batch = []  # a done batch's items are not kept until the next one

    def _idle_clock(self) -> float:
        """Seconds the device has sat idle since the batcher was made."""
        spell = 0.0 if self._idle_since is None else time.monotonic() - self._idle_since
        return self._idle_before + spell

    async def _next_batch(self) -> tuple[Hashable, list[_Entry]]:
        """The oldest group that is ready (`_ready`), chosen again as they wait: callers who give up
        leave their group at once."""
        while self._groups:
            ready = [
                (options, group) for options, group in self._groups.items() if self._ready(options, group)
            ]
            if ready:
                options, group = min(ready, key=lambda pair: pair[1][0].born)
                oldest = min(self._groups.values(), key=lambda waiting: waiting[0].born)
                if oldest is not group:
                    self._passed.add(oldest[0])  # passed over: it goes next, filled or not
                break
            await asyncio.sleep(0.001)
        else:
            return None, []  # every caller gave up
        batch: list[_Entry] = []
        while group and len(batch) < self.max_batch_size:
            entry = group.popleft()
            self._dequeue(entry)
            if not entry.future.done():  # a caller that gave up costs nothing more
                batch.append(entry)
        if not group:
            del self._groups[options]
        return options, batch

    def _ready(self, options: Hashable, group: deque[_Entry]) -> bool:
        """Full, or done waiting; or passed over once for a younger group that was (its wait counts
        idle device time, which back-to-back batches of another group would never give it)."""
        if len(group) >= self.max_batch_size or group[0] in self._passed:
            return True
        waited = self._idle_clock() - group[0].idle_mark
        held = self._incoming[options] and self.max_wait > 0 and waited < self.max_wait + HOLD
        return waited >= self.max_wait and not held

    def _leave(self, entry: _Entry) -> None:
        """A caller's future is done. One that gave up while queued takes its item out of the queue at
        once: kept until a batch came, the items of callers that time out or leave while the device is
        busy would pile up without bound, each having freed its room."""
        if entry.queued:
            group = self._groups[entry.options]
            group.remove(entry)
            if not group:
                del self._groups[entry.options]
        self._dequeue(entry)

    def _dequeue(self, entry: _Entry) -> None:
        """An item leaves the count when taken for a batch, or as soon as its caller gives up, so
        abandoned requests never hold queue room that live ones need."""
        self._passed.discard(entry)
        if entry.queued:
            entry.queued = False
            self._queued -= 1

    async def _execute(self, batch: list[_Entry], options: Hashable) -> None:
        batch = [entry for entry in batch if not entry.future.done()]  # callers gone since: not run
        if self._refusal is not None:
            for entry in batch:
                entry.future.set_exception(self._refusal())
            return
        if not batch:
            return
        started = time.monotonic()
        _report(self.on_batch, [started - entry.born for entry in batch])  # before the state changes
        self._idle_before = self._idle_clock()
        self._idle_since = None
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
            self._idle_since = time.monotonic()
            self._batch_started = None
            _report(self.on_call, self._idle_since - started)
        if failure is not None:  # retried outside the except block, which would hold the failure's frames
            await self._recover(batch, options, failure)
            return
        _report(self.on_outputs, len(outputs))
        for entry, output in zip(batch, outputs, strict=True):
            if not entry.future.done():
                entry.future.set_result(output)

    async def _recover(self, batch: list[_Entry], options: Hashable, exc: Exception) -> None:
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


def _fail(entries: Sequence[_Entry], exc: Exception) -> None:
    for entry in entries:
        if not entry.future.done():
            entry.future.set_exception(exc)
