"""Merge methods: the registry (`registry`), the methods by family (`basic`, `sparse`,
`spherical`, `entrywise`, `hierarchical`), their torch building blocks (`sparsify`,
`streaming`, `rng`) and CPU kernels (`kernels`). Importing the package registers every
method."""

from medmerge.methods import basic, entrywise, hierarchical, sparse, spherical  # noqa: F401
from medmerge.methods.kernels import largest_magnitude
from medmerge.methods.registry import (
    REGISTRY,
    REQUIRED,
    MergeMethod,
    Param,
    add,
    config_name,
    get_method,
    register,
)

__all__ = [
    "REGISTRY",
    "REQUIRED",
    "MergeMethod",
    "Param",
    "add",
    "config_name",
    "get_method",
    "largest_magnitude",  # the engine's check of tensors for NaN and inf
    "register",
]
