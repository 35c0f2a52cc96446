"""The progress line of `docker-vit caption`: done/total, images per second, time left."""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

# C0 controls but tab, DEL and C1, as escapes: a file name (or a server's message) holding ESC would
# drive the terminal a warning names it on (retitle it, clear it), and a line break would split the line.
_CONTROLS = {code: f"\\x{code:02x}" for code in [*range(0x09), *range(0x0A, 0x20), *range(0x7F, 0xA0)]}


class Progress:
    """One line on a terminal's stderr (done/total, images/s, time left); silent when not a terminal.

    Warnings always print, as their own lines above the bar, control characters escaped.
    """

    def __init__(self, stream: TextIO | None = None, enabled: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total = self.done = 0
        self.started = self._drawn = 0.0
        self._active = False

    def start(self, total: int) -> None:
        self.total, self.done, self.started, self._active = total, 0, time.monotonic(), self.enabled
        if self._active:  # 0/N at once: a big model's first batch takes seconds
            self._draw()

    def advance(self, count: int) -> None:
        self.done += count
        if self._active and (time.monotonic() - self._drawn > 0.2 or self.done == self.total):
            self._draw()

    def warn(self, message: str) -> None:
        self._clear()
        print(f"docker-vit: {message.translate(_CONTROLS)}", file=self.stream, flush=True)
        if self._active:
            self._draw()

    def stop(self) -> None:
        if self._active:
            self._draw()
            self.stream.write("\n")
            self._active = False

    def summary(self, skipped: int) -> None:
        if self.enabled:
            seconds = time.monotonic() - self.started
            done = self.done - skipped
            note = f"; {skipped} skipped" if skipped else ""
            self.warn(f"captioned {done} images in {seconds:.1f} s ({done / seconds:.1f}/s){note}")

    def _clear(self) -> None:
        if self._active:
            self.stream.write("\r\033[K")

    def _draw(self) -> None:
        self._drawn = now = time.monotonic()
        rate = self.done / max(now - self.started, 1e-9)
        left = _clock((self.total - self.done) / rate) if rate > 0 else "?"
        figures = f"{self.done}/{self.total} {rate:.1f} images/s, {left} left"
        # A line wider than the terminal wraps, and "\r" then goes back only to its last row: each
        # redraw would leave a row behind (a narrow pane filling with bars). The bar gives way first.
        columns = self._columns() - 1  # some terminals wrap on writing the last column
        width = min(24, columns - len(figures) - 3)
        if width >= 5:
            filled = width * self.done // max(self.total, 1)
            line = f"[{'#' * filled}{'-' * (width - filled)}] {figures}"
        else:
            line = figures[: max(columns, 1)]
        self.stream.write(f"\r{line}\033[K")
        self.stream.flush()

    def _columns(self) -> int:
        """The terminal's width (80 where the stream cannot say)."""
        try:
            return os.get_terminal_size(self.stream.fileno()).columns or 80
        except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both of the last
            return 80


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
