"""A checkpoint read and checked before it serves: which device and dtype, its files from the Hub cache
or a folder, and whether it can caption at all. What goes wrong here is a setup matter, said in one line
(a missing folder, an unreadable file, a device this machine lacks, a model that is no captioner)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor

log = logging.getLogger("docker_vit.engine")  # the engine's load, as its log lines have always said

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# What an image processor gives a captioning model: pixels, or Pix2Struct's patches (with their mask).
IMAGE_INPUTS = frozenset({"pixel_values", "flattened_patches"})


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
    """`auto` is bfloat16 on a GPU that computes it, float16 on older GPUs, float32 elsewhere."""
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


class Unservable(OSError):
    """The model is there, but not one the captioner can serve as set up (a text-only model, no
    tokenizer, more tokens asked than it has positions): a setup matter, said in one line."""


class DeviceUnavailable(OSError):
    """The chosen device is not on this machine, or this torch build cannot use it (a setup matter,
    reported in one line like a missing file, not as a crash)."""


def read(source: str, model_id: str, dtype: torch.dtype) -> tuple[Any, Any, Any]:
    """The model, its image processor and its tokenizer, from a Hub id or a local folder, checked."""
    try:
        try:
            model = AutoModelForImageTextToText.from_pretrained(source, local_files_only=True, dtype=dtype)
            cached = True
        except OSError:  # not (fully) in the cache: fetched, so the Hub answers for the processor too
            model, cached = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype), False
        # Asked of the cache alone right after the model's fetch, the processor would fail as
        # "Unrecognized processing class" (a ValueError): the cache holds the model's files only.
        processor = _pretrained(AutoProcessor, source, cached)
        # A vit-gpt2 folder has no processor class: AutoProcessor then yields only the tokenizer.
        image_processor = getattr(processor, "image_processor", None)
        if image_processor is None:
            image_processor = _pretrained(AutoImageProcessor, source, cached)
    except Exception as exc:
        unreadable = _unreadable(source)
        if unreadable:  # transformers reports a file it may not read as missing
            raise PermissionError(f"cannot read {unreadable[0]}: {_NOT_READABLE}") from exc
        if isinstance(exc, OSError):  # no such model, no network: their messages say so
            raise
        raise Unservable(f"cannot read {model_id}: {_one_line(exc)}") from exc  # one line
    for path in _unreadable(source):  # transformers skips some (generation_config.json) quietly
        log.warning("cannot read %s: %s", path, _NOT_READABLE)
    tokenizer = getattr(processor, "tokenizer", processor)
    _check_captioning(model_id, tokenizer, image_processor, model.config)
    return model, image_processor, tokenizer


def check_available(device: torch.device) -> None:
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


def _pretrained(auto: Any, model_id: str, cached: bool) -> Any:
    """`auto.from_pretrained`, from the Hub cache alone when the model was there (`docker-vit download`).

    Otherwise the Hub is asked about every optional file the cache lacks, each with retries: offline,
    a cached model took minutes to start. A model not (fully) cached is fetched as usual, and so is a
    processor the cache lacks beside its model (an earlier run's, or another program's, cache): that
    one transformers reports as "Unrecognized processing class", a ValueError."""
    if cached:
        try:
            return auto.from_pretrained(model_id, local_files_only=True)
        except (OSError, ValueError):
            pass
    return auto.from_pretrained(model_id)


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
    try:
        produced = image_processor(images=[Image.new("RGB", (32, 32))], return_tensors="np")
    except Exception as exc:  # Pix2Struct's VQA checkpoints ask for a question with every image
        raise Unservable(f"{model_id}'s processor cannot take an image alone: {_one_line(exc)}") from exc
    if not IMAGE_INPUTS & set(produced):
        raise Unservable(
            f"{model_id}'s processor gives {', '.join(produced)}, not {' or '.join(sorted(IMAGE_INPUTS))}: "
            "the captioner serves models that caption from the image's pixels alone (serve others with a "
            "handler of your own)"
        )


def size_field(image_processor: Any) -> Callable[[str], Any]:
    """A reader of the processor's `size` fields (`height`, `shortest_edge`...), a dict or a SizeDict."""
    size = getattr(image_processor, "size", None)
    return size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)


def input_size(image_processor: Any) -> int | None:
    """The side the processor resizes to, so intake can decode large JPEGs at a reduced scale."""
    get = size_field(image_processor)
    sides = [get(key) for key in ("height", "width", "shortest_edge")]
    sides = [side for side in sides if isinstance(side, int)]
    return max(sides) if sides else None
