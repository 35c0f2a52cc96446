"""Handlers for the folder-captioning tests: no torch, deterministic captions, countable model calls.

Usable in-process (`--handler folder_handlers:Digest` with tests/ on sys.path, as pytest has it) and
from a subprocess (PYTHONPATH=tests).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, ClassVar

from docker_vit.handler import Handler, OptionsError
from docker_vit.images import open_image


class Digest(Handler):
    """Captions a picture by a digest of its pixels, with the real image intake in front.

    `batches` records the size of every predict call of every instance (tests clear it).
    """

    name = "digest"
    batches: ClassVar[list[int]] = []

    def prepare(self, data: bytes, options: Hashable) -> Any:
        s = self.settings
        image = open_image(data, max_bytes=s.max_bytes, max_pixels=s.max_pixels)
        return hashlib.sha1(image.tobytes()).hexdigest()[:12]

    def predict(self, items: Sequence[Any], options: Hashable) -> Sequence[Any]:
        Digest.batches.append(len(items))
        return [f"picture {item}" for item in items]


class Mute(Digest):
    """Takes no options at all, and cannot say what it is: its describe() fails."""

    def options(self, raw: Mapping[str, Any]) -> Hashable:
        if raw:
            raise OptionsError(f"takes no options, got {sorted(raw)}")
        return None

    def describe(self) -> dict[str, Any]:
        raise RuntimeError("describe is broken")


class Versioned(Mute):
    """Takes no options, and names its model by an id and a revision: `/v1/model`'s `model` is then
    no string, which a handler's describe() may make it."""

    def describe(self) -> dict[str, Any]:
        return {"model": {"id": "digest", "revision": "abc123"}}


class Lines(Digest):
    """Captions of several lines, as a model that writes markdown gives them."""

    def predict(self, items: Sequence[Any], options: Hashable) -> Sequence[Any]:
        return [f"# {caption}\r\n\nbody\n" for caption in super().predict(items, options)]


class Slow(Digest):
    """A quarter of a second per batch: slow enough for a test to interrupt a run midway."""

    def predict(self, items: Sequence[Any], options: Hashable) -> Sequence[Any]:
        time.sleep(0.25)
        return super().predict(items, options)


class Fussy(Digest):
    """The model fails on any batch holding the picture whose digest is in `refused` (tests set it)."""

    refused: ClassVar[set[str]] = set()

    def predict(self, items: Sequence[Any], options: Hashable) -> Sequence[Any]:
        if Fussy.refused & set(items):
            raise RuntimeError("this picture breaks the model")
        return super().predict(items, options)


class Broken(Digest):
    """A model that fails on everything (a wrong device, say)."""

    def predict(self, items: Sequence[Any], options: Hashable) -> Sequence[Any]:
        Digest.batches.append(len(items))
        raise RuntimeError("no such device")


class DeviceLost(Digest):
    """A GPU whose context a fault poisoned: torch's words for it, on every call."""

    def predict(self, items: Sequence[Any], options: Hashable) -> Sequence[Any]:
        Digest.batches.append(len(items))
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


class LostLater(Digest):
    """Out of memory above two pictures; a batch holding a picture whose digest is in `fatal` (tests
    set it) poisons the GPU, which fails every call after it."""

    fatal: ClassVar[set[str]] = set()
    lost: ClassVar[bool] = False

    def predict(self, items: Sequence[Any], options: Hashable) -> Sequence[Any]:
        if len(items) > 2 and not LostLater.lost:
            Digest.batches.append(len(items))
            raise RuntimeError(f"out of memory (batch of {len(items)})")
        if LostLater.lost or LostLater.fatal & set(items):
            Digest.batches.append(len(items))
            LostLater.lost = True
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return super().predict(items, options)


class PrepareSaysCuda(Digest):
    """`prepare` (on the CPU) fails on the picture whose digest is in `fatal` with words that name
    CUDA: a lost device is `predict`'s to tell, as on a server."""

    fatal: ClassVar[set[str]] = set()

    def prepare(self, data: bytes, options: Hashable) -> Any:
        item = super().prepare(data, options)
        if item in PrepareSaysCuda.fatal:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return item


class Strict(Digest):
    """Says nothing of its option names, and refuses any field it does not know."""

    def options(self, raw: Any) -> Hashable:
        unknown = sorted(set(raw) - {"shade"})
        if unknown:
            raise OptionsError(f"unknown option(s): {unknown}")
        return ()


class Shaded(Digest):
    """Reads one option of its own, and says so."""

    option_names = ("shade",)

    def options(self, raw: Any) -> Hashable:
        return str(raw.get("shade", "plain"))


class Beamed(Digest):
    """Reads num_beams itself, with a default of its own (1): a run that does not set it must get that."""

    option_names = ("num_beams", "top_k")

    def options(self, raw: Any) -> Hashable:
        return int(raw.get("num_beams", 1))

    def predict(self, items: Sequence[Any], options: Hashable) -> Sequence[Any]:
        return [f"{caption} at {options} beams" for caption in super().predict(items, options)]


class Lingering(Digest):
    """Starts a thread of its own that never ends (not a daemon: a normal exit would join it for ever),
    and marks the file named by LINGER_MARK once a batch is on the model."""

    def load(self) -> None:
        import threading

        threading.Thread(target=threading.Event().wait, name="handler-own").start()

    def predict(self, items: Sequence[Any], options: Hashable) -> Sequence[Any]:
        import os
        from pathlib import Path

        Path(os.environ["LINGER_MARK"]).touch()
        time.sleep(30)
        return super().predict(items, options)


class PrepareBroken(Digest):
    """A handler whose `prepare` fails on every file: its bug, not the files' (a server answers 500)."""

    def prepare(self, data: bytes, options: Hashable) -> Any:
        raise RuntimeError("no such table")


class PrepareMissingFile(Digest):
    """A handler whose `prepare` reads a file of its own that is not there: an OSError, but the
    handler's, not the image's."""

    def prepare(self, data: bytes, options: Hashable) -> Any:
        raise FileNotFoundError(2, "No such file or directory", "/nonexistent/vocab.txt")


class RespondBroken(Digest):
    """A handler whose `respond` hands back a str: its bug, which no run of the model would mend."""

    def respond(self, output: Any) -> Any:
        return str(output)


class Consuming(Digest):
    """Takes its batch's items off the list as it goes (a queue of work), and fails on a picture in
    `Fussy.refused`: the list it was given is empty, or half gone, when it raises."""

    def predict(self, items: Sequence[Any], options: Hashable) -> Sequence[Any]:
        done = []
        while items:
            item = items.pop(0)  # type: ignore[attr-defined]
            if item in Fussy.refused:
                raise RuntimeError("this picture breaks the model")
            done.append(f"picture {item}")
        return done
