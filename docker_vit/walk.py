"""Which files of the paths given to `docker-vit caption` are images: files as given, folders walked.

The order is stable (sorted names, each folder once), so a rerun finds the same strings and resumes.
"""

from __future__ import annotations

import os
import stat
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

IMAGE_EXTENSIONS = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".jpe",
        ".jfif",
        ".mpo",
        ".png",
        ".apng",
        ".gif",
        ".webp",
        ".bmp",
        ".tif",
        ".tiff",
        ".ico",
        ".ppm",
        ".pgm",
        ".pbm",
        ".pnm",
        ".tga",
    }
)  # what the intake decodes (images.FORMATS)
# Pictures the intake does not decode (HEIC needs a plugin, RAW a developer, AVIF a size check): passed
# over, but counted, so that a phone's folder does not end in a bare "no images found".
OTHER_PICTURES = frozenset(
    {".heic", ".heif", ".avif", ".jxl", ".jp2", ".svg", ".psd"}
    | {".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf", ".orf", ".rw2", ".pef"}  # cameras' RAW
)


def find_images(
    paths: Sequence[str], warn: Callable[[str], None], passed: Counter[str] | None = None
) -> list[str]:
    """Files as given; folders walked, sorted, image extensions only, hidden entries left out;
    `passed` counts the pictures in a folder that the intake does not read, by extension.

    Each folder is entered once (by device and inode), so symlink loops end. Paths are normalized and
    joined under the argument as given, so the same command finds the same strings again. An image
    named twice (`a.jpg $PWD/a.jpg`, a folder and a file in it) is found once, by its first name.
    """
    found: dict[str, str] = {}  # an image's place (`Places`): the first name it was found by
    place = Places()
    visited: set[tuple[int, int]] = set()
    passed = Counter() if passed is None else passed
    for argument in paths:
        path = _tidied(argument)
        try:  # said now, not after a model load (a download, even) for nothing; as given, as `ls` has
            folder = stat.S_ISDIR(os.stat(argument).st_mode)  # it: "" is no folder, "a.jpg/" no file
        except OSError as exc:  # missing, a folder on the way that cannot be searched, a name too long
            warn(f"skipping {argument or repr(argument)}: {exc.strerror or exc}")
            continue
        for image in _walk(path, visited, warn, passed) if folder else [path]:
            found.setdefault(place(image), image)  # `a.jpg $PWD/a.jpg`: one image, captioned once
    return list(found.values())


def _tidied(path: str) -> str:
    """`os.path.normpath` but for `..`: `link/..` is the parent of the link's target, not the folder
    holding the link, so a `..` after a name is kept as the OS reads it."""
    if ".." not in path.split(os.sep):
        return os.path.normpath(path)
    head = os.sep if path.startswith(os.sep) else ""
    parts = [part for part in path.split(os.sep) if part not in ("", ".")]
    return head + os.sep.join(parts) if parts else (head or ".")


def _walk(
    root: str, visited: set[tuple[int, int]], warn: Callable[[str], None], passed: Counter[str]
) -> Iterator[str]:
    """Depth first with a stack of iterators, not recursion: a tree deeper than Python's recursion
    limit (or a long chain of links) is walked all the same."""
    stack = [iter([root])]
    while stack:
        path = next(stack[-1], None)
        if path is None:
            stack.pop()
        elif os.path.isdir(path):
            entries = _entries(path, visited, warn)
            stack.append(iter([os.path.join(path, name) for name in entries]))
        elif (ext := os.path.splitext(path)[1].lower()) in IMAGE_EXTENSIONS:
            yield path
        elif ext in OTHER_PICTURES:
            passed[ext] += 1


def _entries(folder: str, visited: set[tuple[int, int]], warn: Callable[[str], None]) -> list[str]:
    """A folder's names, sorted, or none where it was entered before (by another name, a link) or
    cannot be read: a folder costs a warning, never the run."""
    try:
        info = os.stat(folder)
        if (info.st_dev, info.st_ino) in visited:
            return []
        visited.add((info.st_dev, info.st_ino))
        return sorted(name for name in os.listdir(folder) if not name.startswith("."))
    except OSError as exc:
        warn(f"skipping folder {folder}: {exc.strerror or exc}")
        return []


class Places(dict):
    """A file's name in its folder's real location (the folder's links resolved, not the file's),
    each folder resolved once: a run may hold 100,000 images in a few folders."""

    def __call__(self, path: str) -> str:
        folder, name = os.path.split(path)
        if folder not in self:
            self[folder] = os.path.realpath(folder or ".")
        return os.path.join(self[folder], name)
