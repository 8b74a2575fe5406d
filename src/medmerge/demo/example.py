"""`medmerge example`: tiny models, a merge config, a suite and a study config to try the
workflow on in seconds."""

from __future__ import annotations

from pathlib import Path

import yaml

from medmerge.errors import ConfigError
from medmerge.methods import get_method
from medmerge.studies.study import PAPER_MERGES
from medmerge.synthetic import ARCHITECTURES, tiny_config, write_family, write_suite

EXAMPLE_FILES = ("models/base", "models/model_1", "models/model_2", "merge.yaml", "study.yaml",
                 "suite")  # fmt: skip


def write_example(out_dir: Path, *, arch: str = "mistral", method: str = "task_arithmetic",
                  overwrite: bool = False) -> None:  # fmt: skip
    """`medmerge example`: a tiny base and two fine-tunes far from it (deltas 0.4 of the weights'
    size, so that merges differ) in `out_dir/models`, `merge.yaml` merging them by `method`,
    a small random suite and `study.yaml` of the paper's merges. Nothing is written where
    anything of an example is already, unless `overwrite`."""
    if arch not in ARCHITECTURES:
        raise ConfigError(f"--arch {arch}: use one of {', '.join(ARCHITECTURES)}")
    chosen = get_method(method)
    out_dir = Path(out_dir)
    present = [out_dir / f for f in EXAMPLE_FILES if (out_dir / f).exists()]
    if present and not overwrite:
        raise ConfigError(f"{present[0]} exists; pass --overwrite to replace the example in "
                          f"{out_dir}, or give another folder")  # fmt: skip
    base, a, b = write_family(out_dir / "models", tiny_config(arch), shard_size=40_000,
                              delta=0.4, overwrite=overwrite)  # fmt: skip
    per_model = {"weight": 0.5} if "weight" in chosen.per_model else {}
    config = {
        "merge_method": method,
        **({"base_model": str(base.resolve())} if chosen.takes_base(2) else {}),
        "models": [{"model": str(m.resolve()), "parameters": dict(per_model)} for m in (a, b)],
        **({"parameters": {"t": 0.5}} if "t" in chosen.defaults else {}),
        "dtype": "bfloat16",
    }
    (out_dir / "merge.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    suite = write_suite(out_dir / "suite", n=40, formats=("medqa", "mmlu", "hellaswag"))
    study = {
        "name": "example",
        "base": str(base.resolve()),
        "models": [str(a.resolve()), str(b.resolve())],
        "suite": str(suite.resolve()),
        "protocol": {"num_fewshot": 2, "dtype": "float32"},
        "merges": PAPER_MERGES,
    }
    (out_dir / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
