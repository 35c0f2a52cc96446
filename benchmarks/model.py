"""A random-weight model with vit-gpt2's exact architecture, built offline and saved like a Hub folder.

The benchmarks need the real shapes (ViT-B/16 at 224, GPT-2 small with cross-attention, a 50,257-token
vocabulary: the lm_head is a quarter of the decoder's work) but not the real weights, which cannot be
downloaded here. Random weights rarely emit end-of-text, so every caption runs to full length: the
worst case, and the same work for every server.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

VOCAB_SIZE = 50257
EOS_ID = VOCAB_SIZE - 1
DEFAULT_FOLDER = Path("/tmp/docker-vit-bench-model")
_STAMP = "bench-model.json"
_VERSION = 1


def build(folder: Path | str = DEFAULT_FOLDER, *, seed: int = 0, tiny: bool = False) -> Path:
    """Save the model, tokenizer and image processor into `folder`, or reuse what an earlier call saved.

    `tiny` swaps in a few-layer, narrow model with the same vocabulary, for testing the scripts quickly.
    """
    folder = Path(folder)
    stamp = {"version": _VERSION, "seed": seed, "tiny": tiny}
    marker = folder / _STAMP
    if marker.exists() and json.loads(marker.read_text()) == stamp:
        return folder
    if folder.is_dir() and any(folder.iterdir()) and not marker.exists():  # `--model-dir` of a real model
        raise SystemExit(
            f"{folder} holds files but is no benchmark model folder (no {_STAMP}): refusing to write a "
            "random-weight model over them; give a new or empty folder"
        )
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"building": True}))  # first: a build cut short is rebuilt next time
    _save_model(folder, seed, tiny)
    tokenizer().save_pretrained(folder)
    from transformers import ViTImageProcessor

    ViTImageProcessor().save_pretrained(folder)  # 224x224, mean/std 0.5, like vit-gpt2's
    marker.write_text(json.dumps(stamp))
    return folder


def architecture(
    *, tiny: bool = False, vocab_size: int = VOCAB_SIZE, image_size: int = 224, encoder_width: int = 0
) -> Any:
    """vit-gpt2's configuration (ViT-B/16, GPT-2 small with cross-attention), its end, start and pad
    token the vocabulary's last id. `tiny` narrows both halves; an `encoder_width` other than the
    decoder's adds the encoder-to-decoder projection."""
    from transformers import GPT2Config, VisionEncoderDecoderConfig, ViTConfig

    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
    encoder = ViTConfig(image_size=image_size, **(small if tiny else {}))  # defaults: ViT-B/16
    if encoder_width:
        encoder.hidden_size, encoder.intermediate_size = encoder_width, 4 * encoder_width
    eos = vocab_size - 1
    sizes = dict(n_embd=64, n_layer=2, n_head=2) if tiny else {}  # defaults: GPT-2 small
    decoder = GPT2Config(
        vocab_size=vocab_size,
        bos_token_id=eos,
        eos_token_id=eos,
        add_cross_attention=True,
        is_decoder=True,
        **sizes,
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id = config.pad_token_id = config.eos_token_id = eos
    return config


def _save_model(folder: Path, seed: int, tiny: bool) -> None:
    import torch
    from transformers import VisionEncoderDecoderModel

    torch.manual_seed(seed)
    model = VisionEncoderDecoderModel(architecture(tiny=tiny)).eval()
    for key in ("decoder_start_token_id", "pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, key, EOS_ID)
    model.save_pretrained(folder)


def tokenizer():
    """A byte-level BPE tokenizer with GPT-2's vocabulary size and end-of-text id.

    The 256 byte symbols, then 50,000 made-up syllable words (half with GPT-2's leading-space marker),
    then `<|endoftext|>` at 50256. Every id decodes to text, so any caption a random model emits does.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2TokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    for word in itertools.islice(_words(), EOS_ID - len(vocab)):
        vocab[word] = len(vocab)
    eos = "<|endoftext|>"
    vocab[eos] = EOS_ID
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([eos])
    tokenizer = GPT2TokenizerFast(tokenizer_object=tok, bos_token=eos, eos_token=eos, unk_token=eos)
    tokenizer.pad_token = eos
    return tokenizer


def _words():
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    for length in (1, 2, 3):
        for parts in itertools.product(syllables, repeat=length):
            word = "".join(parts)
            yield "\u0120" + word  # GPT-2's byte-level space
            yield word
