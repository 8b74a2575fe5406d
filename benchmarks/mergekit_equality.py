"""Same inputs, same config: medmerge's merged tensors against mergekit 0.1.5's, per method.

    python benchmarks/mergekit_equality.py --mergekit /tmp/mk/bin/python [--dtype float32]
                                           [--methods ties,slerp] [--keep DIR]

`--mergekit` is the interpreter of a side virtual environment with mergekit, made with
`python3 -m venv /tmp/mk && /tmp/mk/bin/pip install torch==2.13.0 mergekit==0.1.5`. A tiny
Mistral family (a base and three fine-tunes) is generated in `--dtype`; each config below, with
that `dtype`, is merged by both tools (mergekit in its own process, through its `run_merge`),
and every tensor compared. The table gives, per method, the largest absolute difference, that
difference relative to the largest |value|, and the fraction of entries that differ at all.
With float32 mergekit computes in float32 as medmerge always does, so the rows show float
rounding alone; with bfloat16 mergekit computes in bfloat16 (its task vectors rounded, their
ties broken by its sort) while medmerge computes in float32 and rounds once.

The randomised methods (DARE, DELLA) are not compared entry by entry: mergekit's masks are
unseeded draws and medmerge's seeded ones; their keep probabilities and rescaling are pinned by
`tests/test_mergekit.py`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

import medmerge
from medmerge.synthetic import tiny_config, write_family


def configs(base: str, a: str, b: str, c: str) -> dict[str, dict]:
    """Configs valid for both tools, one per shared deterministic method."""
    three = [{"model": a, "parameters": {"weight": 0.5, "density": 0.6}},
             {"model": b, "parameters": {"weight": 0.3, "density": 0.4}},
             {"model": c, "parameters": {"weight": 0.4, "density": 0.7}}]  # fmt: skip
    weighted = [{"model": m["model"], "parameters": {"weight": m["parameters"]["weight"]}}
                for m in three]  # fmt: skip
    return {
        "linear": {"models": [{"model": a, "parameters": {"weight": 0.7}},
                              {"model": b, "parameters": {"weight": 0.3}}]},  # fmt: skip
        "linear (base among inputs)": {"merge_method": "linear", "base_model": base,
                                       "models": weighted[:2], "parameters": {"weight": 0.2}},
        "task_arithmetic": {"base_model": base, "models": three,
                            "parameters": {"lambda": 0.8, "normalize": True}},
        "ties": {"base_model": base, "models": three},
        "ties (rescale, no normalize)": {"merge_method": "ties", "base_model": base,
                                         "models": three,
                                         "parameters": {"rescale": True, "normalize": False}},
        "breadcrumbs": {"base_model": base, "models": three, "parameters": {"gamma": 0.05}},
        "breadcrumbs_ties": {"base_model": base, "models": three},
        "sce": {"base_model": base, "models": [{"model": a}, {"model": b}, {"model": c}],
                "parameters": {"select_topk": 0.5}},
        "slerp": {"base_model": a, "models": [{"model": a}, {"model": b}],
                  "parameters": {"t": [0.1, 0.7, 0.3]}},
        "nuslerp": {"base_model": base, "models": weighted[:2]},
        "nuslerp (rows)": {"merge_method": "nuslerp", "models": weighted[:2],
                           "parameters": {"nuslerp_flatten": False}},
        "nuslerp (columns)": {"merge_method": "nuslerp", "base_model": base,
                              "models": weighted[:2],
                              "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}},
        "multislerp": {"base_model": base, "models": weighted},
        "karcher": {"models": [{"model": a}, {"model": b}, {"model": c}]},
        "model_stock": {"base_model": base, "models": [{"model": a}, {"model": b}, {"model": c}]},
        "nearswap": {"base_model": a, "models": [{"model": a}, {"model": b}],
                     "parameters": {"t": 0.001}},
        "arcee_fusion": {"base_model": a, "models": [{"model": a}, {"model": b}]},
        "ram": {"base_model": base, "models": [{"model": a}, {"model": b}, {"model": c}],
                "parameters": {"epsilon": 0.002}},
        "ramplus_tl": {"base_model": base, "models": [{"model": a}, {"model": b}],
                       "parameters": {"epsilon": 0.002}},
        "passthrough (slices)": {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": a, "layer_range": [0, 2]}]},
            {"sources": [{"model": b, "layer_range": [1, 3]}]},
        ]},
        "ties (gradient, filter)": {"merge_method": "ties", "base_model": base, "models": [
            {"model": a, "parameters": {"weight": [0.2, 1.0], "density": 0.5}},
            {"model": b, "parameters": {"weight": [{"filter": "mlp", "value": 0.9},
                                                   {"value": 0.1}], "density": 0.8}},
        ]},
    }  # fmt: skip


MERGEKIT_RUN = """
import sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
config, out = sys.argv[1], sys.argv[2]
run_merge(MergeConfiguration.model_validate(yaml.safe_load(open(config))), out,
          MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
"""


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def compare(ours: dict, theirs: dict) -> tuple[float, float, float]:
    if ours.keys() != theirs.keys():
        missing = sorted(set(ours) ^ set(theirs))
        raise SystemExit(f"tensor names differ: {missing[:5]}")
    worst = scale = 0.0
    differ = total = 0
    for name, a in ours.items():
        a, b = a.double(), theirs[name].double()
        if a.shape != b.shape:
            raise SystemExit(f"{name}: shape {list(a.shape)} against {list(b.shape)}")
        diff = (a - b).abs()
        worst = max(worst, float(diff.max()))
        scale = max(scale, float(b.abs().max()))
        differ += int((diff > 0).sum())
        total += diff.numel()
    return worst, worst / scale if scale else 0.0, differ / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit", required=True, help="python of a venv with mergekit==0.1.5")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--methods", help="comma-separated rows (default: all)")
    ap.add_argument("--keep", type=Path, help="keep the family and outputs here")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="mk-equality-"))
    family = root / f"family-{args.dtype}"
    if not (family / "model_3" / "config.json").exists():
        write_family(family, tiny_config("mistral", num_hidden_layers=4), seed=3, members=3,
                     dtype=getattr(torch, args.dtype), overwrite=True)  # fmt: skip
    paths = [str(family / n) for n in ("base", "model_1", "model_2", "model_3")]
    rows = []
    for label, cfg in configs(*paths).items():
        if args.methods and label.split(" ")[0] not in args.methods.split(","):
            continue
        cfg = {"merge_method": label.split(" ")[0], **cfg, "dtype": args.dtype}
        out = root / "out" / label.replace(" ", "_").replace(",", "")
        shutil.rmtree(out, ignore_errors=True)
        (root / "config.yaml").write_text(json.dumps(cfg))
        run = subprocess.run(
            [args.mergekit, "-c", MERGEKIT_RUN, str(root / "config.yaml"), str(out / "mergekit")],
            capture_output=True, text=True,
        )  # fmt: skip
        if run.returncode != 0:
            rows.append((label, "mergekit failed: " + run.stderr.strip().splitlines()[-1]))
            continue
        medmerge.merge(cfg, out / "medmerge", progress=False)
        rows.append((label, compare(tensors(out / "medmerge"), tensors(out / "mergekit"))))
    print(f"\nmedmerge against mergekit 0.1.5, dtype {args.dtype}, tiny Mistral family\n")
    print("| method | max abs diff | relative to max |value| | entries that differ |")
    print("|---|---|---|---|")
    for label, result in rows:
        if isinstance(result, str):
            print(f"| {label} | {result} | | |")
        else:
            print(f"| {label} | {result[0]:.2e} | {result[1]:.2e} | {result[2]:.2%} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
