"""One-token-at-a-time GPT-2 decoder with cross-attention, for beam search over images.

Why this exists: `generate` expands the encoder output to every beam, so each beam recomputes the
cross-attention keys/values and carries its own copy of them, and the self-attention cache grows by
`torch.cat` every step. On a CPU the cross K/V here are computed once per image, and every beam of the
image attends to that one copy (each beam one query row, as `generate` rounds it), so nothing is
duplicated, for every batch shape where that gives `generate`'s bits at the thread count
(`kv_per_image`; the others take the per-beam form below). On a GPU the kernels split their sums by the row count they are given, so in bfloat16 fewer
rows gave other bits than `generate` (an H200, benchmarks/RESULTS.md); there the encoder states come
repeated per beam, as `generate` expands them, the K/V are computed from them (`per_beam`), and the
saving that matters on a launch-bound GPU, the few ops a step, stays. The self-attention cache is one
preallocated tensor reordered in place. All weights are the model's own parameters (no copies), applied
with the same ops GPT-2 uses (`addmm` for Conv1D, the module's LayerNorm eps and activation, SDPA with
the module's scaling); on CPU the few-row products are split over the threads where that gives the
same bits (`docker_vit.products`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from docker_vit import products


class Gpt2Stepper:
    """Runs GPT-2 decoder steps for `batch` images x `beams` rows with preallocated caches."""

    def __init__(
        self,
        decoder: torch.nn.Module,
        encoder_states: torch.Tensor,
        beams: int,
        max_steps: int,
        *,
        kv: str = "shared",
    ) -> None:
        self.gpt = decoder.transformer
        self.lm_head = decoder.lm_head
        self.blocks = list(self.gpt.h)
        first = self.blocks[0].attn
        self.heads, self.head_dim, self.dim = first.num_heads, first.head_dim, first.embed_dim
        # kv: "shared" (one K/V per image), "repeated" (one per beam, copied from the image's) or
        # "expanded" (one per beam from states that hold one row per beam, as `generate` expands them)
        self.batch, self.beams = encoder_states.shape[0] // (beams if kv == "expanded" else 1), beams
        self.per_beam, self.repeat = kv != "shared", beams if kv == "repeated" else 1
        self.cross = [self._cross_kv(b.crossattention, encoder_states) for b in self.blocks]
        rows = self.batch * beams
        shape = (len(self.blocks), 2, rows, self.heads, max(max_steps, 1), self.head_dim)
        self.kv = torch.empty(shape, dtype=encoder_states.dtype, device=encoder_states.device)

    def _heads(self, x: torch.Tensor, groups: int) -> torch.Tensor:
        """[groups * n, dim] -> [groups, heads, n, head_dim] (n = beams or encoder length)."""
        return x.view(groups, -1, self.heads, self.head_dim).transpose(1, 2)

    def _cross_kv(self, attn: torch.nn.Module, enc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention K/V of one layer, per image (or per beam): [groups, heads, enc_len, head_dim]."""
        kv = attn.c_attn(enc)  # the module's own Conv1D, exactly as GPT-2 does it
        if self.repeat > 1:
            kv = kv.repeat_interleave(self.repeat, dim=0)  # `generate`'s layout, one copy per beam
        k, v = kv.split(self.dim, dim=2)
        return self._heads(k.reshape(-1, self.dim), kv.shape[0]), self._heads(
            v.reshape(-1, self.dim), kv.shape[0]
        )

    def reorder(self, rows: torch.Tensor, length: int) -> None:
        """Make cache row i hold the history of old row rows[i] (positions < length), in place.

        Gathering per layer keeps the temporary small (one layer, only the filled prefix) instead of
        double-buffering the whole cache.
        """
        if length == 0:
            return
        for layer in self.kv:
            filled = layer[:, :, :, :length]
            filled.copy_(filled.index_select(1, rows))

    @staticmethod
    def _linear(conv: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """GPT-2's Conv1D forward on a 2-D input, without the module-call overhead."""
        return products.conv1d(conv, x)

    def _self_attention(self, block: torch.nn.Module, layer: int, x: torch.Tensor, pos: int) -> torch.Tensor:
        attn = block.attn
        h = F.layer_norm(x, (self.dim,), block.ln_1.weight, block.ln_1.bias, block.ln_1.eps)
        q, k, v = self._linear(attn.c_attn, h).split(self.dim, dim=1)
        rows = x.shape[0]
        cache_k, cache_v = self.kv[layer, 0, :rows], self.kv[layer, 1, :rows]
        cache_k[:, :, pos] = k.view(rows, self.heads, self.head_dim)
        cache_v[:, :, pos] = v.view(rows, self.heads, self.head_dim)
        q = q.view(rows, 1, self.heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q, cache_k[:, :, : pos + 1], cache_v[:, :, : pos + 1], scale=attn.scaling
        )
        return self._linear(attn.c_proj, out.reshape(rows, self.dim)) + x

    def _cross_attention(self, block: torch.nn.Module, layer: int, x: torch.Tensor) -> torch.Tensor:
        attn, ln = block.crossattention, block.ln_cross_attn
        h = F.layer_norm(x, (self.dim,), ln.weight, ln.bias, ln.eps)
        k, v = self.cross[layer]
        if self.per_beam:  # `generate`'s shapes: every row one query against its own K/V
            q = self._heads(self._linear(attn.q_attn, h), x.shape[0])  # [rows, heads, 1, head_dim]
            out = F.scaled_dot_product_attention(q, k, v, scale=attn.scaling)
            return x + self._linear(attn.c_proj, out.transpose(1, 2).reshape(x.shape[0], self.dim))
        # one K/V per image, shared by its beams: only where `kv_per_image` found it exact
        out = _shared(self._linear(attn.q_attn, h), k, v, self.beams, attn.scaling)
        return x + self._linear(attn.c_proj, out)

    def _mlp(self, block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        mlp, ln = block.mlp, block.ln_2
        h = F.layer_norm(x, (self.dim,), ln.weight, ln.bias, ln.eps)
        return x + self._linear(mlp.c_proj, mlp.act(self._linear(mlp.c_fc, h)))

    def logits(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """Next-token logits (float32, [rows, vocab]) for the newest token of every row.

        `tokens` has batch * beams rows, the beams of an image next to each other.
        """
        x = self.gpt.wte(tokens) + self.gpt.wpe.weight[pos]
        for i, block in enumerate(self.blocks):
            x = self._self_attention(block, i, x, pos)
            x = self._cross_attention(block, i, x)
            x = self._mlp(block, x)
        ln = self.gpt.ln_f
        x = F.layer_norm(x, (self.dim,), ln.weight, ln.bias, ln.eps)
        return products.vocabulary(self.lm_head, x).float()


def _shared(q_rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beams: int, scale: float) -> torch.Tensor:
    """Cross-attention of every beam's query row ([images * beams, dim]) to its image's one K/V
    ([images, heads, length, head_dim]), each beam a query of length 1 as in `generate` (SDPA's kernel
    rounds a longer query otherwise): [images * beams, dim].

    One image's K/V stand for every row by a stride of 0, so the cells are `generate`'s, in its order.
    Several images' beams go in as grouped query heads (head h * beams + j is beam j's head h, on K/V
    head h): an image's K/V is read once for all its beams while it is in cache."""
    images, heads, _, head_dim = k.shape
    rows = q_rows.shape[0]
    if images == 1 or beams == 1:
        q = q_rows.view(rows, 1, heads, head_dim).transpose(1, 2)
        k, v = k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    else:
        q = (
            q_rows.view(images, beams, heads, head_dim)
            .transpose(1, 2)
            .reshape(images, heads * beams, 1, head_dim)
        )
        out = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
        out = out.view(images, heads, beams, head_dim)
    return out.transpose(1, 2).reshape(rows, heads * head_dim)


# (images, beams, heads, length, head_dim, scale, dtype, threads) -> whether the shared K/V give `generate`'s bits
_shares_exact: dict[tuple, bool] = {}


def kv_per_image(decoder: torch.nn.Module, states: torch.Tensor, beams: int) -> bool:
    """Whether the beams of an image may share one cross-attention K/V copy (else one copy per beam, as
    `generate` holds them), for these encoder states ([images, length, dim]).

    On a CPU torch's attention kernel hands its (row, head) cells to the threads in order, and a cell
    can round otherwise on one thread than on another (MKL's code path per thread's buffer), for some
    values and not others. `generate` orders an image's cells by beam, the grouped form of several
    images by head, so they are shared only where every thread's share ends on a whole image (on 2
    threads: an even number of images), or for one image (its K/V by a stride of 0, in `generate`'s
    order); and then, once per shape and thread count, if one call on random values gives `generate`'s
    bits too. On a GPU
    the kernels split their sums by the rows they get: per beam there (benchmarks/NOTES.md). Reduced
    precision on a CPU, an opt-in mode whose numbers differ anyway, shares them."""
    if states.device.type != "cpu":
        return False
    if beams == 1 or states.dtype in (torch.bfloat16, torch.float16):
        return True
    attn = decoder.transformer.h[0].crossattention
    key = (states.shape[0], beams, attn.num_heads, states.shape[1], attn.head_dim, attn.scaling, states.dtype)
    key += (torch.get_num_threads(),)
    if key not in _shares_exact:
        images, heads, threads = states.shape[0], attn.num_heads, key[-1]
        same = _same_thread_map(images, beams, heads, threads)
        _shares_exact[key] = same and _shared_as_generate(*key[:-1])
    return _shares_exact[key]


def _same_thread_map(images: int, beams: int, heads: int, threads: int) -> bool:
    """Whether every image's cells fall to the same thread in the shared form as in `generate`'s: the
    kernel's `parallel_for` gives each thread one run of ceil(cells / threads) cells in order."""
    cells = images * beams * heads
    share = -(-cells // min(threads, cells))
    return images == 1 or share >= cells or share % (beams * heads) == 0


def _shared_as_generate(
    images: int, beams: int, heads: int, length: int, head_dim: int, scale: float, dtype: torch.dtype
) -> bool:
    """One cross-attention call both ways, in the stepper's layouts: the K/V as `c_attn` splits them,
    once per image (`_shared`) and repeated per beam (`generate`'s)."""
    dim, rows = heads * head_dim, images * beams
    gen = torch.Generator().manual_seed(0)
    kv = torch.randn(images, length, 2 * dim, generator=gen, dtype=dtype)
    q_rows = torch.randn(rows, dim, generator=gen, dtype=dtype)

    def split(kv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        groups = kv.shape[0]
        return tuple(
            t.reshape(-1, dim).view(groups, -1, heads, head_dim).transpose(1, 2) for t in kv.split(dim, 2)
        )

    try:
        shared = _shared(q_rows, *split(kv), beams, scale)
    except (RuntimeError, NotImplementedError, TypeError):  # a torch whose SDPA lacks `enable_gqa`
        return False
    k, v = split(kv.repeat_interleave(beams, dim=0))
    own = F.scaled_dot_product_attention(
        q_rows.view(rows, 1, heads, head_dim).transpose(1, 2), k, v, scale=scale
    )
    return torch.equal(shared, own.transpose(1, 2).reshape(rows, dim))
