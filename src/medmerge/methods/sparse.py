"""Task arithmetic and its sparse family: TIES, DARE, DELLA, Breadcrumbs (mergekit's
generalized task arithmetic), and SCE.

Each method of the family is one row of `VARIANTS`, one pipeline with its variants as options:
1. sparsify every task vector d_i = theta_i - b (`medmerge.methods.sparsify`: top-k by
   magnitude, random drop, magnitude-ranked random drop, outlier-and-small removal), rescaling
   survivors (`rescale: true` matches the L1 norm of the unsparsified vector, as mergekit);
2. combine: sum_i w_i d_i, or with sign consensus the entries whose weighted sign agrees with
   the sign of that sum (a sum of 0 counts as positive), each divided (`normalize`) by the sum
   of the weights that contributed;
3. b + lambda * combined delta.
SCE (select by variance, weights from energies, unweighted sign election) is a function of its
own on the same pipeline.

The methods stream: inputs arrive in their stored dtype; on the CPU one kernel pass merges each
tensor from a `kernels.SparsePlan` (after a pass for a top-k threshold or an L1 norm where
needed), elsewhere torch works over cache-sized chunks, converting to float32 chunk by chunk and
writing the output dtype directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from medmerge.io import buffers
from medmerge.methods import kernels
from medmerge.methods.basic import combination
from medmerge.methods.kernels import Divisor, precompile
from medmerge.methods.registry import REQUIRED, MergeMethod, Param, add, always, entries, register
from medmerge.methods.rng import key_words
from medmerge.methods.sparsify import (
    Chunks,
    Selector,
    Sparsification,
    Sparsify,
    crumbs_counts,
    dropped,
    l1_factor,
    rows_of,
    top_k,
    trim_count,
)
from medmerge.methods.streaming import (
    Blocked,
    chunk_by_chunk,
    flat,
    spans,
    summed_terms,
)

# ---- combination ---------------------------------------------------------------------------


def combine(
    ds: list[Tensor],
    weights: list[float],
    consensus: bool,
    divisor: Divisor,
    votes: list[float] | None = None,
) -> Tensor:
    """sum_i w_i d_i over chunks of (sparsified) task vectors; with `consensus` over the
    entries whose sign, weighted by `votes` (default: the weights), agrees with the sign of
    sum_i votes_i d_i (positive where it is 0). `divisor` says what the sum is divided by."""
    merged = torch.zeros_like(ds[0])
    if not consensus:
        for w, d in zip(weights, ds, strict=True):
            merged.add_(d, alpha=w)
        if divisor == Divisor.WEIGHTS:
            total = torch.tensor(sum(weights), dtype=torch.float32)
            merged.div_(total if abs(total) >= 1e-8 else 1.0)
        return merged
    votes = weights if votes is None else votes
    for v, d in zip(votes, ds, strict=True):
        merged.add_(d, alpha=v)
    positive = merged >= 0
    merged.zero_()
    weight_sum = torch.zeros_like(merged)
    for w, v, d in zip(weights, votes, ds, strict=True):
        signed = d * v
        agree = ((signed > 0) & positive) | ((signed < 0) & ~positive)
        merged.add_(dropped(agree, d, d), alpha=w)
        weight_sum.add_(agree.to(merged.dtype), alpha=w)
    if divisor == Divisor.VOTES:
        merged.div_(torch.where(weight_sum == 0, 1.0, weight_sum))
    elif divisor == Divisor.VOTES_AT_LEAST:
        merged.div_(weight_sum.clamp_min(1e-6))
    return merged


def sparse_merge(
    base: Tensor,
    models: list[Tensor],
    weight: list[float],
    specs: list[Sparsify],
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float,
    out_dtype: torch.dtype,
    row: int = 1,
) -> Tensor:
    """b + lambda * combine(sparsified task vectors): the CPU kernels where they apply,
    else torch streamed over chunks of whole rows (`row` entries: DELLA ranks within rows)."""
    for spec in specs:
        spec.check()
    w = [float(x) for x in weight]
    divisor = (Divisor.VOTES if consensus else Divisor.WEIGHTS) if normalize else Divisor.NONE
    if not consensus and all(spec.keeps_all for spec in specs):
        # task arithmetic: one streamed combination, base + sum_i c_i d_i
        total = sum(w) if divisor == Divisor.WEIGHTS and abs(sum(w)) >= 1e-8 else 1.0
        return combination([x * lambda_ / total for x in w], models, base, out_dtype)
    blocked = isinstance(base, Blocked)
    if _kernels(base, models, out_dtype):
        plan = kernels.SparsePlan.keep_all(
            w, consensus=consensus, divisor=divisor, lam=np.float32(lambda_), row=row
        )
        if blocked:
            return _kernel_blocks(base, models, specs, plan, out_dtype)
        plan, marks = _kernel_plan(base, models, specs, plan)
        out = buffers.empty(base.shape, out_dtype)
        kernels.merge(base, models, plan, out, marks)
        return out
    flat_base = flat(base)
    flats = [flat(m) for m in models]
    parts = spans(flat_base.numel(), base.device, row)

    def task(values: Tensor) -> Chunks:
        return lambda p: values[p].float() - flat_base[p].float()

    sparsify = [spec.sparsifier(task(f), parts, row) for spec, f in zip(specs, flats, strict=True)]

    def merged(p: slice) -> Tensor:
        b = flat_base[p].float()
        ds = [s(f[p].float() - b, p) for s, f in zip(sparsify, flats, strict=True)]
        return b + lambda_ * combine(ds, w, consensus, divisor)

    return chunk_by_chunk(base, parts, merged, out_dtype)


def _kernels(base: Tensor | Blocked, models: list, out_dtype: torch.dtype) -> bool:
    """Whether the CPU kernels merge these tensors: they can, and the sparse pass is compiled
    (else it compiles in the background meanwhile: `precompile`)."""
    dtypes = {t.dtype for t in [base, *models]}
    return (
        len(models) <= kernels.ARITY
        and all(t.device.type == "cpu" for t in [base, *models])
        and kernels.usable_dtypes(dtypes, out_dtype)
        and precompile.available(base.dtype, out_dtype)
    )


def _kernel_blocks(
    base: Blocked,
    models: list[Blocked],
    specs: list[Sparsify],
    plan: kernels.SparsePlan,
    out_dtype: torch.dtype,
) -> Blocked:
    """The kernels' merge of `Blocked` inputs, as `_kernel_plan` and `kernels.merge` compute it
    on the whole tensor: top-k bounds from the kernels' passes over the blocks
    (`top_ks_of_parts`), L1 norms from the kernels' per-block sums of every block, then the
    merge pass block by block, each told its position in the tensor."""
    part, starts = _parts(base, models)
    _sparsifiers(plan, specs, part, starts, base.numel())
    l1 = [i for i, spec in enumerate(specs) if spec.rescale == "l1" and not spec.keeps_all]
    if l1:
        sums = _kept_sums_of_blocks(base, models, plan, starts, square=False)
        for i in l1:
            plan.factor[i] = l1_factor(*sums[i])
    return _merge_blocks(base, models, plan, starts, out_dtype)


def _parts(base: Blocked, models: list[Blocked]) -> tuple[kernels.Part, tuple[int, ...]]:
    """The blocks as the kernels' parts (a block's base and models), and their flat starts."""
    per_row = math.prod(base.shape[1:])
    starts = tuple(first * per_row for first, _ in base.blocks)
    return (lambda k: (base.get(k), [m.get(k) for m in models])), starts


def _shifted(plan: kernels.SparsePlan, shift: int) -> kernels.SparsePlan:
    """`plan` for a block that starts at flat position `shift` (positions from its start)."""
    return plan._replace(offset=shift, keep_cut=plan.keep_cut - shift,
                         drop_cut=plan.drop_cut - shift)  # fmt: skip


def _kept_sums_of_blocks(base, models, plan, starts, square: bool) -> np.ndarray:
    """`kernels.kept_sums` of `Blocked` inputs: the same per-block terms, summed in order."""

    def terms(k: int) -> np.ndarray:
        at = [m.get(k) for m in models]
        return kernels.kept_sum_terms(base.get(k), at, _shifted(plan, starts[k]), square)[0]

    return summed_terms(terms, base)


def _merge_blocks(base, models, plan, starts, out_dtype: torch.dtype) -> Blocked:
    """The kernels' merge pass of `Blocked` inputs, block by block as they are written."""

    def block(k: int) -> Tensor:
        inputs = base.get(k)
        out = buffers.empty(inputs.shape, out_dtype)
        kernels.merge(inputs, [m.get(k) for m in models], _shifted(plan, starts[k]), out, None)
        return out

    return Blocked(base.shape, out_dtype, base.blocks, block)


def _kernel_plan(
    base: Tensor, models: list[Tensor], specs: list[Sparsify], plan: kernels.SparsePlan
) -> tuple[kernels.SparsePlan, np.ndarray | None]:
    """`plan` with each model's sparsifier: top-k bounds (found here), draws and rescaling; and
    where an `l1` rescale needs a first pass for its norms, that pass's marks of the kept
    entries, which the merge pass then reads (those models' rule MARKED) instead of deciding
    again."""
    _sparsifiers(plan, specs, lambda k: (base, models), (0,), base.numel())
    l1 = [i for i, spec in enumerate(specs) if spec.rescale == "l1" and not spec.keeps_all]
    if not l1:
        return plan, None
    # a first pass: the L1 norms of each task vector before and after sparsifying; DELLA's
    # kept entries then come from its marks (ranking a row again costs more than reading them)
    sums, marks = kernels.kept_sums(base, models, plan, square=False)
    for i in l1:
        plan.factor[i] = l1_factor(*sums[i])
        if plan.rule[i] == kernels.Rule.RANKED:
            plan.rule[i] = kernels.Rule.MARKED
    return plan, marks


def _sparsifiers(
    plan: kernels.SparsePlan, specs: list[Sparsify], part: kernels.Part, starts: tuple, n: int
) -> None:
    """Into `plan`, each model's sparsifier: top-k bounds (found here, over the tensor's parts:
    `kernels.top_ks_of_parts`), draws and their rescaling."""
    for i, spec in enumerate(specs):
        if spec.keeps_all:
            continue
        if spec.how in (Sparsification.TRIM, Sparsification.CRUMBS):
            outliers, kept = _top_counts(spec, n)
            (top, cut), (upper, upper_cut) = kernels.top_ks_of_parts(
                kernels.Statistic.MAGNITUDE, part, starts, n, i, [outliers + kept, outliers]
            )
            plan.keep_value[i], plan.keep_cut[i] = top, cut
            plan.drop_value[i], plan.drop_cut[i] = upper, upper_cut
        else:
            _draw_rule(plan, i, spec)
        plan.by_probability[i] = spec.rescale == "inverse_density"


def _top_counts(spec: Sparsify, n: int) -> tuple[int, int]:
    """(outliers dropped, entries kept) of a top-k rule (TIES' trim, Breadcrumbs) of n entries."""
    if spec.how is Sparsification.TRIM:
        return 0, trim_count(spec.density, n)
    return crumbs_counts(spec.density, spec.gamma, n)


def _draw_rule(plan: kernels.SparsePlan, i: int, spec: Sparsify) -> None:
    """Model i's random rule in `plan`: DARE's draws, or DELLA's ranked ones."""
    plan.key[i] = key_words(spec.key)
    if spec.how is Sparsification.DROP or spec.density <= 0:
        plan.rule[i], plan.density[i] = kernels.Rule.DRAW, max(spec.density, 0.0)
    else:
        plan.rule[i] = kernels.Rule.RANKED
        plan.low[i], plan.span[i] = spec.density - spec.epsilon, 2 * spec.epsilon
        plan.average_ties[i] = spec.ties == "average"


# ---- the family, as a table ----------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One method of the family (a row of mergekit's generalized task arithmetic): how each
    task vector is sparsified, whether they combine by sign consensus (else a weighted sum),
    and the defaults of `normalize` and `rescale`."""

    name: str
    sparsification: Sparsification
    consensus: bool
    normalize: bool
    rescale: bool
    doc: str


S = Sparsification
VARIANTS = (
    Variant("task_arithmetic", S.NONE, consensus=False, normalize=False, rescale=False,
            doc="base + lambda * sum_i w_i (theta_i - base)  (Ilharco et al. 2023)."),
    Variant("ties", S.TRIM, consensus=True, normalize=True, rescale=False,
            doc="Trim to top-density by magnitude, elect signs, disjoint mean  "
            "(Yadav et al. 2023)."),
    Variant("dare_ties", S.DROP, consensus=True, normalize=False, rescale=True,
            doc="Random drop with rescale, then TIES sign consensus  (Yu et al. 2024)."),
    Variant("dare_linear", S.DROP, consensus=False, normalize=False, rescale=True,
            doc="Random drop with rescale, then a weighted sum of task vectors  (Yu et al. 2024)."),
    Variant("breadcrumbs", S.CRUMBS, consensus=False, normalize=False, rescale=False,
            doc="Drop the gamma outliers and the smallest, keep density; weighted sum  "
            "(Davari 2023)."),
    Variant("breadcrumbs_ties", S.CRUMBS, consensus=True, normalize=False, rescale=False,
            doc="Drop the gamma outliers and the smallest, keep density; TIES consensus  "
            "(Davari 2023)."),
    Variant("della", S.MAGPRUNE, consensus=True, normalize=True, rescale=True,
            doc="MagPrune, then sign election and fusion, scaled by lambda  (Deep et al. 2024)."),
    Variant("della_linear", S.MAGPRUNE, consensus=False, normalize=False, rescale=True,
            doc="MagPrune, then a weighted sum of task vectors, scaled by lambda  "
            "(Deep et al. 2024)."),
)  # fmt: skip

RESCALES = (True, False, "l1", "inverse_density", "none")
# each sparsification's own parameters, after mergekit's shared ones and weight, density
SPARSIFICATION_PARAMS = {
    S.CRUMBS: (Param("gamma", 0.01, per_model=True, kind=float),),
    S.MAGPRUNE: (
        Param("epsilon", 0.15, per_model=True, kind=float),
        Param("rank_ties", "position", kind=("position", "average")),
    ),
}


def _variant_method(variant: Variant) -> MergeMethod:
    """The registered method of a row: mergekit's parameters (and defaults), and a function of
    the tensors."""
    how = variant.sparsification
    params = (
        Param("int8_mask", False, kind=bool),  # mergekit's mask dtype: no effect on the result
        Param("normalize", variant.normalize, kind=bool),
        Param("rescale", variant.rescale, kind=RESCALES),
        Param("lambda_", 1.0, kind=float),
        Param("weight", per_model=True, kind=float),
        Param("density", 1.0, per_model=True, kind=float),
        *SPARSIFICATION_PARAMS.get(how, ()),
    )

    def fn(
        base: Tensor,
        models: list[Tensor],
        *,
        keys: list[int] | None = None,
        out_dtype: torch.dtype = torch.float32,
        **given,
    ) -> Tensor:
        if not models:  # the base alone among the inputs: mergekit gives it back
            return base.to(out_dtype, copy=True)
        p = _bind(params, given, len(models))
        specs = _specs(how, p, keys, len(models))
        row = rows_of(base.shape) if how is Sparsification.MAGPRUNE else 1
        return sparse_merge(
            base,
            models,
            p["weight"],
            specs,
            consensus=variant.consensus,
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
        engine_args=frozenset({"keys", "out_dtype"} if how.random else {"out_dtype"}),
        min_models=0,
        check=lambda p, config: _specs(how, p, None, len(p["weight"])) and None,
        # without sparsification a weighted sum, entry by entry; else in chunks of whole rows
        # where DELLA ranks within rows
        rows=always if how is S.NONE else None,
        streams=None if how is S.NONE else _chunk_row(how),
    )


def _chunk_row(how: Sparsification):
    """`streams` of a row of the family."""
    if how is Sparsification.MAGPRUNE:
        return lambda params, shape: rows_of(shape)
    return entries


def _specs(how: Sparsification, p: dict, keys: list[int] | None, n: int) -> list[Sparsify]:
    """Each model's Sparsify from a row's parameters (`rescale` true is mergekit's `l1`)."""
    rescale = {True: "l1", False: "none"}.get(p["rescale"], p["rescale"])
    specs = []
    for i in range(n):
        specs.append(
            Sparsify(
                how,
                p["density"][i],
                gamma=p["gamma"][i] if "gamma" in p else 0.0,
                epsilon=p["epsilon"][i] if "epsilon" in p else 0.0,
                key=keys[i] if keys and how.random else 0,
                rescale=rescale,
                ties=p.get("rank_ties", "position"),
            )
        )
    for spec in specs:
        spec.check()
    return specs


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


@register("sce", raw_inputs=True, spreads_nonfinite=True, min_models=0, streams=entries)
def sce(
    base: Tensor,
    models: list[Tensor],
    *,
    int8_mask: bool = False,
    select_topk: float = 1.0,
    lambda_: float = 1.0,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Select high-variance entries, Calculate weights from squared deltas, Erase sign
    conflicts  (Wan et al. 2024, FuseChat)."""
    if not models:  # the base alone among the inputs: mergekit gives it back
        return base.to(out_dtype, copy=True)
    n = base.numel()
    flat_base = flat(base)
    flats = [flat(m) for m in models]
    parts = spans(n, base.device)

    def deltas(p: slice) -> list[Tensor]:
        b = flat_base[p].float()
        return [f[p].float() - b for f in flats]

    def variance(ds: list[Tensor]) -> Tensor:  # elementwise, not stack().var(0): no copies
        mean = sum(ds) / len(ds)
        # abs: the NaN of a non-finite input may come with its sign bit set, which `top_k`'s
        # bit patterns of non-negative floats cannot hold (it changes no other value)
        return (sum((d - mean).square_() for d in ds) / len(ds)).abs_()

    fast = _kernels(base, models, out_dtype)
    if select_topk >= 1:
        k = n
    elif select_topk <= 0:
        k = 0
    else:  # mergekit's count: of the entries where the task vectors differ at all
        if fast and isinstance(base, Blocked):
            part, starts = _parts(base, models)
            differing = sum(kernels.count_positive(*part(j)) for j in range(len(starts)))
        elif fast:
            differing = kernels.count_positive(base, models)
        else:
            differing = sum(int(torch.count_nonzero(variance(deltas(p)))) for p in parts)
        k = int(differing * select_topk)
    if fast:
        return _sce_kernels(base, models, k, lambda_, out_dtype)
    top = top_k(lambda p: variance(deltas(p)), parts, k)

    def selected(select: Selector, p: slice) -> list[Tensor]:
        ds = deltas(p)
        if k == n:
            return ds
        keep = select(variance(ds))
        return [dropped(keep, d, d) for d in ds]

    energy = torch.zeros(len(models), dtype=torch.float64)
    select = Selector(top)
    for p in parts:  # the Calculate pass: summed squared selected task vector per model
        energy += torch.tensor(
            [float(d.square().sum(dtype=torch.float64)) for d in selected(select, p)],
            dtype=torch.float64,
        )
    weight = _energy_weights(energy.numpy(), n)
    select = Selector(top)
    votes = [1.0] * len(models)

    def merged(p: slice) -> Tensor:
        combined = combine(selected(select, p), weight, True, Divisor.VOTES_AT_LEAST, votes)
        return flat_base[p].float() + lambda_ * combined

    return chunk_by_chunk(base, parts, merged, out_dtype)


def _sce_kernels(
    base: Tensor | Blocked, models: list, k: int, lambda_: float, out_dtype: torch.dtype
) -> Tensor | Blocked:
    """SCE on the CPU kernels: the variance top-k and the energies in one pass (or, with every
    entry or none selected, the energies in a pass of their own), then the merge pass; of
    `Blocked` inputs, each pass block by block, with the same sums in the same order."""
    n, size, blocked = len(models), base.numel(), isinstance(base, Blocked)
    part, starts = _parts(base, models) if blocked else ((lambda j: (base, models)), (0,))
    plan = kernels.SparsePlan.keep_all([0.0] * n, variance=True)
    if 0 < k < size:
        top, energy = kernels.selection_energy_of_parts(part, starts, size, k)
    else:
        (top,) = kernels.top_ks_of_parts(kernels.Statistic.VARIANCE, part, starts, size, 0, [k])
        plan.keep_value[:], plan.keep_cut[:] = top
        if blocked:
            energy = _kept_sums_of_blocks(base, models, plan, starts, square=True)[:, 1]
        else:
            energy = kernels.kept_sums(base, models, plan, square=True)[0][:, 1]
    plan = kernels.SparsePlan.keep_all(
        _energy_weights(energy, size), votes=[1.0] * n, variance=True, consensus=True,
        divisor=Divisor.VOTES_AT_LEAST, lam=np.float32(lambda_),
    )  # fmt: skip
    plan.keep_value[:], plan.keep_cut[:] = top
    if blocked:
        return _merge_blocks(base, models, plan, starts, out_dtype)
    out = buffers.empty(base.shape, out_dtype)
    kernels.merge(base, models, plan, out, None)
    return out


def _energy_weights(energy: np.ndarray, n: int) -> list[float]:
    """SCE's Calculate step: weights proportional to each model's mean squared selected task
    vector; equal where those means sum to less than 1e-6 (as mergekit)."""
    means = np.asarray(energy, np.float64) / max(n, 1)
    total = float(means.sum())
    if abs(total) < 1e-6:
        return [1 / len(means)] * len(means)
    return (means / total).tolist()
