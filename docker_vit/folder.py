"""Captioning many images without a server: `docker-vit caption PATH... [--output FILE]`.

Folders are walked in a stable order (walk.py), images go through the configured handler in batches (or to a
server with `--url`; local.py and client.py), and captions go to stdout or to a captions file that a second
run resumes. One unreadable file costs a warning line, never the run.

Exit codes: 0 when every image found is captioned (in this run or an earlier one), 1 when some were
not (skipped with a warning, or the run stopped on an error: rerun to retry them), 130 on Ctrl-C,
143 on SIGTERM, 141 when the reader of stdout leaves.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import os
import sys
from collections import Counter
from collections.abc import Callable, Collection, Generator, Mapping, Sequence
from functools import partial
from typing import Any

from docker_vit.captions_file import CSV_COLUMNS, CaptionsFile, CaptionsFileError, encode, format_for
from docker_vit.config import Settings
from docker_vit.handler import HandlerError
from docker_vit.progress import Progress
from docker_vit.runner import CaptionError, Outcome, Runner
from docker_vit.walk import IMAGE_EXTENSIONS, Places, find_images

# Output names that promise something else than the JSON lines they get (`json.load` refuses them, a
# spreadsheet looks for tabs): told so once the file is open.
TOLD_JSON_LINES = (".json", ".txt", ".tsv", ".tab", ".xlsx", ".xls", ".ods")


def caption(settings: Settings, paths: Sequence[str], chosen: Collection[str] = ()) -> int:
    """The `caption` command: find images, skip those already in `--output`, caption the rest.

    `chosen`: the settings a flag or variable set. Through `--url` only those generation options are
    sent, so the server's own defaults (and limits) hold for the rest."""
    output = settings.output if settings.output not in ("", "-") else None  # "-": stdout, as usual
    fmt = settings.format or ("jsonl" if settings.json else None)
    progress = Progress()
    unreadable: list[str] = []
    passed: Counter[str] = Counter()
    images = find_images(paths, lambda message: unreadable.append(message) or progress.warn(message), passed)
    if passed:  # a note, not a failure: they were never images of this run
        progress.warn(_passed_over(passed))
    try:
        sink = CaptionsFile(output, format_for(output, fmt), progress.warn) if output else _Stdout(fmt, paths)
    except BrokenPipeError:  # stdout's reader left before the CSV header went out
        return _reader_left(progress)
    except CaptionsFileError as exc:  # its message names the file
        progress.warn(str(exc))
        return 1
    except OSError as exc:
        progress.warn(f"cannot use {output}: {exc.strerror or exc}")
        return 1
    with sink:
        if output:  # only now: a first run's file exists once opened
            images = [path for path in images if not _is_output(path, output)]
            if not fmt and output.lower().endswith(TOLD_JSON_LINES):  # not what the name promises
                progress.warn(
                    f"{output} gets JSON lines, one record per line (as a .jsonl file would; "
                    "--format csv writes CSV)"
                )
        if not images:
            progress.warn(f"no images found ({', '.join(sorted(ext[1:] for ext in IMAGE_EXTENSIONS))})")
        todo = _not_done(images, sink.done)
        code = 0
        if todo:
            params = settings.generation()
            # captions printed to a terminal would be torn by the bar; redirected, they leave it room
            bar = progress if output or not sys.stdout.isatty() else Progress(enabled=False)
            code = _run(partial(_runner, settings, params, chosen, bar.warn), todo, sink, bar)
    return code if code or not unreadable else 1  # a folder left unread is images not captioned


def _passed_over(passed: Counter[str]) -> str:
    kinds = ", ".join(f"{count} {ext[1:]}" for ext, count in sorted(passed.items()))
    count = sum(passed.values())
    return f"passed over {count} {'picture' if count == 1 else 'pictures'} in formats not read ({kinds}); convert to JPEG"


def _is_output(path: str, output: str) -> bool:
    """Whether `path` is the captions file itself (`-o photos/captions.png`, found by the next run's
    walk). Only a name that could be it costs a stat, compared case-blind as macOS's disks do."""
    if os.path.basename(path).casefold() != os.path.basename(output).casefold():
        return False
    try:
        return os.path.samefile(path, output)
    except OSError:
        return False


def _not_done(images: list[str], done: set[str]) -> list[str]:
    """Images not in the file yet, also when it names them otherwise (relative vs absolute, through a
    linked folder): a recorded path is read from the current folder, as the run that wrote it most
    likely was. A record stands for the image in its place (folders resolved, not the file's own
    link): names that link to one shared file (a Hub snapshot's blobs, `y.jpg -> x.jpg`) each keep
    their own row, as in a run never cut short. Only a record that names none of this run's images
    stands for its file under any name (the blob itself, after its links were captioned)."""
    current = set(images)
    others = [path for path in done if path not in current]
    if not others:  # the usual resume: the same command again
        return [path for path in images if path not in done]
    place = Places()
    places = {place(path) for path in others}
    here = {place(path) for path in images}
    files = {os.path.realpath(path) for path in others if place(path) not in here}
    return [
        path
        for path in images
        if path not in done and place(path) not in places and not (files and os.path.realpath(path) in files)
    ]


def _run(make: Callable[[], Runner], todo: list[str], sink: Any, progress: Progress) -> int:
    try:
        runner = make()
        progress.start(len(todo))
        skipped = _write_all(runner(todo), sink, progress)
    except KeyboardInterrupt:
        progress.stop()
        progress.warn("interrupted; run the same command again to caption the rest")
        return 130
    except HandlerError:  # a bad --handler is a usage error: said as `serve` says it (exit 2)
        progress.stop()
        raise
    except BrokenPipeError:
        return _reader_left(progress)
    except (CaptionError, CaptionsFileError, OSError, ValueError, ImportError) as exc:
        progress.stop()
        progress.warn(str(exc))
        return 1
    progress.stop()
    progress.summary(skipped)
    return 1 if skipped else 0


def _write(outcomes: list[Outcome], sink: Any, progress: Progress) -> int:
    """The records of one batch of outcomes, and a line for each image skipped, counted."""
    sink.write([outcome.entry for outcome in outcomes if outcome.entry is not None])
    skipped = [outcome for outcome in outcomes if outcome.error is not None]
    for outcome in skipped:
        progress.warn(f"skipping {outcome.path}: {outcome.error}")
    progress.advance(len(outcomes))
    return len(skipped)


def _write_all(batches: Generator[list[Outcome], None, None], sink: Any, progress: Progress) -> int:
    """Every batch's records; the runner is closed before the run's end is said (its handler's close()
    speaks first). At a Ctrl-C while a batch was written, the runner hears of it, and what it already
    holds done (a `--url` run's answers waiting their turn in input order) is written too, not made
    again on resume."""
    skipped = 0
    with contextlib.closing(batches):
        try:
            for outcomes in batches:
                skipped += _write(outcomes, sink, progress)
        except KeyboardInterrupt:
            with contextlib.suppress(KeyboardInterrupt, StopIteration):  # a second Ctrl-C: the rest goes
                _write(batches.throw(KeyboardInterrupt()), sink, progress)
            raise
    return skipped


def _one_line(text: str) -> str:
    """A caption's line breaks (a model that writes markdown) as `\\n`, so that each image stays one
    `PATH: caption` line; the JSON lines and CSV keep the text as it is."""
    return "\\n".join(str(text).splitlines())


def _reader_left(progress: Progress) -> int:
    """stdout's reader left (`| head`): stop, quietly, as a shell tool does (SIGPIPE's status)."""
    progress.stop()
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
    return 141


def _runner(settings: Settings, params: dict, chosen: Collection[str], warn: Callable[[str], None]) -> Runner:
    if settings.url:
        from docker_vit.client import RemoteRunner

        return RemoteRunner(settings, params, chosen, warn).run
    from docker_vit.local import LocalRunner

    return LocalRunner(settings, params, chosen, warn).run


class _Stdout:
    """Captions on stdout, as before `--output` existed: text (with paths for several), JSON lines or CSV."""

    def __init__(self, fmt: str | None, paths: Sequence[str]) -> None:
        self.format = fmt or "text"
        self.done: set[str] = set()
        # by the command alone, not by which of its files exist: a script's lines keep their shape
        self.with_path = len(paths) > 1 or any(os.path.isdir(path) for path in paths)
        self.ascii_only = False  # JSON lines in JSON's own escapes, on a stdout that is not UTF-8
        if isinstance(sys.stdout, io.TextIOWrapper):  # a name that is not UTF-8 goes out as its bytes,
            # as in an output file, not as an error; where stdout is not UTF-8 (a Windows redirect, a
            # legacy locale), what its encoding lacks is written escaped, never the end of the run
            self.ascii_only = codecs.lookup(sys.stdout.encoding).name != "utf-8"
            sys.stdout.reconfigure(errors="backslashreplace" if self.ascii_only else "surrogateescape")
        if self.format == "csv":
            csv.writer(sys.stdout, lineterminator="\n").writerow(CSV_COLUMNS)

    def write(self, entries: Sequence[Mapping[str, Any]]) -> None:
        for entry in entries:
            if self.format != "text":
                sys.stdout.write(encode(entry, self.format, ascii_only=self.ascii_only))
            else:
                print(
                    f"{entry['path']}: {_one_line(entry['caption'])}" if self.with_path else entry["caption"]
                )
        sys.stdout.flush()

    def __enter__(self) -> _Stdout:
        return self

    def __exit__(self, *exc: object) -> None:
        sys.stdout.flush()
