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

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from medmerge import buffers
from medmerge.architectures import (
    SEPARATE,
    Attention,
    Experts,
    HeadLayout,
    Segment,
    expert_tensor,
    segments,
)
from medmerge.methods.streaming import spans

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


def blocks(tensor: Tensor, seg: Segment, n: int) -> Tensor:
    """The segment of `tensor` as `n` per-head blocks, one row each."""
    part = tensor.narrow(seg.axis, seg.start, seg.stop - seg.start)
    if seg.axis == 0:
        return part.reshape(n, -1)
    return part.reshape(part.shape[0], n, -1).transpose(0, 1).reshape(n, -1)


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


def permute_heads(
    tensors: dict[str, Tensor],
    q: list[int],
    kv: list[int],
    layout: HeadLayout,
    attention: Attention = SEPARATE,
) -> dict[str, Tensor]:
    """Apply one head permutation consistently to every head-indexed tensor of a layer."""
    out = {}
    for name, t in tensors.items():
        for seg in segments(name, tuple(t.shape), attention, layout):
            t = permute_segment(t, seg, q if seg.role == "q" else kv, count(seg, layout))
        out[name] = t
    return out


def _cosine_cost(pairs: list[tuple[Tensor, Tensor]], n: int) -> np.ndarray:
    """1 - cos between every head of A and every head of B (n of each), each head's vector
    being its blocks from all the (A blocks, B blocks) pairs given, concatenated (no pairs: all
    zeros). Computed from Gram matrices and norms (in float32 whatever the stored dtype), so no
    concatenated or normalised copy of the weights is made."""
    if not pairs:
        return np.zeros((n, n))
    pairs = [(_float32(a), _float32(b)) for a, b in pairs]
    dot = sum(a @ b.T for a, b in pairs)
    norm_a = torch.sqrt(sum(torch.linalg.vector_norm(a, dim=1) ** 2 for a, _ in pairs))
    norm_b = torch.sqrt(sum(torch.linalg.vector_norm(b, dim=1) ** 2 for _, b in pairs))
    norm_a, norm_b = norm_a.clamp_min(1e-12), norm_b.clamp_min(1e-12)
    return (1.0 - dot / torch.outer(norm_a, norm_b)).double().cpu().numpy()


def _float32(t: Tensor) -> Tensor:
    """t in float32, in a fresh buffer from `buffers.empty` (each layer converts ~50 MB)."""
    if t.dtype == torch.float32:
        return t
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
    a: dict[str, Tensor],
    b: dict[str, Tensor],
    layout: HeadLayout,
    attention: Attention = SEPARATE,
) -> Alignment:
    """One function-preserving permutation of B's heads that best matches A's, over a layer's
    head-indexed tensors `a` and `b`.

    kv groups are matched first, on a cost that adds the k/v dissimilarity of the two groups to
    the mean cost of the best matching of their query heads (q rows with o columns); then query
    heads are matched inside each matched pair of groups.
    """
    H, K, G = layout.heads, layout.kv_heads, layout.group

    def pairs(role):
        return [
            (blocks(a[n], seg, count(seg, layout)), blocks(b[n], seg, count(seg, layout)))
            for n in a
            for seg in segments(n, tuple(a[n].shape), attention, layout)
            if seg.role == role
        ]

    q_cost = _cosine_cost(pairs("q"), H)
    kv_cost = _cosine_cost(pairs("kv"), K)
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


def per_tensor_alignment(a: Tensor, b: Tensor, seg: Segment, layout: HeadLayout) -> Alignment:
    """The paper's Algorithm 2: one tensor's (one segment's) head blocks matched on their own."""
    n = count(seg, layout)
    cost = _cosine_cost([(blocks(a, seg, n), blocks(b, seg, n))], n)
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


def _expert_rows(tensors: dict[str, Tensor], layouts: tuple[Experts, ...], n: int) -> dict:
    """Per tensor key, the n experts' flat vectors (views: no copy)."""
    rows: dict[str, list] = {}
    for name, t in tensors.items():
        found = expert_tensor(name, layouts)
        if found.expert is None:
            rows[found.key] = [t[e].reshape(-1) for e in range(n)]
        else:
            rows.setdefault(found.key, [None] * n)[found.expert] = t.reshape(-1)
    return rows


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
    rows_a, rows_b = _expert_rows(a, layouts, n), _expert_rows(b, layouts, n)
    rows_0 = _expert_rows(base, layouts, n) if base is not None else None
    dot = torch.zeros(n, n, dtype=torch.float64)
    sq_a = torch.zeros(n, dtype=torch.float64)
    sq_b = torch.zeros(n, dtype=torch.float64)
    for key, ra in rows_a.items():
        rb = rows_b[key]
        for part in spans(ra[0].numel(), ra[0].device):
            xa = torch.stack([r[part] for r in ra]).float()
            xb = torch.stack([r[part] for r in rb]).float()
            if rows_0 is not None:
                x0 = torch.stack([r[part] for r in rows_0[key]]).float()
                xa, xb = xa - x0, xb - x0
            dot += (xa @ xb.T).double().cpu()
            sq_a += (xa * xa).sum(dim=1).double().cpu()
            sq_b += (xb * xb).sum(dim=1).double().cpu()
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
        if found.expert is None:
            out[name] = t[index.to(t.device)]
        else:
            out[name] = tensors[found.name(perm[found.expert])]
    return out
