"""Host memory: keep what a batch frees while work follows work, hand it back to the OS once the
server pauses.

glibc (the C library of Linux images; elsewhere these are no-ops) gives the main thread's large blocks
back eagerly, one mapping each, so each layer faulted in, and had the kernel zero, pages the layer
before just gave back. Handing everything back after every batch (`malloc_trim`) did the same to the
next batch: 60,000-90,000 faults and ~0.2 s of system time per greedy batch of 16 images here, 3% of
the throughput (benchmarks/NOTES.md). So the trim runs once the server has had nothing to do for a
moment: a busy server does not pay for it, and an idle one hands back what a request left behind (an
upload refused before any model call included); fragments the decoding threads' heaps still hold keep
it somewhat above its loaded size after heavy traffic (README, Performance).
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Callable

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt's parameter numbers in glibc's malloc.h


def keep_freed_blocks() -> None:
    """Have glibc serve large blocks from its heaps and keep them there when freed."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_MAX, 0)  # no block gets a mapping of its own
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)  # nor is the heap shrunk as blocks are freed


def release_free_memory() -> None:
    """Hand every freed page back to the OS."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class IdleRelease:
    """A context around each piece of heavy work (a request's intake, a batch): once none has run for
    `delay` seconds, `release` runs.

    The pause between batches of a loaded server is the clients' next uploads (~0.1 s at 16 clients
    here), so a short delay tells a busy server from an idle one."""

    def __init__(self, delay: float = 0.5, release: Callable[[], None] = release_free_memory) -> None:
        self._delay = delay
        self._release = release
        self._lock = threading.Lock()
        self._running = 0
        self._timer: threading.Timer | None = None

    def __enter__(self) -> None:
        with self._lock:
            self._running += 1
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._running -= 1
            if self._running == 0:
                self._timer = threading.Timer(self._delay, self._release)
                self._timer.daemon = True  # a pending release never holds up the process's exit
                self._timer.start()


in_use = IdleRelease()  # the process's one: malloc's heaps are shared by every thread
