"""Concurrent work whose results come back in input order: `caption --url` keeps several requests in
flight, and its output still matches a local run line for line.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any


def in_order(
    work: Callable[[Any], Any], items: Sequence[Any], workers: int, ahead: list[Any] | None = None
) -> Iterator[Any]:
    """`work` over `items` in daemon threads, results yielded in input order.

    At most twice `workers` results wait ahead of the one being yielded, bounding memory. Daemon
    threads never keep Ctrl-C waiting for a slow request; closing the iterator stops the workers.
    When an error (or Ctrl-C) ends the iteration, or the caller closes it, the results already done
    behind the last one yielded go to `ahead`, in input order: work done, for the caller to keep.
    """
    results: dict[int, tuple[bool, Any]] = {}
    changed = threading.Condition()
    room = threading.Semaphore(2 * workers)
    indexes = iter(range(len(items)))
    stopped = threading.Event()

    def worker() -> None:
        while room.acquire() and not stopped.is_set():
            with changed:
                index = next(indexes, None)
            if index is None:
                return
            try:
                result = (True, work(items[index]))
            except BaseException as exc:  # handed to the consumer, who raises it in order
                result = (False, exc)
            with changed:
                results[index] = result
                changed.notify_all()

    for _ in range(min(workers, len(items))):
        threading.Thread(target=worker, daemon=True, name="docker-vit-client").start()
    try:
        for index in range(len(items)):
            with changed:
                while index not in results:
                    changed.wait(timeout=0.5)
                ok, value = results.pop(index)
            room.release()
            if not ok:
                raise value
            yield value
    except BaseException:
        if ahead is not None:
            with changed:
                ahead.extend(value for _, (ok, value) in sorted(results.items()) if ok)
        raise
    finally:
        stopped.set()
        for _ in range(workers):
            room.release()
