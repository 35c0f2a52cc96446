"""The layering the code keeps: the web layer imports no torch, the model path and the Runpod worker no
web framework, the server and its adapters know the handler interface and never the captioner, and
only environment.py reads the environment. Each layer is imported in a fresh interpreter: importing several
modules together loads whatever any one of them loads, so one interpreter a layer checks each."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import docker_vit

WEB = ["server", "frontend", "middleware", "protocol", "uploads", "http_errors", "errors", "service"]
WEB += ["batching", "client"]
MODEL = ["engine", "decoding", "gpt2_cache", "products", "captioner", "checkpoints"]
MODEL += ["batching", "service", "frontend", "errors", "runpod"]
# The server, the batcher and the adapters reach a handler through `loader.load_handler` alone.
INTERFACE_ONLY = [
    "server",
    "frontend",
    "service",
    "batching",
    "device",
    "runpod",
    "ray",
    "local",
    "client",
    "folder",
]


def imported(modules: list[str]) -> set[str]:
    """Every module loaded by importing `docker_vit.<module>` for each of `modules`."""
    script = "import json, sys\n" + "".join(f"import docker_vit.{name}\n" for name in modules)
    script += "print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return set(json.loads(done.stdout))


def packages(modules: set[str]) -> set[str]:
    return {name.split(".")[0] for name in modules}


def test_the_web_layer_knows_nothing_of_torch() -> None:
    assert packages(imported(WEB)) & {"torch", "transformers"} == set()


def test_the_model_path_knows_nothing_of_http() -> None:
    assert packages(imported(MODEL)) & {"fastapi", "starlette", "uvicorn"} == set()


def test_the_server_and_adapters_know_the_interface_not_the_captioner() -> None:
    assert "docker_vit.captioner" not in imported(INTERFACE_ONLY)


def test_only_the_environment_module_reads_the_environment() -> None:
    # images.py *sets* one decoder knob (libtiff's scan limit) for every caller; no module reads one
    reads = re.compile(r"os\.environ(?!\.setdefault\(\"LIBTIFF_)|getenv\(")
    package = Path(docker_vit.__file__).parent
    readers = [path.name for path in package.glob("*.py") if reads.search(path.read_text())]
    assert readers == ["environment.py"]
