"""What `generate` will do with a generation config, for `decoding`: the parameters exactly as it
resolves them, and a refusal of every option that adds work `decoding` does not reproduce.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # transformers is imported where a model is loaded, not here
    from transformers import GenerationConfig, VisionEncoderDecoderModel

# Config fields that must keep their neutral value: anything else adds a logits processor, a
# stopping criterion, another decoding mode or extra outputs that we do not reproduce.
NEUTRAL = {
    "do_sample": (None, False),
    "num_beam_groups": (None, 1),
    "diversity_penalty": (None, 0.0),
    "constraints": (None,),
    "force_words_ids": (None,),
    "penalty_alpha": (None, 0.0),
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "sequence_bias": (None,),
    "guidance_scale": (None, 1.0),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "remove_invalid_values": (None, False),
    "exponential_decay_length_penalty": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "watermarking_config": (None,),
    "renormalize_logits": (None, False),
    "num_return_sequences": (None, 1),
    "output_attentions": (None, False),
    "output_hidden_states": (None, False),
    "output_scores": (None, False),
    "output_logits": (None, False),
    "return_dict_in_generate": (None, False),
    "max_time": (None,),
    "stop_strings": (None,),
    "token_healing": (None, False),
    "prompt_lookup_num_tokens": (None,),
    "use_mtp": (None, False),
    "assistant_early_exit": (None,),
    "dola_layers": (None,),
    "low_memory": (None, False),
    "prefill_chunk_size": (None,),
    "cache_implementation": (None,),
    "is_assistant": (None, False),
}


@dataclass
class Plan:
    """The generation parameters exactly as `generate` resolves them for a 1-token decoder prompt."""

    beams: int
    max_len: int
    min_len: int
    start: int
    eos: torch.Tensor | None  # 1-D
    pad: int | None
    length_penalty: float  # kept as given (int or float): `len ** lp` must match bit for bit
    early_stopping: bool | str


def resolve(model: VisionEncoderDecoderModel, cfg: GenerationConfig | None) -> Plan:
    """Merge `cfg` with the model defaults the way `generate` does, then resolve lengths and ids."""
    g = model._prepare_generation_config(cfg)[0]
    for name, allowed in NEUTRAL.items():
        if getattr(g, name, None) not in allowed:
            raise ValueError(f"unsupported generation option {name}={getattr(g, name)!r}")
    model_gc = model.generation_config
    if g.max_new_tokens is not None:
        max_len = g.max_new_tokens + 1
    elif (cfg is None or cfg.max_length is None) and model_gc.max_length is None:
        max_len = g.max_length + 1  # generate's "20 new tokens by default" rule
        mpe = getattr(model.config, "max_position_embeddings", None)
        max_len = min(max_len, mpe) if mpe is not None else max_len
    else:
        max_len = g.max_length
    min_len = g.min_new_tokens + 1 if g.min_new_tokens is not None else (g.min_length or 0)
    start = g.decoder_start_token_id if g.decoder_start_token_id is not None else g.bos_token_id
    eos = None if g.eos_token_id is None else torch.tensor(g.eos_token_id, dtype=torch.long).view(-1)
    pad = g.pad_token_id if g.pad_token_id is not None else (None if eos is None else int(eos[0]))
    early = g.early_stopping
    if not isinstance(start, int) or early not in (True, False, "never") or g.use_cache is False:
        raise ValueError("unsupported start token / early_stopping / use_cache")
    return Plan(g.num_beams or 1, max_len, min_len, start, eos, pad, g.length_penalty, early)
