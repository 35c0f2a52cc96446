"""A complete Docker-ViT handler: names a photo's dominant color (the color most of its pixels are nearest).

Serve it from the repository root: `docker-vit serve --handler examples.minimal_handler:ColorNamer`.
"""

from collections.abc import Hashable, Sequence

import numpy as np
import torch

from docker_vit.handler import Handler, Result

COLORS = {
    "black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128), "red": (200, 30, 30),
    "orange": (240, 140, 20), "yellow": (240, 220, 40), "green": (40, 160, 60), "blue": (30, 80, 200),
    "purple": (130, 50, 160), "pink": (240, 150, 180), "brown": (120, 75, 40),
}  # fmt: skip


class ColorNamer(Handler):
    name = "dominant-color"
    max_batch_size = 64  # the most items one predict() call receives

    def load(self) -> None:  # once, in the background, before the warm-up call and /readyz
        self.palette = torch.tensor(list(COLORS.values()), dtype=torch.float32)

    def prepare(self, data: bytes, options: Hashable) -> torch.Tensor:  # one input, in a CPU thread pool
        image = self.open_image(data, draft=32)  # the server's limits; bad bytes become a 415
        return torch.from_numpy(np.asarray(image.resize((32, 32)), dtype=np.float32).reshape(-1, 3))

    def predict(self, items: Sequence[torch.Tensor], options: Hashable) -> list[int]:  # on the device thread
        nearest = torch.cdist(torch.stack(items), self.palette).argmin(dim=2)  # each pixel's color
        return nearest.mode(dim=1).values.tolist()  # the color most pixels have

    def respond(self, output: int) -> Result:  # one output -> text for POST /, text + data for /v1/captions
        name = list(COLORS)[output]
        return Result(text=name, data={"rgb": list(COLORS[name])})
