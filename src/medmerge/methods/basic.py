"""Linear averaging and task arithmetic.

Both accumulate one model at a time instead of stacking, so memory stays at a few tensors
whatever the number of models.
"""

from __future__ import annotations

from torch import Tensor

from medmerge.errors import ConfigError
from medmerge.methods import register


def normalized(weight: list[float], normalize: bool, name: str) -> list[float]:
    if not normalize:
        return list(weight)
    total = sum(weight)
    if total == 0:
        raise ConfigError(f"tensor {name!r}: the weights sum to 0, so they cannot be normalized")
    return [w / total for w in weight]


@register(
    "linear",
    needs_base=False,
    elementwise=True,
    spreads_nonfinite=True,
    per_model=("weight",),
)
def linear(
    base: Tensor | None,
    models: list[Tensor],
    *,
    weight: list[float],
    normalize: bool = True,
    name: str,
) -> Tensor:
    """sum_i w_i theta_i / sum_i w_i  (Wortsman et al. 2022, model soups)."""
    w = normalized(weight, normalize, name)
    out = models[0] * w[0]
    for wi, m in zip(w[1:], models[1:], strict=True):
        out.add_(m, alpha=wi)
    return out


@register(
    "task_arithmetic",
    needs_base=True,
    elementwise=True,
    spreads_nonfinite=True,
    per_model=("weight",),
)
def task_arithmetic(
    base: Tensor,
    models: list[Tensor],
    *,
    weight: list[float],
    normalize: bool = False,
    name: str,
) -> Tensor:
    """base + sum_i w_i (theta_i - base)  (Ilharco et al. 2023)."""
    w = normalized(weight, normalize, name)
    out = base.clone()
    for wi, m in zip(w, models, strict=True):
        out.add_(m - base, alpha=wi)
    return out
