"""Studies: merge with every method and setting, evaluate every model, compare.

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

A study folder holds `study.yaml`, `runs/NAME.json` (one record per finished run), `models/`
(merged checkpoints), `results.sqlite` (the evaluation store) and `study.log`. Rerunning the
same command resumes: finished runs are skipped, half-written merges (temporary folders) are
removed and redone. `executor: ray` runs each run as a Ray task (GPU declared per task when the
protocol's device is cuda); the local executor needs no Ray.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Literal

import psutil
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from tqdm.auto import tqdm

from medmerge.errors import ConfigError

log = logging.getLogger("medmerge")

# The paper's methods and hyperparameters where it gives them (linear and task arithmetic at
# 0.5, DARE-TIES at density 0.6 and the 0.9 it recommends, DELLA 0.6/0.05, Breadcrumbs 0.9/0.01),
# plus the two it could not run (SLERP, SCE) and both alignments of its hierarchical method.
PAPER_MERGES = [
    {"method": "linear", "parameters": {"weight": 0.5}},
    {"method": "task_arithmetic", "parameters": {"weight": [0.5, 1.0]}},
    {"method": "ties", "parameters": {"weight": 0.5, "density": 0.6}},
    {"method": "dare_ties", "parameters": {"weight": 0.5, "density": [0.6, 0.9]}},
    {"method": "della", "parameters": {"weight": 0.5, "density": 0.6, "epsilon": 0.05}},
    {"method": "breadcrumbs", "parameters": {"weight": 0.5, "density": 0.9, "gamma": 0.01}},
    {"method": "slerp", "parameters": {"t": 0.5}},
    {"method": "sce", "parameters": {"select_topk": 0.5}},
    {"method": "hierarchical", "name": "hierarchical-joint"},
    {
        "method": "hierarchical",
        "name": "hierarchical-per_tensor",
        "parameters": {"alignment": "per_tensor"},
    },
]


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
    name: str | None = None
    parameters: dict[str, Any] = {}
    per_model: list[dict[str, Any]] | None = None


class StudyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "study"
    base: str
    models: list[str]
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
    model: str | None = None  # reference rows: the folder
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


def load_study(config: str | Path | dict | StudyConfig) -> StudyConfig:
    if isinstance(config, StudyConfig):
        return config
    if not isinstance(config, dict):
        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"study config {path} does not exist")
        config = yaml.safe_load(path.read_text())
    try:
        return StudyConfig.model_validate(config)
    except ValidationError as e:
        raise ConfigError(f"invalid study config: {e}") from e


def _value_label(v: Any) -> str:
    return json.dumps(v, separators=(",", ":")) if isinstance(v, (list, dict)) else str(v)


def expand(study: StudyConfig) -> list[Run]:
    """Reference rows, then one run per merge and grid point, with readable unique names."""
    runs = [Run(name="base", kind="base", model=study.base)]
    for i, m in enumerate(study.models):
        runs.append(Run(name=f"parent_{chr(ord('a') + i)}", kind="parent", model=m))
    seen: dict[str, int] = {}
    for spec in study.merges:
        axes = {k: v for k, v in spec.parameters.items() if isinstance(v, list)}
        fixed = {
            k: (v["value"] if isinstance(v, dict) and set(v) == {"value"} else v)
            for k, v in spec.parameters.items()
            if k not in axes
        }
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
                "base_model": study.base,
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


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 20 ms)."""

    def __enter__(self):
        self.peak = psutil.Process().memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        proc = psutil.Process()
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, proc.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.mb = self.peak / 2**20


def _run_hash(run: Run, study: StudyConfig) -> str:
    key = {
        "run": run.model_dump(),
        "suite": study.suite,
        "tasks": study.tasks,
        "protocol": study.protocol.model_dump(),
        "merge": study.merge.model_dump(),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def execute_run(run: Run, study: StudyConfig, folder: str) -> RunRecord:
    """Merge (if a merge run), evaluate through the study's result store, record. Pure enough to
    run in another process (Ray)."""
    from medmerge.engine import merge
    from medmerge.eval import evaluate

    folder = Path(folder)
    merge_seconds = peak = None
    model = Path(run.model) if run.model else folder / "models" / run.name
    if run.kind == "merge":
        started = time.time()
        with PeakRSS() as mem:
            merge(
                run.merge_config,
                model,
                device=study.merge.device,
                seed=study.merge.seed,
                overwrite=True,
                progress=False,
            )
        merge_seconds, peak = round(time.time() - started, 3), round(mem.mb, 1)
    started = time.time()
    p = study.protocol
    result = evaluate(
        model,
        suite=study.suite,
        tasks=study.tasks,
        num_fewshot=p.num_fewshot,
        dtype=p.dtype,
        device=p.device,
        batch_size=p.batch_size,
        limit=p.limit,
        seed=p.seed,
        store=study.result_store or folder / "results.sqlite",
    )
    record = RunRecord(
        run=run,
        fingerprint=result.fingerprint,
        merge_seconds=merge_seconds,
        merge_peak_rss_mb=peak,
        eval_seconds=round(time.time() - started, 3),
        eval_cached=result.cached,
        result=result.model_dump(),
    )
    if run.kind == "merge" and not study.keep_models:
        shutil.rmtree(model, ignore_errors=True)
    return record


def _save_record(folder: Path, record: RunRecord, run_hash: str) -> None:
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
            data = json.loads(path.read_text())
            data.pop("hash", None)
            records.append(RunRecord.model_validate(data))
    return records


def run_study(
    config: str | Path | dict | StudyConfig,
    out: str | Path | None = None,
    *,
    executor: Literal["local", "ray"] = "local",
    report: bool = True,
    progress: bool = True,
) -> Path:
    """Run (or resume) a study into `out`; returns the folder. Writes the report at the end."""
    study = load_study(config)
    folder = Path(out or f"studies/{study.name}")
    (folder / "runs").mkdir(parents=True, exist_ok=True)
    (folder / "models").mkdir(exist_ok=True)
    (folder / "study.yaml").write_text(
        yaml.safe_dump(study.model_dump(mode="json"), sort_keys=False)
    )
    handler = logging.FileHandler(folder / "study.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    try:
        for leftover in (folder / "models").glob(".*.tmp-*"):
            log.info("removing half-written merge %s", leftover)
            shutil.rmtree(leftover, ignore_errors=True)
        runs = expand(study)
        todo = []
        for run in runs:
            path = folder / "runs" / f"{run.name}.json"
            done = path.is_file() and json.loads(path.read_text()).get("hash") == _run_hash(
                run, study
            )
            if not done:
                todo.append(run)
        log.info("study %s: %d runs, %d to do", study.name, len(runs), len(todo))
        if executor == "ray":
            _run_ray(todo, study, folder)
        else:
            with tqdm(
                total=len(runs),
                initial=len(runs) - len(todo),
                desc=study.name,
                unit="run",
                disable=not progress,
            ) as bar:
                for run in todo:
                    bar.set_postfix_str(
                        f"{run.name}: {'merge+eval' if run.kind == 'merge' else 'eval'}"
                    )
                    record = execute_run(run, study, str(folder))
                    _save_record(folder, record, _run_hash(run, study))
                    log.info(
                        "run %s done (merge %s s, eval %s s%s)",
                        run.name,
                        record.merge_seconds,
                        record.eval_seconds,
                        ", cached" if record.eval_cached else "",
                    )
                    bar.update()
        if report:
            from medmerge.report import write_report

            write_report(folder)
    finally:
        log.removeHandler(handler)
        handler.close()
    return folder


def _run_ray(todo: list[Run], study: StudyConfig, folder: Path) -> None:
    try:
        import ray
    except ImportError as e:
        raise ConfigError("--executor ray needs Ray: pip install 'medmerge[ray]'") from e
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False)
    gpus = 1 if study.protocol.device == "cuda" or study.merge.device == "cuda" else 0
    task = ray.remote(num_cpus=1, num_gpus=gpus)(execute_run)
    pending = {task.remote(run, study, str(folder.resolve())): run for run in todo}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        run = pending.pop(ready[0])
        record = ray.get(ready[0])
        _save_record(folder, record, _run_hash(run, study))
        log.info("run %s done on ray", run.name)
