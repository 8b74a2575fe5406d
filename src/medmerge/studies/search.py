"""A merge-hyperparameter search's config and its trials: the search space, the dev and test
parts of the suite, the merge a trial's parameters make and the score it gets on the dev part
(`medmerge.studies.tune` runs a search).

```yaml
name: cardio-tune
base: path/to/base
models: [path/to/parent_a, path/to/parent_b]
suite: path/to/local/suite      # split by seed: the search sees only the dev part
split: {dev: 0.5, seed: 0}
protocol: {num_fewshot: 0, dtype: float32}
objective: {kind: mean}         # mean | weighted (with weights: {task: w}) | worst
constraints:                    # optional: on the dev part, against the base
  - {task: general_control, max_drop: 3.0}   # points
search: {trials: 16, sampler: tpe, seed: 0, prune_limit: 8}
spaces:
  - method: dare_ties
    parameters:
      density: {low: 0.5, high: 1.0}
      lambda: {low: 0.5, high: 2.0, log: true}
      weight: {low: 0.0, high: 1.0, gradient: 3}   # a mergekit gradient of 3 values
    per_model: [{weight: {low: 0.2, high: 1.0}}, {}]
  - method: linear
    parameters: {weight: 0.5}                      # a constant
baselines:                      # merges to compare on the test part
  - {method: dare_ties, parameters: {weight: 0.5, density: 0.9}}
study: studies/cardio           # optional: a grid study whose best merge joins the baselines
final_top: 3
```

A parameter is a constant, a float range (`low`, `high`, `log`), an integer range
(`type: int`), `choices`, or a float range with `gradient: N` (N values over the layers, as
mergekit interpolates a list). With several spaces the method is itself a choice.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from medmerge.config import Reference, read_yaml
from medmerge.errors import ConfigError
from medmerge.eval.suites import Suite, SuiteManifest, load_suite
from medmerge.methods import config_name, get_method
from medmerge.studies.records import (
    MergeOptions,
    MergeSpec,
    Name,
    Protocol,
    Run,
    RunRecord,
    StudyConfig,
    expand,
    read_mapping,
)

log = logging.getLogger("medmerge")


class Space(BaseModel):
    """The values one parameter may take."""

    model_config = ConfigDict(extra="forbid")
    low: float | None = None
    high: float | None = None
    log: bool = False
    type: Literal["float", "int"] = "float"
    choices: list[Any] | None = None
    gradient: int | None = Field(None, ge=2, le=16)

    @model_validator(mode="after")
    def _valid(self):
        if self.choices is not None:
            if not self.choices or self.low is not None or self.high is not None:
                raise ValueError("give either a non-empty `choices` or `low` and `high`")
            return self
        if self.low is None or self.high is None:
            raise ValueError("a range needs `low` and `high` (or give `choices`)")
        if not self.low < self.high:
            raise ValueError(f"empty or inverted range: low {self.low} >= high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        if self.gradient and self.type == "int":
            raise ValueError("a gradient is a list of floats: leave out `type: int`")
        return self


class MethodSpace(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str
    parameters: dict[str, Any] = {}
    per_model: list[dict[str, Any]] | None = None


class Objective(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["mean", "weighted", "worst"] = "mean"
    weights: dict[str, Annotated[float, Field(ge=0, allow_inf_nan=False)]] | None = None

    @model_validator(mode="after")
    def _weights(self):
        if self.kind == "weighted" and not self.weights:
            raise ValueError("kind weighted needs `weights: {task: w}`")
        if self.weights is not None and not sum(self.weights.values()) > 0:
            raise ValueError("the weights must sum to more than 0 (give some task a weight > 0)")
        return self


class Constraint(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: str
    max_drop: float = Field(ge=0)  # accuracy points below the base, on the dev part


class Split(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dev: float = Field(0.5, gt=0, lt=1)
    seed: int = 0


class Search(BaseModel):
    model_config = ConfigDict(extra="forbid")
    trials: int = Field(16, ge=1, le=10000)
    sampler: Literal["tpe", "cmaes"] = "tpe"
    seed: int = 0
    prune_limit: int | None = Field(None, ge=1)  # questions per task of the early evaluation
    concurrent: int = Field(1, ge=1)  # trials at once (the ray executor)


class TuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Name = "tune"
    base: Reference
    models: list[Reference]
    suite: str
    tasks: list[str] | None = None
    split: Split = Split()
    protocol: Protocol = Protocol()
    merge: MergeOptions = MergeOptions()
    objective: Objective = Objective()
    constraints: list[Constraint] = []
    search: Search = Search()
    spaces: list[MethodSpace] = Field(min_length=1)
    baselines: list[MergeSpec] = []
    study: str | None = None  # a study folder: its best merge by mean accuracy is a baseline
    final_top: int = Field(3, ge=1)
    keep_models: bool = False


def load_tune(config: str | Path | dict | TuneConfig) -> TuneConfig:
    """A validated tune config: every method, parameter, range and task checked, before any
    merge or evaluation."""
    if isinstance(config, TuneConfig):
        cfg = config
    else:
        cfg = validated(TuneConfig, read_mapping(config, "tune config"), "invalid tune config")
    for space in cfg.spaces:
        _check_space(space, len(cfg.models))
    scored = tune_suite(cfg).accuracy_tasks
    if not scored:
        raise ConfigError(
            f"tune config: suite {cfg.suite} has no accuracy task (perplexity alone), and the "
            "objective is accuracy; add a multiple-choice task to the suite or to `tasks`"
        )
    named = [(c.task, "constraint") for c in cfg.constraints]
    named += [(t, "objective weight") for t in (cfg.objective.weights or {})]
    for task, what in named:
        if task not in scored:
            raise ConfigError(
                f"tune config: the {what} names task {task!r}, which is not an accuracy task of "
                f"the suite (its accuracy tasks: {', '.join(scored)})"
            )
    return cfg


def validated(model: type[BaseModel], data: Any, what: str) -> Any:
    """`model` validated from `data`; a ConfigError naming each bad key otherwise."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc']))}: {err['msg'].removeprefix('Value error, ')}"
            for err in e.errors()
        )
        raise ConfigError(f"{what}: {problems}") from e


def _check_space(space: MethodSpace, models: int) -> None:
    method = get_method(space.method)
    known = {config_name(p.name): p for p in method.params}
    per_model = space.per_model or []
    if len(per_model) not in (0, models):
        raise ConfigError(
            f"tune space {space.method}: per_model has {len(per_model)} entries for {models} models"
        )
    for where, params in [("parameters", space.parameters)] + [
        (f"per_model[{i}]", p) for i, p in enumerate(per_model)
    ]:
        for key, value in params.items():
            if key not in known:
                raise ConfigError(
                    f"tune space {space.method}: {where} names unknown parameter {key!r}; "
                    f"{space.method} takes {', '.join(known) or 'none'}"
                )
            if isinstance(value, dict):
                try:
                    Space.model_validate(value)
                except ValidationError as e:
                    problem = e.errors()[0]["msg"].removeprefix("Value error, ")
                    raise ConfigError(f"tune space {space.method}: {where}.{key}: {problem}") from e


def tune_suite(cfg: TuneConfig) -> Suite:
    """The search's suite, validated: a local one (the paper suite cannot be split offline)."""
    if cfg.suite == "paper":
        raise ConfigError(
            "tune needs a local suite (a folder with suite.yaml) to split into dev and test "
            "parts; the paper suite's Hub datasets cannot be split offline"
        )
    return load_suite(cfg.suite, cfg.tasks)


# ---- the dev and test parts ----


def split_suite(suite: str | Path, out: Path, dev: float, seed: int) -> dict[str, Path]:
    """The suite's test records split in two local suites, `out/dev` and `out/test`: a record
    goes to dev when a hash of (seed, task, record) falls below `dev`, so the parts are
    disjoint and the same on every run. Few-shot files are copied to both."""
    folder = Path(suite)
    load_suite(folder)  # validated: manifest, data inside the folder, records
    manifest = SuiteManifest.model_validate(read_yaml(folder / "suite.yaml", "suite manifest")[0])
    parts = {"dev": [], "test": []}
    rows: dict[str, dict[str, list[str]]] = {"dev": {}, "test": {}}
    for spec in manifest.tasks:
        for part in parts:
            rows[part][spec.name] = []
        for line in (folder / spec.test).read_text(encoding="utf-8").splitlines():
            if line.strip():
                digest = hashlib.sha256(f"{seed}\0{spec.name}\0{line}".encode()).digest()
                u = int.from_bytes(digest[:8], "big") / 2**64
                rows["dev" if u < dev else "test"][spec.name].append(line)
        for part in parts:
            if not rows[part][spec.name]:
                raise ConfigError(
                    f"suite task {spec.name}: its {part} part is empty with split dev={dev}; "
                    "add questions or move the split towards 0.5"
                )
    found = {}
    for part in parts:
        target = out / part
        target.mkdir(parents=True, exist_ok=True)
        tasks = []
        for spec in manifest.tasks:
            data = f"{spec.name}.jsonl"
            (target / data).write_text("\n".join(rows[part][spec.name]) + "\n", encoding="utf-8")
            entry = spec.model_dump(exclude_none=True) | {"test": data}
            if spec.fewshot:
                shutil.copyfile(folder / spec.fewshot, target / f"{spec.name}.fewshot.jsonl")
                entry["fewshot"] = f"{spec.name}.fewshot.jsonl"
            tasks.append(entry)
        text = yaml.safe_dump({"name": f"{manifest.name}-{part}", "tasks": tasks}, sort_keys=False)
        (target / "suite.yaml").write_text(text)
        found[part] = target
    return found


# ---- trials ----


def suggest(trial, cfg: TuneConfig) -> tuple[str, dict, list[dict]]:
    """The method, top-level and per-model parameters of one trial, drawn by `trial` (an Optuna
    trial, or a FixedTrial of stored params)."""
    methods = [s.method for s in cfg.spaces]
    index = 0
    if len(cfg.spaces) > 1:
        labels = [f"{i}:{m}" for i, m in enumerate(methods)]
        index = labels.index(trial.suggest_categorical("method", labels))
    space = cfg.spaces[index]
    prefix = f"{index}:{space.method}." if len(cfg.spaces) > 1 else ""
    params = {k: _draw(trial, prefix + k, v) for k, v in space.parameters.items()}
    per_model = [
        {k: _draw(trial, f"{prefix}model{i}.{k}", v) for k, v in p.items()}
        for i, p in enumerate(space.per_model or [{} for _ in cfg.models])
    ]
    return space.method, params, per_model


def _draw(trial, name: str, value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    s = Space.model_validate(value)
    if s.choices is not None:
        return trial.suggest_categorical(name, s.choices)
    if s.type == "int":
        return trial.suggest_int(name, int(s.low), int(s.high), log=s.log)
    if s.gradient:
        return [trial.suggest_float(f"{name}[{i}]", s.low, s.high, log=s.log)
                for i in range(s.gradient)]  # fmt: skip
    return trial.suggest_float(name, s.low, s.high, log=s.log)


def merge_run(cfg: TuneConfig, name: str, method: str, params: dict, per_model: list[dict]) -> Run:
    """The study runner's merge run for these parameters (its merge config as a study makes
    it; a list value is a gradient, not a grid axis)."""
    wrapped = {k: {"value": v} if isinstance(v, list) else v for k, v in params.items()}
    spec = MergeSpec(method=method, name=name, parameters=wrapped, per_model=per_model)
    return expand(as_study(cfg, [spec]))[-1]


def as_study(cfg: TuneConfig, merges: list[MergeSpec], suite: Path | None = None) -> StudyConfig:
    """The study whose runs are these merges of the search's models, evaluated its way."""
    return StudyConfig(
        name=cfg.name,
        base=cfg.base,
        models=cfg.models,
        suite=str(suite or cfg.suite),
        tasks=cfg.tasks,
        protocol=cfg.protocol,
        merge=cfg.merge,
        keep_models=True,
        merges=merges,
    )


def objective_value(scores: dict[str, float], objective: Objective) -> float:
    """The search's objective from per-task accuracies."""
    if objective.kind == "worst":
        return min(scores.values())
    if objective.kind == "weighted":
        weights = objective.weights
        return sum(weights[t] * scores[t] for t in weights) / sum(weights.values())
    return sum(scores.values()) / len(scores)


def accuracies(result: dict) -> dict[str, float]:
    """Per task, `acc` (tasks without one, such as perplexity, do not enter the objective)."""
    return {t: s["metrics"]["acc"] for t, s in result["tasks"].items() if "acc" in s["metrics"]}


def evaluate_run(run: Run, cfg: TuneConfig, folder: str, suite: str, limit: int | None,
                 keep: bool) -> RunRecord:  # fmt: skip
    """Merge (for a merge run) and evaluate on `suite` (at most `limit` questions per task, if
    given, and the protocol's limit), through the tune folder's result store; the merged model
    is deleted afterwards unless `keep`. Runs in a Ray worker too."""
    from medmerge.studies.study import execute_run

    study = as_study(cfg, [], Path(suite))
    limits = [x for x in (limit, cfg.protocol.limit) if x is not None]
    study.protocol = cfg.protocol.model_copy(update={"limit": min(limits, default=None)})
    study.result_store = str(Path(folder) / "results.sqlite")
    study.keep_models = keep
    return execute_run(run, study, folder)
