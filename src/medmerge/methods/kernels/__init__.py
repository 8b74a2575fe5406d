"""CPU kernels for every merge method, compiled by numba.

On the CPU a chain of torch ops pays for every intermediate tensor: a top-k threshold, a random
mask and the TIES sign election cost 10-30x the arithmetic of a linear merge. These kernels fuse
each pass into one loop over the stored tensors (bfloat16 read as bits, or float32), on every
core, with no intermediate tensors. By topic:

- `topk`: the exact k-th largest |theta_i - b| or SCE's variance (`top_ks`; of a tensor in row
  blocks, `top_ks_of_parts`), and SCE's Select and Calculate in the same pass
  (`selection_energy`);
- `sparse`: the sparse family's merge pass, run from a typed `SparsePlan` (`merge`,
  `kept_sums`);
- `ranks`: DELLA's per-row rank probabilities, inside the sparse pass;
- `combine`: linear combinations, Gram matrices, the hierarchical method's cosine and LERP;
- `core`: what they share (bfloat16 loads and stores, fma, the draws) and `largest_magnitude`;
- `precompile`: the sparse pass compiled in a background process the first time it is needed,
  while that merge runs the torch implementation.

Each public kernel computes what its torch twin (named in its docstring) computes, bit for bit:
the same float32 operations in the same order (torch's `add(alpha=)` is a fused multiply-add, so
it is one here), the same tie rules (top-k keeps the earliest positions, DELLA gives equal |d|
their average rank) and the same counter-based draws (`medmerge.methods.rng`); the float64 sums
add per fixed block, so they do not depend on the thread count. `tests/test_kernels.py` checks
both paths against each other. The kernels release the GIL, so the engine's reader and writer
threads run beside them. Other devices, other dtypes (float16, float64), models in mixed dtypes
and `MEDMERGE_KERNELS=0` use the torch implementation.

Compiled kernels are cached beside each module (numba's `cache=True`). numba checks only a
cached function's own file, so after editing `core.py` or `ranks.py` clear the `__pycache__`
folder here. The sparse pass works on a block of a tensor as well as on the whole
(`SparsePlan.offset`: its position in the tensor; the top-k cuts relative to it), for tensors
merged in row blocks.
"""

from medmerge.methods.kernels.combine import (
    combine,
    delta_product_terms,
    delta_products,
    gram,
    gram_partials,
    lerp,
)
from medmerge.methods.kernels.core import (
    ARITY,
    BLOCK,
    DTYPES,
    array,
    largest_magnitude,
    usable,
    usable_dtypes,
)
from medmerge.methods.kernels.sparse import (
    Divisor,
    Rule,
    SparsePlan,
    block_entries,
    kept_sum_terms,
    kept_sums,
    merge,
)
from medmerge.methods.kernels.topk import (
    Part,
    Statistic,
    count_positive,
    selection_energy,
    selection_energy_of_parts,
    top_ks,
    top_ks_of_parts,
)

__all__ = [
    "ARITY",
    "BLOCK",
    "DTYPES",
    "Divisor",
    "Rule",
    "Part",
    "SparsePlan",
    "Statistic",
    "array",
    "block_entries",
    "combine",
    "count_positive",
    "delta_product_terms",
    "delta_products",
    "gram",
    "gram_partials",
    "kept_sum_terms",
    "kept_sums",
    "largest_magnitude",
    "lerp",
    "merge",
    "selection_energy",
    "selection_energy_of_parts",
    "top_ks",
    "top_ks_of_parts",
    "usable",
    "usable_dtypes",
]
