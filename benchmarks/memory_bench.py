"""Peak memory and time of merges with the largest tensors of today's models, beside mergekit.

    python benchmarks/memory_bench.py [--shape 70b|405b] [--methods linear,ties]
                                      [--max-memory 2GB] [--mergekit /tmp/mk/bin/python]

A family (base + two fine-tunes, bf16) with one decoder layer of the shape's widths and its full
128256-token embedding and output head, generated tensor by tensor into `--cache` (ignored by
git) the first time:
- `70b`: Llama-3-70B's widths (hidden 8192, MLP 28672, 64 heads, 8 kv heads): 5.8 GB a model;
- `405b`: Llama-3-405B's hidden size 16384 with a narrow MLP (1024): its 4.2 GB embedding and
  head, 8.6 GB a model.
Each merge runs in a fresh process; its peak RSS (VmHWM) counts the input pages it maps as well
as its own buffers. `--max-memory` is medmerge's budget (default: medmerge's, a quarter of RAM);
tensors over an eighth of it are merged in row blocks.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from merge_bench import (  # beside this script
    MERGEKIT,
    MERGEKIT_METHODS,
    PARAMETERS,
    ROOT,
    child,
    merge_code,
    mergekit_code,
)

SHAPES = {
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                num_key_value_heads=8),
    "405b": dict(hidden_size=16384, intermediate_size=1024, num_attention_heads=128,
                 num_key_value_heads=8),
}  # fmt: skip


def generate(cache: Path, shape: str) -> list[Path]:
    from transformers import LlamaConfig

    from medmerge.synthetic import write_family

    folder = cache / f"family-memory-{shape}"
    names = ["base", "model_1", "model_2"]
    if all((folder / n / "config.json").exists() for n in names):
        return [folder / n for n in names]
    config = LlamaConfig(vocab_size=128256, num_hidden_layers=1, tie_word_embeddings=False,
                         max_position_embeddings=4096, **SHAPES[shape])  # fmt: skip
    t = time.time()
    paths = write_family(folder, config, seed=0, shard_size=5 * 10**9, overwrite=True)
    print(f"generated the {shape} family in {time.time() - t:.0f} s", file=sys.stderr)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="70b")
    ap.add_argument("--methods", default="linear,ties",
                    help=f"comma-separated, or 'all': {', '.join(PARAMETERS)}")  # fmt: skip
    ap.add_argument("--cache", type=Path, default=ROOT / "bench-cache")
    ap.add_argument("--mergekit", help="python of a virtual environment with mergekit==0.1.5")
    ap.add_argument("--max-memory", help="medmerge's memory budget, e.g. 2GB")
    args = ap.parse_args()
    env = {**os.environ, "MEDMERGE_CACHE": str(args.cache / "medmerge-cache"),
           "PYTHONPATH": str(ROOT)}  # fmt: skip
    models = generate(args.cache, args.shape)
    files = [f for m in models for f in sorted(m.glob("*.safetensors"))]
    gb = sum(f.stat().st_size for f in files) / 1e9
    os.environ["MEDMERGE_CACHE"] = env["MEDMERGE_CACHE"]
    from medmerge.io.hashing import sha256_file

    for f in files:  # provenance hashes primed (cached): the rows time merging, as mergekit's
        sha256_file(f)
    out = args.cache / "merged-memory"
    methods = list(PARAMETERS) if args.methods == "all" else args.methods.split(",")
    print(f"{args.shape}-shaped family: {gb:.1f} GB of bf16 input, one layer, 128256 tokens, "
          f"medmerge's max_memory {args.max_memory or 'default'}")  # fmt: skip
    print(f"{'merge':<22}{'seconds':>9}{'peak RSS GB':>13}{'CPU s':>9}", flush=True)
    for method in methods:
        shutil.rmtree(out, ignore_errors=True)
        code = merge_code(method, models, out, "cpu", args.max_memory)
        _row(method, child(code, env))
        if args.mergekit and method in MERGEKIT_METHODS:
            shutil.rmtree(out, ignore_errors=True)
            code = mergekit_code(method, models, out)
            try:
                _row(f"mergekit {method}", child(code, env, MERGEKIT, args.mergekit))
            except (SystemExit, ValueError):  # a child that died (killed for memory, say)
                print(f"{'mergekit ' + method:<22}{'failed':>9}", flush=True)
    shutil.rmtree(out, ignore_errors=True)


def _row(name: str, result: tuple[float, float, float]) -> None:
    seconds, peak_mb, cpu = result
    print(f"{name:<22}{seconds:>9.1f}{peak_mb / 1024:>13.2f}{cpu:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
