"""The decoder's few-row matrix products, in forms that use every CPU core, where they are exact and faster.

A decode step multiplies a few rows (images x beams) by every weight matrix of the decoder. Whether
MKL spreads a product of so few rows over the cores depends on the CPU: on an AVX2 AMD EPYC it ran
them on one core and left the second idle, and the same arithmetic issued as one batched product (a
Conv1D weight in two column halves, the output embedding in blocks of its vocabulary) gave a lone
caption 0.71x the time; on an AVX-512 Xeon MKL already shares them, and the halves were slower
(benchmarks/NOTES.md). So each split form must pass two checks, per machine:

- bits: splitting changes no arithmetic, but a BLAS may pick another kernel for another shape (or thread
  count), so the first product of each matrix and row count is computed both ways and the split form
  stays in the running only if every bit matched. The default decode path stays token-exact anywhere.
- speed: the next calls of each shape and row count alternate the two forms, timed, and the faster by
  median is used from then on (the 16-row halves lost on the Xeon, and a greedy batch of 16 decoded in
  0.87x the time).
"""

from __future__ import annotations

import statistics
import time
import weakref
from collections.abc import Callable, Hashable

import torch
import torch.nn.functional as F

VOCAB_BLOCK = 1024
"""Output-embedding rows per block: 3 MB of weights, where the whole 154 MB matrix in one product
had poor cache reuse."""

HALVES_MAX_ROWS = 128
"""Above this many rows one product already keeps every core busy, and the halves cost more than they
save (at 256 rows they were 10% slower here)."""

STACKED_VOCAB_MAX_ROWS = 32
"""Up to this many rows the vocabulary blocks go to the threads as one batched product; above it, one
product per block, each already spread over the threads (the batched form was slower at 64 rows)."""

RACE_CALLS = 8
"""Timed calls of each form before the faster is chosen: the shapes recur in every layer of every
step, so this is decided within the first batch or two."""

# Per module: (form, rows, ...) -> whether the split form matched the module's own product bit for bit.
_verdicts: weakref.WeakKeyDictionary[torch.nn.Module, dict[Hashable, bool]] = weakref.WeakKeyDictionary()


def conv1d(conv: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """GPT-2's Conv1D on a 2-D input (`addmm(bias, x, weight)`), in two column halves where exact."""
    weight = conv.weight

    def plain() -> torch.Tensor:
        return torch.addmm(conv.bias, x, weight)

    if (
        not _checkable(weight)
        or not weight.is_contiguous()
        or weight.shape[1] % 2
        or x.shape[0] > HALVES_MAX_ROWS
    ):
        return plain()
    key = ("halves", x.shape[0])
    return _exact(conv, key, weight.shape, plain, lambda: _halves(conv.bias, x, weight))


def vocabulary(head: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`head(x)` for the output embedding (a Linear without bias), in vocabulary blocks where exact."""
    weight = getattr(head, "weight", None)
    bare = type(head) is torch.nn.Linear and head.bias is None
    if not bare or not _checkable(weight) or weight.shape[0] <= VOCAB_BLOCK:
        return head(x)
    stack = x.shape[0] <= STACKED_VOCAB_MAX_ROWS and weight.is_contiguous()
    blocks = _stacked if stack else _looped
    key = (blocks.__name__, x.shape[0], VOCAB_BLOCK)
    return _exact(head, key, weight.shape, lambda: head(x), lambda: blocks(weight, x))


def beam_attention(
    attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Each image's beams ([images, heads, beams, head_dim]) against that image's one cross K/V.

    `generate` gives every beam its own query of length 1, and SDPA's kernel rounds a longer query
    otherwise (a product of more rows), so the plain form is one call per beam, each reading every
    image's K/V. The grouped form is one call with the beams as grouped query heads: each is still one
    row, and an image's K/V is read once for all its beams while it is in cache (2.5x faster at 16
    images x 4 beams on an EPYC)."""
    beams = q.shape[2]

    def plain() -> torch.Tensor:
        rows = [F.scaled_dot_product_attention(q[:, :, j : j + 1], k, v, scale=scale) for j in range(beams)]
        return rows[0] if beams == 1 else torch.cat(rows, dim=2)

    if beams == 1 or not _checkable(k):
        return plain()
    key = ("grouped", q.shape[0] * beams)
    return _exact(attn, key, tuple(k.shape[1:]), plain, lambda: _grouped(q, k, v, scale))


def _checkable(weight: torch.Tensor) -> bool:
    """Float32 on a CPU: where one product's bits vouch for every later one of its shape. (In bfloat16
    whether the split form matches depends on the values too, so a first check proves nothing.)"""
    return weight.device.type == "cpu" and weight.dtype == torch.float32


def _exact(
    module: torch.nn.Module,
    key: Hashable,
    shape: tuple[int, ...],
    plain: Callable[[], torch.Tensor],
    split: Callable[[], torch.Tensor],
) -> torch.Tensor:
    """The plain product, or the split one where its first result for `key` matched every bit and it
    runs faster on this machine. The thread count is part of `key`: MKL splits some sums over the
    threads, so the plain product's bits change with it."""
    key = (*key, torch.get_num_threads())
    seen = _verdicts.setdefault(module, {})
    if key not in seen:
        want = plain()
        seen[key] = torch.equal(want, split())
        return want
    if not seen[key]:
        return plain()
    race = _races.setdefault((key, tuple(shape)), _Race())
    return race.run(plain, split)


class _Race:
    """Which of two exact forms of one product is faster here, from their first calls in turn."""

    def __init__(self) -> None:
        self.seconds: tuple[list[float], list[float]] = ([], [])
        self.winner: int | None = None

    def run(self, plain: Callable[[], torch.Tensor], split: Callable[[], torch.Tensor]) -> torch.Tensor:
        forms = (plain, split)
        if self.winner is not None:
            return forms[self.winner]()
        turn = int(len(self.seconds[0]) > len(self.seconds[1]))
        start = time.perf_counter()
        out = forms[turn]()  # a CPU product: done when it returns
        self.seconds[turn].append(time.perf_counter() - start)
        if len(self.seconds[1]) >= RACE_CALLS:
            plain_s, split_s = (statistics.median(s) for s in self.seconds)
            self.winner = int(split_s < plain_s)
        return out


# Per (form key, operand shape): the race between the plain and the split form.
_races: dict[Hashable, _Race] = {}


def _halves(bias: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[rows, k] x [k, n] + bias as one batched product of two [k, n/2] column halves (views, no copy)."""
    rows, (k, n) = x.shape[0], weight.shape
    half = n // 2
    out = torch.baddbmm(bias.view(2, 1, half), x.expand(2, rows, k), weight.view(k, 2, half).permute(1, 0, 2))
    return out.transpose(0, 1).reshape(rows, n)


def _stacked(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x @ weight.T with the whole blocks in one batched product and the short last block alone."""
    rows, (vocab, dim) = x.shape[0], weight.shape
    count = vocab // VOCAB_BLOCK
    full = count * VOCAB_BLOCK
    out = x.new_empty(rows, vocab)
    blocks = weight[:full].view(count, VOCAB_BLOCK, dim).transpose(1, 2)
    stacked = torch.bmm(x.expand(count, rows, dim), blocks)  # [count, rows, block]
    out[:, :full].unflatten(1, (count, VOCAB_BLOCK)).copy_(stacked.transpose(0, 1))
    if full < vocab:
        out[:, full:] = F.linear(x, weight[full:])
    return out


def _looped(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    out = x.new_empty(x.shape[0], weight.shape[0])
    for start in range(0, weight.shape[0], VOCAB_BLOCK):
        out[:, start : start + VOCAB_BLOCK] = F.linear(x, weight[start : start + VOCAB_BLOCK])
    return out


def _grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One SDPA call in which query head h * beams + j is beam j's head h, sharing K/V head h."""
    images, heads, beams, dim = q.shape
    grouped = q.reshape(images, heads * beams, 1, dim)
    out = F.scaled_dot_product_attention(grouped, k, v, scale=scale, enable_gqa=True)
    return out.view(images, heads, beams, dim)
