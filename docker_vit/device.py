"""The device thread: the one thread where a model's torch work runs, its load and then every batch.

Torch work belongs on one thread: each other thread that runs a parallel op keeps an OpenMP team of its
own, and with more OpenMP threads than cores GNU OpenMP stops spinning between ops in every team (a lone
caption took 9-25% longer with one such team alive; benchmarks/NOTES.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from docker_vit.abandon import watched
from docker_vit.calls import contained


class DeviceThread:
    """Runs calls one at a time on its thread, counting them so that an exit knows what it would wait for."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="docker-vit-device")
        self._calls = 0  # calls running on the thread right now
        self._waiting: set[Future] = set()  # calls submitted and not yet ended
        self._ended = False  # shut down: a second shutdown has no final call to make

    @property
    def busy(self) -> bool:
        """A call (a batch, the load) runs on the thread, which a normal exit would wait for."""
        return self._calls > 0

    async def run(self, fn: Callable[..., Any], *args: Any, gone: Callable[[], bool] | None = None) -> Any:
        """`fn(*args)` on the thread; `gone` is what `abandon.stop_if_abandoned` asks there meanwhile."""
        call = self._pool.submit(self._counted, fn, *args, gone=gone)
        self._waiting.add(call)
        call.add_done_callback(self._waiting.discard)
        return await asyncio.wrap_future(call)

    def _counted(self, fn: Callable[..., Any], *args: Any, gone: Callable[[], bool] | None) -> Any:
        self._calls += 1
        try:
            with watched(gone):
                return contained(fn, *args)
        finally:
            self._calls -= 1

    def shutdown(self, last: Callable[[], Any] | None = None) -> Future | None:
        """Queued calls are dropped; a running one is left to finish (it cannot be stopped), then
        `last` runs, the thread's final call: its future is returned."""
        for call in list(self._waiting):
            call.cancel()  # only those not started
        final = None
        if last is not None and not self._ended:
            final = self._pool.submit(self._counted, last, gone=None)
        self._ended = True
        self._pool.shutdown(wait=False)
        return final
