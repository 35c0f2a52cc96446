"""A handler's call, contained and checked: whatever it raises, or returns wrong, is an error of that
call alone, answered the same way by every front end (server, Runpod, Ray, `docker-vit caption`).

Handlers are user code, run on worker threads (the device thread, intake threads). An exception that
escaped as-is could stop the server (SystemExit, KeyboardInterrupt from a worker reach the event
loop), hang a future (StopIteration cannot be set on one) or keep a failed batch's tensors alive in
its traceback; `contained` turns each into an ordinary error of the one call, and the checked calls
below (`read_options`, `predict_all`, `respond`, `description`) refuse what no front end could send.
Also here, for the server's batcher and `caption` alike: which failed calls are worth retrying in
halves, which leave the device unusable, and how a failed call's memory is let go.
"""

from __future__ import annotations

import itertools
import json
import signal
import threading
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

from docker_vit.abandon import stop_if_abandoned as stop_if_abandoned  # the path docs once gave
from docker_vit.errors import OptionsError
from docker_vit.handler import Handler, HandlerBug, Result
from docker_vit.process import Stopped


class WrongOutputs(RuntimeError):
    """A call gave another number of outputs than it had inputs: a mistake in its code, not in one of
    its inputs. Never retried in halves: batches of one would pass and hide it."""


def splittable(exc: BaseException) -> bool:
    """Whether a failed batch is worth retrying in halves (a poison item, an out-of-memory error). An
    `Abandoned` counts as one where callers still wait for the batch: the handler raised it itself."""
    return not isinstance(exc, WrongOutputs) and not device_lost(exc)


# Torch's words for the faults that poison a GPU's context (CUDA's "sticky" errors), after which every
# later call on it fails, whatever its input, until the process is replaced. Other CUDA errors (an
# invalid launch configuration at some batch size, out of memory) pass with their batch.
_DEVICE_ERROR = ("CUDA error:", "CUDA driver error:", "cuDNN error:")
_STICKY = (
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "misaligned address",
    "illegal instruction",
    "uncorrectable ECC error",
    "hardware stack error",
    "launch timed out",
    "EXECUTION_FAILED",  # cuBLAS's and cuDNN's word for a kernel that faulted
)


def device_lost(exc: BaseException) -> bool:
    """Whether a model call's error leaves its device unusable, so that serving must stop and the
    process be replaced. Torch raises these as RuntimeError (AcceleratorError) with its words first:
    a message that only quotes them (a handler echoing what a client sent) is not one."""
    text = str(exc)
    return (
        isinstance(exc, RuntimeError) and text.startswith(_DEVICE_ERROR) and any(s in text for s in _STICKY)
    )


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
        said = f": {exc}" if str(exc) else ""  # SystemExit(3) says 3; a KeyboardInterrupt, nothing
        raise RuntimeError(f"the handler raised {type(exc).__name__}{said}") from None


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


class WrongCount(HandlerBug, WrongOutputs):
    """`predict` gave another number of outputs than it got items (one per batch, say)."""


def read_options(handler: Handler, raw: Mapping[str, Any]) -> Hashable:
    """`handler.options(raw)`. The fields come from the client, so what a handler raises on them as a
    ValueError, TypeError or LookupError (a missing field) is the client's error: OptionsError (422)."""
    try:
        options = contained(handler.options, raw)
    except OptionsError:
        raise
    except (ValueError, TypeError, OverflowError, LookupError, RecursionError) as exc:
        raise OptionsError(f"invalid options: {type(exc).__name__}: {str(exc)[:200]}") from None
    try:
        hash(options)
    except TypeError:  # batches are grouped by options
        raise HandlerBug(f"options() returned an unhashable {type(options).__name__}") from None
    return options


def predict_all(handler: Handler, items: Sequence[Any], options: Hashable) -> list[Any]:
    """`handler.predict`, as a list of exactly one output per item (a generator is run out here)."""
    count = len(items)  # before predict, which may consume its list
    outputs = contained(handler.predict, items, options)
    try:
        each = contained(iter, outputs)  # its `__iter__`, like its `__len__` below, is the handler's code
    except TypeError:
        raise HandlerBug(f"predict returned {_kind(outputs)}, which is not iterable") from None
    # One output past the count is enough to know: an endless iterator would fill the memory of the
    # device thread, and never end. A generator's own errors keep their names.
    taken = contained(list, itertools.islice(each, count + 1))
    if len(taken) != count:
        try:
            said: int | str = contained(len, outputs)  # a list's or an array's own length
        except Exception:  # none (a generator, an endless iterator), or a broken one
            said = f"more than {count}" if taken[count:] else len(taken)
        raise WrongCount(f"predict returned {said} outputs for {count} items")
    return taken


def description(handler: Handler) -> dict[str, Any]:
    """`handler.describe()`, checked to be a JSON object."""
    info = contained(handler.describe)
    if not isinstance(info, dict) or not all(isinstance(key, str) for key in info):
        raise HandlerBug(f"describe returned {_kind(info)}, not a dict with str keys")
    _json(info, "describe returned")
    return info


def _json(value: Any, what: str) -> None:
    try:
        json.dumps(value, allow_nan=False, ensure_ascii=False).encode()
    except (TypeError, ValueError, RecursionError) as exc:  # UnicodeEncodeError: a lone surrogate
        raise HandlerBug(f"{what} something that is not JSON: {exc}") from None


def respond(handler: Handler, output: Any) -> Result:
    """`handler.respond(output)`, checked to be a Result that every front end can send as JSON."""
    result = contained(handler.respond, output)
    if not isinstance(result, Result):
        raise HandlerBug(f"respond returned {_kind(result)}, not a Result")
    if not isinstance(result.text, str):
        raise HandlerBug(f"respond returned a Result whose text is {_kind(result.text)}, not a str")
    if not isinstance(result.data, dict) or not all(isinstance(key, str) for key in result.data):
        raise HandlerBug("respond returned a Result whose data is not a dict with str keys")
    if "text" in result.data:
        raise HandlerBug("respond returned a Result whose data has a 'text' key: it would hide the text")
    _json(result.to_json(), "respond returned")
    return result


def _kind(value: Any) -> str:
    """`a str`, `an int`, `None`: a value's type as a message names it."""
    if value is None:
        return "None"
    name = type(value).__name__
    return f"{'an' if name[0].lower() in 'aeiou' else 'a'} {name}"
