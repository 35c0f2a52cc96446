"""Time and profile `model.generate` vs `docker_vit.decoding.generate` on a vit-gpt2-sized model.

The model is `benchmarks/model.py`'s (vit-gpt2's exact architecture, random weights, nothing
downloaded). Random weights never emit EOS, so every run decodes all `max_new_tokens` steps, the
worst case. FLOPs and the matmul rate are `benchmarks/flops.py`'s, as in the serving benchmark.

    python benchmarks/profile_decode.py                  # timings table (medians) + compute bound
    python benchmarks/profile_decode.py --profile        # plus torch.profiler op tables
    python benchmarks/profile_decode.py --device cuda --dtype float16 --busy   # + GPU kernel time / wall
    python benchmarks/profile_decode.py --quick          # tiny model, to check the script
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import GenerationConfig, VisionEncoderDecoderModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import flops, model  # noqa: E402
from docker_vit import decoding  # noqa: E402


def gen_config(beams: int, new_tokens: int) -> GenerationConfig:
    ids = {"decoder_start_token_id": model.EOS_ID, "pad_token_id": model.EOS_ID, "eos_token_id": model.EOS_ID}
    return GenerationConfig(num_beams=beams, max_new_tokens=new_tokens, early_stopping=True, **ids)


def _once(fn, device: str) -> tuple[float, float, torch.Tensor]:
    flops.sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    flops.sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu, out


def compare(fns: dict, repeats: int, device: str) -> dict[str, tuple[float, float, torch.Tensor]]:
    """Median (wall, cpu) seconds per function; runs are interleaved so that load from other
    processes on this shared machine hits every contender alike."""
    for fn in fns.values():
        fn()
    runs: dict[str, list] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            runs[name].append(_once(fn, device))
    return {
        name: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs), rs[-1][2])
        for name, rs in runs.items()
    }


def profile(fn, label: str, rows: int = 14) -> str:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    return f"### {label}\n```\n{table}\n```\n"


def busy(fn, device: str) -> str:
    """How much of one call the device spends in kernels: far below 100% means the decode is bound by
    launching them (Python and per-op overhead), not by the arithmetic, and bigger batches come free."""
    if not device.startswith("cuda"):
        return "no GPU: nothing to measure"
    kinds = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    flops.sync(device)
    try:
        with torch.profiler.profile(activities=kinds) as prof:
            started = time.perf_counter()
            fn()
            flops.sync(device)
            wall = time.perf_counter() - started
        kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        gpu = sum(e.self_device_time_total for e in kernels) / 1e6
        launches = sum(e.count for e in kernels)
    except Exception as exc:  # a one-shot run on a lent machine keeps its other figures
        return f"profiler failed: {type(exc).__name__}: {exc}"
    return (
        f"kernels {gpu * 1000:.1f} ms of {wall * 1000:.1f} ms wall ({gpu / wall:.0%}), {launches} kernel runs"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--beams", default="4,1")
    ap.add_argument("--new-tokens", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--busy", action="store_true", help="on a GPU: kernel time over wall time, per shape")
    ap.add_argument("--quick", action="store_true", help="tiny model, one repeat")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats = 1
    folder = model.build(str(model.DEFAULT_FOLDER) + ("-tiny" if args.quick else ""), tiny=args.quick)
    dtype = getattr(torch, args.dtype)
    net = VisionEncoderDecoderModel.from_pretrained(folder, dtype=dtype).eval().to(args.device)
    shape, side = flops.shape_of(folder), net.config.encoder.image_size
    square = 8192 if args.device.startswith("cuda") else 2048  # a GPU needs a big product to near its peak
    rate = flops.matmul_rate(args.device, args.dtype, square=square)["best"]
    print(f"threads={torch.get_num_threads()} device={args.device} dtype={args.dtype}")
    print(f"matmul rate: {rate:.1f} GFLOP/s")
    print(
        "| batch | beams | generate s (cpu s) | ours s (cpu s) | speedup | ours img/s | GFLOP/img | of bound |"
    )
    print("|---|---|---|---|---|---|---|---|")
    shapes = []
    for beams in map(int, args.beams.split(",")):
        cfg = gen_config(beams, args.new_tokens)
        assert decoding.supports(net, cfg)
        gflop = flops.per_image(beams, args.new_tokens, shape) / 1e9
        for batch in map(int, args.batches.split(",")):
            px = torch.randn(batch, 3, side, side, device=args.device, dtype=dtype)
            fns = {
                "hf": lambda px=px, cfg=cfg: net.generate(pixel_values=px, generation_config=cfg),
                "ours": lambda px=px, cfg=cfg: decoding.generate(net, px, cfg),
            }
            with torch.inference_mode():
                res = compare(fns, args.repeats, args.device)
            (base, base_cpu, ref), (ours, ours_cpu, out) = res["hf"], res["ours"]
            same = ref.shape == out.shape and bool((ref == out).all())
            print(
                f"| {batch} | {beams} | {base:.3f} ({base_cpu:.2f}) | {ours:.3f} ({ours_cpu:.2f}) "
                f"| {base / ours:.2f}x | {batch / ours:.2f} | {gflop:.1f} | {gflop * batch / ours / rate:.0%} |"
                + ("" if same else " MISMATCH"),
                flush=True,
            )
            shapes.append((batch, beams, fns))
    if args.busy:  # after the table: the profiler's first start on a GPU can take many seconds
        print("\nGPU kernel time over wall time, one call under torch.profiler:", flush=True)
        for batch, beams, fns in shapes:
            with torch.inference_mode():
                for name, fn in fns.items():
                    print(f"- batch {batch}, beams {beams}, {name}: {busy(fn, args.device)}", flush=True)
    if args.profile:
        cfg = gen_config(4, args.new_tokens)
        px = torch.randn(16, 3, side, side, device=args.device, dtype=dtype)
        with torch.inference_mode():
            print(profile(lambda: net.generate(pixel_values=px, generation_config=cfg), "generate b16 x4"))
            print(profile(lambda: decoding.generate(net, px, cfg), "decoding b16 x4"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
