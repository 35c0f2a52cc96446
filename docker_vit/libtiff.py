"""libtiff's error messages, kept off the process's stderr.

Pillow decodes compressed TIFFs through libtiff, whose default error handler writes each message
straight to descriptor 2 as a bare line (`ZIPDecode: Decoding error at scanline 0, incorrect data
check.`), past the logging: the one line in a server's output that is not JSON under `--log-format
json`, set off by any client that sends a broken TIFF. Pillow already turns libtiff's warnings off at
every decode, but not its errors. The failure itself still reaches the caller as Pillow's exception
(a 415 for a client), so nothing anyone reads is lost.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path

from PIL import Image  # noqa: F401  # loads Pillow's core, and with it the libtiff it was built with

MAPS = Path("/proc/self/maps")  # Linux: the files this process has mapped, shared libraries included


def quiet_errors() -> None:
    """Unset the error handler of each libtiff this process has loaded (Pillow's own copy, in a
    wheel). Where the loaded libraries cannot be listed (not Linux), nothing is done."""
    for path in _loaded("libtiff"):
        with contextlib.suppress(OSError, AttributeError):  # not loaded after all, or no such symbol
            library = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_NOW)  # the copy already loaded
            library.TIFFSetErrorHandler.argtypes = [ctypes.c_void_p]
            library.TIFFSetErrorHandler.restype = ctypes.c_void_p
            library.TIFFSetErrorHandler(None)


def _loaded(prefix: str) -> list[str]:
    """Paths of the mapped files whose names begin with `prefix`."""
    try:
        lines = MAPS.read_text().splitlines()
    except OSError:
        return []
    paths = {fields[5] for fields in (line.split(maxsplit=5) for line in lines) if len(fields) == 6}
    return sorted(path for path in paths if Path(path).name.startswith(prefix))
