"""Exact, faster replacement for `VisionEncoderDecoderModel.generate` with a GPT-2 decoder.

`supports()` says whether a generation config is one we reproduce token for token (greedy search or
plain beam search, with EOS/pad/length-penalty/early-stopping/min-length); anything else must go to
`model.generate`. `generate()` mirrors transformers' `_sample` (greedy) and `_beam_search` step by
step -- same scores, same top-k calls, same finished-hypothesis bookkeeping -- so ties break the same
way, but it runs the encoder once, computes cross-attention K/V once per image (on a CPU, where each
image's rows give `generate`'s bits; shared by the beams where that does too, `gpt2_cache.kv_per_image`,
else copied per beam; per beam from repeated states elsewhere) and drives the decoder through
`Gpt2Stepper` with a preallocated cache and little Python per step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from docker_vit import products
from docker_vit.generation_plan import Plan, resolve
from docker_vit.gpt2_cache import Gpt2Stepper, kv_per_image

if TYPE_CHECKING:  # transformers is imported where a model is loaded, not here
    from transformers import GenerationConfig, VisionEncoderDecoderModel


def _decoder_ok(model: VisionEncoderDecoderModel) -> bool:
    """Only GPT-2 with cross-attention in every block, in eval mode, behind a pixel encoder."""
    from transformers import GPT2LMHeadModel  # local import keeps module import cheap

    dec = getattr(model, "decoder", None)
    if not isinstance(dec, GPT2LMHeadModel) or model.training or not model.config.is_encoder_decoder:
        return False
    if getattr(model, "main_input_name", None) != "pixel_values":
        return False
    # The stepper always runs SDPA; eager (or any other) attention rounds otherwise in `generate`.
    if getattr(dec.config, "_attn_implementation", None) != "sdpa":
        return False
    # In float16 3 of 30 tiny-model configurations differed from `generate` on an H200 with per-image
    # K/V (benchmarks/NOTES.md, CUDA); the per-beam K/V that cured bfloat16 were not tried in float16,
    # so half precision takes `generate` (what `auto` picks on GPUs without native bfloat16: T4, V100).
    if next(dec.parameters()).dtype == torch.float16:
        return False
    return all(hasattr(b, "crossattention") for b in dec.transformer.h)


def supports(model: VisionEncoderDecoderModel, generation_config: GenerationConfig | None) -> bool:
    """True when `generate` below returns exactly what `model.generate` would for this config."""
    try:
        if not _decoder_ok(model):
            return False
        p = resolve(model, generation_config)
    except Exception:  # any surprise in the config means: let transformers handle (or reject) it
        return False
    n_pos = model.decoder.config.n_positions
    vocab = model.decoder.lm_head.out_features
    return 1 < p.max_len <= n_pos + 1 and p.beams >= 1 and (p.beams == 1 or vocab >= _kept(p))


def _encode(
    model: VisionEncoderDecoderModel, pixel_values: torch.Tensor, beams: int
) -> tuple[torch.Tensor, str]:
    """Encoder states as the decoder sees them (incl. the optional enc->dec projection), and the form of
    the cross-attention K/V (`Gpt2Stepper`'s `kv`). On a CPU they are computed once per image where that
    gives the bits `generate` computes per beam, then "shared" by an image's beams where
    `gpt2_cache.kv_per_image` allows, else "repeated" (copied per beam, as `generate` holds them). On a
    GPU, or where a product of each image's rows rounds otherwise, the states are repeated per beam
    before the projection, as `generate` does ("expanded")."""
    enc = model.encoder(pixel_values=pixel_values, return_dict=True).last_hidden_state
    proj = _projection(model)
    form = _kv_form(model, proj, enc, beams)
    if form == "expanded":
        enc = enc.repeat_interleave(beams, dim=0)
    return (enc if proj is None else proj(enc)), form


def _projection(model: VisionEncoderDecoderModel) -> torch.nn.Module | None:
    """The enc->dec projection `VisionEncoderDecoderModel` applies, where the widths differ."""
    needed = model.encoder.config.hidden_size != model.decoder.config.hidden_size
    if needed and getattr(model.decoder.config, "cross_attention_hidden_size", None) is None:
        return model.enc_to_dec_proj
    return None


def _kv_form(
    model: VisionEncoderDecoderModel, proj: torch.nn.Module | None, enc: torch.Tensor, beams: int
) -> str:
    """`_encode`'s form. Per image only where the projection and the cross-attention K/V product on
    each image's rows give the bits `generate` gets from the rows repeated per beam
    (`products.per_image`: not so for few rows, and more of them the more threads); reduced precision,
    an opt-in mode, is not checked."""
    if enc.device.type != "cpu":
        return "expanded"
    if beams > 1 and enc.dtype not in (torch.bfloat16, torch.float16):
        c_attn = model.decoder.transformer.h[0].crossattention.c_attn  # every layer has its shape
        if not products.per_image([c_attn] if proj is None else [proj, c_attn], enc, beams):
            return "expanded"
    return "shared" if kv_per_image(model.decoder, enc, beams) else _copies()


def _copies() -> str:
    """How a CPU batch whose beams may not share their image's K/V, but whose products allow one copy
    per image, holds them per beam: each image's K/V copied (`_kv_form`; a GPU never gets here)."""
    return "repeated"


def _min_length(scores: torch.Tensor, p: Plan, cur_len: int) -> torch.Tensor:
    """MinLengthLogitsProcessor: EOS is impossible before `min_len` tokens (incl. the start token)."""
    if p.eos is None or cur_len >= p.min_len:
        return scores
    # As transformers masks: ids outside the vocabulary (or negative) mask nothing, and never raise.
    vocab = torch.arange(scores.shape[-1], device=scores.device)
    return torch.where(torch.isin(vocab, p.eos.to(scores.device)), -float("inf"), scores)


@torch.inference_mode()
def generate(
    model: VisionEncoderDecoderModel,
    pixel_values: torch.Tensor,
    generation_config: GenerationConfig | None,
    between_steps: Callable[[], None] | None = None,
) -> torch.LongTensor:
    """Same ids as `model.generate(pixel_values=..., generation_config=...)`, computed cheaply.

    `between_steps` runs before each new token: what it raises stops the decode (the batch's callers
    have all gone, say)."""
    p = resolve(model, generation_config)
    param = next(model.parameters())
    px = pixel_values.to(device=param.device, dtype=param.dtype)
    enc, kv = _encode(model, px, p.beams)
    stepper = Gpt2Stepper(model.decoder, enc, p.beams, p.max_len - 1, kv=kv)
    batch, device = px.shape[0], enc.device
    del enc  # the stepper holds what the decoder needs (cross K/V); the states are dead weight now
    run = _greedy if p.beams == 1 else _beam_search
    return run(stepper, p, batch, device, between_steps or _nothing)


def _nothing() -> None:
    pass


def _greedy(
    stepper: Gpt2Stepper, p: Plan, batch: int, device: torch.device, between_steps: Callable[[], None]
) -> torch.LongTensor:
    """transformers' `_sample` with do_sample=False: argmax, pad after EOS, stop when all are done."""
    out = torch.full((batch, p.max_len), p.start, dtype=torch.long, device=device)
    eos = None if p.eos is None else p.eos.to(device)
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    cur = 1
    while cur < p.max_len:
        between_steps()
        scores = _min_length(stepper.logits(out[:, cur - 1], cur - 1), p, cur)
        nxt = scores.argmax(dim=-1)
        if eos is not None:
            nxt = torch.where(unfinished, nxt, p.pad)
            unfinished &= ~torch.isin(nxt, eos)
        out[:, cur] = nxt
        cur += 1
        if eos is not None and not bool(unfinished.any()):
            break
    return out[:, :cur]


def _take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """`_gather_beams`: pick beams `idx` ([batch, n]) of `t` ([batch, beams, ...])."""
    return torch.take_along_dim(t, idx.view(*idx.shape, *([1] * (t.dim() - 2))), dim=1)


def _beam_log_probs(stepper: Gpt2Stepper, p: Plan, run_seq: torch.Tensor, cur: int) -> torch.Tensor:
    """Per-beam next-token log-probs, [batch, beams, vocab].

    Every beam is a row, the first step too, where all beams of an image still hold the same prefix
    (beams 1.. start at -1e9 and are never picked): `generate` computes them all, and a product of
    fewer rows may round otherwise.
    """
    batch, beams = run_seq.shape[:2]
    logits = stepper.logits(run_seq[:, :, cur - 1].reshape(-1), cur - 1)
    return _min_length(torch.log_softmax(logits, dim=-1), p, cur).view(batch, beams, -1)


def _kept(p: Plan) -> int:
    """Candidates `_beam_search` takes per image each step: enough that `beams` survive every EOS."""
    return max(2, 1 + (0 if p.eos is None else p.eos.numel())) * p.beams


def _beam_search(
    stepper: Gpt2Stepper, p: Plan, batch: int, device: torch.device, between_steps: Callable[[], None]
) -> torch.LongTensor:
    """transformers' `_beam_search` (vectorised, fixed-shape) with the same ops in the same order."""
    k, lp_pow, early = p.beams, p.length_penalty, p.early_stopping
    eos = None if p.eos is None else p.eos.to(device)
    keep = _kept(p)
    fill = -1 if eos is None else (p.pad if p.pad else int(eos[0]))  # mirrors `pad or eos[0]`
    run_seq = torch.full((batch, k, p.max_len), fill, dtype=torch.long, device=device)
    run_seq[:, :, 0] = p.start
    fin_seq = run_seq.clone()
    run_scores = torch.zeros((batch, k), dtype=torch.float, device=device)
    run_scores[:, 1:] = -1e9
    fin_scores = torch.full((batch, k), -1e9, dtype=torch.float, device=device)
    fin_done = torch.zeros((batch, k), dtype=torch.bool, device=device)
    fin_len = torch.zeros((batch, k), dtype=torch.long, device=device)  # tokens after the start
    improvable = torch.ones((batch, 1), dtype=torch.bool, device=device)
    top_mask = torch.arange(keep, device=device) < k
    offsets = torch.arange(batch, device=device)[:, None] * k
    cur = 1
    while True:
        between_steps()
        # a. every beam's next-token log-probs, added to its running score
        log_probs = _beam_log_probs(stepper, p, run_seq, cur)
        vocab = log_probs.shape[-1]
        log_probs = (log_probs + run_scores[:, :, None]).reshape(batch, -1)
        # b. the best `keep` candidates over all beams of an image
        topk_lp, topk_idx = torch.topk(log_probs, k=keep)
        src_beam, tokens = topk_idx // vocab, topk_idx % vocab
        # c. their sequences, and (d.) which of them end here
        cand_seq = _take(run_seq, src_beam)
        cand_seq[:, :, cur] = tokens
        hits = torch.zeros_like(tokens, dtype=torch.bool) if eos is None else torch.isin(tokens, eos)
        if cur + 1 >= p.max_len:
            hits |= True
        # e. best `k` unfinished candidates keep running
        cand_run = topk_lp + hits.to(torch.float32) * -1.0e9
        nxt = torch.topk(cand_run, k=k)[1]
        run_seq, run_scores = _take(cand_seq, nxt), _take(cand_run, nxt)
        rows = (_take(src_beam, nxt) + offsets).view(-1)
        # f. finished candidates among the top `k` compete with the stored hypotheses
        did_finish = hits & top_mask[None, :]
        scores = topk_lp / ((cur + 1 - 1) ** lp_pow)  # transformers' cur_len + 1 - prompt_len, prompt 1
        batch_full = torch.all(fin_done, axis=-1, keepdims=True) & (early is True)
        scores += batch_full.to(torch.float32) * -1.0e9
        scores += (~improvable).to(torch.float32) * -1.0e9
        scores += (~did_finish) * -1.0e9
        merged = torch.topk(torch.cat((fin_scores, scores), dim=1), k=k)[1]
        fin_seq = _take(torch.cat((fin_seq, cand_seq), dim=1), merged)
        fin_scores = _take(torch.cat((fin_scores, scores), dim=1), merged)
        fin_len = _take(torch.cat((fin_len, torch.full_like(tokens, cur)), dim=1), merged)
        fin_done = _take(torch.cat((fin_done, did_finish), dim=1), merged)
        # g. stop test (early-stopping heuristic), then move the cache to the surviving beams
        cur += 1
        best_len = p.max_len - 1 if (early == "never" and lp_pow > 0.0) else cur - 1
        best = run_scores[:, :1] / (best_len**lp_pow)
        worst = torch.where(fin_done, torch.min(fin_scores, dim=1, keepdim=True)[0], -1.0e9)
        improvable = improvable & torch.any(best > worst, dim=-1, keepdim=True)
        open_beams = ~(torch.all(fin_done) & (early is True))
        if not bool(torch.any(improvable) & open_beams & ~torch.all(hits)):
            break
        stepper.reorder(rows, cur - 1)
    return fin_seq[:, 0, : 1 + int(fin_len[:, 0].max())]
