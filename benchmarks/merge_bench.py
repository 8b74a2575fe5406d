"""Merge speed and memory against the disk-read floor and mergekit, on a synthetic family.

    python benchmarks/merge_bench.py [--size 1b|tiny] [--arch mistral|qwen2|mixtral]
                                     [--methods linear,task_arithmetic]
                                     [--device cpu|cuda] [--repeat 2] [--json out.json]
                                     [--mergekit /tmp/mk/bin/python]

The family (base + two fine-tunes, bf16, 1 GB shards) is generated once into the cache folder
(`bench-cache/`, ignored by git). Then, in one run:
- floor: every input byte read once with large sequential reads (the least any merge must do);
- each method merging the two fine-tunes, in a fresh subprocess, so peak RSS is its own.
With `--mergekit PYTHON` (the interpreter of a virtual environment with `mergekit==0.1.5`), each
method mergekit also has runs through its `run_merge` in the same way, on the same config, in
the first `--mergekit-repeat` rounds.
Times are the best of `--repeat` runs (the methods run round by round, so that a slow spell of
a shared machine slows one run of each, not every run of one), with the page cache warm for
every row alike (the family is read once before timing). Input hashes for provenance are primed
first, so rows time merging, not first-time hashing (reported separately).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def generate(cache: Path, size: str, arch: str = "mistral") -> list[Path]:
    from medmerge.synthetic import bench_config, tiny_config, write_family

    folder = cache / (f"family-{size}" if arch == "mistral" else f"family-{arch}-{size}")
    names = ["base", "model_1", "model_2"]
    if all((folder / n / "config.json").exists() for n in names):
        return [folder / n for n in names]
    config = bench_config(arch) if size == "1b" else tiny_config(arch)
    t = time.time()
    paths = write_family(folder, config, seed=0, shard_size=10**9, overwrite=True)
    print(f"generated {size} family in {time.time() - t:.0f} s", file=sys.stderr)
    return paths


def input_files(models: list[Path]) -> list[Path]:
    return [f for m in models for f in sorted(m.glob("*.safetensors"))]


def read_floor(files: list[Path], copy_to: Path | None = None, copies: int = 0) -> None:
    """Read every byte of `files`; with `copy_to`, also write the first `copies` files there
    the way merges write theirs (the I/O floor of a merge: read all inputs, write one
    model-sized output)."""
    import numpy as np

    from medmerge.io.shards import SequentialFile, staging_buffer

    buf = np.empty(64 * 2**20, np.uint8)
    stage = staging_buffer()
    for i, file in enumerate(files):
        out = SequentialFile(copy_to / file.name, stage) if copy_to and i < copies else None
        with open(file, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                if out:
                    out.write(buf[:n])
        if out:
            out.close()


MEDMERGE = "import medmerge\nfrom benchmarks.merge_bench import read_floor\n"
MERGEKIT = (
    "from mergekit.config import MergeConfiguration\n"
    "from mergekit.merge import MergeOptions, run_merge\n"
)


def child(code: str, env: dict, imports: str = MEDMERGE, python: str = sys.executable):
    """Time `code` in a fresh interpreter (after its imports): seconds, the process's peak RSS
    in MB (VmHWM, which, unlike ru_maxrss, does not count the parent's memory before exec) and
    its CPU seconds (user + system, all threads): CPU seconds near cores x wall seconds mark a
    merge bound by the arithmetic, fewer one that waits on I/O."""
    timed = (
        f"import os, time\nfrom pathlib import Path\n{imports}"
        f"t, c = time.perf_counter(), os.times()\n{code}\n"
        "print(time.perf_counter() - t)\n"
        "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))\n"
        "e = os.times()\nprint(e.user + e.system - c.user - c.system)\n"
    )
    proc = subprocess.Popen([python, "-c", timed], env=env, stdout=subprocess.PIPE)
    seconds, peak_kb, cpu = proc.stdout.read().split()
    if proc.wait() != 0:
        raise SystemExit(f"benchmark child failed: {code}")
    return float(seconds), int(peak_kb) / 1024, float(cpu)


def best(runs: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    """The fastest run's seconds and CPU seconds, with the largest peak RSS of all runs."""
    fastest = min(runs)
    return fastest[0], max(r[1] for r in runs), fastest[2]


# the paper's hyperparameters where it gives them (Table IV runs), mergekit-style defaults elsewhere
PARAMETERS = {
    "linear": {"weight": 0.5},
    "task_arithmetic": {"weight": 0.5},
    "ties": {"weight": 0.5, "density": 0.6},
    "dare_ties": {"weight": 0.5, "density": 0.6},
    "dare_linear": {"weight": 0.5, "density": 0.6},
    "della": {"weight": 0.5, "density": 0.6, "epsilon": 0.05},
    "della_linear": {"weight": 0.5, "density": 0.6, "epsilon": 0.05},
    "breadcrumbs": {"weight": 0.5, "density": 0.9, "gamma": 0.01},
    "breadcrumbs_ties": {"weight": 0.5, "density": 0.9, "gamma": 0.01},
    "sce": {"select_topk": 0.5},
    "slerp": {"t": 0.5},
    "nuslerp": {"weight": 0.5},
    "model_stock": {},
    "karcher": {},
    "hierarchical": {},
}


MERGEKIT_METHODS = (
    "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "della", "della_linear",
    "breadcrumbs", "breadcrumbs_ties", "sce", "slerp", "nuslerp", "model_stock", "karcher",
)  # fmt: skip


def config(method: str, models: list[Path]) -> dict:
    """The merge config both tools run: the two fine-tunes on their base (SLERP interpolates
    from the first fine-tune, which is then its base, to the second; linear takes no base)."""
    base, a, b = (str(m) for m in models)
    cfg = {
        "merge_method": method,
        "base_model": a if method == "slerp" else base,
        "models": [{"model": a}, {"model": b}],
        "parameters": PARAMETERS.get(method, {}),
        "dtype": "bfloat16",
    }
    if method == "linear":
        del cfg["base_model"]
    return cfg


def mergekit_code(method: str, models: list[Path], out: Path) -> str:
    cfg = config(method, models)
    return (
        f"run_merge(MergeConfiguration.model_validate({cfg!r}), {str(out)!r}, "
        "MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))"
    )


def merge_code(
    method: str, models: list[Path], out: Path, device: str, max_memory: str | None = None
) -> str:
    cfg = config(method, models)
    return (
        f"medmerge.merge({cfg!r}, {str(out)!r}, device={device!r}, progress=False, "
        f"max_memory={max_memory!r})\n"
        "import json\n"
        f"diag = Path({str(out)!r}) / 'merge_diagnostics.json'\n"
        "if diag.exists():\n"
        "    s = json.loads(diag.read_text())['summary'] or {}\n"
        "    if 'assignment_seconds' in s:\n"
        '        import sys; print(f\'  hierarchical: {s["assignment_seconds"]:.2f} s in '
        'head assignment ({s["verdict"]})\', file=sys.stderr)\n'
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["1b", "tiny"], default="1b")
    ap.add_argument("--arch", choices=["mistral", "qwen2", "mixtral"], default="mistral",
                    help="the family's shapes (see medmerge.synthetic.bench_config)")  # fmt: skip
    ap.add_argument(
        "--methods",
        default="linear,task_arithmetic",
        help=f"comma-separated, or 'all': {', '.join(PARAMETERS)}",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=ROOT / "bench-cache")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--mergekit", help="python of a virtual environment with mergekit==0.1.5")
    ap.add_argument(
        "--mergekit-repeat", type=int, default=1, help="mergekit's runs per method (minutes each)"
    )
    args = ap.parse_args()

    env = {**os.environ, "MEDMERGE_CACHE": str(args.cache / "medmerge-cache")}
    os.environ.update(env)
    models = generate(args.cache, args.size, args.arch)
    files = input_files(models)
    gb = sum(f.stat().st_size for f in files) / 1e9
    read_floor(files)  # warm the page cache the same way for every row

    from medmerge.io.hashing import sha256_file

    t = time.perf_counter()
    for f in files:
        sha256_file(f)
    hash_seconds = time.perf_counter() - t

    rows = []
    floor_env = {**env, "PYTHONPATH": str(ROOT)}
    floor = best(
        [
            child(f"read_floor([Path(p) for p in {[str(f) for f in files]!r}])", floor_env)
            for _ in range(args.repeat)
        ]
    )
    rows.append(("read floor", *floor))
    out = args.cache / "merged"
    base_shards = len(list(models[0].glob("*.safetensors")))

    def fresh_out() -> Path:  # deleting 2 GB takes a second on ext4: keep it out of the timing
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        return out

    io = []
    for _ in range(args.repeat):
        code = (
            f"read_floor([Path(p) for p in {[str(f) for f in files]!r}], "
            f"Path({str(fresh_out())!r}), {base_shards})"
        )
        io.append(child(code, floor_env))
    rows.append(("read+write floor", *best(io)))
    methods = list(PARAMETERS) if args.methods == "all" else args.methods.split(",")
    runs = {method: [] for method in methods}
    theirs = [m for m in methods if args.mergekit and m in MERGEKIT_METHODS]
    mergekit = {method: [] for method in theirs}
    for r in range(args.repeat):  # round by round: a slow spell of the machine hits every method
        for method in methods:
            code = merge_code(method, models, fresh_out(), args.device)
            runs[method].append(child(code, floor_env))
            if method in theirs and r < args.mergekit_repeat:
                code = mergekit_code(method, models, fresh_out())
                mergekit[method].append(child(code, env, MERGEKIT, args.mergekit))
    rows += [(m, *best(runs[m])) for m in methods]
    rows += [(f"mergekit {m}", *best(mergekit[m])) for m in theirs]
    shutil.rmtree(out, ignore_errors=True)

    floor_s = rows[0][1]
    print(
        f"\n{args.arch} {args.size} family: {gb:.2f} GB of input in {len(files)} shards; device "
        f"{args.device}; best of {args.repeat}"
    )
    print(
        "merges write into an empty folder; the family GB/s column divides the whole family's "
        "size by the time (linear does not read the base)"
    )
    print(f"first-time sha256 of all inputs (cached afterwards): {hash_seconds:.1f} s\n")
    io_s = rows[1][1]
    linear_s = next((sec for n, sec, _, _ in rows if n == "linear"), float("nan"))
    table = [
        {
            "name": n,
            "seconds": sec,
            "x_read_floor": sec / floor_s,
            "x_read_write_floor": sec / io_s,
            "x_linear": sec / linear_s,
            "peak_rss_mb": rss,
            "cpu_seconds": cpu,
        }
        for n, sec, rss, cpu in rows
    ]
    print(
        f"{'row':<18}{'wall s':>8}{'x read floor':>14}{'x r+w floor':>13}{'x linear':>10}"
        f"{'family GB/s':>13}{'peak RSS MB':>13}{'CPU s':>8}"
    )
    for r in table:
        print(
            f"{r['name']:<18}{r['seconds']:>8.2f}{r['x_read_floor']:>14.2f}"
            f"{r['x_read_write_floor']:>13.2f}{r['x_linear']:>10.2f}"
            f"{gb / r['seconds']:>13.2f}{r['peak_rss_mb']:>13.0f}{r['cpu_seconds']:>8.2f}"
        )
    if theirs:
        print(f"\n{'method':<18}{'medmerge s':>11}{'mergekit s':>11}{'x mergekit':>11}"
              f"{'medmerge MB':>12}{'mergekit MB':>12}")  # fmt: skip
        by_name = {r["name"]: r for r in table}
        for m in theirs:
            ours, other = by_name[m], by_name[f"mergekit {m}"]
            print(
                f"{m:<18}{ours['seconds']:>11.2f}{other['seconds']:>11.2f}"
                f"{ours['seconds'] / other['seconds']:>11.2f}{ours['peak_rss_mb']:>12.0f}"
                f"{other['peak_rss_mb']:>12.0f}"
            )
    if args.json:
        summary = {
            "size": args.size,
            "input_gb": gb,
            "device": args.device,
            "hash_seconds": hash_seconds,
            "rows": table,
        }
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
