"""Shared fixtures: tiny model folders (built once per session), photos, and a served app."""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import other_models
import pytest
import tiny_models
from fastapi.testclient import TestClient

from docker_vit.config import Settings
from docker_vit.server import create_app

# The Ctrl-C tests send SIGINT to servers and runs they start. Started as a background job (`pytest &`,
# nohup, a CI script's `&`) this process ignores SIGINT, and its children would inherit that; with
# Python's own handler here they start with the default, as from a terminal.
signal.signal(signal.SIGINT, signal.default_int_handler)

PHOTOS = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LOCAL_PHOTOS = Path(__file__).parent / "data"


def photo(name: str) -> Path:
    """A test photo from ../shared/data, or the copy in tests/data when ../shared is absent."""
    path = PHOTOS / name
    return path if path.exists() else LOCAL_PHOTOS / name


def free_port() -> int:
    """A loopback port free now, for a server started in a child process."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ready(url: str) -> bool:
    """The server at `url` is loaded and warmed up (`/readyz` 200); False while it is not, or not
    listening yet. (The warm-up's call is not in /metrics: readiness is asked here.)"""
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def finished(process: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """`process.communicate(timeout)`; a process that overruns is killed, not left running."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise


@contextmanager
def killed_after(process: subprocess.Popen, seconds: float) -> Iterator[None]:
    """Kill `process` should the block overrun: a blocking read of its output then ends (at EOF)
    rather than hanging the test run when the child stalls before writing."""
    timer = threading.Timer(seconds, process.kill)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


@pytest.fixture(scope="session")
def vit_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.save_vit_gpt2(tmp_path_factory.mktemp("vit-gpt2"))


@pytest.fixture(scope="session")
def eos_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Captions of different lengths: beams finish at different steps."""
    return tiny_models.save_vit_gpt2(tmp_path_factory.mktemp("vit-gpt2-eos"), seed=3, eos_boost=40.0)


@pytest.fixture(scope="session")
def wordy_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Full 15-token captions that differ between the test photos, at 1 and 3 beams alike (the
    default tiny model ends at once at 1 beam, the EOS one at every width)."""
    return tiny_models.save_vit_gpt2(tmp_path_factory.mktemp("vit-gpt2-wordy"), seed=1, eos_boost=0.01)


@pytest.fixture(scope="session")
def blip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.save_blip(tmp_path_factory.mktemp("blip"))


@pytest.fixture(scope="session")
def git_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.save_git(tmp_path_factory.mktemp("git"))


@pytest.fixture(scope="session")
def pix2struct_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return other_models.save_pix2struct(tmp_path_factory.mktemp("pix2struct"))


@pytest.fixture(scope="session")
def nougat_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return other_models.save_nougat(tmp_path_factory.mktemp("nougat"))


@pytest.fixture(scope="session")
def bulldog() -> bytes:
    return photo("french_bulldog.jpg").read_bytes()


@contextmanager
def serving(settings: Settings, handler=None, wait: bool = True) -> Iterator[TestClient]:
    """The real app in-process, lifespan included; waits until /readyz says ready."""
    with TestClient(create_app(settings, handler), raise_server_exceptions=False) as client:
        deadline = time.monotonic() + 60
        while wait and client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, client.get("/readyz").json()
            time.sleep(0.02)
        yield client


@pytest.fixture
def serve(vit_gpt2_dir: Path) -> Callable[..., object]:
    """`with serve(max_images=2) as client:` serves the tiny vit-gpt2 with those settings."""

    def make(**overrides: object):
        return serving(Settings(model=str(vit_gpt2_dir), **overrides))

    return make


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    folder = tiny_models.save_vit_gpt2(tmp_path_factory.mktemp("served"))
    with serving(Settings(model=str(folder))) as test_client:
        yield test_client
