"""The thread pools where a handler's calls run beside the device: decoding (`prepare`, and the
warm-up's `example`), answers (`respond`), and `describe`, with what runs in them now.

Never asyncio's default pool: the event loop joins it at exit, forever behind a hung call, and its
threads also parse request bodies. A call still running is what `busy` tells the entry points (a
normal exit would join its thread). A pool on the request path whose every thread has been held by the
same calls past the request timeout is jammed, as a hung model call is: every request behind it would
time out. One slow call, or many waiting their turn to decode, jams nothing: threads still come free.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

DESCRIBE_WORKERS = 2  # a hung describe() holds one of these, never a request's thread nor the warm-up


class Pools:
    """`pre` decodes, `post` answers, `side` describes."""

    def __init__(self, workers: int) -> None:
        self.pre = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="docker-vit-prepare")
        # answers out of the decoding pool, where they would queue behind images still decoding
        self.post = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="docker-vit-respond")
        self.side = ThreadPoolExecutor(max_workers=DESCRIBE_WORKERS, thread_name_prefix="docker-vit-describe")
        self._sizes = {self.pre: workers, self.post: workers}  # the pools a request waits for
        self._lock = threading.Lock()
        self._running: dict[object, tuple[ThreadPoolExecutor, float]] = {}

    async def run(self, pool: ThreadPoolExecutor, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` in `pool`, counted in `busy` while it runs."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(pool, self._tracked, pool, fn, *args)

    def _tracked(self, pool: ThreadPoolExecutor, fn: Callable[..., Any], *args: Any) -> Any:
        key = object()
        with self._lock:
            self._running[key] = (pool, time.monotonic())
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
    def jammed_for(self) -> float:
        """Seconds a request-path pool has had every thread held by the calls it runs now (0 while
        each has a thread free, or one that took its call since)."""
        now, longest = time.monotonic(), 0.0
        with self._lock:
            for pool, size in self._sizes.items():
                starts = [start for owner, start in self._running.values() if owner is pool]
                if len(starts) >= size:
                    longest = max(longest, now - max(starts))
        return longest

    def shutdown(self) -> None:
        """Nothing new starts; what runs is left to end (or to the process's exit)."""
        for pool in (self.pre, self.post, self.side):
            pool.shutdown(wait=False, cancel_futures=True)
