"""Large CPU buffers (tensors read, merged tensors) allocated where first touches are cheap.

A model-sized merge allocates gigabytes in tensors of up to a few hundred MB; each is fresh
memory from the OS, and the first write to each 4 KiB page is a page fault, which on virtual
machines costs about a microsecond. numpy's allocator asks Linux for transparent huge pages
(`madvise(MADV_HUGEPAGE)`) on large allocations, 512x fewer faults. Elsewhere (other systems,
THP off) this is an ordinary allocation.

Even a huge page is zeroed by the kernel when first touched, a visible share of a merge's CPU
time. So a large buffer, once no tensor uses it, goes to a small pool (`POOL_BYTES` in all) and
the next request of its size reuses it; `release` empties the pool (the merge engine calls it
when a merge ends).
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Sequence

import numpy as np
import torch

HUGE = 1 << 22  # numpy's threshold for asking for huge pages (4 MiB)
POOL_BYTES = 1 << 29  # at most this many bytes of unused buffers are kept for reuse

_pool: dict[int, list[np.ndarray]] = {}
_pooled = 0
_lock = threading.Lock()


def empty(shape: Sequence[int] | int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """`torch.empty(shape, dtype=dtype, device=device)`; a large CPU buffer comes from the pool
    (one of its size in bytes, unused) or numpy's allocator."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < HUGE or (device is not None and torch.device(device).type != "cpu"):
        return torch.empty(shape, dtype=dtype, device=device)
    global _pooled
    with _lock:
        block = _pool[nbytes].pop() if _pool.get(nbytes) else None
        _pooled -= 0 if block is None else nbytes
    if block is None:
        block = np.empty(nbytes, np.uint8)
    view = block[:]  # freed with the last tensor over it: then the block goes to the pool
    weakref.finalize(view, _give_back, block).atexit = False
    return torch.from_numpy(view).view(dtype).reshape(shape)


def release() -> None:
    """Free the pooled buffers."""
    global _pooled
    with _lock:
        _pool.clear()
        _pooled = 0


def _give_back(block: np.ndarray) -> None:
    global _pooled
    with _lock:
        if _pooled + block.nbytes <= POOL_BYTES:
            _pool.setdefault(block.nbytes, []).append(block)
            _pooled += block.nbytes
