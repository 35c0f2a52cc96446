"""Serving benchmark: the original-like baseline against docker-vit, same model, same client.

    python benchmarks/serve_bench.py [--quick] [--concurrency 1,4,16] [--requests N] [--beams 4]
                                     [--no-greedy] [--device cpu] [--out benchmarks/RESULTS.md]

Builds (or reuses) a random-weight model with vit-gpt2's exact architecture, then serves it in turn
with (a) the baseline (Flask under gunicorn, one sync worker, `model.generate` per request) and (b)
`docker-vit serve`, drives each with the same closed-loop client at each concurrency, and prints
throughput, p50/p95 latency, ratios, resident memory and the share of the compute bound reached.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import flops, load, model  # noqa: E402

IMAGES = ROOT.parent / "shared" / "data"
IMAGES = IMAGES if IMAGES.is_dir() else ROOT / "tests" / "data"
AT_REST = 2.0  # seconds between the last beam level and the memory reading


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
    report = _report(args, levels, greedy_c, base, ours, facts)
    print(report)
    if args.out:
        with open(args.out, "a") as out:
            out.write("\n" + report)
        print(f"appended to {args.out}")
    return 0


def _rate_dtype(args: argparse.Namespace) -> str:
    """The dtype docker-vit computes in: what its `auto` picks on a GPU, float32 on a CPU."""
    if args.dtype != "auto":
        return args.dtype
    return "bfloat16" if args.device.startswith("cuda") else "float32"


def _rate(args: argparse.Namespace) -> dict[str, float]:
    square = 8192 if args.device.startswith("cuda") else 2048
    return flops.matmul_rate(args.device, _rate_dtype(args), square=square)


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
    p.add_argument("--deadline", type=float, default=600.0, help="most seconds per level")
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
        time.sleep(AT_REST)  # docker-vit hands a batch's memory back once its device pauses (0.5 s)
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


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def _report(args, levels, greedy_c, base, ours, facts) -> str:
    top = max(levels)
    rate_top = ours["rates"][top]
    rate_greedy = ours["rates"].get("greedy", rate_top)
    shape = flops.shape_of(args.model_dir)
    beam_flops, greedy_flops = flops.per_image(args.beams, 15, shape), flops.per_image(1, 15, shape)
    bound_beam, bound_greedy = rate_top * 1e9 / beam_flops, rate_greedy * 1e9 / greedy_flops
    dash = "–"
    lines = [
        f"### Serving benchmark, {datetime.datetime.now():%Y-%m-%d %H:%M}"
        + (" (quick)" if args.quick else ""),
        "",
        f"Machine: {platform.machine()}, {_cpu_model()}, {os.cpu_count()} cores; torch {_torch()}; "
        f"device {args.device}, docker-vit dtype {args.dtype}; beam {args.beams}, max_length 16 "
        f"(15 new tokens); model: random-weight vit-gpt2 architecture{' (TINY)' if args.tiny else ''}; "
        f"decode path: {_decode_path()}.",
        f"Load average (1 min) {facts['load_start']:.1f} at the start, {facts['load_end']:.1f} at the end; "
        f"run took {facts['minutes']:.1f} min. Command: `{' '.join(sys.argv)}`",
        "",
        "| clients | baseline img/s | docker-vit img/s | ratio | baseline p50 / p95 s | docker-vit p50 / p95 s |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    rows = [(c, c) for c in levels] + ([("greedy", f"{greedy_c} (greedy)")] if greedy_c else [])
    for key, label in rows:
        b, o = base.get(key), ours[key]
        lines.append(
            f"| {label} | {f'{b.throughput:.3f}' if b else dash} | {o.throughput:.3f} | "
            f"{_ratio(o.throughput, b.throughput) if b else dash} | "
            f"{f'{b.quantile(0.5):.2f} / {b.quantile(0.95):.2f}' if b else dash} | "
            f"{o.quantile(0.5):.2f} / {o.quantile(0.95):.2f} |"
        )
    errors = sum(r.errors for res in (base, ours) for r in res.values() if isinstance(r, load.Level))
    around = f"around the {top}-client level {rate_top:.1f}" + (
        f", around the greedy level {rate_greedy:.1f}" if greedy_c else ""
    )
    lines += [
        "",
        f"- Matmul rate ({_rate_dtype(args)}, {_threads()} CPU threads, best of a square and the ViT MLP shape): "
        f"run start / end {facts['rate_start']['best']:.1f} / {facts['rate_end']['best']:.1f} GFLOP/s; "
        f"{around} (the better of just before and just after; used for the shares below).",
        f"- FLOPs per image: beam {args.beams} {beam_flops / 1e9:.1f} GFLOP, greedy {greedy_flops / 1e9:.1f} GFLOP "
        f"(formula in benchmarks/flops.py) -> compute bound {bound_beam:.3f} / {bound_greedy:.3f} img/s.",
        f"- Share of the compute bound at {top} clients: docker-vit beam {args.beams} "
        f"{ours[top].throughput / bound_beam:.0%}"
        + (f", baseline {base[top].throughput / bound_beam:.0%}" if base else "")
        + (f"; greedy docker-vit {ours['greedy'].throughput / bound_greedy:.0%}" if greedy_c else "")
        + (f", baseline {base['greedy'].throughput / bound_greedy:.0%}" if greedy_c and base else "")
        + ".",
    ]
    if base and 1 in levels:
        p50 = _ratio(ours[1].quantile(0.5), base[1].quantile(0.5))
        lines.append(f"- Lone-client median latency, docker-vit / baseline: {p50}.")
    memory = [
        f"{name} {res['memory']['VmRSS']:.0f} MB (peak {res['memory']['VmHWM']:.0f} MB)"
        for name, res in (("baseline worker", base), ("docker-vit", ours))
        if res
    ]
    lines.append(
        f"- Resident memory with the model loaded (VmRSS at rest, {AT_REST:.0f} s after the beam levels; peak VmHWM): {', '.join(memory)}."
    )
    lines.append(f"- Failed requests: {errors}.")
    return "\n".join(lines) + "\n"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _torch() -> str:
    import torch

    return torch.__version__


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _decode_path() -> str:
    try:
        from docker_vit import decoding  # noqa: F401
    except ImportError:
        return "not landed (docker-vit used transformers' generate)"
    return "docker_vit.decoding (landed)"


if __name__ == "__main__":
    sys.exit(main())
