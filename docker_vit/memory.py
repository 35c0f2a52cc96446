"""Host memory of a model on the CPU: keep a batch's freed activations while batches follow each other,
hand them back to the OS once the device pauses.

glibc (the C library of Linux images; elsewhere these are no-ops) gives large blocks back eagerly: the
main thread's as one mapping each, a worker thread's by deleting whole heaps that fall empty. The next
layer then faults in, and the kernel zeroes, pages the layer before just gave back: 60,000-90,000
faults and ~0.2 s of system time per greedy batch of 16 images here, 3-4% of the batch
(benchmarks/NOTES.md). Kept instead, and handed back when the device has had nothing to do for a moment,
a busy server pays nothing and an idle one holds what it held before its first batch.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Callable

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4  # mallopt's parameter numbers in malloc.h
_HEAP = 64 << 20  # the size of a worker thread's glibc heap


def keep_freed_blocks() -> None:
    """Have glibc serve large blocks from its heaps and keep them there when freed."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_MAX, 0)  # no block gets a mapping of its own
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)  # the main heap is not shrunk as blocks are freed
        libc.mallopt(_M_TOP_PAD, _HEAP)  # nor is a worker thread's heap deleted once it falls empty


def release_free_memory() -> None:
    """Hand every freed page back to the OS."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class IdleRelease:
    """A context around each batch: once none has run for `delay` seconds, `release` runs.

    The pause between batches of a loaded server is the clients' next uploads (~0.1 s at 16 clients
    here), so a short delay tells a busy device from an idle one."""

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
