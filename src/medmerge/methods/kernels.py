"""CPU kernels for every merge method, compiled by numba: the sparse methods (TIES, DARE,
DELLA, Breadcrumbs, SCE), linear combinations (linear, task arithmetic, the spherical methods)
and the paper's hierarchical method.

On the CPU a chain of torch ops pays for every intermediate: a top-k threshold, a random mask
and the TIES sign election cost 10-30x the arithmetic of a linear merge. These kernels fuse
each pass into one loop over the stored tensors (bfloat16 read as bits, or float32), on every
core, with no intermediate tensors:

- `top_ks`: the exact k-th largest |theta_i - b| (or SCE's variance): one pass counts the
  entries above a range a sample predicts and at its ends, and collects the few inside it
  (for SCE, `selection_energy`, it also sums the selected entries' squares);
- `merge`: sparsify, rescale and combine every model's task vector and write the output
  dtype, in one pass (DELLA ranks each row inside the pass);
- `delta_products` and `lerp`: the hierarchical method's task-vector cosine (summed in
  float64) and its interpolation, one pass each;
- `gram` and `combine`: inner products (float64) of the models or task vectors, and
  sum_i c_i v_i (+ base) in the output dtype, one pass each.

They compute what the torch implementations in `medmerge.methods.sparse` and `.hierarchical`
compute, bit for bit (the cosine's float64 sums excepted: they add in another order): the same
float32 operations in the same order (torch's `add(alpha=)` is a fused multiply-add,
so it is one here), the same tie rules (top-k keeps the earliest positions, DELLA gives equal
|d| their average rank) and the same counter-based draws
(`medmerge.methods.rng`). The tests check both paths against each other. Reductions run over
fixed-size blocks, so results do not depend on the thread count. The kernels release the GIL,
so the engine's reader and writer threads run beside them. Other devices, other dtypes
(float16, float64) and an environment without numba use the torch implementation;
`MEDMERGE_KERNELS=0` forces it.
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np
import torch
from torch import Tensor

from medmerge import buffers

try:
    import numba
    from llvmlite import ir
    from numba import njit, prange, types
    from numba.core import cgutils
    from numba.cpython.unsafe.numbers import trailing_zeros
    from numba.extending import intrinsic, overload
except ImportError:  # pragma: no cover - numba is a dependency; torch runs instead
    numba = None

BLOCK = 1 << 14  # entries per unit of parallel work (and per partial sum): stays in cache
BUCKETS = 1 << 12  # DELLA's rank histogram: at most this many buckets in use per row
PATTERNS = (1 << 15) + 1  # its tables, indexed by a non-negative float32's top 16 bits (+ one)
DTYPES = (torch.bfloat16, torch.float32)


def usable(*tensors: Tensor, out_dtype: torch.dtype | None = None) -> bool:
    """Whether the kernels can run on these tensors (else the torch implementation runs): on
    the CPU, in one dtype of DTYPES (the kernels take the models as one typed tuple)."""
    if numba is None or os.environ.get("MEDMERGE_KERNELS", "1") == "0":
        return False
    if out_dtype is not None and out_dtype not in DTYPES:
        return False
    dtypes = {t.dtype for t in tensors}
    return (
        len(dtypes) == 1 and dtypes <= set(DTYPES) and all(t.device.type == "cpu" for t in tensors)
    )


def array(t: Tensor) -> np.ndarray:
    """A flat numpy view of a CPU tensor: bfloat16 as its uint16 bits."""
    flat = t.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    if flat.dtype == torch.bfloat16:
        return flat.view(torch.int16).numpy().view(np.uint16)
    return flat.numpy()


if numba is not None:

    def load(a, j):  # noqa: ARG001 - the numba overload below is the implementation
        raise NotImplementedError

    # Arrays are indexed with unsigned integers: a signed index gets a negative-index
    # wraparound test, which keeps LLVM from vectorising the loop (7x slower on one core).
    @overload(load, inline="always")
    def _load(a, j):
        """Entry j as float32 (bfloat16 stored as uint16 bits)."""
        if a.dtype == types.uint16:
            return lambda a, j: np.uint32(np.uint32(a[np.uintp(j)]) << 16).view(np.float32)
        return lambda a, j: np.float32(a[np.uintp(j)])

    def store(a, j, x):  # noqa: ARG001
        raise NotImplementedError

    @overload(store, inline="always")
    def _store(a, j, x):
        """Write float32 x as entry j, rounding to nearest even for bfloat16 (as torch does)."""
        if a.dtype == types.uint16:

            def to_bf16(a, j, x):
                if x != x:
                    a[np.uintp(j)] = np.uint16(0x7FC0)
                else:
                    bits = np.float32(x).view(np.uint32)
                    bias = np.uint32(((bits >> 16) & 1) + 0x7FFF)
                    a[np.uintp(j)] = np.uint16(np.uint32(bits + bias) >> 16)

            return to_bf16

        def to_f32(a, j, x):
            a[np.uintp(j)] = x

        return to_f32

    @intrinsic
    def fma(typingctx, a, b, c):
        """a * b + c rounded once (what torch's vectorised add(alpha=) computes)."""
        sig = types.float32(types.float32, types.float32, types.float32)

        def codegen(context, builder, signature, args):
            f32 = ir.FloatType()
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(f32, [f32, f32, f32]), "llvm.fma.f32"
            )
            return builder.call(fn, args)

        return sig, codegen

    @njit(inline="always")
    def _fmix32(x):
        x = np.uint32(x ^ (x >> np.uint32(16)))
        x = np.uint32((np.uint64(x) * np.uint64(0x85EBCA6B)) & np.uint64(0xFFFFFFFF))
        x = np.uint32(x ^ (x >> np.uint32(13)))
        x = np.uint32((np.uint64(x) * np.uint64(0xC2B2AE35)) & np.uint64(0xFFFFFFFF))
        return np.uint32(x ^ (x >> np.uint32(16)))

    @njit(inline="always")
    def draw(first, second, position):
        """`rng.uniform`'s draw for an entry, given its position's low 32 bits (all the draw
        uses) as a uint32. Loops count that position in a uint32 of their own: derived from
        a 64-bit index, it vectorised in 512-bit lanes, and on Intel cores a 512-bit
        instruction in flight shuts one of the two 256-bit vector ports (per 5632x2048
        tensor: dare_linear 14.7 -> 8.7 ms, della 38.2 -> 27.5 ms)."""
        x = np.uint32(position ^ np.uint32(0x80000000))
        x = _fmix32(np.uint32(x ^ first))
        x = _fmix32(np.uint32(x ^ second))
        return np.float32(np.uint32(x >> np.uint32(8)) & np.uint32(0xFFFFFF)) * np.float32(2.0**-24)

    @njit(inline="always")
    def value(mode, base, models, i, j):
        """The statistic top-k ranks: |theta_i - b| (mode 0) or the variance across the
        models' task vectors (mode 1, SCE), as sparse.py computes them."""
        b = load(base, j)
        if mode == 0:
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
        """`value` at start..start+size as float32 bit patterns in `out`: each mode its own
        loop, so that each vectorises."""
        if mode == 0:
            model = models[i]
            for s in range(size):
                d = abs(load(model, start + s) - load(base, start + s))
                out[s] = np.float32(d).view(np.uint32)
        else:
            for s in range(size):
                out[s] = np.float32(value(1, base, models, i, start + s)).view(np.uint32)

    @njit(cache=True, nogil=True)
    def _range_size(n, threads):
        """Entries per thread in `_scan`: whole blocks, so that blocks start at multiples of
        BLOCK whatever the thread count (SCE's per-block sums then add in one order)."""
        return ((n + threads - 1) // threads + BLOCK - 1) // BLOCK * BLOCK

    @njit(fastmath={"reassoc"}, cache=True, nogil=True)
    def _block_energy(base, model, start, v, low, high, out):
        """SCE's energy parts for one block: the float64 sums of d * d (a float32 square, as
        torch's square()) over the entries whose statistic `v` is above `high`, equal to
        `high` and equal to `low` (reassociated, as in `_block_products`)."""
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
    def _scan(
        mode, base, models, i, bounds, capacity, bits, positions, counts, equal, energy, threads
    ):
        """One pass over the statistic (`value`'s mode) as float32 bit patterns, in `threads`
        contiguous ranges of blocks. For each row r of `equal.shape[2]` inclusive bounds
        (low, high) in `bounds`: in `counts[t, r]`, thread t's number of patterns at or above
        low and above high; in `equal[t, b, r]`, the number equal to low and to high in its
        b-th block; and the patterns and positions (in position order) of the entries strictly
        between low and high of either row, up to `capacity` per thread. Returns each thread's
        number of such entries (above `capacity`: some were not kept).

        Equal entries are counted, not collected: bfloat16 task vectors take few distinct
        values, and the k-th largest often sits in a tie group of several percent of the
        entries. The statistic, the counts and a flag per entry go block by block in loops
        that vectorise; then the flags, read 8 at a time, lead to the few entries to collect.

        Where `energy` has rows (SCE, one row of bounds), `energy[t, b, m]` gets model m's
        `_block_energy` for thread t's b-th block: with the counts, the sums of d * d over
        the k selected entries follow without another pass (`top_ks`)."""
        n = base.size
        step = _range_size(n, threads)
        hits = np.zeros(threads, np.int64)
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
                for r in range(equal.shape[2]):
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
                if energy.shape[0] > 0:
                    for m in range(len(models)):
                        _block_energy(base, models[m], start, v[:size], bounds[0, 0],
                                      bounds[0, 1], energy[t, b, m])  # fmt: skip
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
        """The highest index whose count and the counts above it sum to at least r, and the
        sum of the counts above it."""
        above = 0
        index = len(counts) - 1
        while above + counts[index] < r:
            above += counts[index]
            index -= 1
        return index, above

    @njit(parallel=True, cache=True, nogil=True)
    def _collected_counts(bits, hits, capacity, low, high, bucket, counts):
        """Per thread, the counts of the top 16 bits of its collected patterns inside [low,
        high] (bucket < 0), or of the low 16 bits of those whose top 16 bits are `bucket`."""
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
        """The position after the `ties`-th entry equal to target, given `_scan`'s counts of
        such entries per block (`equal[t, b]`): only the block that holds it is read again."""
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
    def _equal_energy(mode, base, models, target, begin, end, out):
        """Per model, the float64 sum of d * d over the entries in begin..end-1 whose
        statistic's pattern is `target`."""
        for j in range(begin, end):
            if np.float32(value(mode, base, models, 0, j)).view(np.uint32) == target:
                for m in range(len(models)):
                    d = load(models[m], j) - load(base, j)
                    out[m] += np.float64(d * d)

    @njit(parallel=True, cache=True, nogil=True)
    def _sample(mode, base, models, i, positions):
        """`value` at `positions`: scattered reads, which wait on memory (two threads wait
        about half as long)."""
        out = np.empty(len(positions), np.float32)
        for s in prange(len(positions)):
            out[s] = value(mode, base, models, i, positions[s])
        return out

    @njit(fastmath={"reassoc"}, cache=True, nogil=True)
    def _total(x, size):
        """The float64 sum of x[:size], reassociated so that it vectorises (the order then
        depends on the vector width, never on the thread count)."""
        total = 0.0
        for t in range(size):
            total += np.float64(x[t])
        return total

    @njit(inline="always")
    def _first_k(v, value, cut, j):
        """Whether entry j is among the top k given (value, cut): above the k-th largest value,
        or equal to it and before the cut position (branch-free, so loops vectorise)."""
        return (v > value) | ((v == value) & (j < cut))

    @njit(inline="always")
    def _entry(base, model, j, position, variance, select_variance, keep_rule, rule, prob):
        """Entry j's task vector d and whether the sparsifier keeps it. `rule` is a constant
        where this inlines, so each loop computes only its own test: (0) inside the top-k
        bounds, of |d| or of the variance across models (SCE), given as (value, cut); (3)
        the same, in a block that holds neither cut: above each bound's `_threshold`; (1, 2)
        drawn below `prob`."""
        keep_value, keep_cut, drop_value, drop_cut, first, second = keep_rule
        d = load(model, j) - load(base, j)
        s = variance if select_variance else abs(d)
        if rule == 0:
            keep = _first_k(s, keep_value, keep_cut, j) & ~_first_k(s, drop_value, drop_cut, j)
        elif rule == 3:
            keep = (s > keep_value) & ~(s > drop_value)
        else:
            keep = draw(first, second, position) < prob
        return d, keep

    @njit(inline="always")
    def _threshold(value, cut, start):
        """The value x such that `_first_k(v, value, cut, j)` is v > x for every j of a block
        from `start` that does not hold `cut`: value itself if the cut lies before the
        block, else the float just below it (the block's ties are then kept)."""
        return value if cut <= start else np.nextafter(value, np.float32(-np.inf))

    @njit(inline="always")
    def _keep_probability(twice_rank, low, span, scale):
        """DELLA's keep probability from twice an entry's (average) rank, as sparse.py has it."""
        return low + span * ((twice_rank * np.float32(0.5)) / scale)

    @njit(inline="always")
    def _sort_by_key(keys, positions):
        """Sort `positions` by their `keys`: by insertion where they are few (bfloat16 task
        vectors leave a handful per bucket), else by a sort of packed (key, position) pairs,
        so that a bucket holding a whole row (float32 |d| within one narrow range) costs
        n log n, not n^2."""
        n = len(positions)
        if n <= 32:
            for s in range(1, n):
                j = positions[s]
                t = s
                while t > 0 and keys[positions[t - 1]] > keys[j]:
                    positions[t] = positions[t - 1]
                    t -= 1
                positions[t] = j
            return
        packed = np.empty(n, np.uint64)
        for s in range(n):
            packed[s] = (np.uint64(keys[positions[s]]) << np.uint64(32)) | np.uint64(positions[s])
        packed.sort()
        for s in range(n):
            positions[s] = np.uint32(packed[s] & np.uint64(0xFFFFFFFF))

    @njit(inline="always")
    def _magprune(base, model, start, row, low, span, scale, scratch, counts, table, prob):
        """DELLA's keep probability of each entry of one row, low + span * rank / scale, where
        rank is the ascending rank of |d| in the row, ties given their average rank.

        Counting, not sorting: a histogram of the |d| patterns by their top 16 bits (more bits
        per bucket where the row's range would need more than BUCKETS buckets) ranks every
        "regular" entry, one whose pattern has no lower bits set: every |d| of two bfloat16
        weights of the same exponent. A bucket's regular entries are equal, so they share one
        probability, looked up per entry in `table`. The others, a few percent and larger
        than their bucket's regular ones, rank within their bucket: directly when alone in it
        (most are), else by `_sort_by_key`. The tables are indexed by the pattern's bits
        themselves, no offset or clamp in the per-entry loops (DELLA on a 5632x2048 tensor:
        45 -> 38.5 ms); bucket 0 (zero, and any |d| below 2 ** shift) is counted at `first`,
        the bucket below the least other |d|'s, which holds nothing else, so that the buckets
        in use are first..last. `scratch` has four rows of `row` entries, `counts` two rows of
        PATTERNS."""
        keys, odd_at, odd_before, slots = scratch[0], scratch[1], scratch[2], scratch[3]
        least = np.uint32(0xFFFFFFFF)
        most = np.uint32(0)
        for j in range(row):
            key = np.float32(abs(load(model, start + j) - load(base, start + j))).view(np.uint32)
            keys[j] = key
            least = min(least, key if key != 0 else np.uint32(0xFFFFFFFF))
            most = max(most, key)
        least = min(least, most)
        shift = np.uint32(16)
        while (most >> shift) - (least >> shift) + 3 >= BUCKETS:
            shift += np.uint32(1)
        first = max(least >> shift, np.uint32(1)) - np.uint32(1)
        last = most >> shift
        lower = (np.uint32(1) << shift) - np.uint32(1)
        before, others = counts[0], counts[1]  # entries per bucket, the others among them
        before[0] = 0
        others[0] = 0
        before[first : last + 2] = 0
        others[first : last + 1] = 0
        m = 0
        for j in range(row):
            key = keys[j]
            b = key >> shift
            before[b] += 1
            if (key & lower) != 0:  # rare: a branch costs less than storing every entry
                odd_at[m] = j
                c = others[b]
                odd_before[m] = c  # the bucket's others before this one
                others[b] = c + 1
                m += 1
        if first > 0:
            before[first] = before[0]
            others[first] = others[0]
        # from here on the buckets in use, from 0: loops over unsigned ranges did not vectorise
        used = last + 1 - first
        in_use, in_use_others, in_use_table = before[first:], others[first:], table[first:]
        total = np.int32(0)
        for b in range(used + 1):  # now the number of entries before each bucket
            total, in_use[b] = total + in_use[b], total
        for b in range(used):  # twice the regular entries' average rank
            twice = np.int32(in_use[b] + in_use[b + 1] - in_use_others[b] - np.int32(1))
            in_use_table[b] = _keep_probability(np.float32(twice), low, span, scale)
        table[0] = table[first]
        for j in range(row):
            prob[j] = table[keys[j] >> shift]
        several = 0  # buckets with several others, listed in odd_before (read by then)
        for e in range(m):
            j = odd_at[e]
            b = max(keys[j] >> shift, first)
            begin = before[b + 1] - others[b]  # the bucket's others take ranks begin...
            if others[b] == 1:
                prob[j] = _keep_probability(np.float32(2 * begin), low, span, scale)
                continue
            slots[begin + odd_before[e]] = j
            if odd_before[e] == 0:
                odd_before[several] = b
                several += 1
        for e in range(several):
            b = odd_before[e]
            begin, end = before[b + 1] - others[b], before[b + 1]
            _sort_by_key(keys, slots[begin:end])
            s = begin
            while s < end:  # equal keys at ranks s..t-1 share their average
                t = s + 1
                while t < end and keys[slots[t]] == keys[slots[s]]:
                    t += 1
                p = _keep_probability(np.float32(s + t - 1), low, span, scale)
                for u in range(s, t):
                    prob[slots[u]] = p
                s = t

    @njit(inline="always")
    def _sparsify(
        base, model, start, stat, select_variance, keep_rule, rule, prob,
        scaling, square, own, acc, sums, blk, i,
    ):  # fmt: skip
        """Model i's pass over a block of `len(own)` entries from `start`: its kept task
        vector, rescaled, in `own`, and weighted into `acc`; or when `sums` has rows, the sums
        of |d| (d^2 with `square`) over all entries and over the kept ones in `sums[blk, i]`."""
        w, f, div = scaling
        size = len(own)
        position = np.uint32(start)  # a uint32 for the draws (see `draw`)
        if sums.shape[0] > 0:  # |d| (or d^2) of every entry in acc, of the kept ones in own
            for t in range(size):
                d, keep = _entry(base, model, start + t, position, stat[t], select_variance,
                                 keep_rule, rule, prob[t])  # fmt: skip
                position = np.uint32(position + np.uint32(1))
                x = d * d if square else abs(d)
                acc[t] = x
                own[t] = x if keep else np.float32(0.0)
            sums[blk, i, 0] = _total(acc, size)
            sums[blk, i, 1] = _total(own, size)
            return
        for t in range(size):
            d, keep = _entry(base, model, start + t, position, stat[t], select_variance,
                             keep_rule, rule, prob[t])  # fmt: skip
            position = np.uint32(position + np.uint32(1))
            if div:
                p = prob[t]
                scaled = d / (max(p, np.float32(1e-12)) if rule == 2 else p)
            else:
                scaled = d * f
            own[t] = scaled if keep else d - d  # 0, or NaN for a non-finite d: it spreads
            acc[t] = fma(w, own[t], acc[t])

    @njit(parallel=True, cache=True, nogil=True)
    def _merge(
        base, models, out, row, block,
        keep_value, keep_cut, drop_value, drop_cut,
        draw_rule, density, low, span, first, second, divide, factor,
        weight, sign_consensus, normalize, weight_total, lam, select_variance, square, sums,
    ):  # fmt: skip
        """One pass: sparsify, rescale and combine each entry's task vectors and write the
        output; or, when `sums` has rows, per block of `block` entries (whole rows of `row`:
        DELLA ranks within rows) and model, the sum of |d| (d^2 with `square`) over all
        entries and over the kept ones. The top-k tests apply to |d|, or with
        `select_variance` to the variance across models (SCE). Work runs model by model over
        a block, in loops simple enough to vectorise."""
        n = base.size
        models_n = len(models)
        ranked = False
        for i in range(models_n):
            ranked = ranked or draw_rule[i] == 2
        scale_rows = np.float32(max(row - 1, 1))
        summing = sums.shape[0] > 0
        for blk in prange((n + block - 1) // block):
            start = blk * block
            size = min(n, start + block) - start
            kept = np.empty((models_n, size), np.float32)
            acc = np.zeros(size, np.float32)
            stat = np.empty(size, np.float32)
            prob = np.empty(size, np.float32)
            scratch = np.empty((4, row if ranked else 0), np.uint32)
            counts = np.empty((2, PATTERNS if ranked else 0), np.int32)
            table = np.empty(PATTERNS if ranked else 0, np.float32)
            if select_variance:
                for t in range(size):
                    stat[t] = value(1, base, models, 0, start + t)
            for i in range(models_n):
                model = models[i]
                rule = draw_rule[i]
                if rule == 2:
                    for r in range(0, size, row):
                        _magprune(
                            base, model, start + r, row, low[i], span[i], scale_rows,
                            scratch, counts, table, prob[r:],
                        )  # fmt: skip
                elif rule == 1:
                    prob[:] = density[i]
                # parameters as locals: loads the compiler cannot hoist past the array writes
                # would keep the loops from vectorising
                keep_rule = (keep_value[i], keep_cut[i], drop_value[i], drop_cut[i])
                keep_rule = keep_rule + (first[i], second[i])
                scaling = (weight[i], factor[i], divide[i])
                cut_in = start < keep_cut[i] < start + size or start < drop_cut[i] < start + size
                if rule == 0 and cut_in:  # a constant rule per call: no loop computes another's
                    _sparsify(base, model, start, stat, select_variance, keep_rule, 0, prob,
                              scaling, square, kept[i], acc, sums, blk, i)  # fmt: skip
                elif rule == 0:  # test; and where no cut lies in the block, a plain test
                    bounds = (
                        _threshold(keep_value[i], keep_cut[i], start), 0,
                        _threshold(drop_value[i], drop_cut[i], start), 0, first[i], second[i],
                    )  # fmt: skip
                    _sparsify(base, model, start, stat, select_variance, bounds, 3, prob,
                              scaling, square, kept[i], acc, sums, blk, i)  # fmt: skip
                elif rule == 1:
                    _sparsify(base, model, start, stat, select_variance, keep_rule, 1, prob,
                              scaling, square, kept[i], acc, sums, blk, i)  # fmt: skip
                else:
                    _sparsify(base, model, start, stat, select_variance, keep_rule, 2, prob,
                              scaling, square, kept[i], acc, sums, blk, i)  # fmt: skip
            if summing:
                continue
            total = prob  # reused: the summed weights of the agreeing models per entry
            if not sign_consensus:
                for t in range(size):
                    x = acc[t]
                    if normalize:
                        x = _normalized(x, weight_total)
                    store(out, start + t, load(base, start + t) + lam * x)
                continue
            # the elected sign per entry is the weighted sum's: compared as it is, the sum
            # needs no sign of its own (as an int64, which took 512-bit lanes). The first
            # model's votes add to zero, the last one's go straight to the output.
            elected, acc = acc, stat  # stat reused: the sum of the agreeing entries
            if models_n == 1:
                acc[:] = 0.0
                total[:] = 0.0
            for i in range(models_n):
                w, own = weight[i], kept[i]
                if i == models_n - 1:
                    for t in range(size):
                        x, votes = _vote(w, own[t], elected[t], acc[t], total[t])
                        if normalize:
                            x = _normalized(x, votes)
                        store(out, start + t, load(base, start + t) + lam * x)
                elif i == 0:
                    zero = np.float32(0.0)
                    for t in range(size):
                        acc[t], total[t] = _vote(w, own[t], elected[t], zero, zero)
                else:
                    for t in range(size):
                        acc[t], total[t] = _vote(w, own[t], elected[t], acc[t], total[t])

    @njit(inline="always")
    def _vote(w, d, elected, acc, total):
        """TIES's disjoint sum, one model's step: its weighted entry d added to acc and its
        weight to total where d agrees in sign with the elected weighted sum (in compares:
        an int64 sign took 4x longer)."""
        agree = ((d > 0) == (elected > 0)) & ((d < 0) == (elected < 0))
        return fma(w, d if agree else d - d, acc), fma(
            w, np.float32(1.0) if agree else np.float32(0.0), total
        )

    @njit(inline="always")
    def _normalized(x, divisor):
        return x / (divisor if abs(divisor) > np.float32(1e-12) else np.float32(1.0))

    @njit(parallel=True, cache=True, nogil=True)
    def _largest_pattern(a, maxima):
        """Per block, the largest pattern of |x| (the bits without the sign; as unsigned
        integers, magnitudes order as the floats do, and every NaN lies above inf): cast back
        to the array's width at each step, so that 16 bfloat16 lanes fit a 256-bit vector."""
        n = a.size
        bits = a.dtype.type  # uint16 (bfloat16) or uint32 (float32)
        magnitude = bits(0x7FFF) if a.itemsize == 2 else bits(0x7FFFFFFF)
        for blk in prange((n + BLOCK - 1) // BLOCK):
            most = bits(0)
            for j in range(blk * BLOCK, min(n, (blk + 1) * BLOCK)):
                most = max(most, bits(a[np.uintp(j)] & magnitude))
            maxima[blk] = most

    @njit(fastmath={"reassoc"}, cache=True, nogil=True)
    def _block_products(base, a, b, start, stop):
        """`_delta_products` for one block. Reassociating the sums lets them vectorise (5x
        faster); their order then depends on the vector width, not on the thread count."""
        dot, aa, bb = 0.0, 0.0, 0.0
        for j in range(start, stop):
            origin = load(base, j)
            da = np.float64(load(a, j) - origin)
            db = np.float64(load(b, j) - origin)
            dot += da * db
            aa += da * da
            bb += db * db
        return dot, aa, bb

    @njit(parallel=True, cache=True, nogil=True)
    def _delta_products(base, a, b, sums):
        """Per block: the sums of da*db, da*da and db*db in float64, for da = a - base and
        db = b - base in float32 (as torch computes them)."""
        n = base.size
        for blk in prange((n + BLOCK - 1) // BLOCK):
            stop = min(n, (blk + 1) * BLOCK)
            sums[blk, 0], sums[blk, 1], sums[blk, 2] = _block_products(
                base, a, b, blk * BLOCK, stop
            )

    @njit(parallel=True, cache=True, nogil=True)
    def _lerp(a, b, w, out):
        """torch.lerp(a, b, w) in float32 as torch's vectorised CPU kernel computes it, stored
        in out's dtype. (Names differ from `store`'s parameters: numba 0.68 mis-renames a
        variable that shares its name with a parameter of an inlined overload here.)"""
        n = a.size
        small = abs(w) < np.float32(0.5)
        coeff = w if small else w - np.float32(1.0)
        for blk in prange((n + BLOCK - 1) // BLOCK):
            for j in range(blk * BLOCK, min(n, (blk + 1) * BLOCK)):
                p = load(a, j)
                q = load(b, j)
                r = fma(coeff, q - p, p if small else q)
                store(out, j, r)

    @njit(fastmath={"reassoc"}, cache=True, nogil=True)
    def _block_gram(base, models, centered, start, stop, out):
        """`gram` for one block (reassociated sums, as in `_block_products`)."""
        n = len(models)
        for i in range(n):
            for k in range(i, n):
                total = 0.0
                for j in range(start, stop):
                    origin = load(base, j) if centered else np.float32(0.0)
                    total += np.float64(load(models[i], j) - origin) * np.float64(
                        load(models[k], j) - origin
                    )
                out[i, k] = total
                out[k, i] = total

    @njit(parallel=True, cache=True, nogil=True)
    def _gram(base, models, centered, sums):
        n = models[0].size
        for blk in prange((n + BLOCK - 1) // BLOCK):
            stop = min(n, (blk + 1) * BLOCK)
            _block_gram(base, models, centered, blk * BLOCK, stop, sums[blk])

    @njit(parallel=True, cache=True, nogil=True)
    def _combine(base, models, centered, coef, out):
        """out = sum_i coef_i v_i (+ base when `centered`, v_i = models_i - base), each entry
        accumulated in float32 model by model as torch's add_(alpha=) does."""
        n = models[0].size
        for blk in prange((n + BLOCK - 1) // BLOCK):
            start = blk * BLOCK
            size = min(n, start + BLOCK) - start
            acc = np.empty(size, np.float32)
            for t in range(size):
                acc[t] = load(base, start + t) if centered else np.float32(0.0)
            for i in range(len(models)):
                model, c = models[i], coef[i]
                for t in range(size):
                    origin = load(base, start + t) if centered else np.float32(0.0)
                    acc[t] = fma(c, load(model, start + t) - origin, acc[t])
            for t in range(size):
                store(out, start + t, acc[t])


SAMPLE = 1 << 16  # at most this many entries sampled to predict a top-k threshold


def top_ks(mode: int, base: Tensor, models: list[Tensor], i: int, ks: list[int]):
    """[(value, cut)] per k: the k largest entries of the statistic (`value`'s mode) are those
    above `value` and those equal to it before position `cut`.

    Exact and in one pass, usually: a sample of the entries predicts a narrow range [low,
    high] of float32 patterns that holds the k-th largest; the pass counts the entries above
    it and those equal to either end (per block, to find a tie's cut by reading one block
    again), and collects those strictly inside (a fraction of a percent), which give the
    rest. In the benchmark family 6% of a 5632x2048 tensor's |d| equal the k-th largest:
    collecting them, as the pass did before, took half its time (10.1 ms for top_ks then,
    5.2 ms now). A wrong prediction (rare) costs a histogram pass, which finds the range, and
    a second pass."""
    found, _ = _top_ks(mode, base, models, i, ks, with_energy=False)
    return found


def selection_energy(base: Tensor, models: list[Tensor], k: int) -> tuple[tuple, np.ndarray]:
    """SCE's Select and Calculate in one pass, for 0 < k < n: the (value, cut) of the k
    entries of largest variance across the models (as `top_ks` mode 1), and per model the sum
    over them of d * d (float32 squares summed in float64). Summing in the top-k pass saves
    SCE one of its three passes over the tensors."""
    (top,), energy = _top_ks(1, base, models, 0, [k], with_energy=True)
    return top, energy


def _top_ks(mode, base, models, i, ks, with_energy):
    """`top_ks`'s thresholds, and with `with_energy` (one k) `selection_energy`'s sums."""
    base_, models_ = array(base), tuple(array(m) for m in models)
    n = base_.size
    ks = [min(max(k, 0), n) for k in ks]
    inner = sorted({k for k in ks if 0 < k < n})
    found = {0: (float("inf"), 0), n: (-1.0, 0)}
    if not inner:
        return [found[k] for k in ks], None
    if len(inner) > 2:
        raise ValueError(f"top_ks finds at most two thresholds in one pass, not {ks}")
    threads = numba.get_num_threads()
    size = min(SAMPLE, max(n // 64, 1024))
    sample = _sample(mode, base_, models_, i, _spots(n, size)).view(np.uint32)
    ends = []  # per k, the sample ranks that bound it
    for k in inner:
        q = 1 - k / n  # the k-th largest's quantile
        margin = 4 * (size * q * (1 - q)) ** 0.5 + 8  # 4 sigma: wrong 1 time in 15,000
        ends.append([int(np.clip(size * q + m * margin, 0, size - 1)) for m in (-1, 1)])
    sample.sort()  # numpy's vectorised sort: 0.12 ms, partitioning at four ranks took 0.9
    bounds = sample[ends]  # per k, inclusive float32 patterns
    collected = sum((sample > low) & (sample < high) for low, high in bounds)
    capacity = _capacity(collected.mean() * n, threads)
    step = _range_size(n, threads)
    blocks = step // BLOCK
    while True:
        counts = np.zeros((threads, len(inner), 2), np.int64)
        equal = np.zeros((threads, blocks, len(inner), 2), np.int64)
        sums = np.zeros((threads, blocks, len(models_), 3) if with_energy else (0, 0, 0, 3))
        bits = np.empty(threads * capacity, np.uint32)
        positions = np.empty(len(bits), np.int64)
        hits = _scan(
            mode, base_, models_, i, bounds, capacity, bits, positions, counts, equal, sums,
            threads,
        )  # fmt: skip
        at_or_above, above = counts.sum(0).T
        inside = all(above[r] < k <= at_or_above[r] for r, k in enumerate(inner))
        if inside and hits.max() <= capacity:
            break
        if inside:
            capacity = int(hits.max())
            continue
        # the sample predicted wrong (rare): a histogram pass finds each k's bucket
        histogram = np.zeros((threads, 1 << 16), np.int64)
        _histogram(mode, base_, models_, i, histogram, threads)
        histogram = histogram.sum(0)
        buckets = [_highest(histogram, k)[0] for k in inner]
        bounds[:] = [(b << 16, b << 16 | 0xFFFF) for b in buckets]
        capacity = int(histogram[list(set(buckets))].sum())
    for r, k in enumerate(inner):
        low, high = bounds[r]
        at_high, at_low = equal[:, :, r, 1], equal[:, :, r, 0]
        above_low = at_or_above[r] - at_low.sum()
        if k <= above[r] + at_high.sum():  # the k-th largest equals high
            target = high
            cut = _cut_equal(mode, base_, models_, i, at_high, high, k - above[r], threads)
        elif k <= above_low:  # it lies strictly between: among the collected entries
            rank = k - above[r] - at_high.sum()
            target, cut = _resolve(bits, positions, hits, capacity, low, high, rank)
        else:
            target = low
            cut = _cut_equal(mode, base_, models_, i, at_low, low, k - above_low, threads)
        found[k] = (float(np.uint32(target).view(np.float32)), int(cut))
    result = [found[k] for k in ks]
    if not with_energy:
        return result, None
    # the selected entries: those above high; those equal to high, all or those before the
    # cut; those collected inside (low, high) above the k-th largest, or equal to it and
    # before the cut; those equal to low before the cut
    sums = sums.reshape(threads * blocks, len(models_), 3)  # blocks in position order
    energy = sums[:, :, 0].sum(0)
    if target == high:
        energy += _before_cut(sums[:, :, 1], base_, models_, target, cut, step, blocks)
        return result, energy
    energy += sums[:, :, 1].sum(0)
    kept = np.concatenate([positions[t * capacity :][: hits[t]] for t in range(threads)])
    if target == low:
        energy += _before_cut(sums[:, :, 2], base_, models_, target, cut, step, blocks)
    else:
        patterns = np.concatenate([bits[t * capacity :][: hits[t]] for t in range(threads)])
        kept = kept[(patterns > target) | ((patterns == target) & (kept < cut))]
    return result, energy + _squares_at(base, models, kept)


def _before_cut(sums, base_, models_, target, cut, step, blocks) -> np.ndarray:
    """Per model, the sum of d * d over the entries equal to `target` before position `cut`,
    given the per-block sums over all such entries (`sums[block, model]`, blocks in position
    order): the blocks before the one that holds position cut - 1, and that one read again."""
    thread = (cut - 1) // step
    block = (cut - 1 - thread * step) // BLOCK
    begin = thread * step + block * BLOCK
    part = np.zeros(len(models_))
    _equal_energy(1, base_, models_, np.uint32(target), begin, cut, part)
    return sums[: thread * blocks + block].sum(0) + part


def _squares_at(base: Tensor, models: list[Tensor], positions: np.ndarray) -> np.ndarray:
    """Per model, the sum of d * d (float32 squares, summed in float64) at `positions`."""
    at = torch.from_numpy(positions)
    origin = base.reshape(-1)[at].float()
    # numpy's pairwise float64 sum: its order does not depend on torch's thread count
    squares = [(m.reshape(-1)[at].float() - origin).square().numpy() for m in models]
    return np.array([s.sum(dtype=np.float64) for s in squares])


@functools.lru_cache(maxsize=16)
def _spots(n: int, size: int) -> np.ndarray:
    """`size` positions spread evenly over n, jittered so that they do not fall on the same
    columns of every row."""
    jitter = np.random.default_rng(0).integers(0, max(n // size, 1), size)
    return np.arange(size) * n // size + jitter


def _capacity(expected: float, threads: int) -> int:
    """Room per thread for the entries a scan collects, `expected` in all."""
    return int(expected * 1.5 / threads) + 4096


def _resolve(bits, positions, hits, capacity, low, high, r) -> tuple[np.uint32, int]:
    """The r-th largest pattern among the collected entries inside [low, high] and the position
    after the entry equal to it that is the last one kept (ties go to the earliest)."""
    counts = np.zeros((len(hits), 1 << 16), np.int64)
    _collected_counts(bits, hits, capacity, low, high, -1, counts)
    bucket, above = _highest(counts.sum(0), r)
    counts[:] = 0
    _collected_counts(bits, hits, capacity, low, high, bucket, counts)
    rest, greater = _highest(counts.sum(0), r - above)
    target = np.uint32(bucket << 16 | rest)
    return target, _cut(bits, positions, hits, capacity, target, r - above - greater)


MERGE_PARAMS = (
    "keep_value", "keep_cut", "drop_value", "drop_cut", "draw_rule", "density", "low", "span",
    "first", "second", "divide", "factor", "weight", "sign_consensus", "normalize",
    "weight_total", "lam", "select_variance", "square",
)  # fmt: skip


def merge(base: Tensor, models: list[Tensor], out: Tensor | None, row: int, params: dict):
    """Run `_merge` with `params` (MERGE_PARAMS, as sparse.py builds them). With `out` None,
    return per model the sums over all entries and over the kept ones of |d| (or d^2 with
    `square`) instead of writing an output."""
    base_, models_ = array(base), tuple(array(m) for m in models)
    n = base_.size
    block = max(row, BLOCK // row * row)
    blocks = (n + block - 1) // block
    sums = np.zeros((blocks if out is None else 0, len(models), 2), np.float64)
    target = base_[:0] if out is None else array(out)
    _merge(base_, models_, target, row, block, *(params[k] for k in MERGE_PARAMS), sums)
    return sums.sum(0) if out is None else None


def largest_magnitude(t: Tensor) -> float:
    """max |x| over a floating tensor: inf where one is infinite, NaN where one is NaN. On the
    CPU one pass over the stored bits (torch's aminmax on bfloat16, which the merge engine's
    checks used, took 15% of a SLERP merge's CPU time), else torch."""
    if t.numel() == 0:
        return 0.0
    if not usable(t):
        lo, hi = (v.item() for v in torch.aminmax(t))  # NaN propagates to both
        return math.nan if math.isnan(hi) else max(-lo, hi)
    bits = array(t)
    if bits.dtype == np.float32:
        bits = bits.view(np.uint32)
    maxima = np.empty((bits.size + BLOCK - 1) // BLOCK, bits.dtype)
    _largest_pattern(bits, maxima)
    top = int(maxima.max())
    pattern = np.uint32(top << 16 if bits.dtype == np.uint16 else top)
    return float(pattern.view(np.float32))


def delta_products(base: Tensor, a: Tensor, b: Tensor) -> tuple[float, float, float]:
    """(sum da*db, sum da^2, sum db^2) for da = a - base, db = b - base, summed in float64."""
    blocks = (base.numel() + BLOCK - 1) // BLOCK
    sums = np.zeros((blocks, 3), np.float64)
    _delta_products(array(base), array(a), array(b), sums)
    dot, aa, bb = sums.sum(0)
    return float(dot), float(aa), float(bb)


def lerp(a: Tensor, b: Tensor, w: float, out_dtype: torch.dtype) -> Tensor:
    """torch.lerp(a.float(), b.float(), w).to(out_dtype), bit for bit, in one pass."""
    out = buffers.empty(a.shape, out_dtype)
    _lerp(array(a), array(b), np.float32(w), array(out))
    return out


def gram(base: Tensor | None, models: list[Tensor]) -> np.ndarray:
    """The float64 Gram matrix of the models (of their task vectors when `base` is given)."""
    models_ = tuple(array(m) for m in models)
    blocks = (models_[0].size + BLOCK - 1) // BLOCK
    sums = np.zeros((blocks, len(models), len(models)), np.float64)
    origin = models_[0] if base is None else array(base)
    _gram(origin, models_, base is not None, sums)
    return sums.sum(0)


def combine(base: Tensor | None, models: list[Tensor], coef, out_dtype: torch.dtype) -> Tensor:
    """sum_i coef_i models_i, or base + sum_i coef_i (models_i - base), in out_dtype."""
    models_ = tuple(array(m) for m in models)
    out = buffers.empty(models[0].shape, out_dtype)
    origin = models_[0] if base is None else array(base)
    _combine(origin, models_, base is not None, np.asarray(coef, np.float32), array(out))
    return out
