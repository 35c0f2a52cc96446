"""What `docker-vit caption`'s two runners (local.py: a model in this process; client.py: a server at
`--url`) hand folder.py, which writes the records of the images walk.py found: one `Outcome` per image, a
batch at a time, or a `CaptionError` that ends the run; and what both share to make them (reading a
file within its limit, saying why one was skipped, the generation defaults a record carries)."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any

from docker_vit.config import GENERATION, flag_name
from docker_vit.errors import CLIENT_ERRORS, InputError, TooLarge


class CaptionError(Exception):
    """The run cannot go on (the model failed, the server is unreachable); what is written stays."""


@dataclass
class Outcome:
    """One image's fate: its record when captioned, or why it was skipped."""

    path: str
    entry: dict[str, Any] | None = None
    error: str | None = None
    broke: bool = False  # the model failed on it (a 500), rather than refusing it


Runner = Callable[[list[str]], Generator[list[Outcome], None, None]]
GIVE_UP_AFTER = 3  # batches (of a server's: --concurrency images) in a row in which the model failed on all


def read_file(path: str, limit: int, servers: bool = False) -> bytes:
    """An image file's bytes, read no further than `limit` (a 3 GB file, a link to /dev/zero); what is
    no regular file is refused unopened (opening a FIFO would wait for a writer for ever). `servers`:
    the limit is a server's, which no flag of this run raises."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise InputError("not a regular file")
    with open(path, "rb") as file:
        data = file.read(limit + 1)
    if len(data) > limit:
        if servers:
            raise TooLarge(f"the file is over the server's limit of {limit} bytes")
        raise TooLarge(f"the file is over the limit of {limit} bytes", "max_bytes")
    return data


def describe_error(exc: BaseException) -> str:
    """Why a file was skipped, without repeating its path."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, TooLarge) and exc.setting:  # a photo of 48 megapixels, say: the user may allow it
        return f"{exc} ({flag_name(exc.setting)} raises it)"
    return str(exc) if isinstance(exc, CLIENT_ERRORS) else f"{type(exc).__name__}: {exc}"


def generation_defaults(info: Mapping[str, Any]) -> dict[str, Any]:
    """The captioner's generation defaults from its description (`/v1/model`); nothing for other
    handlers. Caption records carry them, so that a record says how it was made."""
    generation = info.get("generation")
    if not isinstance(generation, dict):
        return {}
    return {name: generation[name] for name in GENERATION if name in generation}
