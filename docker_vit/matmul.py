"""The weight products of a decode step on a CPU: exact, and faster than MKL's plain call.

Why this exists: a step multiplies a few rows (the beams) by every decoder weight, ~550 MB of them, and
MKL streams those weights slowly here (benchmarks/NOTES.md): the output embedding ([rows, 768] x
[768, 50257], 154 MB) in one product reuses the cache badly, and a product of a few rows runs on one
core. So:

- the output embedding is applied in blocks of `VOCAB_BLOCK` embedding rows (3 MB each);
- with at most `SPLIT_ROWS` rows, the upper half of a product's output columns is computed on a helper
  thread, so both cores stream weights (for one row MKL's matrix-vector kernel is fast already, so a
  Conv1D with one row is left alone).

Neither changes any arithmetic, but a BLAS chooses its kernel by shape (never by value), and another
kernel may round differently. So a module's first product at each row count is computed both ways, and
the rearranged one is used for that row count from then on only if every bit matched: the decode path
stays token for token equal to `generate` on any machine. GPU tensors take the plain products.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

VOCAB_BLOCK = 1024
"""Embedding rows per product: blocks of 512-16,384 rows were tried, 1,024 was best here."""

SPLIT_ROWS = 4
"""Up to this many rows (one image's beams at beam 4) a product is shared with a helper thread; with
more rows MKL keeps both cores busy by itself and the hand-off only costs."""

Fill = Callable[[int, int, torch.Tensor], None]  # computes output columns [lo, hi) into `out`

# Per module: (way, rows) -> whether that way matched the plain product bit for bit.
_verdicts: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, bool]] = weakref.WeakKeyDictionary()
_helper: ThreadPoolExecutor | None = None


def conv1d(conv: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """GPT-2's Conv1D on a 2-D input (`bias + x @ weight`), without the module-call overhead."""
    if x.device.type != "cpu" or not 2 <= x.shape[0] <= SPLIT_ROWS or torch.get_num_threads() < 2:
        return torch.addmm(conv.bias, x, conv.weight)

    def fill(lo: int, hi: int, out: torch.Tensor) -> None:
        torch.addmm(conv.bias[lo:hi], x, conv.weight[:, lo:hi], out=out[:, lo:hi])

    return _exact(
        conv,
        ("halves", x.shape[0]),
        lambda: torch.addmm(conv.bias, x, conv.weight),
        lambda: _columns(x, conv.weight.shape[1], fill, step=16, split=True),
    )


def project(head: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`head(x)` for a bias-free vocabulary Linear, in blocks of the vocabulary."""
    weight = getattr(head, "weight", None)
    plain = type(head) is torch.nn.Linear and head.bias is None
    if not plain or weight.device.type != "cpu" or weight.shape[0] <= VOCAB_BLOCK:
        return head(x)

    def fill(lo: int, hi: int, out: torch.Tensor) -> None:
        for start in range(lo, hi, VOCAB_BLOCK):
            end = min(start + VOCAB_BLOCK, hi)
            out[:, start:end] = F.linear(x, weight[start:end])

    split = x.shape[0] <= SPLIT_ROWS and torch.get_num_threads() > 1
    return _exact(
        head,
        ("blocks", x.shape[0], VOCAB_BLOCK, split),
        lambda: head(x),
        lambda: _columns(x, weight.shape[0], fill, step=VOCAB_BLOCK, split=split),
    )


def _exact(
    module: torch.nn.Module, way: tuple, plain: Callable[[], torch.Tensor], fast: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """`fast()` where it was seen to give `plain()`'s bits for this module, else `plain()`."""
    seen = _verdicts.setdefault(module, {})
    if way not in seen:
        want = plain()
        seen[way] = torch.equal(want, fast())
        return want
    return fast() if seen[way] else plain()


def _columns(x: torch.Tensor, columns: int, fill: Fill, step: int, split: bool) -> torch.Tensor:
    """A product filled column range by column range; when `split`, the upper part on the helper,
    starting at a multiple of `step` so that every piece has the shape it has unsplit."""
    out = x.new_empty(x.shape[0], columns)
    middle = min(columns, math.ceil(columns / 2 / step) * step) if split else columns
    other = _pool().submit(_in_inference_mode, fill, middle, columns, out) if middle < columns else None
    _in_inference_mode(fill, 0, middle, out)
    if other is not None:
        other.result()
    return out


def _in_inference_mode(fill: Fill, lo: int, hi: int, out: torch.Tensor) -> None:
    """Inference mode is per thread: the helper must enter it too, or autograd would see the weights."""
    with torch.inference_mode():
        fill(lo, hi, out)


def _pool() -> ThreadPoolExecutor:
    global _helper
    if _helper is None:
        _helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="docker-vit-matmul")
    return _helper
