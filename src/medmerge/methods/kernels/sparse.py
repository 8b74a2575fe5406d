"""The sparse family's merge pass (TIES, DARE, DELLA, Breadcrumbs, SCE): sparsify, rescale and
combine every model's task vector and write the output dtype, block by block, in one pass.

The method builds a `SparsePlan` (what each model keeps and how the kept entries combine);
`merge` runs it, `kept_sums` gathers the statistics a plan can need first (the L1 norms of the
`l1` rescale, SCE's energies) and marks the entries each model keeps, so that the merge pass
need not decide again (DELLA's ranks, DARE's draws) for models whose rule is then MARKED. Each
model's pass over a block runs in a loop compiled for its `Rule` alone, simple enough to
vectorise. The torch twin is `medmerge.methods.sparse`'s chunk
loop (`sparsify.Sparsify.sparsifier`, then `sparse.combine`): the same float32 operations in
the same order.
"""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple

import numpy as np
from numba import njit, prange
from torch import Tensor

from medmerge.methods.kernels.core import (
    BLOCK,
    array,
    count,
    draw,
    fma,
    load,
    padded,
    store,
    sum64,
)
from medmerge.methods.kernels.ranks import magprune, workspace


class Rule(IntEnum):
    """How one model's pass decides which entries it keeps."""

    TOP_K = 0  # inside the top-k bounds of |d| (or of SCE's variance)
    DRAW = 1  # a draw below `density` (DARE)
    RANKED = 2  # a draw below the rank probability of |d| in its row (DELLA's MagPrune)
    THRESHOLD = 3  # TOP_K in a block that holds neither cut: plain comparisons (the pass picks it)
    MARKED = 4  # kept where the sums pass marked it kept (`kept_sums`' marks): no test again


class Divisor(IntEnum):
    """What the combined task vectors are divided by (`normalize`), as mergekit divides them."""

    NONE = 0
    WEIGHTS = 1  # the weights' sum (1 where its magnitude is below 1e-8)
    VOTES = 2  # per entry, the agreeing models' weights' sum (1 where it is 0)
    VOTES_AT_LEAST = 3  # the same, at least 1e-6 (SCE)


class Job(IntEnum):
    """What a pass computes."""

    MERGE = 0  # the merged tensor
    ABS_SUMS = 1  # per model, the sums of |d| over all entries and over the kept ones
    SQUARE_SUMS = 2  # the same of d * d


class SparsePlan(NamedTuple):
    """Everything a pass needs besides the tensors; arrays hold one entry per model.

    Top-k bounds: an entry is among the top k of a statistic when it lies above `value`, or
    equals it before position `cut`; a model keeps the top `keep` less the top `drop`."""

    rule: np.ndarray  # int64: a Rule per model
    keep_value: np.ndarray  # float32
    keep_cut: np.ndarray  # int64
    drop_value: np.ndarray  # float32 (inf: drop nothing)
    drop_cut: np.ndarray  # int64
    key: np.ndarray  # uint32 (models, 2): the draws' key words (`rng.key_words`)
    density: np.ndarray  # float32: DRAW's keep probability
    low: np.ndarray  # float32: RANKED's keep probability low + span * rank / (row - 1)
    span: np.ndarray  # float32
    average_ties: np.ndarray  # bool: RANKED gives equal |d| their average rank, else in order
    by_probability: np.ndarray  # bool: kept entries divided by their keep probability, else ...
    factor: np.ndarray  # float32: ... multiplied by this
    weight: np.ndarray  # float32
    vote_weight: np.ndarray  # float32: the weights of the sign election (with consensus)
    weight_total: np.float32  # the weights' sum (Divisor.WEIGHTS)
    consensus: bool  # sign election and disjoint sum, else a weighted sum
    divisor: int  # a Divisor
    lam: np.float32  # lambda, the merged delta's scale
    variance: bool  # top-k ranks the variance across the models (SCE), not |d|
    row: int  # entries per row: RANKED ranks within rows
    offset: int  # the position of the arrays' first entry in the tensor (they may be a block)

    @classmethod
    def keep_all(cls, weight: list[float], votes: list[float] | None = None, **given):
        """Every entry of every model kept as it is and summed with `weight`, electing signs
        by `votes` (default: the weights), unless `given` (fields by name) says otherwise."""
        n, f32 = len(weight), np.float32
        plan = cls(
            rule=np.full(n, Rule.TOP_K, np.int64),
            keep_value=np.full(n, -1.0, f32),
            keep_cut=np.zeros(n, np.int64),
            drop_value=np.full(n, np.inf, f32),
            drop_cut=np.zeros(n, np.int64),
            key=np.zeros((n, 2), np.uint32),
            density=np.zeros(n, f32),
            low=np.zeros(n, f32),
            span=np.zeros(n, f32),
            average_ties=np.zeros(n, np.bool_),
            by_probability=np.zeros(n, np.bool_),
            factor=np.ones(n, f32),
            weight=np.array(weight, f32),
            vote_weight=np.array(weight if votes is None else votes, f32),
            weight_total=f32(sum(weight)),
            consensus=False,
            divisor=int(Divisor.NONE),
            lam=f32(1.0),
            variance=False,
            row=1,
            offset=0,
        )
        if "divisor" in given:
            given["divisor"] = int(given["divisor"])
        return plan._replace(**given)


def merge(
    base: Tensor, models: list[Tensor], plan: SparsePlan, out: Tensor, marks: np.ndarray | None
) -> None:
    """Write into `out` the merge `plan` describes; models whose rule is MARKED keep what
    `marks` (from `kept_sums`) says. Torch twin: `sparse.sparse_merge`'s chunk loop."""
    base_, models_ = padded(base, models)
    sums = np.zeros((0, len(models), 2))
    if marks is None:  # no model MARKED: read by none
        marks = new_marks(base_.size, plan, len(models))
    _sparse_pass(base_, models_, plan, Job.MERGE, array(out), (sums, marks))


def kept_sums(
    base: Tensor, models: list[Tensor], plan: SparsePlan, square: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Per model, the float64 sums of |d| (of d * d with `square`) over all entries and over
    those the plan keeps; and the marks of the kept entries, a bit each, for `merge`. Torch
    twins: `sparsify.rescaled`'s L1 pass, `sparse.sce`'s energies."""
    sums, marks = kept_sum_terms(base, models, plan, square)
    return sums.sum(0), marks


def kept_sum_terms(
    base: Tensor, models: list[Tensor], plan: SparsePlan, square: bool
) -> tuple[np.ndarray, np.ndarray]:
    """`kept_sums`' terms, one per block of `block_entries(plan.row)` entries (a tensor cut
    into parts of whole blocks gives, part after part, the same terms), and the marks."""
    base_, models_ = padded(base, models)
    block = _block_size(plan.row)
    sums = np.zeros(((base_.size + block - 1) // block, len(models), 2))
    marks = new_marks(base_.size, plan, len(models))
    job = Job.SQUARE_SUMS if square else Job.ABS_SUMS
    _sparse_pass(base_, models_, plan, job, base_[:0], (sums, marks))
    return sums, marks


def block_entries(row: int) -> int:
    """Entries per block of the sparse pass, for rows of `row` entries."""
    return max(row, BLOCK // row * row)


def new_marks(n: int, plan: SparsePlan, models: int) -> np.ndarray:
    """Room for the kept entries' marks of `models` models: a bit per entry, a row of bytes
    per block (so that no two blocks write one byte); zeroed pages only when touched."""
    block = _block_size(plan.row)
    return np.zeros((models, (n + block - 1) // block, (block + 7) // 8), np.uint8)


@njit(inline="always")
def _variances(base, models, start, out):
    """SCE's statistic (`topk.value`'s variance across the models) at start..start+len(out)
    into `out`, model by model over the block (each model picked from the padded tuple once,
    not per entry): per entry the same float32 operations in the same order."""
    n = count(base, models)
    size = len(out)
    mean = np.zeros(size, np.float32)
    for m in range(n):
        model = models[m]
        for s in range(size):
            mean[s] = mean[s] + (load(model, start + s) - load(base, start + s))
    for s in range(size):
        mean[s] = mean[s] / np.float32(n)
        out[s] = np.float32(0.0)
    for m in range(n):
        model = models[m]
        for s in range(size):
            dev = (load(model, start + s) - load(base, start + s)) - mean[s]
            out[s] = out[s] + dev * dev
    for s in range(size):
        out[s] = out[s] / np.float32(n)


@njit(inline="always")
def _block_size(row):
    """Entries per block: whole rows of `row` entries (DELLA ranks within rows)."""
    return max(row, BLOCK // row * row)  # as `block_entries`


@njit(inline="always")
def _first_k(v, value, cut, j):
    """Whether entry j is among the top k given (value, cut): above the k-th largest value,
    or equal to it and before the cut position (branch-free, so loops vectorise)."""
    return (v > value) | ((v == value) & (j < cut))


@njit(inline="always")
def _threshold(value, cut, start):
    """The value x such that `_first_k(v, value, cut, j)` is v > x for every j of a block from
    `start` that does not hold `cut`: value itself if the cut lies before the block, else the
    float just below it (the block's ties are then kept)."""
    return value if cut <= start else np.nextafter(value, np.float32(-np.inf))


@njit(inline="always")
def _entry(base, model, j, position, statistic, select, rule, prob):
    """Entry j's task vector d and whether the model keeps it, by `rule` (a constant where
    this inlines, so each loop computes only its own test). `select` is (variance, keep
    value, keep cut, drop value, drop cut, key words, offset): the top-k bounds apply to
    `statistic` (the variance across models) with `variance`, else to |d|; THRESHOLD's cuts
    are unused."""
    variance, keep_value, keep_cut, drop_value, drop_cut, first, second, _ = select
    d = load(model, j) - load(base, j)
    s = statistic if variance else abs(d)
    if rule == Rule.TOP_K:
        keep = _first_k(s, keep_value, keep_cut, j) & ~_first_k(s, drop_value, drop_cut, j)
    elif rule == Rule.THRESHOLD:
        keep = (s > keep_value) & ~(s > drop_value)
    else:
        keep = draw(first, second, position) < prob
    return d, keep


@njit(inline="always")
def _sparsify(base, model, start, select, rule, scaling, job, work):
    """One model's pass over a block of `len(own)` entries from `start`, for a constant `rule`.
    MERGE: its kept task vector, rescaled (scaling = (vote weight, factor, by probability)), in
    `own`, and weighted into `acc`; returns zeros. The sums jobs: returns the sums of |d| (or
    d * d) over the block's entries and over its kept ones, and a bit of `marks` set for each
    kept entry, which MARKED reads. `work` is (statistic, prob, own, acc, marks)."""
    # names unlike the callers': numba's inliner can confuse a name shared with one
    block_statistic, block_prob, own, block_acc, block_marks = work
    w, f, div = scaling
    size = len(own)
    position = np.uint32(start + select[7])  # in the tensor; a uint32 for the draws (`draw`)
    if job != Job.MERGE:
        flags = np.empty(size, np.uint8)
        for t in range(size):
            d, keep = _entry(base, model, start + t, position, block_statistic[t], select,
                             rule, block_prob[t])  # fmt: skip
            position = np.uint32(position + np.uint32(1))
            x = d * d if job == Job.SQUARE_SUMS else abs(d)
            block_acc[t] = x
            own[t] = x if keep else np.float32(0.0)
            flags[t] = keep
        whole = size // 8
        for g in range(whole):  # the kept entries' bits, 8 to a byte (unrolled: it vectorises)
            f = flags[8 * g : 8 * g + 8]
            block_marks[g] = (f[0] | (f[1] << 1) | (f[2] << 2) | (f[3] << 3) | (f[4] << 4)
                              | (f[5] << 5) | (f[6] << 6) | (f[7] << 7))  # fmt: skip
        if size > 8 * whole:
            byte = np.uint8(0)
            for b in range(size - 8 * whole):
                byte |= flags[8 * whole + b] << np.uint8(b)
            block_marks[whole] = byte
        return sum64(block_acc, size), sum64(own, size)
    for t in range(size):
        if rule == Rule.MARKED:
            d = load(model, start + t) - load(base, start + t)
            keep = ((block_marks[t >> 3] >> np.uint8(t & 7)) & np.uint8(1)) != 0
        else:
            d, keep = _entry(base, model, start + t, position, block_statistic[t], select,
                             rule, block_prob[t])  # fmt: skip
        position = np.uint32(position + np.uint32(1))
        if div:
            p = block_prob[t]
            scaled = d / (max(p, np.float32(1e-12)) if rule == Rule.RANKED else p)
        else:
            scaled = d * f
        own[t] = scaled if keep else d - d  # 0, or NaN for a non-finite d: it spreads
        block_acc[t] = fma(w, own[t], block_acc[t])
    return 0.0, 0.0


@njit(inline="always")
def _model_pass(base, models, plan, i, start, job, work, ranks):
    """Model i's pass over the block from `start` (see `_sparsify`): its keep probabilities
    first for the random rules, then the loop for its rule. A TOP_K block that holds neither
    cut tests a plain threshold, not the position."""
    probability = work[1]
    rule = plan.rule[i]
    model = models[i]
    if rule == Rule.RANKED:
        row = plan.row
        line = (plan.low[i], plan.span[i], np.float32(max(row - 1, 1)))
        average = plan.average_ties[i]
        for r in range(0, len(probability), row):
            magprune(base, model, start + r, line, average, ranks, probability[r : r + row])
    elif rule == Rule.DRAW:
        probability[:] = plan.density[i]
    # parameters as locals: loads the compiler cannot hoist past the array writes would keep
    # the loops from vectorising (named unlike `_entry`'s: numba's inliner can confuse them)
    top_bounds = (plan.keep_value[i], plan.keep_cut[i])
    outlier_bounds = (plan.drop_value[i], plan.drop_cut[i])
    draw_key = (plan.key[i, 0], plan.key[i, 1], plan.offset)
    select = (plan.variance,) + top_bounds + outlier_bounds + draw_key
    scaling = (plan.vote_weight[i], plan.factor[i], plan.by_probability[i])
    end = start + len(probability)
    cut_in = start < top_bounds[1] < end or start < outlier_bounds[1] < end
    if rule == Rule.MARKED:
        sums = _sparsify(base, model, start, select, Rule.MARKED, scaling, job, work)
    elif rule == Rule.TOP_K and cut_in:
        sums = _sparsify(base, model, start, select, Rule.TOP_K, scaling, job, work)
    elif rule == Rule.TOP_K:
        top = _threshold(top_bounds[0], top_bounds[1], start)
        outlier = _threshold(outlier_bounds[0], outlier_bounds[1], start)
        bounds = (plan.variance, top, 0, outlier, 0) + draw_key
        sums = _sparsify(base, model, start, bounds, Rule.THRESHOLD, scaling, job, work)
    elif rule == Rule.DRAW:
        sums = _sparsify(base, model, start, select, Rule.DRAW, scaling, job, work)
    else:
        sums = _sparsify(base, model, start, select, Rule.RANKED, scaling, job, work)
    return sums


@njit(inline="always")
def _vote(w, v, d, positive, acc, total):
    """The sign election's step for one model: its entry d weighted by w added to acc, and w
    to total, where the sign of v * d agrees with the elected sign (positive where the elected
    sum is 0 or more); a 0 never agrees. In compares: a float sign would be an int64, in
    512-bit lanes."""
    signed = v * d
    agree = ((signed > 0) & positive) | ((signed < 0) & ~positive)
    return fma(w, d if agree else d - d, acc), fma(
        w, np.float32(1.0) if agree else np.float32(0.0), total
    )


@njit(inline="always")
def _divided(x, divisor, mode):
    """x divided as `Divisor` mode says (the torch twin's `combine` divides the same way)."""
    if mode == Divisor.WEIGHTS:
        return x / (divisor if abs(divisor) >= np.float32(1e-8) else np.float32(1.0))
    if mode == Divisor.VOTES:
        return x / (divisor if divisor != np.float32(0.0) else np.float32(1.0))
    if mode == Divisor.VOTES_AT_LEAST:
        return x / max(divisor, np.float32(1e-6))
    return x


@njit(inline="always")
def _write(base, plan, start, kept, acc, out):
    """The block's merged entries, base + lambda * the combined task vectors: the weighted
    sum `acc`, or with `consensus` the sum of the weighted entries agreeing in sign with `acc`
    (the election's sum), divided as `plan.divisor` says. The first model's votes add to zero
    and the last one's go straight to the output."""
    size = len(acc)
    mode, lam = plan.divisor, plan.lam
    if not plan.consensus:
        weight_total = plan.weight_total
        for t in range(size):
            store(out, start + t, load(base, start + t) + lam * _divided(acc[t], weight_total,
                                                                         mode))  # fmt: skip
        return
    elected = acc
    zero = np.float32(0.0)
    agreeing = np.empty(size, np.float32)  # the agreeing weighted entries' sum
    votes = np.empty(size, np.float32)  # their weights' sum
    n = len(kept)
    if n == 1:
        agreeing[:] = 0.0
        votes[:] = 0.0
    for i in range(n):
        w, v, own = plan.weight[i], plan.vote_weight[i], kept[i]
        if i == n - 1:
            for t in range(size):
                x, total = _vote(w, v, own[t], elected[t] >= zero, agreeing[t], votes[t])
                store(out, start + t, load(base, start + t) + lam * _divided(x, total, mode))
        elif i == 0:
            for t in range(size):
                agreeing[t], votes[t] = _vote(w, v, own[t], elected[t] >= zero, zero, zero)
        else:
            for t in range(size):
                agreeing[t], votes[t] = _vote(w, v, own[t], elected[t] >= zero, agreeing[t],
                                              votes[t])  # fmt: skip


@njit(parallel=True, cache=True, nogil=True)
def _sparse_pass(base, models, plan, job, out, found):
    """One pass of `job` over blocks of whole rows: each model's pass, model by model, then for
    MERGE the block's output in `out`; for the sums jobs, into found = (sums, marks), model i's
    sums of block b in `sums[b, i]` and its kept entries' bits in `marks[i, b]` (which MERGE
    reads for MARKED models)."""
    sums, marks = found
    n = base.size
    block = _block_size(plan.row)
    ranked = False
    count = len(plan.rule)  # the models before the padding
    for i in range(count):
        ranked = ranked or plan.rule[i] == Rule.RANKED
    for blk in prange((n + block - 1) // block):
        start = blk * block
        size = min(n, start + block) - start
        kept = np.empty((count, size), np.float32)
        acc = np.zeros(size, np.float32)
        statistic = np.empty(size, np.float32)
        prob = np.empty(size, np.float32)
        ranks = workspace(plan.row if ranked else 0)
        if plan.variance:
            _variances(base, models, start, statistic)
        for i in range(count):
            work = (statistic, prob, kept[i], acc, marks[i, blk])
            total, kept_total = _model_pass(base, models, plan, i, start, job, work, ranks)
            if job != Job.MERGE:
                sums[blk, i, 0], sums[blk, i, 1] = total, kept_total
        if job == Job.MERGE:
            _write(base, plan, start, kept, acc, out)
