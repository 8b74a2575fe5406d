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


def trim_count(density: float, n: int) -> int:
    """How many entries TIES' trim keeps, as mergekit counts them: all from density 1, none
    at density 0 or below, else int(density * n) but at least one."""
    if density >= 1:
        return n
    if density <= 0 or n == 0:
        return 0
    return max(1, int(density * n))


def crumbs_counts(density: float, gamma: float, n: int) -> tuple[int, int]:
    """(outliers dropped, entries kept) of Breadcrumbs, as mergekit counts them: all kept from
    density 1; else int(density * n) kept, below the int(gamma * n) largest where they leave
    room (fewer outliers where they do not)."""
    if density >= 1:
        return 0, n
    kept = max(0, int(density * n))
    bottom = max(0, n - kept - int(gamma * n))
    return n - bottom - kept, kept


# ---- sparsifiers: built from a task vector's chunks, applied chunk by chunk in order ----------


def dropped(keep: Tensor, kept: Tensor, d: Tensor) -> Tensor:
    """`kept` where `keep`, elsewhere 0, or NaN where the task vector d is NaN or inf: a
    non-finite input entry reaches the output even where it is dropped, and the engine's check
    of the output names the damaged input (so the inputs need no pass of their own)."""
    return torch.where(keep, kept, d - d)


# A rule says which entries of a chunk of a task vector are kept, and their keep probability
# (None for the deterministic rules). Rules that count (top-k) hold state from chunk to chunk,
# so a sparsifier makes a fresh one for every pass over the chunks.
KeepRule = Callable[[Tensor, slice], tuple[Tensor, Tensor | float | None]]
MakeRule = Callable[[], KeepRule]


def trim(task: Chunks, parts: list[slice], density: float) -> MakeRule:
    """Keep the top `density` fraction of entries by |d| (TIES' trim, `trim_count`)."""
    top = top_k(lambda p: task(p).abs(), parts, trim_count(density, parts[-1].stop))

    def make() -> KeepRule:
        select = Selector(top)
        return lambda d, p: (select(d.abs()), None)

    return make


def crumbs(task: Chunks, parts: list[slice], density: float, gamma: float) -> MakeRule:
    """Drop the `gamma` fraction of largest |d| (outliers), keep the next `density` fraction
    (`crumbs_counts`)."""
    outliers, kept = crumbs_counts(density, gamma, parts[-1].stop)
    magnitude_ = lambda p: task(p).abs()  # noqa: E731
    upper_top = top_k(magnitude_, parts, outliers)
    lower_top = top_k(magnitude_, parts, outliers + kept)

    def make() -> KeepRule:
        upper, lower = Selector(upper_top), Selector(lower_top)

        def rule(d: Tensor, p: slice):
            a = d.abs()
            return lower(a) & ~upper(a), None

        return rule

    return make


def drop(density: float, key: int) -> MakeRule:
    """DARE: keep each entry with probability `density` (all from density 1)."""
    p_keep = min(density, 1.0)
    return lambda: lambda d, p: (uniform(key, p, d.device) < p_keep, p_keep)


def check_epsilon(density: float, epsilon: float) -> None:
    """DELLA's probabilities density -/+ epsilon must lie strictly inside (0, 1), as mergekit
    requires, unless density keeps all (>= 1) or none (<= 0)."""
    if 0 < density < 1 and not (epsilon >= 0 and 0 < density - epsilon and density + epsilon < 1):
        raise ConfigError(
            "della needs 0 < density - epsilon and density + epsilon < 1 "
            f"(density={density}, epsilon={epsilon}): lower epsilon"
        )


def magprune(
    density: float, epsilon: float, key: int, row: int, ties: str = "position"
) -> MakeRule:
    """DELLA's MagPrune: per row of `row` entries, keep probability rises linearly with the |d|
    rank, p = density - epsilon + 2 epsilon * rank / (row - 1), so large entries survive more.
    Equal |d| rank in position order (`ties="position"`, mergekit's ranks by a sort), or share
    their average rank (`"average"`: the probability depends on the magnitude alone)."""
    check_epsilon(density, epsilon)
    if density >= 1 or density <= 0:
        return drop(max(density, 0.0), key)

    def rule(d: Tensor, p: slice) -> tuple[Tensor, Tensor]:
        magnitude = d.view(-1, row).abs()
        if ties == "average":
            ordered = magnitude.sort(dim=1).values
            below = torch.searchsorted(ordered, magnitude)
            through = torch.searchsorted(ordered, magnitude, right=True)
            rank = (below + through - 1).float() * 0.5  # the average of ranks below..through-1
        else:
            rank = magnitude.argsort(dim=1, stable=True).argsort(dim=1).float()
        prob = (density - epsilon + 2 * epsilon * (rank / max(row - 1, 1))).view(-1)
        return uniform(key, p, d.device) < prob, prob

    return lambda: rule


def rescaled(make: MakeRule, rescale: Rescale, task: Chunks, parts: list[slice]) -> Sparsifier:
    """Entries the rule keeps, rescaled: `inverse_density` divides by the keep probability
    (unbiased: E[kept / p] = d), `l1` matches the L1 norm of the unsparsified task vector (as
    mergekit does: not where either norm is below 1e-7)."""
    if rescale not in ("inverse_density", "l1", "none"):
        raise ConfigError(f"rescale must be inverse_density, l1 or none, got {rescale!r}")
    if rescale == "inverse_density":
        rule = make()

        def apply(d: Tensor, p: slice) -> Tensor:
            keep, prob = rule(d, p)
            if isinstance(prob, Tensor):
                prob = prob.clamp_min(1e-12)
            return dropped(keep, d / prob, d)

        return apply
    factor = 1.0
    if rescale == "l1":  # a first pass over the chunks: the same entries kept as in the second
        rule = make()
        total = kept = 0.0
        for p in parts:
            d = task(p)
            keep, _ = rule(d, p)
            total += float(d.abs().sum(dtype=torch.float64))
            kept += float(torch.where(keep, d.abs(), 0.0).sum(dtype=torch.float64))
        factor = l1_factor(total, kept)
    rule = make()
    return lambda d, p: dropped(rule(d, p)[0], d * factor, d)


def l1_factor(total: float, kept: float) -> float:
    """The `l1` rescale: the L1 norms' ratio, or 1 where either is below mergekit's 1e-7."""
    return total / kept if total >= 1e-7 and kept >= 1e-7 else 1.0


def _whole(d: Tensor, make: Callable[[Chunks, list[slice]], Sparsifier], row: int = 1) -> Tensor:
    """A sparsifier applied to a whole tensor (the building blocks, used alone)."""
    flat = d.reshape(-1).float()
    parts = spans(flat.numel(), flat.device, row)
    apply = make(lambda p: flat[p], parts)
    return torch.cat([apply(flat[p], p) for p in parts]).reshape(d.shape)


def magnitude(d: Tensor, density: float, rescale: Rescale = "none") -> Tensor:
    """TIES' trim of a whole tensor."""
    return _whole(d, lambda task, parts: rescaled(trim(task, parts, density), rescale, task, parts))


def breadcrumbs(d: Tensor, density: float, gamma: float, rescale: Rescale = "none") -> Tensor:
    """Breadcrumbs' outlier-and-small removal of a whole tensor."""
    make = lambda task, parts: crumbs(task, parts, density, gamma)  # noqa: E731
    return _whole(d, lambda task, parts: rescaled(make(task, parts), rescale, task, parts))


def random_drop(d: Tensor, density: float, key: int, rescale: Rescale) -> Tensor:
    """DARE's random drop of a whole tensor, with rescaling."""
    return _whole(d, lambda task, parts: rescaled(drop(density, key), rescale, task, parts))


def rows_of(shape: torch.Size) -> int:
    """DELLA ranks within output rows: entries per row (a 1-d tensor is one row)."""
    n = math.prod(shape)
    return n // shape[0] if len(shape) > 1 and shape[0] else max(n, 1)


def della_prune(
    d: Tensor, density: float, epsilon: float, key: int, rescale: Rescale, ties: str = "position"
) -> Tensor:
    """DELLA's MagPrune of a whole tensor, with rescaling."""
    row = rows_of(d.shape)
    make = magprune(density, epsilon, key, row, ties)
    return _whole(d, lambda task, parts: rescaled(make, rescale, task, parts), row)


class Sparsification(Enum):
    """How a task vector is sparsified."""

    NONE = "none"  # kept whole (task arithmetic)
    TRIM = "trim"  # keep the top `density` by |d| (TIES)
    CRUMBS = "crumbs"  # drop the `gamma` largest |d|, keep the next `density` (Breadcrumbs)
    DROP = "drop"  # keep each entry with probability `density` (DARE)
    MAGPRUNE = "magprune"  # keep by the |d| rank in its row (DELLA)

    @property
    def random(self) -> bool:
        return self in (Sparsification.DROP, Sparsification.MAGPRUNE)


@dataclass(frozen=True)
class Sparsify:
    """How one model's task vector is sparsified and its survivors rescaled; the random ones
    draw with `key`. `ties` is DELLA's rank rule for equal |d|."""

    how: Sparsification
    density: float = 1.0
    gamma: float = 0.0
    epsilon: float = 0.0
    key: int = 0
    rescale: Rescale = "none"
    ties: str = "position"

    def check(self) -> None:
        if self.gamma < 0:
            raise ConfigError(f"gamma must be at least 0, got {self.gamma}")
        if self.how is Sparsification.MAGPRUNE:
            check_epsilon(self.density, self.epsilon)
        if self.rescale not in ("inverse_density", "l1", "none"):
            raise ConfigError(f"rescale must be true, false, l1, inverse_density or none, got "
                              f"{self.rescale!r}")  # fmt: skip
        if self.rescale == "inverse_density" and not self.how.random:
            raise ConfigError("rescale: inverse_density divides by a keep probability: it "
                              "applies to the random drops (DARE, DELLA) alone")  # fmt: skip

    @property
    def keeps_all(self) -> bool:
        """Whether every entry is kept as it is (then there is nothing to rescale)."""
        return self.how is Sparsification.NONE or self.density >= 1

    def sparsifier(self, task: Chunks, parts: list[slice], row: int) -> Sparsifier:
        """The torch implementation, applied chunk by chunk."""
        if self.keeps_all:
            return lambda d, p: d
        if self.how is Sparsification.TRIM:
            make = trim(task, parts, self.density)
        elif self.how is Sparsification.CRUMBS:
            make = crumbs(task, parts, self.density, self.gamma)
        elif self.how is Sparsification.DROP:
            make = drop(self.density, self.key)
        else:
            make = magprune(self.density, self.epsilon, self.key, row, self.ties)
        return rescaled(make, self.rescale, task, parts)
