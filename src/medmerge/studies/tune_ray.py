"""`medmerge tune --executor ray`: the search's trials as Ray Tune trials, drawn by Ray Tune's
Optuna searcher from the tune folder's own study (its SQLite storage and its sampler, so the
search resumes and, one trial at a time, draws what the local executor draws). Each trial's
merge and dev evaluation run in a Ray worker; its dev scores, fingerprint and constraints are
kept on its Optuna trial, as the local executor keeps them."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import optuna
import ray
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from medmerge.studies.search import (
    TuneConfig,
    accuracies,
    evaluate_run,
    merge_run,
    objective_value,
    suggest,
)


class Space:
    """The define-by-run search space: a trial's parameters drawn as the local executor draws
    them, its merge config kept on the Optuna trial."""

    def __init__(self, cfg: TuneConfig):
        self.cfg = cfg

    def __call__(self, trial) -> None:
        method, params, per_model = suggest(trial, self.cfg)
        run = merge_run(self.cfg, f"trial-{trial.number}", method, params, per_model)
        trial.set_user_attr("merge_config", run.merge_config)


class Searcher(OptunaSearch):
    """Ray Tune's Optuna searcher, which also keeps each trial's dev scores, fingerprint and
    constraints on its Optuna trial before telling Optuna its value (a finished trial can no
    longer be annotated)."""

    def __init__(self, *args, base_dev: dict, constraints: list[tuple[str, float]], **kwargs):
        super().__init__(*args, **kwargs)
        self.base_dev, self.constraints = base_dev, constraints

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        trial = self._ot_trials.get(trial_id)  # OptunaSearch's own map of running trials
        scores = {k.removeprefix("dev/"): v for k, v in (result or {}).items()
                  if k.startswith("dev/")}  # fmt: skip
        if trial is not None and scores:
            trial.set_user_attr("dev", scores)
            trial.set_user_attr("fingerprint", result["fingerprint"])
            violations = [(self.base_dev[task] - scores[task]) * 100 - drop
                          for task, drop in self.constraints]  # fmt: skip
            trial.set_user_attr("constraints", violations)
            for (task, _), v in zip(self.constraints, violations, strict=True):
                trial.set_constraint(f"{task} drop", v)
        super().on_trial_complete(trial_id, result, error)


def trial(params: dict, cfg: TuneConfig, folder: str, suite: str) -> None:
    """One trial, in a worker: the merge of the drawn parameters, scored on the dev part
    through the folder's result store."""
    method, top, per_model = suggest(optuna.trial.FixedTrial(params), cfg)
    run = merge_run(cfg, f"trial-{uuid.uuid4().hex[:12]}", method, top, per_model)
    record = evaluate_run(run, cfg, folder, suite, None, keep=False)
    scores = accuracies(record.result)
    dev = {f"dev/{task}": value for task, value in scores.items()}  # Ray flattens nested dicts
    tune.report({"objective": objective_value(scores, cfg.objective),
                 "fingerprint": record.fingerprint, **dev})  # fmt: skip


def run_trials(search, count: int) -> None:
    """Run `count` more trials of `search` (a `medmerge.studies.tune._Search`) on Ray Tune."""
    cfg: TuneConfig = search.cfg
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False)
    gpus = 1 if "cuda" in (cfg.protocol.device, cfg.merge.device) else 0
    searcher = Searcher(
        space=Space(cfg), metric="objective", mode="max", sampler=search.sampler(),
        study_name=cfg.name, storage=search.study._storage, base_dev=search.base_dev,
        constraints=[(c.task, c.max_drop) for c in cfg.constraints],
    )  # fmt: skip
    folder = Path(search.folder).resolve()
    trainable = tune.with_parameters(trial, cfg=cfg, folder=str(folder),
                                     suite=str(Path(search.suites["dev"]).resolve()))  # fmt: skip
    tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1, "gpu": gpus}),
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=count,
                                    max_concurrent_trials=cfg.search.concurrent),
        run_config=tune.RunConfig(name=cfg.name, verbose=0, storage_path=str(folder / "ray")),
    ).fit()  # fmt: skip
