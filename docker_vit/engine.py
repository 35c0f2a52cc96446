"""The model path, top to bottom: load, pixels, tokens, text (checkpoints.py reads and checks the model).

Knows torch and transformers, nothing of HTTP. Any model that transformers' AutoModelForImageTextToText
covers and that captions an image alone works (VisionEncoderDecoder models such as vit-gpt2; BLIP,
GIT, Pix2Struct); vit-gpt2-shaped models take a faster, token-for-token identical decode path
(`docker_vit.decoding`).
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from PIL import Image
from transformers import (
    GenerationConfig,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.utils import logging as hf_logging

from docker_vit import checkpoints, decoding, logs, memory

# Out of memory, on the device or the host: said as itself at load, not as "cannot caption".
OUT_OF_MEMORY = (MemoryError, torch.OutOfMemoryError)

log = logging.getLogger("docker_vit.engine")


class CaptionEngine:
    """One image-to-text model on one device."""

    def __init__(self, model: str, device: str = "auto", dtype: str = "auto", threads: int = 0) -> None:
        self.model_id = model
        self.device = checkpoints.pick_device(device)
        self.dtype = checkpoints.pick_dtype(dtype, self.device)
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
        _check_folder(self.model_id, source)
        checkpoints.check_available(self.device)
        if self.device.type == "cpu":
            memory.keep_freed_blocks()
        hf_logging.disable_progress_bar()  # a bar per load, on every CLI run and server start, is noise
        logs.adopt_library_loggers()
        model, self.image_processor, self.tokenizer = checkpoints.read(source, self.model_id, self.dtype)
        # Every call sets max_new_tokens, which wins over a max_length the model's own config sets;
        # left there, that max_length only makes transformers warn at every batch.
        model.generation_config.max_length = None
        self.model = model.to(self.device).eval()
        self.input_size = checkpoints.input_size(self.image_processor)
        text = self.model.config.get_text_config(decoder=True)
        positions = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
        # The start token takes position 0 and the last new token is never fed back: one per position,
        # less those the text model spends before the start token.
        self.max_new_tokens = positions - _positions_taken(model) if isinstance(positions, int) else None
        dtype = str(self.dtype).removeprefix("torch.")
        log.info("%s on %s, %s", checkpoints.shown_id(self.model_id), self.device, dtype)

    def pixels(self, image: Image.Image) -> dict[str, torch.Tensor]:
        """One RGB image to the model's inputs, by name: its normalized `pixel_values` (Pix2Struct's
        `flattened_patches` and their `attention_mask`). CPU work, thread-safe.

        The processor returns numpy and the tensors share its memory: no torch op runs on the intake
        threads, so they start no OpenMP teams of their own (see device.py)."""
        produced = self.image_processor(images=[image], return_tensors="np")
        return {name: torch.from_numpy(values[0]) for name, values in produced.items()}

    def resized(self, width: int, height: int) -> tuple[int, int]:
        """The size the image processor resizes a `width` x `height` image to, before any crop.

        A shortest-edge resize (CLIP's, GIT's) keeps the aspect ratio, so a 1 x 100,000 sliver of a
        few hundred bytes would become billions of floats: intake refuses what this says is too big."""
        processor, get = self.image_processor, checkpoints.size_field(self.image_processor)
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
        inputs: Sequence[Mapping[str, torch.Tensor]],
        num_beams: int,
        max_new_tokens: int,
        between_steps: Callable[[], None] | None = None,
    ) -> list[list[int]]:
        """A batch of `pixels()` outputs to token ids: the same ids as the model's own `generate`.

        `between_steps` runs between decoding steps; what it raises ends the call (nobody waits for it)."""
        with memory.in_use:  # freed activations kept while batches follow each other
            batch = {name: self._stacked([item[name] for item in inputs]) for name in inputs[0]}
            config = self.generation_config(num_beams, max_new_tokens)
            if list(batch) == ["pixel_values"] and decoding.supports(self.model, config):
                ids = decoding.generate(self.model, batch["pixel_values"], config, between_steps)
            else:
                between = StoppingCriteriaList([_Between(between_steps)] if between_steps else [])
                ids = self.model.generate(**batch, generation_config=config, stopping_criteria=between)
            return ids.tolist()

    def _stacked(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """One input of every image, as one batch tensor on the device; floats in the model's dtype."""
        batch = torch.stack(tensors)
        return batch.to(self.device, self.dtype) if batch.is_floating_point() else batch.to(self.device)

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
            "model": checkpoints.shown_id(self.model_id),
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
        }


def _check_folder(model_id: str, source: str) -> None:
    """A local path that is no model folder, said as such. transformers reads a file given as the model
    as its config and then as pickled weights (its "Weights only load failed" line suggests an unsafe
    retry), and a folder without config.json as one whose config lacks a `model_type`."""
    if os.path.exists(source) and not os.path.isdir(source):
        raise NotADirectoryError(
            f"no model folder at {model_id}: it is a file (give the folder holding config.json)"
        )
    if model_id.startswith(("/", "./", "../", "~")) and not os.path.isdir(source):
        raise FileNotFoundError(f"no model folder at {model_id}")  # not the Hub's "repo id" error
    if os.path.isdir(source) and not os.path.exists(os.path.join(source, "config.json")):
        raise FileNotFoundError(
            f"no config.json in {model_id}: not a saved model folder (save_pretrained writes one)"
        )


def _positions_taken(model: Any) -> int:
    """Positions the text model spends before the caption's start token: a RoBERTa-style embedding's
    offset (its ids start at padding_idx + 1) and BLIP-2's query tokens, which precede the text."""
    decoder = getattr(model, "decoder", None)
    if decoder is None:
        decoder = getattr(model, "language_model", model)
    embeddings = getattr(getattr(decoder, "base_model", decoder), "embeddings", None)
    padding = getattr(getattr(embeddings, "position_embeddings", None), "padding_idx", None)
    queries = getattr(model.config, "num_query_tokens", 0)
    return (padding + 1 if isinstance(padding, int) else 0) + (queries if isinstance(queries, int) else 0)


class _Between(StoppingCriteria):
    """`model.generate` asks its stopping criteria after every step: there `between_steps` runs. It never
    stops a sequence itself, so the ids stay the model's own."""

    def __init__(self, between_steps: Callable[[], None]) -> None:
        self.between_steps = between_steps

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        self.between_steps()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
