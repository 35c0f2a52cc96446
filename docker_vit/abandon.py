"""Whether anyone still waits for the model call running on this thread: a batch whose callers all left
(or timed out) stops at its `predict`'s next step instead of holding the device, and the requests
behind it, for nothing. The device thread runs each call `watched` by the batcher's test; a long
`predict` asks `stop_if_abandoned()` between its steps (the captioner does before each token).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator


class Abandoned(Exception):
    """Every caller of the running call has gone (left, or answered 504): its outputs reach no one."""


_watch = threading.local()  # the test `stop_if_abandoned` asks, for the call running on this thread


@contextlib.contextmanager
def watched(gone: Callable[[], bool] | None) -> Iterator[None]:
    """Within, `stop_if_abandoned` on this thread asks `gone` (the batcher's: have all callers left?)."""
    _watch.gone = gone
    try:
        yield
    finally:
        _watch.gone = None


def stop_if_abandoned() -> None:
    """Raise Abandoned once every caller of the call running on this thread has gone. A long `predict`
    calls it between its steps (the captioner does before each token), so that a batch whose callers
    left or timed out stops there instead of holding the device, and the requests behind it, for
    nothing. Outside a server's batch it never raises."""
    gone = getattr(_watch, "gone", None)
    if gone is not None and gone():
        raise Abandoned("every caller of this batch has gone")
