"""Merges on the sphere: SLERP, NuSLERP, Karcher mean, and Model Stock (angle-derived ratio).

Tensors are treated as flat vectors (NuSLERP can work row by row). Interpolation angles come from
the normalised vectors; the interpolation itself combines the original vectors, so magnitudes
are kept (as in mergekit). Nearly parallel vectors fall back to linear interpolation, where the
spherical formula divides by sin(angle) ~ 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from medmerge.errors import ConfigError
from medmerge.methods import register

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


@register("slerp", needs_base=False, min_models=2, max_models=2)
def slerp(base: Tensor | None, models: list[Tensor], *, t: float = 0.5) -> Tensor:
    """Spherical interpolation of two models, t=0 the first (the base, if it is one of them)
    (Shoemake 1985; mergekit)."""
    return slerp_vectors(t, models[0], models[1])


@register("nuslerp", needs_base=False, uses_base=True, per_model=("weight",), min_models=2)
def nuslerp(
    base: Tensor | None,
    models: list[Tensor],
    *,
    weight: list[float],
    nuslerp_flatten: bool = True,
    nuslerp_row_wise: bool = False,
) -> Tensor:
    """Weighted SLERP of n models, or of their task vectors when a base is given; for n > 2,
    pairwise in model order with t = w_k / (w_1 + ... + w_k)  (mergekit's nuslerp)."""
    total = sum(weight)
    if total <= 0 or any(w < 0 for w in weight):
        raise ConfigError(f"nuslerp weights must be non-negative with a positive sum: {weight}")
    vectors = [m - base for m in models] if base is not None else models
    dim = None if nuslerp_flatten else (1 if nuslerp_row_wise else 0)
    if dim is not None and vectors[0].dim() < 2:
        dim = None
    acc, acc_w = vectors[0], weight[0]
    for v, w in zip(vectors[1:], weight[1:], strict=True):
        if acc_w + w > 0:
            acc = slerp_vectors(w / (acc_w + w), acc, v, dim)
        acc_w += w
    return acc + base if base is not None else acc


@register("karcher", needs_base=False, per_model=("weight",), min_models=1)
def karcher(
    base: Tensor | None,
    models: list[Tensor],
    *,
    weight: list[float] = 1.0,
    max_iter: int = 10,
    tol: float = 1e-5,
) -> Tensor:
    """Weighted Riemannian (Karcher) mean of the models' directions on the unit sphere, scaled
    by the weighted mean norm  (Karcher 1977; mergekit's karcher)."""
    w = torch.tensor(weight, dtype=torch.float64)
    if w.sum() <= 0 or (w < 0).any():
        raise ConfigError(f"karcher weights must be non-negative with a positive sum: {weight}")
    w = w / w.sum()
    flat = [m.reshape(-1).double() for m in models]
    norms = torch.stack([f.norm() for f in flat])
    live = norms > EPS
    if not live.any():
        return torch.zeros_like(models[0])
    units = [f / n for f, n, ok in zip(flat, norms, live, strict=True) if ok]
    wu = w[live] / w[live].sum()
    x = sum(wi * u for wi, u in zip(wu, units, strict=True))
    x = x / x.norm().clamp_min(EPS)
    for _ in range(max_iter):
        tangent = torch.zeros_like(x)
        for wi, u in zip(wu, units, strict=True):
            cos = torch.dot(x, u).clamp(-1.0, 1.0)
            theta = torch.arccos(cos)
            if theta > EPS:
                tangent += wi * (u - cos * x) * (theta / torch.sin(theta))
        step = tangent.norm()
        if step < tol:
            break
        x = torch.cos(step) * x + torch.sin(step) * tangent / step
        x = x / x.norm()
    scale = (w * norms).sum()
    return (x * scale).reshape(models[0].shape).to(models[0].dtype)


@register("model_stock", needs_base=True, min_models=2)
def model_stock(base: Tensor, models: list[Tensor], *, filter_wise: bool = False) -> Tensor:
    """base + t (mean of models - base), t = n cos / (1 + (n - 1) cos) from the mean pairwise
    cosine of the task vectors, clamped to [0, 1]  (Jang et al. 2024)."""
    n = len(models)
    deltas = [m - base for m in models]
    dim = 1 if (filter_wise and base.dim() > 1) else None

    def cosine(a, b):
        if dim is None:
            return (a * b).sum() / (a.norm() * b.norm()).clamp_min(EPS)
        return (a * b).sum(dim, keepdim=True) / (
            a.norm(dim=dim, keepdim=True) * b.norm(dim=dim, keepdim=True)
        ).clamp_min(EPS)

    pairs = [cosine(deltas[i], deltas[j]) for i in range(n) for j in range(i + 1, n)]
    # task vectors pointing apart share nothing to average: t = 0 keeps the base there
    cos = (sum(pairs) / len(pairs)).clamp(0.0, 1.0)
    t = n * cos / (1 + (n - 1) * cos)
    mean = sum(models) / n
    return t * mean + (1 - t) * base
