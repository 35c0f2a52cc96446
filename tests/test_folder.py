"""`docker-vit caption PATH... [--output FILE]`: walking, output files, resume, progress, interrupts."""

from __future__ import annotations

import csv
import io
import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import finished, killed_after, photo
from folder_handlers import Digest, Fussy, LostLater, PrepareSaysCuda
from PIL import Image

from docker_vit import cli
from docker_vit.captions_file import CaptionsFile, CaptionsFileError, encode, format_for
from docker_vit.config import Settings
from docker_vit.progress import Progress
from docker_vit.walk import find_images

TESTS = Path(__file__).parent
DIGEST = ["--handler", "folder_handlers:Digest", "--max-batch-size", "3"]


def picture(path: Path, shade: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower().lstrip(".")
    kind = {"jpg": "JPEG", "tif": "TIFF"}.get(suffix, suffix.upper())
    Image.new("RGB", (8, 8), (shade, 255 - shade, shade // 2)).save(path, format=kind)
    return path


@pytest.fixture
def library(tmp_path: Path) -> Path:
    """Nested folders of pictures, with things that are not pictures and one broken picture."""
    root = tmp_path / "photos"
    picture(root / "b.png", 10)
    picture(root / "a.JPG", 20)
    picture(root / "2020" / "summer" / "beach.webp", 30)
    picture(root / "2020" / "c.gif", 40)
    picture(root / "z" / "last.bmp", 50)
    (root / "notes.txt").write_text("not a picture")
    (root / "2020" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    picture(root / ".thumbnails" / "hidden.png", 60)
    Digest.batches.clear()
    return root


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_find_images_walks_folders_in_a_stable_order(library: Path) -> None:
    os.symlink(library, library / "2020" / "loop")  # a symlink loop ends, nothing is found twice
    warnings: list[str] = []
    extra = library / "notes.txt"
    found = find_images([str(library), str(extra), str(library / "b.png")], warnings.append)
    rel = [os.path.relpath(path, library.parent) for path in found]
    assert rel == [
        "photos/2020/broken.jpg",
        "photos/2020/c.gif",
        "photos/2020/summer/beach.webp",
        "photos/a.JPG",
        "photos/b.png",
        "photos/z/last.bmp",
        "photos/notes.txt",  # named explicitly: taken whatever its extension
    ]
    assert warnings == []
    assert find_images([str(library) + "/"], print) == found[:-1]  # normalized: a trailing slash matches


def test_an_image_named_twice_is_found_once_by_its_first_name(library: Path, monkeypatch) -> None:
    """Relative and absolute, a folder and a file in it, a linked folder: one image, one record (as a
    resumed run already took them), while a link to a file keeps a name of its own."""
    monkeypatch.chdir(library.parent)
    os.symlink(library / "z", library.parent / "z-link")
    os.symlink(library / "b.png", library / "z" / "b-link.png")
    found = find_images(["photos/b.png", str(library / "b.png"), "photos/z", "z-link/last.bmp"], print)
    assert found == ["photos/b.png", "photos/z/b-link.png", "photos/z/last.bmp"]


def test_a_dot_dot_after_a_linked_folder_reads_what_the_os_reads(tmp_path: Path, monkeypatch) -> None:
    """`link/..` is the parent of the link's target, as `ls` and `cat` take it, not the folder that holds
    the link: a lexical tidy-up would read (or walk) another file than the one named."""
    (tmp_path / "real" / "deep").mkdir(parents=True)
    shutil.copy(photo("chelsea.jpg"), tmp_path / "real" / "deep" / "x.jpg")
    shutil.copy(photo("coffee.jpg"), tmp_path / "real" / "y.jpg")
    (tmp_path / "deep").mkdir()
    (tmp_path / "deep" / "x.jpg").write_text("not an image")
    (tmp_path / "z.jpg").write_text("not an image either")
    os.symlink(tmp_path / "real" / "deep", tmp_path / "dlink")
    monkeypatch.chdir(tmp_path)
    found = find_images(["dlink/../deep/x.jpg"], print)
    assert len(found) == 1 and Path(found[0]).read_bytes() == (tmp_path / "real/deep/x.jpg").read_bytes()
    walked = find_images(["dlink/.."], print)
    assert sorted(os.path.realpath(path) for path in walked) == [
        str(tmp_path / "real" / "deep" / "x.jpg"),
        str(tmp_path / "real" / "y.jpg"),
    ]


def test_an_empty_path_or_a_file_named_as_a_folder_is_no_path(library: Path, monkeypatch) -> None:
    """`caption "$PHOTOS"` with the variable unset is not the current folder; `b.png/` is not b.png."""
    monkeypatch.chdir(library)
    warnings: list[str] = []
    assert find_images(["", "b.png/"], warnings.append) == []
    assert warnings == ["skipping '': No such file or directory", "skipping b.png/: Not a directory"]


def test_jsonl_output_skips_unreadable_files_and_carries_on(
    library: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "captions.jsonl"
    assert cli.main(["caption", str(library), "--output", str(out), *DIGEST]) == 1  # one file skipped
    err = capsys.readouterr().err
    assert err.count("docker-vit: skipping") == 1 and "broken.jpg: cannot decode the image" in err
    entries = lines(out)
    assert [Path(entry["path"]).name for entry in entries] == [
        "c.gif",
        "beach.webp",
        "a.JPG",
        "b.png",
        "last.bmp",
    ]
    assert all(entry["path"].startswith(str(library) + os.sep) for entry in entries)
    assert entries[0] == {
        "path": str(library / "2020" / "c.gif"),
        "caption": entries[0]["caption"],
        "model": "digest",  # no num_beams or max_new_tokens: Digest reads no options, none were set
    }
    assert entries[0]["caption"].startswith("picture ")
    assert sum(Digest.batches) == 5 and max(Digest.batches) <= 3


def test_an_image_the_model_fails_on_is_skipped_and_the_run_carries_on(
    library: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A failed batch is retried in halves, as the server does: only the image that breaks the model
    is skipped (exit 1), and a run after the model is fixed adds just that one."""
    Fussy.refused = {Fussy(Settings()).prepare((library / "a.JPG").read_bytes(), None)}
    out = tmp_path / "captions.jsonl"
    fussy = ["--handler", "folder_handlers:Fussy", "--max-batch-size", "3"]
    try:
        assert cli.main(["caption", str(library), "--output", str(out), *fussy]) == 1
    finally:
        Fussy.refused = set()
    err = capsys.readouterr().err
    assert "a.JPG: the model failed: RuntimeError: this picture breaks the model" in err
    assert {Path(entry["path"]).name for entry in lines(out)} == {"c.gif", "beach.webp", "b.png", "last.bmp"}
    assert cli.main(["caption", str(library), "--output", str(out), *fussy]) == 1  # broken.jpg still
    assert [Path(entry["path"]).name for entry in lines(out)][-1] == "a.JPG" and len(lines(out)) == 5


def test_a_predict_that_consumes_its_list_still_gets_whole_halves(library: Path, tmp_path: Path) -> None:
    """`predict` may take its items off the list it was given: the halves of a failed batch are cut
    from the batch, not from what the failed call left of it, so each caption goes with its picture."""
    Fussy.refused = {Fussy(Settings()).prepare((library / "a.JPG").read_bytes(), None)}
    out = tmp_path / "captions.jsonl"
    try:
        code = cli.main(["caption", str(library), "-o", str(out), "--handler", "folder_handlers:Consuming"])
    finally:
        Fussy.refused = set()
    assert code == 1  # a.JPG and broken.jpg skipped
    digest = Digest(Settings())
    for entry in lines(out):
        assert entry["caption"] == f"picture {digest.prepare(Path(entry['path']).read_bytes(), None)}"
    assert {Path(entry["path"]).name for entry in lines(out)} == {"c.gif", "beach.webp", "b.png", "last.bmp"}


def test_resume_captions_only_new_images(library: Path, tmp_path: Path) -> None:
    out = tmp_path / "captions.jsonl"
    cli.main(["caption", str(library), "--output", str(out), *DIGEST])
    (library / "2020" / "broken.jpg").unlink()
    picture(library / "2020" / "new.png", 70)
    picture(library / "zz.tiff", 80)
    Digest.batches.clear()
    assert cli.main(["caption", str(library), "--output", str(out), *DIGEST]) == 0
    assert sum(Digest.batches) == 2  # only the two new pictures reached the model
    paths = [entry["path"] for entry in lines(out)]
    assert len(paths) == len(set(paths)) == 7
    Digest.batches.clear()
    assert cli.main(["caption", str(library), "--output", str(out), *DIGEST]) == 0
    assert Digest.batches == [] and len(lines(out)) == 7  # nothing left to do: the model never ran


def test_a_captions_file_named_like_an_image_in_the_folder_is_not_captioned(
    library: Path, capsys: pytest.CaptureFixture
) -> None:
    out = library / "captions.png"  # --format jsonl, in the folder it captions: the next walk finds it
    for _ in range(2):
        assert (
            cli.main(["caption", str(library), "-o", str(out), "--format", "jsonl", *DIGEST]) == 1
        )  # broken.jpg
        assert "broken.jpg" in capsys.readouterr().err
    assert cli.main(["caption", str(out.parent / "b.png"), str(out), "-o", str(out), *DIGEST]) == 0
    assert "captions.png" not in capsys.readouterr().err and len(lines(out)) == 5


@pytest.mark.parametrize("name", ["captions.jsonl", "captions.csv"])
def test_resuming_with_other_options_says_the_file_now_mixes_them(
    library: Path, tmp_path: Path, capsys: pytest.CaptureFixture, name: str
) -> None:
    out = tmp_path / name
    cli.main(["caption", str(library), "--output", str(out), *DIGEST, "--num-beams", "1"])
    picture(library / "new.png", 70)
    capsys.readouterr()
    cli.main(["caption", str(library), "--output", str(out), *DIGEST, "--num-beams", "1"])
    assert "made otherwise" not in capsys.readouterr().err  # the same command again: nothing to say
    picture(library / "newer.png", 75)
    cli.main(["caption", str(library), "--output", str(out), *DIGEST, "--num-beams", "2"])
    err = capsys.readouterr().err
    assert f"{out} holds captions made otherwise (model digest, num_beams 1); this run's" in err
    assert "(model digest, num_beams 2) are added beside them" in err


def test_resuming_a_file_of_bare_records_names_what_they_lack(
    library: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "partial.jsonl"
    out.write_text(json.dumps({"path": str(library / "b.png"), "caption": "x"}) + "\n")
    cli.main(["caption", str(library), "--output", str(out), *DIGEST])
    assert f"{out} holds captions made otherwise (no model or options named); this run's" in (
        capsys.readouterr().err
    )


def test_resume_knows_a_file_named_otherwise(
    library: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Relative one run, absolute the next, or through a link: still no duplicate."""
    out = tmp_path / "captions.jsonl"
    monkeypatch.chdir(library.parent)
    assert cli.main(["caption", library.name, "--output", str(out), *DIGEST]) in (0, 1)
    first = len(lines(out))
    (tmp_path / "link").symlink_to(library)
    Digest.batches.clear()
    for named in (str(library), str(tmp_path / "link")):
        assert cli.main(["caption", named, "--output", str(out), *DIGEST]) in (0, 1)
    assert sum(Digest.batches) == 0 and len(lines(out)) == first


def test_csv_output_quotes_and_resumes(library: Path, tmp_path: Path) -> None:
    picture(library / 'odd, "name".png', 90)
    out = tmp_path / "captions.csv"  # the format follows the file name
    cli.main(["caption", str(library), "-o", str(out), *DIGEST])
    Digest.batches.clear()
    picture(library / "more.png", 100)
    cli.main(["caption", str(library), "-o", str(out), *DIGEST])
    assert sum(Digest.batches) == 1
    with open(out, newline="") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == ["path", "caption", "model", "num_beams", "max_new_tokens"]
    assert len(rows) == 7 and len({row["path"] for row in rows}) == 7
    assert str(library / 'odd, "name".png') in {row["path"] for row in rows}
    assert rows[0]["model"] == "digest" and rows[0]["num_beams"] == ""


def test_a_handler_that_names_no_options_gets_only_those_the_user_set(
    library: Path, capsys: pytest.CaptureFixture
) -> None:
    """As over HTTP: the captioner's defaults are not fields of another model, nor of its records."""
    strict = ["--handler", "folder_handlers:Strict"]
    assert cli.main(["caption", str(library / "z"), "--json", *strict]) == 0
    assert json.loads(capsys.readouterr().out).keys() == {"path", "caption", "model"}
    assert cli.main(["caption", str(library / "z"), "--json", "--num-beams", "2", *strict]) == 1
    assert "unknown option(s): ['num_beams']" in capsys.readouterr().err


def test_a_cut_off_last_record_is_dropped_on_resume(tmp_path: Path) -> None:
    fresh = {"path": "new.png", "caption": "fresh"}
    for name, text, kept, last in [
        ("a.jsonl", '{"path": "x.png", "caption": "a"}\n{"path": "y.p', ["x.png"], json.dumps(fresh)),
        ("a.csv", 'path,caption\nx.png,a\n"y.png","a cap', ["x.png"], "new.png,fresh"),
        ("b.csv", 'path,caption\nx.png,a\ny.png,"two\nlines"\nz.png,b', ["x.png", "y.png"], "new.png,fresh"),
        ("c.csv", "path,cap", [], "new.png,fresh,,,"),  # even the header was cut: written anew
        (
            "z.jsonl",
            '{"path": "x.png", "caption": "a"}\n' + "\0" * 4096,
            ["x.png"],
            json.dumps(fresh),
        ),  # a crash
        ("z.csv", "path,caption\nx.png,a\n" + "\0" * 100, ["x.png"], "new.png,fresh"),
    ]:
        path = tmp_path / name
        path.write_text(text)
        with CaptionsFile(str(path), name.split(".")[1]) as file:
            assert sorted(file.done) == kept
            file.write([fresh])
        assert path.read_text().splitlines()[-1] == last
        with CaptionsFile(str(path), name.split(".")[1]) as file:
            assert sorted(file.done) == sorted([*kept, "new.png"])


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("settings.json", '{"important": [1, 2, 3]}'),  # one line, no newline: not a cut-short record
        ("notes.txt", "some notes without a newline"),
        ("notes.csv", "name,value"),
        ("quoted.csv", '"an open quote'),
        ("two.jsonl", '{"path": "x.png", "caption": "a"}\nsome notes'),
        ("zeros.jsonl", "\0" * 512),  # zeros after no record of ours: not known to be a crash's
    ],
)
def test_a_file_that_is_not_a_captions_file_is_never_cut(tmp_path: Path, name: str, text: str) -> None:
    """Only the start of a record of ours may be dropped as "cut short by a kill"."""
    path = tmp_path / name
    path.write_text(text)
    fmt = "csv" if name.endswith(".csv") else "jsonl"
    with pytest.raises(CaptionsFileError):
        CaptionsFile(str(path), fmt)
    assert path.read_text() == text


def test_a_whole_last_record_without_its_newline_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "edited.jsonl"
    path.write_text('{"path": "x.png", "caption": "a"}')
    with CaptionsFile(str(path), "jsonl") as file:
        assert file.done == {"x.png"}
        file.write([{"path": "y.png", "caption": "b"}])
    assert [json.loads(line)["path"] for line in path.read_text().splitlines()] == ["x.png", "y.png"]


def test_a_carriage_return_in_a_name_or_caption_resumes_from_csv(tmp_path: Path) -> None:
    path = tmp_path / "out.csv"
    with CaptionsFile(str(path), "csv") as file:
        file.write([{"path": "a\rb.png", "caption": "one\rtwo"}, {"path": "c.png", "caption": "c"}])
    with CaptionsFile(str(path), "csv") as file:
        assert file.done == {"a\rb.png", "c.png"}


def test_a_nul_in_a_caption_is_written_to_csv_as_a_replacement_character(tmp_path: Path) -> None:
    """Python 3.10's csv can neither write a NUL nor read one back; a model may emit any character."""
    path = tmp_path / "out.csv"
    with CaptionsFile(str(path), "csv") as file:
        file.write([{"path": "a.png", "caption": "x\0y", "num_beams": 4}])
    assert "\0" not in path.read_text() and "x\ufffdy" in path.read_text()
    with CaptionsFile(str(path), "csv") as file:
        assert file.done == {"a.png"}
    assert json.loads(encode({"caption": "x\0y"}, "jsonl"))["caption"] == "x\0y"  # JSON keeps it


def test_a_spreadsheets_byte_order_mark_does_not_hide_the_header(tmp_path: Path) -> None:
    path = tmp_path / "saved.csv"
    path.write_bytes("\ufeffpath,caption\r\nx.png,a\r\n".encode())
    with CaptionsFile(str(path), "csv") as file:
        assert file.done == {"x.png"}


def test_refuses_to_append_to_a_file_that_is_not_a_captions_file(tmp_path: Path) -> None:
    notes = tmp_path / "notes.jsonl"
    notes.write_text("hello\nworld\n")
    with pytest.raises(CaptionsFileError):
        CaptionsFile(str(notes), "jsonl")
    sheet = tmp_path / "sheet.csv"
    sheet.write_text("name,age\nann,3\n")
    with pytest.raises(CaptionsFileError):
        CaptionsFile(str(sheet), "csv")
    assert cli.main(["caption", str(photo("coffee.jpg")), "-o", str(notes), *DIGEST]) == 1
    assert notes.read_text() == "hello\nworld\n"


def test_stdout_keeps_the_old_behaviour(library: Path, capsys: pytest.CaptureFixture) -> None:
    one = str(library / "b.png")
    assert cli.main(["caption", one, *DIGEST]) == 0
    assert capsys.readouterr().out.startswith("picture ")
    assert cli.main(["caption", one, str(library / "a.JPG"), *DIGEST]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith(f"{one}: picture ")
    assert cli.main(["caption", one, str(library / "missing.png"), *DIGEST]) == 1
    [line] = capsys.readouterr().out.splitlines()
    assert line.startswith(f"{one}: picture ")  # the command's shape, whichever of its files exist
    cli.main(["caption", str(library / "z"), *DIGEST])  # a folder always prints paths
    assert capsys.readouterr().out.startswith(str(library / "z" / "last.bmp") + ": picture")
    cli.main(["caption", str(library / "z"), "--json", *DIGEST])
    assert json.loads(capsys.readouterr().out)["path"] == str(library / "z" / "last.bmp")
    cli.main(["caption", str(library / "z"), "--format", "csv", *DIGEST])
    assert capsys.readouterr().out.splitlines()[0] == "path,caption,model,num_beams,max_new_tokens"


def test_a_caption_of_several_lines_stays_one_line_after_its_path(
    library: Path, capsys: pytest.CaptureFixture
) -> None:
    lines = ["--handler", "folder_handlers:Lines"]
    assert cli.main(["caption", str(library / "z"), *lines]) == 0
    [line] = capsys.readouterr().out.splitlines()
    assert line.startswith(f"{library / 'z' / 'last.bmp'}: # picture ") and line.endswith("\\n\\nbody")
    assert cli.main(["caption", str(library / "z" / "last.bmp"), *lines]) == 0  # alone: as it is
    assert capsys.readouterr().out.endswith("\n\nbody\n\n")
    assert cli.main(["caption", str(library / "z"), "--json", *lines]) == 0
    assert json.loads(capsys.readouterr().out)["caption"].endswith("\r\n\nbody\n")


def test_the_captioner_itself_with_a_tiny_model(vit_gpt2_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pictures"
    folder.mkdir()
    for name in ("coffee.jpg", "chelsea.jpg"):
        (folder / name).write_bytes(photo(name).read_bytes())
    out = tmp_path / "out.jsonl"
    args = ["caption", str(folder), "-o", str(out), "--model", str(vit_gpt2_dir), "--num-beams", "2"]
    assert cli.main([*args, "--max-new-tokens", "5"]) == 0
    entries = lines(out)
    assert [Path(entry["path"]).name for entry in entries] == ["chelsea.jpg", "coffee.jpg"]
    assert entries[0]["model"] == str(vit_gpt2_dir) and entries[0]["num_beams"] == 2
    assert entries[0]["max_new_tokens"] == 5 and all(isinstance(entry["caption"], str) for entry in entries)


def test_progress_bar_on_a_terminal_and_quiet_elsewhere(library: Path, capsys: pytest.CaptureFixture) -> None:
    stream = io.StringIO()
    progress = Progress(stream, enabled=True)
    progress.start(4)
    assert "0/4" in stream.getvalue()  # at once: a big model's first batch takes seconds
    progress.advance(2)
    progress.warn("skipping x.png: broken")
    progress.advance(2)
    progress.stop()
    text = stream.getvalue()
    assert "2/4" in text and "4/4" in text and "images/s" in text and "left" in text
    assert "\r\033[Kdocker-vit: skipping x.png: broken\n" in text
    (library / "2020" / "broken.jpg").unlink()
    assert cli.main(["caption", str(library), "-o", str(library.parent / "out.jsonl"), *DIGEST]) == 0
    assert capsys.readouterr().err == ""  # not a terminal: not a word on stderr


def test_a_warning_shows_control_characters_escaped(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A file name is anyone's text (a downloaded data set's): one holding ESC sequences retitled or
    cleared the terminal its warning line was printed on, and a line break split that line."""
    name = "\x1b]0;pwned\x07\x1b[2J\x9b31m\nx\tb.jpg"
    (tmp_path / name).write_bytes(b"not a picture")
    assert cli.main(["caption", str(tmp_path), "-o", str(tmp_path / "out.jsonl"), *DIGEST]) == 1
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err and "\x9b" not in err and err.count("\n") == 1
    assert "\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m\\x0ax\tb.jpg" in err  # a tab is harmless: kept


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class _NarrowTerminal(_Terminal):
    def fileno(self) -> int:
        return 2


@pytest.mark.parametrize("columns", [80, 60, 40, 20])
def test_the_bar_fits_a_narrow_terminal(monkeypatch: pytest.MonkeyPatch, columns: int) -> None:
    """A line wider than the terminal wraps, and the next "\\r" redraws only its last row: a 40-column
    pane filled up with bars, one row per redraw."""
    monkeypatch.setattr(os, "get_terminal_size", lambda fd: os.terminal_size((columns, 24)))
    now = [0.0]
    monkeypatch.setattr("docker_vit.progress.time.monotonic", lambda: now[0])
    stream = _NarrowTerminal()
    progress = Progress(stream, enabled=True)
    progress.start(100_000)
    now[0] = 10.0  # 12,345 images in 10 s: 1234.5 images/s, 1:11 left
    progress.advance(12_345)
    progress.stop()
    drawn = [line.removesuffix("\033[K") for line in stream.getvalue().strip("\n").split("\r") if line]
    assert drawn and all(0 < len(line) < columns for line in drawn)
    assert "12345/100000" in drawn[-1]
    assert "1234.5 images/s" in drawn[-1] or columns < 40
    assert ("[" in drawn[-1]) == (columns >= 60)  # the bar gives way first, then the figures' end


@pytest.mark.parametrize("stdout_is_a_terminal", [False, True])
def test_the_bar_shows_when_captions_are_redirected_not_when_printed_on_the_terminal(
    library: Path, monkeypatch: pytest.MonkeyPatch, stdout_is_a_terminal: bool
) -> None:
    err, out = _Terminal(), _Terminal() if stdout_is_a_terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(sys, "stdout", out)
    assert cli.main(["caption", str(library / "z"), "--json", *DIGEST]) == 0
    assert json.loads(out.getvalue())["path"] == str(library / "z" / "last.bmp")
    assert ("1/1" in err.getvalue()) is not stdout_is_a_terminal


@pytest.mark.parametrize(
    "sig, background",
    [(signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGTERM, True), (signal.SIGKILL, False)],
)
def test_an_interrupted_run_resumes_without_duplicates(
    tmp_path: Path, sig: signal.Signals, background: bool
) -> None:
    """`background`: started as a shell script's `&` job is, with SIGINT ignored."""
    folder = tmp_path / "many"
    for index in range(24):
        picture(folder / f"{index // 10}" / f"{index:02d}.png", index * 10)
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "docker_vit.cli", "caption", str(folder), "-o", str(out)]
    command += ["--handler", "folder_handlers:Slow", "--max-batch-size", "2"]
    ignore_sigint = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if background else None
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True, preexec_fn=ignore_sigint)
    deadline = time.monotonic() + 60
    while not (out.exists() and out.read_text().count("\n") >= 4):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()  # reading a live child's stderr to its end would wait for ever
            pytest.fail(f"four records never came: {finished(process, 30)[1]}")
        time.sleep(0.02)
    process.send_signal(sig)
    _, err = finished(process, 30)
    if sig != signal.SIGKILL:  # Ctrl-C 130; SIGTERM 143 as an exit status, not a death by the signal
        assert process.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig], err
        assert "interrupted" in err and "Traceback" not in err
    else:
        assert process.returncode == -signal.SIGKILL
    text = out.read_text()
    complete = text[: text.rfind("\n") + 1]
    done = [json.loads(line)["path"] for line in complete.splitlines()]  # every whole line is valid
    assert 4 <= len(done) < 24
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert rerun.returncode == 0, rerun.stderr
    paths = [entry["path"] for entry in lines(out)]
    assert sorted(paths) == sorted(str(path) for path in folder.rglob("*.png")) and len(set(paths)) == 24
    assert paths[: len(done)] == done  # the first run's captions were kept, not redone


def test_a_handler_that_exits_ends_the_run_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A SystemExit from predict is the model failing, said in one line: not a silent exit code."""
    image = tmp_path / "a.png"
    image.write_bytes(b"exit")
    code = cli.main(
        ["caption", str(image), "--handler", "fake_handlers:Exiting", "-o", str(tmp_path / "o.jsonl")]
    )
    err = capsys.readouterr().err
    assert code == 1 and "the model failed: RuntimeError: the handler raised SystemExit" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("text", "handler", "words"),
    [
        ("plain-string", "Misbehaving", "respond returned a str, not a Result"),
        ("nan-data", "Misbehaving", "respond returned something that is not JSON"),
        ("a", "OptionsCrash", "options() failed: RuntimeError: options are broken"),
        ("a", "OptionsUnhashable", "unhashable list"),
        ("a", "ShortPredict", "0 outputs for 1 items"),
    ],
)
def test_a_handler_breaking_the_interface_ends_the_run_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, text: str, handler: str, words: str
) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(text.encode())
    out = tmp_path / "o.jsonl"
    code = cli.main(["caption", str(image), "--handler", f"fake_handlers:{handler}", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and words in err, err
    assert "Traceback" not in err


def test_a_predict_answering_once_per_batch_is_not_hidden_by_retries(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Halves down to one image would each pass: the mistake must end the run, not be retried."""
    for name in "abc":
        (tmp_path / f"{name}.png").write_bytes(name.encode())
    out = tmp_path / "o.jsonl"
    code = cli.main(["caption", str(tmp_path), "--handler", "fake_handlers:OncePerBatch", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and "1 outputs for 3 items" in err, err
    assert not out.exists() or out.read_text() == ""


def test_a_handler_with_its_own_fields_gets_none_of_the_captioners(tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(b"words")
    out = tmp_path / "o.jsonl"
    assert cli.main(["caption", str(image), "--handler", "fake_handlers:OwnFields", "-o", str(out)]) == 0
    entry = json.loads(out.read_text())
    assert entry["caption"] == "words" and "num_beams" not in entry


def test_a_folder_without_images_says_so(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "notes.txt").write_text("not a picture")
    assert cli.main(["caption", str(tmp_path)]) == 0
    assert "no images found" in capsys.readouterr().err


def test_a_folder_that_cannot_be_read_makes_the_exit_status_1(
    library: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Its images were not captioned: a run to repeat, like a skipped file."""
    listdir = os.listdir
    locked = str(library / "2020")

    def refuse(path: str = ".") -> list[str]:
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied")
        return listdir(path)

    monkeypatch.setattr(os, "listdir", refuse)
    out = tmp_path / "o.jsonl"
    assert cli.main(["caption", str(library), "-o", str(out), *DIGEST]) == 1
    assert "skipping folder" in capsys.readouterr().err and len(lines(out)) == 3


def test_a_fifo_or_an_endless_file_is_skipped_not_waited_on(library: Path, tmp_path: Path) -> None:
    os.mkfifo(library / "pipe.jpg")
    os.symlink("/dev/zero", library / "zero.png")
    out = tmp_path / "o.jsonl"
    command = [sys.executable, "-m", "docker_vit.cli", "caption", str(library), "-o", str(out), *DIGEST]
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "pipe.jpg: not a regular file" in done.stderr and "zero.png: not a regular file" in done.stderr
    assert len(lines(out)) == 5


@pytest.mark.parametrize(("closed", "fmt"), [(">&-", []), (">&-", ["--format", "csv"]), ("2>&-", ["-o"])])
def test_a_closed_stdout_or_stderr_costs_what_went_there_not_the_run(
    library: Path, tmp_path: Path, closed: str, fmt: list[str]
) -> None:
    """`>&-` and `2>&-` leave Python a None stream: a traceback (or, for stderr, a silent exit 1 with no
    file written) where the shell only asked for quiet."""
    out = tmp_path / "o.jsonl"
    args = [str(out)] if fmt == ["-o"] else []
    command = [
        sys.executable,
        "-m",
        "docker_vit.cli",
        "caption",
        str(library / "b.png"),
        *fmt,
        *args,
        *DIGEST,
    ]
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    done = subprocess.run(
        ["bash", "-c", f'"$@" {closed}', "-", *command], env=env, capture_output=True, timeout=60
    )
    assert done.returncode == 0 and b"Traceback" not in done.stderr + done.stdout
    assert len(lines(out)) == 1 if args else not out.exists()


def test_closed_streams_leave_no_descriptor_for_a_file_to_take(tmp_path: Path) -> None:
    """`<&- >&- 2>&-`: descriptor 2 left free would be the next file's (the captions file), and a
    library's own writes to stderr would land in it."""
    script = (
        "import os; from docker_vit.cli import _open_closed_streams; _open_closed_streams(); "
        f"f = open({str(tmp_path / 'out.txt')!r}, 'w'); os.write(2, b'native stderr'); f.write('rows'); f.close()"
    )
    command = f"{shlex.quote(sys.executable)} -c {shlex.quote(script)} <&- >&- 2>&-"
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    assert subprocess.run(["bash", "-c", command], env=env, timeout=60).returncode == 0
    assert (tmp_path / "out.txt").read_text() == "rows"


@pytest.mark.parametrize("fmt", [[], ["--json"], ["--format", "csv"]])
def test_a_file_name_that_is_not_utf8_is_printed_as_its_bytes(tmp_path: Path, fmt: list[str]) -> None:
    """On stdout too (a strict UTF-8 stdout could not print it, and the whole run stopped)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(picture(tmp_path / "x.png", 70), os.path.join(os.fsencode(folder), b"caf\xe9.png"))
    picture(folder / "z.png", 80)
    command = [sys.executable, "-m", "docker_vit.cli", "caption", str(folder), *fmt, *DIGEST]
    env = {**os.environ, "PYTHONPATH": str(TESTS), "PYTHONIOENCODING": "utf-8"}
    done = subprocess.run(command, env=env, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert b"caf\xe9.png" in done.stdout and b"z.png" in done.stdout


@pytest.mark.parametrize("fmt", [[], ["--json"], ["--format", "csv"]])
def test_a_stdout_that_is_not_utf8_gets_what_it_cannot_encode_escaped(tmp_path: Path, fmt: list[str]) -> None:
    """A Windows redirect (cp1252) met a CJK name and the run ended with no caption written at all."""
    folder = tmp_path / "photos"
    picture(folder / "猫.png", 70)
    picture(folder / "🎉.png", 75)
    picture(folder / "z.png", 80)
    command = [sys.executable, "-m", "docker_vit.cli", "caption", str(folder), *fmt, *DIGEST]
    env = {**os.environ, "PYTHONPATH": str(TESTS), "PYTHONIOENCODING": "cp1252"}
    done = subprocess.run(command, env=env, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert b"\\u732b.png" in done.stdout and b"z.png" in done.stdout and done.stdout.count(b"picture") == 3
    if fmt == ["--json"]:  # still JSON, whatever a name holds (an emoji's escape must be JSON's too)
        assert [Path(json.loads(line)["path"]).name for line in done.stdout.splitlines()] == [
            "z.png",
            "猫.png",
            "🎉.png",
        ]


def test_every_format_the_intake_decodes_is_walked(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    names = ("a.jfif", "b.ppm", "c.tga", "d.ico", "e.mpo", "f.apng", "g.pgm", "h.pbm", "i.pnm")
    for name in names:
        image = Image.new("RGB", (8, 8), (10, 20, 30))
        kind = {"jfif": "JPEG", "mpo": "JPEG", "apng": "PNG", "pgm": "PPM", "pbm": "PPM", "pnm": "PPM"}
        sizes = {"sizes": [image.size]} if name == "d.ico" else {}  # Pillow before 13: no icon under 16 px
        image.convert("L" if name[2:] in ("pgm", "pbm") else "RGB").save(
            tmp_path / name, format=kind.get(name[2:], name[2:].upper()), **sizes
        )
    assert cli.main(["caption", str(tmp_path), "-o", "-", "--json", *DIGEST]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(names) and not (Path.cwd() / "-").exists()


def test_pictures_the_intake_cannot_read_are_counted_not_failed(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A phone's folder: its HEIC and AVIF files are passed over with a count, the JPEGs captioned."""
    picture(tmp_path / "a.jpg", 10)
    for name in ("b.HEIC", "c.heic", "d.cr3", "e.avif", "notes.txt", ".hidden.heic"):
        (tmp_path / name).write_bytes(b"not read")
    assert cli.main(["caption", str(tmp_path), *DIGEST]) == 0
    out, err = capsys.readouterr()
    [line] = out.splitlines()
    assert line.startswith(f"{tmp_path / 'a.jpg'}: picture ")
    assert "passed over 4 pictures in formats not read (1 avif, 1 cr3, 2 heic); convert to JPEG" in err
    for name in ("b.HEIC", "c.heic", "d.cr3"):
        (tmp_path / name).unlink()
    assert cli.main(["caption", str(tmp_path), *DIGEST]) == 0
    assert "passed over 1 picture in formats not read (1 avif)" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["captions.json", "captions.txt", "captions.TSV", "captions.xlsx"])
def test_a_json_file_name_is_told_it_gets_json_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture, name: str
) -> None:
    out = tmp_path / name
    assert cli.main(["caption", str(photo("coffee.jpg")), "-o", str(out), *DIGEST]) == 0
    assert f"{out} gets JSON lines, one record per line" in capsys.readouterr().err
    assert json.loads(out.read_text().splitlines()[0])["caption"].startswith("picture ")
    assert cli.main(["caption", str(photo("coffee.jpg")), "-o", str(out), "--format", "jsonl", *DIGEST]) == 0
    assert "gets JSON lines" not in capsys.readouterr().err  # asked for by name


def test_a_full_disk_ends_the_run_with_one_line(tmp_path: Path) -> None:
    """A write the file system refuses (here past a file-size limit) is one line and exit 1: the
    buffered rest of the records failed again on close, as a traceback."""
    for shade in range(30):
        picture(tmp_path / "many" / f"{shade:02}.png", shade)
    command = [
        sys.executable,
        "-m",
        "docker_vit.cli",
        "caption",
        str(tmp_path / "many"),
        "-o",
        str(tmp_path / "o.jsonl"),
    ]
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))  # noqa: E731
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [*command, *DIGEST[:2], "--max-batch-size", "30"],
        env=env,
        capture_output=True,
        text=True,
        preexec_fn=limit,
        timeout=60,
    )
    said = f"docker-vit: cannot write {tmp_path / 'o.jsonl'}: File too large"
    assert done.returncode == 1 and said in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_an_output_that_cannot_be_opened_or_written_is_named_once(library: Path, tmp_path: Path) -> None:
    """One line naming the file once: a folder that is not there, a CSV header past a size limit."""
    missing = tmp_path / "nowhere" / "o.csv"
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    command = [sys.executable, "-m", "docker_vit.cli", "caption", str(library), *DIGEST[:2], "-o"]
    done = subprocess.run([*command, str(missing)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert f"docker-vit: cannot use {missing}: No such file or directory\n" in done.stderr, done.stderr
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))  # noqa: E731
    out = tmp_path / "o.csv"
    done = subprocess.run(
        [*command, str(out)], env=env, capture_output=True, text=True, preexec_fn=limit, timeout=60
    )
    assert done.returncode == 1
    assert f"docker-vit: cannot write {out}: File too large\n" in done.stderr, done.stderr
    assert "cannot use" not in done.stderr


@pytest.mark.parametrize(
    ("name", "held", "said"),
    [
        ("o.csv", '{"path": "a.jpg", "caption": "x"}\n', "holds JSON lines, not CSV: add --format jsonl"),
        (
            "o.jsonl",
            "path,caption,model\na.jpg,x,m\n",
            "holds CSV captions, not JSON lines: add --format csv",
        ),
    ],
)
def test_a_captions_file_of_the_other_format_is_named_as_such(
    name: str, held: str, said: str, tmp_path: Path
) -> None:
    path = tmp_path / name
    path.write_text(held)
    with pytest.raises(CaptionsFileError, match=said):
        CaptionsFile(str(path), format_for(str(path), None))
    assert path.read_text() == held


@pytest.mark.parametrize(
    ("name", "held"),
    [
        ("o.jsonl", '{"path": "a.jpg", "caption": "x"}\n{"path": "b\\u0000.jpg", "caption": "y"}\n'),
        ("o.csv", "path,caption,model\na.jpg,x,m\n\0\0\0\0,y,m\nc.jpg,z,m\n"),  # zeros over a record
    ],
)
def test_a_path_with_a_nul_byte_is_no_captions_file(name: str, held: str, tmp_path: Path) -> None:
    """No file name holds a NUL: one line, not the traceback of the resume's path lookups."""
    path = tmp_path / name
    path.write_text(held)
    with pytest.raises(CaptionsFileError, match="has a path with a NUL byte: is it a captions file"):
        CaptionsFile(str(path), format_for(str(path), None))
    assert path.read_text() == held


def test_two_runs_never_write_one_file_at_once(tmp_path: Path) -> None:
    path = tmp_path / "o.jsonl"
    first = CaptionsFile(str(path), "jsonl")
    try:
        with pytest.raises(CaptionsFileError, match="another docker-vit caption run"):
            CaptionsFile(str(path), "jsonl")
    finally:
        first.close()
    with CaptionsFile(str(path), "jsonl") as again:  # free once the first run is done
        assert again.done == set()
    with CaptionsFile(os.devnull, "jsonl"), CaptionsFile(os.devnull, "jsonl"):  # one machine-wide lock
        pass  # would stop every other user's run that discards its captions


def test_no_json_undoes_the_variable(library: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("DOCKER_VIT_JSON", "1")
    assert cli.main(["caption", str(library / "b.png"), "--no-json", *DIGEST]) == 0
    assert capsys.readouterr().out.startswith("picture ")


@pytest.mark.parametrize(("flag", "starts"), [("--json", '{"path"'), ("--no-json", "picture ")])
def test_the_json_flag_wins_over_a_format_variable(
    library: Path, monkeypatch: pytest.MonkeyPatch, capsys, flag: str, starts: str
) -> None:
    """Flags win over variables: `--json` or `--no-json` with DOCKER_VIT_FORMAT=csv set is not CSV."""
    monkeypatch.setenv("DOCKER_VIT_FORMAT", "csv")
    assert cli.main(["caption", str(library / "b.png"), flag, *DIGEST]) == 0
    assert capsys.readouterr().out.startswith(starts)


@pytest.mark.parametrize("fragment", ["{", '{"pa', '{"path"', '{"path": "b.png", "capt'])
def test_a_record_cut_anywhere_is_dropped_without_leaving_a_blank_line(tmp_path: Path, fragment: str) -> None:
    path = tmp_path / "o.jsonl"
    path.write_text('{"path": "a.png", "caption": "x"}\n' + fragment)
    with CaptionsFile(str(path), "jsonl") as file:
        assert file.done == {"a.png"}
        file.write([{"path": "b.png", "caption": "y"}])
    assert path.read_text() == '{"path": "a.png", "caption": "x"}\n{"path": "b.png", "caption": "y"}\n'


def test_a_resume_never_skips_an_image_a_relative_record_might_not_mean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`./IMG_1.jpg` written from photos/2023 says nothing of its folder: read from another folder
    it must not stand for photos/IMG_1.jpg (camera names repeat across folders)."""
    picture(tmp_path / "photos" / "IMG_1.png", 10)
    picture(tmp_path / "photos" / "2023" / "IMG_1.png", 20)
    monkeypatch.chdir(tmp_path / "photos" / "2023")
    assert cli.main(["caption", ".", "-o", "../captions.jsonl", *DIGEST]) == 0
    monkeypatch.chdir(tmp_path)
    assert cli.main(["caption", "photos", "-o", "photos/captions.jsonl", *DIGEST]) == 0
    assert "photos/IMG_1.png" in [entry["path"] for entry in lines(tmp_path / "photos" / "captions.jsonl")]


def test_a_path_that_does_not_exist_is_said_before_any_model_loads(
    library: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A typo is told at once, not after a model load (or a download) that had nothing to caption."""
    missing = str(tmp_path / "typo.jpg")
    assert cli.main(["caption", missing, "--model", str(tmp_path / "no-model")]) == 1
    err = capsys.readouterr().err
    assert f"skipping {missing}: No such file or directory" in err and "cannot load" not in err
    out = tmp_path / "o.jsonl"
    assert cli.main(["caption", missing, str(library / "b.png"), "-o", str(out), *DIGEST]) == 1
    assert [Path(entry["path"]).name for entry in lines(out)] == ["b.png"]


def test_an_output_that_is_a_pipe_is_refused_with_the_hint(library: Path, tmp_path: Path) -> None:
    """`-o /dev/stdout | cat`: a pipe cannot be opened for appending and reading; the hint still shows."""
    command = [sys.executable, "-m", "docker_vit.cli", "caption", str(library), "-o", "/dev/stdout", *DIGEST]
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "/dev/stdout is not a regular file (for captions on stdout: -o - or no -o)" in done.stderr


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/full"])
def test_an_output_that_is_a_device_is_refused(library: Path, device: str, capsys) -> None:
    """Resuming reads the output first, and /dev/zero never ends: refused before reading."""
    assert cli.main(["caption", str(library), "-o", device, *DIGEST]) != 0
    assert f"{device} is not a regular file" in capsys.readouterr().err
    assert (
        cli.main(["caption", str(library), "-o", os.devnull, *DIGEST]) == 1
    )  # broken.jpg; /dev/null is fine


def test_links_to_one_file_keep_their_rows_whole_or_resumed(tmp_path: Path) -> None:
    """Names that lead to one file (a Hub snapshot's links to a shared blob) are rows of their own: a run
    cut short and resumed ends with the rows of a whole run."""
    folder = tmp_path / "snapshot"
    picture(tmp_path / "blobs" / "abc.png", 10)
    for name in ("0001.png", "0002.png"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).symlink_to(tmp_path / "blobs" / "abc.png")
    out = tmp_path / "out.jsonl"
    assert cli.main(["caption", str(folder), "-o", str(out), *DIGEST]) == 0
    whole = [Path(entry["path"]).name for entry in lines(out)]
    assert whole == ["0001.png", "0002.png"]
    out.write_text(out.read_text().splitlines(keepends=True)[0])  # as if killed after the first row
    assert cli.main(["caption", str(folder), "-o", str(out), *DIGEST]) == 0
    assert [Path(entry["path"]).name for entry in lines(out)] == whole
    assert cli.main(["caption", str(tmp_path / "blobs"), "-o", str(out), *DIGEST]) == 0  # named otherwise
    assert len(lines(out)) == 2  # already captioned, through its links
    out.write_text(out.read_text().splitlines(keepends=True)[0])  # cut short again, then resumed
    relative = os.path.relpath(folder)  # under another name for the folder: 0002.png is still missing
    assert cli.main(["caption", relative, "-o", str(out), *DIGEST]) == 0
    assert sorted(Path(entry["path"]).name for entry in lines(out)) == whole


def test_a_bad_handler_is_a_usage_error_as_under_serve(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    picture(tmp_path / "a.png", 1)
    with pytest.raises(SystemExit) as stopped:
        cli.main(["caption", str(tmp_path / "a.png"), "--handler", "no_such_module:Handler"])
    assert stopped.value.code == 2
    assert "error: cannot import no_such_module for --handler" in capsys.readouterr().err


def test_a_bad_handler_set_by_its_variable_is_named_by_it(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    picture(tmp_path / "a.png", 1)
    monkeypatch.setenv("DOCKER_VIT_HANDLER", "no_such_module:Handler")
    with pytest.raises(SystemExit) as stopped:
        cli.main(["caption", str(tmp_path / "a.png")])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "error: cannot import no_such_module for DOCKER_VIT_HANDLER no_such_module:Handler" in err
    (tmp_path / "flagged_words.py").write_text("raise ValueError('give --model a folder')\n")
    monkeypatch.chdir(tmp_path)  # the current folder is importable
    monkeypatch.setenv("DOCKER_VIT_HANDLER", "flagged_words:Handler")
    with pytest.raises(SystemExit):
        cli.main(["caption", str(tmp_path / "a.png")])
    err = capsys.readouterr().err  # the module's own words are its own: only the loader's flag is renamed
    assert "for DOCKER_VIT_HANDLER flagged_words:Handler: ValueError: give --model a folder" in err
    (tmp_path / "own_words.py").write_text(
        "from docker_vit.handler import Handler\n"
        "class H(Handler):\n"
        "    @property\n"
        "    def name(self):\n"
        "        raise RuntimeError('pass the name after --handler')\n"
        "    def prepare(self, data, options): return data\n"
        "    def predict(self, items, options): return items\n"
    )
    monkeypatch.setenv("DOCKER_VIT_HANDLER", "own_words:H")
    with pytest.raises(SystemExit):
        cli.main(["caption", str(tmp_path / "a.png")])
    assert "RuntimeError: pass the name after --handler" in capsys.readouterr().err  # its words first


@pytest.mark.parametrize("output", [["--json"], ["--format", "csv"]])
def test_a_reader_that_leaves_ends_the_run_quietly(tmp_path: Path, output: list[str]) -> None:
    """`docker-vit caption folder | head -1`: no "Broken pipe" error, the shell's SIGPIPE status; also
    when the reader is gone before a CSV header (unbuffered, as in the container)."""
    for index in range(40):
        picture(tmp_path / f"{index:02}.png", index)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    env["PYTHONUNBUFFERED"] = "1"
    command = [sys.executable, "-m", "docker_vit.cli", "caption", str(tmp_path), *DIGEST, *output]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if output == ["--json"]:
        with killed_after(process, 90):
            assert str(tmp_path) in process.stdout.readline()
    process.stdout.close()
    process.stdout = None  # closed here: `finished` reads stderr alone
    _, err = finished(process, 60)
    assert process.returncode == 141 and err == ""


def interrupted_at_mark(
    tmp_path: Path, handler: str, mark_variable: str, timeout: float
) -> tuple[subprocess.Popen, str]:
    """`caption tmp_path/a.png` with `handler`, sent Ctrl-C once the handler has touched the file that
    `mark_variable` names (its call is then hanging); the finished process and its stderr."""
    mark = tmp_path / "call-started"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    env[mark_variable] = str(mark)
    command = [sys.executable, "-m", "docker_vit.cli", "caption", str(tmp_path / "a.png")]
    command += ["--handler", handler, "-o", str(tmp_path / "out.jsonl")]
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not mark.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()  # the handler's call never returns: a child left behind would run for ever
            pytest.fail(f"the handler's call never started: {finished(process, 30)[1]}")
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    return process, finished(process, timeout)[1]


def test_ctrl_c_ends_a_run_whose_handler_hangs_in_prepare(tmp_path: Path) -> None:
    """The hung call's pool thread would be joined at exit, forever: the run exits 130 all the same."""
    (tmp_path / "a.png").write_bytes(b"stuck")  # fake_handlers.Stuck never returns from prepare on it
    process, err = interrupted_at_mark(tmp_path, "fake_handlers:Stuck", "STUCK_MARK", 30)
    assert process.returncode == 130 and "interrupted" in err and "Traceback" not in err


def test_ctrl_c_ends_a_run_whose_handler_keeps_a_thread_of_its_own(tmp_path: Path) -> None:
    """A handler's own non-daemon thread would be joined at exit, forever: the run exits 130 at once."""
    picture(tmp_path / "a.png", 1)
    # the handler's thread never ends: only an exit without joining finishes within 20 s
    process, err = interrupted_at_mark(tmp_path, "folder_handlers:Lingering", "LINGER_MARK", 20)
    assert process.returncode == 130 and "Traceback" not in err, err


@pytest.mark.parametrize(
    ("handler", "text", "said"),
    [
        ("Misbehaving", b"respond-refuses", "client's mistake"),  # from respond
        ("Misbehaving", b"not-yours", "client's mistake"),  # from prepare
        ("Quoting", b"pic", "cannot read 'pic'"),  # from predict
    ],
)
def test_input_the_handler_calls_the_clients_mistake_is_skipped_not_a_broken_model(
    tmp_path: Path, capsys: pytest.CaptureFixture, handler: str, text: bytes, said: str
) -> None:
    """An InputError from `predict` or `respond` (as from `prepare`) is the input's fault, as a server
    answers it 400: each image is skipped with its reason, and the run goes on past three such batches."""
    for index in range(5):
        (tmp_path / f"{index}.jpg").write_bytes(text)
    command = ["caption", str(tmp_path), "--handler", f"fake_handlers:{handler}", "--max-batch-size", "1"]
    assert cli.main(command) == 1
    err = capsys.readouterr().err
    assert err.count(said) == 5 and "the model failed" not in err, err


@pytest.mark.parametrize(
    ("stage", "said"), [("prepare", "this option does not fit"), ("predict", "num_beams must be 1..8")]
)
def test_options_the_handler_refuses_end_the_run_as_a_servers_422_does(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, stage: str, said: str
) -> None:
    """Every image would be refused alike: three batches that caption nothing, then the run ends (a
    `--url` run ends at the 422); a file that cannot be read among them changes nothing."""
    monkeypatch.setenv("STAGE", stage)
    for index in range(6):
        (tmp_path / f"{index}.jpg").write_bytes(b"pic")
    (tmp_path / "1.jpg").write_bytes(b"x" * 100)  # over --max-bytes: never reaches the handler
    command = ["caption", str(tmp_path), "--handler", "fake_handlers:RefusesOptions", "--max-bytes", "50"]
    assert cli.main([*command, "--max-batch-size", "1"]) == 1
    err = capsys.readouterr().err
    assert f"the handler refused this run's options in 3 batches in a row: {said}" in err, err
    assert err.count("skipping") == 4 and "5.jpg" not in err and "the model failed" not in err, err


@pytest.mark.parametrize("batch", ["1", "2"])
def test_options_refused_for_one_image_skip_that_image_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, batch: str
) -> None:
    """The run's options are not at fault: a rerun would otherwise stop at that image every time."""
    monkeypatch.setenv("STAGE", "one")
    for index in range(5):
        (tmp_path / f"{index}.jpg").write_bytes(b"odd" if index == 0 else b"pic")
    command = [
        "caption",
        str(tmp_path),
        "--handler",
        "fake_handlers:RefusesOptions",
        "--max-batch-size",
        batch,
    ]
    assert cli.main(command) == 1
    out, err = capsys.readouterr()
    assert err.count("skipping") == 1 and "refused this run's options" not in err, err
    assert out.count(": pic") == 4


@pytest.mark.parametrize(
    ("handler", "reason"),
    [
        ("Broken", "RuntimeError: no such device"),
        ("PrepareBroken", "RuntimeError: no such table"),
        (
            "PrepareMissingFile",
            "FileNotFoundError: [Errno 2] No such file or directory: '/nonexistent/vocab.txt'",
        ),
    ],
)
def test_a_model_that_fails_on_everything_ends_the_run(
    library: Path, tmp_path: Path, capsys: pytest.CaptureFixture, handler: str, reason: str
) -> None:
    """Not one retried halving per image of the whole folder, nor, when the handler's prepare fails
    (a server answers it 500, and `--url` gives up after three rounds), a skip of every image: three
    batches failing throughout end the run."""
    for shade in range(12):
        picture(library / "more" / f"{shade:02}.png", 100 + shade)
    out = tmp_path / "out.jsonl"
    command = ["caption", str(library), "-o", str(out), "--handler", f"folder_handlers:{handler}"]
    assert cli.main([*command, "--max-batch-size", "2"]) == 1
    err = capsys.readouterr().err
    assert f"the model failed: {reason}" in err
    assert f"the model failed on every image of 3 batches in a row: {reason}" in err
    assert (
        out.read_text() == "" and 3 * 2 <= err.count("skipping") <= 3 * 2 + 1
    )  # three batches, a broken file
    assert sum(Digest.batches) <= 3 * (2 + 1 + 1)  # three batches, halved


def test_a_device_that_fails_for_good_ends_the_run_at_its_first_batch(
    library: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A fault that poisons a GPU fails every later call: no halves, no second batch."""
    Digest.batches.clear()
    out = tmp_path / "out.jsonl"
    command = ["caption", str(library), "-o", str(out), "--handler", "folder_handlers:DeviceLost"]
    assert cli.main([*command, "--max-batch-size", "2"]) == 1
    err = capsys.readouterr().err
    assert "the device failed: RuntimeError: CUDA error: an illegal memory access was encountered" in err
    assert len(Digest.batches) == 1 and out.read_text() == ""  # one call: no halves, no next batch


@pytest.mark.parametrize(
    ("fatal", "batch", "written", "calls", "unseen"),
    [
        ("03.png", "4", ["01.png", "02.png"], [4, 2, 2], []),  # out of memory; the half that ran stands
        ("01.png", "4", [], [4, 2], ["03.png", "04.png"]),  # then its first half loses the device
    ],
)
def test_a_lost_device_ends_the_run_after_its_batch_with_no_call_on_the_dead_device(
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    fatal: str,
    batch: str,
    written: list[str],
    calls: list[int],
    unseen: list[str],
) -> None:
    for index in range(1, 6):
        picture(tmp_path / "photos" / f"{index:02}.png", 40 * index)
    LostLater.fatal = {LostLater(Settings()).prepare((tmp_path / "photos" / fatal).read_bytes(), None)}
    LostLater.lost = False
    Digest.batches.clear()
    out = tmp_path / "out.jsonl"
    command = ["caption", str(tmp_path / "photos"), "-o", str(out), "--handler", "folder_handlers:LostLater"]
    try:
        assert cli.main([*command, "--max-batch-size", batch]) == 1
    finally:
        LostLater.fatal, LostLater.lost = set(), False
    err = capsys.readouterr().err
    assert "the device failed: RuntimeError: CUDA error: an illegal memory access" in err
    assert [Path(entry["path"]).name for entry in lines(out)] == written
    assert Digest.batches == calls
    for name in unseen:  # the other half: the model never saw it
        assert f"{name}: not run: the device failed before its turn" in err


def test_only_predict_tells_that_the_device_was_lost(
    library: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """CUDA's words from `prepare` skip that image; the run goes on, as a server answers it 500."""
    PrepareSaysCuda.fatal = {PrepareSaysCuda(Settings()).prepare((library / "b.png").read_bytes(), None)}
    out = tmp_path / "out.jsonl"
    command = ["caption", str(library), "-o", str(out), "--handler", "folder_handlers:PrepareSaysCuda"]
    try:
        assert cli.main([*command, "--max-batch-size", "2"]) == 1
    finally:
        PrepareSaysCuda.fatal = set()
    err = capsys.readouterr().err
    assert "the device failed" not in err and "b.png: the model failed: RuntimeError: CUDA error" in err
    assert sorted(Path(entry["path"]).name for entry in lines(out)) == [
        "a.JPG",
        "beach.webp",
        "c.gif",
        "last.bmp",
    ]


def test_a_respond_bug_is_not_retried_in_halves(
    library: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """respond's mistake is the same whatever the batch: the model runs once a batch, as on a server."""
    out = tmp_path / "out.jsonl"
    command = ["caption", str(library), "-o", str(out), "--handler", "folder_handlers:RespondBroken"]
    assert cli.main([*command, "--max-batch-size", "2"]) == 1
    assert "respond returned a str, not a Result" in capsys.readouterr().err
    assert Digest.batches == [1, 2, 2]  # the first batch: the broken picture, refused, and c.gif


def test_a_picture_over_a_limit_names_the_flag_that_raises_it(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A camera's 48-megapixel photo is over the default 40: the line says how to let it in."""
    picture(tmp_path / "big.png", 10)  # 8 x 8 pixels, over a limit of 63
    assert cli.main(["caption", str(tmp_path / "big.png"), *DIGEST, "--max-pixels", "63"]) == 1
    assert "big.png: image is 8x8 pixels; the limit is 63 (--max-pixels raises it)" in capsys.readouterr().err


def test_a_json_line_holds_no_line_break_of_any_reader() -> None:
    """U+2028, U+2029 and U+0085 end lines for `str.splitlines`: a caption holding one stays one record."""
    entry = {"path": "a\u2028b.png", "caption": "x\u2029y\u0085z\nw"}
    line = encode(entry, "jsonl")
    assert line.splitlines() == [line[:-1]] and json.loads(line) == entry
