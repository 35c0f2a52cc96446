"""A handler's call, contained: whatever it raises becomes an error of that call alone.

Handlers are user code, run on worker threads (the device thread, intake threads). An exception that
escaped as-is could stop the server (SystemExit, KeyboardInterrupt from a worker reach the event
loop), hang a future (StopIteration cannot be set on one) or keep a failed batch's tensors alive in
its traceback; these helpers turn each into an ordinary error of the one call. Also here, for the
server's batcher and `caption` alike: which failed calls are worth retrying in halves, and how many
CPU calls run at once.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Any


class Stopped(KeyboardInterrupt):
    """A stop the process asked for itself (`caption` on SIGTERM), raised on the main thread: it
    goes through `contained` as Ctrl-C does, whatever SIGINT's handler is (a shell script's background
    job ignores SIGINT)."""


def cpu_threads() -> int:
    """Threads for a handler's CPU calls (`prepare`, `respond`): the cores this process may run on (a
    container's CPU set, not the machine's), at least two."""
    usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 2)
    return max(2, len(usable))


class WrongOutputs(RuntimeError):
    """A call gave another number of outputs than it had inputs: a mistake in its code, not in one of
    its inputs. Never retried in halves: batches of one would pass and hide it."""


def splittable(exc: BaseException) -> bool:
    """Whether a failed batch is worth retrying in halves (a poison item, an out-of-memory error)."""
    return not isinstance(exc, WrongOutputs)


def contained(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)`, where a handler's SystemExit, KeyboardInterrupt or other BaseException becomes an
    error of this call alone: from a worker thread it would travel to the event loop and stop the
    server. Only Ctrl-C itself goes through: a KeyboardInterrupt on the main thread while Python's own
    SIGINT handler is installed (a server installs its own, so there it can only be the handler's)."""
    try:
        return fn(*args)
    except (StopIteration, StopAsyncIteration) as exc:  # asyncio cannot put these in a future: a hang
        raise RuntimeError(f"the handler raised {type(exc).__name__}") from None
    except Exception as exc:
        try:
            str(exc)  # every front end shows the message
        except Exception:
            raise RuntimeError(
                f"the handler raised {type(exc).__name__} (its message cannot be shown)"
            ) from None
        raise
    except BaseException as exc:
        main = threading.current_thread() is threading.main_thread()
        if isinstance(exc, KeyboardInterrupt) and main and (isinstance(exc, Stopped) or _ctrl_c_raises()):
            raise
        raise RuntimeError(f"the handler raised {type(exc).__name__}: {exc}") from None


def _ctrl_c_raises() -> bool:
    return signal.getsignal(signal.SIGINT) is signal.default_int_handler


def drop_frames(exc: BaseException | None) -> None:
    """Forget the stack frames of a failure (and of those it chained): their local variables, such as
    an out-of-memory batch's tensors, are freed instead of living as long as the exception."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__
