"""Serving benchmark: the original-like baseline against docker-vit, same model, same client.

    python benchmarks/serve_bench.py [--quick] [--concurrency 1,4,16] [--requests N] [--beams 4]
                                     [--no-greedy] [--device cpu] [--out benchmarks/RESULTS.md]

Builds (or reuses) a random-weight model with vit-gpt2's exact architecture, then serves it with (a)
the baseline (Flask under gunicorn, one sync worker, `model.generate` per request) and (b) `docker-vit
serve`, both started at once and driven in turn, level by level, with the same closed-loop client at
each concurrency (so that the machine's drift falls on both alike; each level after one untimed round of
its concurrency's requests), and prints
throughput, p50/p95 latency, ratios, resident memory and the share of the compute bound reached.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import flops, load, model, report  # noqa: E402

IMAGES = ROOT.parent / "shared" / "data"
IMAGES = IMAGES if IMAGES.is_dir() else ROOT / "tests" / "data"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("serve_bench: terminated"))  # still stop the servers
    levels = [int(c) for c in args.concurrency.split(",")]
    images = [p.read_bytes() for p in sorted(Path(args.images).glob("*.jpg"))]
    if not images:
        sys.exit(f"no .jpg images in {args.images}")
    started = time.time()
    args.model_dir = args.model_dir or str(model.DEFAULT_FOLDER) + ("-tiny" if args.tiny else "")
    folder = model.build(args.model_dir, tiny=args.tiny)  # a tiny one never replaces the full-size model
    greedy_c = max(levels) if args.greedy else 0
    facts = {"load_start": os.getloadavg()[0], "rate_start": _rate(args)}
    base, ours = _run_all(args, folder, images, levels, greedy_c)
    facts.update(load_end=os.getloadavg()[0], rate_end=_rate(args))
    facts["minutes"] = (time.time() - started) / 60
    text = report.markdown(args, levels, greedy_c, base, ours, facts)
    print(text)
    if args.out:
        with open(args.out, "a") as out:
            out.write("\n" + text)
        print(f"appended to {args.out}")
    return 0


def _rate(args: argparse.Namespace) -> dict[str, float]:
    square = 8192 if args.device.startswith("cuda") else 2048
    return flops.matmul_rate(args.device, report.rate_dtype(args), square=square)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a short run to check the script: few requests")
    p.add_argument("--tiny", action="store_true", help="a tiny model with the same vocabulary (tests)")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--requests", type=int, default=0, help="requests per level (0: max(20, 3*C))")
    p.add_argument("--beams", type=int, default=4)
    p.add_argument("--no-greedy", dest="greedy", action="store_false", help="skip the greedy runs")
    p.add_argument("--device", default="cpu", help="docker-vit's and the baseline's device")
    p.add_argument("--dtype", default="float32", help="docker-vit's dtype (the baseline runs float32)")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--model-dir", default="", help=f"default {model.DEFAULT_FOLDER} (-tiny with --tiny)")
    p.add_argument("--images", default=str(IMAGES))
    p.add_argument(
        "--deadline",
        type=float,
        default=600.0,
        help="most seconds per level's timed round (its untimed round gets as long again)",
    )
    p.add_argument("--out", default="", help="append the results, with the machine, to this markdown file")
    return p


def _count(args: argparse.Namespace, concurrency: int) -> int:
    if args.requests:
        return args.requests
    return concurrency + 2 if args.quick else max(20, 3 * concurrency)


def _run_all(args, folder, images, levels, greedy_c) -> tuple[dict, dict]:
    """Both servers up at once, levels interleaved (baseline, then docker-vit, at each concurrency).

    On a shared machine the load drifts over minutes; measuring the two servers back to back at each
    level keeps that drift out of the ratios. The idle server uses no CPU meanwhile.
    """
    base, ours, servers = {}, {}, []
    try:
        baseline = None if args.skip_baseline else _start_baseline(args, folder, images, args.beams, servers)
        docker_vit = _start_docker_vit(args, folder, images, servers)
        ours["rates"] = {}
        for c in levels:
            if baseline:
                base[c] = _level(args, baseline, images, c)
            if c == max(levels):
                ours[c], ours["rates"][c] = _level_and_rate(args, docker_vit, images, c)
            else:
                ours[c] = _level(args, docker_vit, images, c)
        time.sleep(report.AT_REST)  # docker-vit hands a batch's memory back once its device pauses (0.5 s)
        if baseline:
            base["memory"] = baseline.memory_mb()
        ours["memory"] = docker_vit.memory_mb()
        if greedy_c:
            greedy = {"num_beams": "1"}
            load.post(docker_vit.port, *load.multipart(images[0], greedy), timeout=900)
            ours["greedy"], ours["rates"]["greedy"] = _level_and_rate(
                args, docker_vit, images, greedy_c, greedy
            )
            if baseline:  # the original hard-codes its beam width: greedy needs a restarted app
                baseline.stop()
                baseline = _start_baseline(args, folder, images, 1, servers)
                base["greedy"] = _level(args, baseline, images, greedy_c)
    finally:
        for server in servers:
            server.stop()
    return base, ours


def _level_and_rate(args, server, images, c: int, fields: dict | None = None) -> tuple[load.Level, float]:
    """A level and the matmul rate of its own moment (the better of just before and just after it).

    The machine's speed drifts over minutes, so the share of the compute bound divides by the rate
    measured around the level, not at the run's start or end.
    """
    before = _rate(args)["best"]
    level = _level(args, server, images, c, fields)
    return level, max(before, _rate(args)["best"])


def _level(args, server: load.Server, images, c: int, fields: dict | None = None) -> load.Level:
    """One untimed round of `c` requests, then the timed level: the server's steady state is measured,
    not its first batch of a new size (docker-vit checks and races its exact forms of a product once per
    row count, benchmarks/NOTES.md; the baseline has nothing of the kind, and gets the same round)."""
    load.drive(server.port, images, c, c, fields=fields, deadline_s=args.deadline)
    level = load.drive(server.port, images, c, _count(args, c), fields=fields, deadline_s=args.deadline)
    _progress(server.name + (" greedy" if fields else ""), level)
    return level


def _start_baseline(args, folder, images, beams: int, servers: list) -> load.Server:
    port = load.free_port()
    argv = [sys.executable, "-m", "gunicorn", "-w", "1", "-b", f"{load.HOST}:{port}", "--timeout", "900"]
    argv.append("benchmarks.baseline_app:app")
    env = {
        "BASELINE_MODEL_DIR": str(folder),
        "BASELINE_NUM_BEAMS": str(beams),
        "BASELINE_DEVICE": args.device,
        "PYTHONPATH": _pythonpath(),
    }
    server = load.Server(f"baseline-beam{beams}", argv, port, env)
    servers.append(server)
    warm = load.multipart(images[0])
    seconds = server.start(lambda p: load.post(p, *warm, timeout=900)[0] == 200)
    print(f"{server.name} ready (and warm) in {seconds:.0f} s", flush=True)
    return server


def _start_docker_vit(args, folder, images, servers: list) -> load.Server:
    port = load.free_port()
    argv = [sys.executable, "-m", "docker_vit.cli", "serve", "--model", str(folder), "--port", str(port)]
    argv += ["--num-beams", str(args.beams), "--max-new-tokens", "15", "--device", args.device]
    argv += ["--dtype", args.dtype, "--max-batch-size", str(args.max_batch_size)]
    argv += ["--max-wait-ms", str(args.max_wait_ms), "--max-queue", "1024", "--request-timeout", "900"]
    argv += ["--log-level", "warning"]
    server = load.Server("docker-vit", argv, port, {"PYTHONPATH": _pythonpath()})
    servers.append(server)
    seconds = server.start(_readyz)
    load.post(port, *load.multipart(images[0]), timeout=900)
    print(f"docker-vit ready in {seconds:.0f} s", flush=True)
    return server


def _pythonpath() -> str:
    """The repository first, then whatever the caller set (gpu_bench.sh adds carried wheels)."""
    return os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))


def _readyz(port: int) -> bool:
    import http.client

    conn = http.client.HTTPConnection(load.HOST, port, timeout=5)
    try:
        conn.request("GET", "/readyz")
        return conn.getresponse().status == 200
    finally:
        conn.close()


def _progress(name: str, level: load.Level) -> None:
    print(
        f"  {name:<20} C={level.concurrency:<3} {level.throughput:7.3f} img/s  p50 {level.quantile(0.5):7.2f} s"
        f"  p95 {level.quantile(0.95):7.2f} s  errors {level.errors}/{level.requests}"
        f"  ({level.seconds:.0f} s) sample: {level.sample[:40]!r}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
