"""Tiny random-weight image-to-text models, built offline from configs and saved like Hub folders.

The tests load them through the real loading code (AutoModelForImageTextToText + AutoProcessor), so
the only thing they don't exercise is the download itself.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

CORPUS = [
    "a small dog standing next to a bowl of food",
    "a cat laying on a couch with a remote",
    "a man in a suit and tie holding a cup of coffee",
    "an astronaut in a white space suit with a flag",
] * 20


def byte_level_bpe(specials: list[str], vocab_size: int = 300) -> Tokenizer:
    """GPT-2's kind of tokenizer, trained on CORPUS, with `specials` as its first ids."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _bpe_tokenizer(vocab_size: int = 300):
    from transformers import GPT2TokenizerFast

    tok = byte_level_bpe(["<|endoftext|>"], vocab_size)
    eos = "<|endoftext|>"
    tokenizer = GPT2TokenizerFast(tokenizer_object=tok, bos_token=eos, eos_token=eos, unk_token=eos)
    tokenizer.pad_token = eos
    return tokenizer


def _wordpiece_tokenizer():
    from transformers import BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials))
    return BertTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
    )


def vit_gpt2(
    vocab_size: int, eos: int, *, seed: int = 0, image_size: int = 224, n_embd: int = 32, n_head: int = 2
):
    """A vit-gpt2-shaped VisionEncoderDecoder (ViT encoder, GPT-2 decoder with cross-attention), in
    memory, with `eos` as its start, pad and end token."""
    from transformers import GPT2Config, VisionEncoderDecoderConfig, VisionEncoderDecoderModel, ViTConfig

    encoder = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=image_size,
        patch_size=16,
    )
    decoder = GPT2Config(
        vocab_size=vocab_size,
        n_embd=n_embd,
        n_layer=2,
        n_head=n_head,
        n_positions=128,
        bos_token_id=eos,
        eos_token_id=eos,
        add_cross_attention=True,
        is_decoder=True,
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id = config.pad_token_id = config.eos_token_id = eos
    torch.manual_seed(seed)
    model = VisionEncoderDecoderModel(config)
    for key in ("decoder_start_token_id", "pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, key, eos)
    return model


def save_vit_gpt2(folder: Path, *, seed: int = 0, image_size: int = 224, eos_boost: float = 0.0) -> Path:
    """`vit_gpt2` with a trained BPE tokenizer and an image processor, saved like a Hub folder.

    `eos_boost` raises the end-of-text logit so captions end at different lengths, as real ones do.
    """
    from transformers import ViTImageProcessor

    tokenizer = _bpe_tokenizer()
    eos = tokenizer.eos_token_id
    model = vit_gpt2(len(tokenizer), eos, seed=seed, image_size=image_size)
    if eos_boost:
        with torch.no_grad():
            model.decoder.lm_head.weight[eos] *= eos_boost
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder


def save_blip(folder: Path, *, seed: int = 0) -> Path:
    """A tiny BLIP captioner with its BlipProcessor."""
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    tokenizer = _wordpiece_tokenizer()
    config = BlipConfig(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=64,
            patch_size=16,
        ),
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            encoder_hidden_size=32,
            bos_token_id=tokenizer.cls_token_id,
            pad_token_id=tokenizer.pad_token_id,
            sep_token_id=tokenizer.sep_token_id,
            eos_token_id=tokenizer.sep_token_id,
        ),
        projection_dim=32,
    )
    torch.manual_seed(seed)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    processor = BlipProcessor(BlipImageProcessor(size={"height": 64, "width": 64}), tokenizer)
    processor.save_pretrained(folder)
    return folder


def save_git(folder: Path, *, seed: int = 0) -> Path:
    """A tiny GIT captioner with its GitProcessor."""
    from transformers import CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    tokenizer = _wordpiece_tokenizer()
    config = GitConfig(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=64,
            patch_size=16,
        ),
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    GitForCausalLM(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    GitProcessor(image_processor, tokenizer).save_pretrained(folder)
    return folder
