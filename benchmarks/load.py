"""Start a server as a child process, drive it with a closed-loop client, read its memory.

The same client drives every server: C threads, each sending one image per request (multipart field
`file`, like the original's clients) and the next as soon as the previous one answers. Loopback only;
every loop is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import statistics
import subprocess
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"


@dataclass
class Level:
    """One concurrency level's outcome; latencies in seconds."""

    concurrency: int
    requests: int
    errors: int
    seconds: float
    latencies: list[float]
    sample: str = ""

    @property
    def throughput(self) -> float:
        return (self.requests - self.errors) / self.seconds if self.seconds else 0.0

    def quantile(self, q: float) -> float:
        if len(self.latencies) < 2:
            return self.latencies[0] if self.latencies else float("nan")
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[round(q * 100) - 1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def multipart(image: bytes, fields: dict[str, str] | None = None) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in (fields or {}).items()
    ]
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="image.jpg"\r\n'
    parts.append(head.encode() + b"Content-Type: image/jpeg\r\n\r\n" + image + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def post(port: int, body: bytes, content_type: str, timeout: float) -> tuple[int, str]:
    """One request on a fresh connection (gunicorn's sync worker closes every connection anyway)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("POST", "/", body=body, headers={"Content-Type": content_type})
        response = conn.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        conn.close()


def drive(
    port: int,
    images: Sequence[bytes],
    concurrency: int,
    requests: int,
    *,
    fields: dict[str, str] | None = None,
    timeout: float = 600.0,
    deadline_s: float = 900.0,
) -> Level:
    """Closed loop: `concurrency` clients share `requests` requests; stops early after `deadline_s`."""
    bodies = [multipart(image, fields) for image in images]
    lock, issued = threading.Lock(), [0]
    latencies: list[float] = []
    errors, sample = [0], [""]
    stop_at = time.monotonic() + deadline_s

    def client() -> None:
        while time.monotonic() < stop_at:
            with lock:
                if issued[0] >= requests:
                    return
                body, ctype = bodies[issued[0] % len(bodies)]
                issued[0] += 1
            started = time.perf_counter()
            try:
                status, text = post(port, body, ctype, timeout)
            except OSError:
                status, text = 0, ""
            elapsed = time.perf_counter() - started
            with lock:
                if status == 200:
                    latencies.append(elapsed)
                    sample[0] = sample[0] or text
                else:
                    errors[0] += 1

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + deadline_s)
    seconds = time.perf_counter() - started
    return Level(concurrency, issued[0], errors[0], seconds, sorted(latencies), sample[0])


class Server:
    """A server child process: start, wait until it answers, measure its memory, stop."""

    def __init__(self, name: str, argv: list[str], port: int, env: dict[str, str] | None = None) -> None:
        self.name, self.argv, self.port = name, argv, port
        self.env = {**os.environ, **(env or {})}
        self.log = Path(f"/tmp/serve-bench-{name}-{port}.log")
        self.proc: subprocess.Popen | None = None

    def start(self, ready: callable, timeout: float = 600.0) -> float:
        """Launch, then poll `ready(port)` until it returns True; returns the seconds it took."""
        started = time.perf_counter()
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        while time.perf_counter() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log}")
            try:
                if ready(self.port):
                    return time.perf_counter() - started
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} not ready after {timeout:.0f} s; see {self.log}")

    def memory_mb(self) -> dict[str, float]:
        """VmRSS and VmHWM (peak) of the process doing the work: gunicorn's worker, or the server."""
        pid, children = self.proc.pid, self._children()
        if self.name.startswith("baseline") and children:
            pid = children[0]
        status = dict(
            line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
        )
        return {key: int(status[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}

    def stop(self) -> None:
        """SIGTERM, then SIGKILL for the process and its children (a gunicorn worker busy with a request)."""
        if not self.proc or self.proc.poll() is not None:
            return
        children = self._children()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _children(self) -> list[int]:
        pid = self.proc.pid
        try:
            return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except OSError:
            return []
