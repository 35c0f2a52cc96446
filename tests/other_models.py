"""Tiny models of the other kinds the README names, built offline: what serves beside vit-gpt2, BLIP
and GIT (Pix2Struct, a RoBERTa decoder, Nougat) and what a load refuses (InstructBLIP, prompt-driven).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_models import CORPUS, _bpe_tokenizer, _wordpiece_tokenizer, byte_level_bpe
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers


def save_pix2struct(folder: Path, *, seed: int = 0) -> Path:
    """A tiny Pix2Struct captioner: its processor gives `flattened_patches` and a mask, not pixels."""
    from transformers import (
        Pix2StructConfig,
        Pix2StructForConditionalGeneration,
        Pix2StructImageProcessor,
        Pix2StructProcessor,
        T5TokenizerFast,
    )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"])
    )
    tokenizer = T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    config = Pix2StructConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            d_kv=16,
            d_ff=64,
            num_layers=2,
            num_heads=2,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        ),
        vision_config=dict(
            hidden_size=32,
            patch_embed_hidden_size=768,
            d_ff=64,
            d_kv=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            seq_len=64,
        ),
    )
    torch.manual_seed(seed)
    Pix2StructForConditionalGeneration(config).save_pretrained(folder)
    # 2048 patches, as the real checkpoints save it and as the processor's own call defaults to
    image_processor = Pix2StructImageProcessor(max_patches=2048, patch_size={"height": 16, "width": 16})
    Pix2StructProcessor(image_processor, tokenizer).save_pretrained(folder)
    return folder


def save_vit_roberta(folder: Path, *, positions: int = 20) -> Path:
    """ViT with a RoBERTa decoder, whose position ids start at padding_idx + 1 (two positions fewer for
    the caption), and which never ends a caption early (end-of-text suppressed): every caption runs to
    the limit."""
    from transformers import (
        RobertaConfig,
        RobertaTokenizerFast,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessor,
    )

    tok = byte_level_bpe(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tokenizer = RobertaTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.mask_token, tokenizer.cls_token, tokenizer.sep_token = "<mask>", "<s>", "</s>"
    ids = dict(bos_token_id=0, pad_token_id=1, eos_token_id=2)
    decoder = RobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=positions,
        is_decoder=True,
        add_cross_attention=True,
        **ids,
    )
    encoder = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 0, 1, 2
    torch.manual_seed(0)
    model = VisionEncoderDecoderModel(config)
    model.generation_config.update(
        decoder_start_token_id=0, pad_token_id=1, eos_token_id=2, suppress_tokens=[2]
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(folder)
    return folder


def save_nougat(folder: Path) -> Path:
    """A VisionEncoderDecoder of another pair: a Donut-Swin encoder and an MBart decoder, NougatProcessor."""
    from transformers import (
        DonutSwinConfig,
        MBartConfig,
        NougatImageProcessor,
        NougatProcessor,
        NougatTokenizerFast,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
    )

    tok = byte_level_bpe(["<pad>", "<s>", "</s>", "<unk>"])
    tokenizer = NougatTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    encoder = DonutSwinConfig(
        image_size=[64, 48], patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4
    )
    decoder = MBartConfig(
        vocab_size=len(tokenizer),
        d_model=32,
        encoder_layers=2,  # as many as the decoder's: the cache is sized by both
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        is_decoder=True,
        add_cross_attention=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 1, 0, 2
    torch.manual_seed(0)
    model = VisionEncoderDecoderModel(config)
    model.generation_config.update(decoder_start_token_id=1, pad_token_id=0, eos_token_id=2)
    model.save_pretrained(folder)
    NougatProcessor(NougatImageProcessor(size={"height": 64, "width": 48}), tokenizer).save_pretrained(folder)
    return folder


def _tiny_opt(vocab_size: int, **token_ids: int) -> dict:
    """The OPT text model of 64 positions that the tiny BLIP-2 and InstructBLIP builders share."""
    return dict(
        model_type="opt",
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        ffn_dim=64,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
        **token_ids,
    )


def save_instructblip(folder: Path) -> Path:
    """InstructBLIP: its Q-Former reads an instruction, so it captions nothing from the image alone."""
    from transformers import (
        BlipImageProcessor,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
    )

    tokenizer, qformer_tokenizer = _bpe_tokenizer(), _wordpiece_tokenizer()
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    config = InstructBlipConfig(
        vision_config=dict(**small, intermediate_size=64, image_size=32, patch_size=16),
        qformer_config=dict(
            **small, vocab_size=len(qformer_tokenizer), intermediate_size=64, encoder_hidden_size=32
        ),
        text_config=_tiny_opt(len(tokenizer), eos_token_id=0, bos_token_id=0, pad_token_id=0),
        num_query_tokens=4,
    )
    torch.manual_seed(0)
    InstructBlipForConditionalGeneration(config).save_pretrained(folder)
    image_processor = BlipImageProcessor(size={"height": 32, "width": 32})
    InstructBlipProcessor(
        image_processor=image_processor, tokenizer=tokenizer, qformer_tokenizer=qformer_tokenizer
    ).save_pretrained(folder)
    return folder


def save_blip2(folder: Path) -> Path:
    """BLIP-2 with an OPT decoder of 64 positions, 4 of them taken by the Q-Former's query tokens before
    the caption; its end-of-text is suppressed, so every caption runs to the limit."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
        GPT2TokenizerFast,
    )

    tok = byte_level_bpe(["</s>", "<pad>", "<image>"])
    tokenizer = GPT2TokenizerFast(
        tokenizer_object=tok, bos_token="</s>", eos_token="</s>", unk_token="</s>", pad_token="<pad>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    config = Blip2Config(
        vision_config=dict(
            **small, intermediate_size=64, image_size=64, patch_size=16, initializer_range=0.5
        ),
        qformer_config=dict(**small, vocab_size=100, intermediate_size=64, encoder_hidden_size=32),
        text_config=_tiny_opt(
            len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        num_query_tokens=4,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config)
    model.generation_config.update(suppress_tokens=[tokenizer.eos_token_id])
    model.save_pretrained(folder)
    image_processor = BlipImageProcessor(size={"height": 64, "width": 64})
    Blip2Processor(image_processor, tokenizer, num_query_tokens=4).save_pretrained(folder)
    return folder
