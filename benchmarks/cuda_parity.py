"""Does the decode path give `generate`'s ids on this device, at vit-gpt2's sizes and past them?

    python benchmarks/cuda_parity.py                 # cuda: image sides 224 and 384, float32 and bfloat16
    python benchmarks/cuda_parity.py --variants "shipped,per-image K/V,per-image K/V attended per beam"
    python benchmarks/cuda_parity.py --encoder-width 1024   # with the encoder-to-decoder projection
    python benchmarks/cuda_parity.py --quick         # a narrow model, to check the script (any device)

`generate` repeats the encoder states per beam, so its cross-attention K/V product and attention run
on batch x beams rows. On a CPU the decode path computes the K/V once per image and, where that gives
`generate`'s bits, attends to that copy (the "per-image" variants here run that shared form, since
2026-12-01 one grouped call, not the call per beam the recorded H200 runs measured); on a GPU the kernels split their sums by row count (a long key sequence especially: at 384
pixels ViT-B/16 gives 577 tokens, vit-gpt2's 224 gives 197), so there it keeps them per beam. The
variants force one form or the other ("shipped": what `decoding` picks for the device). Random
weights (near-ties everywhere: the strictest case) and the decoder sharpened, so that beams finish at
different steps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import (
    GenerationConfig,
    VisionEncoderDecoderModel,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import model  # noqa: E402
from docker_vit import decoding  # noqa: E402
from docker_vit.gpt2_cache import Gpt2Stepper  # noqa: E402


class AttendedPerBeam(Gpt2Stepper):
    """Per-image K/V copied to one row per beam for the attention call: `generate`'s row count in
    the attention kernel, but not in the K/V product (an experiment, not a serving form)."""

    def _cross_attention(self, block, layer, x):
        attn, ln = block.crossattention, block.ln_cross_attn
        h = F.layer_norm(x, (self.dim,), ln.weight, ln.bias, ln.eps)
        rows = x.shape[0]
        q = self._heads(self._linear(attn.q_attn, h), rows)  # [rows, heads, 1, head_dim]
        k, v = (t.repeat_interleave(self.beams, dim=0) for t in self.cross[layer])
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scaling)
        return x + self._linear(attn.c_proj, out.transpose(1, 2).reshape(rows, self.dim))


# name: (per beam or not, the form `decoding.kv_per_image` is made to pick, None: its own; the stepper class)
VARIANTS = {
    "shipped": (None, Gpt2Stepper),
    "per-image K/V": (False, Gpt2Stepper),
    "per-image K/V attended per beam": (False, AttendedPerBeam),
    "per-beam K/V": (True, Gpt2Stepper),
}


def _decode(model, px: torch.Tensor, cfg: GenerationConfig, variant: str) -> torch.Tensor:
    """`decoding.generate` in one of the forms, put back as shipped afterwards."""
    per_beam, stepper = VARIANTS[variant]
    own = decoding.kv_per_image, decoding.Gpt2Stepper
    if per_beam is not None:
        decoding.kv_per_image = lambda decoder, states, beams: not per_beam
    decoding.Gpt2Stepper = stepper
    try:
        return decoding.generate(model, px, cfg)
    finally:
        decoding.kv_per_image, decoding.Gpt2Stepper = own


EOS = 299


def build(side: int, quick: bool, device: str, encoder_width: int = 0) -> VisionEncoderDecoderModel:
    """`encoder_width` other than the decoder's adds the encoder-to-decoder projection."""
    config = model.architecture(tiny=quick, vocab_size=EOS + 1, image_size=side, encoder_width=encoder_width)
    torch.manual_seed(side)
    with torch.device(device):
        return VisionEncoderDecoderModel(config).eval()


def sharpen(model: VisionEncoderDecoderModel) -> None:
    with torch.no_grad():
        for p in model.decoder.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
        model.decoder.lm_head.weight[EOS] += 3.0 * model.decoder.lm_head.weight[:50].mean(0)


def configs() -> list[GenerationConfig]:
    ids = dict(decoder_start_token_id=EOS, pad_token_id=EOS, eos_token_id=EOS, max_new_tokens=15)
    out = [GenerationConfig(num_beams=b, **ids) for b in (1, 2, 4, 5)]
    out += [GenerationConfig(num_beams=4, early_stopping=e, **ids) for e in (True, "never")]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sides", default="224,384")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--batch", type=int, default=5)
    p.add_argument("--variants", default="shipped", help=f"of: {', '.join(VARIANTS)}")
    p.add_argument("--encoder-width", type=int, default=0, help="e.g. 1024: with the projection to 768")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    variants = args.variants.split(",")
    width = f"; encoder width {args.encoder_width}, projected to the decoder's" if args.encoder_width else ""
    print(f"device {args.device}; batch {args.batch}; {len(configs())} generation configs per row{width}\n")
    print("| image side (tokens) | dtype | weights | decode path | configs with other ids than generate |")
    print("|---|---|---|---|---|")
    for side in (int(s) for s in args.sides.split(",")):
        base = build(side, args.quick, args.device, args.encoder_width)
        tokens = (side // 16) ** 2 + 1
        for dtype in args.dtypes.split(","):
            for kind in ("random", "sharpened"):
                model = base.to(getattr(torch, dtype))
                if kind == "sharpened":
                    sharpen(model)
                torch.manual_seed(1)
                px = torch.randn(args.batch, 3, side, side, device=args.device, dtype=model.dtype)
                bad: dict[str, list[str]] = {}
                with torch.inference_mode():
                    for cfg in configs():
                        if not decoding.supports(model, cfg):
                            bad.setdefault("all", []).append(f"beams {cfg.num_beams}: not supported")
                            continue
                        want = model.generate(pixel_values=px, generation_config=cfg)
                        for name in variants:
                            got = _decode(model, px, cfg, name)
                            if want.shape != got.shape or not torch.equal(want, got):
                                bad.setdefault(name, []).append(
                                    f"beams {cfg.num_beams} es {cfg.early_stopping}"
                                )
                for name in variants:
                    miss = bad.get(name, [])
                    print(
                        f"| {side} ({tokens}) | {dtype} | {kind} | {name} | {len(miss)}: {', '.join(miss) or '-'} |",
                        flush=True,
                    )
            base = build(
                side, args.quick, args.device, args.encoder_width
            )  # unsharpened, float32 again for the next dtype
    return 0


if __name__ == "__main__":
    sys.exit(main())
