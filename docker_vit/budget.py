"""A shared amount that threads take shares of, in turn: the pixels being decoded at once, over all
requests (images.py), so that the memory of decoding is bounded by the amount and not by the cores."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager


class Budget:
    """An amount (pixels being decoded) shared by threads: `hold` waits its turn, then until its share
    fits."""

    def __init__(self, total: int) -> None:
        self.total, self.taken = total, 0
        self._changed = threading.Condition()
        self._line: deque[object] = deque()  # first come, first served: a big share is not starved
        self._holding = threading.local()  # a thread's hold inside its own (a `then` that decodes)

    @contextmanager
    def hold(self, amount: int) -> Iterator[None]:
        if getattr(self._holding, "yes", False):  # queued behind others while holding, it would wait
            yield  # for ever: within its thread's first share, it runs on that share
            return
        self._holding.yes = True
        try:
            with self._share(amount):
                yield
        finally:
            self._holding.yes = False

    @contextmanager
    def _share(self, amount: int) -> Iterator[None]:
        amount = min(amount, self.total)  # one bigger than all of it runs alone
        ticket = object()
        with self._changed:
            self._line.append(ticket)
            try:
                self._changed.wait_for(lambda: self._line[0] is ticket and self.taken + amount <= self.total)
            finally:
                self._line.remove(ticket)
                self._changed.notify_all()  # the next in line may fit too (or may be first now)
            self.taken += amount
        try:
            yield
        finally:
            with self._changed:
                self.taken -= amount
                self._changed.notify_all()
