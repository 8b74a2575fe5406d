"""Studies: merge with every method and setting, evaluate every model, compare.

A study config (schema in `medmerge.studies.records`) names a base, its fine-tunes, a suite and the
merges to run, each parameter list a grid axis. A study folder holds `study.yaml`,
`runs/NAME.json` (one record per finished run), `models/` (merged checkpoints),
`results.sqlite` (the evaluation store) and `study.log`. Rerunning the same command resumes:
finished runs are skipped, half-written merges (temporary folders) are removed and redone.
`executor: ray` runs each run as a Ray task (GPU declared per task when the protocol's device
is cuda); the local executor needs no Ray.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Literal

import psutil
import yaml
from tqdm.auto import tqdm

from medmerge.errors import ConfigError, MergeError
from medmerge.io.folders import locked, refuse_output_near, sweep
from medmerge.io.references import local_folders
from medmerge.studies.records import (
    Run,
    RunRecord,
    StudyConfig,
    expand,
    load_study,
    read_record,
    run_hash,
    save_record,
    suite_hash,
)

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


def execute_run(run: Run, study: StudyConfig, folder: str) -> RunRecord:
    """Merge (if a merge run), evaluate through the study's result store, record. Pure enough to
    run in another process (Ray)."""
    from medmerge.engine import merge
    from medmerge.eval import evaluate
    from medmerge.io.card import add_scores

    folder = Path(folder)
    merge_seconds = peak = None
    model = run.model or folder / "models" / run.name
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
    elif run.kind == "merge":
        add_scores(Path(model), study.name, result.protocol, result.tasks)
    return record


def run_study(
    config: str | Path | dict | StudyConfig,
    out: str | Path | None = None,
    *,
    executor: Literal["local", "ray"] = "local",
    report: bool = True,
    progress: bool = True,
) -> Path:
    """Run (or resume) a study into `out`; returns the folder. Writes the report at the end.

    >>> run_study("study.yaml", "studies/cardio", executor="local")
    """
    study = load_study(config)
    runs = expand(study)  # names checked (unique, plain) before anything is written
    folder = Path(out or f"studies/{study.name}")
    suite = suite_hash(study, "study config")
    try:  # its files written into a model would change it
        refuse_output_near(folder, local_folders([study.base, *study.models]), "study folder",
                           contains=False)  # fmt: skip
    except MergeError as e:
        raise ConfigError(str(e)) from e
    folder.mkdir(parents=True, exist_ok=True)
    with locked(folder):  # one process at a time runs a study folder
        _run_locked(study, runs, suite, folder, executor, report, progress)
    return folder


def _run_locked(
    study: StudyConfig,
    runs: list[Run],
    suite: str,
    folder: Path,
    executor: str,
    report: bool,
    progress: bool,
):
    (folder / "runs").mkdir(parents=True, exist_ok=True)
    (folder / "models").mkdir(exist_ok=True)
    (folder / "study.yaml").write_text(
        yaml.safe_dump(study.model_dump(mode="json"), sort_keys=False)
    )
    handler = logging.FileHandler(folder / "study.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    try:
        sweep(folder / "models")  # half-written merges of a killed run, their locks
        hashes = {run.name: run_hash(run, study, suite) for run in runs}
        todo = [r for r in runs if not _done(folder / "runs" / f"{r.name}.json", hashes[r.name])]
        check_merges(todo)
        log.info("study %s: %d runs, %d to do", study.name, len(runs), len(todo))
        if executor == "ray":
            _run_ray(todo, study, folder, hashes)
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
                    save_record(folder, record, hashes[run.name])
                    log.info(
                        "run %s done (merge %s s, eval %s s%s)",
                        run.name,
                        record.merge_seconds,
                        record.eval_seconds,
                        ", cached" if record.eval_cached else "",
                    )
                    bar.update()
        if report:
            from medmerge.studies.report import write_report

            write_report(folder)
    finally:
        log.removeHandler(handler)
        handler.close()


def check_merges(runs: list[Run], what: str = "study merge") -> None:
    """Plan every merge before anything runs, unknown parameters as errors: a misspelt method
    or parameter fails now, not after the base and parents were evaluated. Errors name the
    run as `what` and its name."""
    from medmerge.plan import plan_merge

    for run in runs:
        if run.kind == "merge":
            try:
                with plan_merge(run.merge_config, strict=True):
                    pass  # planned: every check passed
            except ConfigError as e:
                raise ConfigError(f"{what} {run.name}: {e}") from e


def _done(path: Path, run_hash: str) -> bool:
    """Whether a run's record is stored for this very run; a damaged one is redone."""
    if not path.is_file():
        return False
    try:
        return read_record(path).get("hash") == run_hash
    except ConfigError as e:
        log.warning("%s; redoing that run", e)
        return False


def _run_ray(todo: list[Run], study: StudyConfig, folder: Path, hashes: dict[str, str]) -> None:
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
        save_record(folder, record, hashes[run.name])
        log.info("run %s done on ray", run.name)
