"""Merges on the sphere: SLERP, NuSLERP, Multi-SLERP, Karcher mean, and Model Stock (an
angle-derived ratio), with mergekit's formulas and thresholds.

Tensors are treated as flat vectors (NuSLERP can take rows or columns as its vectors).
Interpolation angles come from the normalised vectors; the interpolation itself combines the
original vectors, so magnitudes are kept (as in mergekit). Nearly parallel vectors fall back to
linear interpolation, where the spherical formula divides by sin(angle) ~ 0.

Every result on flat vectors is a linear combination of the inputs whose coefficients depend
only on their inner products. So these methods stream in two passes over cache-sized chunks: the
Gram matrix of the inputs (float64), then the coefficients applied chunk by chunk, written in
the output dtype (row-wise NuSLERP: a Gram matrix and coefficients per column). Karcher's
iterations run on the coefficients (an n x n problem), not on the tensor.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from medmerge.errors import ConfigError
from medmerge.methods import kernels
from medmerge.methods.basic import chunks, combination
from medmerge.methods.registry import entries, register
from medmerge.methods.streaming import Blocked, chunk_by_chunk, flat, spans, summed_terms


def gram(models: list[Tensor], base: Tensor | None = None) -> Tensor:
    """Float64 matrix of inner products of the flat models (of their task vectors
    models_i - base when a base is given), streamed chunk by chunk; of `Blocked` inputs, block
    by block, summing the same terms in the same order."""
    inputs = [*models, *([base] if base is not None else [])]
    if isinstance(models[0], Blocked):
        if kernels.usable_dtypes({t.dtype for t in inputs}):
            terms = lambda k: kernels.gram_partials(  # noqa: E731
                None if base is None else base.get(k), [m.get(k) for m in models]
            )
            return torch.from_numpy(summed_terms(terms, models[0]))
    elif kernels.usable(*inputs):
        return torch.from_numpy(kernels.gram(base, models))
    g = torch.zeros(len(models), len(models), dtype=torch.float64)
    vectors = [chunks(m, base) for m in models]
    for p in spans(models[0].numel(), models[0].device):
        x = torch.stack([v(p) for v in vectors]).double()
        g += (x @ x.T).cpu()
    return g


def slerp_coefficients(
    t: float, aa: float, bb: float, ab: float, colinear: float = 0.9995, eps: float = 1e-8
) -> tuple[float, float]:
    """(s_a, s_b) with slerp(a, b) = s_a a + s_b b, from |a|^2, |b|^2 and a.b; linear where
    |cos| > `colinear`. A norm at or below `eps` counts as 1 (mergekit's guard)."""
    norm_a, norm_b = math.sqrt(max(aa, 0.0)), math.sqrt(max(bb, 0.0))
    norm = (norm_a if norm_a > eps else 1.0) * (norm_b if norm_b > eps else 1.0)
    cos = min(max(ab / norm, -1.0), 1.0)
    if abs(cos) > colinear:
        return 1.0 - t, t
    theta = math.acos(cos)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def slerp_vectors(t: float, a: Tensor, b: Tensor) -> Tensor:
    """NuSLERP of rows: each row a vector, normalised (norms clamped to 1e-7), from a (t=0) to
    b (t=1); linear where 1 - cos^2 <= 1e-16 (mergekit's nuslerp)."""

    def unit(x):
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-7)

    cos = (unit(a) * unit(b)).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    colinear = (1 - cos.square()) <= 1e-16
    theta = torch.arccos(torch.where(colinear, 0.0, cos))
    sin = torch.where(colinear, 1.0, torch.sin(theta))
    spherical = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / sin
    return torch.where(colinear, (1 - t) * a + t * b, spherical)


def _slerp_inputs(models: int, with_base: bool) -> str | None:
    if with_base and models != 1:
        return (
            f"it interpolates its base_model and one other model, got {models} besides the "
            "base (list the base among the models, as its t = 0 end)"
        )
    if not with_base and models != 2:
        return f"it interpolates two models, got {models}"
    return None


@register(
    "slerp", uses_base=True, raw_inputs=True, max_models=2, inputs=_slerp_inputs, streams=entries
)
def slerp(
    base: Tensor | None,
    models: list[Tensor],
    *,
    t: float,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Spherical interpolation from the base (t = 0) to the other model (t = 1); without a
    base, from the first model to the second  (Shoemake 1985; mergekit)."""
    pair = [base, models[0]] if base is not None else models
    g = gram(pair)
    coef = slerp_coefficients(t, float(g[0, 0]), float(g[1, 1]), float(g[0, 1]))
    return combination(list(coef), pair, None, out_dtype)


def _pairwise_t(acc_w: float, w: float) -> float:
    total = acc_w + w
    return 0.5 if abs(total) < 1e-6 else w / total


def _nuslerp_flat(params: dict, shape: tuple[int, ...]) -> bool:
    return params["nuslerp_flatten"] or len(shape) < 2


def _nuslerp_streams(params: dict, shape: tuple[int, ...]) -> int | None:
    """Flat: any chunks; row-wise: chunks of whole rows (the columns' Gram matrices add rows)."""
    if _nuslerp_flat(params, shape):
        return 1
    return math.prod(shape[1:]) if params["nuslerp_row_wise"] else None


def _nuslerp_rows(params: dict, shape: tuple[int, ...]) -> bool:
    """Vectors along the last axis: each row of the tensor holds whole vectors."""
    return not _nuslerp_flat(params, shape) and not params["nuslerp_row_wise"]


@register(
    "nuslerp",
    uses_base=True,
    raw_inputs=True,
    min_models=2,
    rows=_nuslerp_rows,
    streams=_nuslerp_streams,
)
def nuslerp(
    base: Tensor | None,
    models: list[Tensor],
    *,
    weight: list[float],
    nuslerp_flatten: bool = True,
    nuslerp_row_wise: bool = False,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """SLERP of two models, or of their task vectors when a base is given, at t = w_2 / (w_1 +
    w_2), of whole tensors or, not flattened, of their rows (of their columns, row-wise); more
    than two models pairwise in model order  (mergekit's nuslerp)."""
    if nuslerp_flatten or len(models[0].shape) < 2:  # flat: on the Gram matrix, streamed
        coef = _nuslerp_cascade(gram(models, base), weight)
        return combination(coef.tolist(), models, base, out_dtype)
    if nuslerp_row_wise:  # each column a vector: on the columns' Gram matrices, streamed
        return _columnwise(models, base, weight, out_dtype)
    vectors = [m.float() for m in models]
    if base is not None:
        base = base.float()
        vectors = [v - base for v in vectors]
    acc, acc_w = vectors[0], weight[0]
    for v, w in zip(vectors[1:], weight[1:], strict=True):
        acc = slerp_vectors(_pairwise_t(acc_w, w), acc, v)
        acc_w += w
    return acc + base if base is not None else acc


def _nuslerp_coefficients(t: float, aa: Tensor, bb: Tensor, ab: Tensor) -> tuple[Tensor, Tensor]:
    """(s_a, s_b) with nuslerp(a, b) = s_a a + s_b b, elementwise from float64 tensors of
    |a|^2, |b|^2 and a.b: mergekit's nuslerp, its norms clamped to 1e-7, linear where
    1 - cos^2 <= 1e-16."""
    norm = aa.clamp_min(0).sqrt().clamp_min(1e-7) * bb.clamp_min(0).sqrt().clamp_min(1e-7)
    cos = (ab / norm).clamp(-1.0, 1.0)
    colinear = (1 - cos.square()) <= 1e-16
    theta = torch.arccos(torch.where(colinear, 0.0, cos))
    sin = torch.where(colinear, 1.0, torch.sin(theta))
    s_a = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / sin)
    s_b = torch.where(colinear, t, torch.sin(t * theta) / sin)
    return s_a, s_b


def _nuslerp_cascade(g: Tensor, weight: list[float]) -> Tensor:
    """Coefficients c (float64, n x ...) with the pairwise NuSLERP of n vectors (the first with
    the second, the result with the third, ...) = sum_k c_k v_k, from their Gram matrix g
    (n x n x ...: one per vector of a tensor's set of vectors)."""
    coef = torch.zeros(g.shape[1:], dtype=torch.float64)
    coef[0], acc_w = 1.0, weight[0]
    for k, w in enumerate(weight[1:], start=1):
        gc = (g * coef).sum(1)  # g @ coef, per vector
        s_a, s_b = _nuslerp_coefficients(_pairwise_t(acc_w, w), (coef * gc).sum(0), g[k, k], gc[k])
        coef = coef * s_a
        coef[k] += s_b
        acc_w += w
    return coef


def _columnwise(
    models: list[Tensor | Blocked], base: Tensor | Blocked | None, weight: list[float],
    out_dtype: torch.dtype,
) -> Tensor | Blocked:  # fmt: skip
    """Row-wise NuSLERP (each column a vector): the columns' Gram matrices summed in float64
    over chunks of whole rows (a first pass), then each chunk of rows combined with its
    columns' coefficients in float32. The chunks are the same on every device and, of
    `Blocked` inputs, lie inside the blocks, so blocks and whole give the same bits."""
    shape, device, n = models[0].shape, models[0].device, len(models)
    width = math.prod(shape[1:])
    parts = spans(math.prod(shape), torch.device("cpu"), width)
    vectors = [chunks(m, base) for m in models]
    g = torch.zeros(n, n, width, dtype=torch.float64)
    for p in parts:
        x = torch.stack([v(p) for v in vectors]).view(n, -1, width).double()
        for i in range(n):
            for j in range(i, n):
                g[i, j] += (x[i] * x[j]).sum(0).cpu()
                g[j, i] = g[i, j]
    coef = _nuslerp_cascade(g, weight).float().to(device)
    at = None if base is None else flat(base)

    def compute(p: slice) -> Tensor:
        if at is None:
            acc = torch.zeros(p.stop - p.start, device=device)
        else:
            acc = at[p].to(torch.float32, copy=True)  # not a view: added to below
        acc = acc.view(-1, width)
        for c, v in zip(coef, vectors, strict=True):
            acc += c * v(p).view(-1, width)
        return acc.view(-1)

    return chunk_by_chunk(models[0], parts, compute, out_dtype)


@register("multislerp", uses_base=True, raw_inputs=True, streams=entries)
def multislerp(
    base: Tensor | None,
    models: list[Tensor],
    *,
    weight: list[float],
    normalize_weights: bool = True,
    eps: float = 1e-8,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Barycentric interpolation on the hypersphere of the models (of their task vectors when a
    base is given): their weighted mean direction, moved along the tangent space, scaled by
    the weighted mean norm  (Goddard 2024; mergekit's multislerp)."""
    if len(models) == 1:
        return combination([1.0], models, None, out_dtype)
    g = gram(models, base).numpy()
    w = np.asarray(weight, np.float64)
    if normalize_weights:
        w = w / w.sum()
    norms = np.sqrt(np.clip(np.diag(g), 0, None))
    inv = 1 / (norms + eps)  # unit_i = inv_i x_i
    mean = w * inv  # coefficients of sum_i w_i unit_i
    mean_norm = math.sqrt(max(float(mean @ g @ mean), 0.0))
    if mean_norm < eps:
        if len(models) == 2:  # opposite directions: linear interpolation instead
            return combination(w.tolist(), models, base, out_dtype)
        raise ConfigError(
            "multislerp: the weighted mean of the models' directions is zero (antipodal "
            "models with balancing weights); use other weights"
        )
    mean = mean / mean_norm
    dots = inv * (g @ mean)  # unit_i . mean
    tangent = w * inv - (w * dots).sum() * mean  # sum_i w_i (unit_i - dot_i mean)
    step = math.sqrt(max(float(tangent @ g @ tangent), 0.0)) + eps
    result = mean * math.cos(step) + tangent * (math.sin(step) / step)
    return combination((result * float((norms * w).sum())).tolist(), models, base, out_dtype)


@register("karcher", raw_inputs=True, streams=entries)
def karcher(
    base: Tensor | None,
    models: list[Tensor],
    *,
    max_iter: int = 10,
    tol: float = 1e-5,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Riemannian (Karcher) mean of the models' directions on the unit sphere, equal weights,
    scaled by the mean norm; the base, when given, is one of the models  (Karcher 1977;
    mergekit's karcher)."""
    n = len(models)
    if n == 1:
        return combination([1.0], models, None, out_dtype)
    g = gram(models)
    norms = g.diagonal().clamp_min(0).sqrt()
    live = norms > tol
    if not live.any():
        return combination([0.0] * n, models, None, out_dtype)  # zeros
    # the mean stays in the span of the unit directions: iterate on coefficients x = U c
    g_units = g[live][:, live] / torch.outer(norms[live], norms[live])
    wu = torch.full((int(live.sum()),), 1.0 / int(live.sum()), dtype=torch.float64)

    def norm(c: Tensor) -> float:
        return math.sqrt(max(float(c @ g_units @ c), 0.0))

    first = torch.zeros_like(wu)
    first[0] = 1.0
    c = first if norm(wu) < tol else wu / norm(wu)
    for _ in range(max_iter):
        cos = (g_units @ c).clamp(-1.0, 1.0)
        tangent = torch.zeros_like(c)
        for i, (wi, cos_i) in enumerate(zip(wu, cos, strict=True)):
            theta = math.acos(float(cos_i))
            if theta >= tol:
                direction = -cos_i * c
                direction[i] += 1.0  # u_i - cos_i x
                tangent += wi * direction * (theta / math.sin(theta))
        step = norm(tangent)
        if step < tol:
            break
        c = math.cos(step) * c + math.sin(step) * tangent / step
        if norm(c) > tol:
            c = c / norm(c)
    scale = float(norms.sum()) / n
    coef = torch.zeros(n, dtype=torch.float64)
    coef[live] = c * scale / norms[live]
    return combination(coef.tolist(), models, None, out_dtype)


def _filter_wise(params: dict, shape: tuple[int, ...]) -> bool:
    return params["filter_wise"] and len(shape) > 1


@register(
    "model_stock",
    raw_inputs=True,
    min_models=2,
    rows=_filter_wise,
    streams=lambda params, shape: None if _filter_wise(params, shape) else 1,
)
def model_stock(
    base: Tensor,
    models: list[Tensor],
    *,
    filter_wise: bool = False,
    clamp_cosine: bool = False,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """base + t (mean of models - base), t = n cos / (1 + (n - 1) cos) from the mean pairwise
    cosine of the task vectors (t = 0 where the denominator is below 1e-6; `clamp_cosine`
    keeps cos in [0, 1])  (Jang et al. 2024)."""
    n = len(models)

    def ratio(cos):
        if clamp_cosine:
            cos = cos.clamp(0.0, 1.0)
        denominator = 1 + (n - 1) * cos
        singular = denominator.abs() < 1e-6
        return torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, denominator))

    if not _filter_wise({"filter_wise": filter_wise}, base.shape):  # one ratio: streamed
        g = gram(models, base)
        norms = g.diagonal().clamp_min(0).sqrt()
        pairs = [
            (g[i, j] / (norms[i] * norms[j]).clamp_min(1e-6)).clamp(-1.0, 1.0)
            for i in range(n)
            for j in range(i + 1, n)
        ]
        t = float(ratio(torch.stack(pairs).mean()))
        return combination([t / n] * n, models, base, out_dtype)
    base = base.float()
    deltas = [m.float() - base for m in models]

    def cosine(a, b):
        norms = a.norm(dim=1, keepdim=True) * b.norm(dim=1, keepdim=True)
        return ((a * b).sum(1, keepdim=True) / norms.clamp_min(1e-6)).clamp(-1.0, 1.0)

    pairs = [cosine(deltas[i], deltas[j]) for i in range(n) for j in range(i + 1, n)]
    t = ratio(torch.stack(pairs).mean(0))
    return t * (sum(m.float() for m in models) / n) + (1 - t) * base
