"""The sparsifiers of the sparse family in torch, applied to a task vector chunk by chunk.

Each is built from a task vector's chunks (what needs the whole tensor, a top-k threshold or an
L1 norm, is gathered in a pass over them first) and then applied to consecutive chunks in order,
so no full-size float32 copy of a tensor is made:
- `trim`: the top `density` fraction by |d| (TIES);
- `crumbs`: the `gamma` fraction of largest |d| dropped, the next `density` kept (Breadcrumbs);
- `drop`: each entry kept with probability `density` (DARE);
- `magprune`: kept with a probability that rises with the |d| rank in its row (DELLA);
the random ones with their survivors `rescaled`. `Sparsify` names one of them with its
parameters. The CPU kernels (`kernels.topk`, `kernels.sparse`) compute the same, bit for bit.

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
from enum import Enum
from typing import Literal

import torch
from torch import Tensor

from medmerge.errors import ConfigError
from medmerge.methods.rng import uniform
from medmerge.methods.streaming import spans

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


def entries(fraction: float, n: int, what: str) -> int:
    """How many of n entries a fraction (checked to be in [0, 1]) stands for."""
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
    k = entries(density, parts[-1].stop, "density")
    select = Selector(top_k(lambda p: task(p).abs(), parts, k))
    return lambda d, p: dropped(select(d.abs()), d, d)


def crumbs(task: Chunks, parts: list[slice], density: float, gamma: float) -> Sparsifier:
    """Drop the `gamma` fraction of largest |d| (outliers), keep the next `density` fraction."""
    n = parts[-1].stop
    outliers = entries(gamma, n, "gamma")
    kept = min(entries(density, n, "density"), n - outliers)
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


def check_epsilon(density: float, epsilon: float) -> None:
    if epsilon < 0 or density - epsilon < 0 or density + epsilon > 1:
        raise ConfigError(
            f"della needs 0 <= density - epsilon and density + epsilon <= 1 "
            f"(density={density}, epsilon={epsilon})"
        )


def magprune(density: float, epsilon: float, key: int, row: int) -> KeepRule:
    """DELLA's MagPrune: per row of `row` entries, keep probability rises linearly with the |d|
    rank, p = density - epsilon + 2 epsilon * rank / (row - 1), so large entries survive more.
    Equal |d| share their average rank: the probability depends on the magnitude alone."""
    check_epsilon(density, epsilon)

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
    entries(density, d.numel(), "density")
    return _whole(d, lambda task, parts: rescaled(drop(density, key), rescale, task, parts))


def rows_of(shape: torch.Size) -> int:
    """DELLA ranks within output rows: entries per row (a 1-d tensor is one row)."""
    n = math.prod(shape)
    return n // shape[0] if len(shape) > 1 and shape[0] else max(n, 1)


def della_prune(d: Tensor, density: float, epsilon: float, key: int, rescale: Rescale) -> Tensor:
    """DELLA's MagPrune of a whole tensor, with rescaling."""
    entries(density, d.numel(), "density")
    row = rows_of(d.shape)
    rule = magprune(density, epsilon, key, row)
    return _whole(d, lambda task, parts: rescaled(rule, rescale, task, parts), row)


class Sparsification(Enum):
    """How a task vector is sparsified."""

    TRIM = "trim"  # keep the top `density` by |d| (TIES)
    CRUMBS = "crumbs"  # drop the `gamma` largest |d|, keep the next `density` (Breadcrumbs)
    DROP = "drop"  # keep each entry with probability `density` (DARE)
    MAGPRUNE = "magprune"  # keep by the |d| rank in its row (DELLA)


@dataclass(frozen=True)
class Sparsify:
    """How one model's task vector is sparsified; the random ones draw with `key` and
    rescale their survivors by `rescale`."""

    how: Sparsification
    density: float
    gamma: float = 0.0
    epsilon: float = 0.0
    key: int = 0
    rescale: Rescale = "none"

    def check(self, n: int) -> None:
        entries(self.density, n, "density")
        entries(self.gamma, n, "gamma")
        if self.how is Sparsification.MAGPRUNE:
            check_epsilon(self.density, self.epsilon)
        if self.rescale not in ("inverse_density", "l1", "none"):
            raise ConfigError(f"rescale must be inverse_density, l1 or none, got {self.rescale!r}")

    def sparsifier(self, task: Chunks, parts: list[slice], row: int) -> Sparsifier:
        """The torch implementation, applied chunk by chunk."""
        if self.how is Sparsification.TRIM:
            return trim(task, parts, self.density)
        if self.how is Sparsification.CRUMBS:
            return crumbs(task, parts, self.density, self.gamma)
        if self.how is Sparsification.DROP:
            rule = drop(self.density, self.key)
        else:
            rule = magprune(self.density, self.epsilon, self.key, row)
        return rescaled(rule, self.rescale, task, parts)
