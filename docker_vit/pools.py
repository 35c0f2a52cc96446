"""The thread pools where a handler's calls run beside the device: decoding (`prepare`), answers
(`respond`), and the rest (`example`, `describe`), with what runs in them now.

Never asyncio's default pool: the event loop joins it at exit, forever behind a hung call, and its
threads also parse request bodies. A call still running is what `busy` tells the entry points (a
normal exit would join its thread); one on the request path that outruns the request timeout is a
stall, as a hung model call is: every request behind it would time out.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

SIDE_WORKERS = 2  # example() and describe(): a hung describe holds one, never a request's answer


class Pools:
    """`pre` decodes, `post` answers, `side` runs the calls off the request path."""

    def __init__(self, workers: int) -> None:
        self.pre = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="docker-vit-prepare")
        # answers out of the decoding pool, where they would queue behind images still decoding
        self.post = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="docker-vit-respond")
        self.side = ThreadPoolExecutor(max_workers=SIDE_WORKERS, thread_name_prefix="docker-vit-describe")
        self._lock = threading.Lock()
        self._running: dict[object, float | None] = {}  # a call's start, None where it cannot stall

    async def run(self, pool: ThreadPoolExecutor, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` in `pool`, counted in `busy` while it runs, and timed unless in `side`."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(pool, self._tracked, pool is not self.side, fn, *args)

    def _tracked(self, timed: bool, fn: Callable[..., Any], *args: Any) -> Any:
        key = object()
        with self._lock:
            self._running[key] = time.monotonic() if timed else None
        try:
            return fn(*args)
        finally:
            with self._lock:
                del self._running[key]

    @property
    def busy(self) -> bool:
        """A handler call still runs in a pool: a normal exit would wait for it."""
        return bool(self._running)

    @property
    def running_for(self) -> float:
        """Seconds the longest `prepare` or `respond` running now has run (0 with none)."""
        with self._lock:
            oldest = min((start for start in self._running.values() if start is not None), default=None)
        return 0.0 if oldest is None else time.monotonic() - oldest

    def shutdown(self) -> None:
        """Nothing new starts; what runs is left to end (or to the process's exit)."""
        for pool in (self.pre, self.post, self.side):
            pool.shutdown(wait=False, cancel_futures=True)
