"""The layering the code keeps: the web layer imports no torch, the model path and the Runpod worker no
web framework. Each module is imported alone, in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

WEB = [
    "server",
    "middleware",
    "protocol",
    "uploads",
    "http_errors",
    "errors",
    "service",
    "batching",
    "client",
]
MODEL = [
    "engine",
    "decoding",
    "gpt2_cache",
    "products",
    "captioner",
    "checkpoints",
    "batching",
    "service",
    "errors",
    "runpod",
]


def imported(module: str, roots: set[str]) -> list[str]:
    """Which of the top-level packages `roots` importing `docker_vit.<module>` loads."""
    names = "sorted({name.split('.')[0] for name in sys.modules})"
    script = f"import json, sys, docker_vit.{module}\nprint(json.dumps({names}))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return sorted(set(json.loads(done.stdout)) & roots)


@pytest.mark.parametrize("module", WEB)
def test_the_web_layer_knows_nothing_of_torch(module: str) -> None:
    assert imported(module, {"torch", "transformers"}) == []


@pytest.mark.parametrize("module", MODEL)
def test_the_model_path_knows_nothing_of_http(module: str) -> None:
    assert imported(module, {"fastapi", "starlette", "uvicorn"}) == []
