"""Merge speed and memory against the disk-read floor, on a synthetic ~1B-parameter Mistral family.

    python benchmarks/merge_bench.py [--size 1b|tiny] [--methods linear,task_arithmetic]
                                     [--device cpu|cuda] [--repeat 2] [--json out.json]

The family (base + two fine-tunes, bf16, 1 GB shards) is generated once into the cache folder
(`bench-cache/`, ignored by git). Then, in one run:
- floor: every input byte read once with large sequential reads (the least any merge must do);
- each method merging the two fine-tunes, in a fresh subprocess, so peak RSS is its own.
Times are the best of `--repeat` runs, with the page cache warm for every row alike (the family
is read once before timing). Input hashes for provenance are primed first, so rows time merging,
not first-time hashing (reported separately).
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


def generate(cache: Path, size: str) -> list[Path]:
    from medmerge.synthetic import mistral_1b_config, tiny_config, write_family

    folder = cache / f"family-{size}"
    names = ["base", "model_1", "model_2"]
    if all((folder / n / "config.json").exists() for n in names):
        return [folder / n for n in names]
    config = mistral_1b_config() if size == "1b" else tiny_config("mistral")
    t = time.time()
    paths = write_family(folder, config, seed=0, shard_size=10**9, overwrite=True)
    print(f"generated {size} family in {time.time() - t:.0f} s", file=sys.stderr)
    return paths


def input_files(models: list[Path]) -> list[Path]:
    return [f for m in models for f in sorted(m.glob("*.safetensors"))]


def read_floor(files: list[Path]) -> None:
    buf = bytearray(64 * 2**20)
    view = memoryview(buf)
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while f.readinto(view):
                pass


def child(code: str, env: dict) -> tuple[float, float]:
    """Time `code` in a fresh interpreter (after its imports); seconds and the process's peak RSS
    in MB."""
    timed = (
        "import time\nfrom pathlib import Path\nimport medmerge\n"
        "from benchmarks.merge_bench import read_floor\n"
        f"t = time.perf_counter()\n{code}\nprint(time.perf_counter() - t)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", timed], env=env, stdout=subprocess.PIPE)
    seconds = float(proc.stdout.read())
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"benchmark child failed (status {status}): {code}")
    return seconds, usage.ru_maxrss / 1024


def merge_code(method: str, models: list[Path], out: Path, device: str) -> str:
    base, a, b = (str(m) for m in models)
    cfg = {
        "merge_method": method,
        "base_model": base,
        "models": [{"model": a, "parameters": {"weight": 0.5}},
                   {"model": b, "parameters": {"weight": 0.5}}],
        "dtype": "bfloat16",
    }
    return (
        f"medmerge.merge({cfg!r}, {str(out)!r}, device={device!r}, overwrite=True, "
        "progress=False)\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["1b", "tiny"], default="1b")
    ap.add_argument("--methods", default="linear,task_arithmetic")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=ROOT / "bench-cache")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    env = {**os.environ, "MEDMERGE_CACHE": str(args.cache / "medmerge-cache")}
    os.environ.update(env)
    models = generate(args.cache, args.size)
    files = input_files(models)
    gb = sum(f.stat().st_size for f in files) / 1e9
    read_floor(files)  # warm the page cache the same way for every row

    from medmerge.hashing import sha256_file

    t = time.perf_counter()
    for f in files:
        sha256_file(f)
    hash_seconds = time.perf_counter() - t

    rows = []
    floor_env = {**env, "PYTHONPATH": str(ROOT)}
    floor = min(
        child(f"read_floor([Path(p) for p in {[str(f) for f in files]!r}])", floor_env)
        for _ in range(args.repeat)
    )
    rows.append(("read floor", *floor))
    out = args.cache / "merged"
    for method in args.methods.split(","):
        runs = [child(merge_code(method, models, out, args.device), floor_env)
                for _ in range(args.repeat)]
        rows.append((method, min(r[0] for r in runs), max(r[1] for r in runs)))
        shutil.rmtree(out, ignore_errors=True)

    floor_s, floor_rss = rows[0][1], rows[0][2]
    print(f"\n{args.size} family: {gb:.2f} GB of input in {len(files)} shards; device "
          f"{args.device}; best of {args.repeat}")
    print(f"first-time sha256 of all inputs (cached afterwards): {hash_seconds:.1f} s\n")
    print(f"{'row':<18}{'wall s':>8}{'x floor':>9}{'input GB/s':>12}{'peak RSS MB':>13}")
    for name, seconds, rss in rows:
        print(f"{name:<18}{seconds:>8.2f}{seconds / floor_s:>9.2f}{gb / seconds:>12.2f}"
              f"{rss:>13.0f}")
    if args.json:
        args.json.write_text(json.dumps({
            "size": args.size, "input_gb": gb, "device": args.device, "hash_seconds": hash_seconds,
            "floor_rss_mb": floor_rss,
            "rows": [{"name": n, "seconds": s, "x_floor": s / floor_s, "peak_rss_mb": r}
                     for n, s, r in rows],
        }, indent=2))


if __name__ == "__main__":
    main()
