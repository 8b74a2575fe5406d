"""Sparsify -> weight -> sign consensus -> normalise: TIES, DARE, DELLA, Breadcrumbs, SCE.

Each method is one pipeline with its variants as options:
1. sparsify every task vector d_i = theta_i - b (top-k by magnitude, random drop,
   magnitude-ranked random drop, outlier-and-small removal), rescaling survivors;
2. combine: a weighted sum, or TIES' sign election and disjoint mean;
3. b + lambda * combined delta.

The methods stream: inputs arrive in their stored dtype, and every step runs over cache-sized
chunks (`spans`), converting to float32 chunk by chunk and writing the output dtype directly, so
no full-size float32 copy of a tensor is ever made. What needs the whole tensor (a top-k
threshold, an L1 norm) is a statistic gathered in a pass over the chunks before the output pass.

Top-k selection never sorts: `top_k` finds the exact k-th largest value with a two-level radix
histogram over the float bit patterns (non-negative floats order like their bits), 16 bits per
level, one pass each. Ties at the threshold are broken by position (earliest kept), so masks are
exact and deterministic.

Random masks come from `medmerge.methods.rng.uniform` with the per-(seed, tensor, model) key the
engine passes: the draw of an entry depends only on the key and its position.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from medmerge import buffers
from medmerge.errors import ConfigError
from medmerge.methods import kernels, register, spans
from medmerge.methods.rng import key_words, uniform

Rescale = Literal["inverse_density", "l1", "none"]
Chunks = Callable[[slice], Tensor]  # flat positions -> float32 values there
Sparsifier = Callable[[Tensor, slice], Tensor]  # (task-vector chunk, its positions) -> sparsified


# ---- selection ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TopK:
    """The k largest of non-negative values: those above `value`, and the first `ties` (in flat
    order) of those equal to it."""

    value: float
    ties: int


def _bucket(counts: Tensor, k: int) -> tuple[int, int]:
    """The highest bucket with at least k entries at or above it, and the count above it."""
    at_or_above = counts.flip(0).cumsum(0).flip(0)
    bucket = int(torch.nonzero(at_or_above >= k).max())
    above = int(at_or_above[bucket + 1]) if bucket + 1 < len(counts) else 0
    return bucket, above


def top_k(values: Chunks, parts: list[slice], k: int) -> TopK:
    """The exact top-k of non-negative float32 values, in two histogram passes over the chunks."""
    n = parts[-1].stop
    if k <= 0:
        return TopK(math.inf, 0)
    if k >= n:
        return TopK(-1.0, 0)
    high = sum(torch.bincount(values(p).view(torch.int32) >> 16, minlength=1 << 15) for p in parts)
    bucket, above = _bucket(high, k)
    low = 0
    for p in parts:
        bits = values(p).view(torch.int32)
        low = low + torch.bincount(bits[(bits >> 16) == bucket] & 0xFFFF, minlength=1 << 16)
    sub, greater = _bucket(low, k - above)
    (value,) = struct.unpack("<f", struct.pack("<i", bucket << 16 | sub))
    return TopK(value, k - above - greater)


class Selector:
    """Applies a TopK to consecutive chunks, in order (it counts the ties already kept)."""

    def __init__(self, top: TopK):
        self.value, self.ties = top.value, top.ties

    def __call__(self, values: Tensor) -> Tensor:
        mask = values > self.value
        if self.ties:
            at = torch.nonzero(values == self.value).squeeze(1)[: self.ties]
            mask[at] = True
            self.ties -= len(at)
        return mask


def top_k_mask(magnitude: Tensor, k: int) -> Tensor:
    """Mask of exactly k largest entries; ties at the threshold go to the earliest positions."""
    flat = magnitude.reshape(-1).float().contiguous()
    parts = spans(flat.numel(), flat.device)
    select = Selector(top_k(lambda p: flat[p], parts, k))
    return torch.cat([select(flat[p]) for p in parts]).reshape(magnitude.shape)


def _count(fraction: float, n: int, what: str) -> int:
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"{what} must be between 0 and 1, got {fraction}")
    return round(fraction * n)


# ---- sparsifiers: built from a task vector's chunks, applied chunk by chunk in order ----------


def dropped(keep: Tensor, kept: Tensor, d: Tensor) -> Tensor:
    """`kept` where `keep`, elsewhere 0, or NaN where the task vector d is NaN or inf: a
    non-finite input entry reaches the output even where it is dropped, and the engine's check
    of the output names the damaged input (so the inputs need no pass of their own)."""
    return torch.where(keep, kept, d - d)


def trim(task: Chunks, parts: list[slice], density: float) -> Sparsifier:
    """Keep the top `density` fraction of entries by |d| (TIES' trim)."""
    k = _count(density, parts[-1].stop, "density")
    select = Selector(top_k(lambda p: task(p).abs(), parts, k))
    return lambda d, p: dropped(select(d.abs()), d, d)


def crumbs(task: Chunks, parts: list[slice], density: float, gamma: float) -> Sparsifier:
    """Drop the `gamma` fraction of largest |d| (outliers), keep the next `density` fraction."""
    n = parts[-1].stop
    outliers = _count(gamma, n, "gamma")
    kept = min(_count(density, n, "density"), n - outliers)
    magnitude_ = lambda p: task(p).abs()  # noqa: E731
    upper = Selector(top_k(magnitude_, parts, outliers))
    lower = Selector(top_k(magnitude_, parts, outliers + kept))

    def apply(d: Tensor, p: slice) -> Tensor:
        a = d.abs()
        return dropped(lower(a) & ~upper(a), d, d)

    return apply


KeepRule = Callable[[Tensor, slice], tuple[Tensor, Tensor | float]]  # -> (mask, keep probability)


def drop(density: float, key: int) -> KeepRule:
    """DARE: keep each entry with probability `density`."""
    return lambda d, p: (uniform(key, p, d.device) < density, density)


def _check_epsilon(density: float, epsilon: float) -> None:
    if epsilon < 0 or density - epsilon < 0 or density + epsilon > 1:
        raise ConfigError(
            f"della needs 0 <= density - epsilon and density + epsilon <= 1 "
            f"(density={density}, epsilon={epsilon})"
        )


def magprune(density: float, epsilon: float, key: int, row: int) -> KeepRule:
    """DELLA's MagPrune: per row of `row` entries, keep probability rises linearly with the |d|
    rank, p = density - epsilon + 2 epsilon * rank / (row - 1), so large entries survive more.
    Equal |d| share their average rank: the probability depends on the magnitude alone."""
    _check_epsilon(density, epsilon)

    def rule(d: Tensor, p: slice) -> tuple[Tensor, Tensor]:
        magnitude = d.view(-1, row).abs()
        ordered = magnitude.sort(dim=1).values
        below = torch.searchsorted(ordered, magnitude)
        through = torch.searchsorted(ordered, magnitude, right=True)
        rank = (below + through - 1).float() * 0.5  # the average of ranks below..through-1
        prob = (density - epsilon + 2 * epsilon * (rank / max(row - 1, 1))).view(-1)
        return uniform(key, p, d.device) < prob, prob

    return rule


def rescaled(rule: KeepRule, rescale: Rescale, task: Chunks, parts: list[slice]) -> Sparsifier:
    """Entries the rule keeps, rescaled: `inverse_density` divides by the keep probability
    (unbiased: E[kept / p] = d), `l1` matches the L1 norm of the undropped task vector."""
    if rescale == "inverse_density":

        def apply(d: Tensor, p: slice) -> Tensor:
            keep, prob = rule(d, p)
            if isinstance(prob, Tensor):
                prob = prob.clamp_min(1e-12)
            return dropped(keep, d / prob, d)

        return apply
    if rescale not in ("l1", "none"):
        raise ConfigError(f"rescale must be inverse_density, l1 or none, got {rescale!r}")
    factor = 1.0
    if rescale == "l1":  # a first pass over the chunks: the draws are the same in the second
        total = kept = 0.0
        for p in parts:
            d = task(p)
            keep, _ = rule(d, p)
            total += float(d.abs().sum(dtype=torch.float64))
            kept += float(torch.where(keep, d.abs(), 0.0).sum(dtype=torch.float64))
        factor = total / kept if kept > 0 else 1.0
    return lambda d, p: dropped(rule(d, p)[0], d * factor, d)


def _whole(d: Tensor, make: Callable[[Chunks, list[slice]], Sparsifier], row: int = 1) -> Tensor:
    """A sparsifier applied to a whole tensor (the building blocks, used alone)."""
    flat = d.reshape(-1).float()
    parts = spans(flat.numel(), flat.device, row)
    apply = make(lambda p: flat[p], parts)
    return torch.cat([apply(flat[p], p) for p in parts]).reshape(d.shape)


def magnitude(d: Tensor, density: float) -> Tensor:
    """TIES' trim of a whole tensor."""
    return _whole(d, lambda task, parts: trim(task, parts, density))


def breadcrumbs(d: Tensor, density: float, gamma: float) -> Tensor:
    """Breadcrumbs' outlier-and-small removal of a whole tensor."""
    return _whole(d, lambda task, parts: crumbs(task, parts, density, gamma))


def random_drop(d: Tensor, density: float, key: int, rescale: Rescale) -> Tensor:
    """DARE's random drop of a whole tensor, with rescaling."""
    _count(density, d.numel(), "density")
    return _whole(d, lambda task, parts: rescaled(drop(density, key), rescale, task, parts))


def _row(shape: torch.Size) -> int:
    """DELLA ranks within output rows: entries per row (a 1-d tensor is one row)."""
    n = math.prod(shape)
    return n // shape[0] if len(shape) > 1 and shape[0] else max(n, 1)


def della_prune(d: Tensor, density: float, epsilon: float, key: int, rescale: Rescale) -> Tensor:
    """DELLA's MagPrune of a whole tensor, with rescaling."""
    _count(density, d.numel(), "density")
    row = _row(d.shape)
    rule = magprune(density, epsilon, key, row)
    return _whole(d, lambda task, parts: rescaled(rule, rescale, task, parts), row)


# ---- combination ---------------------------------------------------------------------------


def combine(ds: list[Tensor], w: list[float], sign_consensus: bool, normalize: bool) -> Tensor:
    """Weighted sum of (sparsified) task-vector chunks, or TIES' disjoint mean over the entries
    agreeing with the elected sign; `normalize` divides by the sum of the weights that
    contributed to each entry."""
    merged = torch.zeros_like(ds[0])
    for wi, d in zip(w, ds, strict=True):
        merged.add_(d, alpha=wi)
    if sign_consensus:
        elected = torch.sign(merged)
        merged.zero_()
        weight_sum = torch.zeros_like(merged)
        for wi, d in zip(w, ds, strict=True):
            # where elected is 0, an agreeing d is 0 too: it adds nothing to `merged`
            agree = torch.sign(d) == elected
            merged.add_(dropped(agree, d, d), alpha=wi)
            weight_sum.add_(agree.to(merged.dtype), alpha=wi)
    else:
        weight_sum = torch.full_like(merged, sum(w))
    if normalize:
        merged.div_(torch.where(weight_sum.abs() > 1e-12, weight_sum, 1.0))
    return merged


@dataclass(frozen=True)
class Sparsify:
    """How one model's task vector is sparsified: `trim` (top density by |d|), `crumbs`
    (drop the gamma largest, keep the next density), `drop` (DARE) or `magprune` (DELLA), the
    last two with a random `key` and a `rescale`."""

    rule: Literal["trim", "crumbs", "drop", "magprune"]
    density: float
    gamma: float = 0.0
    epsilon: float = 0.0
    key: int = 0
    rescale: Rescale = "none"

    def check(self, n: int) -> None:
        _count(self.density, n, "density")
        _count(self.gamma, n, "gamma")
        if self.rule == "magprune":
            _check_epsilon(self.density, self.epsilon)
        if self.rescale not in ("inverse_density", "l1", "none"):
            raise ConfigError(f"rescale must be inverse_density, l1 or none, got {self.rescale!r}")

    def sparsifier(self, task: Chunks, parts: list[slice], row: int) -> Sparsifier:
        """The torch implementation, applied chunk by chunk."""
        if self.rule == "trim":
            return trim(task, parts, self.density)
        if self.rule == "crumbs":
            return crumbs(task, parts, self.density, self.gamma)
        if self.rule == "drop":
            rule = drop(self.density, self.key)
        else:
            rule = magprune(self.density, self.epsilon, self.key, row)
        return rescaled(rule, self.rescale, task, parts)


def sparse_merge(
    base: Tensor,
    models: list[Tensor],
    weight: list[float],
    specs: list[Sparsify],
    *,
    sign_consensus: bool,
    normalize: bool,
    lambda_: float,
    out_dtype: torch.dtype,
    row: int = 1,
) -> Tensor:
    """b + lambda * combine(sparsified task vectors): the CPU kernels where they apply,
    else torch streamed over chunks of whole rows (`row` entries: DELLA ranks within rows)."""
    for spec in specs:
        spec.check(base.numel())
    w = [float(x) for x in weight]
    if kernels.usable(base, *models, out_dtype=out_dtype):
        return _kernel_merge(
            base, models, w, specs, sign_consensus, normalize, lambda_, out_dtype, row
        )
    flat_base = base.reshape(-1)
    flats = [m.reshape(-1) for m in models]
    parts = spans(flat_base.numel(), base.device, row)

    def task(flat: Tensor) -> Chunks:
        return lambda p: flat[p].float() - flat_base[p].float()

    sparsify = [spec.sparsifier(task(f), parts, row) for spec, f in zip(specs, flats, strict=True)]
    out = buffers.empty(flat_base.numel(), out_dtype, base.device)
    for p in parts:
        b = flat_base[p].float()
        ds = [s(f[p].float() - b, p) for s, f in zip(sparsify, flats, strict=True)]
        out[p] = b + lambda_ * combine(ds, w, sign_consensus, normalize)
    return out.view(base.shape)


def _kernel_params(models: int, weight: list[float], **given) -> dict:
    """Parameters of `kernels.merge`: keep everything, no draws, unless `given` says."""
    f32 = np.float32
    params = dict(
        keep_value=np.full(models, -1.0, f32),
        keep_cut=np.zeros(models, np.int64),
        drop_value=np.full(models, np.inf, f32),
        drop_cut=np.zeros(models, np.int64),
        draw_rule=np.zeros(models, np.int64),
        density=np.zeros(models, f32),
        low=np.zeros(models, f32),
        span=np.zeros(models, f32),
        first=np.zeros(models, np.uint32),
        second=np.zeros(models, np.uint32),
        divide=np.zeros(models, np.bool_),
        factor=np.ones(models, f32),
        weight=np.array(weight, f32),
        sign_consensus=False,
        normalize=False,
        weight_total=f32(sum(weight)),
        lam=f32(1.0),
        select_variance=False,
        square=False,
    )
    params.update(given)
    return params


def _kernel_merge(base, models, w, specs, sign_consensus, normalize, lambda_, out_dtype, row):
    n = base.numel()
    params = _kernel_params(
        len(models),
        w,
        sign_consensus=sign_consensus,
        normalize=normalize,
        lam=np.float32(lambda_),
    )
    l1 = []
    for i, spec in enumerate(specs):
        if spec.rule in ("trim", "crumbs"):
            outliers = _count(spec.gamma, n, "gamma") if spec.rule == "crumbs" else 0
            kept = min(_count(spec.density, n, "density"), n - outliers)
            (top, cut), (upper, upper_cut) = kernels.top_ks(
                0, base, models, i, [outliers + kept, outliers]
            )
            params["keep_value"][i], params["keep_cut"][i] = top, cut
            if spec.rule == "crumbs":
                params["drop_value"][i], params["drop_cut"][i] = upper, upper_cut
            continue
        params["first"][i], params["second"][i] = key_words(spec.key)
        if spec.rule == "drop":
            params["draw_rule"][i], params["density"][i] = 1, spec.density
        else:
            params["draw_rule"][i] = 2
            params["low"][i] = spec.density - spec.epsilon
            params["span"][i] = 2 * spec.epsilon
        params["divide"][i] = spec.rescale == "inverse_density"
        if spec.rescale == "l1":
            l1.append(i)
    if l1:  # a first pass: the L1 norms of each task vector before and after dropping
        sums = kernels.merge(base, models, None, row, params)
        for i in l1:
            total, kept = sums[i]
            params["factor"][i] = total / kept if kept > 0 else 1.0
    out = buffers.empty(base.shape, out_dtype)
    kernels.merge(base, models, out, row, params)
    return out


# ---- the methods ---------------------------------------------------------------------------

# every method here spreads non-finite inputs to the output (`dropped`)
SPARSE = dict(
    needs_base=True, raw_inputs=True, spreads_nonfinite=True, per_model=("weight", "density")
)


@register("ties", **SPARSE)
def ties(
    base: Tensor,
    models: list[Tensor],
    *,
    weight: list[float],
    density: list[float] = 1.0,
    normalize: bool = True,
    lambda_: float = 1.0,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Trim to top-density by magnitude, elect signs, disjoint mean  (Yadav et al. 2023)."""
    return sparse_merge(
        base,
        models,
        weight,
        [Sparsify("trim", k) for k in density],
        sign_consensus=True,
        normalize=normalize,
        lambda_=lambda_,
        out_dtype=out_dtype,
    )


def _dare(base, models, weight, density, keys, rescale, **kw):
    specs = [Sparsify("drop", k, key=key, rescale=rescale) for k, key in zip(density, keys)]
    return sparse_merge(base, models, weight, specs, **kw)


@register("dare_ties", **SPARSE)
def dare_ties(
    base: Tensor,
    models: list[Tensor],
    *,
    weight: list[float],
    density: list[float],
    rescale: Rescale = "inverse_density",
    normalize: bool = True,
    lambda_: float = 1.0,
    keys: list[int],
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Random drop with rescale, then TIES sign consensus  (Yu et al. 2024)."""
    return _dare(
        base,
        models,
        weight,
        density,
        keys,
        rescale,
        sign_consensus=True,
        normalize=normalize,
        lambda_=lambda_,
        out_dtype=out_dtype,
    )


@register("dare_linear", **SPARSE)
def dare_linear(
    base: Tensor,
    models: list[Tensor],
    *,
    weight: list[float],
    density: list[float],
    rescale: Rescale = "inverse_density",
    normalize: bool = False,
    lambda_: float = 1.0,
    keys: list[int],
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Random drop with rescale, then a weighted sum of task vectors  (Yu et al. 2024)."""
    return _dare(
        base,
        models,
        weight,
        density,
        keys,
        rescale,
        sign_consensus=False,
        normalize=normalize,
        lambda_=lambda_,
        out_dtype=out_dtype,
    )


def _della(base, models, weight, density, epsilon, keys, rescale, **kw):
    specs = [
        Sparsify("magprune", k, epsilon=epsilon, key=key, rescale=rescale)
        for k, key in zip(density, keys, strict=True)
    ]
    return sparse_merge(base, models, weight, specs, row=_row(base.shape), **kw)


@register("della", **SPARSE)
def della(
    base: Tensor,
    models: list[Tensor],
    *,
    weight: list[float],
    density: list[float],
    epsilon: float = 0.05,
    rescale: Rescale = "inverse_density",
    normalize: bool = True,
    lambda_: float = 1.0,
    keys: list[int],
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """MagPrune, then sign election and fusion, scaled by lambda  (Deep et al. 2024)."""
    return _della(
        base,
        models,
        weight,
        density,
        epsilon,
        keys,
        rescale,
        sign_consensus=True,
        normalize=normalize,
        lambda_=lambda_,
        out_dtype=out_dtype,
    )


@register("della_linear", **SPARSE)
def della_linear(
    base: Tensor,
    models: list[Tensor],
    *,
    weight: list[float],
    density: list[float],
    epsilon: float = 0.05,
    rescale: Rescale = "inverse_density",
    normalize: bool = False,
    lambda_: float = 1.0,
    keys: list[int],
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """MagPrune, then a weighted sum of task vectors, scaled by lambda  (Deep et al. 2024)."""
    return _della(
        base,
        models,
        weight,
        density,
        epsilon,
        keys,
        rescale,
        sign_consensus=False,
        normalize=normalize,
        lambda_=lambda_,
        out_dtype=out_dtype,
    )


def _breadcrumbs(base, models, weight, density, gamma, **kw):
    specs = [Sparsify("crumbs", k, gamma=g) for k, g in zip(density, gamma, strict=True)]
    return sparse_merge(base, models, weight, specs, **kw)


BREADCRUMBS = dict(SPARSE, per_model=("weight", "density", "gamma"))


@register("breadcrumbs", **BREADCRUMBS)
def breadcrumbs_linear(
    base: Tensor,
    models: list[Tensor],
    *,
    weight: list[float],
    density: list[float],
    gamma: list[float] = 0.01,
    normalize: bool = False,
    lambda_: float = 1.0,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Drop the gamma outliers and the smallest, keep density; weighted sum  (Davari 2023)."""
    return _breadcrumbs(
        base,
        models,
        weight,
        density,
        gamma,
        sign_consensus=False,
        normalize=normalize,
        lambda_=lambda_,
        out_dtype=out_dtype,
    )


@register("breadcrumbs_ties", **BREADCRUMBS)
def breadcrumbs_ties(
    base: Tensor,
    models: list[Tensor],
    *,
    weight: list[float],
    density: list[float],
    gamma: list[float] = 0.01,
    normalize: bool = True,
    lambda_: float = 1.0,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Drop the gamma outliers and the smallest, keep density; TIES consensus  (Davari 2023)."""
    return _breadcrumbs(
        base,
        models,
        weight,
        density,
        gamma,
        sign_consensus=True,
        normalize=normalize,
        lambda_=lambda_,
        out_dtype=out_dtype,
    )


@register("sce", **dict(SPARSE, per_model=()))
def sce(
    base: Tensor,
    models: list[Tensor],
    *,
    select_topk: float = 1.0,
    lambda_: float = 1.0,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Select high-variance entries, Calculate weights from squared deltas, Erase sign
    conflicts  (Wan et al. 2024, FuseChat)."""
    n = base.numel()
    flat_base = base.reshape(-1)
    flats = [m.reshape(-1) for m in models]
    parts = spans(n, base.device)

    def deltas(p: slice) -> list[Tensor]:
        b = flat_base[p].float()
        return [f[p].float() - b for f in flats]

    def variance(ds: list[Tensor]) -> Tensor:  # elementwise: 27x faster than stack().var(0)
        mean = sum(ds) / len(ds)
        # abs: the NaN of a non-finite input may come with its sign bit set, which `top_k`'s
        # bit patterns of non-negative floats cannot hold (it changes no other value)
        return (sum((d - mean).square_() for d in ds) / len(ds)).abs_()

    k = _count(select_topk, n, "select_topk") if len(models) > 1 else n
    if kernels.usable(base, *models, out_dtype=out_dtype):
        params = _kernel_params(len(models), [0.0] * len(models), select_variance=True)
        if 0 < k < n:  # Select and Calculate in one pass
            top, energy = kernels.selection_energy(base, models, k)
            params["keep_value"][:], params["keep_cut"][:] = top
        else:
            params["keep_value"][:], params["keep_cut"][:] = kernels.top_ks(
                1, base, models, 0, [k]
            )[0]
            energy = kernels.merge(base, models, None, 1, dict(params, square=True))[:, 1]
        params.update(weight=np.array(_energy_weights(energy), np.float32), lam=np.float32(lambda_))
        out = buffers.empty(base.shape, out_dtype)
        kernels.merge(base, models, out, 1, dict(params, sign_consensus=True, normalize=True))
        return out
    top = top_k(lambda p: variance(deltas(p)), parts, k)

    def selected(select: Selector, p: slice) -> list[Tensor]:
        ds = deltas(p)
        if k == n:
            return ds
        keep = select(variance(ds))
        return [dropped(keep, d, d) for d in ds]

    energy = torch.zeros(len(models), dtype=torch.float64)
    select = Selector(top)
    for p in parts:  # the Calculate pass: mean squared selected task vector per model
        energy += torch.tensor(
            [float(d.square().sum(dtype=torch.float64)) for d in selected(select, p)],
            dtype=torch.float64,
        )
    weight = _energy_weights(energy.numpy())
    out = buffers.empty(n, out_dtype, base.device)
    select = Selector(top)
    for p in parts:
        merged = combine(selected(select, p), weight, sign_consensus=True, normalize=True)
        out[p] = flat_base[p].float() + lambda_ * merged
    return out.view(base.shape)


def _energy_weights(energy: np.ndarray) -> list[float]:
    """SCE's Calculate step: weights proportional to each model's selected squared deltas."""
    total = float(energy.sum())
    return (energy / total).tolist() if total > 0 else [1 / len(energy)] * len(energy)
