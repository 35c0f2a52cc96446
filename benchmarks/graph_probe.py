"""What CUDA graphs would save in docker-vit's GPU decode: the decoder's steps run eagerly against the
same steps replayed from graphs, same shapes, same buffers. An experiment, not a serving path.

    python benchmarks/graph_probe.py                    # cuda, bfloat16, batches 1,16,64,128, beams 4 and 1
    python benchmarks/graph_probe.py --quick            # tiny model; on a CPU only the eager column

On the H200 a whole decode costs about the same from batch 1 to 128: the GPU waits for Python to
launch its kernels. One graph per position (the self-attention reads a longer cache each step)
replays a step's few hundred launches as one. The table gives, per shape: the whole decode
(`decoding.generate`, beam bookkeeping included), its 15 decoder steps eagerly, the same steps
replayed, and whether the replayed logits equal the eager ones bit for bit.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from transformers import VisionEncoderDecoderModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import flops, model  # noqa: E402
from docker_vit import decoding  # noqa: E402
from docker_vit.gpt2_cache import Gpt2Stepper  # noqa: E402


def _graphs(stepper: Gpt2Stepper, tokens: torch.Tensor, steps: int) -> tuple[list, list[torch.Tensor]]:
    """One captured graph per position, warmed up on a side stream as CUDA graphs require."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for pos in range(steps):
            stepper.logits(tokens, pos)
    torch.cuda.current_stream().wait_stream(side)
    graphs, outs = [], []
    for pos in range(steps):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs.append(stepper.logits(tokens, pos))
        graphs.append(graph)
    return graphs, outs


def shape_row(net, batch: int, beams: int, steps: int, args) -> str:
    side = net.config.encoder.image_size
    px = torch.randn(batch, 3, side, side, device=args.device, dtype=net.dtype)
    cfg = copy.deepcopy(net.generation_config)  # the model's own token ids
    cfg.num_beams, cfg.max_new_tokens = beams, steps
    whole = flops.median_seconds(lambda: decoding.generate(net, px, cfg), args.repeats, args.device)
    enc, kv = decoding._encode(net, px, beams)  # the form `decoding.generate` takes here
    stepper = Gpt2Stepper(net.decoder, enc, beams, steps, kv=kv)
    tokens = torch.randint(0, net.decoder.config.vocab_size, (batch * beams,), device=args.device)

    def eager() -> torch.Tensor:
        for pos in range(steps):
            out = stepper.logits(tokens, pos)
        return out

    eager_s = flops.median_seconds(eager, args.repeats, args.device)
    if not args.device.startswith("cuda"):
        return f"| {batch} | {beams} | {whole:.4f} | {eager_s:.4f} | – | – | – |"
    want = [stepper.logits(tokens, pos).clone() for pos in range(steps)]
    graphs, outs = _graphs(stepper, tokens, steps)

    def replay() -> None:
        for graph in graphs:
            graph.replay()

    replay_s = flops.median_seconds(replay, args.repeats, args.device)
    same = all(torch.equal(a, b) for a, b in zip(want, outs, strict=True))  # every position
    return (
        f"| {batch} | {beams} | {whole:.4f} | {eager_s:.4f} | {replay_s:.4f} | {eager_s / replay_s:.1f}x "
        f"| {'yes' if same else 'NO'} |"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batches", default="1,16,64,128")
    p.add_argument("--beams", default="4,1")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="tiny model, small batches")
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.repeats = "1,4", 2
    if args.device == "cpu":
        args.dtype = "float32"
    folder = model.build(str(model.DEFAULT_FOLDER) + ("-tiny" if args.quick else ""), tiny=args.quick)
    net = VisionEncoderDecoderModel.from_pretrained(folder, dtype=getattr(torch, args.dtype))
    net = net.eval().to(args.device)
    print(f"device {args.device}, {args.dtype}, 15 new tokens, median of {args.repeats}; seconds per call\n")
    print(
        "| batch | beams | whole decode | 15 steps eager | 15 steps replayed | replay speedup | same logits |"
    )
    print("|---:|---:|---:|---:|---:|---:|---|")
    for beams in (int(b) for b in args.beams.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            try:
                with torch.inference_mode():
                    print(shape_row(net, batch, beams, 15, args), flush=True)
            except Exception as exc:  # one shape failing must not end a one-shot run
                print(f"| {batch} | {beams} | failed: {type(exc).__name__}: {exc} | | | | |", flush=True)
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
