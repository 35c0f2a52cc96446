"""How much arithmetic one caption takes, and how fast this machine does it: the compute bound.

FLOPs count multiply-adds as 2 and ignore everything but matrix products (layer norms, softmax, GELU
and beam bookkeeping are a few percent). For vit-gpt2 (d=768, 12+12 layers, MLP 3072, vocab 50,257,
197 encoder tokens) and a caption of n new tokens with b beams:

    encoder  = 12 * 2 * (4*197*d^2 + 2*197*d*3072 + 2*197^2*d)  + 2*196*768*d (patch embedding)
    cross KV = 12 * 2 * 2*197*d^2                                   (once per image)
    step t   = 12 * 2 * (4*d^2 + 2*d^2 + 2*d*3072 + 2*t*d + 2*197*d) + 2*d*50257   (per beam)
    image    = encoder + cross KV + b * sum(step t for t = 1..n)

Step t attends over t decoder positions (the start token plus t-1 generated ones). Every beam runs
every step: a random-weight model never stops early, and beam search keeps b live beams throughout.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Shape:
    """The sizes that decide the arithmetic; the defaults are vit-gpt2's."""

    d_enc: int = 768
    enc_layers: int = 12
    enc_mlp: int = 3072
    patches: int = 196
    patch_pixels: int = 16 * 16 * 3
    d_dec: int = 768
    dec_layers: int = 12
    dec_mlp: int = 3072
    vocab: int = 50257


def shape_of(folder: Path | str) -> Shape:
    """The sizes of a saved VisionEncoderDecoder (ViT + GPT-2) folder, so tiny test models count right."""
    config = json.loads((Path(folder) / "config.json").read_text())
    enc, dec = config["encoder"], config["decoder"]
    patch, side = enc["patch_size"], enc["image_size"]
    return Shape(
        d_enc=enc["hidden_size"],
        enc_layers=enc["num_hidden_layers"],
        enc_mlp=enc["intermediate_size"],
        patches=(side // patch) ** 2,
        patch_pixels=patch * patch * enc.get("num_channels", 3),
        d_dec=dec["n_embd"],
        dec_layers=dec["n_layer"],
        dec_mlp=dec.get("n_inner") or 4 * dec["n_embd"],
        vocab=dec["vocab_size"],
    )


def per_image(beams: int, new_tokens: int, s: Shape = Shape()) -> float:
    """FLOPs to caption one image (see the module docstring for the formula)."""
    t_enc, d, e = s.patches + 1, s.d_dec, s.d_enc
    encoder = s.enc_layers * 2 * (4 * t_enc * e * e + 2 * t_enc * e * s.enc_mlp + 2 * t_enc * t_enc * e)
    encoder += 2 * s.patches * s.patch_pixels * e
    cross_kv = s.dec_layers * 2 * 2 * t_enc * e * d
    steps = 0
    for t in range(1, new_tokens + 1):
        layer = 4 * d * d + 2 * d * d + 2 * d * s.dec_mlp + 2 * t * d + 2 * t_enc * d
        steps += s.dec_layers * 2 * layer + 2 * d * s.vocab
    return float(encoder + cross_kv + beams * steps)


def matmul_rate(
    device: str = "cpu", dtype: str = "float32", repeats: int = 7, square: int = 2048
) -> dict[str, float]:
    """This machine's matrix-product speed in GFLOP/s: a square product and the encoder's MLP shape.

    Medians over `repeats`, at torch's current thread count (the servers run at the same default).
    A GPU needs a larger `square` (8192) to approach its peak.
    """
    import torch

    kind = getattr(torch, dtype)
    shapes = {f"square_{square}": (square, square, square), "vit_mlp_b16": (16 * 197, 768, 3072)}
    rates = {}
    for name, (m, k, n) in shapes.items():
        a = torch.randn(m, k, device=device, dtype=kind)
        b = torch.randn(k, n, device=device, dtype=kind)
        times = []
        for _ in range(repeats + 1):
            sync(device)
            started = time.perf_counter()
            torch.mm(a, b)
            sync(device)
            times.append(time.perf_counter() - started)
        rates[name] = 2 * m * k * n / statistics.median(times[1:]) / 1e9
    rates["best"] = max(rates.values())
    return rates


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def median_seconds(call: Callable[[], object], repeats: int, device: str) -> float:
    """Median wall time of `repeats` calls after one warm-up (kernels, allocator, caches), each timed
    from an idle device to an idle device."""
    call()
    times = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        call()
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)
