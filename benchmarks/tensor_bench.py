"""Per-tensor merge time of each method, in memory (no I/O): the kernels' own speed.

    python benchmarks/tensor_bench.py [--shape 5632x2048] [--methods ties,della] [--repeat 12]
    python benchmarks/tensor_bench.py --family 1b [--cache bench-cache] [--methods ...] [--repeat 2]

One base tensor and two fine-tunes, bfloat16, made the way `medmerge.synthetic` makes the
benchmark family's (base N(0, 0.02^2), deltas 5% of that), merged with `merge_bench.py`'s
parameters on every core. Each method's time is the minimum over `--repeat` rounds, methods
alternating round by round, with linear beside them as the baseline. With `--family`, every
tensor of `merge_bench.py`'s family of that size instead (generated into `--cache` if missing),
read into memory one at a time: the sum of each method's per-tensor times is its whole merge's
arithmetic without the I/O, the part of `merge_bench.py`'s time that the kernels decide. Whole
merges, with their I/O, are `merge_bench.py`'s job.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from merge_bench import PARAMETERS, ROOT, generate  # beside this script

from medmerge.io.checkpoint import Checkpoint
from medmerge.methods import get_method
from medmerge.methods.rng import tensor_seed

SPARSE = ("ties", "dare_ties", "dare_linear", "della", "della_linear", "breadcrumbs",
          "breadcrumbs_ties", "sce")  # fmt: skip


def family(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g) * 0.02
    models = [(base + torch.randn(shape, generator=g) * 0.001).bfloat16() for _ in range(2)]
    return base.bfloat16(), models


def runner(name: str, base: torch.Tensor, models: list[torch.Tensor]):
    """A call merging the tensors with `name`, as the engine calls the method."""
    method = get_method(name)
    if method.group:
        raise SystemExit(f"{name} merges groups of tensors: time it with merge_bench.py")
    params = dict(method.defaults)
    for key, value in PARAMETERS[name].items():
        params[key] = [value] * len(models) if key in method.per_model else value
    for key in method.per_model:
        if not isinstance(params.get(key), list):
            params[key] = [params[key]] * len(models)
    if "keys" in method.engine_args:
        params["keys"] = [tensor_seed(0, "bench", i) for i in range(len(models))]
    if "out_dtype" in method.engine_args:
        params["out_dtype"] = torch.bfloat16
    if "name" in method.engine_args:
        params["name"] = "bench"
    return lambda: method.fn(base, models, **params)


def timed(calls: dict, repeat: int) -> dict[str, float]:
    """Each call's minimum time over `repeat` rounds, the calls alternating round by round,
    after one untimed round (which compiles the kernels and touches the tensors)."""
    for call in calls.values():
        call()
    times = {m: [] for m in calls}
    for _ in range(repeat):
        for m, call in calls.items():
            t = time.perf_counter()
            call()
            times[m].append(time.perf_counter() - t)
    return {m: min(ts) for m, ts in times.items()}


def family_sums(folders: list[Path], methods: list[str], repeat: int) -> dict[str, float]:
    """Per method, the sum over every tensor of the family (base first) of its best time."""
    readers = [Checkpoint(folder) for folder in folders]
    sums = dict.fromkeys(methods, 0.0)
    for name in readers[0].tensors:
        base, *models = (r.read(name).clone() for r in readers)
        for m, seconds in timed({m: runner(m, base, models) for m in methods}, repeat).items():
            sums[m] += seconds
    for r in readers:
        r.close()
    return sums


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="5632x2048")
    ap.add_argument("--family", choices=["1b", "tiny"], help="every tensor of that family")
    ap.add_argument("--cache", type=Path, default=ROOT / "bench-cache")
    ap.add_argument("--methods", default=",".join(("linear", *SPARSE)))
    ap.add_argument("--repeat", type=int, default=12)
    args = ap.parse_args()
    methods = args.methods.split(",")
    threads = torch.get_num_threads()
    if args.family:
        best = family_sums(generate(args.cache, args.family), methods, args.repeat)
        print(f"every tensor of the {args.family} family, in memory, {threads} threads, "
              f"sum of per-tensor minima of {args.repeat}")  # fmt: skip
        unit, scale = "s", 1
    else:
        shape = tuple(int(s) for s in args.shape.split("x"))
        base, models = family(shape)
        best = timed({m: runner(m, base, models) for m in methods}, args.repeat)
        print(f"{args.shape}, 2 models, bfloat16, {threads} threads, min of {args.repeat}")
        unit, scale = "ms", 1e3
    reference = best.get("linear")
    for m in methods:
        ratio = f"{best[m] / reference:8.2f}x linear" if reference else ""
        print(f"{m:<18}{best[m] * scale:8.2f} {unit}{ratio}")


if __name__ == "__main__":
    main()
