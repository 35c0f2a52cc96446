"""The process around a front end (`docker-vit serve` and `caption`, the Runpod worker): how many CPU
threads a handler's calls get, how a SIGTERM stops it before it serves, how it exits while a handler
call is stuck on a thread, and what version it is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from typing import NoReturn

NAME = "docker-vit"  # the distribution, and the server's name in `/v1/model`, by which a client knows it


class Stopped(KeyboardInterrupt):
    """A stop the process asked for itself (`caption` on SIGTERM), raised on the main thread: it
    goes through `calls.contained` as Ctrl-C does, whatever SIGINT's handler is (a shell script's
    background job ignores SIGINT)."""


class Terminated(BaseException):
    """SIGTERM before the process serves, say while the model loads on the device thread (the signal
    reaches the main thread, which waits for it). Not a SystemExit: loading a handler turns a
    SystemExit its module raises into a load error, and an entry point's clauses (and its `exit_now`,
    which must not join the loading thread) would let one pass."""


_terminated = threading.Event()


def terminate(signum: int, frame: object) -> NoReturn:
    """The SIGTERM handler of a process that does not serve yet. Also remembered: a signal that lands
    while the main thread runs a weakref callback or a `__del__` raises there, where Python prints the
    exception and drops it, and the stop would be lost (`raise_if_terminated`)."""
    _terminated.set()
    raise Terminated


def raise_if_terminated() -> None:
    """Raise Terminated if `terminate` ran, though its own raise went astray: what a wait checks."""
    if _terminated.is_set():
        raise Terminated


def cpu_threads() -> int:
    """Threads for a handler's CPU calls (`prepare`, `respond`): the cores this process may run on (a
    container's CPU set, not the machine's), at least two."""
    usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 2)
    return max(2, len(usable))


def exit_now(code: int) -> NoReturn:
    """End the process without joining its threads: a handler call stuck on one (a hung load, `prepare`
    or `predict`) would keep a normal exit waiting for ever. Logs and output are flushed first."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a reader that left (`| head`), a closed stream
            stream.flush()
    os._exit(code)


def version() -> str:
    """The installed package's version; looked up when asked, as reading the metadata takes ~60 ms."""
    from importlib import metadata

    try:
        return metadata.version(NAME)
    except metadata.PackageNotFoundError:  # run from a checkout on PYTHONPATH, never installed
        return "unknown (not installed)"
