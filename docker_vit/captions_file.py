"""The captions file that `docker-vit caption --output` writes: JSON lines or CSV, one image a record.

Every record carries the model and the generation options that made it, so a file resumed with other
options still says which caption came from where. Records are written whole and flushed as they are
made, so a killed run leaves a valid file; at most its last line is cut short, and reopening drops that
line (its image is captioned again). Resuming matches on `path`: as the walk wrote it, or the same
file named otherwise (`docker_vit.folder`).

Paths are str as the OS gave them; undecodable bytes travel as surrogate escapes and are written back
as the same bytes, so even such paths resume.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, BinaryIO

FORMATS = ("jsonl", "csv")
CSV_COLUMNS = ("path", "caption", "model", "num_beams", "max_new_tokens")
HEADER = ",".join(CSV_COLUMNS)
RECORD_START = '{"path": '  # how every JSON line `record` makes begins
_ENCODING = {"encoding": "utf-8", "errors": "surrogateescape"}


class CaptionsFileError(Exception):
    """The output file exists but is not a captions file this command can append to (or it cannot be
    written); each message names the file."""


def record(path: str, caption: str, model: str, params: Mapping[str, Any], data: Mapping[str, Any]) -> dict:
    """One image's entry; a handler's extra fields come last and never replace the fixed ones."""
    fixed = {"path": path, "caption": caption, "model": model, **params}
    return {**fixed, **{key: value for key, value in data.items() if key not in fixed}}


def format_for(path: str, chosen: str | None) -> str:
    """The explicit `--format`, else what the file name says (`.csv`), else JSON lines."""
    if chosen:
        return chosen
    return "csv" if path.lower().endswith(".csv") else "jsonl"


# Line breaks to Python's `str.splitlines` (and some editors) that JSON leaves unescaped: escaped, so a
# caption or file name holding one never splits its record. They only occur inside JSON strings.
_LINE_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def encode(
    entry: Mapping[str, Any], fmt: str, columns: Sequence[str] = CSV_COLUMNS, ascii_only: bool = False
) -> str:
    """One record as one line of text (a CSV row may span lines only if a value holds a newline);
    `ascii_only`: JSON's own escapes for the rest, for a stream that cannot encode it."""
    if fmt == "jsonl":
        return json.dumps(entry, ensure_ascii=ascii_only).translate(_LINE_BREAKS) + "\n"
    # A NUL (a model can emit any character) is a character Python 3.10's csv cannot write or read.
    row = [_no_nul(entry.get(column, "")) for column in columns]
    # csv quotes a field holding "\n" (the line end here) but not a lone "\r", which its reader refuses
    quoting = csv.QUOTE_ALL if any("\r" in str(value) for value in row) else csv.QUOTE_MINIMAL
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n", quoting=quoting).writerow(row)
    return buffer.getvalue()


def _no_nul(value: Any) -> Any:
    return value.replace("\0", "\ufffd") if isinstance(value, str) else value


class CaptionsFile:
    """An output file opened for appending, knowing which paths it already holds."""

    def __init__(self, path: str, fmt: str, warn: Callable[[str], None] = lambda message: None) -> None:
        self.path = path
        self.format = fmt
        self.warn = warn
        self.makers: set[tuple[str, ...]] = set()  # (model, num_beams, max_new_tokens) of its records
        with contextlib.suppress(FileNotFoundError):  # a pipe (-o /dev/stdout | ...) fails to open oddly
            self._check_kind(os.stat(path).st_mode)
        self._file: BinaryIO = open(path, "a+b")  # noqa: SIM115 -- stays open for the whole run
        self.columns: list[str] = list(CSV_COLUMNS)  # a resumed CSV keeps its own header
        try:
            self._check_kind(os.fstat(self._file.fileno()).st_mode)
            self._lock()
            self.done = self._resume()
        except BaseException:
            self._file.close()
            raise
        if self._file.tell() == 0 and fmt == "csv":
            self._write(encode(dict(zip(CSV_COLUMNS, CSV_COLUMNS, strict=True)), fmt))

    def write(self, entries: Sequence[Mapping[str, Any]]) -> None:
        """Append whole records and flush them, so a kill at any moment leaves complete lines."""
        text = "".join(encode(entry, self.format, self.columns) for entry in entries)
        if text:
            self._note_other_makers(entries)
            self._write(text)
        self.done.update(entry["path"] for entry in entries)

    def _note_other_makers(self, entries: Sequence[Mapping[str, Any]]) -> None:
        """A resumed file whose records came from another model or other options gets this run's
        beside them (each record names its own): said once, as the user may have meant to start over."""
        makers = {_maker(entry) for entry in entries}
        if self.makers and not makers <= self.makers:
            before = "; ".join(_shown(maker) for maker in sorted(self.makers))
            self.warn(
                f"{self.path} holds captions made otherwise ({before}); this run's "
                f"({_shown(min(makers - self.makers))}) are added beside them"
            )
        self.makers |= makers

    def close(self) -> None:
        """A write that failed (a full disk) has said so and ended the run; the rest of its bytes,
        still buffered, fail again here, and are given up without a second report."""
        with contextlib.suppress(OSError):
            self._file.close()

    def __enter__(self) -> CaptionsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_kind(self, mode: int) -> None:
        """A file, or /dev/null: resuming reads the output, and a device such as /dev/zero never ends."""
        if not stat.S_ISREG(mode) and os.path.realpath(self.path) != os.devnull:
            raise CaptionsFileError(
                f"{self.path} is not a regular file (for captions on stdout: -o - or no -o)"
            )

    def _lock(self) -> None:
        """One run a file: two would each caption every image not yet in it, and write it twice.
        /dev/null holds nothing to resume from: any number of runs may write there."""
        if not stat.S_ISREG(os.fstat(self._file.fileno()).st_mode):
            return
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, as before
            return
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CaptionsFileError(
                f"{self.path} is being written by another docker-vit caption run"
            ) from None
        except OSError:  # a file system without locks (some network mounts): go on unlocked
            pass

    def _write(self, text: str) -> None:
        try:
            self._file.write(text.encode(**_ENCODING))
            self._file.flush()
        except OSError as exc:  # a full disk, a file size limit: said with the file's name
            raise CaptionsFileError(f"cannot write {self.path}: {exc.strerror or exc}") from None

    def _resume(self) -> set[str]:
        """Read the paths already captioned and cut off a last record that a kill left unfinished."""
        self._file.seek(0)
        reader = _Lines(self._file)
        done: set[str] = set()
        if self.format == "jsonl":
            rows = _json_rows(reader, self.path)
        else:
            rows = _csv_rows(reader, self.path, self.columns)
        for row in rows:
            path = row.get("path") if isinstance(row, dict) else None
            if not isinstance(path, str):
                raise CaptionsFileError(f"{self.path} has a record without a path: is it a captions file?")
            if "\0" in path:  # no file name holds one: zeros written over records, say by a crash
                raise _nul_in_a_path(self.path)
            done.add(path)
            self.makers.add(_maker(row))
        if reader.complete < reader.read:
            self._file.truncate(reader.complete)
        self._file.seek(0, os.SEEK_END)
        if reader.complete == reader.read and not reader.ended:  # a whole last record, without its newline
            self._write("\n")
        return done


def _maker(entry: Mapping[str, Any]) -> tuple[str, ...]:
    """What made a record, as text (a CSV row holds text, a JSON line numbers)."""
    return tuple(str(entry.get(name, "")) for name in CSV_COLUMNS[2:])


def _shown(maker: tuple[str, ...]) -> str:
    said = ", ".join(f"{name} {value}" for name, value in zip(CSV_COLUMNS[2:], maker, strict=True) if value)
    return said or "no model or options named"


class _Lines:
    """The file's lines as text, remembering the byte offset where the last complete record ended."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self.size = os.fstat(file.fileno()).st_size
        self.read = 0  # bytes handed out so far
        self.complete = 0  # bytes that form complete records
        self.ended = True  # whether the last line handed out ended with a newline

    def __iter__(self) -> Iterator[str]:
        for raw in self._file:
            first = self.read == 0
            self.read += len(raw)
            self.ended = raw.endswith(b"\n")
            if not (first or self.ended or raw.strip(b"\0")):  # the zeros a crash leaves at the end
                return  # of a file (its size written before its data): cut short, as by a kill
            line = raw.decode(**_ENCODING)
            yield line.removeprefix("\ufeff") if first else line  # a spreadsheet's byte order mark

    def commit(self) -> None:
        """The lines handed out so far form complete records."""
        self.complete = self.read


def _json_rows(lines: _Lines, name: str) -> Iterator[Any]:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            lines.commit()
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if not lines.ended and (line.startswith(RECORD_START) or RECORD_START.startswith(line)):
                return  # a record cut short by a kill: dropped, and its image captioned again
            if line.startswith("path,caption"):
                raise CaptionsFileError(
                    f"{name} holds CSV captions, not JSON lines: add --format csv"
                ) from None
            raise CaptionsFileError(f"line {number} of {name} is not JSON: is it a captions file?") from None
        lines.commit()
        yield row


def _csv_rows(lines: _Lines, name: str, columns: list[str]) -> Iterator[dict]:
    """Rows of a CSV whose header starts with path, caption (it replaces `columns`); a quoted value
    may span lines."""
    reader = csv.reader(lines, strict=True)
    header = None
    try:
        for row in reader:
            if not lines.ended and (header is not None or HEADER.startswith(",".join(row))):
                return  # a row cut short by a kill: dropped, and its image captioned again
            lines.commit()
            if header is None:
                header = row
                if header[:2] != ["path", "caption"]:
                    if header[:1] and header[0].startswith("{"):
                        raise CaptionsFileError(f"{name} holds JSON lines, not CSV: add --format jsonl")
                    raise CaptionsFileError(f"{name} is a CSV without the columns path, caption")
                columns[:] = header
            elif row:
                yield dict(zip(header, row, strict=False))
    except csv.Error as exc:
        if lines.read < lines.size or header is None:  # broken in the middle, or no captions file at all
            if "NUL" in str(exc):  # Python 3.10's reader refuses one itself ("line contains NUL")
                raise _nul_in_a_path(name) from None
            raise CaptionsFileError(f"{name} is not a valid CSV file: {exc}") from None


def _nul_in_a_path(name: str) -> CaptionsFileError:
    """No file name holds a NUL: zeros written over records (a crash), or no captions file at all."""
    return CaptionsFileError(f"{name} has a path with a NUL byte: is it a captions file?")
