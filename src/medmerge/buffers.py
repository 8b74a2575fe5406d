"""Large CPU buffers (tensors read, merged tensors) allocated where first touches are cheap.

A model-sized merge allocates gigabytes in tensors of up to a few hundred MB; each is fresh
memory from the OS, and the first write to each 4 KiB page is a page fault. On virtual machines
a fault costs about a microsecond: reading a 117 MB tensor into a fresh `torch.empty` buffer
took 68-87 ms, of which 45-60 ms were faults. numpy's allocator asks Linux for transparent huge
pages (`madvise(MADV_HUGEPAGE)`) on large allocations, 512x fewer faults: the same read took
24-29 ms. Elsewhere (other systems, THP off) this is an ordinary allocation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

HUGE = 1 << 22  # numpy's threshold for asking for huge pages (4 MiB)


def empty(shape: Sequence[int] | int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """`torch.empty(shape, dtype=dtype, device=device)`, from numpy's allocator when it is a
    large CPU buffer."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < HUGE or (device is not None and torch.device(device).type != "cpu"):
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.from_numpy(np.empty(nbytes, np.uint8)).view(dtype).reshape(shape)
