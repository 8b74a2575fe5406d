"""Linear combinations of the models and the statistics that decide them: the Gram matrix
(SLERP, NuSLERP, Karcher, Model Stock), the combination itself (linear, task arithmetic and
those), and the hierarchical method's task-vector cosine and LERP. One pass each; float64 sums
per fixed block, so they do not depend on the thread count."""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from medmerge.io import buffers
from medmerge.methods.kernels.core import BLOCK, array, fma, load, store


@njit(fastmath={"reassoc"}, cache=True, nogil=True)
def _block_products(base, a, b, start, stop):
    """`_delta_products` for one block. Reassociated, so that the sums vectorise; their order
    then depends on the vector width, not on the thread count."""
    dot, aa, bb = 0.0, 0.0, 0.0
    for j in range(start, stop):
        origin = load(base, j)
        da = np.float64(load(a, j) - origin)
        db = np.float64(load(b, j) - origin)
        dot += da * db
        aa += da * da
        bb += db * db
    return dot, aa, bb


@njit(parallel=True, cache=True, nogil=True)
def _delta_products(base, a, b, sums):
    """Per block: the sums of da*db, da*da and db*db in float64, for da = a - base and
    db = b - base in float32 (as torch computes them)."""
    n = base.size
    for blk in prange((n + BLOCK - 1) // BLOCK):
        stop = min(n, (blk + 1) * BLOCK)
        sums[blk, 0], sums[blk, 1], sums[blk, 2] = _block_products(base, a, b, blk * BLOCK, stop)


@njit(parallel=True, cache=True, nogil=True)
def _lerp(a, b, w, out):
    """torch.lerp(a, b, w) in float32 as torch's vectorised CPU kernel computes it, stored
    in out's dtype. (Names differ from `store`'s parameters: numba 0.68 mis-renames a
    variable that shares its name with a parameter of an inlined overload here.)"""
    n = a.size
    small = abs(w) < np.float32(0.5)
    coeff = w if small else w - np.float32(1.0)
    for blk in prange((n + BLOCK - 1) // BLOCK):
        for j in range(blk * BLOCK, min(n, (blk + 1) * BLOCK)):
            p = load(a, j)
            q = load(b, j)
            r = fma(coeff, q - p, p if small else q)
            store(out, j, r)


@njit(fastmath={"reassoc"}, cache=True, nogil=True)
def _block_gram(base, models, centered, start, stop, out):
    """`gram` for one block (reassociated sums, as in `_block_products`)."""
    n = len(models)
    for i in range(n):
        for k in range(i, n):
            total = 0.0
            for j in range(start, stop):
                origin = load(base, j) if centered else np.float32(0.0)
                total += np.float64(load(models[i], j) - origin) * np.float64(
                    load(models[k], j) - origin
                )
            out[i, k] = total
            out[k, i] = total


@njit(parallel=True, cache=True, nogil=True)
def _gram(base, models, centered, sums):
    n = models[0].size
    for blk in prange((n + BLOCK - 1) // BLOCK):
        stop = min(n, (blk + 1) * BLOCK)
        _block_gram(base, models, centered, blk * BLOCK, stop, sums[blk])


@njit(parallel=True, cache=True, nogil=True)
def _combine(base, models, centered, coef, out):
    """out = sum_i coef_i v_i (+ base when `centered`, v_i = models_i - base), each entry
    accumulated in float32 model by model as torch's add_(alpha=) does."""
    n = models[0].size
    for blk in prange((n + BLOCK - 1) // BLOCK):
        start = blk * BLOCK
        size = min(n, start + BLOCK) - start
        acc = np.empty(size, np.float32)
        for t in range(size):
            acc[t] = load(base, start + t) if centered else np.float32(0.0)
        for i in range(len(models)):
            model, c = models[i], coef[i]
            for t in range(size):
                origin = load(base, start + t) if centered else np.float32(0.0)
                acc[t] = fma(c, load(model, start + t) - origin, acc[t])
        for t in range(size):
            store(out, start + t, acc[t])


def delta_products(base: Tensor, a: Tensor, b: Tensor) -> tuple[float, float, float]:
    """(sum da*db, sum da^2, sum db^2) for da = a - base, db = b - base, summed in float64.
    Torch twin: `hierarchical.delta_cosine`'s chunk loop."""
    dot, aa, bb = delta_product_terms(base, a, b).sum(0)
    return float(dot), float(aa), float(bb)


def delta_product_terms(base: Tensor, a: Tensor, b: Tensor) -> np.ndarray:
    """`delta_products`' terms: one row per BLOCK entries (see `gram_partials`)."""
    blocks = (base.numel() + BLOCK - 1) // BLOCK
    sums = np.zeros((blocks, 3), np.float64)
    _delta_products(array(base), array(a), array(b), sums)
    return sums


def lerp(a: Tensor, b: Tensor, w: float, out_dtype: torch.dtype) -> Tensor:
    """torch.lerp(a.float(), b.float(), w).to(out_dtype), bit for bit, in one pass. Torch
    twin: `hierarchical.lerp`'s chunk loop."""
    out = buffers.empty(a.shape, out_dtype)
    _lerp(array(a), array(b), np.float32(w), array(out))
    return out


def gram(base: Tensor | None, models: list[Tensor]) -> np.ndarray:
    """The float64 Gram matrix of the models (of their task vectors when `base` is given).
    Torch twin: `spherical.gram`'s chunk loop."""
    return gram_partials(base, models).sum(0)


def gram_partials(base: Tensor | None, models: list[Tensor]) -> np.ndarray:
    """`gram`'s terms: one matrix per BLOCK entries. A tensor cut into parts of whole BLOCKs
    gives, part after part, the same terms, so the same sum."""
    models_ = tuple(array(m) for m in models)
    blocks = (models_[0].size + BLOCK - 1) // BLOCK
    sums = np.zeros((blocks, len(models), len(models)), np.float64)
    origin = models_[0] if base is None else array(base)
    _gram(origin, models_, base is not None, sums)
    return sums


def combine(base: Tensor | None, models: list[Tensor], coef, out_dtype: torch.dtype) -> Tensor:
    """sum_i coef_i models_i, or base + sum_i coef_i (models_i - base), in out_dtype. Torch
    twin: `basic.combination`'s chunk loop."""
    models_ = tuple(array(m) for m in models)
    out = buffers.empty(models[0].shape, out_dtype)
    origin = models_[0] if base is None else array(base)
    _combine(origin, models_, base is not None, np.asarray(coef, np.float32), array(out))
    return out
