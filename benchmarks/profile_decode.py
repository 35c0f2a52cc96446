"""Time and profile `model.generate` vs `docker_vit.decoding.generate` on a vit-gpt2-sized model.

The model has nlpconnect/vit-gpt2-image-captioning's exact architecture (ViT-B/16 at 224 px, GPT-2
small with cross-attention, vocab 50257) but random weights, built from configs: nothing is
downloaded. Random weights never emit EOS, so every run decodes all `max_new_tokens` steps, the
worst case.

    python benchmarks/profile_decode.py                  # timings table (medians) + compute bound
    python benchmarks/profile_decode.py --profile        # plus torch.profiler op tables
    python benchmarks/profile_decode.py --device cuda --dtype float16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import (
    GenerationConfig,
    GPT2Config,
    VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel,
    ViTConfig,
)

from docker_vit import decoding

EOS = 50256


def build_model(device: str, dtype: torch.dtype) -> VisionEncoderDecoderModel:
    """vit-gpt2's architecture with random weights (config defaults are ViT-B/16 and GPT-2 small)."""
    torch.manual_seed(0)
    dec = GPT2Config(add_cross_attention=True, is_decoder=True, bos_token_id=EOS, eos_token_id=EOS)
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(ViTConfig(), dec)
    cfg.decoder_start_token_id = cfg.pad_token_id = cfg.eos_token_id = EOS
    return VisionEncoderDecoderModel(cfg).eval().to(device=device, dtype=dtype)


def gen_config(beams: int, new_tokens: int) -> GenerationConfig:
    ids = {"decoder_start_token_id": EOS, "pad_token_id": EOS, "eos_token_id": EOS}
    return GenerationConfig(num_beams=beams, max_new_tokens=new_tokens, early_stopping=True, **ids)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _once(fn, device: str) -> tuple[float, float, torch.Tensor]:
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    _sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu, out


def timed(fn, repeats: int, device: str) -> tuple[float, torch.Tensor]:
    """Median wall time over `repeats` runs after one warm-up run."""
    fn()
    runs = [_once(fn, device) for _ in range(repeats)]
    return statistics.median(r[0] for r in runs), runs[-1][2]


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


def matmul_rate(device: str, dtype: torch.dtype, n: int = 2048) -> float:
    """Sustained GFLOP/s of one big square matmul: the machine's practical compute ceiling."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sec, _ = timed(lambda: torch.mm(a, b), 5, device)
    return 2 * n**3 / sec / 1e9


def flops_per_image(model: VisionEncoderDecoderModel, beams: int, new_tokens: int) -> dict[str, float]:
    """Matmul FLOPs (2 x MACs) of one image with per-image cross K/V; attention scores included."""
    e, d = model.encoder.config, model.decoder.config
    tokens = (e.image_size // e.patch_size) ** 2 + 1
    h, inter = e.hidden_size, e.intermediate_size
    enc = e.num_hidden_layers * tokens * (4 * h * h + 2 * h * inter + 2 * tokens * h)
    enc += tokens * 3 * e.patch_size**2 * h
    n, layers, vocab = d.n_embd, d.n_layer, d.vocab_size
    cross_kv = layers * tokens * 2 * n * n
    per_row = layers * (3 * n * n + n * n + 2 * n * n + 8 * n * n + tokens * n * 2) + n * vocab
    steps_rows = beams * (new_tokens - 1) + 1  # step 0 runs one row per image
    return {
        "encoder": 2 * enc / 1e9,
        "cross_kv": 2 * cross_kv / 1e9,
        "decoder": 2 * per_row * steps_rows / 1e9,
    }


def profile(fn, label: str, rows: int = 14) -> str:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    return f"### {label}\n```\n{table}\n```\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--beams", default="4,1")
    ap.add_argument("--new-tokens", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model = build_model(args.device, dtype)
    rate = matmul_rate(args.device, dtype)
    print(f"threads={torch.get_num_threads()} device={args.device} dtype={args.dtype}")
    print(f"matmul rate: {rate:.1f} GFLOP/s")
    print(
        "| batch | beams | generate s (cpu s) | ours s (cpu s) | speedup | ours img/s | GFLOP/img | of bound |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for beams in map(int, args.beams.split(",")):
        cfg = gen_config(beams, args.new_tokens)
        assert decoding.supports(model, cfg)
        gflop = sum(flops_per_image(model, beams, args.new_tokens).values())
        for batch in map(int, args.batches.split(",")):
            px = torch.randn(batch, 3, 224, 224, device=args.device, dtype=dtype)
            fns = {
                "hf": lambda px=px, cfg=cfg: model.generate(pixel_values=px, generation_config=cfg),
                "ours": lambda px=px, cfg=cfg: decoding.generate(model, px, cfg),
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
    print("FLOPs/image:", {k: round(v, 2) for k, v in flops_per_image(model, 4, args.new_tokens).items()})
    if args.profile:
        cfg = gen_config(4, args.new_tokens)
        px = torch.randn(16, 3, 224, 224, device=args.device, dtype=dtype)
        with torch.inference_mode():
            print(profile(lambda: model.generate(pixel_values=px, generation_config=cfg), "generate b16 x4"))
            print(profile(lambda: decoding.generate(model, px, cfg), "decoding b16 x4"))


if __name__ == "__main__":
    main()
