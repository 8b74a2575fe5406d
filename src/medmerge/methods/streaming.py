"""Streaming torch work: a tensor worked through in cache-sized chunks on the CPU (a chain of
whole-tensor ops streams every intermediate through main memory; on chunks they stay in
cache), all at once on other devices."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from medmerge import buffers

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
