"""Linear averaging, and the streamed linear combination it (and task arithmetic and the
spherical methods) computes.

A combination accumulates one model at a time instead of stacking, so memory stays at a few
tensors whatever the number of models; on the CPU it is one kernel pass that writes the output
dtype (`kernels.combine`), elsewhere torch ops over cache-sized chunks.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from medmerge.errors import ConfigError
from medmerge.io import buffers
from medmerge.methods import kernels
from medmerge.methods.registry import always, register
from medmerge.methods.streaming import Blocked, flat, spans


def combination(
    coef: list[float], models: list[Tensor], base: Tensor | None, out_dtype: torch.dtype
) -> Tensor:
    """sum_j coef_j models_j, or base + sum_j coef_j (models_j - base) when a base is given,
    accumulated in float32 chunk by chunk, in the output dtype; of `Blocked` inputs, a
    `Blocked` result computed block by block."""
    if isinstance(models[0], Blocked):

        def block(k: int) -> Tensor:
            at = [m.get(k) for m in models]
            return combination(coef, at, None if base is None else base.get(k), out_dtype)

        return Blocked(models[0].shape, out_dtype, models[0].blocks, block)
    inputs = [*models, *([base] if base is not None else [])]
    if kernels.usable(*inputs, out_dtype=out_dtype):
        return kernels.combine(base, models, coef, out_dtype)
    device, shape = models[0].device, models[0].shape
    vectors = [chunks(m, base) for m in models]
    out = buffers.empty(math.prod(shape), out_dtype, device)
    for p in spans(models[0].numel(), device):
        if base is not None:
            acc = base.reshape(-1)[p].to(torch.float32, copy=True)  # not a view: add_ below
        else:
            acc = torch.zeros(p.stop - p.start, device=device)
        for c, v in zip(coef, vectors, strict=True):
            acc.add_(v(p), alpha=c)
        out[p] = acc
    return out.view(shape)


def chunks(t: Tensor | Blocked, minus: Tensor | Blocked | None = None) -> Callable[[slice], Tensor]:
    """Flat chunks of t (of t - minus) in float32, by flat positions."""
    values = flat(t)
    if minus is None:
        return lambda p: values[p].float()
    other = flat(minus)
    return lambda p: values[p].float() - other[p].float()


def _normalizable(params: dict, config: dict) -> None:
    if params["normalize"] and sum(params["weight"]) == 0:
        raise ConfigError("the weights sum to 0, so they cannot be normalized")


@register("linear", raw_inputs=True, spreads_nonfinite=True, check=_normalizable, rows=always)
def linear(
    base: Tensor | None,
    models: list[Tensor],
    *,
    weight: list[float],
    normalize: bool = True,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """sum_i w_i theta_i / sum_i w_i; the base, when given, is one of the models  (Wortsman et
    al. 2022, model soups)."""
    total = sum(weight) if normalize else 1.0
    return combination([w / total for w in weight], models, None, out_dtype)


@register("passthrough", max_models=1, rows=always)
def passthrough(base: Tensor | None, models: list[Tensor], *, scale: list[float] = None) -> Tensor:
    """One model's tensor as it is, or times `scale`: with `slices`, layers stacked from
    several models (a "frankenmerge"; mergekit's passthrough)."""
    (model,) = models
    return model if scale[0] is None else model * scale[0]
