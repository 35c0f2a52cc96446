"""The model path, top to bottom: load, pixels, tokens, text.

Knows torch and transformers, nothing of HTTP. Any model that transformers' AutoModelForImageTextToText
covers works (VisionEncoderDecoder such as vit-gpt2, BLIP, GIT); vit-gpt2-shaped models take a faster,
token-for-token identical decode path (`docker_vit.decoding`).
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoProcessor,
    GenerationConfig,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.utils import logging as hf_logging

from docker_vit import decoding, logs, memory

log = logging.getLogger("docker_vit.engine")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(name: str = "auto") -> torch.device:
    """`auto` prefers cuda, then Apple's mps, then the CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is float16/bfloat16 on a GPU (exactness is a CPU-path promise) and float32 elsewhere."""
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {name!r}")
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if _native_bfloat16(device) else torch.float16
    return torch.float32


def _native_bfloat16(device: torch.device) -> bool:
    """Ampere (compute capability 8) or later. Not `torch.cuda.is_bf16_supported()`: it also answers yes
    where bfloat16 is only emulated (a T4, a V100), slowly."""
    if not torch.cuda.is_available():  # said in one line later, when the model is put on the device
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8


class CaptionEngine:
    """One image-to-text model on one device."""

    def __init__(self, model: str, device: str = "auto", dtype: str = "auto", threads: int = 0) -> None:
        self.model_id = model
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.threads = threads
        self.model: Any = None  # these, once loaded
        self.image_processor: Any = None
        self.tokenizer: Any = None
        self.input_size: int | None = None  # the side the processor resizes to, where it has one
        self.max_new_tokens: int | None = None  # the most the model's positions allow

    def load(self) -> None:
        """Read weights and processors from a Hub id (downloading once) or a local folder."""
        if self.threads:
            torch.set_num_threads(self.threads)
        source = os.path.expanduser(self.model_id)  # a Hub id stays as it is
        if self.model_id.startswith(("/", "./", "../", "~")) and not os.path.isdir(source):
            raise FileNotFoundError(f"no model folder at {self.model_id}")  # not the Hub's "repo id" error
        _check_available(self.device)
        if self.device.type == "cpu":
            memory.keep_freed_blocks()
        hf_logging.disable_progress_bar()  # a bar per load, on every CLI run and server start, is noise
        logs.adopt_library_loggers()
        try:
            model = _pretrained(AutoModelForImageTextToText, source, dtype=self.dtype)
            processor = _pretrained(AutoProcessor, source)
            # A vit-gpt2 folder has no processor class: AutoProcessor then yields only the tokenizer.
            self.image_processor = getattr(processor, "image_processor", None)
            if self.image_processor is None:
                self.image_processor = _pretrained(AutoImageProcessor, source)
        except Exception as exc:
            unreadable = _unreadable(source)
            if unreadable:  # transformers reports a file it may not read as missing
                raise PermissionError(f"cannot read {unreadable[0]}: {_NOT_READABLE}") from exc
            if isinstance(exc, OSError):  # no such model, no network: their messages say so
                raise
            raise Unservable(f"cannot read {self.model_id}: {_one_line(exc)}") from exc  # one line
        for path in _unreadable(source):  # transformers skips some (generation_config.json) quietly
            log.warning("cannot read %s: %s", path, _NOT_READABLE)
        self.tokenizer = getattr(processor, "tokenizer", processor)
        _check_captioning(self.model_id, self.tokenizer, self.image_processor, model.config)
        # Every call sets max_new_tokens, which wins over a max_length the model's own config sets;
        # left there, that max_length only makes transformers warn at every batch.
        model.generation_config.max_length = None
        self.model = model.to(self.device).eval()
        self.input_size = _input_size(self.image_processor)
        text = self.model.config.get_text_config(decoder=True)
        positions = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
        # The start token takes position 0 and the last new token is never fed back: one per position.
        self.max_new_tokens = positions if isinstance(positions, int) else None

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """One RGB image to the model's normalized pixel tensor (CPU work, thread-safe).

        The processor returns numpy and the tensor shares its memory: no torch op runs on the intake
        threads, so they start no OpenMP teams of their own (see `Batcher.on_device`)."""
        pixels = self.image_processor(images=[image], return_tensors="np")["pixel_values"][0]
        return torch.from_numpy(pixels)

    def resized(self, width: int, height: int) -> tuple[int, int]:
        """The size the image processor resizes a `width` x `height` image to, before any crop.

        A shortest-edge resize (CLIP's, GIT's) keeps the aspect ratio, so a 1 x 100,000 sliver of a
        few hundred bytes would become billions of floats: intake refuses what this says is too big."""
        processor, get = self.image_processor, _size_field(self.image_processor)
        if not getattr(processor, "do_resize", True) or not isinstance(get("shortest_edge"), int):
            fixed = get("height"), get("width")  # a fixed size, a longest edge or none: no blow-up
            return (fixed[1], fixed[0]) if all(isinstance(side, int) for side in fixed) else (width, height)
        short, long = sorted((max(width, 1), max(height, 1)))
        scale = get("shortest_edge") / short
        longest = get("longest_edge")
        if isinstance(longest, int) and long * scale > longest:
            scale = longest / long
        return max(1, int(width * scale)), max(1, int(height * scale))

    @torch.inference_mode()
    def generate(
        self,
        pixels: Sequence[torch.Tensor],
        num_beams: int,
        max_new_tokens: int,
        checkpoint: Callable[[], None] | None = None,
    ) -> list[list[int]]:
        """A batch of pixel tensors to token ids: the same ids as the model's own `generate`.

        `checkpoint` runs between decoding steps; what it raises ends the call (nobody waits for it)."""
        with memory.in_use:  # freed activations kept while batches follow each other
            batch = torch.stack(list(pixels)).to(self.device, self.dtype)
            config = self.generation_config(num_beams, max_new_tokens)
            if decoding.supports(self.model, config):
                ids = decoding.generate(self.model, batch, config, checkpoint)
            else:
                between = StoppingCriteriaList([_Between(checkpoint)] if checkpoint else [])
                ids = self.model.generate(
                    pixel_values=batch, generation_config=config, stopping_criteria=between
                )
            return ids.tolist()

    def generation_config(self, num_beams: int, max_new_tokens: int) -> GenerationConfig:
        config = copy.deepcopy(self.model.generation_config)
        config.num_beams = num_beams
        config.max_new_tokens = max_new_tokens
        # One caption per image, as plain ids, whatever else the checkpoint's own config asks for.
        config.num_return_sequences = 1
        config.return_dict_in_generate = False
        return config

    def text(self, ids: list[int]) -> str:
        """Token ids to the caption, exactly as the original service printed it."""
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def describe(self) -> dict[str, Any]:
        return {
            "model": shown_id(self.model_id),
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
        }


class Unservable(OSError):
    """The model is there, but not one the captioner can serve as set up (a text-only model, no
    tokenizer, more tokens asked than it has positions): a setup matter, said in one line."""


class DeviceUnavailable(OSError):
    """The chosen device is not on this machine, or this torch build cannot use it (a setup matter,
    reported in one line like a missing file, not as a crash)."""


class _Between(StoppingCriteria):
    """`model.generate` asks its stopping criteria after every step: there `checkpoint` runs. It never
    stops a sequence itself, so the ids stay the model's own."""

    def __init__(self, checkpoint: Callable[[], None]) -> None:
        self.checkpoint = checkpoint

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        self.checkpoint()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _check_available(device: torch.device) -> None:
    backend = {
        "cuda": torch.cuda,
        "mps": getattr(torch.backends, "mps", None),
        "xpu": getattr(torch, "xpu", None),
    }
    module = backend.get(device.type)
    if device.type != "cpu" and (module is None or not module.is_available()):
        raise DeviceUnavailable(f"device {device} is not available to torch {torch.__version__} here")
    if device.type in ("cuda", "xpu") and device.index is not None and device.index >= module.device_count():
        raise DeviceUnavailable(
            f"device {device}: this machine has {module.device_count()} {device.type} device(s)"
        )


def shown_id(model_id: str) -> str:
    """A model id as JSON can carry it: a folder name's undecodable bytes (surrogates) escaped."""
    return model_id.encode("utf-8", "backslashreplace").decode()


_NOT_READABLE = "permission denied (make the model folder readable: chmod -R a+rX)"


def _unreadable(folder: str) -> list[str]:
    """Files of a local model folder this user cannot read (say, a 0600 `model.safetensors` of another
    user, as transformers saves it)."""
    if not os.path.isdir(folder):
        return []
    paths = (os.path.join(folder, name) for name in sorted(os.listdir(folder)))
    return [path for path in paths if os.path.isfile(path) and not os.access(path, os.R_OK)]


def _pretrained(auto: Any, model_id: str, **kwargs: Any) -> Any:
    """`auto.from_pretrained`, from the Hub cache alone when the model is there (`docker-vit download`).

    Otherwise the Hub is asked about every optional file the cache lacks, each with retries: offline,
    a cached model took minutes to start. A model not (fully) cached is fetched as usual."""
    try:
        return auto.from_pretrained(model_id, local_files_only=True, **kwargs)
    except OSError:
        return auto.from_pretrained(model_id, **kwargs)


def _one_line(exc: Exception) -> str:
    """An error as one short line (transformers' "not an image-to-text model" lists every model type)."""
    text = " ".join(str(exc).split("Model type should be")[0].split())
    return f"{type(exc).__name__}: {text[:300]}"


def _check_captioning(model_id: str, tokenizer: Any, image_processor: Any, config: Any = None) -> None:
    """The captioner needs pixels in and a tokenizer out: say so at load, not at the first caption."""
    if not callable(getattr(tokenizer, "decode", None)):
        raise Unservable(
            f"{model_id} has no tokenizer (tokenizer.json or vocabulary files) to read captions with"
        )
    # Without its vocabulary files transformers makes a tokenizer of a few tokens, and every caption
    # would come out empty.
    text = config.get_text_config(decoder=True) if config is not None else None
    vocab = getattr(text, "vocab_size", None)
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else None
    if isinstance(vocab, int) and size is not None and size < vocab // 2:
        raise Unservable(
            f"{model_id}'s tokenizer knows {size} tokens but the model writes {vocab}: "
            "its tokenizer files (tokenizer.json or vocabulary files) are missing or not this model's"
        )
    produced = image_processor(images=[Image.new("RGB", (32, 32))], return_tensors="np")
    if "pixel_values" not in produced:
        raise Unservable(
            f"{model_id}'s processor gives {', '.join(produced)}, not pixel_values: the captioner serves "
            "models that caption from the image's pixels alone (serve others with a handler of your own)"
        )


def _size_field(image_processor: Any) -> Callable[[str], Any]:
    """A reader of the processor's `size` fields (`height`, `shortest_edge`...), a dict or a SizeDict."""
    size = getattr(image_processor, "size", None)
    return size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)


def _input_size(image_processor: Any) -> int | None:
    """The side the processor resizes to, so intake can decode large JPEGs at a reduced scale."""
    get = _size_field(image_processor)
    sides = [get(key) for key in ("height", "width", "shortest_edge")]
    sides = [side for side in sides if isinstance(side, int)]
    return max(sides) if sides else None
