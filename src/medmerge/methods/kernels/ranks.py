"""DELLA's MagPrune keep probabilities: per row, by the ascending rank of |d|, counted, not
sorted (bfloat16 task vectors take few distinct values per row)."""

from __future__ import annotations

import numpy as np
from numba import njit

from medmerge.methods.kernels.core import load

BUCKETS = 1 << 12  # the rank histogram: at most this many buckets in use per row
PATTERNS = (1 << 15) + 1  # its tables, indexed by a non-negative float32's top 16 bits (+ one)


@njit(inline="always")
def workspace(row):
    """Scratch room for `magprune` on rows of `row` entries (no room where row is 0)."""
    patterns = PATTERNS if row > 0 else 0
    return (
        np.empty((4, row), np.uint32),
        np.empty((3, patterns), np.int32),
        np.empty(patterns, np.float32),
    )


@njit(inline="always")
def _keep_probability(twice_rank, line):
    """DELLA's keep probability from twice an entry's (average) rank, as `sparsify.magprune`
    has it: low + span * rank / scale, for line = (low, span, scale)."""
    low, span, scale = line
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


@njit(cache=True, nogil=True)
def magprune(base, model, start, line, average, work, prob):
    """DELLA's keep probability of each entry of the row of `len(prob)` entries from `start`,
    low + span * rank / scale for line = (low, span, scale), where rank is the ascending rank
    of |d| in the row, equal |d| ranked in position order or, with `average`, given their
    average rank. Torch twin: `sparsify.magprune`.

    Counting, not sorting: a histogram of the |d| patterns by their top 16 bits (more bits
    per bucket where the row's range would need more than BUCKETS buckets) ranks every
    "regular" entry, one whose pattern has no lower bits set: every |d| of two bfloat16
    weights of the same exponent. A bucket's regular entries are equal: in position order they
    take the bucket's next ranks, or with `average` they share one probability, looked up per
    entry in `table`. The others, a few percent and larger
    than their bucket's regular ones, rank within their bucket: directly when alone in it
    (most are), else by `_sort_by_key`. The tables are indexed by the pattern's bits
    themselves, so the per-entry loops need no offset or clamp; bucket 0 (zero, and any |d|
    below 2 ** shift) is counted at `first`, the bucket below the least other |d|'s, which
    holds nothing else, so that the buckets in use are first..last. `work` is `workspace(row)`."""
    scratch, counts, table = work
    row = len(prob)
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
    if average:
        for b in range(used):  # twice the regular entries' average rank
            twice = np.int32(in_use[b] + in_use[b + 1] - in_use_others[b] - np.int32(1))
            in_use_table[b] = _keep_probability(np.float32(twice), line)
        table[0] = table[first]
        for j in range(row):
            prob[j] = table[keys[j] >> shift]
    else:  # a bucket's regular entries take its first ranks, in position order
        cursor = counts[2]
        cursor[first : last + 1] = before[first : last + 1]
        cursor[0] = before[first]  # zero's bucket (counted at `first`, which is otherwise empty)
        for j in range(row):
            key = keys[j]
            if (key & lower) == 0:
                b = key >> shift
                rank = cursor[b]
                cursor[b] = rank + 1
                prob[j] = _keep_probability(np.float32(2 * rank), line)
    several = 0  # buckets with several others, listed in odd_before (read by then)
    for e in range(m):
        j = odd_at[e]
        b = max(keys[j] >> shift, first)
        begin = before[b + 1] - others[b]  # the bucket's others take ranks begin...
        if others[b] == 1:
            prob[j] = _keep_probability(np.float32(2 * begin), line)
            continue
        slots[begin + odd_before[e]] = j
        if odd_before[e] == 0:
            odd_before[several] = b
            several += 1
    for e in range(several):
        b = odd_before[e]
        begin, end = before[b + 1] - others[b], before[b + 1]
        _sort_by_key(keys, slots[begin:end])  # stable: equal keys stay in position order
        s = begin
        while s < end:  # equal keys at ranks s..t-1 share their average, or take them in order
            t = s + 1
            while t < end and keys[slots[t]] == keys[slots[s]]:
                t += 1
            for u in range(s, t):
                twice = s + t - 1 if average else 2 * u
                prob[slots[u]] = _keep_probability(np.float32(twice), line)
            s = t
