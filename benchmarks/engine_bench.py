"""The engine alone, no HTTP: images/s per batch size, dtype and beam width, and the compute bound.

    python benchmarks/engine_bench.py --device cuda [--dtypes float16,bfloat16] [--batches 1,2,...,128]
    python benchmarks/engine_bench.py --quick      # tiny model, to check the script (cuda if torch sees one, else cpu)

Calls `CaptionEngine.generate` (the path docker-vit's batcher calls) on random pixel batches of the
vit-gpt2-architecture model from `benchmarks/model.py`, after one warm-up call per shape.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import flops, model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="", help="default cuda where torch sees a GPU, else cpu")
    p.add_argument("--dtypes", default="", help="default float16,bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--batches", default="1,2,4,8,16,32,64,128")
    p.add_argument("--beams", default="4,1")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget", type=float, default=150.0, help="seconds; later shapes are skipped after it")
    p.add_argument("--quick", action="store_true", help="tiny model, small batches, one repeat")
    p.add_argument("--model-dir", default="")
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.repeats = "1,2,4", 1
    if not args.device:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    # half precision on most CPUs is emulated: minutes per matmul-rate measurement
    args.dtypes = args.dtypes or ("float32" if args.device == "cpu" else "float16,bfloat16")
    folder = args.model_dir or (str(model.DEFAULT_FOLDER) + ("-tiny" if args.quick else ""))
    folder = model.build(folder, tiny=args.quick)
    shape = flops.shape_of(folder)
    stop_at = time.monotonic() + args.budget
    print(f"engine-direct: {folder}, device {args.device}, 15 new tokens, median of {args.repeats}\n")
    print("| dtype | beams | batch | s / call | images/s | GFLOP/s | share of matmul rate |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for dtype in args.dtypes.split(","):
        _run_dtype(args, folder, shape, dtype, stop_at)  # the engine is freed on return
        _free(args.device)
    return 0


def _run_dtype(args, folder: Path, shape: flops.Shape, dtype: str, stop_at: float) -> None:
    import torch

    from docker_vit.engine import CaptionEngine

    engine = CaptionEngine(str(folder), args.device, dtype)
    engine.load()
    square = 8192 if args.device.startswith("cuda") else 2048
    rate = flops.matmul_rate(args.device, dtype, square=square)["best"]
    for beams in (int(b) for b in args.beams.split(",")):
        per_image = flops.per_image(beams, 15, shape)
        for batch in (int(b) for b in args.batches.split(",")):
            if time.monotonic() > stop_at:
                print(f"| {dtype} | {beams} | {batch} | skipped: over the time budget | | | |", flush=True)
                continue
            pixels = [{"pixel_values": torch.randn(3, 224, 224)} for _ in range(batch)]
            try:
                seconds = flops.median_seconds(
                    lambda px=pixels, b=beams: engine.generate(px, b, 15), args.repeats, args.device
                )
            except Exception as exc:  # one failing shape (out of memory, say) must not end a one-shot run
                print(
                    f"| {dtype} | {beams} | {batch} | failed: {type(exc).__name__}: {exc} | | | |", flush=True
                )
                continue
            speed = batch / seconds
            achieved = speed * per_image / 1e9
            print(
                f"| {dtype} | {beams} | {batch} | {seconds:.3f} | {speed:.1f} | {achieved:.0f} | "
                f"{achieved / rate:.1%} of {rate / 1000:.3g} TFLOP/s |",
                flush=True,
            )


def _free(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
