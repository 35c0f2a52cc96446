"""The decoder's few-row matrix products, in forms that use every CPU core, where they are exact and faster.

A decode step multiplies a few rows (images x beams) by every weight matrix of the decoder. Whether
MKL spreads a product of so few rows over the cores depends on the CPU: on an AVX2 AMD EPYC it ran
them on one core and left the second idle, and the same arithmetic issued as one batched product (a
Conv1D weight in two column halves, the output embedding in blocks of its vocabulary) gave a lone
caption 0.71x the time; on an AVX-512 Xeon MKL already shares them, and the halves were slower
(benchmarks/NOTES.md). So each split form must pass two checks, per machine:

- bits: splitting changes no arithmetic, but a BLAS may pick another kernel for another shape (or thread
  count), so the first product of each matrix and row count is computed every way and a split form
  stays in the running only if every bit matched. The default decode path stays token-exact anywhere.
- speed: the next calls of each shape and row count go to the exact forms in turn, timed, and the
  fastest by median is used from then on (the 16-row halves lost on the Xeon, and a greedy batch of 16
  decoded in 0.87x the time; quarters beat halves at 64 rows on a Zen 5 EPYC).
"""

from __future__ import annotations

import functools
import statistics
import time
import weakref
from collections.abc import Callable, Hashable, Sequence

import torch
import torch.nn.functional as F

VOCAB_BLOCK = 1024
"""Output-embedding rows per block: 3 MB of weights, where the whole 154 MB matrix in one product
had poor cache reuse."""

MIN_LAST_BLOCK = 16
"""The fewest output-embedding rows the last product of the blocks may have (see `_whole_blocks`)."""

SPLIT_MAX_ROWS = 128
"""Above this many rows one product already keeps every core busy: the column parts cost more than they
save (at 256 rows they were 10% slower here), and the vocabulary's batched blocks, whose temporary grows
with the rows, are not tried."""

COLUMN_PARTS = {"halves": 2, "quarters": 4}
"""The Conv1D column splits raced against the plain product. Halves won at 4-16 rows on an older EPYC,
quarters at 64 rows on a Zen 5 EPYC (1.76-1.82 ms against 1.81-1.88 for halves and 2.14-2.22 plain,
[768 x 3072] in a decode); on a Xeon the plain product won at 16 rows."""

RACE_CALLS = 8
"""Timed calls of each form before the fastest is chosen: the shapes recur in every layer of every
step, so this is decided within the first batch or two."""

Form = Callable[[], torch.Tensor]

# Per module: (form, rows, threads) -> whether the split form matched the module's own product bit for
# bit; and ("per image", images, length, beams, dtype, threads) -> `per_image`'s verdict.
_verdicts: weakref.WeakKeyDictionary[torch.nn.Module, dict[Hashable, bool]] = weakref.WeakKeyDictionary()


def conv1d(conv: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """GPT-2's Conv1D on a 2-D input (`addmm(bias, x, weight)`), in column parts where exact."""
    weight = conv.weight

    def plain() -> torch.Tensor:
        return torch.addmm(conv.bias, x, weight)

    if not _checkable(weight) or not weight.is_contiguous() or x.shape[0] > SPLIT_MAX_ROWS:
        return plain()
    splits = {
        name: functools.partial(_columns, conv.bias, x, weight, parts)
        for name, parts in COLUMN_PARTS.items()
        if weight.shape[1] % parts == 0
    }
    return _fastest(conv, x.shape[0], weight.shape, plain, splits)


def vocabulary(head: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`head(x)` for the output embedding (a Linear without bias), in vocabulary blocks where exact.

    The blocks go one product at a time, or as one batched product (which won at 64 rows on a Zen 5
    EPYC and a Xeon, 29 ms a step against 38 and 31 for the plain product; an older EPYC preferred the
    loop, 48 against 54)."""
    weight = getattr(head, "weight", None)
    bare = type(head) is torch.nn.Linear and head.bias is None
    if not bare or not _checkable(weight) or _whole_blocks(weight.shape[0]) == 0:
        return head(x)
    splits = {("looped", VOCAB_BLOCK): functools.partial(_looped, weight, x)}
    if x.shape[0] <= SPLIT_MAX_ROWS and weight.is_contiguous():
        splits["stacked", VOCAB_BLOCK] = functools.partial(_stacked, weight, x)
    return _fastest(head, x.shape[0], weight.shape, lambda: head(x), splits)


def per_image(chain: Sequence[torch.nn.Module], states: torch.Tensor, beams: int) -> bool:
    """Whether the modules in turn on each image's states ([images, length, dim]) give the bits they
    give every beam's copy when the states come repeated per beam, as `generate` expands them. MKL
    rounds a product of few rows otherwise than the same rows in a larger one, and "few" grows with the
    threads (a review: up to 11 rows at 2 threads, 27 at 16, 199 at 96-128, a lone vit-gpt2 image).
    Checked once per shape and thread count, on the first states, as the split forms are."""
    key = ("per image", *states.shape[:2], beams, states.dtype, torch.get_num_threads())
    seen = _verdicts.setdefault(chain[-1], {})
    if key not in seen:
        alone, together = states, states.repeat_interleave(beams, dim=0)
        for module in chain:
            alone, together = module(alone), module(together)
        seen[key] = torch.equal(alone.repeat_interleave(beams, dim=0), together)
    return seen[key]


def _checkable(weight: torch.Tensor) -> bool:
    """Float32 on a CPU: where one product's bits vouch for every later one of its shape. (In bfloat16
    whether the split form matches depends on the values too, so a first check proves nothing.)"""
    return weight.device.type == "cpu" and weight.dtype == torch.float32


def _fastest(
    module: torch.nn.Module, rows: int, shape: tuple[int, ...], plain: Form, splits: dict[Hashable, Form]
) -> torch.Tensor:
    """The plain product, or the fastest here of the split forms whose first result for this many rows
    matched it in every bit. The thread count is part of the key: MKL splits some sums over the
    threads, so the plain product's bits change with it."""
    if not splits:
        return plain()
    threads = torch.get_num_threads()
    seen = _verdicts.setdefault(module, {})
    unchecked = [name for name in splits if (name, rows, threads) not in seen]
    if unchecked:
        want = plain()
        for name in unchecked:
            seen[name, rows, threads] = _matches(want, splits[name])
        return want
    exact = [name for name in splits if seen[name, rows, threads]]
    if not exact:
        return plain()
    key = (tuple(exact), rows, threads, tuple(shape))
    race = _races.get(key) or _races.setdefault(key, _Race(1 + len(exact)))  # made once, not per call
    return race.run((plain, *(splits[name] for name in exact)))


def _matches(want: torch.Tensor, split: Form) -> bool:
    """Whether the split form gives every bit of `want`; one this torch build cannot run is not used."""
    try:
        return torch.equal(want, split())
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return False


class _Race:
    """Which of the exact forms of one product is fastest here, from their first calls in turn."""

    def __init__(self, forms: int) -> None:
        self.seconds: list[list[float]] = [[] for _ in range(forms)]
        self.winner: int | None = None

    def run(self, forms: tuple[Form, ...]) -> torch.Tensor:
        if self.winner is not None:
            return forms[self.winner]()
        turn = min(range(len(forms)), key=lambda i: len(self.seconds[i]))
        start = time.perf_counter()
        out = forms[turn]()  # a CPU product: done when it returns
        self.seconds[turn].append(time.perf_counter() - start)
        if len(self.seconds[-1]) >= RACE_CALLS:
            medians = [statistics.median(s) for s in self.seconds]
            self.winner = medians.index(min(medians))  # a tie keeps the plain product
        return out


# Per (exact forms, rows, threads, operand shape): the race among the plain and the exact split forms.
_races: dict[Hashable, _Race] = {}


def _columns(bias: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, parts: int) -> torch.Tensor:
    """[rows, k] x [k, n] + bias as one batched product of `parts` [k, n/parts] column blocks (views,
    no copy), which torch's threads share."""
    rows, (k, n) = x.shape[0], weight.shape
    width = n // parts
    out = torch.baddbmm(
        bias.view(parts, 1, width), x.expand(parts, rows, k), weight.view(k, parts, width).permute(1, 0, 2)
    )
    return out.transpose(0, 1).reshape(rows, n)


def _whole_blocks(vocab: int) -> int:
    """Blocks of `VOCAB_BLOCK` rows before the last product, which takes the rest. A rest of a few rows
    joins the last whole block: a one-row product rounds some values otherwise than the plain product's
    edge (a review: a split that passed its first check at 2-5 rows later differed, vocabulary 1025)."""
    count, rest = divmod(vocab, VOCAB_BLOCK)
    return count - 1 if 0 < rest < MIN_LAST_BLOCK else count


def _stacked(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x @ weight.T with the whole blocks in one batched product and the rest alone."""
    rows, (vocab, dim) = x.shape[0], weight.shape
    count = _whole_blocks(vocab)
    full = count * VOCAB_BLOCK
    out = x.new_empty(rows, vocab)
    blocks = weight[:full].view(count, VOCAB_BLOCK, dim).transpose(1, 2)
    stacked = torch.bmm(x.expand(count, rows, dim), blocks)  # [count, rows, block]
    out[:, :full].unflatten(1, (count, VOCAB_BLOCK)).copy_(stacked.transpose(0, 1))
    if full < vocab:
        out[:, full:] = F.linear(x, weight[full:])
    return out


def _looped(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    full = _whole_blocks(weight.shape[0]) * VOCAB_BLOCK
    out = x.new_empty(x.shape[0], weight.shape[0])
    for start in range(0, full, VOCAB_BLOCK):
        out[:, start : start + VOCAB_BLOCK] = F.linear(x, weight[start : start + VOCAB_BLOCK])
    if full < weight.shape[0]:
        out[:, full:] = F.linear(x, weight[full:])
    return out
