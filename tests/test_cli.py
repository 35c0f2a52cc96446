"""The `docker-vit` command as a user runs it: a real server process, the curl call, env configuration."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import finished, free_port, photo

from docker_vit import cli, hub

DOCKER_VIT = [sys.executable, "-m", "docker_vit.cli"]


def wait_ready(port: int, process: subprocess.Popen, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    process.kill()  # not left serving after the test
    raise AssertionError(f"server never became ready: {finished(process, 30)[1]}")


@pytest.fixture(scope="module")
def server(vit_gpt2_dir: Path):
    """`docker-vit serve` configured only through DOCKER_VIT_* variables."""
    port = free_port()
    env = {
        **os.environ,
        "DOCKER_VIT_MODEL": str(vit_gpt2_dir),
        "DOCKER_VIT_PORT": str(port),
        "DOCKER_VIT_NUM_BEAMS": "2",
    }
    process = subprocess.Popen(
        [*DOCKER_VIT, "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_ready(port, process)
        yield port, process
    finally:
        process.send_signal(signal.SIGTERM)
        finished(process, 30)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_original_curl_call(server, vit_gpt2_dir: Path) -> None:
    port, _ = server
    image = photo("french_bulldog.jpg")
    answer = subprocess.run(
        ["curl", "-sS", "-F", f"file=@{image}", f"http://127.0.0.1:{port}/"],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    local = subprocess.run(
        [*DOCKER_VIT, "caption", str(image), "--model", str(vit_gpt2_dir), "--num-beams", "2"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    assert answer.decode() + "\n" == local
    assert answer and not answer.endswith(b"\n")


def test_version(capsys: pytest.CaptureFixture) -> None:
    from importlib import metadata

    with pytest.raises(SystemExit) as stopped:
        cli.main(["--version"])
    assert stopped.value.code == 0
    assert capsys.readouterr().out == f"docker-vit {metadata.version('docker-vit')}\n"


def test_environment_reaches_the_server(server) -> None:
    port, _ = server
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/model", timeout=10) as response:
        info = json.load(response)
    assert info["generation"]["num_beams"] == 2 and info["status"] == "ready"


def ready_server(model: Path) -> subprocess.Popen:
    """`docker-vit serve --model MODEL` on a free port, once it answers /readyz."""
    port = free_port()
    process = subprocess.Popen(
        [*DOCKER_VIT, "serve", "--model", str(model), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_ready(port, process)
    return process


def test_sigterm_exits_cleanly(vit_gpt2_dir: Path) -> None:
    process = ready_server(vit_gpt2_dir)
    process.send_signal(signal.SIGTERM)
    finished(process, 30)
    assert process.returncode == 0


def test_ctrl_c_stops_the_server_without_a_traceback(vit_gpt2_dir: Path) -> None:
    process = ready_server(vit_gpt2_dir)
    process.send_signal(signal.SIGINT)
    _, err = finished(process, 30)
    assert process.returncode == 130 and "Traceback" not in err and "Finished server process" in err


@pytest.mark.parametrize("where", ["import", "build"])
def test_sigterm_while_serve_starts_is_a_clean_stop(tmp_path: Path, where: str) -> None:
    """Before uvicorn runs (imports, building the app and its handler) a stop exits 0 at once: as PID 1
    in a container a process with no handler would not see it, and would wait for SIGKILL. Sent while
    a handler module imports, or while the handler is built, it is no load error either."""
    (tmp_path / "slow_start.py").write_text(
        "import os, signal, time\n"
        "from fake_handlers import Echo\n"
        "def stop():\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(60)\n"
        f"if {where == 'import'!r}:\n"
        "    stop()\n"
        "class Slow(Echo):\n"
        "    def __init__(self, settings):\n"
        "        stop()\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(__file__).parent)])}
    started = time.monotonic()
    command = [*DOCKER_VIT, "serve", "--handler", "slow_start:Slow", "--port", str(free_port())]
    process = subprocess.run(command, capture_output=True, text=True, timeout=50, env=env)
    assert process.returncode == 0, process.stderr
    assert time.monotonic() - started < 30 and "Traceback" not in process.stderr
    assert "error" not in process.stderr


def test_serve_exits_1_once_its_device_fails_for_good() -> None:
    """After a fault that poisons the GPU every call fails: `serve` says so and exits 1 (a container's
    restart policy, or Kubernetes, then starts a fresh process), having answered the request."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    command = [*DOCKER_VIT, "serve", "--handler", "fake_handlers:Misbehaving", "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(port, process)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/?mode=lost", data=b"a", headers={"Content-Type": "image/x"}
        )
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(request, timeout=30)
        assert answer.value.code == 500
    finally:
        _, err = finished(process, 60)
    assert process.returncode == 1, err
    assert "the device failed: RuntimeError: CUDA error: an illegal memory access" in err
    assert "Traceback" not in err.split("the device failed")[1]  # the stop itself is clean


@pytest.mark.parametrize("limit", [["--max-pixels", "1000"], ["--max-bytes", "100"]])
def test_limits_below_the_warm_up_image_stop_serve_with_one_line(vit_gpt2_dir: Path, limit: list) -> None:
    command = [*DOCKER_VIT, "serve", "--model", str(vit_gpt2_dir), "--port", str(free_port()), *limit]
    process = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert process.returncode == 1 and "Traceback" not in process.stderr
    assert "the limits refuse even the warm-up input" in process.stderr and "the limit is" in process.stderr


def test_a_taken_port_ends_serve_at_once_while_the_model_loads() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        command = [*DOCKER_VIT, "serve", "--handler", "fake_handlers:SlowLoad"]  # a 30 s load
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
        process = subprocess.run(
            [*command, "--port", str(taken.getsockname()[1])],
            capture_output=True,
            text=True,
            timeout=25,
            env=env,
        )
    assert process.returncode == 1 and "address already in use" in process.stderr
    assert "Traceback" not in process.stderr and "handler call unfinished" not in process.stderr


def test_caption_prints_captions_and_json(vit_gpt2_dir: Path, capsys: pytest.CaptureFixture) -> None:
    paths = [str(photo("coffee.jpg")), str(photo("chelsea.jpg"))]
    assert cli.main(["caption", paths[0], "--model", str(vit_gpt2_dir)]) == 0
    single = capsys.readouterr().out.strip()
    assert cli.main(["caption", *paths, "--model", str(vit_gpt2_dir), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["path"] for line in lines] == paths and lines[0]["caption"] == single


def test_caption_names_a_misspelt_variable(
    vit_gpt2_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("DOCKER_VIT_MAX_NEW_TOKEN", "3")
    assert cli.main(["caption", str(photo("coffee.jpg")), "--model", str(vit_gpt2_dir)]) == 0
    hint = "(did you mean DOCKER_VIT_MAX_NEW_TOKENS?)"
    assert f"docker-vit: DOCKER_VIT_MAX_NEW_TOKEN is not a Docker-ViT setting and is ignored {hint}" in (
        capsys.readouterr().err
    )


def test_bad_options_are_usage_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_VIT_PORT", "not-a-port")
    with pytest.raises(SystemExit) as info:
        cli.main(["serve"])
    assert info.value.code == 2


_NOT_SHOWN = "unrecognized arguments: --api-keys and 1 value, not shown"


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["serve", "--api-keys", "s3cret"], f"{_NOT_SHOWN} (did you mean --api-key?)"),
        (["serve", "--api-keys", "-s3cret"], f"{_NOT_SHOWN} (did you mean --api-key?)"),
        (
            ["serve", "--api-keys=s3cret", "--bogus"],
            "arguments: --api-keys=... --bogus (did you mean --api-key?)",
        ),
        (["serve", "--api-key=", "s3cret"], "unrecognized arguments: 1 value, not shown\n"),
        (["--api-keys", "s3cret", "serve"], f"{_NOT_SHOWN}: give the command first, then its flags"),
        (["caption", "a.jpg", "--jsn"], "unrecognized arguments: --jsn (did you mean --json?)"),
        (["serve", "--", "s3cret"], "unrecognized arguments: -- and 1 value, not shown\n"),
        (
            ["--api-keys", "s3cret", "-h"],
            "unrecognized arguments: --api-keys -h and 1 value, not shown: give",
        ),
        (["serve", "-ks3cret"], "unrecognized arguments: -k...\n"),
        (["serve", "--api_keys=s3cret"], "unrecognized arguments: --api_keys=... (did you mean --api-key?)"),
        (
            ["serve", "--api-keys\uff1ds3cret"],
            "unrecognized arguments: --api-keys... (did you mean --api-key?)",
        ),
    ],
)
def test_an_unknown_flag_is_named_without_its_value(argv: list[str], said: str, capsys) -> None:
    """A mistyped key flag (the variable is DOCKER_VIT_API_KEYS) must not print the key to the log."""
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and said in err and "s3cret" not in err, err
    assert err.startswith("usage: docker-vit [-h]") and "docker-vit: error: " in err  # argparse's own lines


def listing(names: list[str]) -> Any:
    """What the Hub's model_info answers, as far as download reads it."""
    return SimpleNamespace(siblings=[SimpleNamespace(rfilename=name) for name in names])


def test_download_fills_the_cache_or_a_folder(
    monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path
) -> None:
    calls = []

    def fake_snapshot(repo_id: str, local_dir: str | None = None, ignore_patterns=()) -> str:
        calls.append((repo_id, local_dir))
        skipped = lambda name: any(fnmatch.fnmatch(name, pattern) for pattern in ignore_patterns)  # noqa: E731
        assert all(map(skipped, ["tf_model.h5", "flax_model.msgpack", "rust_model.ot", "onnx/model.onnx"]))
        assert not any(
            map(skipped, ["model.safetensors", "pytorch_model.bin", "tokenizer.json", "config.json"])
        )
        return local_dir or "/cache/models--x"

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot)
    monkeypatch.setattr(
        "huggingface_hub.model_info", lambda repo_id: listing(["config.json", "pytorch_model.bin"])
    )
    assert cli.main(["download", "nlpconnect/vit-gpt2-image-captioning", "--dir", str(tmp_path)]) == 0
    assert calls == [("nlpconnect/vit-gpt2-image-captioning", str(tmp_path))]
    assert capsys.readouterr().out.strip() == str(tmp_path)
    assert hub.download("some/model") == "/cache/models--x"


@pytest.mark.parametrize(
    ("files", "pickled_skipped"),
    [
        (["config.json", "model.safetensors", "pytorch_model.bin", "tf_model.h5"], True),  # BLIP's
        (["config.json", "pytorch_model.bin"], False),
        (["config.json", "pytorch_model.bin", "extra/model.safetensors"], False),  # not the model's own
        (OSError("offline"), False),  # listing failed: keep everything
    ],
)
def test_download_leaves_out_pickled_weights_beside_safetensors(
    monkeypatch: pytest.MonkeyPatch, files: Any, pickled_skipped: bool
) -> None:
    """transformers loads the safetensors: a baked image would carry the model twice."""
    seen = []

    def listed(repo_id: str) -> Any:
        if isinstance(files, Exception):
            raise files
        return listing(files)

    def fake_snapshot(repo_id: str, local_dir: str | None = None, ignore_patterns: Any = ()) -> str:
        seen.extend(ignore_patterns)
        return "/cache/x"

    monkeypatch.setattr("huggingface_hub.model_info", listed)
    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot)
    warned: list[str] = []
    hub.download("org/model", warn=warned.append)
    assert len(warned) == isinstance(files, Exception)  # offline: served from the cache, and said
    assert not warned or warned[0] == (
        "could not list org/model on the Hub (OSError: offline): the files are the cached copy, not refreshed"
    )
    skipped = lambda name: any(fnmatch.fnmatch(name, pattern) for pattern in seen)  # noqa: E731
    assert skipped("pytorch_model.bin") is pickled_skipped and skipped("tf_model.h5")
    assert not skipped("model.safetensors") and not skipped("tokenizer.json")


class TransportError(Exception):  # as httpx and httpx2 name it
    pass


class ConnectError(TransportError):
    pass


@pytest.mark.parametrize(
    ("failure", "said"),
    [  # huggingface_hub 2 raises its transport's errors (httpx2), which are no OSError
        (ConnectError("no route"), "(ConnectError: no route): the files are the cached copy, not refreshed"),
        # a 429 to the listing, then a download that reached the Hub: its files are fresh, unfiltered
        (RuntimeError("429 Too Many"), "(RuntimeError: 429 Too Many): pickled weights were not left out"),
    ],
)
def test_a_failed_listing_is_said_as_what_it_was(
    monkeypatch: pytest.MonkeyPatch, failure: Exception, said: str
) -> None:
    def listing(repo_id: str) -> Any:
        raise failure

    monkeypatch.setattr("huggingface_hub.model_info", listing)
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda **kwargs: "/cache/x")
    warned: list[str] = []
    hub.download("org/model", warn=warned.append)
    assert warned == [f"could not list org/model on the Hub {said}"]


def test_download_into_a_folder_offline_says_the_folder_was_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(repo_id: str) -> Any:
        raise OSError("offline")

    monkeypatch.setattr("huggingface_hub.model_info", offline)
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda **kwargs: kwargs["local_dir"])
    warned: list[str] = []
    assert hub.download("org/model", "/models/x", warn=warned.append) == "/models/x"
    assert warned[0].endswith("(OSError: offline): the files already in /models/x, not refreshed")


def test_a_model_that_cannot_load_is_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    image = str(photo("coffee.jpg"))
    assert cli.main(["caption", image, "--model", str(tmp_path / "missing")]) == 1
    assert (
        capsys.readouterr().err.strip()
        == f"docker-vit: cannot load the model: FileNotFoundError: no model folder at {tmp_path / 'missing'}"
    )


def test_a_model_file_this_user_cannot_read_is_named_as_such(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mounted folder with another user's 0600 weights (tests run as root, who reads anything)."""
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr("os.access", lambda path, mode: not str(path).endswith(".safetensors"))
    assert cli.main(["caption", str(photo("coffee.jpg")), "--model", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"docker-vit: cannot load the model: PermissionError: cannot read {tmp_path}")
    assert "chmod -R a+rX" in err and "\n" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_a_device_torch_lacks_is_one_clear_line(vit_gpt2_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert (
        cli.main(["caption", str(photo("coffee.jpg")), "--model", str(vit_gpt2_dir), "--device", "cuda"]) == 1
    )
    err = capsys.readouterr().err
    assert err.startswith("docker-vit: cannot load the model:") and "Traceback" not in err


def test_download_does_not_load_torch() -> None:
    """A Hub call needs no torch: `docker-vit download` (a Dockerfile step) starts in a fraction of a second."""
    script = (
        "import sys, huggingface_hub\n"
        "huggingface_hub.snapshot_download = lambda **kwargs: '/cache/x'\n"
        "huggingface_hub.model_info = lambda repo_id: None\n"
        "from docker_vit import cli\n"
        "assert cli.main(['download', 'org/model']) == 0\n"
        "print(sorted({'torch', 'transformers'} & set(sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines() == ["/cache/x", "[]"]


def test_download_of_a_local_folder_names_it_and_fetches_nothing(
    monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path
) -> None:
    monkeypatch.setattr(hub, "download", lambda *args: pytest.fail("asked the Hub"))
    assert cli.main(["download", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert (
        out == f"{tmp_path}\n" and err == f"docker-vit: {tmp_path} is a local folder: nothing to download\n"
    )


def test_download_names_a_misspelt_variable(monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path) -> None:
    """`DOCKER_VIT_MODLE=folder docker-vit download` would fetch the default model, 1 GB, unsaid."""
    monkeypatch.setattr(hub, "download", lambda *args: str(tmp_path))
    monkeypatch.setenv("DOCKER_VIT_MODLE", str(tmp_path))
    assert cli.main(["download"]) == 0
    hint = "(did you mean DOCKER_VIT_MODEL?)"
    assert f"docker-vit: DOCKER_VIT_MODLE is not a Docker-ViT setting and is ignored {hint}\n" in (
        capsys.readouterr().err
    )


def test_a_failed_download_is_one_clear_line(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    def offline(model: str, folder: str | None = None, warn: Any = None) -> str:
        raise OSError("no network here")

    monkeypatch.setattr(hub, "download", offline)
    assert cli.main(["download", "org/model"]) == 1
    assert capsys.readouterr().err == "docker-vit: cannot download org/model: OSError: no network here\n"
