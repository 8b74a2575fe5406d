"""Merges on the sphere: SLERP, NuSLERP, Karcher mean, and Model Stock (angle-derived ratio).

Tensors are treated as flat vectors (NuSLERP can work row by row). Interpolation angles come from
the normalised vectors; the interpolation itself combines the original vectors, so magnitudes
are kept (as in mergekit). Nearly parallel vectors fall back to linear interpolation, where the
spherical formula divides by sin(angle) ~ 0.

Every result on flat vectors is a linear combination of the inputs whose coefficients depend only
on their inner products. So these methods stream in two passes over cache-sized chunks: the Gram
matrix of the inputs (float64), then the coefficients applied chunk by chunk, written in the
output dtype. Karcher's iterations run on the coefficients (an n x n problem), not on the tensor.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from medmerge.errors import ConfigError
from medmerge.methods import kernels
from medmerge.methods.basic import chunks, combination
from medmerge.methods.registry import register
from medmerge.methods.streaming import spans


def gram(models: list[Tensor], base: Tensor | None = None) -> Tensor:
    """Float64 matrix of inner products of the flat models (of their task vectors
    models_i - base when a base is given), streamed chunk by chunk."""
    if kernels.usable(*models, *([base] if base is not None else [])):
        return torch.from_numpy(kernels.gram(base, models))
    g = torch.zeros(len(models), len(models), dtype=torch.float64)
    vectors = [chunks(m, base) for m in models]
    for p in spans(models[0].numel(), models[0].device):
        x = torch.stack([v(p) for v in vectors]).double()
        g += (x @ x.T).cpu()
    return g


def slerp_coefficients(t: float, aa: float, bb: float, ab: float) -> tuple[float, float]:
    """(s_a, s_b) with slerp(a, b) = s_a a + s_b b, from |a|^2, |b|^2 and a.b."""
    norm = max(math.sqrt(max(aa, 0.0)), EPS) * max(math.sqrt(max(bb, 0.0)), EPS)
    cos = min(max(ab / norm, -1.0), 1.0)
    if abs(cos) > COLINEAR:
        return 1.0 - t, t
    theta = math.acos(cos)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


COLINEAR = 0.9995  # |cos| above this: interpolate linearly (the angle is too small to divide by)
EPS = 1e-8


def slerp_vectors(t: float, a: Tensor, b: Tensor, dim: int | None = None) -> Tensor:
    """Spherical interpolation from a (t=0) to b (t=1), over all entries or along `dim`."""

    def unit(x):
        norm = x.norm() if dim is None else x.norm(dim=dim, keepdim=True)
        return x / norm.clamp_min(EPS)

    cos = (unit(a) * unit(b)).sum() if dim is None else (unit(a) * unit(b)).sum(dim, keepdim=True)
    cos = cos.clamp(-1.0, 1.0)
    theta = torch.arccos(cos)
    sin = torch.sin(theta)
    colinear = cos.abs() > COLINEAR
    safe_sin = torch.where(colinear, 1.0, sin)
    s_a = torch.where(colinear, 1.0 - t, torch.sin((1 - t) * theta) / safe_sin)
    s_b = torch.where(colinear, t, torch.sin(t * theta) / safe_sin)
    return s_a * a + s_b * b


@register("slerp", raw_inputs=True, min_models=2, max_models=2)
def slerp(
    base: Tensor | None,
    models: list[Tensor],
    *,
    t: float = 0.5,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Spherical interpolation of two models, t=0 the first (the base, if it is one of them)
    (Shoemake 1985; mergekit)."""
    g = gram(models)
    coef = slerp_coefficients(t, float(g[0, 0]), float(g[1, 1]), float(g[0, 1]))
    return combination(list(coef), models, None, out_dtype)


@register("nuslerp", uses_base=True, raw_inputs=True, min_models=2)
def nuslerp(
    base: Tensor | None,
    models: list[Tensor],
    *,
    weight: list[float],
    nuslerp_flatten: bool = True,
    nuslerp_row_wise: bool = False,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Weighted SLERP of n models, or of their task vectors when a base is given; for n > 2,
    pairwise in model order with t = w_k / (w_1 + ... + w_k)  (mergekit's nuslerp)."""
    total = sum(weight)
    if total <= 0 or any(w < 0 for w in weight):
        raise ConfigError(f"nuslerp weights must be non-negative with a positive sum: {weight}")
    dim = None if nuslerp_flatten else (1 if nuslerp_row_wise else 0)
    if dim is None or models[0].dim() < 2:  # flat: on the Gram matrix, streamed
        g = gram(models, base)
        coef, acc_w = torch.zeros(len(models), dtype=torch.float64), weight[0]
        coef[0] = 1.0
        for k, w in enumerate(weight[1:], start=1):
            if acc_w + w > 0:
                gc = g @ coef
                s_a, s_b = slerp_coefficients(
                    w / (acc_w + w), float(coef @ gc), float(g[k, k]), float(gc[k])
                )
                coef *= s_a
                coef[k] += s_b
            acc_w += w
        return combination(coef.tolist(), models, base, out_dtype)
    vectors = [m.float() for m in models]
    if base is not None:
        base = base.float()
        vectors = [v - base for v in vectors]
    acc, acc_w = vectors[0], weight[0]
    for v, w in zip(vectors[1:], weight[1:], strict=True):
        if acc_w + w > 0:
            acc = slerp_vectors(w / (acc_w + w), acc, v, dim)
        acc_w += w
    return acc + base if base is not None else acc


@register("karcher", raw_inputs=True)
def karcher(
    base: Tensor | None,
    models: list[Tensor],
    *,
    weight: list[float] = 1.0,
    max_iter: int = 10,
    tol: float = 1e-5,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Weighted Riemannian (Karcher) mean of the models' directions on the unit sphere, scaled
    by the weighted mean norm  (Karcher 1977; mergekit's karcher)."""
    w = torch.tensor(weight, dtype=torch.float64)
    if w.sum() <= 0 or (w < 0).any():
        raise ConfigError(f"karcher weights must be non-negative with a positive sum: {weight}")
    w = w / w.sum()
    g = gram(models)
    norms = g.diagonal().clamp_min(0).sqrt()
    live = norms > EPS
    if not live.any():
        return torch.zeros(models[0].shape, dtype=out_dtype, device=models[0].device)
    # the mean stays in the span of the unit directions: iterate on coefficients x = U c
    g_units = g[live][:, live] / torch.outer(norms[live], norms[live])
    wu = w[live] / w[live].sum()

    def norm(c: Tensor) -> float:
        return math.sqrt(max(float(c @ g_units @ c), 0.0))

    c = wu / max(norm(wu), EPS)
    for _ in range(max_iter):
        cos = (g_units @ c).clamp(-1.0, 1.0)
        tangent = torch.zeros_like(c)
        for i, (wi, cos_i) in enumerate(zip(wu, cos, strict=True)):
            theta = math.acos(float(cos_i))
            if theta > EPS:
                direction = -cos_i * c
                direction[i] += 1.0  # u_i - cos_i x
                tangent += wi * direction * (theta / math.sin(theta))
        step = norm(tangent)
        if step < tol:
            break
        c = math.cos(step) * c + math.sin(step) * tangent / step
        c = c / norm(c)
    scale = float((w * norms).sum())
    coef = torch.zeros(len(models), dtype=torch.float64)
    coef[live] = c * scale / norms[live]
    return combination(coef.tolist(), models, None, out_dtype)


@register("model_stock", raw_inputs=True, min_models=2)
def model_stock(
    base: Tensor,
    models: list[Tensor],
    *,
    filter_wise: bool = False,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """base + t (mean of models - base), t = n cos / (1 + (n - 1) cos) from the mean pairwise
    cosine of the task vectors, clamped to [0, 1]  (Jang et al. 2024)."""
    n = len(models)
    if not (filter_wise and base.dim() > 1):  # one ratio per tensor: streamed
        g = gram(models, base)
        norms = g.diagonal().clamp_min(0).sqrt()
        pairs = [
            float(g[i, j] / (norms[i] * norms[j]).clamp_min(EPS))
            for i in range(n)
            for j in range(i + 1, n)
        ]
        # task vectors pointing apart share nothing to average: t = 0 keeps the base there
        cos = min(max(sum(pairs) / len(pairs), 0.0), 1.0)
        t = n * cos / (1 + (n - 1) * cos)
        return combination([t / n] * n, models, base, out_dtype)
    base = base.float()
    deltas = [m.float() - base for m in models]

    def cosine(a, b):
        norms = a.norm(dim=1, keepdim=True) * b.norm(dim=1, keepdim=True)
        return (a * b).sum(1, keepdim=True) / norms.clamp_min(EPS)

    pairs = [cosine(deltas[i], deltas[j]) for i in range(n) for j in range(i + 1, n)]
    cos = (sum(pairs) / len(pairs)).clamp(0.0, 1.0)
    t = n * cos / (1 + (n - 1) * cos)
    return base + t * sum(deltas) / n
