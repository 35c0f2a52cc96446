"""The decoder's few-row matrix products, in forms that use every CPU core, where they are exact.

A decode step multiplies a few rows (images x beams) by every weight matrix of the decoder. MKL runs
a product of so few rows on one core and streams the weights slowly, so a lone caption left the
second core idle. The same arithmetic issued as one batched product (a Conv1D weight in two column
halves, the output embedding in blocks of its vocabulary) is shared by torch's threads, in their one
OpenMP team: on the 2-core CPU here a lone caption at 4 beams came back in 0.71x the time, and batches
of 16 ran 6-10% faster (servers driven in turn, benchmarks/NOTES.md).

Splitting changes no arithmetic, but a BLAS may pick another kernel for another shape, and the choice
depends on the shapes only. So the first product of each matrix and row count is computed both ways
and compared; the split form is used for that row count from then on only if every bit matched
(column halves differ at some row counts here, 5-11 rows, which then keep the plain product). The
default decode path stays token-exact on any machine.
"""

from __future__ import annotations

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

# Per module: (form, rows, ...) -> whether the split form matched the module's own product bit for bit.
_verdicts: weakref.WeakKeyDictionary[torch.nn.Module, dict[Hashable, bool]] = weakref.WeakKeyDictionary()


def conv1d(conv: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """GPT-2's Conv1D on a 2-D input (`addmm(bias, x, weight)`), in two column halves where exact."""
    weight = conv.weight

    def plain() -> torch.Tensor:
        return torch.addmm(conv.bias, x, weight)

    cpu = weight.device.type == "cpu" and weight.is_contiguous()
    if not cpu or weight.shape[1] % 2 or x.shape[0] > HALVES_MAX_ROWS:
        return plain()
    return _exact(conv, ("halves", x.shape[0]), plain, lambda: _halves(conv.bias, x, weight))


def vocabulary(head: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`head(x)` for the output embedding (a Linear without bias), in vocabulary blocks where exact."""
    weight = getattr(head, "weight", None)
    bare = type(head) is torch.nn.Linear and head.bias is None
    if not bare or weight.device.type != "cpu" or weight.shape[0] <= VOCAB_BLOCK:
        return head(x)
    stack = x.shape[0] <= STACKED_VOCAB_MAX_ROWS and weight.is_contiguous()
    blocks = _stacked if stack else _looped
    return _exact(
        head, (blocks.__name__, x.shape[0], VOCAB_BLOCK), lambda: head(x), lambda: blocks(weight, x)
    )


def _exact(
    module: torch.nn.Module,
    key: Hashable,
    plain: Callable[[], torch.Tensor],
    split: Callable[[], torch.Tensor],
) -> torch.Tensor:
    """The plain product, or the split one where its first result for `key` matched every bit."""
    seen = _verdicts.setdefault(module, {})
    if key not in seen:
        want = plain()
        seen[key] = torch.equal(want, split())
        return want
    return split() if seen[key] else plain()


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
