"""Fast stand-in handlers for the robustness tests: no torch, behaviour the test can steer.

`Echo` answers each input's text, and lets a request misbehave on purpose through its options:
`delay` (seconds predict sleeps), `poison` (an input equal to it makes predict raise) and `oom`
(predict raises an out-of-memory error on batches larger than it). `Pictures` decodes real images with
the production intake. Every class can be served as `docker-vit serve --handler fake_handlers:Echo`.
"""

from __future__ import annotations

import functools
import io
import os
import sys
import threading
import time
import weakref
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, NamedTuple

from PIL import Image

from docker_vit.handler import Handler, InputError, OptionsError, Result
from docker_vit.images import open_image


class OutOfMemoryError(RuntimeError):
    """Shaped like torch.OutOfMemoryError (a RuntimeError subclass), without needing a GPU."""


class Steer(NamedTuple):
    delay: float = 0.0
    poison: str = ""
    oom: int = 0


class Echo(Handler):
    """Each input's bytes as text; `seen` records every batch predict received (thread-safe append)."""

    name = "echo"
    oom_error: type[Exception] = OutOfMemoryError

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self.seen: list[list[Any]] = []

    def options(self, raw: Mapping[str, Any]) -> Hashable:
        return Steer(float(raw.get("delay", 0)), str(raw.get("poison", "")), int(raw.get("oom", 0)))

    def prepare(self, data: bytes, options: Hashable) -> Any:
        return data.decode("utf-8", errors="replace")

    def predict(self, items: Sequence[Any], options: Hashable) -> Sequence[Any]:
        steer = options if isinstance(options, Steer) else Steer()
        self.seen.append(list(items))
        time.sleep(steer.delay)
        if steer.oom and len(items) > steer.oom:
            raise self.oom_error(f"CUDA out of memory (batch of {len(items)})")
        if steer.poison and steer.poison in items:
            raise ValueError("this input breaks the model")
        return list(items)

    def example(self) -> bytes:
        return b"warm-up"

    def items(self) -> list[Any]:
        """Every item that reached predict, warm-up excluded."""
        return [item for batch in self.seen for item in batch if item != "warm-up"]


class Gated(Echo):
    """predict waits for `gate`, so a test decides when the model is busy and when it frees up."""

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self.gate = threading.Event()
        self.entered = threading.Event()

    def predict(self, items: Sequence[Any], options: Hashable) -> Sequence[Any]:
        if items != ["warm-up"]:
            self.entered.set()
            assert self.gate.wait(30), "the test never opened the gate"
        return super().predict(items, options)


class Pictures(Echo):
    """Decodes with the real image intake and answers the picture's size: the fuzz and soak target."""

    name = "pictures"

    def prepare(self, data: bytes, options: Hashable) -> Any:
        s = self.settings
        width, height = open_image(data, max_bytes=s.max_bytes, max_pixels=s.max_pixels).size
        return f"{width}x{height}"

    def example(self) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buffer, format="PNG")  # fits under the tests' tiny pixel limits
        return buffer.getvalue()

    def items(self) -> list[Any]:
        return [item for batch in self.seen for item in batch][1:]


class Exiting(Echo):
    """A handler that raises what is not an Exception: SystemExit from `predict` when an input is
    "exit", KeyboardInterrupt from `prepare` when it is "interrupt"."""

    def prepare(self, data: bytes, options: Hashable) -> Any:
        if data == b"interrupt":
            raise KeyboardInterrupt
        return super().prepare(data, options)

    def predict(self, items: Sequence[Any], options: Hashable) -> Sequence[Any]:
        if "exit" in items:
            raise SystemExit(4)
        return super().predict(items, options)


class NegativeBatch(Echo):
    max_batch_size = -1


class WordBatch(Echo):
    max_batch_size = "8"  # type: ignore[assignment]


class ZeroBatch(Echo):
    max_batch_size = 0


class OneStringOfNames(Echo):
    option_names = "shout"  # the comma forgotten: a str, not a tuple


class NumberName(Echo):
    name = 7  # type: ignore[assignment]


class RaisingName(Echo):
    @property
    def name(self) -> str:  # type: ignore[override]
        raise RuntimeError("no name yet")


class RaisingBatchSize(Echo):
    @property
    def max_batch_size(self) -> int:  # type: ignore[override]
        raise RuntimeError("no size yet")


class CachedKnobs(Echo):
    """Knobs computed once per instance: Ray's builder, which has only the class, leaves them alone."""

    @functools.cached_property
    def name(self) -> str:  # type: ignore[override]
        return "cached"

    @functools.cached_property
    def max_batch_size(self) -> int:  # type: ignore[override]
        return 4


class NoSettings(Echo):
    def __init__(self) -> None:  # type: ignore[override]  # the interface passes settings
        super().__init__(None)


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no words for it")


LOST_DEVICE = (
    "CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be reported later"
)


class Misbehaving(Echo):
    """Breaks the interface on request: option `mode` (read by `options`, `predict`) or the input text
    (read by `respond`) names the mistake. Any other input echoes. `mode` is the subclasses' default.
    Mode `lost` fails as a GPU whose context a fault poisoned: that call and every later one."""

    mode = ""
    lost = False  # set on the class: a test makes a subclass of its own, `type("X", (Misbehaving,), {})`

    def options(self, raw: Mapping[str, Any]) -> Hashable:
        mode = raw.get("mode", self.mode)
        if mode == "missing":
            return raw["size"]  # KeyError: a field the client left out
        if mode == "unhashable":
            return ["a", "list"]
        if mode == "crash":
            raise RuntimeError("options are broken")
        return mode

    def predict(self, items: Sequence[Any], options: Hashable) -> Any:
        if options == "generator":
            return (item.upper() for item in items)
        if options == "short":
            return list(items)[1:]
        if options == "once":
            return [f"{len(items)} items"]
        if options == "nothing":
            return None
        if options == "stop":
            raise StopIteration  # asyncio cannot carry it in a future
        if options == "timeout":
            raise TimeoutError("the disk was slow")  # not the server's own timeout
        if options == "unprintable":
            raise Unprintable()
        if options == "surrogate":
            raise ValueError("bad byte \udcff here")  # JSON cannot carry a lone surrogate
        if options == "quote":  # a client's mistake, in its own words: a 400 whatever they say
            raise InputError(f"cannot read {items[0]!r}")
        if options == "lost" or type(self).lost:  # as torch words a fault that poisons a GPU's context
            type(self).lost = True  # and so it stays, for every later call
            raise RuntimeError(LOST_DEVICE)
        return list(items)

    def prepare(self, data: bytes, options: Hashable) -> Any:
        if data == b"not-yours":
            raise InputError("this input is the client's mistake")
        return super().prepare(data, options)

    def respond(self, output: Any) -> Any:
        broken = {
            "plain-string": output,
            "number-text": Result(text=123),  # type: ignore[arg-type]
            "nan-data": Result(text="x", data={"score": float("nan")}),
            "object-data": Result(text="x", data={"thing": object()}),
            "text-key": Result(text="x", data={"text": "hidden"}),
            "surrogate": Result(text="a\udcff"),
        }
        if output == "respond-stop":
            raise StopIteration
        if output == "respond-refuses":
            raise InputError("this output says the input was the client's mistake")
        return broken.get(output, Result(text=output))


class Quoting(Misbehaving):
    mode = "quote"  # predict refuses every input as the client's mistake


class RefusesOptions(Echo):
    """Finds this run's options out of bounds (an OptionsError, a server's 422): in `prepare` for every
    input (STAGE=prepare) or for the input `odd` (STAGE=one), or in `predict` (STAGE=predict)."""

    def prepare(self, data: bytes, options: Hashable) -> Any:
        stage = os.environ.get("STAGE")
        if stage == "prepare" or (stage == "one" and data == b"odd"):
            raise OptionsError("this option does not fit this image")
        return super().prepare(data, options)

    def predict(self, items: Sequence[Any], options: Hashable) -> Sequence[Any]:
        if os.environ.get("STAGE") == "predict":
            raise OptionsError("num_beams must be 1..8 for this model")
        return super().predict(items, options)


class BadDescribe(Echo):
    def describe(self) -> dict[str, Any]:
        raise SystemExit("describe exits")


class StopInLoad(Echo):
    def load(self) -> None:
        raise StopIteration


class OwnFields(Echo):
    """Refuses any field but its own, as a strict handler may."""

    option_names = ("shout",)

    def options(self, raw: Mapping[str, Any]) -> Hashable:
        if set(raw) - {"shout"}:
            raise OptionsError(f"unknown fields {sorted(set(raw) - {'shout'})}")
        return bool(raw.get("shout"))


class OptionsCrash(Misbehaving):
    mode = "crash"


class OptionsUnhashable(Misbehaving):
    mode = "unhashable"


class ShortPredict(Misbehaving):
    mode = "short"


class OncePerBatch(Misbehaving):
    mode = "once"


class NeedsAField(Misbehaving):
    """Its options need a field the warm-up (no fields) lacks; it keeps the default (PNG) example()."""

    mode = "missing"
    example = Handler.example


class TextOnly(Echo):
    """A text handler that kept the default (PNG) `example()`: its warm-up cannot decode it."""

    def prepare(self, data: bytes, options: Hashable) -> Any:
        return data.decode("utf-8")

    example = Handler.example


class SlowBig(Echo):
    """Preparing an input named `big...` takes a while; `prepared` records the order inputs finish."""

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self.prepared: list[str] = []

    def prepare(self, data: bytes, options: Hashable) -> Any:
        text = data.decode()
        if text.startswith("big"):
            time.sleep(0.3)
        self.prepared.append(text)
        return text


class SlowLoad(Echo):
    """A model that takes half a minute to load."""

    def load(self) -> None:
        print("slow load started", file=sys.stderr, flush=True)  # tests wait for this line
        time.sleep(30)


class DescribesItsModel(Echo):
    """describe() reads what load() sets, and load() waits for `loaded` (a test decides when)."""

    loaded = threading.Event()

    def load(self) -> None:
        assert self.loaded.wait(30), "the test never let the load finish"
        self.weights = "w1"

    def describe(self) -> dict[str, Any]:
        return {"weights": self.weights}  # only its own: the server keeps the name and class


class Held:
    """An object a test can watch die (through a WeakSet)."""


class Holding(Echo):
    """`prepare` and `predict` hold a `Held` in their frames while they work; `prepare` refuses the
    input `bad`, `predict` fails on Echo's poison: a failed request must let go of everything it held
    (its bytes, decoded pixels, tensors) without waiting for the cycle collector."""

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self.held: weakref.WeakSet[Held] = weakref.WeakSet()

    def prepare(self, data: bytes, options: Hashable) -> Any:
        held = Held()
        self.held.add(held)
        if data == b"bad":
            raise InputError("not an image")
        return super().prepare(data, options)

    def predict(self, items: Sequence[Any], options: Hashable) -> Sequence[Any]:
        held = Held()
        self.held.add(held)
        return super().predict(items, options)


class Stuck(Echo):
    """The input `stuck` never comes back from `prepare`; `answer-stuck` never from `respond`. With
    STUCK_MARK set, `prepare` creates that file before it hangs (a test's cue)."""

    def prepare(self, data: bytes, options: Hashable) -> Any:
        if data == b"stuck":
            if os.environ.get("STUCK_MARK"):
                open(os.environ["STUCK_MARK"], "w").close()
            threading.Event().wait()
        return super().prepare(data, options)

    def respond(self, output: Any) -> Result:
        if output == "answer-stuck":
            threading.Event().wait()
        return super().respond(output)


class StuckExample(Echo):
    """The warm-up's input never comes: the model never becomes ready."""

    def example(self) -> bytes:
        threading.Event().wait()
        return b""


class StuckDescribe(Echo):
    """`describe()` never comes back: only `/v1/model` asks it."""

    def describe(self) -> dict[str, Any]:
        threading.Event().wait()
        return {}


class AsyncPrepare(Echo):
    """`async def` where a plain method is called from a thread: the coroutine would never run."""

    async def prepare(self, data: bytes, options: Hashable) -> Any:  # type: ignore[override]
        return data.decode()


class OnlyPredicts(Handler):
    def predict(self, items, options):
        return list(items)


class PreparesInInit(OnlyPredicts):
    def __init__(self, settings) -> None:
        super().__init__(settings)
        self.prepare = lambda data, options: data  # set on the instance: as good as a method


class Closing(Echo):
    """Records its calls and their threads in `calls` (on the class: the CLI makes its own instance);
    `close_fails` and `load_fails` steer it, `gate` (when set to an Event) holds predict until set."""

    calls: list[tuple[str, str]] = []
    close_fails = False
    close_interrupts = False
    load_fails = False
    predict_fails = False
    gate: threading.Event | None = None

    def _note(self, what: str) -> None:
        type(self).calls.append((what, threading.current_thread().name))

    def load(self) -> None:
        self._note("load")
        if self.load_fails:
            raise OSError("no weights here")

    def predict(self, items: Sequence[Any], options: Hashable) -> Sequence[Any]:
        self._note("predict")
        if self.gate is not None:
            self.gate.wait(10)
        self._note("predicted")
        if self.predict_fails:
            raise ValueError("this model is broken")
        return super().predict(items, options)

    def close(self) -> None:
        self._note("close")
        if self.close_fails:
            raise RuntimeError("the socket is gone")
        if self.close_interrupts:
            raise KeyboardInterrupt  # Ctrl-C while it runs


class AsyncClose(Echo):
    async def close(self) -> None:  # type: ignore[override]
        pass


def traced(method: Any) -> Any:
    """A decorator as most are written (functools.wraps): the method it wraps stays async."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return method(*args, **kwargs)

    return wrapper


class DecoratedAsyncLoad(Echo):
    @traced
    async def load(self) -> None:  # type: ignore[override]
        pass


class AsyncGeneratorClose(Echo):
    async def close(self):  # type: ignore[override]
        yield


class DescribesOptions(Echo):
    """describe() naming `options`: what `caption --url` sends by stays the handler's option_names."""

    option_names = ("delay",)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "options": ["zzz"], "handler": "mine"}


class BrokenInit(Echo):
    """A handler whose constructor fails, in words that name another flag."""

    def __init__(self, settings: Any) -> None:
        raise RuntimeError("set --model to a folder")
