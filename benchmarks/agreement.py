"""How often a reduced precision gives float32's caption: what `--dtype bfloat16` (or float16) trades for
its speed, measured.

    python benchmarks/agreement.py                       # bfloat16 against float32, greedy and beam 4
    python benchmarks/agreement.py --dtypes bfloat16,float16 --device cuda
    python benchmarks/agreement.py --quick               # tiny model, to check the script

Captions the test photos (../shared/data, or tests/data) and variants of each (mirrored, turned a quarter either way,
halves, a center crop, gray) with the vit-gpt2-architecture model of `benchmarks/model.py` through
`CaptionEngine`, the path the server runs, in float32 and in each dtype, 15 new tokens. Reports, per
dtype and beam width: captions identical to float32's, and tokens that agree (the same token at the
same position, counted over float32's own tokens: the start token and the batch's padding left out). Random weights make near-ties common, so a trained
model agrees at least as often; its own rate needs its weights (no Hub download on these machines).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import model  # noqa: E402

PHOTOS = ROOT.parent / "shared" / "data"
PHOTOS = PHOTOS if PHOTOS.is_dir() else ROOT / "tests" / "data"  # a clone without ../shared


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtypes", default="bfloat16", help="compared with float32, comma-separated")
    p.add_argument("--beams", default="1,4")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="tiny model, two photos")
    args = p.parse_args(argv)
    folder = model.build(str(model.DEFAULT_FOLDER) + ("-tiny" if args.quick else ""), tiny=args.quick)
    images = variants(sorted(PHOTOS.glob("*.jpg"))[: 2 if args.quick else None])
    beams = [int(b) for b in args.beams.split(",")]
    reference = {b: captions(folder, args.device, "float32", images, b, args.batch) for b in beams}
    print(f"agreement with float32: {folder}, {len(images)} images, device {args.device}, 15 new tokens\n")
    print("| dtype | beams | captions identical | tokens agreeing |")
    print("|---|---:|---:|---:|")
    for dtype in args.dtypes.split(","):
        for b in beams:
            other = captions(folder, args.device, dtype, images, b, args.batch)
            same = sum(x == y for x, y in zip(reference[b], other, strict=True))
            tokens = sum(len(x) for x in reference[b])
            agreeing = sum(
                a == c for x, y in zip(reference[b], other, strict=True) for a, c in zip(x, y, strict=False)
            )
            print(
                f"| {dtype} | {b} | {same} of {len(images)} | {agreeing} of {tokens} ({agreeing / tokens:.0%}) |"
            )
    return 0


def variants(paths: list[Path]) -> list[Image.Image]:
    """Each photo, and nine pictures a model sees as new ones."""
    out = []
    for path in paths:
        image = Image.open(path).convert("RGB")
        w, h = image.size
        out += [image, ImageOps.mirror(image), image.rotate(90, expand=True), image.rotate(270, expand=True)]
        out += [image.crop((0, 0, w, h // 2)), image.crop((0, h // 2, w, h))]
        out += [image.crop((0, 0, w // 2, h)), image.crop((w // 2, 0, w, h))]
        out += [
            image.crop((w // 4, h // 4, 3 * w // 4, 3 * h // 4)),
            ImageOps.grayscale(image).convert("RGB"),
        ]
    return out


def captions(
    folder: Path, device: str, dtype: str, images: list[Image.Image], beams: int, batch: int
) -> list:
    """The token ids of each image's caption, as the server's engine makes them."""
    from docker_vit.engine import CaptionEngine

    engine = CaptionEngine(str(folder), device, dtype)
    engine.load()
    pixels = [engine.pixels(image) for image in images]
    eos = engine.model.generation_config.eos_token_id
    ends = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    ids: list[list[int]] = []
    for start in range(0, len(pixels), batch):
        ids += [own_tokens(row, ends) for row in engine.generate(pixels[start : start + batch], beams, 15)]
    return ids


def own_tokens(row: list[int], ends: set[int]) -> list[int]:
    """A caption's own tokens: after the start token, up to its end token (what follows pads the
    batch's shorter captions to its longest)."""
    tokens = []
    for token in row[1:]:
        tokens.append(token)
        if token in ends:
            break
    return tokens


if __name__ == "__main__":
    sys.exit(main())
