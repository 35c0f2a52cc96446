"""Load and fault figures for a real `docker-vit serve` with a small queue, on loopback.

Load: C concurrent clients (asyncio + httpx, keep-alive) share N requests, bounded by a deadline. A small
`--max-queue` makes overload visible: every answer must be 200 or 503 (Retry-After). The server's RSS
(/proc/PID/status VmRSS) is read after warm-up and at each quarter of the run: no creep.
Faults: the time a normal request takes, alone and then while 100 idle connections and 20 stalled
half-sent uploads are open.

    python benchmarks/robustness.py                      # the tiny random model, built offline
    python benchmarks/robustness.py --model DIR_OR_HUB_ID --requests 3000 --clients 48
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def start_server(model: str, port: int, args: argparse.Namespace) -> subprocess.Popen:
    command = [sys.executable, "-m", "docker_vit.cli", "serve", "--model", model, "--port", str(port)]
    command += ["--max-queue", str(args.max_queue), "--log-level", "warning"]
    command += ["--device", "cpu", "--num-beams", str(args.num_beams)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            if httpx.get(f"http://{HOST}:{port}/readyz", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise TimeoutError("the server never became ready")


async def load(url: str, image: bytes, pid: int, args: argparse.Namespace) -> dict:
    statuses: collections.Counter = collections.Counter()
    latencies: list[float] = []
    rss = {"start": rss_mb(pid)}
    issued, stop_at = 0, time.monotonic() + args.deadline
    marks = {args.requests * q // 4: f"{q * 25}%" for q in (1, 2, 3)}

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal issued
        while issued < args.requests and time.monotonic() < stop_at:
            issued += 1
            if issued in marks:
                rss[marks[issued]] = rss_mb(pid)
            started = time.perf_counter()
            try:
                response = await http.post(url, content=image, headers={"content-type": "image/jpeg"})
                statuses[response.status_code] += 1
            except httpx.HTTPError as exc:
                statuses[type(exc).__name__] += 1
                continue
            if response.status_code == 200:
                latencies.append(time.perf_counter() - started)
            elif response.status_code == 503:
                await asyncio.sleep(min(float(response.headers.get("retry-after", 1)), 0.05))

    limits = httpx.Limits(max_connections=args.clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(args.clients)))
        seconds = time.perf_counter() - started
    rss["end"] = rss_mb(pid)
    latencies.sort()
    return {
        "requests": sum(statuses.values()),
        "statuses": dict(statuses),
        "seconds": round(seconds, 1),
        "captions_per_s": round(statuses[200] / seconds, 1),
        "p50_ms": round(1000 * statistics.median(latencies), 1) if latencies else None,
        "p95_ms": round(1000 * latencies[int(0.95 * (len(latencies) - 1))], 1) if latencies else None,
        "rss_mb": {key: round(value, 1) for key, value in rss.items()},
    }


def normal_latency(url: str, image: bytes, count: int = 10) -> dict:
    """Sequential requests on fresh connections: what an ordinary client sees."""
    times = []
    for _ in range(count):
        started = time.perf_counter()
        response = httpx.post(url, content=image, headers={"content-type": "image/jpeg"}, timeout=60)
        assert response.status_code == 200, response.text
        times.append(time.perf_counter() - started)
    return {"median_ms": round(1000 * statistics.median(times), 1), "max_ms": round(1000 * max(times), 1)}


def faults(port: int, url: str, image: bytes) -> dict:
    alone = normal_latency(url, image)
    hostile = [socket.create_connection((HOST, port)) for _ in range(100)]  # idle: never send a byte
    for _ in range(20):  # stalled: headers and half the body, then nothing
        sock = socket.create_connection((HOST, port))
        head = (
            f"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: {len(image)}\r\n\r\n"
        )
        sock.sendall(head.encode() + image[: len(image) // 2])
        hostile.append(sock)
    besieged = normal_latency(url, image)
    for sock in hostile:
        sock.close()
    return {"alone": alone, "with_100_idle_and_20_stalled": besieged}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="model folder or Hub id (default: a tiny random vit-gpt2)")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=48)
    parser.add_argument("--max-queue", type=int, default=16)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds the load phase may take")
    args = parser.parse_args()
    image = (ROOT / "tests" / "data" / "french_bulldog.jpg").read_bytes()
    with tempfile.TemporaryDirectory() as folder:
        model = args.model
        if not model:
            sys.path.insert(0, str(ROOT / "tests"))
            import tiny_models

            model = str(tiny_models.save_vit_gpt2(Path(folder)))
        with socket.socket() as probe:
            probe.bind((HOST, 0))
            port = probe.getsockname()[1]
        process = start_server(model, port, args)
        try:
            url = f"http://{HOST}:{port}/"
            asyncio.run(load(url, image, process.pid, argparse.Namespace(**{**vars(args), "requests": 200})))
            report = {
                "load": asyncio.run(load(url, image, process.pid, args)),
                "faults": faults(port, url, image),
            }
        finally:
            process.terminate()
            process.wait(30)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
