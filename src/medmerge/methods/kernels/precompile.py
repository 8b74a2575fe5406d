"""The sparse pass compiled in the background, so that no merge waits for it.

The sparse pass (TIES, DARE, DELLA, Breadcrumbs, SCE) is the one kernel that takes about a
minute to compile, once per pair of input and output dtypes; numba's cache then keeps it for
every later process. Where a merge finds it neither compiled nor cached (`ready`), the method
runs its torch implementation, which computes the same bits, and `compile_later` starts a
process that compiles the pass for that pair into the cache (`main`); the next merge finds it
there. With `MEDMERGE_COMPILE=foreground` a merge compiles it itself instead (benchmarks,
tests).
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from medmerge.methods.kernels.core import ARITY
from medmerge.methods.kernels.sparse import Job, SparsePlan, _sparse_pass, new_marks

NUMPY = {torch.bfloat16: np.uint16, torch.float32: np.float32}  # as the kernels see them
# the compilations this process started, by pair
_started: dict[tuple[torch.dtype, torch.dtype], subprocess.Popen] = {}
_found: set[tuple[torch.dtype, torch.dtype]] = set()  # pairs found compiled or cached: once


def _arguments(dtype: torch.dtype, out_dtype: torch.dtype) -> tuple:
    """Empty arguments of the sparse pass's signature for these dtypes."""
    plan = SparsePlan.keep_all([1.0])
    found = (np.zeros((0, 1, 2)), new_marks(0, plan, 1))
    models = tuple(np.empty(0, NUMPY[dtype]) for _ in range(ARITY))
    return np.empty(0, NUMPY[dtype]), models, plan, Job.MERGE, np.empty(0, NUMPY[out_dtype]), found


def _compiled(dtype: torch.dtype, out_dtype: torch.dtype) -> bool:
    """Whether this process has, or numba's cache holds, the pass for these dtypes (asked of
    numba until it says yes: a merge asks for every tensor)."""
    if (dtype, out_dtype) in _found:
        return True
    signature = tuple(_sparse_pass.typeof_pyval(a) for a in _arguments(dtype, out_dtype))
    cache = _sparse_pass._cache  # numba's own index of what its cache file holds
    key = cache._index_key(signature, _sparse_pass.targetctx.codegen())
    if signature in _sparse_pass.overloads or key in cache._cache_file._load_index():
        _found.add((dtype, out_dtype))
        return True
    return False


def ready(dtype: torch.dtype, out_dtype: torch.dtype) -> bool:
    """Whether a merge of inputs in `dtype` into `out_dtype` can run the sparse pass without
    waiting for its compilation (its merge and its sums, which read and write `dtype`)."""
    if os.environ.get("MEDMERGE_COMPILE") == "foreground":
        return True
    return _compiled(dtype, out_dtype) and _compiled(dtype, dtype)


def available(dtype: torch.dtype, out_dtype: torch.dtype) -> bool:
    """`ready`; where it is not, `compile_later` too."""
    if ready(dtype, out_dtype):
        return True
    compile_later(dtype, out_dtype)
    return False


def compile_later(dtype: torch.dtype, out_dtype: torch.dtype) -> subprocess.Popen | None:
    """Start compiling the pass for these dtypes in a process of its own (once per process
    and pair; a second such process waits for the first's lock, then finds the pass cached);
    returns it."""
    if (dtype, out_dtype) in _started:
        return None
    names = [str(d).removeprefix("torch.") for d in (dtype, out_dtype)]
    code = f"import sys; from {__name__} import main; main(sys.argv[1:])"
    _started[dtype, out_dtype] = subprocess.Popen(
        [sys.executable, "-c", code, *names],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # not stopped with the merge that started it
    )
    return _started[dtype, out_dtype]


def main(names: list[str]) -> None:
    """Compile the pass for the dtypes named (`bfloat16 float32`) into numba's cache (run in
    the foreground, it returns once the pass is there)."""
    dtype, out_dtype = (getattr(torch, name) for name in names)
    folder = Path(_sparse_pass._cache.cache_path)
    folder.mkdir(parents=True, exist_ok=True)
    names = "-".join(str(d).removeprefix("torch.") for d in (dtype, out_dtype))
    with open(folder / f"medmerge-compile-{names}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # after any other process compiling this pair
        for pair in {(dtype, out_dtype), (dtype, dtype)}:
            if not _compiled(*pair):
                _sparse_pass(*_arguments(*pair))  # compiles, and saves to the cache
