"""The serving benchmark's report: one markdown section with the machine it ran on.

Ratios and shares come from one run, side by side, as the issue asks: absolute figures from different
days on a shared machine do not compare.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path
from typing import Any

from benchmarks import flops, load

AT_REST = 2.0  # seconds between the last beam level and the memory reading


def rate_dtype(args: argparse.Namespace) -> str:
    """The dtype docker-vit computes in: what its `auto` picks on a GPU, float32 on a CPU."""
    if args.dtype != "auto":
        return args.dtype
    return "bfloat16" if args.device.startswith("cuda") else "float32"


def _where(args: argparse.Namespace) -> str:
    return f"{_threads()} CPU threads" if args.device == "cpu" else f"on {args.device}"


def _share(part: float) -> str:
    """A share of the compute bound: a GPU's is well under 1%, which `:.0%` would print as 0%."""
    return f"{part:.0%}" if part >= 0.01 else f"{part:.2%}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def markdown(
    args: argparse.Namespace,
    levels: list[int],
    greedy_c: int,
    base: dict[Any, Any],
    ours: dict[Any, Any],
    facts: dict[str, Any],
) -> str:
    """The run as a markdown section: the machine, the table, the compute bound, memory and errors."""
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
        f"(15 new tokens); model: random-weight vit-gpt2 architecture{' (TINY)' if args.tiny else ''}.",
        f"Load average (1 min) {facts['load_start']:.1f} at the start, {facts['load_end']:.1f} at the end; "
        f"run took {facts['minutes']:.1f} min. Command: `{' '.join(sys.argv)}`",
        "Each level is timed after one untimed round of as many requests as it has clients"
        + ("." if args.skip_baseline else ", on both servers."),
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
        f"- Matmul rate ({rate_dtype(args)}, {_where(args)}, best of a square and the ViT MLP shape): "
        f"run start / end {facts['rate_start']['best']:.1f} / {facts['rate_end']['best']:.1f} GFLOP/s; "
        f"{around} (the better of just before and just after; used for the shares below).",
        f"- FLOPs per image: beam {args.beams} {beam_flops / 1e9:.1f} GFLOP, greedy {greedy_flops / 1e9:.1f} GFLOP "
        f"(formula in benchmarks/flops.py) -> compute bound {bound_beam:.3f} / {bound_greedy:.3f} img/s.",
        f"- Share of the compute bound at {top} clients: docker-vit beam {args.beams} "
        f"{_share(ours[top].throughput / bound_beam)}"
        + (f", baseline {_share(base[top].throughput / bound_beam)}" if base else "")
        + (f"; greedy docker-vit {_share(ours['greedy'].throughput / bound_greedy)}" if greedy_c else "")
        + (f", baseline {_share(base['greedy'].throughput / bound_greedy)}" if greedy_c and base else "")
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
