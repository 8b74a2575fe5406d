"""The paper's Hierarchical Cosine-OT-LERP, with function-preserving, GQA-aware head alignment.

Per tensor l, with task vectors Delta_X = X - base of the two parents A and B:
    w_l = clamp(max(0, cos(Delta_A,l, Delta_B,l)), min_weight, max_weight)
    theta_l = (1 - w_l) A_l + w_l B_l
where, for attention projections, B is first permuted head-wise to match A:
- `joint` (default): one GQA-respecting permutation per layer applied to q, k, v and o alike
  (function-preserving: B's permuted layer computes exactly what B's layer did); weights are
  computed on the aligned B, since a cosine between mismatched heads means nothing;
- `per_tensor`: the paper's Algorithm 2 literally: each projection (and bias) matched and
  permuted on its own, weights computed first on the unaligned tensors (Algorithm 1's order).
  This does not preserve B's function; it is kept to reproduce the paper;
- `none`: no alignment (cosine-weighted LERP only).
`weighting: fixed` uses `weight` instead of the cosine, to separate alignment from weighting.
`align_experts: true` (mixture-of-experts models) also permutes each layer's experts in B, with
the router's rows, to best match A's: one layer's experts are then read and held together.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import Tensor

from medmerge.errors import ConfigError
from medmerge.methods import kernels
from medmerge.methods.align import (
    HeadLayout,
    expert_alignment,
    joint_alignment,
    per_tensor_alignment,
    permute_experts,
    permute_heads,
    permuted,
)
from medmerge.methods.registry import entries, register
from medmerge.methods.streaming import Blocked, chunkwise, flat, spans, summed_terms
from medmerge.models.architectures import (
    attention_layout,
    attention_of,
    expert_tensor,
    experts_layout,
    experts_of,
    head_tensor,
    segments,
)


def layer_groups(names: Sequence[str], config: dict, params: dict[str, dict]) -> list[list[str]]:
    """One group per layer holding the tensors that carry its attention heads (the
    architecture's, `architectures.ATTENTION`), one per layer holding its router and experts
    where `align_experts` is set (`architectures.EXPERTS`); other tensors alone."""
    attention, experts = attention_layout(config), experts_layout(config)
    groups: list[list[str]] = []
    layers: dict[str, list[str]] = {}
    for name in names:
        key = _group_key(name, attention, experts if params[name]["align_experts"] else None)
        if key is None:
            groups.append([name])
        elif key in layers:
            layers[key].append(name)
        else:
            layers[key] = [name]
            groups.append(layers[key])
    return groups


def _group_key(name: str, attention, experts) -> str | None:
    """The group of tensor `name`: its layer's attention, its layer's experts, or none."""
    if attention and (found := head_tensor(name, attention)):
        return found[0].rstrip(".")
    if experts and (where := expert_tensor(name, experts)):
        return where.layer + "experts"
    return None


def delta_cosine(a: Tensor, b: Tensor, base: Tensor) -> float:
    """cos(a - base, b - base): float32 task vectors, their products summed in float64 (a
    float32 sum of millions of products loses digits that decide near-zero cosines),
    accumulated over cache-sized chunks (no full-size deltas); of `Blocked` inputs, block by
    block, summing the same terms in the same order."""
    blocked = isinstance(a, Blocked)
    if blocked and kernels.usable_dtypes({a.dtype, b.dtype, base.dtype}):
        terms = lambda k: kernels.delta_product_terms(base.get(k), a.get(k), b.get(k))  # noqa: E731
        dot, na, nb = (float(x) for x in summed_terms(terms, a))
    elif not blocked and kernels.usable(a, b, base):
        dot, na, nb = kernels.delta_products(base, a, b)
    else:
        dot = na = nb = 0.0
        fa, fb, f0 = flat(a), flat(b), flat(base)
        for part in spans(fa.numel(), a.device):
            base_part = f0[part].float()
            da = (fa[part].float() - base_part).double()
            db = (fb[part].float() - base_part).double()
            dot += float(torch.dot(da, db))
            na += float(torch.dot(da, da))
            nb += float(torch.dot(db, db))
    norm = (na * nb) ** 0.5
    return dot / norm if norm > 0 else 0.0


def lerp(a: Tensor, b: Tensor, w: float, out_dtype: torch.dtype) -> Tensor:
    """(1 - w) a + w b in float32 (torch.lerp), cast to `out_dtype`; of `Blocked` inputs, a
    `Blocked` result."""
    if isinstance(a, Blocked):
        return Blocked(
            a.shape, out_dtype, a.blocks, lambda k: lerp(a.get(k), b.get(k), w, out_dtype)
        )
    if kernels.usable(a, b, out_dtype=out_dtype):
        return kernels.lerp(a, b, w, out_dtype)
    # chunk by chunk, each chunk cast to the output dtype at once
    return chunkwise(lambda x, y: torch.lerp(x.float(), y.float(), w).to(out_dtype), a, b)


def summarize(records: list[dict]) -> dict:
    """What a reader of the diagnostics wants first: did any heads (or experts) move, and
    where."""
    aligned = [r for r in records if r.get("alignment") == "joint"]
    moved = [r["group"] for r in aligned if r["heads_moved"]]
    expert_layers = [r for r in records if r.get("alignment") == "experts"]
    experts_moved = [r["group"] for r in expert_layers if r["experts_moved"]]
    weights = [w for r in records for w in r["weights"].values()]
    if not aligned:
        verdict = "no joint alignment in this merge"
    elif moved:
        verdict = f"heads moved in {len(moved)} of {len(aligned)} layers: {', '.join(moved)}"
    else:
        verdict = (
            f"identity permutation in all {len(aligned)} layers, as expected for parents "
            "fine-tuned from one base"
        )
    if expert_layers:
        verdict += f"; experts moved in {len(experts_moved)} of {len(expert_layers)} layers" + (
            f": {', '.join(experts_moved)}" if experts_moved else ""
        )
    experts = {"layers_with_moved_experts": experts_moved} if expert_layers else {}
    return {
        **experts,
        "assignment_seconds": round(sum(r.get("assignment_seconds", 0.0) for r in records), 4),
        "layers_aligned": len(aligned),
        "layers_with_moved_heads": moved,
        "mean_weight": sum(weights) / len(weights) if weights else None,
        "zero_weight_tensors": sum(1 for w in weights if w == 0.0),
        "verdict": verdict,
    }


def _alignable(params: dict, config: dict) -> None:
    """Head alignment needs the model's attention layout, expert alignment its experts' layout:
    refused before any tensor is read."""
    if params["alignment"] != "none":
        attention_of(config)
    if params["align_experts"]:
        experts_of(config)


@register(
    "hierarchical",
    aliases=("cosine_ot_lerp",),
    raw_inputs=True,
    min_models=2,
    max_models=2,
    group=layer_groups,
    summarize=summarize,
    check=_alignable,
    # every tensor of a group over the budget as `Blocked`: the alignments sum their costs
    # over parts read as they are used, B's permuted tensors read their rows where they lie
    streams=entries,
)
def hierarchical(
    base: dict[str, Tensor],
    models: list[dict[str, Tensor]],
    *,
    alignment: str = "joint",
    weighting: str = "cosine",
    align_on: str = "weights",
    weight: float = 0.5,
    min_weight: float = 0.0,
    max_weight: float = 1.0,
    align_experts: bool = False,
    names: list[str],
    config: dict,
    diagnostics: list,
    out_dtype: torch.dtype = torch.float32,
) -> dict[str, Tensor]:
    """Cosine-weighted LERP of two parents with optimal-transport alignment of attention heads
    (Timilsina et al. 2025), and optionally of experts."""
    for key, value, allowed in (
        ("alignment", alignment, ("joint", "per_tensor", "none")),
        ("weighting", weighting, ("cosine", "fixed")),
        ("align_on", align_on, ("weights", "deltas")),
    ):
        if value not in allowed:
            raise ConfigError(
                f"hierarchical: {key} must be one of {', '.join(allowed)}, got {value!r}"
            )
    a, b = models
    attention = attention_layout(config)
    experts = experts_layout(config) if align_experts else None
    record: dict = {"group": _group_key(names[0], attention, experts) or names[0]}
    record["alignment"] = None
    # an unknown architecture with alignment is refused when the merge is planned (`_alignable`)
    is_attention = alignment != "none" and attention and head_tensor(names[0], attention)
    if experts and expert_tensor(names[0], experts):
        started = time.perf_counter()
        _, count_ = experts_of(config)
        found = expert_alignment(a, b, experts, count_, base if align_on == "deltas" else None)
        b = permute_experts(b, found.perm, experts)
        record.update(
            alignment="experts",
            expert_perm=found.perm,
            experts_moved=found.experts_moved,
            cost_before=found.cost_before,
            cost_after=found.cost_after,
            assignment_seconds=round(time.perf_counter() - started, 6),
        )
    weights_before_alignment = alignment == "per_tensor"

    def w_for(n: str, b_tensor: Tensor) -> float:
        w = weight if weighting == "fixed" else max(0.0, delta_cosine(a[n], b_tensor, base[n]))
        return min(max(w, min_weight), max_weight)

    weights = {n: w_for(n, b[n]) for n in names} if weights_before_alignment else {}
    if is_attention:
        layout = HeadLayout.from_config(config)
        segs = {n: segments(n, tuple(a[n].shape), attention, layout) for n in names}
        against = base if align_on == "deltas" else None
        started = time.perf_counter()
        if alignment == "joint":
            found = joint_alignment(a, b, layout, attention, against)
            b = permute_heads(b, found.q, found.kv, layout, attention)
            record.update(
                alignment="joint",
                q_perm=found.q,
                kv_perm=found.kv,
                heads_moved=found.heads_moved,
                cost_before=found.cost_before,
                cost_after=found.cost_after,
            )
        else:
            aligned, per = {}, {}
            for n in names:
                moves = []
                for k, seg in enumerate(segs[n]):
                    x0 = None if against is None else against[n]
                    found = per_tensor_alignment(a[n], b[n], seg, layout, x0)
                    moves.append((seg, found.q))
                    per[n if len(segs[n]) == 1 else f"{n}[{k}]"] = {
                        "perm": found.q,
                        "heads_moved": found.heads_moved,
                        "cost_before": found.cost_before,
                        "cost_after": found.cost_after,
                    }
                aligned[n] = permuted(b[n], moves)
            b = aligned
            record.update(alignment="per_tensor", per_tensor=per)
        record["assignment_seconds"] = round(time.perf_counter() - started, 6)
    if not weights_before_alignment:
        weights = {n: w_for(n, b[n]) for n in names}
    record["weights"] = weights
    diagnostics.append(record)
    return {n: lerp(a[n], b[n], weights[n], out_dtype) for n in names}
