"""The queue in front of the device: items grouped by their options, and which group goes next.

Of the groups that are full or have waited `max_wait` seconds to fill, the one whose first item is
oldest goes (so steady traffic in one group never starves another, and a full group never waits behind
one still filling); a group passed over for a younger, full one goes next, filled or not.

The wait counts only idle device time: items queued during a batch still wait `max_wait` once it ends
(clients it answered have a moment to send their next images), while an item that has had its wait goes
as soon as the device is free. And items of the same options admitted but still being decoded are
waited for, at most `HOLD` seconds longer, rather than left to trail in a batch of their own (not when
`max_wait` is 0). A lone request pays neither. Admission counts the items being decoded too, so a burst
is refused before decoding.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from docker_vit.errors import QueueFull, TooManyItems

HOLD = 0.1  # seconds a batch may wait beyond max_wait for images still being decoded


@dataclass(eq=False)  # found in its group by identity: an item (a tensor) has no plain `==`
class Entry:
    item: Any
    future: asyncio.Future
    options: Hashable
    idle_mark: float  # the queue's idle clock when the item arrived
    born: float = field(default_factory=time.monotonic)
    queued: bool = True


class Waiting:
    """Items admitted for the device, by options: the room they hold, and the next batch of them."""

    def __init__(self, *, max_batch_size: int, max_wait: float, max_queue: int) -> None:
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait
        self.max_queue = max_queue
        self._groups: OrderedDict[Hashable, deque[Entry]] = OrderedDict()
        self._queued = 0
        self._incoming: Counter[Hashable] = Counter()  # admitted items still being prepared, by options
        self._passed: set[Entry] = set()  # first items of groups a younger, fuller group went ahead of
        self._idle_since: float | None = time.monotonic()  # None while a batch runs
        self._idle_before = 0.0  # seconds of idle device before the current idle spell

    @property
    def depth(self) -> int:
        """Items queued (not counting those being decoded, nor a batch taken)."""
        return self._queued

    @property
    def pending(self) -> int:
        """Items admitted, not yet in a model call (queued or being decoded): what `max_queue` bounds."""
        return self._queued + self._incoming.total()

    def __bool__(self) -> bool:
        return bool(self._groups)

    def __iter__(self) -> Iterator[Entry]:
        return iter([entry for group in self._groups.values() for entry in group])

    def admit(self, count: int, options: Hashable) -> None:
        """Room for items still being decoded (counted by options: a batch of theirs waits for them)."""
        self.check_room(count)
        self._incoming[options] += count

    def withdraw(self, count: int, options: Hashable) -> None:
        """The room of `admit` given back: the items are queued now, or failed to decode."""
        self._incoming[options] -= count
        if self._incoming[options] <= 0:
            del self._incoming[options]

    def check_room(self, count: int) -> None:
        """Refuse a request's items all together, before any is decoded, when they cannot fit."""
        if count > self.max_queue:
            raise TooManyItems(f"{count} images at once; the queue holds at most {self.max_queue}")
        taken = self.pending
        if taken + count > self.max_queue:
            raise QueueFull(f"the queue is full ({taken} image{'s' * (taken != 1)} waiting or being decoded)")

    def add(self, items: Sequence[Any], options: Hashable) -> list[asyncio.Future]:
        """Queue one request's items (room checked): the futures their outputs will resolve."""
        loop = asyncio.get_running_loop()
        entries = [Entry(item, loop.create_future(), options, self._idle_clock()) for item in items]
        for entry in entries:
            entry.future.add_done_callback(lambda _, entry=entry: self._leave(entry))
        self._groups.setdefault(options, deque()).extend(entries)
        self._queued += len(entries)
        return [entry.future for entry in entries]

    def clear(self) -> None:
        """Forget every queued item, its future left to the caller (stop answers them)."""
        for entry in self:
            entry.queued = False  # counted out here: the cancellations' callbacks must not again
        self._groups.clear()
        self._queued = 0

    def device_busy(self) -> None:
        """A batch starts on the device: the idle clock, by which items wait, stops."""
        self._idle_before = self._idle_clock()
        self._idle_since = None

    def device_idle(self) -> None:
        self._idle_since = time.monotonic()

    async def next_batch(self) -> tuple[Hashable, list[Entry]]:
        """The oldest group that is ready (`_ready`), chosen again as they wait: callers who give up
        leave their group at once. None and no entries when every caller gave up."""
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
            return None, []
        batch: list[Entry] = []
        while group and len(batch) < self.max_batch_size:
            entry = group.popleft()
            self._dequeue(entry)
            if not entry.future.done():  # a caller that gave up costs nothing more
                batch.append(entry)
        if not group:
            del self._groups[options]
        return options, batch

    def _idle_clock(self) -> float:
        """Seconds the device has sat idle since the queue was made."""
        spell = 0.0 if self._idle_since is None else time.monotonic() - self._idle_since
        return self._idle_before + spell

    def _ready(self, options: Hashable, group: deque[Entry]) -> bool:
        """Full, or done waiting; or passed over once for a younger group that was (its wait counts
        idle device time, which back-to-back batches of another group would never give it)."""
        if len(group) >= self.max_batch_size or group[0] in self._passed:
            return True
        waited = self._idle_clock() - group[0].idle_mark
        held = self._incoming[options] and self.max_wait > 0 and waited < self.max_wait + HOLD
        return waited >= self.max_wait and not held

    def _leave(self, entry: Entry) -> None:
        """A caller's future is done. One that gave up while queued takes its item out of the queue at
        once: kept until a batch came, the items of callers that time out or leave while the device is
        busy would pile up without bound, each having freed its room."""
        if entry.queued:
            group = self._groups[entry.options]
            group.remove(entry)
            if not group:
                del self._groups[entry.options]
        self._dequeue(entry)

    def _dequeue(self, entry: Entry) -> None:
        """An item leaves the count when taken for a batch, or as soon as its caller gives up, so
        abandoned requests never hold queue room that live ones need."""
        self._passed.discard(entry)
        if entry.queued:
            entry.queued = False
            self._queued -= 1
