"""Exact top-k selection of |theta_i - b| (TIES' trim, Breadcrumbs) or of the variance across
the models' task vectors (SCE), usually in one pass and never by sorting.

A sample of the entries predicts a narrow range [low, high] of float32 bit patterns that holds
the k-th largest (non-negative floats order like their bits). One pass then counts the entries
above the range and, per block, those equal to either end of it, and collects the few strictly
inside. Equal entries are counted, not collected: bfloat16 task vectors take few distinct
values, and the k-th largest often sits in a tie group of several percent of the entries. When
the k-th largest is an end of the range, the per-block counts find its tie cut by reading one
block again; otherwise two 16-bit histograms of the collected entries give it. A wrong
prediction (rare; the tests force it) costs a histogram pass that finds the range, and a second
pass. Ties go to the earliest positions.

A tensor too large to hold is given in parts (row blocks, `top_ks_of_parts`): the sample, the
pass and the rare histogram pass go part by part, and what is kept between parts is the counts
and the collected entries, which a larger sample keeps few on very large tensors.

The torch twin is `medmerge.methods.sparsify.top_k` (two radix-histogram passes) with
`Selector`.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from enum import IntEnum
from typing import NamedTuple

import numba
import numpy as np
import torch
from numba import njit, prange
from numba.cpython.unsafe.numbers import trailing_zeros
from torch import Tensor

from medmerge.methods.kernels.core import BLOCK, arrays, load

SAMPLE = 1 << 16  # entries sampled to predict a top-k threshold (more on very large tensors)
COLLECTED = 32 << 20  # bytes of collected entries a sample is made large enough to expect
# a tensor in parts: part k's (base, models)
Part = Callable[[int], tuple[Tensor, list[Tensor]]]


class Statistic(IntEnum):
    """What top-k ranks."""

    MAGNITUDE = 0  # |theta_i - b| of one model i
    VARIANCE = 1  # the variance across the models' task vectors (SCE)


class Tally(NamedTuple):
    """What a scan finds, per thread t of `threads` (each a contiguous range of blocks)."""

    counts: np.ndarray  # (t, rows, 2): entries at or above each row's low, above its high
    equal: np.ndarray  # (t, block, rows, 2): entries equal to low, to high, per block
    bits: np.ndarray  # (t * capacity): patterns strictly inside a row's range ...
    positions: np.ndarray  # ... and their positions, in position order
    energy: np.ndarray  # (t, block, models, 3): SCE's float64 sums of d * d (`_block_energy`)


@njit(inline="always")
def value(mode, base, models, i, j):
    """The statistic at entry j, as the torch implementation computes it."""
    b = load(base, j)
    if mode == Statistic.MAGNITUDE:
        return abs(load(models[i], j) - b)
    n = len(models)
    mean = np.float32(0.0)
    for m in range(n):
        mean = mean + (load(models[m], j) - b)
    mean = mean / np.float32(n)
    var = np.float32(0.0)
    for m in range(n):
        dev = (load(models[m], j) - b) - mean
        var = var + dev * dev
    return var / np.float32(n)


@njit(inline="always")
def _statistic(mode, base, models, i, start, size, out):
    """`value` at start..start+size as float32 bit patterns in `out`: each mode its own loop,
    so that each vectorises."""
    if mode == Statistic.MAGNITUDE:
        model = models[i]
        for s in range(size):
            d = abs(load(model, start + s) - load(base, start + s))
            out[s] = np.float32(d).view(np.uint32)
    else:
        for s in range(size):
            variance = value(Statistic.VARIANCE, base, models, i, start + s)
            out[s] = np.float32(variance).view(np.uint32)


@njit(cache=True, nogil=True)
def _range_size(n, threads):
    """Entries per thread in `_scan`: whole blocks, so that blocks start at multiples of BLOCK
    whatever the thread count (SCE's per-block sums then add in one order)."""
    return ((n + threads - 1) // threads + BLOCK - 1) // BLOCK * BLOCK


@njit(fastmath={"reassoc"}, cache=True, nogil=True)
def _block_energy(base, model, start, v, low, high, out):
    """SCE's energy parts for one block: the float64 sums of d * d (a float32 square, as
    torch's square()) over the entries whose statistic `v` is above `high`, equal to `high`
    and equal to `low` (reassociated, so that it vectorises)."""
    above, at_high, at_low = 0.0, 0.0, 0.0
    for s in range(len(v)):
        d = load(model, start + s) - load(base, start + s)
        x = np.float64(d * d)
        p = v[s]
        above += x if p > high else 0.0
        at_high += x if p == high else 0.0
        at_low += x if p == low else 0.0
    out[0], out[1], out[2] = above, at_high, at_low


@njit(parallel=True, cache=True, nogil=True)
def _scan(mode, base, models, i, bounds, tally, capacity, sum_energy, threads):
    """One pass over the statistic as float32 bit patterns, in `threads` contiguous ranges of
    blocks, for each row r of inclusive bounds (low, high) in `bounds`: into `tally` (see
    `Tally`) the counts, and the entries strictly between low and high of either row, up to
    `capacity` per thread. With `sum_energy` (SCE, one row), `tally.energy` too: with the
    counts, the sums of d * d over the k selected entries follow without another pass.
    Returns each thread's number of entries inside (above `capacity`: some were not kept).

    The statistic, the counts and a flag per entry go block by block in loops that vectorise;
    then the flags, read 8 at a time, lead to the few entries to collect."""
    n = base.size
    step = _range_size(n, threads)
    hits = np.zeros(threads, np.int64)
    rows = bounds.shape[0]
    # a named tuple's arrays written inside prange lose the writes (numba 0.68): as locals
    counts, equal, bits, positions, energy = tally
    for t in prange(threads):
        v = np.empty(BLOCK, np.uint32)
        flags = np.zeros(BLOCK, np.uint8)
        words = flags.view(np.uint64)
        k = 0
        offset = t * capacity
        first = t * step
        stop = min(n, first + step)
        for start in range(first, stop, BLOCK):
            b = (start - first) // BLOCK
            size = min(stop, start + BLOCK) - start
            _statistic(mode, base, models, i, start, size, v)
            flags[:] = 0
            for r in range(rows):
                low, high = bounds[r, 0], bounds[r, 1]
                ge, at_low, gt, at_high = np.int32(0), np.int32(0), np.int32(0), np.int32(0)
                for s in range(size):  # int32 counts per block (numba's sum of two
                    x = v[s]  # is an int64: cast back, 8 lanes per vector, not 4)
                    ge = np.int32(ge + np.int32(x >= low))
                    at_low = np.int32(at_low + np.int32(x == low))
                    gt = np.int32(gt + np.int32(x > high))
                    at_high = np.int32(at_high + np.int32(x == high))
                    flags[s] |= (x > low) & (x < high)
                counts[t, r, 0] += ge
                counts[t, r, 1] += gt
                equal[t, b, r, 0] = at_low
                equal[t, b, r, 1] = at_high
            if sum_energy:
                for m in range(len(models)):
                    _block_energy(base, models[m], start, v[:size], bounds[0, 0], bounds[0, 1],
                                  energy[t, b, m])  # fmt: skip
            for g in range((size + 7) // 8):
                word = words[g]
                while word != 0:  # one step per flagged entry, in position order
                    s = g * 8 + (trailing_zeros(word) >> 3)
                    if k < capacity:
                        bits[offset + k] = v[s]
                        positions[offset + k] = start + s
                    k += 1
                    word &= word - np.uint64(1)
        hits[t] = k
    return hits


@njit(parallel=True, cache=True, nogil=True)
def _histogram(mode, base, models, i, counts, threads):
    """Per thread's contiguous range, the counts of the statistic's top 16 bits."""
    n = base.size
    step = (n + threads - 1) // threads
    for t in prange(threads):
        row = counts[t]
        for j in range(t * step, min(n, (t + 1) * step)):
            row[np.float32(value(mode, base, models, i, j)).view(np.uint32) >> 16] += 1


@njit(inline="always")
def _highest(counts, r):
    """The highest index whose count and the counts above it sum to at least r, and the sum
    of the counts above it."""
    above = 0
    index = len(counts) - 1
    while above + counts[index] < r:
        above += counts[index]
        index -= 1
    return index, above


@njit(parallel=True, cache=True, nogil=True)
def _collected_counts(bits, hits, capacity, bounds, bucket, counts):
    """Per thread, the counts of the top 16 bits of its collected patterns inside the
    inclusive `bounds` (bucket < 0), or of the low 16 bits of those whose top 16 bits are
    `bucket`."""
    low, high = bounds
    for t in prange(len(hits)):
        row = counts[t]
        for s in range(t * capacity, t * capacity + hits[t]):
            x = bits[s]
            if low <= x <= high:
                if bucket < 0:
                    row[x >> 16] += 1
                elif x >> 16 == bucket:
                    row[x & 0xFFFF] += 1


@njit(cache=True, nogil=True)
def _cut(bits, positions, hits, capacity, target, ties):
    """The position after the `ties`-th collected entry equal to target."""
    for t in range(len(hits)):
        for s in range(t * capacity, t * capacity + hits[t]):
            if bits[s] == target:
                ties -= 1
                if ties == 0:
                    return positions[s] + 1
    return 0  # unreachable when `ties` such entries were collected


@njit(cache=True, nogil=True)
def _cut_equal(mode, base, models, i, equal, target, ties, threads):
    """The position after the `ties`-th entry equal to target, given `_scan`'s counts of such
    entries per block (`equal[t, b]`): only the block that holds it is read again."""
    n = base.size
    step = _range_size(n, threads)
    for t in range(threads):
        for b in range(equal.shape[1]):
            if ties > equal[t, b]:
                ties -= equal[t, b]
                continue
            start = t * step + b * BLOCK
            for j in range(start, min(n, (t + 1) * step, start + BLOCK)):
                if np.float32(value(mode, base, models, i, j)).view(np.uint32) == target:
                    ties -= 1
                    if ties == 0:
                        return j + 1
    return 0  # unreachable when the counts hold `ties` such entries


@njit(cache=True, nogil=True)
def _equal_energy(base, models, target, begin, end, out):
    """Per model, the float64 sum of d * d over the entries in begin..end-1 whose variance's
    pattern is `target`."""
    for j in range(begin, end):
        if np.float32(value(Statistic.VARIANCE, base, models, 0, j)).view(np.uint32) == target:
            for m in range(len(models)):
                d = load(models[m], j) - load(base, j)
                out[m] += np.float64(d * d)


@njit(parallel=True, cache=True, nogil=True)
def _sample(mode, base, models, i, positions):
    """`value` at `positions`: scattered reads, which wait on memory (two threads wait about
    half as long)."""
    out = np.empty(len(positions), np.float32)
    for s in prange(len(positions)):
        out[s] = value(mode, base, models, i, positions[s])
    return out


@njit(parallel=True, cache=True, nogil=True)
def _positive(base, models, counts):
    """Per block, the entries whose variance across the models is not 0."""
    n = base.size
    for blk in prange((n + BLOCK - 1) // BLOCK):
        found = 0
        for j in range(blk * BLOCK, min(n, (blk + 1) * BLOCK)):
            pattern = np.float32(value(Statistic.VARIANCE, base, models, 0, j)).view(np.uint32)
            found += pattern != 0
        counts[blk] = found


def count_positive(base: Tensor, models: list[Tensor]) -> int:
    """How many entries' variance across the models is not 0 (NaN counts, as in torch's
    `count_nonzero`), where SCE takes its top k from. Torch twin: `sparse.sce`'s count."""
    base_, models_ = arrays(base, models)
    counts = np.zeros((base_.size + BLOCK - 1) // BLOCK, np.int64)
    _positive(base_, models_, counts)
    return int(counts.sum())


def top_ks(mode: int, base: Tensor, models: list[Tensor], i: int, ks: list[int]):
    """[(value, cut)] per k (at most two inner ones): the k largest entries of the statistic
    (a `Statistic`; model i's |d| or the variance) are those above `value` and those equal to
    it before position `cut`. Torch twin: `sparsify.top_k`."""
    found, _ = _top_ks(mode, lambda k: (base, models), (0,), base.numel(), i, ks, False)
    return found


def top_ks_of_parts(mode: int, part: Part, starts: tuple[int, ...], n: int, i: int, ks: list[int]):
    """`top_ks` of a tensor of n entries held in consecutive parts (row blocks): `part(k)` gives
    part k's (base, models), which start at flat position `starts[k]`; each part is asked for
    again when it is read again, and what is kept between parts does not grow with n (the
    sample grows to keep the entries collected under `COLLECTED` bytes)."""
    found, _ = _top_ks(mode, part, starts, n, i, ks, False)
    return found


def selection_energy(base: Tensor, models: list[Tensor], k: int) -> tuple[tuple, np.ndarray]:
    """SCE's Select and Calculate in one pass, for 0 < k < n: the (value, cut) of the k entries
    of largest variance across the models (as `top_ks`), and per model the sum over them of
    d * d (float32 squares summed in float64). Torch twin: `sparse.sce`'s two passes."""
    return selection_energy_of_parts(lambda k: (base, models), (0,), base.numel(), k)


def selection_energy_of_parts(
    part: Part, starts: tuple[int, ...], n: int, k: int
) -> tuple[tuple, np.ndarray]:
    """`selection_energy` of a tensor in parts (as `top_ks_of_parts`; each part whole blocks
    of BLOCK entries but the last), with the same sums in the same order as whole."""
    (top,), energy = _top_ks(Statistic.VARIANCE, part, starts, n, 0, [k], True)
    return top, energy


class _Scanned(NamedTuple):
    """What `_scan` found in one part: its `Tally`'s counts, equal counts and energy, and the
    entries it collected (their patterns and flat positions in the tensor, in order)."""

    counts: np.ndarray
    equal: np.ndarray
    energy: np.ndarray
    bits: np.ndarray
    positions: np.ndarray
    overflow: int  # the most entries a thread found beyond its room (0: all collected)


def _top_ks(mode, part, starts, n, i, ks, with_energy):
    """`top_ks`'s thresholds over the parts, and with `with_energy` (one k)
    `selection_energy`'s sums."""
    mode = int(mode)  # one compiled specialisation, whether given an int or a Statistic
    ks = [min(max(k, 0), n) for k in ks]
    inner = sorted({k for k in ks if 0 < k < n})
    found = {0: (float("inf"), 0), n: (-1.0, 0)}
    if not inner:
        return [found[k] for k in ks], None
    if len(inner) > 2:
        raise ValueError(f"top_ks finds at most two thresholds in one pass, not {ks}")
    threads = numba.get_num_threads()
    sizes = np.diff([*starts, n])
    size = min(SAMPLE, max(n // 64, 1024))
    bounds, inside = _predicted(mode, part, starts, n, i, inner, size)
    if inside * n * 12 > COLLECTED and size < n:  # a larger sample: a narrower range
        size = min(n, int(size * (inside * n * 12 / COLLECTED) ** 2 * 1.2))
        bounds, inside = _predicted(mode, part, starts, n, i, inner, size)
    capacity = [_capacity(inside * m, threads) for m in sizes]
    scanned, todo = [None] * len(starts), range(len(starts))
    while True:
        for k in todo:
            scanned[k] = _scan_part(mode, part, starts, k, i, bounds, capacity[k], with_energy)
        at_or_above, above = sum(s.counts.sum(0) for s in scanned).T
        between = all(above[r] < k <= at_or_above[r] for r, k in enumerate(inner))
        todo = [k for k, s in enumerate(scanned) if s.overflow]
        if between and not todo:
            break
        if between:  # too little room somewhere: those parts again, with enough
            for k in todo:
                capacity[k] = scanned[k].overflow
            continue
        # the sample predicted wrong (rare): a histogram pass finds each k's bucket
        histograms = []
        for k in range(len(starts)):
            base_, models_ = arrays(*part(k))
            histogram = np.zeros((threads, 1 << 16), np.int64)
            _histogram(mode, base_, models_, i, histogram, threads)
            histograms.append(histogram.sum(0))
        buckets = [_highest(sum(histograms), k)[0] for k in inner]
        bounds[:] = [(b << 16, b << 16 | 0xFFFF) for b in buckets]
        capacity = [int(h[list(set(buckets))].sum()) for h in histograms]
        todo = range(len(starts))
    bits = np.concatenate([s.bits for s in scanned])
    positions = np.concatenate([s.positions for s in scanned])
    collected = (bits, positions, np.array([len(bits)]), len(bits))  # one thread's, in order
    for r, k in enumerate(inner):
        low, high = bounds[r]
        at_high = [s.equal[:, :, r, 1] for s in scanned]
        at_low = [s.equal[:, :, r, 0] for s in scanned]
        above_high = above[r] + sum(int(e.sum()) for e in at_high)  # above or equal to high
        above_low = at_or_above[r] - sum(int(e.sum()) for e in at_low)
        if k <= above_high:  # the k-th largest equals high
            target = high
            cut = _cut_in_parts(mode, part, starts, i, at_high, high, k - above[r])
        elif k <= above_low:  # it lies strictly between: among the collected entries
            target, cut = _resolve(*collected, (low, high), k - above_high)
        else:
            target = low
            cut = _cut_in_parts(mode, part, starts, i, at_low, low, k - above_low)
        found[k] = (float(np.uint32(target).view(np.float32)), int(cut))
    result = [found[k] for k in ks]
    if not with_energy:
        return result, None
    # the selected entries: those above high; those equal to high, all or those before the
    # cut; those collected inside (low, high) above the k-th largest, or equal to it and
    # before the cut; those equal to low before the cut. The sums per block of BLOCK entries,
    # in position order (the parts hold whole blocks): the same blocks, whole or in parts
    sums = np.concatenate([
        s.energy.reshape(-1, *s.energy.shape[2:])[: -(-entries // BLOCK)]
        for s, entries in zip(scanned, sizes, strict=True)
    ])  # fmt: skip
    energy = sums[:, :, 0].sum(0)
    if target == high:
        energy += _before_cut(sums[:, :, 1], part, starts, target, cut)
        return result, energy
    energy += sums[:, :, 1].sum(0)
    kept = positions
    if target == low:
        energy += _before_cut(sums[:, :, 2], part, starts, target, cut)
    else:
        kept = kept[(bits > target) | ((bits == target) & (kept < cut))]
    return result, energy + _squares_at(part, starts, kept, len(energy))


def _predicted(mode, part, starts, n, i, inner, size) -> tuple[np.ndarray, float]:
    """Per k of `inner`, inclusive float32 patterns (low, high) that a sample of `size`
    entries predicts to hold the k-th largest; and the fraction of entries predicted strictly
    inside either range."""
    spots = _spots(n, size)
    sample = []
    for k, (start, stop) in enumerate(zip(starts, [*starts[1:], n], strict=True)):
        first, last = np.searchsorted(spots, [start, stop])
        if last > first:
            base_, models_ = arrays(*part(k))
            sample.append(_sample(mode, base_, models_, i, spots[first:last] - start))
    sample = np.concatenate(sample).view(np.uint32)
    ends = []  # per k, the sample ranks that bound it
    for k in inner:
        q = 1 - k / n  # the k-th largest's quantile
        margin = 4 * (size * q * (1 - q)) ** 0.5 + 8  # 4 sigma: wrong 1 time in 15,000
        ends.append([int(np.clip(size * q + m * margin, 0, size - 1)) for m in (-1, 1)])
    sample.sort()
    bounds = sample[ends]  # per k, inclusive float32 patterns
    inside = sum((sample > low) & (sample < high) for low, high in bounds)
    return bounds, float(inside.mean())


def _scan_part(mode, part, starts, k, i, bounds, capacity, with_energy) -> _Scanned:
    """`_scan` of part k, with room for `capacity` collected entries per thread."""
    threads = numba.get_num_threads()
    base_, models_ = arrays(*part(k))
    blocks = _range_size(base_.size, threads) // BLOCK
    rows = len(bounds)
    tally = Tally(
        counts=np.zeros((threads, rows, 2), np.int64),
        equal=np.zeros((threads, blocks, rows, 2), np.int64),
        bits=np.empty(threads * capacity, np.uint32),
        positions=np.empty(threads * capacity, np.int64),
        energy=np.zeros((threads, blocks, len(models_), 3)),
    )
    hits = _scan(mode, base_, models_, i, bounds, tally, capacity, with_energy, threads)
    if hits.max() > capacity:
        return _Scanned(tally.counts, tally.equal, tally.energy, None, None, int(hits.max()))
    mine = [slice(t * capacity, t * capacity + hits[t]) for t in range(threads)]
    bits = np.concatenate([tally.bits[m] for m in mine])
    positions = np.concatenate([tally.positions[m] for m in mine]) + starts[k]
    return _Scanned(tally.counts, tally.equal, tally.energy, bits, positions, 0)


def _cut_in_parts(mode, part, starts, i, equal, target, ties) -> int:
    """The position after the `ties`-th entry equal to target, given each part's `_scan`
    counts of such entries per block (`equal[k]`): only the part and block that hold it are
    read again."""
    threads = numba.get_num_threads()
    for k, counts in enumerate(equal):
        if ties > (here := int(counts.sum())):
            ties -= here
            continue
        base_, models_ = arrays(*part(k))
        return starts[k] + _cut_equal(mode, base_, models_, i, counts, target, ties, threads)
    return 0  # unreachable when the counts hold `ties` such entries


def _before_cut(sums, part, starts, target, cut) -> np.ndarray:
    """Per model, the sum of d * d over the entries equal to `target` before position `cut`,
    given the per-block sums over all such entries (`sums[block, model]`, blocks of BLOCK
    entries in position order): the blocks before the one that holds position cut - 1, and
    that one read again."""
    block = (cut - 1) // BLOCK
    k = bisect.bisect_right(starts, block * BLOCK) - 1
    base_, models_ = arrays(*part(k))
    own = np.zeros(len(models_))
    _equal_energy(
        base_, models_, np.uint32(target), block * BLOCK - starts[k], cut - starts[k], own
    )
    return sums[:block].sum(0) + own


def _squares_at(part, starts, positions: np.ndarray, count: int) -> np.ndarray:
    """Per model (`count` of them), the sum of d * d (float32 squares, summed in float64) at
    `positions` (in order)."""
    squares = [[np.zeros(0, np.float32)] * count]
    ends = [*starts[1:], np.iinfo(np.int64).max]
    for k, (start, stop) in enumerate(zip(starts, ends, strict=True)):
        first, last = np.searchsorted(positions, [start, stop])
        if last > first:
            base, models = part(k)
            at = torch.from_numpy(positions[first:last] - start)
            origin = base.reshape(-1)[at].float()
            squares.append([(m.reshape(-1)[at].float() - origin).square().numpy() for m in models])
    # numpy's pairwise float64 sum: its order does not depend on torch's thread count
    return np.array([np.concatenate(s).sum(dtype=np.float64) for s in zip(*squares)])


def _spots(n: int, size: int) -> np.ndarray:
    """`size` positions spread evenly over n, jittered so that they do not fall on the same
    columns of every row."""
    jitter = np.random.default_rng(0).integers(0, max(n // size, 1), size)
    return np.arange(size) * n // size + jitter


def _capacity(expected: float, threads: int) -> int:
    """Room per thread for the entries a scan collects, `expected` in all."""
    return int(expected * 1.5 / threads) + 4096


def _resolve(bits, positions, hits, capacity, bounds, r) -> tuple[np.uint32, int]:
    """The r-th largest pattern among the collected entries inside the inclusive `bounds` and
    the position after the entry equal to it that is the last one kept (ties go to the
    earliest)."""
    counts = np.zeros((len(hits), 1 << 16), np.int64)
    _collected_counts(bits, hits, capacity, bounds, -1, counts)
    bucket, above = _highest(counts.sum(0), r)
    counts[:] = 0
    _collected_counts(bits, hits, capacity, bounds, bucket, counts)
    rest, greater = _highest(counts.sum(0), r - above)
    target = np.uint32(bucket << 16 | rest)
    return target, _cut(bits, positions, hits, capacity, target, r - above - greater)
