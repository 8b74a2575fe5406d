"""What every kernel shares: the stored tensors as numpy arrays, float32 loads and stores of
bfloat16 bits, a fused multiply-add, the counter-based draw, blocks and their float64 sums.

Arrays are indexed with unsigned integers: a signed index gets a negative-index wraparound
test, which keeps LLVM from vectorising the loop.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload
from torch import Tensor

BLOCK = 1 << 14  # entries per unit of parallel work (and per partial sum): stays in cache
DTYPES = (torch.bfloat16, torch.float32)
# the sparse pass (the largest kernel: about a minute to compile) takes the models as a tuple
# of ARITY arrays, padded with empty ones: one compiled version serves any number of models
# (more run the torch implementation); the other kernels, quick to compile, take them as they are
ARITY = 8


def usable(*tensors: Tensor, out_dtype: torch.dtype | None = None) -> bool:
    """Whether the kernels can run on these tensors (else the torch implementation runs): on
    the CPU, in one dtype of DTYPES (the kernels take the models as one typed tuple), unless
    `MEDMERGE_KERNELS=0`."""
    on_cpu = all(t.device.type == "cpu" for t in tensors)
    return on_cpu and usable_dtypes({t.dtype for t in tensors}, out_dtype)


def usable_dtypes(dtypes: set[torch.dtype], out_dtype: torch.dtype | None = None) -> bool:
    """`usable` for CPU tensors of these dtypes."""
    if os.environ.get("MEDMERGE_KERNELS", "1") == "0":
        return False
    if out_dtype is not None and out_dtype not in DTYPES:
        return False
    return len(dtypes) == 1 and dtypes <= set(DTYPES)


def array(t: Tensor) -> np.ndarray:
    """A flat numpy view of a CPU tensor: bfloat16 as its uint16 bits."""
    flat = t.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    if flat.dtype == torch.bfloat16:
        return flat.view(torch.int16).numpy().view(np.uint16)
    return flat.numpy()


def arrays(base: Tensor, models: list[Tensor]) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """The base and the models as kernel arguments (the models as one typed tuple)."""
    return array(base), tuple(array(m) for m in models)


def padded(base: Tensor, models: list[Tensor]) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """The base and the models as arguments of a kernel that takes ARITY models: the models'
    arrays, then empty ones."""
    found = [array(m) for m in models]
    return array(base), tuple(found + [np.empty(0, found[0].dtype)] * (ARITY - len(found)))


@njit(inline="always")
def count(base, models):
    """The models of a `padded` tuple: those as long as the base (the padding is empty)."""
    n = 0
    for m in range(len(models)):
        n += models[m].size == base.size
    return n


def load(a, j):  # noqa: ARG001 - the numba overload below is the implementation
    raise NotImplementedError


@overload(load, inline="always")
def _load(a, j):
    """Entry j as float32 (bfloat16 stored as uint16 bits)."""
    if a.dtype == types.uint16:
        return lambda a, j: np.uint32(np.uint32(a[np.uintp(j)]) << 16).view(np.float32)
    return lambda a, j: np.float32(a[np.uintp(j)])


def store(a, j, x):  # noqa: ARG001
    raise NotImplementedError


@overload(store, inline="always")
def _store(a, j, x):
    """Write float32 x as entry j, rounding to nearest even for bfloat16 (as torch does)."""
    if a.dtype == types.uint16:

        def to_bf16(a, j, x):
            if x != x:
                a[np.uintp(j)] = np.uint16(0x7FC0)
            else:
                bits = np.float32(x).view(np.uint32)
                bias = np.uint32(((bits >> 16) & 1) + 0x7FFF)
                a[np.uintp(j)] = np.uint16(np.uint32(bits + bias) >> 16)

        return to_bf16

    def to_f32(a, j, x):
        a[np.uintp(j)] = x

    return to_f32


@intrinsic
def fma(typingctx, a, b, c):
    """a * b + c rounded once (what torch's vectorised add(alpha=) computes)."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(f32, [f32, f32, f32]), "llvm.fma.f32"
        )
        return builder.call(fn, args)

    return sig, codegen


@njit(inline="always")
def _fmix32(x):
    x = np.uint32(x ^ (x >> np.uint32(16)))
    x = np.uint32((np.uint64(x) * np.uint64(0x85EBCA6B)) & np.uint64(0xFFFFFFFF))
    x = np.uint32(x ^ (x >> np.uint32(13)))
    x = np.uint32((np.uint64(x) * np.uint64(0xC2B2AE35)) & np.uint64(0xFFFFFFFF))
    return np.uint32(x ^ (x >> np.uint32(16)))


@njit(inline="always")
def draw(first, second, position):
    """`rng.uniform`'s draw for an entry, given its position's low 32 bits (all the draw uses)
    as a uint32. Loops count that position in a uint32 of their own: derived from a 64-bit
    index it would vectorise in 512-bit lanes, and on Intel cores a 512-bit instruction in
    flight shuts one of the two 256-bit vector ports."""
    x = np.uint32(position ^ np.uint32(0x80000000))
    x = _fmix32(np.uint32(x ^ first))
    x = _fmix32(np.uint32(x ^ second))
    return np.float32(np.uint32(x >> np.uint32(8)) & np.uint32(0xFFFFFF)) * np.float32(2.0**-24)


@njit(fastmath={"reassoc"}, cache=True, nogil=True)
def sum64(x, size):
    """The float64 sum of x[:size], reassociated so that it vectorises (the order then depends
    on the vector width, never on the thread count)."""
    result = 0.0
    for t in range(size):
        result += np.float64(x[t])
    return result


@njit(parallel=True, cache=True, nogil=True)
def _largest_pattern(a, maxima):
    """Per block, the largest pattern of |x| (the bits without the sign; as unsigned integers,
    magnitudes order as the floats do, and every NaN lies above inf): cast back to the
    array's width at each step, so that 16 bfloat16 lanes fit a 256-bit vector."""
    n = a.size
    bits = a.dtype.type  # uint16 (bfloat16) or uint32 (float32)
    magnitude = bits(0x7FFF) if a.itemsize == 2 else bits(0x7FFFFFFF)
    for blk in prange((n + BLOCK - 1) // BLOCK):
        most = bits(0)
        for j in range(blk * BLOCK, min(n, (blk + 1) * BLOCK)):
            most = max(most, bits(a[np.uintp(j)] & magnitude))
        maxima[blk] = most


def largest_magnitude(t: Tensor) -> float:
    """max |x| over a floating tensor: inf where one is infinite, NaN where one is NaN. On the
    CPU one pass over the stored bits; its torch twin (other devices and dtypes) is
    `torch.aminmax`."""
    if t.numel() == 0:
        return 0.0
    if not usable(t):
        lo, hi = (v.item() for v in torch.aminmax(t))  # NaN propagates to both
        return math.nan if math.isnan(hi) else max(-lo, hi)
    bits = array(t)
    if bits.dtype == np.float32:
        bits = bits.view(np.uint32)
    maxima = np.empty((bits.size + BLOCK - 1) // BLOCK, bits.dtype)
    _largest_pattern(bits, maxima)
    top = int(maxima.max())
    pattern = np.uint32(top << 16 if bits.dtype == np.uint16 else top)
    return float(pattern.view(np.float32))
