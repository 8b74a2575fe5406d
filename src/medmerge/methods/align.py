"""Attention-head and expert permutations: find them (linear sum assignment) and apply them.

A permutation of attention heads leaves a model's function unchanged only if the same permutation
reorders every tensor that carries the head index (`architectures.segments`: the q, k and v rows
however they are stored, their biases, per-head norms, the output projection's input columns).
With grouped-query attention (H query heads sharing K key/value heads in groups of G = H / K), a
valid permutation moves whole kv groups and, inside a group, the query heads that share it.
Rotary embeddings act within a head, so whole-head moves are safe.

A permutation is stored as `kv` (length K: new group g takes old group kv[g]) and `q` (length H:
new query head h takes old head q[h]); `q` keeps every head inside the group `kv` sent it to.

Experts of a mixture-of-experts layer are permuted as a whole (`architectures.expert_tensor`):
new expert e takes old expert perm[e], in every expert tensor and in the router's rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from medmerge.errors import NonFiniteCosts
from medmerge.io import buffers
from medmerge.methods.streaming import CHUNK, Blocked, rows, take_rows
from medmerge.models.architectures import (
    SEPARATE,
    Attention,
    Experts,
    HeadLayout,
    Segment,
    expert_tensor,
    segments,
)

__all__ = [
    "HeadLayout",
    "expert_alignment",
    "joint_alignment",
    "per_tensor_alignment",
    "permute_experts",
    "permute_heads",
]


def count(seg: Segment, layout: HeadLayout) -> int:
    return layout.heads if seg.role == "q" else layout.kv_heads


def permute_segment(tensor: Tensor, seg: Segment, perm, n: int) -> Tensor:
    """`tensor` with the blocks of one segment reordered: new block i is old block perm[i]
    (the tensor itself for the identity, the usual case for parents of one base)."""
    if list(perm) == list(range(n)):
        return tensor
    index = torch.as_tensor(np.asarray(perm), device=tensor.device)
    out = tensor.clone()
    part = tensor.narrow(seg.axis, seg.start, seg.stop - seg.start)
    if seg.axis == 0:
        moved = part.reshape(n, -1)[index].reshape(part.shape)
    else:
        moved = part.reshape(part.shape[0], n, -1)[:, index].reshape(part.shape)
    out.narrow(seg.axis, seg.start, seg.stop - seg.start).copy_(moved)
    return out


def permuted(t: Tensor | Blocked, moves: list[tuple[Segment, list[int]]]) -> Tensor | Blocked:
    """`t` with the head blocks of each segment reordered by its permutation (`moves`, a
    segment and its perm: new block i is old block perm[i]). Of a `Blocked` input, a `Blocked`
    tensor whose blocks read the rows they take from the shard, and reorder columns in memory."""
    moves = [(seg, perm) for seg, perm in moves if list(perm) != list(range(len(perm)))]
    if not isinstance(t, Blocked):
        for seg, perm in moves:
            t = permute_segment(t, seg, perm, len(perm))
        return t
    if not moves:
        return t
    source = np.arange(t.shape[0])  # the row each row takes
    for seg, perm in moves:
        if seg.axis == 0:
            d = (seg.stop - seg.start) // len(perm)
            heads = seg.start + np.asarray(perm)[:, None] * d + np.arange(d)
            source[seg.start : seg.stop] = heads.reshape(-1)
    columns = [(seg, perm) for seg, perm in moves if seg.axis == 1]
    return gathered(t, source, lambda block: permuted(block, columns))


def gathered(t: Blocked, source: np.ndarray, then=None) -> Blocked:
    """A `Blocked` tensor of t's blocks whose row i is t's row source[i] (each block read from
    the shard in runs of consecutive rows), each block passed through `then` where given."""

    def get(k: int) -> Tensor:
        start, stop = t.blocks[k]
        block = take_rows(t, source[start:stop])
        return then(block) if then else block

    return Blocked(t.shape, t.dtype, t.blocks, get)


def permute_heads(
    tensors: dict[str, Tensor | Blocked],
    q: list[int],
    kv: list[int],
    layout: HeadLayout,
    attention: Attention = SEPARATE,
) -> dict[str, Tensor | Blocked]:
    """Apply one head permutation consistently to every head-indexed tensor of a layer."""
    return {
        name: permuted(t, [(seg, q if seg.role == "q" else kv)
                           for seg in segments(name, tuple(t.shape), attention, layout)])
        for name, t in tensors.items()
    }  # fmt: skip


GRAM = 1 << 23  # entries per head matrix (one per model) of one step of a head cost


def _head_parts(t: Tensor | Blocked, seg: Segment, n: int) -> Iterator[Tensor]:
    """The segment's n heads of `t` as (n, m) float32 parts: concatenated, row h holds head
    h's entries (its d rows, or its d columns of every row, in order). The steps are fixed by
    the tensor's shape, so a `Blocked` input (read step by step from its shard) gives the same
    parts as the whole tensor."""
    shape = tuple(t.shape)
    d = (seg.stop - seg.start) // n
    if seg.axis == 0:  # each head d rows (entries, of a bias)
        width = math.prod(shape[1:])
        step = max(1, min(d, GRAM // (n * width)))
        for r in range(0, d, step):
            heads = rows(t, seg.start, seg.stop).reshape(n, d, -1)[:, r : r + step]
            yield _float32(heads).view(n, -1)
        return
    step = max(1, GRAM // (seg.stop - seg.start))  # each head d columns of every row
    for r in range(0, shape[0], step):
        part = rows(t, r, r + step)[:, seg.start : seg.stop]
        heads = part.reshape(part.shape[0], n, d).transpose(0, 1)
        yield _float32(heads).view(n, -1)


def _cosine_cost(
    a: dict, b: dict, segs: list[tuple[str, Segment]], n: int, base: dict | None = None
) -> np.ndarray:
    """1 - cos between every head of A and every head of B (n of each), each head's vector
    being its blocks in all the segments `segs` (tensor name, segment) of `a` and `b` (minus
    `base`'s, where given), concatenated (no segments: all zeros). The Gram matrices and norms
    are summed over cache-sized parts of the heads (`_head_parts`) in float64, so no
    concatenated or normalised copy of the weights is made."""
    if not segs:
        return np.zeros((n, n))
    dot = torch.zeros(n, n, dtype=torch.float64)
    sq_a = torch.zeros(n, dtype=torch.float64)
    sq_b = torch.zeros(n, dtype=torch.float64)
    for name, seg in segs:
        parts = [_head_parts(x[name], seg, n) for x in (a, b, base) if x is not None]
        for xa, xb, *x0 in zip(*parts, strict=True):
            if x0:
                xa, xb = xa - x0[0], xb - x0[0]
            dot += (xa @ xb.T).double().cpu()
            sq_a += (xa * xa).sum(1, dtype=torch.float64).cpu()
            sq_b += (xb * xb).sum(1, dtype=torch.float64).cpu()
    _refuse_nonfinite(dot, sq_a, sq_b, sorted({name for name, _ in segs}))
    norms = torch.outer(sq_a.sqrt().clamp_min(1e-12), sq_b.sqrt().clamp_min(1e-12))
    return (1.0 - dot / norms).numpy()


def _refuse_nonfinite(dot: Tensor, sq_a: Tensor, sq_b: Tensor, names: list[str]) -> None:
    """Raise `NonFiniteCosts` where the sums of a cost are not finite (tensors read in parts
    from the shards, `Blocked`, are checked as their blocks are merged, after the costs)."""
    if not all(bool(torch.isfinite(x).all()) for x in (dot, sq_a, sq_b)):
        raise NonFiniteCosts(names)


def _float32(t: Tensor) -> Tensor:
    """A float32 copy of t (a view of a stored tensor, in any dtype) in a fresh buffer from
    `buffers.empty`."""
    return buffers.empty(t.shape, torch.float32, t.device).copy_(t)


def _assign(cost: np.ndarray) -> np.ndarray:
    """perm with perm[i] = the B block matched to A block i, minimising the total cost."""
    rows, cols = linear_sum_assignment(cost)
    perm = np.empty(len(rows), dtype=np.int64)
    perm[rows] = cols
    return perm


@dataclass
class Alignment:
    q: list[int]
    kv: list[int]
    cost_before: float  # total matching cost of the identity
    cost_after: float  # total matching cost of the permutation found

    @property
    def heads_moved(self) -> int:
        return sum(int(i != p) for i, p in enumerate(self.q))


def joint_alignment(
    a: dict[str, Tensor | Blocked],
    b: dict[str, Tensor | Blocked],
    layout: HeadLayout,
    attention: Attention = SEPARATE,
    base: dict[str, Tensor | Blocked] | None = None,
) -> Alignment:
    """One function-preserving permutation of B's heads that best matches A's, over a layer's
    head-indexed tensors `a` and `b` (their task vectors, where `base` is given).

    kv groups are matched first, on a cost that adds the k/v dissimilarity of the two groups to
    the mean cost of the best matching of their query heads (q rows with o columns); then query
    heads are matched inside each matched pair of groups.
    """
    H, K, G = layout.heads, layout.kv_heads, layout.group

    def segs(role):
        return [
            (n, seg)
            for n in a
            for seg in segments(n, tuple(a[n].shape), attention, layout)
            if seg.role == role
        ]

    q_cost = _cosine_cost(a, b, segs("q"), H, base)
    kv_cost = _cosine_cost(a, b, segs("kv"), K, base)
    inner = {}
    group_cost = np.empty((K, K))
    for ga in range(K):
        for gb in range(K):
            block = q_cost[ga * G : (ga + 1) * G, gb * G : (gb + 1) * G]
            perm = _assign(block)
            inner[ga, gb] = perm
            group_cost[ga, gb] = kv_cost[ga, gb] + block[np.arange(G), perm].mean()
    kv = _assign(group_cost)
    q = [int(kv[g] * G + inner[g, kv[g]][i]) for g in range(K) for i in range(G)]
    return Alignment(
        q=q,
        kv=[int(x) for x in kv],
        cost_before=float(np.trace(kv_cost) + np.trace(q_cost) / G),  # the identity's cost
        cost_after=float(group_cost[np.arange(K), kv].sum()),
    )


def per_tensor_alignment(
    a: Tensor | Blocked,
    b: Tensor | Blocked,
    seg: Segment,
    layout: HeadLayout,
    base: Tensor | Blocked | None = None,
) -> Alignment:
    """The paper's Algorithm 2: one tensor's (one segment's) head blocks matched on their own
    (their task vectors', where `base` is given)."""
    n = count(seg, layout)
    x0 = None if base is None else {"": base}
    cost = _cosine_cost({"": a}, {"": b}, [("", seg)], n, x0)
    perm = _assign(cost)
    idx = np.arange(n)
    return Alignment(
        q=[int(x) for x in perm],
        kv=[],
        cost_before=float(cost[idx, idx].sum()),
        cost_after=float(cost[idx, perm].sum()),
    )


def random_valid_permutation(layout: HeadLayout, generator: torch.Generator):
    """A random GQA-respecting permutation (q, kv), e.g. to test function preservation."""
    G = layout.group
    kv = torch.randperm(layout.kv_heads, generator=generator).tolist()
    q = [
        kv[g] * G + int(i)
        for g in range(layout.kv_heads)
        for i in torch.randperm(G, generator=generator)
    ]
    return q, kv


@dataclass
class ExpertAlignment:
    perm: list[int]  # new expert e takes old expert perm[e]
    cost_before: float
    cost_after: float

    @property
    def experts_moved(self) -> int:
        return sum(int(i != p) for i, p in enumerate(self.perm))


def _expert_parts(
    tensors: dict[str, Tensor | Blocked], layouts: tuple[Experts, ...], n: int
) -> Iterator[Tensor]:
    """The n experts' entries as (n, m) float32 parts, tensor by tensor (in the order of their
    names), each over steps of rows fixed by the tensor's shape, so `Blocked` inputs (read
    step by step) give the same parts as whole tensors."""
    experts: dict[str, list] = {}
    for name, t in tensors.items():
        found = expert_tensor(name, layouts)
        if found.expert is None:  # a row (or an entry) per expert
            experts[found.key] = [(t, e) for e in range(n)]
        else:
            experts.setdefault(found.key, [None] * n)[found.expert] = (t, None)

    def expert(t, e, start, stop):  # rows start..stop of expert e's tensor
        if e is None:
            return rows(t, start, stop)
        x = rows(t, e, e + 1)
        return (x[0] if x.dim() > 1 else x)[start:stop]

    for key in sorted(experts):
        t, e = experts[key][0]
        shape = tuple(t.shape) if e is None else (tuple(t.shape[1:]) or (1,))
        step = max(1, CHUNK // math.prod(shape[1:]))
        for start in range(0, shape[0], step):
            parts = [expert(t, e, start, start + step) for t, e in experts[key]]
            yield _float32(torch.stack(parts)).view(n, -1)


def expert_alignment(
    a: dict[str, Tensor],
    b: dict[str, Tensor],
    layouts: tuple[Experts, ...],
    n: int,
    base: dict[str, Tensor] | None = None,
) -> ExpertAlignment:
    """The permutation of B's n experts that best matches A's, on the cosine between each
    expert's weights (task vectors, where `base` is given): all its tensors and its router row,
    as one vector. The products are summed over cache-sized chunks in float64, so no float32
    copy of a layer's experts is made."""
    dot = torch.zeros(n, n, dtype=torch.float64)
    sq_a = torch.zeros(n, dtype=torch.float64)
    sq_b = torch.zeros(n, dtype=torch.float64)
    parts = [_expert_parts(x, layouts, n) for x in (a, b, base) if x is not None]
    for xa, xb, *x0 in zip(*parts, strict=True):
        if x0:
            xa, xb = xa - x0[0], xb - x0[0]
        dot += (xa @ xb.T).double().cpu()
        sq_a += (xa * xa).sum(1, dtype=torch.float64).cpu()
        sq_b += (xb * xb).sum(1, dtype=torch.float64).cpu()
    _refuse_nonfinite(dot, sq_a, sq_b, sorted(a))
    norms = torch.outer(sq_a.sqrt().clamp_min(1e-12), sq_b.sqrt().clamp_min(1e-12))
    cost = (1.0 - dot / norms).numpy()
    perm = _assign(cost)
    idx = np.arange(n)
    return ExpertAlignment(
        perm=[int(x) for x in perm],
        cost_before=float(cost[idx, idx].sum()),
        cost_after=float(cost[idx, perm].sum()),
    )


def permute_experts(
    tensors: dict[str, Tensor], perm: list[int], layouts: tuple[Experts, ...]
) -> dict[str, Tensor]:
    """A layer's expert tensors with expert e taking old expert perm[e]'s place (the tensors
    themselves for the identity)."""
    if perm == list(range(len(perm))):
        return tensors
    index = torch.as_tensor(perm)
    out = {}
    for name, t in tensors.items():
        found = expert_tensor(name, layouts)
        if found.expert is None and isinstance(t, Blocked):
            out[name] = gathered(t, index.numpy())
        elif found.expert is None:
            out[name] = t[index.to(t.device)]
        else:
            out[name] = tensors[found.name(perm[found.expert])]
    return out
