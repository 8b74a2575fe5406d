"""A study's data: its config (the YAML schema below, validated by pydantic), the runs it
expands to, and the records of finished runs (`runs/NAME.json`).

```yaml
name: cardio-vs-infect
base: path/to/base
models: [path/to/parent_a, path/to/parent_b]
suite: paper              # or a local suite folder
tasks: null               # or a subset of the suite's tasks
protocol: {num_fewshot: 5, dtype: bfloat16, limit: null, batch_size: auto, device: cpu}
merge: {dtype: bfloat16, device: cpu, seed: 0}
keep_models: true         # false: delete each merged model once it is evaluated
result_store: null        # a SQLite evaluation store shared by studies (default: the folder's)
merges:
  - method: task_arithmetic
    parameters: {weight: 0.5}
  - method: dare_ties
    parameters: {weight: 0.5, density: [0.6, 0.9]}   # a list is a grid: two runs
    per_model: [{}, {}]                                 # optional per-parent parameters
```

A list-valued parameter is a grid axis; to pass a mergekit gradient as one value, wrap it:
`weight: {value: [0.2, 0.8]}`. Runs get readable names (`dare_ties-density0.9`). The base and
the parents are evaluated as reference rows.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medmerge.config import Reference, read_yaml
from medmerge.errors import ConfigError
from medmerge.methods import get_method


class Protocol(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_fewshot: int = 5
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    limit: int | None = None
    batch_size: int | Literal["auto"] = "auto"
    device: Literal["cpu", "cuda"] = "cpu"
    seed: int = 1234


class MergeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    device: Literal["cpu", "cuda"] = "cpu"
    seed: int = 0


# a plain name: run and study names become file and folder names
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$", max_length=100)]


class MergeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str
    name: Name | None = None
    parameters: dict[str, Any] = {}
    per_model: list[dict[str, Any]] | None = None


class StudyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Name = "study"
    base: Reference  # a folder, Hub ID or MODEL+ADAPTER, as in merge configs
    models: list[Reference]
    suite: str = "paper"
    tasks: list[str] | None = None
    protocol: Protocol = Protocol()
    merge: MergeOptions = MergeOptions()
    keep_models: bool = True
    result_store: str | None = None
    merges: list[MergeSpec] = []


class Run(BaseModel):
    """One row of the study: a reference model (base or parent) or a merge."""

    name: str
    kind: Literal["base", "parent", "merge"]
    model: str | None = None  # reference rows: the model
    method: str | None = None
    parameters: dict[str, Any] = {}  # the grid point (top-level merge parameters)
    swept: dict[str, Any] = {}  # the parameters that vary in this run's grid
    merge_config: dict | None = None


class RunRecord(BaseModel):
    run: Run
    fingerprint: str
    merge_seconds: float | None = None
    merge_peak_rss_mb: float | None = None
    eval_seconds: float
    eval_cached: bool
    result: dict  # medmerge.eval.EvalResult as a dict


def read_mapping(config: str | Path | dict, what: str) -> dict:
    """A config given as a dict, or as the path of a YAML file holding one mapping."""
    if isinstance(config, dict):
        return config
    path = Path(config)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    documents = read_yaml(path, what)
    if len(documents) != 1 or not isinstance(documents[0], dict):
        raise ConfigError(f"{what} {path} must be one YAML mapping")
    return documents[0]


def load_study(config: str | Path | dict | StudyConfig) -> StudyConfig:
    if isinstance(config, StudyConfig):
        return config
    config = read_mapping(config, "study config")
    try:
        return StudyConfig.model_validate(config)
    except ValidationError as e:
        raise ConfigError(f"invalid study config: {e}") from e


def _value_label(v: Any) -> str:
    """A swept value as part of a run name, a file name: other characters become `_`."""
    text = json.dumps(v, separators=(",", ":")) if isinstance(v, (list, dict)) else str(v)
    return re.sub(r"[^A-Za-z0-9_.,+=\[\]-]", "_", text)


MAX_GRID = 1000  # runs one merge of a study may sweep


def expand(study: StudyConfig) -> list[Run]:
    """Reference rows, then one run per merge and grid point, with readable unique names."""
    runs = [Run(name="base", kind="base", model=study.base)]
    for i, m in enumerate(study.models):
        runs.append(Run(name=f"parent_{chr(ord('a') + i)}", kind="parent", model=m))
    seen: dict[str, int] = {}
    for spec in study.merges:
        method = get_method(spec.method)
        axes = {k: v for k, v in spec.parameters.items() if isinstance(v, list)}
        fixed = {
            k: (v["value"] if isinstance(v, dict) and set(v) == {"value"} else v)
            for k, v in spec.parameters.items()
            if k not in axes
        }
        points = math.prod(len(v) for v in axes.values())
        if points > MAX_GRID:
            raise ConfigError(
                f"merge {spec.name or spec.method}: its grid has {points} points (more than "
                f"{MAX_GRID}); sweep fewer values"
            )
        for point in itertools.product(*axes.values()) if axes else [()]:
            swept = dict(zip(axes, point, strict=True))
            params = {**fixed, **swept}
            name = spec.name or spec.method
            name += "".join(f"-{k}{_value_label(v)}" for k, v in swept.items())
            if name in seen:
                seen[name] += 1
                name = f"{name}-{seen[name]}"
            else:
                seen[name] = 1
            per_model = spec.per_model or [{} for _ in study.models]
            if len(per_model) != len(study.models):
                raise ConfigError(
                    f"merge {spec.method}: per_model has {len(per_model)} entries "
                    f"for {len(study.models)} models"
                )
            cfg = {
                "merge_method": spec.method,
                # a method of the models alone (linear, slerp of two parents) leaves it out
                **({"base_model": study.base} if method.takes_base(len(study.models)) else {}),
                "models": [
                    {"model": m, "parameters": p}
                    for m, p in zip(study.models, per_model, strict=True)
                ],
                "parameters": params,
                "dtype": study.merge.dtype,
            }
            runs.append(
                Run(
                    name=name,
                    kind="merge",
                    method=spec.method,
                    parameters=params,
                    swept=swept,
                    merge_config=cfg,
                )
            )
    return runs


def save_record(folder: Path, record: RunRecord, run_hash: str) -> None:
    path = folder / "runs" / f"{record.run.name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"hash": run_hash, **record.model_dump()}, indent=2))
    os.replace(tmp, path)  # a record is there whole or not at all


def load_records(folder: str | Path) -> list[RunRecord]:
    folder = Path(folder)
    study = load_study(folder / "study.yaml")
    records = []
    for run in expand(study):
        path = folder / "runs" / f"{run.name}.json"
        if path.is_file():
            data = read_record(path)
            data.pop("hash", None)
            records.append(RunRecord.model_validate(data))
    return records


def read_record(path: Path) -> dict:
    """A stored run record; ConfigError naming the file if it is damaged."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        RunRecord.model_validate({k: v for k, v in data.items() if k != "hash"})
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, ValidationError) as e:
        raise ConfigError(
            f"run record {path} is damaged ({e.__class__.__name__}); delete it and run the "
            "study again to redo that run"
        ) from e
    return data
