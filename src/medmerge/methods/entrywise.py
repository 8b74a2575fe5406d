"""Methods that decide entry by entry which model's value to take: NearSwap, Arcee Fusion, and
RAM (Reinforced Agent Merging, plain and tensor-local), with mergekit's formulas.

They work in float32 on torch, chunk by chunk where a chunk decides alone (NearSwap), and in two
passes over the chunks where a tensor-wide statistic decides (RAM's counts, Arcee Fusion's
quantiles). Arcee Fusion samples its quantiles from large tensors with medmerge's counter-based
draws, so a seed gives the same result on any device (mergekit draws unseeded).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from medmerge.methods.registry import always, entries, register
from medmerge.methods.rng import uniform
from medmerge.methods.streaming import Blocked, chunkwise, spans


@register("nearswap", min_models=1, max_models=1, rows=always)
def nearswap(base: Tensor, models: list[Tensor], *, t: float) -> Tensor:
    """Take the other model's value where it lies within t of the base's, interpolating by
    t / |a - b| beyond  (mergekit's nearswap)."""

    def swap(a: Tensor, b: Tensor) -> Tensor:
        weight = (t / (a - b).abs().clamp_min(1e-6)).clamp(0.0, 1.0)
        return weight * b + (1 - weight) * a

    return chunkwise(swap, base, models[0])


QUANTILE_SAMPLE = 1_000_000  # entries of a larger tensor sampled for Arcee Fusion's quartiles


def _rows_of_vectors(params: dict, shape: tuple[int, ...]) -> int | None:
    """Arcee Fusion's `streams`: its softmax runs along rows, so a tensor of rows."""
    return 1 if len(shape) > 1 else None


@register("arcee_fusion", min_models=1, max_models=1, streams=_rows_of_vectors)
def arcee_fusion(
    base: Tensor | Blocked, models: list[Tensor | Blocked], *, keys: list[int]
) -> Tensor | Blocked:
    """Take the other model's value where its importance, |b - a| times the KL divergence of
    its row's softmax from the base's, reaches median + 1.5 IQR  (mergekit's arcee_fusion)."""
    (model,) = models
    n = base.numel()
    picks = None  # the entries whose importance gives the quartiles: all, or a sample
    if n > QUANTILE_SAMPLE:
        draws = uniform(keys[0], slice(0, QUANTILE_SAMPLE), base.device).double()
        picks = (draws * n).long()
    if not isinstance(base, Blocked):
        importance = _importance(base, model)
        flat = importance.reshape(-1)
        fence = _fence(flat if picks is None else flat[picks])
        return base + (model - base) * (importance >= fence)

    def at(k: int) -> tuple[Tensor, Tensor]:  # float32, as the engine gives whole tensors
        return base.get(k).float(), model.get(k).float()

    row, values = math.prod(base.shape[1:]), []
    for k, (start, stop) in enumerate(base.blocks):  # the picked importances, block by block
        flat = _importance(*at(k)).reshape(-1)
        if picks is None:
            values.append(flat)
        else:
            mine = picks[(picks >= start * row) & (picks < stop * row)]
            values.append(flat[mine - start * row])
    fence = _fence(torch.cat(values))  # the same values, in another order: the same sort

    def block(k: int) -> Tensor:
        b, m = at(k)
        return b + (m - b) * (_importance(b, m) >= fence)

    return Blocked(base.shape, torch.float32, base.blocks, block)


def _importance(base: Tensor, model: Tensor) -> Tensor:
    """|model - base| times the KL divergence of the row's softmax from the base's."""
    diff = (model - base).abs()
    p = torch.softmax(model, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    return diff * (p * torch.log(p / q)).sum(dim=-1, keepdim=True)


def _fence(values: Tensor) -> Tensor:
    """median + 1.5 (q3 - q1) of the values (mergekit's quantile positions)."""
    ordered = values.sort().values
    q1, median, q3 = (
        ordered[int(q * (ordered.numel() - 1))] for q in torch.tensor([0.25, 0.5, 0.75]).tolist()
    )
    return median + 1.5 * (q3 - q1)


def _counts(base: Tensor, models: list[Tensor], epsilon: float) -> Tensor:
    """Per entry, how many models change it by more than epsilon."""
    flat = base.reshape(-1)
    counts = torch.empty(flat.numel(), dtype=torch.int32, device=base.device)
    for p in spans(flat.numel(), base.device):
        counts[p] = sum(((m.reshape(-1)[p] - flat[p]).abs() > epsilon).int() for m in models)
    return counts


def _ram(base: Tensor, models: list[Tensor], epsilon: float, scale: list[float]) -> Tensor:
    """base + sum_i d_i where only model i changes an entry (times scale_i), plus the mean of
    the d_i that change it where several do; a change is |d| > epsilon."""
    counts = _counts(base, models, epsilon)
    flat = base.reshape(-1)
    out = torch.empty_like(flat)
    for p in spans(flat.numel(), base.device):
        c, b = counts[p], flat[p]
        merged = torch.zeros_like(b)
        for m, s in zip(models, scale, strict=True):
            d = m.reshape(-1)[p] - b
            changed = d.abs() > epsilon
            unique = torch.where(changed & (c == 1), d * s, 0.0)
            shared = torch.where(changed & (c > 1), d / c.clamp_min(1), 0.0)
            merged += unique + shared
        out[p] = b + merged
    return out.view(base.shape)


@register("ram", min_models=0, rows=always)
def ram(base: Tensor, models: list[Tensor], *, epsilon: float = 1e-5) -> Tensor:
    """Each model's change where it alone changes an entry, the mean of the changes where
    several do  (Reinforced Agent Merging, 2026; mergekit's ram)."""
    return _ram(base, models, epsilon, [1.0] * len(models))


@register("ramplus_tl", min_models=0, streams=entries)
def ramplus_tl(
    base: Tensor | Blocked,
    models: list[Tensor | Blocked],
    *,
    r: float = 0.1,
    alpha: float = 0.2,
    epsilon: float = 1e-5,
) -> Tensor | Blocked:
    """RAM with each model's unique changes scaled by 1 + r * min(rho, alpha), rho its shared
    changes over its unique ones in this tensor  (RAM+, tensor-local; mergekit's ramplus_tl)."""
    blocks = range(len(base.blocks)) if isinstance(base, Blocked) else [None]

    def at(k: int | None) -> tuple[Tensor, list[Tensor]]:  # float32, as the engine gives them
        if k is None:
            return base, models
        return base.get(k).float(), [m.get(k).float() for m in models]

    shared, unique = [0] * len(models), [0] * len(models)
    for k in blocks:  # counts of entries: exact whatever the blocks
        b, ms = at(k)
        counts = _counts(b, ms, epsilon).reshape(b.shape)
        for i, m in enumerate(ms):
            changed = (m - b).abs() > epsilon
            shared[i] += int((changed & (counts > 1)).sum())
            unique[i] += int((changed & (counts == 1)).sum())
    scale = []
    for s, u in zip(shared, unique, strict=True):
        rho = s / max(u, epsilon)
        scale.append(1 + r * min(max(rho, 0.0), alpha))
    if not isinstance(base, Blocked):
        return _ram(base, models, epsilon, scale)
    return Blocked(base.shape, torch.float32, base.blocks, lambda k: _ram(*at(k), epsilon, scale))
