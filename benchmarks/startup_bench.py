"""First use against later use: a merge of the tiny family in a fresh process, with an empty numba
cache (cold: every kernel compiles) and again with the cache it left (warm), beside the import
times of torch and medmerge.

    python benchmarks/startup_bench.py [--methods linear,ties] [--json out.json]

Each row is a whole process (`python -c`), timed from start to exit, so it holds the interpreter's
start, the imports, numba's compilation or cache loading, and the merge itself (milliseconds on
the tiny family). The cold run's extra time over the warm one is what a fresh environment (a new
user, a CI run, a new Ray worker) pays once per method. A cold sparse merge (TIES, DARE, DELLA,
Breadcrumbs, SCE) runs the torch implementation and leaves the sparse pass compiling in the
background (`kernels.precompile`); the "background compile" row is the wait for it to finish
(with nothing to wait for, the check that the pass is cached), before the warm runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.merge_bench import PARAMETERS, config, generate  # noqa: E402


def whole(code: str, env: dict) -> float:
    """Seconds for a fresh interpreter to run `code` and exit."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


SPARSE = {"ties", "dare_ties", "dare_linear", "della", "della_linear", "breadcrumbs",
          "breadcrumbs_ties", "sce"}  # fmt: skip
# waits for the background compilations of the sparse pass a cold merge started (or compiles
# it): the tiny family is bfloat16, merged into bfloat16
PRECOMPILED = (
    "from medmerge.methods.kernels.precompile import main\nmain(['bfloat16', 'bfloat16'])\n"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="linear,ties,della,slerp,hierarchical",
                    help=f"comma-separated, or 'all': {', '.join(PARAMETERS)}")  # fmt: skip
    ap.add_argument("--cache", type=Path, default=ROOT / "bench-cache")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    models = generate(args.cache, "tiny")
    methods = list(PARAMETERS) if args.methods == "all" else args.methods.split(",")
    base_env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rows = {
        "python -c pass": whole("pass", base_env),
        "import torch": whole("import torch", base_env),
        "import medmerge": whole("import medmerge", base_env),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            numba_cache = Path(tmp) / f"numba-{method}"  # empty: every kernel compiles
            env = {**base_env, "NUMBA_CACHE_DIR": str(numba_cache),
                   "MEDMERGE_CACHE": str(Path(tmp) / "medmerge")}  # fmt: skip
            cfg = config(method, models)
            out = Path(tmp) / "out"
            code = (
                "import medmerge\n"
                f"medmerge.merge({cfg!r}, {str(out)!r}, progress=False, overwrite=True)\n"
            )
            cold = whole(code, env)
            # the sparse pass the cold merge compiles in the background, waited for here
            background = whole(PRECOMPILED, env) if method in SPARSE else None
            warm = min(whole(code, env) for _ in range(2))
            rows[f"merge {method}"] = (cold, warm)
            if background is not None:
                rows[f"  {method}: background compile"] = background
            print(f"{method}: cold {cold:.1f} s, warm {warm:.1f} s", file=sys.stderr)
    print(f"\n{'row':<24}{'cold s':>9}{'warm s':>9}{'cold - warm':>13}")
    for name, value in rows.items():
        if isinstance(value, tuple):
            cold, warm = value
            print(f"{name:<24}{cold:>9.2f}{warm:>9.2f}{cold - warm:>13.2f}")
        else:
            print(f"{name:<24}{value:>9.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
