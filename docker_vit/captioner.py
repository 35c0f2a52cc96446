"""The captioner: Docker-ViT's own handler, the image-to-text engine behind the Handler interface."""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, NamedTuple

from PIL import Image

from docker_vit.abandon import stop_if_abandoned
from docker_vit.checkpoints import Unservable, shown_id
from docker_vit.config import GENERATION, WHOLE_NUMBER, Settings
from docker_vit.engine import OUT_OF_MEMORY, CaptionEngine
from docker_vit.errors import OptionsError, TooLarge
from docker_vit.handler import Handler, Result, shown

log = logging.getLogger("docker_vit.captioner")
DRAFT_SIDE = 512
# The most pixels the model's processor may resize an image to, or --max-pixels if higher: what an image
# of the default --max-pixels costs (a lower setting must not refuse the model's own 224 x 224).
RESIZE_LIMIT = 40_000_000


class Generation(NamedTuple):
    """Per-request generation options; requests with equal ones share a batch."""

    num_beams: int
    max_new_tokens: int


class Captioner(Handler):
    """Captions images with any AutoModelForImageTextToText model (default: vit-gpt2)."""

    option_names = GENERATION

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.engine = CaptionEngine(settings.model, settings.device, settings.dtype, settings.threads)
        if type(self).name == Handler.name:  # a subclass that names itself keeps its name
            self.name = shown_id(settings.model)

    def load(self) -> None:
        self.engine.load()
        if self.settings.max_new_tokens > self._token_limit():
            raise Unservable(
                f"max_new_tokens {self.settings.max_new_tokens} is more than {self.settings.model} "
                f"can generate ({self._token_limit()}: its position embeddings end there)"
            )
        self._probe()

    def _probe(self) -> None:
        """One token for a blank image, at the default beam width. A model that needs a text prompt with
        its image (LLaVA, Kosmos-2), or a checkpoint whose generation settings this transformers cannot
        run, fails here, said in one line at load, rather than in the warm-up's words or, under
        `caption`, on every image."""
        try:
            blank = self.engine.pixels(Image.new("RGB", (32, 32)))
            self.engine.generate([blank], self.settings.num_beams, 1)
        except OUT_OF_MEMORY:
            raise
        except Exception as exc:
            log.debug("the load's test caption failed", exc_info=exc)  # a bug of ours would show here
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
            beams = self.settings.num_beams
            raise Unservable(
                f"{shown_id(self.settings.model)} failed to caption a test image at {beams} beam(s) "
                f"({reason}): the captioner serves models that caption an image alone (prompt-driven "
                "ones, such as LLaVA or Kosmos-2, need a handler of your own)"
            ) from exc

    def _token_limit(self) -> int:
        """--max-new-tokens-limit, or less where the model's positions end first (a 422, not a 500)."""
        model = self.engine.max_new_tokens
        return min(self.settings.max_new_tokens_limit, model or self.settings.max_new_tokens_limit)

    def describe(self) -> dict[str, Any]:
        s = self.settings
        return {
            **super().describe(),  # "handler": which class serves
            **self.engine.describe(),  # "model": the model's id, not the name a subclass gives itself
            **({"name": self.name} if type(self).name != Handler.name else {}),
            "generation": s.generation(),
            "limits": {"max_num_beams": s.max_num_beams, "max_new_tokens": self._token_limit()},
            "jpeg_draft": s.jpeg_draft,  # big JPEGs decoded at a reduced scale: what the model sees
        }

    def options(self, raw: Mapping[str, Any]) -> Hashable:
        s = self.settings
        return Generation(
            _bounded(raw, "num_beams", s.num_beams, s.max_num_beams),
            _bounded(raw, "max_new_tokens", s.max_new_tokens, self._token_limit()),
        )

    def prepare(self, data: bytes, options: Hashable) -> Any:
        return self.open_image(data, draft=self._draft(), then=self._pixels)

    def _pixels(self, image: Image.Image) -> Any:
        """The model's input, made while the decode budget counts the picture: the processor's resize
        holds full-size copies of it."""
        width, height = self.engine.resized(*image.size)
        limit = max(self.settings.max_pixels, RESIZE_LIMIT)
        if width * height > limit:
            raise TooLarge(
                f"image is {image.width}x{image.height} pixels: the model's processor would resize it to "
                f"{width}x{height}, more than {limit} pixels",
                "max_pixels",
            )
        return self.engine.pixels(image)

    def _draft(self) -> int | None:
        """A big JPEG decodes at a reduced DCT scale, but keeps at least 2 x DRAFT_SIDE pixels a side,
        several times what the model's own resize keeps (224 for vit-gpt2): the resize, not the draft,
        decides the pixels, and photos of ordinary size (and every image of a small model) are decoded
        whole, exactly as the model's processor would."""
        size = self.engine.input_size
        return max(size, DRAFT_SIDE) if size and self.settings.jpeg_draft else None

    def predict(self, items: Sequence[Any], options: Hashable) -> Sequence[Any]:
        num_beams, max_new_tokens = options
        return self.engine.generate(items, num_beams, max_new_tokens, between_steps=stop_if_abandoned)

    def respond(self, output: Any) -> Result:
        return Result(text=self.engine.text(output))


MAX_DIGITS = 100  # Python refuses to read past 4,300 digits; no count needs a hundred


def _bounded(raw: Mapping[str, Any], name: str, default: int, limit: int) -> int:
    value = raw.get(name)
    if value is None or value == "":
        return default
    if isinstance(value, str) and len(value) > MAX_DIGITS and WHOLE_NUMBER.fullmatch(value):  # int() refuses
        raise OptionsError(
            f"{name} must be between 1 and {limit}, got a number of {len(value.strip())} characters"
        )
    try:
        number = int(value)
        # JSON's 2.0 is a count (a client computed it as a float; pydantic takes it too); 2.5, true,
        # "2.0", "1_0" or other digits than 0-9 are not what a client means
        whole = isinstance(value, float) and value.is_integer()
        if isinstance(value, bool) or (isinstance(value, float) and not whole):
            raise ValueError
        if isinstance(value, str) and not WHOLE_NUMBER.fullmatch(value):
            raise ValueError
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
        raise OptionsError(f"{name} must be an integer, got {shown(value)}") from None
    if not 1 <= number <= limit:
        raise OptionsError(f"{name} must be between 1 and {limit}, got {shown(number)}")
    return number
