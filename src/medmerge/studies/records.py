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
`weight: {value: [0.2, 0.8]}`. Runs get readable names (`dare_ties-density0.9`), which are file
names under `runs/` and `models/`: unique (case aside), never a reference row's (`base`,
`parent_a`, ...). The base and the parents are evaluated as reference rows.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

from medmerge.config import Name, Reference, read_yaml
from medmerge.errors import ConfigError
from medmerge.eval.suites import load_suite
from medmerge.methods import get_method

log = logging.getLogger("medmerge")


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


class MergeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str
    name: Name | None = None
    parameters: dict[str, Any] = {}
    per_model: list[dict[str, Any]] | None = None


STORE_SUFFIXES = (".sqlite", ".sqlite3", ".db")


def store_path(value: str) -> str:
    """A result store's path: a SQLite file, which is all a config may have medmerge write there
    (a path that names any other file is refused)."""
    path = Path(value)
    if path.suffix not in STORE_SUFFIXES:
        raise ValueError(f"{value!r} must name a SQLite file ({', '.join(STORE_SUFFIXES)})")
    if path.exists() and (not path.is_file() or _head(path) not in (SQLITE_HEADER, b"")):
        raise ValueError(f"{value!r} exists and is not a SQLite database")
    return value


SQLITE_HEADER = b"SQLite format 3\x00"


def _head(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(len(SQLITE_HEADER))


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
    result_store: Annotated[str, AfterValidator(store_path)] | None = None
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


def _label(v: Any) -> str:
    """A parameter name or swept value as part of a run name, a file name: other characters
    become `_`, and a long label is cut and tagged with a hash of the whole."""
    text = json.dumps(v, separators=(",", ":")) if isinstance(v, (list, dict)) else str(v)
    label = re.sub(r"[^A-Za-z0-9_.,+=\[\]-]", "_", text)
    if len(label) > 40:
        label = f"{label[:31]}_{hashlib.sha256(text.encode()).hexdigest()[:8]}"
    return label


MAX_GRID = 1000  # runs one merge of a study may sweep
REFERENCE_NAME = re.compile(r"base|parent_[a-z]+")  # the reference rows' names, reserved
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.,+=\[\]-]{0,199}")  # a plain file name


def expand(study: StudyConfig) -> list[Run]:
    """Reference rows, then one run per merge and grid point, with readable unique names."""
    runs = [Run(name="base", kind="base", model=study.base)]
    for i, m in enumerate(study.models):
        runs.append(Run(name=f"parent_{chr(ord('a') + i)}", kind="parent", model=m))
    points = [(spec, swept) for spec in study.merges for swept in _grid(spec)]
    stems = [(_stem(spec, swept), spec.name is not None) for spec, swept in points]
    for (spec, swept), name in zip(points, _unique_names(stems), strict=True):
        runs.append(_merge_run(study, spec, swept, name))
    return runs


def _grid(spec: MergeSpec) -> list[dict[str, Any]]:
    """The swept values of each run of a merge: one dict per grid point (list parameters)."""
    axes = {k: v for k, v in spec.parameters.items() if isinstance(v, list)}
    for key, values in axes.items():
        twice = [v for i, v in enumerate(values) if v in values[:i]]
        if not values or twice:
            problem = "is an empty list" if not values else f"lists {twice[0]!r} twice"
            raise ConfigError(
                f"merge {spec.name or spec.method}: parameter {key} {problem}; a list is a grid "
                "axis of distinct values (wrap a gradient as {value: [...]})"
            )
    points = math.prod(len(v) for v in axes.values())
    if points > MAX_GRID:
        raise ConfigError(
            f"merge {spec.name or spec.method}: its grid has {points} points (more than "
            f"{MAX_GRID}); sweep fewer values"
        )
    return [dict(zip(axes, point, strict=True)) for point in itertools.product(*axes.values())]


def _stem(spec: MergeSpec, swept: dict[str, Any]) -> str:
    """A run's name before numbering: the merge's name (or method) and its swept values."""
    name = (spec.name or spec.method) + "".join(
        f"-{_label(k)}{_label(v)}" for k, v in swept.items()
    )
    if not RUN_NAME.fullmatch(name):
        raise ConfigError(
            f"study merge {spec.name or spec.method}: its run name {name!r} is not a plain file "
            "name of at most 200 characters; give the merge a shorter `name:`"
        )
    return name


def _unique_names(stems: list[tuple[str, bool]]) -> list[str]:
    """Run names from (stem, given explicitly): explicit names are kept and must be unique and
    not a reference row's; an unnamed merge that repeats a name is numbered (`linear-2`,
    `linear-3`, ...), skipping every name taken. Compared case-blind: on macOS and Windows
    `Linear.json` is `linear.json`."""
    taken: set[str] = set()

    def used(name: str) -> bool:
        return name.casefold() in taken or bool(REFERENCE_NAME.fullmatch(name.casefold()))

    for stem in (stem for stem, explicit in stems if explicit):
        if REFERENCE_NAME.fullmatch(stem.casefold()):
            raise ConfigError(
                f"study merge name {stem!r} is a reference row's (base, parent_a, parent_b, ...); "
                "choose another `name:`"
            )
        if used(stem):
            raise ConfigError(
                f"study config: two runs are named {stem!r} (each run's record and model are "
                "files named after it); give the merges different `name:`s"
            )
        taken.add(stem.casefold())
    names = []
    for stem, explicit in stems:
        name, k = stem, 1
        while not explicit and used(name):
            k += 1
            name = f"{stem}-{k}"
        taken.add(name.casefold())
        names.append(name)
    return names


def _merge_run(study: StudyConfig, spec: MergeSpec, swept: dict[str, Any], name: str) -> Run:
    """The run of one grid point of a merge, with the merge config a merge of it reads."""
    method = get_method(spec.method)
    fixed = {
        k: (v["value"] if isinstance(v, dict) and set(v) == {"value"} else v)
        for k, v in spec.parameters.items()
        if k not in swept
    }
    params = {**fixed, **swept}
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
            {"model": m, "parameters": p} for m, p in zip(study.models, per_model, strict=True)
        ],
        "parameters": params,
        "dtype": study.merge.dtype,
    }
    return Run(
        name=name,
        kind="merge",
        method=spec.method,
        parameters=params,
        swept=swept,
        merge_config=cfg,
    )


def run_hash(run: Run, study: StudyConfig, suite_hash: str) -> str:
    """What a run's record stands for: the run, the suite's content (`Suite.content_hash`:
    changed answers or an added task redo the run), the tasks, protocol and merge options."""
    key = {
        "run": run.model_dump(),
        "suite": suite_hash,
        "tasks": study.tasks,
        "protocol": study.protocol.model_dump(),
        "merge": study.merge.model_dump(),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def suite_hash(study: StudyConfig, where: str | Path) -> str:
    """The content hash of the study's suite (validated); errors name `where`."""
    try:
        return load_suite(study.suite, study.tasks).content_hash
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from e


def save_record(folder: Path, record: RunRecord, run_hash: str) -> None:
    path = folder / "runs" / f"{record.run.name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"hash": run_hash, **record.model_dump()}, indent=2))
    os.replace(tmp, path)  # a record is there whole or not at all


def load_records(folder: str | Path) -> list[RunRecord]:
    """The records of a study folder's runs, as the study is configured now (see
    `stored_records`)."""
    return stored_records(folder)[0]


def stored_records(folder: str | Path) -> tuple[list[RunRecord], list[str]]:
    """The current records of a study folder, and the names of the stale ones: records stored
    under another config, protocol or suite content, which a table must not mix with the
    others (rerunning the study redoes them)."""
    folder = Path(folder)
    study = load_study(folder / "study.yaml")
    current_suite = suite_hash(study, folder / "study.yaml")
    records, stale = [], []
    for run in expand(study):
        path = folder / "runs" / f"{run.name}.json"
        if path.is_file():
            data = read_record(path)
            if data.pop("hash", None) == run_hash(run, study, current_suite):
                records.append(RunRecord.model_validate(data))
            else:
                stale.append(run.name)
    if stale:
        log.warning(
            "%s: %d stored runs are stale (another config or suite) and left out: %s",
            folder,
            len(stale),
            ", ".join(stale),
        )
    return records, stale


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
