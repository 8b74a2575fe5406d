"""Sparsify -> weight -> sign consensus -> normalise: TIES, DARE, DELLA, Breadcrumbs, SCE.

Each method is one pipeline with its variants as options, and one row of `VARIANTS`:
1. sparsify every task vector d_i = theta_i - b (`medmerge.methods.sparsify`: top-k by
   magnitude, random drop, magnitude-ranked random drop, outlier-and-small removal), rescaling
   survivors;
2. combine: a weighted sum, or TIES' sign election and disjoint mean;
3. b + lambda * combined delta.
SCE (select by variance, weights from energies) is a function of its own on the same pipeline.

The methods stream: inputs arrive in their stored dtype; on the CPU one kernel pass merges
each tensor from a `kernels.SparsePlan` (after a pass for a top-k threshold or an L1 norm where
needed), elsewhere torch works over cache-sized chunks, converting to float32 chunk by chunk and
writing the output dtype directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from medmerge import buffers
from medmerge.methods import kernels
from medmerge.methods.registry import REQUIRED, MergeMethod, Param, add, register
from medmerge.methods.rng import key_words
from medmerge.methods.sparsify import (
    Chunks,
    Selector,
    Sparsification,
    Sparsify,
    dropped,
    entries,
    rows_of,
    top_k,
)
from medmerge.methods.streaming import spans

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
        plan = kernels.SparsePlan.keep_all(
            w, consensus=sign_consensus, normalize=normalize, lam=np.float32(lambda_), row=row
        )
        plan = _kernel_plan(base, models, specs, plan)
        out = buffers.empty(base.shape, out_dtype)
        kernels.merge(base, models, plan, out)
        return out
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


def _kernel_plan(
    base: Tensor, models: list[Tensor], specs: list[Sparsify], plan: kernels.SparsePlan
) -> kernels.SparsePlan:
    """`plan` with each model's sparsifier: top-k bounds (found here), draws and rescaling."""
    n = base.numel()
    for i, spec in enumerate(specs):
        if spec.how in (Sparsification.TRIM, Sparsification.CRUMBS):
            outliers = entries(spec.gamma, n, "gamma")
            kept = min(entries(spec.density, n, "density"), n - outliers)
            (top, cut), (upper, upper_cut) = kernels.top_ks(
                kernels.Statistic.MAGNITUDE, base, models, i, [outliers + kept, outliers]
            )
            plan.keep_value[i], plan.keep_cut[i] = top, cut
            if spec.how is Sparsification.CRUMBS:
                plan.drop_value[i], plan.drop_cut[i] = upper, upper_cut
            continue
        plan.key[i] = key_words(spec.key)
        if spec.how is Sparsification.DROP:
            plan.rule[i], plan.density[i] = kernels.Rule.DRAW, spec.density
        else:
            plan.rule[i] = kernels.Rule.RANKED
            plan.low[i], plan.span[i] = spec.density - spec.epsilon, 2 * spec.epsilon
        plan.divide[i] = spec.rescale == "inverse_density"
    l1 = [i for i, spec in enumerate(specs) if spec.rescale == "l1"]
    if l1:  # a first pass: the L1 norms of each task vector before and after dropping
        sums = kernels.kept_sums(base, models, plan, square=False)
        for i in l1:
            total, kept = sums[i]
            plan.factor[i] = total / kept if kept > 0 else 1.0
    return plan


# ---- the family, as a table ----------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One method of the family: how each task vector is sparsified, whether the task vectors
    combine by TIES' sign consensus (else a weighted sum), and `normalize`'s default."""

    name: str
    sparsification: Sparsification
    consensus: bool
    normalize: bool
    doc: str


VARIANTS = (
    Variant("ties", Sparsification.TRIM, True, True,
            "Trim to top-density by magnitude, elect signs, disjoint mean  (Yadav et al. 2023)."),
    Variant("dare_ties", Sparsification.DROP, True, True,
            "Random drop with rescale, then TIES sign consensus  (Yu et al. 2024)."),
    Variant("dare_linear", Sparsification.DROP, False, False,
            "Random drop with rescale, then a weighted sum of task vectors  (Yu et al. 2024)."),
    Variant("della", Sparsification.MAGPRUNE, True, True,
            "MagPrune, then sign election and fusion, scaled by lambda  (Deep et al. 2024)."),
    Variant("della_linear", Sparsification.MAGPRUNE, False, False,
            "MagPrune, then a weighted sum of task vectors, scaled by lambda  "
            "(Deep et al. 2024)."),
    Variant("breadcrumbs", Sparsification.CRUMBS, False, False,
            "Drop the gamma outliers and the smallest, keep density; weighted sum  "
            "(Davari 2023)."),
    Variant("breadcrumbs_ties", Sparsification.CRUMBS, True, True,
            "Drop the gamma outliers and the smallest, keep density; TIES consensus  "
            "(Davari 2023)."),
)  # fmt: skip

# each sparsification's parameters, between the weights and `normalize`, `lambda`
SPARSIFICATION_PARAMS = {
    Sparsification.TRIM: (Param("density", 1.0, per_model=True),),
    Sparsification.CRUMBS: (
        Param("density", per_model=True),
        Param("gamma", 0.01, per_model=True),
    ),
    Sparsification.DROP: (Param("density", per_model=True), Param("rescale", "inverse_density")),
    Sparsification.MAGPRUNE: (
        Param("density", per_model=True),
        Param("epsilon", 0.05),
        Param("rescale", "inverse_density"),
    ),
}


def _variant_method(variant: Variant) -> MergeMethod:
    """The registered method of a row: its parameters, and a function of the tensors."""
    how = variant.sparsification
    params = (
        Param("weight", per_model=True),
        *SPARSIFICATION_PARAMS[how],
        Param("normalize", variant.normalize),
        Param("lambda_", 1.0),
    )
    randomised = how in (Sparsification.DROP, Sparsification.MAGPRUNE)

    def fn(
        base: Tensor,
        models: list[Tensor],
        *,
        keys: list[int] | None = None,
        out_dtype: torch.dtype = torch.float32,
        **given,
    ) -> Tensor:
        p = _bind(params, given, len(models))
        specs = [
            Sparsify(
                how,
                density,
                gamma=p.get("gamma", [0.0] * len(models))[i],
                epsilon=p.get("epsilon", 0.0),
                key=keys[i] if randomised else 0,
                rescale=p.get("rescale", "none"),
            )
            for i, density in enumerate(p["density"])
        ]
        row = rows_of(base.shape) if how is Sparsification.MAGPRUNE else 1
        return sparse_merge(
            base,
            models,
            p["weight"],
            specs,
            sign_consensus=variant.consensus,
            normalize=p["normalize"],
            lambda_=p["lambda_"],
            out_dtype=out_dtype,
            row=row,
        )

    fn.__name__ = fn.__qualname__ = variant.name
    fn.__doc__ = variant.doc
    return MergeMethod(
        name=variant.name,
        fn=fn,
        doc=variant.doc,
        needs_base=True,
        uses_base=True,
        spreads_nonfinite=True,  # a dropped entry contributes d - d (`dropped`)
        raw_inputs=True,
        params=params,
        engine_args=frozenset({"keys", "out_dtype"} if randomised else {"out_dtype"}),
    )


def _bind(params: tuple[Param, ...], given: dict, models: int) -> dict:
    """A direct call's parameters: `given`, each missing one at its default, a single value of
    a per-model parameter as one per model (the engine passes them all resolved)."""
    unknown = set(given) - {p.name for p in params}
    if unknown:
        raise TypeError(f"unexpected parameters {sorted(unknown)}")
    bound = {}
    for p in params:
        value = given.get(p.name, p.default)
        if value is REQUIRED:
            raise TypeError(f"missing parameter {p.name!r}")
        bound[p.name] = [value] * models if p.per_model and not isinstance(value, list) else value
    return bound


for _variant in VARIANTS:
    add(_variant_method(_variant))


@register("sce", raw_inputs=True, spreads_nonfinite=True)
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
    k = entries(select_topk, n, "select_topk") if len(models) > 1 else n
    if kernels.usable(base, *models, out_dtype=out_dtype):
        return _sce_kernels(base, models, k, lambda_, out_dtype)
    flat_base = base.reshape(-1)
    flats = [m.reshape(-1) for m in models]
    parts = spans(n, base.device)

    def deltas(p: slice) -> list[Tensor]:
        b = flat_base[p].float()
        return [f[p].float() - b for f in flats]

    def variance(ds: list[Tensor]) -> Tensor:  # elementwise, not stack().var(0): no copies
        mean = sum(ds) / len(ds)
        # abs: the NaN of a non-finite input may come with its sign bit set, which `top_k`'s
        # bit patterns of non-negative floats cannot hold (it changes no other value)
        return (sum((d - mean).square_() for d in ds) / len(ds)).abs_()

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


def _sce_kernels(
    base: Tensor, models: list[Tensor], k: int, lambda_: float, out_dtype: torch.dtype
) -> Tensor:
    """SCE on the CPU kernels: the variance top-k and the energies in one pass (or, with every
    entry or none selected, the energies in a pass of their own), then the merge pass."""
    plan = kernels.SparsePlan.keep_all([0.0] * len(models), variance=True)
    if 0 < k < base.numel():
        top, energy = kernels.selection_energy(base, models, k)
    else:
        (top,) = kernels.top_ks(kernels.Statistic.VARIANCE, base, models, 0, [k])
        plan.keep_value[:], plan.keep_cut[:] = top
        energy = kernels.kept_sums(base, models, plan, square=True)[:, 1]
    plan = kernels.SparsePlan.keep_all(
        _energy_weights(energy), variance=True, consensus=True, normalize=True,
        lam=np.float32(lambda_),
    )  # fmt: skip
    plan.keep_value[:], plan.keep_cut[:] = top
    out = buffers.empty(base.shape, out_dtype)
    kernels.merge(base, models, plan, out)
    return out


def _energy_weights(energy: np.ndarray) -> list[float]:
    """SCE's Calculate step: weights proportional to each model's selected squared deltas."""
    total = float(energy.sum())
    return (energy / total).tolist() if total > 0 else [1 / len(energy)] * len(energy)
