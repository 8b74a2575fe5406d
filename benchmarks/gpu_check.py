"""Every method merged on a device and on the CPU, compared tensor by tensor (not timed).

    python benchmarks/gpu_check.py [--device cuda] [--arch mistral,qwen2,mixtral] [--tol 1e-4]

On the CPU a merge runs the numba kernels; on another device the torch implementation, which
the tests check against the kernels bit for bit on the CPU. What differs on a GPU is its float
arithmetic (fused multiply-adds, reduction order), so outputs are compared in float32: per
method, the largest difference relative to the tensor's largest magnitude, and the share of
entries that differ at all. The script exits non-zero when a method's largest relative
difference exceeds `--tol`. With `--device cpu` it compares the torch implementation
(`MEDMERGE_KERNELS=0`) with the kernels on the CPU, where they must agree exactly: a check of
the script itself on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from merge_bench import PARAMETERS, config  # beside this script
from safetensors.torch import load_file

import medmerge
from medmerge.synthetic import tiny_config, write_family


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def compare(a: dict, b: dict) -> tuple[float, float]:
    """(largest |a - b| relative to max |a|, share of entries that differ) over all tensors."""
    worst, differing, total = 0.0, 0, 0
    for name, x in a.items():
        x, y = x.double(), b[name].double()
        scale = float(x.abs().max()) or 1.0
        worst = max(worst, float((x - y).abs().max()) / scale)
        differing += int((x != y).sum())
        total += x.numel()
    return worst, differing / max(total, 1)


def merge(cfg: dict, out: Path, device: str, kernels: bool) -> dict:
    os.environ["MEDMERGE_KERNELS"] = "1" if kernels else "0"
    return tensors(medmerge.merge(cfg, out, device=device, progress=False))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--arch", default="mistral,qwen2,mixtral")
    ap.add_argument("--methods", default=",".join(PARAMETERS))
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu to check the script itself")
        return 2
    failed = []
    print(f"{'family':<10}{'method':<18}{'max rel diff':>14}{'differing':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch.split(","):
            models = write_family(Path(tmp) / arch, tiny_config(arch), seed=3)
            for method in args.methods.split(","):
                cfg = {**config(method, models), "dtype": "float32"}
                reference = merge(cfg, Path(tmp) / "cpu", "cpu", kernels=True)
                other = merge(cfg, Path(tmp) / "other", args.device, kernels=False)
                worst, share = compare(reference, other)
                ok = worst <= args.tol
                failed += [] if ok else [f"{arch}/{method}"]
                print(f"{arch:<10}{method:<18}{worst:>14.2e}{share:>12.2%}{'' if ok else '  FAIL'}")
                for folder in ("cpu", "other"):
                    shutil.rmtree(Path(tmp) / folder)
    print(f"{len(failed)} failed: {', '.join(failed)}" if failed else "all within tolerance")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
