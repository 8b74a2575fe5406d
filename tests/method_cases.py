"""Every registered method's test case, in one table the method, architecture, memory and
kernel suites read: a new method needs one row here (`test_every_method_has_a_case` says so)
besides its own code.

A case gives example parameters (a per-model parameter as a list, one value per model of the
two fine-tunes) and how a tensor over the memory budget is merged: "rows" (the method called
on each row block), "streams" (the method given the blocks) or None (always whole). Whether a
method merges one model beside its base comes from the registry."""

from __future__ import annotations

from dataclasses import dataclass

from medmerge.methods import REGISTRY


@dataclass(frozen=True)
class Case:
    params: dict
    blocks: str | None


CASES = {
    "linear": Case({"weight": [0.3, 0.7]}, "rows"),
    "task_arithmetic": Case({"weight": [0.6, 0.5], "lambda": 0.8}, "rows"),
    "ties": Case({"weight": [0.6, 0.5], "density": [0.5, 0.7]}, "streams"),
    "dare_ties": Case({"weight": [0.6, 0.5], "density": [0.6, 0.9]}, "streams"),
    "dare_linear": Case({"weight": [0.6, 0.5], "density": [0.6, 0.9]}, "streams"),
    "della": Case({"weight": [0.6, 0.5], "density": [0.6, 0.6]}, "streams"),
    "della_linear": Case(
        {"weight": [0.6, 0.5], "density": [0.6, 0.5], "rank_ties": "average"}, "streams"
    ),  # fmt: skip
    "breadcrumbs": Case({"weight": [0.6, 0.5], "density": [0.9, 0.8]}, "streams"),
    "breadcrumbs_ties": Case({"weight": [0.6, 0.5], "density": [0.9, 0.8]}, "streams"),
    "sce": Case({"select_topk": 0.5}, "streams"),
    "slerp": Case({"t": 0.3}, "streams"),
    "nuslerp": Case({"weight": [0.4, 0.6]}, "streams"),
    "multislerp": Case({"weight": [0.4, 0.6]}, "streams"),
    "model_stock": Case({}, "streams"),
    "karcher": Case({"max_iter": 50, "tol": 1e-12}, "streams"),
    "nearswap": Case({"t": 0.01}, "rows"),
    "arcee_fusion": Case({}, "streams"),
    "ram": Case({"epsilon": 1e-3}, "rows"),
    "ramplus_tl": Case({"epsilon": 1e-3, "r": 0.3, "alpha": 0.5}, "streams"),
    "hierarchical": Case({}, "streams"),
    "cosine_ot_lerp": Case({}, "streams"),
    "passthrough": Case({}, "rows"),
}


def one_model(method: str) -> bool:
    """Whether the method merges one model beside its base (SLERP's other endpoint, NearSwap,
    Arcee Fusion), as its registry entry's model counts say."""
    m = REGISTRY[method]
    return m.uses_base and m.min_models == 1 and m.max_models in (1, 2)


def merge_config(method: str, family, params: dict | None = None) -> dict:
    """A config merging the two fine-tunes of `family` (base, a, b) by `method` with `params`
    (default: its case's): one of them where the method merges one model beside its base, the
    first alone for passthrough; the base named where the method uses it."""
    base, a, b = family
    params = CASES[method].params if params is None else params
    models = [a] if one_model(method) or method == "passthrough" else [a, b]
    per_model = {k: v for k, v in params.items() if isinstance(v, list)}
    config = {
        "merge_method": method,
        "models": [
            {"model": str(m), "parameters": {k: v[i] for k, v in per_model.items()}}
            for i, m in enumerate(models)
        ],  # fmt: skip
        "parameters": {k: v for k, v in params.items() if k not in per_model},
        "dtype": "float32",
    }
    if REGISTRY[method].takes_base(len(models)):
        config["base_model"] = str(base)
    return config
