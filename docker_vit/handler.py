"""The one interface between Docker-ViT and a model.

The server, the CLI and the Ray and Runpod adapters only ever talk to a `Handler` (the batcher only to
its `predict`, as a plain callable). The captioner is one handler; a user's model is another
(`docker-vit serve --handler module:Class`).

A request travels through a handler in three stages, so that CPU and device work overlap:
`prepare` (CPU, in a thread pool, one input), `predict` (the device, one batch of items that share
the same options) and `respond` (CPU, one output). `load` runs once, before anything else.
"""

from __future__ import annotations

import importlib
import inspect
import io
import json
import os
import sys
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from docker_vit.calls import WrongOutputs, contained
from docker_vit.config import Settings
from docker_vit.images import ImageError, InputError, TooLarge, open_image

__all__ = [
    "Handler",
    "HandlerBug",
    "HandlerError",
    "ImageError",
    "InputError",
    "OptionsError",
    "Result",
    "TooLarge",
]


class OptionsError(ValueError):
    """A request's options are out of bounds or malformed (HTTP 422)."""


def shown(value: Any, limit: int = 60) -> str:
    """A client's value as an error message quotes it: whole when short, cut when it could be megabytes."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


class HandlerError(ValueError):
    """`--handler` names nothing that can be served; the CLI prints it instead of a traceback."""


class HandlerBug(RuntimeError):
    """A handler broke the interface (an unhashable options value, a wrong output count, a `respond`
    that is no JSON-able Result): the model's failure (500), never the client's."""


class WrongCount(HandlerBug, WrongOutputs):
    """`predict` gave another number of outputs than it got items (one per batch, say)."""


@dataclass
class Result:
    """What one input becomes: `text` answers `POST /`; `text` and `data` make its JSON entry."""

    text: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, **self.data}


class Handler:
    """Base class for models served by Docker-ViT. Override `load`, `prepare` and `predict`.

    `max_batch_size` caps how many items `predict` receives at once; None defers to the server's
    `--max-batch-size`. `option_names` lists the request fields `options` reads: the Runpod worker
    refuses a job with any other field; None hands every field to `options`.
    """

    name: str = "handler"
    max_batch_size: int | None = None
    option_names: tuple[str, ...] | None = None

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def load(self) -> None:
        """Load weights once, on the thread that later runs `predict`, while the server answers probes."""

    def describe(self) -> dict[str, Any]:
        """What `GET /v1/model` shows."""
        return {"model": self.name, "handler": f"{type(self).__module__}:{type(self).__qualname__}"}

    def options(self, raw: Mapping[str, Any]) -> Hashable:
        """Validate one request's options; items with equal options may share a batch."""
        return ()

    def prepare(self, data: bytes, options: Hashable) -> Any:
        """Turn one request's input bytes into a model-ready item (raise InputError or ImageError for
        input that is the client's mistake: a 400 or a 415, not a 500)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement prepare()")

    def predict(self, items: Sequence[Any], options: Hashable) -> Sequence[Any]:
        """Run the model on a batch; return one output per item, in order."""
        raise NotImplementedError(f"{type(self).__name__} does not implement predict()")

    def respond(self, output: Any) -> Result:
        """Turn one output into the answer a client gets."""
        return Result(text=str(output))

    def open_image(self, data: bytes, draft: int | None = None) -> Image.Image:
        """The server's own image intake and limits (`--max-bytes`, `--max-pixels`), for vision handlers."""
        s = self.settings
        return open_image(data, max_bytes=s.max_bytes, max_pixels=s.max_pixels, draft=draft)

    def example(self) -> bytes:
        """An input for the warm-up call that proves the model works before `/readyz` says so."""
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), (120, 140, 160)).save(buffer, format="PNG")
        return buffer.getvalue()


def load_handler(settings: Settings) -> Handler:
    """Build the configured handler: the captioner, or a user's `module:Class`.

    The current folder is importable, so `--handler examples.my_model:MyModel` works from a checkout.
    """
    cls = handler_class(settings)
    try:
        handler = cls(settings)
    except (Exception, SystemExit) as exc:  # SystemExit too: it would end the command without a word
        raise HandlerError(f"--handler {settings.handler}: {type(exc).__name__}: {exc}") from None
    check_attributes(handler, settings)  # refuse mistakes now, not at the first request
    return handler


def handler_class(settings: Settings) -> type[Handler]:
    """The configured handler's class, imported but not built (building one may touch the device)."""
    if not settings.handler:
        from docker_vit.captioner import Captioner

        return Captioner
    module_name, _, class_name = (part.strip() for part in settings.handler.partition(":"))
    if module_name.endswith(".py"):  # a file name: the module is its dotted path without .py
        path = os.path.relpath(module_name)
        dotted = (os.path.basename(path) if path.startswith("..") else path).removesuffix(".py")
        raise HandlerError(
            f"--handler names a module, not a file: {dotted.replace(os.sep, '.')}:{class_name or 'Class'} "
            f"(importable from the current folder or PYTHONPATH), not {settings.handler}"
        )
    if not module_name or not class_name:
        raise HandlerError(f"--handler must look like module:Class, got {settings.handler!r}")
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except AttributeError:
        raise HandlerError(f"--handler {settings.handler}: {module_name} has no {class_name}") from None
    except (Exception, SystemExit) as exc:  # not found, or raised while importing: the module is unusable
        raise HandlerError(
            f"cannot import {module_name} for --handler {settings.handler}: {type(exc).__name__}: {exc}"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, Handler)):
        raise HandlerError(f"{settings.handler} is not a docker_vit.handler.Handler subclass")
    return cls


def check_methods(handler: Handler | type[Handler]) -> None:
    """Refuse a handler missing `prepare` or `predict`, or with an async method. Given a class (Ray's
    builder has no instance), a method its own `__init__` might set is not called missing."""
    cls = handler if isinstance(handler, type) else type(handler)
    if handler is not cls or cls.__init__ is Handler.__init__:
        missing = [
            m for m in ("prepare", "predict") if _inherited(getattr(handler, m, None), getattr(Handler, m))
        ]
        if missing:
            raise HandlerError(f"{cls.__name__} does not implement {' or '.join(m + '()' for m in missing)}")
    methods = ("load", "options", "prepare", "predict", "respond", "example", "describe")
    asynchronous = [m for m in methods if inspect.iscoroutinefunction(getattr(handler, m, None))]
    if asynchronous:  # called in threads, a coroutine would never run: a puzzle at the first request
        raise HandlerError(
            f"{cls.__name__}.{asynchronous[0]} is an async def: handler methods are plain functions "
            "(the server runs them in threads)"
        )


def check_attributes(handler: Handler, settings: Settings) -> None:
    """Refuse a handler whose methods, `name`, `option_names` or `max_batch_size` no front end could use."""
    check_methods(handler)
    title = type(handler).__name__
    try:
        name, names = handler.name, handler.option_names
    except Exception as exc:
        raise HandlerError(
            f"{title}: reading name or option_names raised {type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(name, str):
        raise HandlerError(f"{title}.name must be a str, got {name!r}")
    if names is not None and not (isinstance(names, tuple | list) and all(isinstance(n, str) for n in names)):
        raise HandlerError(f"{title}.option_names must be a tuple of str or None, got {names!r}")
    batch_size(handler, settings)


def _inherited(method: Any, base: Any) -> bool:
    """Whether `method` (read from a handler, so set in its `__init__` counts) is the base class's."""
    return getattr(method, "__func__", method) is base


def batch_size(handler: Handler, settings: Settings) -> int:
    """The most items `handler.predict` receives: its own `max_batch_size`, else the setting's."""
    return own_batch_size(handler.max_batch_size, type(handler).__name__) or settings.max_batch_size


def own_batch_size(size: Any, title: str) -> int | None:
    """A handler's `max_batch_size` (of class `title`), checked: a positive int, or None for the setting's."""
    if size is not None and (type(size) is not int or size < 1):
        raise HandlerError(f"{title}.max_batch_size must be a positive int, got {size!r}")
    return size


# Every front end (server, Runpod, Ray, `docker-vit caption`) calls a handler through these, so a
# handler's mistake is answered the same way everywhere.


def read_options(handler: Handler, raw: Mapping[str, Any]) -> Hashable:
    """`handler.options(raw)`. The fields come from the client, so what a handler raises on them as a
    ValueError, TypeError or LookupError (a missing field) is the client's error: OptionsError (422)."""
    try:
        options = contained(handler.options, raw)
    except OptionsError:
        raise
    except (ValueError, TypeError, OverflowError, LookupError) as exc:
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
        each = iter(outputs)
    except TypeError:
        raise HandlerBug(f"predict returned a {type(outputs).__name__}, not a sequence") from None
    outputs = contained(list, each)  # a generator's own errors keep their names
    if len(outputs) != count:
        raise WrongCount(f"predict returned {len(outputs)} outputs for {count} items")
    return outputs


def description(handler: Handler) -> dict[str, Any]:
    """`handler.describe()`, checked to be a JSON object."""
    info = contained(handler.describe)
    if not isinstance(info, dict) or not all(isinstance(key, str) for key in info):
        raise HandlerBug(f"describe returned a {type(info).__name__}, not a dict with str keys")
    _json(info, "describe returned")
    return info


def generation_defaults(info: Mapping[str, Any]) -> dict[str, Any]:
    """The captioner's generation defaults from its description (`/v1/model`); nothing for other
    handlers. Caption records carry them, so that a record says how it was made."""
    generation = info.get("generation")
    if not isinstance(generation, dict):
        return {}
    return {name: generation[name] for name in ("num_beams", "max_new_tokens") if name in generation}


def _json(value: Any, what: str) -> None:
    try:
        json.dumps(value, allow_nan=False, ensure_ascii=False).encode()
    except (TypeError, ValueError, RecursionError) as exc:  # UnicodeEncodeError: a lone surrogate
        raise HandlerBug(f"{what} something that is not JSON: {exc}") from None


def respond(handler: Handler, output: Any) -> Result:
    """`handler.respond(output)`, checked to be a Result that every front end can send as JSON."""
    result = contained(handler.respond, output)
    if not isinstance(result, Result):
        raise HandlerBug(f"respond returned a {type(result).__name__}, not a Result")
    if not isinstance(result.text, str):
        raise HandlerBug(f"respond returned a Result whose text is a {type(result.text).__name__}")
    if not isinstance(result.data, dict) or not all(isinstance(key, str) for key in result.data):
        raise HandlerBug("respond returned a Result whose data is not a dict with str keys")
    if "text" in result.data:
        raise HandlerBug("respond returned a Result whose data has a 'text' key: it would hide the text")
    _json(result.to_json(), "respond returned")
    return result
