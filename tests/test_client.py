"""`docker-vit caption --url`: the same captions through a real server on loopback."""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
import types
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import uvicorn
from conftest import photo, ready
from PIL import Image

from docker_vit import cli, client, ordered, transport
from docker_vit.config import Settings
from docker_vit.progress import Progress
from docker_vit.server import create_app


@contextmanager
def live_server(settings: Settings) -> Iterator[str]:
    """The real app under uvicorn in a thread, on a free loopback port; yields its URL once ready.

    Ready, not just started: transformers' loading is not thread-safe, so a test must not load a
    model in this process while the server still loads its own.
    """
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        deadline = time.monotonic() + 60
        while not (server.started and ready(url)):
            assert time.monotonic() < deadline and thread.is_alive(), "the server never became ready"
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pictures")
    for name in ("astronaut.jpg", "chelsea.jpg", "coffee.jpg", "french_bulldog.jpg"):
        (folder / "sub" if name.startswith("c") else folder).mkdir(exist_ok=True)
        target = folder / "sub" / name if name.startswith("c") else folder / name
        target.write_bytes(photo(name).read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG but not really")
    return folder


@pytest.fixture(scope="module")
def server(vit_gpt2_dir: Path) -> Iterator[str]:
    with live_server(Settings(model=str(vit_gpt2_dir), api_keys=("sesame",), max_batch_size=4)) as url:
        yield url


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_url_gives_the_same_output_as_a_local_run(
    server: str, vit_gpt2_dir: Path, pictures: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    common = ["caption", str(pictures), "--num-beams", "2", "--max-new-tokens", "6"]
    local, remote = tmp_path / "local.jsonl", tmp_path / "remote.jsonl"
    assert cli.main([*common, "-o", str(local), "--model", str(vit_gpt2_dir)]) == 1  # broken.png skipped
    assert capsys.readouterr().err.count("skipping") == 1
    flags = ["--url", server, "--api-key", "sesame", "--concurrency", "3"]
    assert cli.main([*common, "-o", str(remote), *flags]) == 1
    err = capsys.readouterr().err
    assert err.count("skipping") == 1 and "broken.png: the server answered 415" in err
    assert read(remote) == read(local) and len(read(local)) == 4
    assert read(remote)[0]["model"] == str(vit_gpt2_dir) and read(remote)[0]["num_beams"] == 2
    (pictures / "broken.png").rename(pictures / "broken.txt")  # resume: nothing left but a skip gone
    try:
        assert cli.main([*common, "-o", str(remote), *flags]) == 0
    finally:
        (pictures / "broken.txt").rename(pictures / "broken.png")
    assert len(read(remote)) == 4


def test_url_leaves_unset_options_to_the_servers_defaults_and_limits(
    vit_gpt2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that allows 2 beams and 5 tokens, with beam 1 by default: the client's own defaults
    (4 and 15) would be refused, and would override the server's choice."""
    settings = Settings(model=str(vit_gpt2_dir), num_beams=1, max_num_beams=2, max_new_tokens=5)
    settings = dataclasses.replace(settings, max_new_tokens_limit=5)
    out = tmp_path / "o.jsonl"
    with live_server(settings) as url:
        assert cli.main(["caption", str(photo("coffee.jpg")), "-o", str(out), "--url", url]) == 0
        monkeypatch.setenv("DOCKER_VIT_NUM_BEAMS", "2")  # a variable counts as chosen, like a flag
        assert cli.main(["caption", str(photo("chelsea.jpg")), "-o", str(out), "--url", url]) == 0
    first, second = read(out)
    assert (first["num_beams"], first["max_new_tokens"]) == (1, 5)
    assert (second["num_beams"], second["max_new_tokens"]) == (2, 5)


def test_a_handler_reading_num_beams_keeps_its_default_locally_and_through_url(
    pictures: Path, tmp_path: Path
) -> None:
    """Only what the user set is sent, in both modes: the caption CLI's own defaults (4 beams) must not
    override a handler's (1 beam) that names num_beams among its options."""
    common = ["caption", str(pictures / "sub"), "--handler", "folder_handlers:Beamed"]
    local, remote = tmp_path / "local.jsonl", tmp_path / "remote.jsonl"
    assert cli.main([*common, "-o", str(local)]) == 0
    with live_server(Settings(handler="folder_handlers:Beamed")) as url:
        assert cli.main([*common, "-o", str(remote), "--url", url]) == 0
    assert read(remote) == read(local) and read(local)[0]["caption"].endswith("at 1 beams")
    assert "num_beams" not in read(local)[0]
    local.unlink()
    assert cli.main([*common, "-o", str(local), "--num-beams", "3"]) == 0
    assert read(local)[0]["caption"].endswith("at 3 beams") and read(local)[0]["num_beams"] == 3


@pytest.mark.parametrize("handler", ["folder_handlers:Digest", "folder_handlers:Shaded"])
def test_url_and_local_runs_record_alike_for_a_handler_of_other_options(
    handler: str, pictures: Path, tmp_path: Path
) -> None:
    """Digest names no options: only what the user set is sent and recorded. Shaded names its own:
    the captioner's --num-beams is neither sent to it nor recorded, locally or through --url."""
    common = ["caption", str(pictures / "sub"), "--handler", handler]
    local, remote = tmp_path / "local.jsonl", tmp_path / "remote.jsonl"
    assert cli.main([*common, "-o", str(local)]) == 0
    with live_server(Settings(handler=handler)) as url:
        assert cli.main([*common, "-o", str(remote), "--url", url]) == 0
        model = json.loads(urllib.request.urlopen(f"{url}/v1/model", timeout=10).read())
    assert read(remote) == read(local) and read(local)[0].keys() == {"path", "caption", "model"}
    assert model.get("options") == (["shade"] if handler.endswith("Shaded") else None)
    if handler.endswith("Shaded"):
        for out in (local, remote):
            out.unlink()
        assert cli.main([*common, "-o", str(local), "--num-beams", "3"]) == 0
        with live_server(Settings(handler=handler)) as url:
            assert cli.main([*common, "-o", str(remote), "--url", url, "--num-beams", "3"]) == 0
        assert read(remote) == read(local) and "num_beams" not in read(local)[0]


def test_a_server_whose_describe_fails_gets_only_the_options_set(
    pictures: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """/v1/model answers Docker-ViT's error (the handler's describe() failed): the captioner's own
    defaults are neither sent (a handler of no options refuses them) nor recorded, as locally."""
    common = ["caption", str(pictures / "sub"), "--handler", "folder_handlers:Mute"]
    local, remote = tmp_path / "local.jsonl", tmp_path / "remote.jsonl"
    assert cli.main([*common, "-o", str(local)]) == 0
    with live_server(Settings(handler="folder_handlers:Mute")) as url:
        assert cli.main([*common, "-o", str(remote), "--url", url]) == 0
    assert read(remote) == read(local) and read(local)[0].keys() == {"path", "caption", "model"}
    said = capsys.readouterr().err
    assert "/v1/model failed (" in said and "describe is broken): sending only the options set" in said


def test_a_handler_whose_model_is_no_string_still_gets_only_the_options_set(
    pictures: Path, tmp_path: Path
) -> None:
    """The server is known by its own `server` entry, not by `model`, which a handler's describe() may
    make any JSON: its records and options are the local run's, not the captioner's defaults (which
    this handler of no options would refuse with a 422, ending the run)."""
    common = ["caption", str(pictures / "sub"), "--handler", "folder_handlers:Versioned"]
    local, remote = tmp_path / "local.jsonl", tmp_path / "remote.jsonl"
    assert cli.main([*common, "-o", str(local)]) == 0
    with live_server(Settings(handler="folder_handlers:Versioned")) as url:
        assert cli.main([*common, "-o", str(remote), "--url", url]) == 0
    assert read(remote) == read(local) and read(local)[0].keys() == {"path", "caption", "model"}


def test_a_server_whose_describe_hangs_gets_only_the_options_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """No answer at /v1/model within the wait (a describe() that hangs; the server's own 504 comes
    only after its request timeout): as when it fails, the captioner's defaults are not sent."""
    sent: list[str] = []

    class Hanging(_Flaky):
        refusals = 0

        def do_GET(self) -> None:
            if self.path == "/v1/model":
                time.sleep(1.0)  # the client has left: nothing to answer
                return
            self._answer(200, {"status": "ready"})

        def do_POST(self) -> None:
            sent.append(self.path)
            super().do_POST()

    monkeypatch.setattr(client, "DESCRIBE_WAIT", 0.2)
    with stub_server(Hanging) as url:
        assert (
            cli.main(["caption", str(photo("coffee.jpg")), "-o", str(tmp_path / "o.jsonl"), "--url", url])
            == 0
        )
    assert (
        sent == ["/v1/captions"]
        and not {"num_beams", "max_new_tokens"} & read(tmp_path / "o.jsonl")[0].keys()
    )
    assert "/v1/model failed (no answer in 0.2 s): sending only the options set" in capsys.readouterr().err


def test_odd_words_of_a_server_on_itself_are_not_taken_for_limits_or_messages(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A Docker-ViT-shaped 500 without a message says its reason, not "None"; `max_bytes: true` is
    no byte limit (a bool is an int to Python): the image is sent, not skipped as over `True` bytes."""

    class Odd(_Flaky):
        refusals = 0
        answers = [(500, {"error": {}}), (200, {"model": "m", "limits": {"max_bytes": True}})]

        def do_GET(self) -> None:
            if self.path == "/v1/model":
                self._answer(*Odd.answers.pop())
            else:
                self._answer(200, {"status": "ready"})

    for _ in range(2):
        with stub_server(Odd) as url:
            assert cli.main(["caption", str(photo("coffee.jpg")), "-o", "-", "--json", "--url", url]) == 0
    said = capsys.readouterr()
    assert said.out.count('"caption": "a stub caption"') == 2
    assert "/v1/model failed (Internal Server Error): sending only the options set" in said.err


def test_url_holds_the_servers_limits_not_the_clients(
    vit_gpt2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Beams past the client's own default limit go through to a server that allows them; a file over
    the server's byte limit is skipped unsent; options the server refuses stop the run at once."""
    big = tmp_path / "pictures" / "big.jpg"
    big.parent.mkdir()
    big.write_bytes(photo("coffee.jpg").read_bytes() + b"\0" * 300_000)
    (tmp_path / "pictures" / "small.jpg").write_bytes(photo("chelsea.jpg").read_bytes())
    settings = Settings(model=str(vit_gpt2_dir), max_num_beams=12, max_bytes=250_000, max_new_tokens=3)
    out = tmp_path / "o.jsonl"
    with live_server(settings) as url:
        assert cli.main(["caption", str(big.parent), "-o", str(out), "--url", url, "--num-beams", "9"]) == 1
        err = capsys.readouterr().err  # no flag of this run raises the server's limit: no hint
        assert "big.jpg: the file is over the server's limit of 250000 bytes\n" in err
        assert [entry["num_beams"] for entry in read(out)] == [9]
        higher, lower = tmp_path / "higher.jsonl", tmp_path / "lower.jsonl"  # a flag lowers it, never raises
        assert (
            cli.main(["caption", str(big.parent), "-o", str(higher), "--url", url, "--max-bytes", "9999999"])
            == 1
        )
        assert "big.jpg: the file is over the server's limit of 250000 bytes\n" in capsys.readouterr().err
        assert (
            cli.main(["caption", str(big.parent), "-o", str(lower), "--url", url, "--max-bytes", "1000"]) == 1
        )
        err = capsys.readouterr().err
        assert "small.jpg: the file is over the limit of 1000 bytes (--max-bytes raises it)" in err
        assert len(read(higher)) == 1 and read(lower) == []
        refused = cli.main(["caption", str(photo("coffee.jpg")), "--url", url, "--num-beams", "13"])
        err = capsys.readouterr().err
        assert refused == 1 and err.count("num_beams must be between 1 and 12") == 1


def test_url_waits_out_a_full_queue(vit_gpt2_dir: Path, pictures: Path, tmp_path: Path) -> None:
    settings = Settings(model=str(vit_gpt2_dir), max_queue=1, max_batch_size=1, max_new_tokens=3)
    out = tmp_path / "o.jsonl"
    with live_server(settings) as url:
        code = cli.main(["caption", str(pictures), "-o", str(out), "--url", url, "--concurrency", "6"])
    assert code == 1 and len(read(out)) == 4  # broken.png skipped, every photo captioned


def test_a_wrong_api_key_stops_the_run_at_once(
    server: str, pictures: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out.jsonl"
    assert cli.main(["caption", str(pictures), "-o", str(out), "--url", server, "--api-key", "nope"]) == 1
    assert "401 missing or invalid API key" in capsys.readouterr().err
    assert out.read_text() == ""


def test_a_url_naming_the_route_gets_a_hint(
    server: str, pictures: Path, capsys: pytest.CaptureFixture
) -> None:
    assert cli.main(["caption", str(pictures), "--url", f"{server}/v1/captions"]) == 1
    assert "404" in (err := capsys.readouterr().err) and "give --url without /v1/captions" in err
    assert "/v1/model failed" not in err  # a 404 there is no describe() that failed


@pytest.mark.parametrize(
    "url",
    [
        "127.0.0.1:9300",
        "ftp://host",
        "http://",
        "http:///v1",
        "http://:9401",
        "http://@",
        "http://h x",
        "http://127.0.0.1:notaport",
        "http://h:99999",
        "http://h\nx",  # inside: blanks at either end of the variable are trimmed
        "http://127.0.0.1:9106?x=1",
        "http://h/#top",
    ],
)
def test_a_bad_url_stops_before_anything_with_one_line(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "o.jsonl"
    for args, env in [(["--url", url], None), ([], url)]:
        if env:
            monkeypatch.setenv("DOCKER_VIT_URL", env)
        with pytest.raises(SystemExit) as stop:
            cli.main(["caption", str(tmp_path / "nowhere"), "-o", str(out), *args])
        assert stop.value.code == 2 and not out.exists()
        assert "--url (DOCKER_VIT_URL) must be http:// or https://, a host" in capsys.readouterr().err


@pytest.mark.parametrize(
    "url",
    [
        "http://ann:hunter2@127.0.0.1:9401/",
        "ann:hunter2@127.0.0.1:9401",
        "http:/ann:hunter2@h",
        "http://ann:hunt?er2@127.0.0.1:9401",  # refused as no URL, and not shown either
        " http://ann:hunter2@127.0.0.1:9401",
    ],
)
def test_a_url_with_a_password_is_refused_without_echoing_it(url: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        cli.main(["caption", "x.jpg", "--url", url])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "hunter2" not in err and "hunt?er2" not in err
    assert "cannot hold a user or password" in err or "a URL holding an @ (not shown" in err


@pytest.mark.parametrize("url", ["http://h/?token=SECRET", "http://h/x#SECRET", "http://h:9/?a=1&key=SECRET"])
def test_a_url_with_a_query_is_refused_without_echoing_the_query(
    url: str, capsys: pytest.CaptureFixture
) -> None:
    """A gateway may take its key as `?token=`: the refusal, which lands in CI logs, names the rest."""
    with pytest.raises(SystemExit) as stop:
        cli.main(["caption", "x.jpg", "--url", url])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "SECRET" not in err and "a query (not shown" in err
    assert repr(url.split("?")[0].split("#")[0]) in err


def test_an_at_sign_past_the_host_is_no_user() -> None:
    from docker_vit.config import _user_info

    assert not _user_info("http://127.0.0.1:9401/v1?k=a@b") and not _user_info("http://h/a@b")
    assert not _user_info("http://@")  # no user: the host check says what is wrong


def test_an_unreachable_server_fails_fast(pictures: Path, capsys: pytest.CaptureFixture) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but not listening: connections are refused
        started = time.monotonic()
        assert cli.main(["caption", str(pictures), "--url", f"http://127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err
    assert time.monotonic() - started < 10 and "cannot reach" in err and "is it started?" in err


class _Flaky(BaseHTTPRequestHandler):
    """Ready at once; answers 503 with Retry-After to the first two caption requests, then captions
    (a subclass sets its own count, status, body and headers: a class of its own counts its own)."""

    refusals = 2
    refused: tuple[int, object, dict] = (
        503,
        {"error": {"type": "overloaded", "message": "busy"}},
        {"Retry-After": "0"},
    )

    def do_GET(self) -> None:
        self._answer(200, {"status": "ready"})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        kind = type(self)
        if kind.refusals > 0:
            kind.refusals -= 1
            self._answer(*kind.refused)
        else:
            self._answer(200, {"model": "stub", "captions": [{"text": "a stub caption", "score": 1}]})

    def _caption(self) -> None:
        self._answer(200, {"model": "stub", "captions": [{"text": "a stub caption"}]})

    def _answer(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def stub_server(handler: type[BaseHTTPRequestHandler], tls: ssl.SSLContext | None = None) -> Iterator[str]:
    """A stand-in server on a free loopback port, answering with `handler` (over TLS with `tls`); its URL."""
    stub = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if tls is not None:
        stub.socket = tls.wrap_socket(stub.socket, server_side=True)
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{stub.server_address[1]}"
    finally:
        stub.shutdown()
        stub.server_close()


def test_503_with_retry_after_is_retried(tmp_path: Path) -> None:
    with stub_server(_Flaky) as url:
        out = tmp_path / "out.csv"
        assert cli.main(["caption", str(photo("coffee.jpg")), "-o", str(out), "--url", url]) == 0
    assert _Flaky.refusals == 0
    assert out.read_text().splitlines() == [
        "path,caption,model,num_beams,max_new_tokens",
        f"{photo('coffee.jpg')},a stub caption,stub,4,15",  # no /v1/model to ask: ours sent and recorded
    ]


@pytest.mark.parametrize("retry_after", ["0", "-5", "nan", "a date", None, "3", "1e9"])
def test_a_busy_server_is_retried_after_its_retry_after_or_a_doubling_backoff(
    retry_after: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second or more is the server's to say; a 0 (or nothing usable) is no reason to hammer it."""

    class Busy(_Flaky):
        refusals = 4
        said = {} if retry_after is None else {"Retry-After": retry_after}
        refused = (503, {"error": {"type": "overloaded", "message": "busy"}}, said)

    waits: list[float] = []
    clock = types.SimpleNamespace(monotonic=time.monotonic, sleep=waits.append)
    with stub_server(Busy) as url:
        monkeypatch.setattr(client, "time", clock)
        assert (
            cli.main(["caption", str(photo("coffee.jpg")), "-o", str(tmp_path / "o.csv"), "--url", url]) == 0
        )
    if retry_after in ("3", "1e9"):
        assert waits == [float(retry_after) if retry_after == "3" else transport.MAX_DELAY] * 4
    else:
        assert len(waits) == 4, waits  # doubling, jittered: 0.5-1 s, then 1-2 s, 2-4 s, 4-8 s
        assert all(0.25 * 2**tries <= wait <= 0.5 * 2**tries for tries, wait in enumerate(waits, 1)), waits


class _Stranger(_Flaky):
    """Some other server: answers 200, but not with captions (bytes: as HTTP/1.0, with no length)."""

    body: object = {"status": "ok"}

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        if isinstance(self.body, bytes):
            self.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/html\r\n\r\n" + self.body)
            self.close_connection = True
        else:
            self._answer(200, self.body)


@pytest.mark.parametrize(
    "body",
    [
        {"status": "ok"},
        [1, 2],
        {"captions": []},
        {"captions": [{"text": 3}]},
        {"captions": [{"text": "one"}, {"text": "two"}]},  # two captions for the one image sent
        b"<html><h1>Welcome to nginx!</h1></html>",  # whole, though no length says so: not retried
        b'{"status": "ok"}',
        b"[" * 200_000,  # nested past Python's stack: bad JSON like any other, not a RecursionError
    ],
)
def test_a_200_without_captions_stops_the_run_with_a_clear_error(
    body: object, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _Stranger.body = body
    with stub_server(_Stranger) as url:
        assert (
            cli.main(["caption", str(photo("coffee.jpg")), "-o", str(tmp_path / "o.jsonl"), "--url", url])
            == 1
        )
    assert "did not answer with captions" in capsys.readouterr().err


class _Broken(_Flaky):
    """A server whose model fails on every image (500); counts the caption requests it got."""

    posts = 0

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        _Broken.posts += 1
        self._answer(500, {"error": {"type": "model_error", "message": "CUDA error: device lost"}})


def test_a_server_whose_model_fails_on_everything_ends_the_run_as_a_local_one_does(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Not 100,000 requests and warnings for a 100,000-image folder: three batches' worth in a row."""
    for index in range(12):
        Image.new("RGB", (8, 8), (index, 0, 0)).save(tmp_path / f"{index:02}.png")
    with stub_server(_Broken) as url:
        code = cli.main(
            ["caption", str(tmp_path), "-o", str(tmp_path / "o.jsonl"), "--url", url, "--concurrency", "2"]
        )
    err = capsys.readouterr().err
    assert code == 1 and "the server's model failed on 6 images in a row: the server answered 500" in err
    assert _Broken.posts <= 6 + 2 * 2  # the in-flight ones, at most, beyond the six


class _Gateway(_Flaky):
    """A proxy whose backend restarts: 502 to the first caption request, then captions."""

    refusals = 1
    refused = (502, {"error": "bad gateway"}, {})


def test_a_proxys_502_is_retried_saying_so_once(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with stub_server(_Gateway) as url:
        out = tmp_path / "out.jsonl"
        assert cli.main(["caption", str(photo("coffee.jpg")), "-o", str(out), "--url", url]) == 0
    assert _Gateway.refusals == 0 and json.loads(out.read_text())["caption"] == "a stub caption"
    assert capsys.readouterr().err.count(f"{url}: 502 Bad Gateway; trying again") == 1


class _Hangs(_Flaky):
    """A server up and answering, on which one image (a file holding `HANG`) always times out, after
    `after` seconds; its /v1/model says its request timeout is that long."""

    after = 0.0

    def do_GET(self) -> None:
        if self.path == "/v1/model":
            self._answer(200, {"model": "stub", "limits": {"request_timeout": _Hangs.after}})
        else:
            super().do_GET()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if b"HANG" in body:
            time.sleep(_Hangs.after)
            self._answer(
                504, {"error": {"type": "timeout", "message": "no answer within 2 s"}}, {"Retry-After": "0"}
            )
        else:
            self._caption()


@pytest.mark.parametrize(
    ("after", "changed"),
    [
        (0.0, {"ATTEMPTS": 2}),  # its tries spent
        (0.3, {"BUSY_WAIT": 0.5}),  # its time spent: 504s behind a long request timeout
        (0.5, {"BUSY_WAIT": 1.0, "TIMEOUT": 0.3, "MARGIN": 0.2}),  # one past the client's own timeout
    ],
)
def test_an_image_the_server_keeps_timing_out_on_is_skipped_and_the_run_goes_on(
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    after: float,
    changed: dict,
) -> None:
    """A rerun would meet the same image first: ending the run there, no run could ever pass it."""
    monkeypatch.setattr(_Hangs, "after", after)
    for name, value in changed.items():
        monkeypatch.setattr(client, name, value)
    for name, text in (("a.jpg", b"one"), ("h.jpg", b"HANG"), ("b.jpg", b"two")):
        (tmp_path / name).write_bytes(text)
    out = tmp_path / "o.jsonl"
    with stub_server(_Hangs) as url:
        assert cli.main(["caption", str(tmp_path), "-o", str(out), "--url", url]) == 1
    err = capsys.readouterr().err
    assert "h.jpg: the server answered 504 no answer within 2 s on the last try" in err
    assert [Path(entry["path"]).name for entry in read(out)] == ["a.jpg", "b.jpg"]


class _Drops(_Flaky):
    """Drops the connection on one image (a file holding `DROP`) every time; captions the others."""

    def do_POST(self) -> None:
        if b"DROP" not in self.rfile.read(int(self.headers["Content-Length"])):
            self._caption()
        self.close_connection = True


def test_a_run_that_ends_keeps_the_captions_that_came_back_behind_the_image_that_ended_it(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Answers wait in input order: those behind the failing image were dropped and made again."""
    monkeypatch.setattr(client, "ATTEMPTS", 2)
    for name, text in (("a.jpg", b"DROP"), ("b.jpg", b"one"), ("c.jpg", b"two")):
        (tmp_path / name).write_bytes(text)
    out = tmp_path / "o.jsonl"
    with stub_server(_Drops) as url:
        assert cli.main(["caption", str(tmp_path), "-o", str(out), "--url", url]) == 1
    assert "still failing" in capsys.readouterr().err
    assert [Path(entry["path"]).name for entry in read(out)] == ["b.jpg", "c.jpg"]


class _LastFirst(_Flaky):
    """Answers the image holding `FIRST` only once the two others have been answered."""

    others = threading.Semaphore(0)

    def do_POST(self) -> None:
        if b"FIRST" in self.rfile.read(int(self.headers["Content-Length"])):
            assert _LastFirst.others.acquire(timeout=10) and _LastFirst.others.acquire(timeout=10)
            time.sleep(0.5)  # their answers read by the client
        else:
            _LastFirst.others.release()
        self._caption()


def test_ctrl_c_while_a_caption_is_written_keeps_the_answers_waiting_behind_it(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """They were back, held for input order, and were dropped: made again on resume."""
    for name, text in (("a.jpg", b"FIRST"), ("b.jpg", b"one"), ("c.jpg", b"two")):
        (tmp_path / name).write_bytes(text)
    advance = Progress.advance

    def interrupted(self: Progress, count: int) -> None:  # the first record written, then Ctrl-C
        advance(self, count)
        raise KeyboardInterrupt

    monkeypatch.setattr(Progress, "advance", interrupted)
    out = tmp_path / "o.jsonl"
    with stub_server(_LastFirst) as url:
        assert cli.main(["caption", str(tmp_path), "-o", str(out), "--url", url]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert [Path(entry["path"]).name for entry in read(out)] == ["a.jpg", "b.jpg", "c.jpg"]


class _FailsThenCaptions(_Flaky):
    """A model error (500) on each image holding `FAIL`; the one holding `LAST` fails only once the two
    holding `OK` have been answered."""

    answered = threading.Semaphore(0)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if b"OK" in body:
            self._caption()
            _FailsThenCaptions.answered.release()
            return
        if b"LAST" in body:
            assert _FailsThenCaptions.answered.acquire(timeout=10)
            assert _FailsThenCaptions.answered.acquire(timeout=10)
            time.sleep(0.5)  # their answers read by the client
        self._answer(500, {"error": {"type": "model_error", "message": "the model failed"}})


def test_giving_up_on_a_broken_model_keeps_the_captions_already_back(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The run ends at the sixth failure in a row (three rounds of --concurrency 2); the answers that
    came back behind it were dropped, and made again on resume."""
    names = [f"a{index}.jpg" for index in range(5)] + ["a5.jpg", "b6.jpg", "b7.jpg"]
    for name, text in zip(names, [b"FAIL"] * 5 + [b"LAST", b"OK", b"OK"], strict=True):
        (tmp_path / name).write_bytes(text)
    out = tmp_path / "o.jsonl"
    with stub_server(_FailsThenCaptions) as url:
        command = ["caption", str(tmp_path), "-o", str(out), "--url", url, "--concurrency", "2"]
        assert cli.main(command) == 1
    assert "the server's model failed on 6 images in a row" in capsys.readouterr().err
    assert [Path(entry["path"]).name for entry in read(out)] == ["b6.jpg", "b7.jpg"]


class _KeyEverywhere(_Flaky):
    """A gateway (Runpod's load-balancing endpoint, say) that wants the key on every route, probes too."""

    seen: list[str] = []

    def do_GET(self) -> None:
        _KeyEverywhere.seen.append(f"GET {self.path} {self.headers.get('Authorization')}")
        if self._keyed():
            super().do_GET()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        if self._keyed():
            self._caption()

    def _keyed(self) -> bool:
        """True with the key; otherwise answers 401 itself."""
        if self.headers.get("Authorization") == "Bearer K":
            return True
        self._answer(401, {"error": {"type": "unauthorized", "message": "no key"}})
        return False


def test_the_key_goes_to_every_route_the_client_calls(capsys: pytest.CaptureFixture) -> None:
    with stub_server(_KeyEverywhere) as url:
        assert cli.main(["caption", str(photo("coffee.jpg")), "--url", url, "--api-key", "K"]) == 0
    assert capsys.readouterr().out == "a stub caption\n"
    assert "GET /readyz Bearer K" in _KeyEverywhere.seen


class _Elsewhere(_Flaky):
    """Redirects to `_KeyEverywhere` (which records the keys it is sent); its probe may pass."""

    target, ready = "", False

    def do_GET(self) -> None:
        if _Elsewhere.ready and self.path == "/readyz":
            super().do_GET()
        else:
            self._answer(302, {}, {"Location": f"{_Elsewhere.target}{self.path}"})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self._answer(302, {}, {"Location": f"{_Elsewhere.target}{self.path}"})


@pytest.mark.parametrize("ready", [False, True])
def test_a_redirect_stops_the_run_and_the_key_stays_home(ready: bool, capsys: pytest.CaptureFixture) -> None:
    """urllib followed redirects with the key to any host, and turned the upload into an empty GET."""
    _KeyEverywhere.seen = []
    with stub_server(_KeyEverywhere) as other, stub_server(_Elsewhere) as url:
        _Elsewhere.target, _Elsewhere.ready = other, ready
        assert cli.main(["caption", str(photo("coffee.jpg")), "--url", url, "--api-key", "K"]) == 1
    assert _KeyEverywhere.seen == []
    err = capsys.readouterr().err
    assert f"answered 302, redirecting to {other}/" in err and f": give --url {other}\n" in err


class _Plain(_Flaky):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self._caption()


def test_model_flags_that_url_leaves_to_the_server_are_said_to_be_ignored(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_VIT_DEVICE", "cpu")  # a variable set for other commands: not said
    with stub_server(_Plain) as url:
        command = ["caption", str(photo("coffee.jpg")), "--url", url, "--model", "m", "--max-batch-size", "4"]
        assert cli.main([*command, "--num-beams", "2"]) == 0
    err = capsys.readouterr().err
    assert "--max-batch-size, --model ignored with --url" in err and "--device" not in err


def test_client_flags_without_url_are_said_to_be_ignored(capsys: pytest.CaptureFixture) -> None:
    """A forgotten --url loads a model here: the key and concurrency given for a server say so."""
    command = ["caption", str(photo("coffee.jpg")), "--handler", "folder_handlers:Digest"]
    assert cli.main([*command, "--api-key", "k", "--concurrency", "3"]) == 0
    assert "--api-key, --concurrency ignored without --url: the model runs here" in capsys.readouterr().err
    assert cli.main(command) == 0
    assert "ignored" not in capsys.readouterr().err


class _Loading(_Flaky):
    """Loading its model at the first look, ready at the second; then captions."""

    looks = 0

    def do_GET(self) -> None:
        _Loading.looks += 1
        if self.path == "/readyz" and _Loading.looks == 1:
            self._answer(503, {"status": "loading", "error": None})
        else:
            self._answer(200, {"status": "ready"})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self._caption()


def test_a_server_still_loading_is_waited_for_saying_so(capsys: pytest.CaptureFixture) -> None:
    with stub_server(_Loading) as url:
        assert cli.main(["caption", str(photo("coffee.jpg")), "--url", url]) == 0
    out, err = capsys.readouterr()
    assert out == "a stub caption\n" and f"{url} is loading its model; waiting up to 10 min" in err


class _CutShort(_Flaky):
    """Its first caption answers break off: after 14 of the 500 bytes announced, and (with no length
    to tell) inside the head and inside the body; then it captions."""

    cuts = [b'HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n{"captions": [', b"HTTP/1.1 200 OK\r\n"]
    cuts.append(b'HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{"model": "stub/mo')

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        if _CutShort.cuts:
            self.wfile.write(_CutShort.cuts.pop())
            self.close_connection = True
        else:
            self._caption()


def test_an_answer_cut_short_is_retried(tmp_path: Path) -> None:
    with stub_server(_CutShort) as url:
        out = tmp_path / "out.jsonl"
        assert cli.main(["caption", str(photo("coffee.jpg")), "-o", str(out), "--url", url]) == 0
    assert _CutShort.cuts == [] and json.loads(out.read_text())["caption"] == "a stub caption"


class _RefusesFromTheHead(_Flaky):
    """A proxy's way with a big upload: refused from its head (401 for a wrong key, else 413) and the
    connection closed with the body unread, so the client's upload meets a broken pipe or a reset."""

    def do_POST(self) -> None:
        if int(self.headers["Content-Length"]) > 1_000_000:
            wrong = self.headers.get("Authorization") != "Bearer sesame"
            status, message = (401, "missing or invalid API key") if wrong else (413, "over 1 MB")
            self._answer(status, {"error": {"type": "refused", "message": message}}, {"Connection": "close"})
            self.close_connection = True
        else:
            self.rfile.read(int(self.headers["Content-Length"]))
            self._caption()


def test_an_answer_given_before_the_upload_was_in_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A phone's photo refused from the head is that answer (a skip, a wrong key), not a connection
    dropped again and again until the run ends saying "Broken pipe"."""
    monkeypatch.setattr(client, "ATTEMPTS", 2)  # the old way: two broken pipes, then the run's end
    (tmp_path / "a_big.jpg").write_bytes(b"\xff" * 12_000_000)
    (tmp_path / "coffee.jpg").write_bytes(photo("coffee.jpg").read_bytes())
    out = tmp_path / "out.jsonl"
    with stub_server(_RefusesFromTheHead) as url:
        argv = ["caption", str(tmp_path), "-o", str(out), "--url", url]
        assert cli.main([*argv, "--api-key", "sesame"]) == 1
        err = capsys.readouterr().err
        assert "skipping" in err and "a_big.jpg: the server answered 413 over 1 MB" in err
        assert [record["caption"] for record in read(out)] == ["a stub caption"]  # the run went on
        out.unlink()
        assert cli.main([*argv, "--api-key", "nope"]) == 1
    err = capsys.readouterr().err
    assert "answered 401 missing or invalid API key" in err and "Broken pipe" not in err


class _DropsTheUpload(_RefusesFromTheHead):
    """A big upload's connection closed with no answer at all."""

    def do_POST(self) -> None:
        self.close_connection = True


def _trusted_certificate(folder: Path, monkeypatch: pytest.MonkeyPatch) -> ssl.SSLContext:
    """A server context for 127.0.0.1 whose certificate the client's default context trusts."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        + ["-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
        + ["-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


@pytest.mark.skipif(shutil.which("openssl") is None, reason="makes its certificate with openssl")
def test_an_answer_given_before_the_upload_was_in_is_read_over_tls_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over TLS the broken upload is mostly an SSLEOFError, not a broken pipe or a reset: the 401 went
    unread, and the image was retried as a dropped connection. No answer at all still is one."""
    tls = _trusted_certificate(tmp_path, monkeypatch)
    for handler, status in ((_RefusesFromTheHead, 401), (_DropsTheUpload, None)):
        with stub_server(handler, tls) as url:
            upload = urllib.request.Request(f"{url}/v1/captions", data=b"\xff" * 12_000_000, method="POST")
            with pytest.raises((OSError, http.client.HTTPException)) as caught:
                transport.open_url(upload, timeout=10).close()
        assert getattr(caught.value, "code", None) == status, repr(caught.value)
        assert not isinstance(getattr(caught.value, "reason", caught.value), TimeoutError)  # no wait


def test_a_peer_that_does_not_speak_http_is_one_line(capsys: pytest.CaptureFixture) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def greet() -> None:  # an SSH server, say
            with contextlib.suppress(OSError):
                while True:
                    peer, _ = listener.accept()
                    peer.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
                    peer.close()

        threading.Thread(target=greet, daemon=True).start()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        assert cli.main(["caption", str(photo("coffee.jpg")), "--url", url]) == 1
    err = capsys.readouterr().err
    assert "cannot reach" in err and "not a complete HTTP answer" in err and "Traceback" not in err


def test_in_order_yields_in_input_order_and_raises_in_place() -> None:
    later_done = threading.Semaphore(0)

    def work(item: int) -> int:
        time.sleep((7 - item) * 0.005)  # later items finish first
        if item == 5:
            assert later_done.acquire(timeout=10) and later_done.acquire(timeout=10)  # 6 and 7 are done
            time.sleep(0.2)  # and their results handed over
            raise ValueError("five")
        if item > 5:
            later_done.release()
        return item * 10

    ahead: list[int] = []
    results = ordered.in_order(work, list(range(8)), workers=4, ahead=ahead)
    assert [next(results) for _ in range(5)] == [0, 10, 20, 30, 40]
    with pytest.raises(ValueError, match="five"):
        next(results)
    assert ahead == [60, 70]  # done behind it: the caller's to keep


def test_in_order_closed_early_hands_over_the_work_done_behind() -> None:
    """The consumer stopped (a Ctrl-C while it wrote): what is back is its to keep."""
    others = threading.Semaphore(0)

    def work(item: int) -> int:
        if item == 0:
            assert others.acquire(timeout=10) and others.acquire(timeout=10)
            time.sleep(0.2)  # and their results handed over
        else:
            others.release()
        return item * 10

    ahead: list[int] = []
    results = ordered.in_order(work, [0, 1, 2], workers=3, ahead=ahead)
    assert next(results) == 0
    results.close()
    assert ahead == [10, 20]


class _Restarted(_Flaky):
    """A Docker-ViT server of 2 beams by default that, after its first caption, is restarted with 1 beam
    by default (a redeploy mid-run): each caption says the beams it was made with."""

    defaults = {"num_beams": 2, "max_new_tokens": 5}

    def do_GET(self) -> None:
        if self.path == "/v1/model":
            generation = dict(_Restarted.defaults)
            self._answer(200, {"model": "stub", "generation": generation, "options": list(generation)})
        else:
            super().do_GET()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        sent = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        beams = sent["num_beams"][0] if "num_beams" in sent else _Restarted.defaults["num_beams"]
        _Restarted.defaults = {**_Restarted.defaults, "num_beams": 1}
        self._answer(200, {"model": "stub", "captions": [{"text": f"at {beams} beams"}]})


def test_a_server_restarted_with_other_defaults_mid_run_is_not_recorded_wrongly(tmp_path: Path) -> None:
    """The records name the server's defaults read at the start: those are sent with every image, so a
    server restarted with others mid-run still captions as the records say."""
    out = tmp_path / "out.jsonl"
    pictures = [str(photo(name)) for name in ("astronaut.jpg", "chelsea.jpg", "coffee.jpg")]
    with stub_server(_Restarted) as url:
        assert cli.main(["caption", *pictures, "-o", str(out), "--url", url, "--concurrency", "1"]) == 0
    records = read(out)
    assert len(records) == 3
    assert all(entry["caption"] == f"at {entry['num_beams']} beams" for entry in records), records
