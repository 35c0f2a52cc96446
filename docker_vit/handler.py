"""The one interface between Docker-ViT and a model.

The server, the CLI and the Ray and Runpod adapters only ever talk to a `Handler`, through the checked
calls of calls.py (the batcher only to `predict`, as a plain callable); loader.py imports and checks the
configured one. The captioner is one handler; a user's model is another (`--handler module:Class`).

A request travels through a handler in three stages, so that CPU and device work overlap:
`prepare` (CPU, in a thread pool, one input), `predict` (the device, one batch of items that share
the same options) and `respond` (CPU, one output). `load` runs once, before any of them, and `close`
once, after the last `predict`.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from docker_vit.abandon import Abandoned, stop_if_abandoned
from docker_vit.config import Settings
from docker_vit.errors import ImageError, InputError, OptionsError, TooLarge
from docker_vit.images import open_image

__all__ = [
    "Abandoned",
    "Handler",
    "HandlerBug",
    "HandlerError",
    "ImageError",
    "InputError",
    "OptionsError",
    "Result",
    "TooLarge",
    "shown",
    "stop_if_abandoned",
]


def shown(value: Any, limit: int = 60) -> str:
    """A client's value as an error message quotes it: whole when short, cut when it could be megabytes."""
    try:
        text = repr(value)
    except RecursionError:  # a JSON value nested nearly as deep as the parser goes (~1,000 levels)
        text = f"a {type(value).__name__} nested too deep to show"
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


class HandlerError(ValueError):
    """`--handler` names nothing that can be served; the CLI prints it instead of a traceback. A message
    that names the setting itself keeps the words `around` it, so that each front end names the setting
    as its user set it (`said_as`): the flag, the variable, Ray's argument."""

    def __init__(self, message: str, around: tuple[str, str] | None = None) -> None:
        super().__init__(message)
        self.around = around  # the words before and after the setting's name, where the message names it

    @classmethod
    def of_setting(cls, before: str, after: str) -> HandlerError:
        """A message naming the setting itself, which each front end spells as its user set it."""
        return cls(f"{before}--handler{after}", (before, after))

    def said_as(self, name: str) -> str:
        """The message with the setting called `name` (a variable, Ray's argument); a handler's own
        words, quoted after it, stay as they are."""
        return str(self) if self.around is None else name.join(self.around)


class HandlerBug(RuntimeError):
    """A handler broke the interface (an unhashable options value, a wrong output count, a `respond`
    that is no JSON-able Result): the model's failure (500), never the client's."""


@dataclass
class Result:
    """What one input becomes: `text` answers `POST /`; `text` and `data` make its JSON entry."""

    text: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, **self.data}


class Handler:
    """Base class for models served by Docker-ViT. Override `prepare` and `predict` (they have no
    default), and `load` where the model is loaded once before serving.

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
        """Run the model on a batch; return one output per item, in order. A long one may call
        `stop_if_abandoned()` (from this module) between its steps, to stop once nobody waits for it."""
        raise NotImplementedError(f"{type(self).__name__} does not implement predict()")

    def respond(self, output: Any) -> Result:
        """Turn one output into the answer a client gets."""
        return Result(text=str(output))

    def close(self) -> None:
        """Give back what `load` took that the process's exit would not (a child process, a temporary
        folder, a session on another server). Runs once as serving ends (a server's shutdown, the end
        of a `caption` run), after the last `predict` and on its thread; only after a `load` that
        returned. A server waits for it, and for a model call still running before it, at most 10 s."""

    def open_image(
        self, data: bytes, draft: int | None = None, then: Callable[[Image.Image], Any] | None = None
    ) -> Any:
        """The server's own image intake and limits (`--max-bytes`, `--max-pixels`), for vision handlers:
        an RGB image, or what `then` makes of it within the decode's memory budget (a preprocess)."""
        s = self.settings
        return open_image(data, max_bytes=s.max_bytes, max_pixels=s.max_pixels, draft=draft, then=then)

    def example(self) -> bytes:
        """An input for the warm-up call that proves the model works before `/readyz` says so."""
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), (120, 140, 160)).save(buffer, format="PNG")
        return buffer.getvalue()
