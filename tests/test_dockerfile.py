"""The Dockerfile's own commands, run here without a container engine (scripts/test-container builds
and runs the image itself): its HEALTHCHECK must reach the server wherever the server's settings put it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

DOCKERFILE = Path(__file__).resolve().parent.parent / "Dockerfile"


def healthcheck() -> list[str]:
    """The HEALTHCHECK's exec-form command, its `python` this interpreter."""
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    command = json.loads(re.search(r"^HEALTHCHECK .*?CMD (\[.*\])$", text, re.MULTILINE).group(1))
    assert command[0] == "python"
    return [sys.executable, *command[1:]]


class Ready(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/readyz" else 404)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def ready_port() -> Iterator[int]:
    """A stand-in server answering `/readyz` 200 on loopback."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Ready)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def probe(port: str, host: str | None = None) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_VIT_")}
    env["DOCKER_VIT_PORT"] = port
    env["DOCKER_VIT_HOST"] = "0.0.0.0" if host is None else host  # the image's own ENV
    return subprocess.run(healthcheck(), env=env, capture_output=True, timeout=30).returncode


@pytest.mark.parametrize("padding", ["{}", " {} ", "{}\n", "\t{}\r\n"])
def test_the_healthcheck_reads_the_port_as_the_server_does(ready_port: int, padding: str) -> None:
    """`serve` takes `DOCKER_VIT_PORT="9000\\n"` (a template's value with its line end) as 9000: so
    must the probe, or a ready container stays unhealthy for good."""
    from docker_vit.environment import chosen

    value = padding.format(ready_port)
    assert chosen({"DOCKER_VIT_PORT": value})["port"] == ready_port
    assert probe(value) == 0


def test_the_healthcheck_fails_where_nothing_is_ready(ready_port: int) -> None:
    assert probe(str(ready_port), host=" 127.0.0.1 ") == 0
    with ThreadingHTTPServer(("127.0.0.1", 0), Ready) as other:  # bound, not serving: nothing answers
        other_port = other.server_address[1]
    assert probe(str(other_port)) != 0


def test_the_hub_cache_is_the_app_users_in_the_image() -> None:
    """Docker gives a new named volume the owner of the image's folder it is mounted on, root when the
    folder is missing: `-v hf-cache:/home/app/.cache/huggingface` must be writable by the server's user,
    so the image makes HF_HOME for it before `USER app` (scripts/test-container checks the built image)."""
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    home = re.search(r"\bHF_HOME=(\S+)", text).group(1)
    before_user = text[: text.index("\nUSER app")]
    made = re.search(r"install -d -o app -g app ([^&\n]*)", before_user)
    assert made, "the Dockerfile does not make the Hub cache folder for the app user"
    folders = made.group(1).replace('"$HF_HOME"', home).split()
    assert home in folders and home.rsplit("/", 1)[0] in folders  # the parent too: ~/.cache is root's
