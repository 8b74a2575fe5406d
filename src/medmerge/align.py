"""Attention-head permutations: find them (linear sum assignment) and apply them (GQA-aware).

A permutation of attention heads leaves a model's function unchanged only if the same permutation
reorders the output rows of q_proj, k_proj and v_proj (and their biases) and the input columns of
o_proj. With grouped-query attention (H query heads sharing K key/value heads in groups of
G = H / K), a valid permutation moves whole kv groups and, inside a group, the query heads that
share it. Rotary embeddings act within a head, so whole-head moves are safe.

A permutation is stored as `kv` (length K: new group g takes old group kv[g]) and `q` (length H:
new query head h takes old head q[h]); `q` keeps every head inside the group `kv` sent it to.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from medmerge import buffers
from medmerge.errors import IncompatibleModelsError

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class HeadLayout:
    heads: int  # query heads H
    kv_heads: int  # key/value heads K
    head_dim: int  # D

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @classmethod
    def from_config(cls, config: dict) -> HeadLayout:
        """Head counts as transformers defines them: `num_key_value_heads` defaults to
        `num_attention_heads`, `head_dim` to hidden_size // num_attention_heads."""
        cfg = config.get("text_config", config)
        if "num_attention_heads" not in cfg or "hidden_size" not in cfg:
            raise IncompatibleModelsError(
                "the model config has no num_attention_heads/hidden_size, so attention heads "
                "cannot be aligned; use `alignment: none`"
            )
        heads = int(cfg["num_attention_heads"])
        kv = int(cfg.get("num_key_value_heads") or heads)
        dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
        if heads % kv:
            raise IncompatibleModelsError(
                f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}"
            )
        return cls(heads, kv, dim)

    def check(self, name: str, tensor: Tensor) -> None:
        rows = self.heads if ".q_proj." in name or ".o_proj." in name else self.kv_heads
        size = tensor.shape[1] if ".o_proj.weight" in name else tensor.shape[0]
        if size != rows * self.head_dim:
            raise IncompatibleModelsError(
                f"tensor {name!r} has {size} head rows/columns, but the config says "
                f"{rows} heads x head_dim {self.head_dim}"
            )


def projection(name: str) -> str | None:
    return next((p for p in PROJECTIONS if f".{p}." in name), None)


def head_blocks(name: str, tensor: Tensor, count: int, dim: int) -> Tensor:
    """The tensor as `count` per-head blocks, one row each: output rows of q/k/v (and biases),
    input columns of o."""
    if projection(name) == "o_proj" and name.endswith("weight"):
        return tensor.reshape(tensor.shape[0], count, dim).transpose(0, 1).reshape(count, -1)
    return tensor.reshape(count, -1)


def permute_blocks(name: str, tensor: Tensor, perm, count: int, dim: int) -> Tensor:
    """Reorder the per-head blocks of one tensor: new block i is old block perm[i] (the
    tensor itself for the identity, the usual case for parents fine-tuned from one base)."""
    if list(perm) == list(range(count)):
        return tensor
    index = torch.as_tensor(np.asarray(perm), device=tensor.device)
    if projection(name) == "o_proj" and name.endswith("weight"):
        out = tensor.reshape(tensor.shape[0], count, dim)[:, index]
        return out.reshape(tensor.shape)
    return tensor.reshape(count, -1)[index].reshape(tensor.shape)


def permute_heads(
    tensors: dict[str, Tensor], q: list[int], kv: list[int], layout: HeadLayout
) -> dict[str, Tensor]:
    """Apply one head permutation consistently to a layer's q, k, v (rows) and o (columns)."""
    out = {}
    for name, t in tensors.items():
        proj = projection(name)
        if proj in ("q_proj", "o_proj"):
            out[name] = permute_blocks(name, t, q, layout.heads, layout.head_dim)
        elif proj in ("k_proj", "v_proj"):
            out[name] = permute_blocks(name, t, kv, layout.kv_heads, layout.head_dim)
        else:
            out[name] = t
    return out


def _cosine_cost(pairs: list[tuple[Tensor, Tensor]]) -> np.ndarray:
    """1 - cos between every head of A and every head of B, each head's vector being its blocks
    from all the (A blocks, B blocks) pairs given, concatenated. Computed from Gram matrices and
    norms (in float32 whatever the stored dtype), so no concatenated or normalised copy of the
    weights is made."""
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


def joint_alignment(a: dict[str, Tensor], b: dict[str, Tensor], layout: HeadLayout) -> Alignment:
    """One function-preserving permutation of B's heads that best matches A's.

    kv groups are matched first, on a cost that adds the k/v dissimilarity of the two groups to
    the mean cost of the best matching of their query heads (q rows with o columns); then query
    heads are matched inside each matched pair of groups.
    """
    H, K, D, G = layout.heads, layout.kv_heads, layout.head_dim, layout.group

    def blocks(projs, count):
        return [
            (head_blocks(n, a[n], count, D), head_blocks(n, b[n], count, D))
            for n in a
            if projection(n) in projs
        ]

    q_cost = _cosine_cost(blocks(("q_proj", "o_proj"), H))
    kv_cost = _cosine_cost(blocks(("k_proj", "v_proj"), K))
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


def per_tensor_alignment(name: str, a: Tensor, b: Tensor, count: int, dim: int) -> Alignment:
    """The paper's Algorithm 2: one projection's head blocks matched on their own."""
    cost = _cosine_cost([(head_blocks(name, a, count, dim), head_blocks(name, b, count, dim))])
    perm = _assign(cost)
    idx = np.arange(count)
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
