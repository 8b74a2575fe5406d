"""Streaming work: a tensor worked through in cache-sized chunks on the CPU (a chain of
whole-tensor ops streams every intermediate through main memory; on chunks they stay in
cache), all at once on other devices; and tensors too large to hold, worked through in row
blocks (`Blocked`)."""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from medmerge.io import buffers
from medmerge.methods.kernels.sparse import block_entries

CHUNK = 1 << 20  # elements per chunk of torch work on the CPU: stays in cache


def chunkwise(fn: Callable[..., Tensor], *tensors: Tensor) -> Tensor:
    """`fn(*tensors)` for an elementwise `fn`, computed over cache-sized chunks on the CPU.

    A chain of whole-tensor ops streams every intermediate through main memory; on chunks the
    intermediates stay in cache."""
    first = tensors[0]
    parts = spans(first.numel(), first.device)
    if len(parts) == 1:
        return fn(*tensors)
    flats = [t.reshape(-1) for t in tensors]
    out = None
    for part in parts:
        result = fn(*(f[part] for f in flats))
        if out is None:
            out = buffers.empty(first.numel(), result.dtype, first.device)
        out[part] = result
    return out.reshape(first.shape)


def spans(n: int, device: torch.device, row: int = 1) -> list[slice]:
    """Flat slices to work through a tensor of n entries in: cache-sized chunks of whole rows
    (`row` entries each) on the CPU, everything at once on other devices."""
    if device.type != "cpu" or n <= CHUNK:
        return [slice(0, n)]
    step = max(row, CHUNK // row * row)
    return [slice(start, min(start + step, n)) for start in range(0, n, step)]


@dataclass(frozen=True)
class Blocked:
    """A tensor handled in row blocks, never whole: an input over the merge's memory budget
    (`get(k)` reads block k from its shard) or a result computed block by block, in order, as
    it is written (`get(k)` computes block k). The engine gives inputs of this kind only to
    methods registered to take them (`streams`); their torch paths read them through `flat`
    by `spans`, which lie inside blocks (the engine aligns the blocks to them), and return a
    `Blocked` result (`blocked_result`), so that block by block they compute what they compute
    on the whole tensor. An input also reads any range of rows (`read`, see `rows`)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    blocks: tuple[tuple[int, int], ...]  # row ranges, in order, covering every row
    get: Callable[[int], Tensor]
    read: Callable[[int, int], Tensor] | None = None  # rows start..stop, of an input

    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")


class Flat:
    """A `Blocked` tensor as a flat one to slice: each slice must lie inside one block, whose
    read is kept until a slice of another is asked for."""

    def __init__(self, blocked: Blocked):
        self.blocked = blocked
        row = math.prod(blocked.shape[1:])
        self._starts = [start * row for start, _ in blocked.blocks]
        self._k, self._block = -1, None

    def numel(self) -> int:
        return self.blocked.numel()

    def __getitem__(self, part: slice) -> Tensor:
        k = bisect.bisect_right(self._starts, part.start) - 1
        if k != self._k:
            self._block, self._k = self.blocked.get(k).reshape(-1), k
        offset = self._starts[k]
        return self._block[part.start - offset : part.stop - offset]


def rows(t: Tensor | Blocked, start: int, stop: int) -> Tensor:
    """Rows start..stop of t: a view of a tensor; of a `Blocked` input, a private memory map of
    their bytes in the shard, whose pages count in memory only as they are touched and only
    until it is freed (so a view of a few of them costs only those)."""
    if isinstance(t, Blocked):
        return t.read(start, min(stop, t.shape[0]))
    return t[start:stop]


def take_rows(t: Tensor | Blocked, index: np.ndarray) -> Tensor:
    """Rows `index` of t, in that order (a copy); of a `Blocked` input, read from the shard in
    runs of consecutive rows."""
    if not isinstance(t, Blocked):
        return t[torch.as_tensor(index, dtype=torch.long, device=t.device)]
    if len(index) == 0:
        return torch.empty((0, *t.shape[1:]), dtype=t.dtype)
    runs = np.split(index, np.flatnonzero(np.diff(index) != 1) + 1)
    parts = [t.read(int(run[0]), int(run[-1]) + 1) for run in runs]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def flat(t: Tensor | Blocked) -> Tensor | Flat:
    """t as a flat tensor to slice by positions (a `Flat` of a `Blocked` one)."""
    return Flat(t) if isinstance(t, Blocked) else t.reshape(-1)


def blocked_result(
    like: Blocked, dtype: torch.dtype, parts: list[slice], compute: Callable[[slice], Tensor]
) -> Blocked:
    """A result shaped as `like` whose block k is `compute(p)` in `dtype` for the `parts` p in
    it, in order (a computation that counts from part to part, as top-k ties do, sees them in
    the order of the whole tensor when the blocks are asked for in order)."""
    row = math.prod(like.shape[1:])

    def get(k: int) -> Tensor:
        start, stop = like.blocks[k]
        mine = [p for p in parts if start * row <= p.start < stop * row]
        block = torch.cat([compute(p).to(dtype) for p in mine])
        return block.view(stop - start, *like.shape[1:])

    return Blocked(like.shape, dtype, like.blocks, get)


def chunk_by_chunk(
    like: Tensor | Blocked, parts: list[slice], compute: Callable[[slice], Tensor], dtype
) -> Tensor | Blocked:
    """The output shaped as `like` of `compute` over the flat parts, in order, in `dtype`: a
    tensor on like's device, or for a `Blocked` input a `Blocked` result (`blocked_result`)."""
    if isinstance(like, Blocked):
        return blocked_result(like, dtype, parts, compute)
    out = buffers.empty(like.numel(), dtype, like.device)
    for p in parts:
        out[p] = compute(p)
    return out.view(like.shape)


def summed_terms(terms: Callable[[int], np.ndarray], blocked: Blocked) -> np.ndarray:
    """The sum of a kernel's float64 terms (one per kernel block, `terms(k)` those of block k)
    over every block: the same terms in the same order as on the whole tensor, so the same sum,
    where the blocks hold whole kernel blocks (`chunk_rows`)."""
    return np.concatenate([terms(k) for k in range(len(blocked.blocks))]).sum(0)


def chunk_rows(shape: tuple[int, ...], row: int) -> int:
    """The rows of a tensor of `shape` that a row block of it holds a multiple of, so that the
    `spans(n, cpu, row)` of the whole tensor, and the blocks of the CPU kernels (whose float64
    sums add per block), lie inside blocks."""
    per_row = math.prod(shape[1:])
    step = math.lcm(max(row, CHUNK // row * row), block_entries(row))
    return math.lcm(step, per_row) // per_row
