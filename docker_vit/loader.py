"""Which handler to serve: the captioner, or a user's `--handler module:Class`, imported and checked
before the first request, so that a mistake in it is one line at start-up, not a 500 later."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any

from docker_vit.config import Settings
from docker_vit.handler import Handler, HandlerError


def load_handler(settings: Settings) -> Handler:
    """Build the configured handler: the captioner, or a user's `module:Class`.

    The current folder is importable, so `--handler examples.my_model:MyModel` works from a checkout.
    """
    cls = handler_class(settings)
    try:
        handler = cls(settings)
    except (Exception, SystemExit) as exc:  # SystemExit too: it would end the command without a word
        failed = f"{type(exc).__name__}: {exc}"
        if not settings.handler:  # the default captioner: no setting of the user's to name
            raise HandlerError(f"{cls.__name__}: {failed}") from None
        raise HandlerError.of_setting("", f" {settings.handler}: {failed}") from None
    check_attributes(handler)  # refuse mistakes now, not at the first request
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
        raise HandlerError.of_setting(
            "",
            f" names a module, not a file: {dotted.replace(os.sep, '.')}:{class_name or 'Class'} "
            f"(importable from the current folder or PYTHONPATH), not {settings.handler}",
        )
    if not module_name or not class_name:
        raise HandlerError.of_setting("", f" must look like module:Class, got {settings.handler!r}")
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except AttributeError:
        raise HandlerError.of_setting("", f" {settings.handler}: {module_name} has no {class_name}") from None
    except (Exception, SystemExit) as exc:  # not found, or raised while importing: the module is unusable
        raise HandlerError.of_setting(
            f"cannot import {module_name} for ", f" {settings.handler}: {type(exc).__name__}: {exc}"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, Handler)):
        raise HandlerError.of_setting("", f" {settings.handler} is not a docker_vit.handler.Handler subclass")
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
    methods = ("load", "options", "prepare", "predict", "respond", "example", "describe", "close")
    asynchronous = [m for m in methods if _is_async(getattr(handler, m, None))]
    if asynchronous:  # called in threads, a coroutine would never run: a puzzle at the first request
        raise HandlerError(
            f"{cls.__name__}.{asynchronous[0]} is an async def: handler methods are plain functions "
            "(the server runs them in threads)"
        )


def _is_async(method: Any) -> bool:
    """An `async def` (a coroutine or an async generator). A `functools.wraps` decorator is judged as
    it is: a plain wrapper may run the coroutine itself (`asyncio.run`, asgiref's `async_to_sync`);
    one that returns it unrun is caught by `sync_result` when load or close is called."""
    method = getattr(method, "__func__", method)
    return inspect.iscoroutinefunction(method) or inspect.isasyncgenfunction(method)


def sync_result(name: str, result: Any) -> Any:
    """What `load()` or `close()` returned, refused when it is a coroutine or async generator never run
    (an async def behind a decorator): it would otherwise do nothing, silently."""
    if inspect.iscoroutine(result) or inspect.isasyncgen(result):
        if inspect.iscoroutine(result):
            result.close()  # no "coroutine was never awaited" warning at exit
        raise HandlerError(
            f"{name}() returned {type(result).__name__} that never ran: handler methods are plain "
            "functions (an async def behind a decorator too)"
        )
    return result


def check_attributes(handler: Handler) -> None:
    """Refuse a handler whose methods, `name`, `option_names` or `max_batch_size` no front end could use."""
    check_methods(handler)
    title = type(handler).__name__
    try:  # properties, maybe: what they raise is the handler's error, said in one line
        name, names, size = handler.name, handler.option_names, handler.max_batch_size
    except Exception as exc:
        raise HandlerError(
            f"{title}: reading name, option_names or max_batch_size raised {type(exc).__name__}: {exc}"
        ) from None
    check_knobs(title, name, names, size)


def check_class_knobs(cls: type[Handler]) -> int | None:
    """Ray's builder has a class, not a handler: check the knobs it sets as class attributes (a
    property, or any descriptor, is read per instance, by the replicas), so that a mistake is one line
    from `serve run` rather than a traceback from every replica it starts. Returns its own
    `max_batch_size`."""
    unread = {"name": "", "option_names": None, "max_batch_size": None}  # what passes, for a descriptor
    name, names, size = (
        unread[knob] if hasattr(inspect.getattr_static(cls, knob), "__get__") else getattr(cls, knob)
        for knob in unread
    )
    check_knobs(cls.__name__, name, names, size)
    return size


def check_knobs(title: str, name: Any, names: Any, size: Any) -> None:
    """Refuse a `name`, `option_names` or `max_batch_size` (of class `title`) no front end could use."""
    if not isinstance(name, str):
        raise HandlerError(f"{title}.name must be a str, got {name!r}")
    if names is not None and not (isinstance(names, tuple | list) and all(isinstance(n, str) for n in names)):
        raise HandlerError(f"{title}.option_names must be a tuple or a list of str, or None; got {names!r}")
    own_batch_size(size, title)


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
