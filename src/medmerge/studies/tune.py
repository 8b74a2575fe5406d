"""Running a merge-hyperparameter search (`medmerge tune`): Optuna proposes merge configs
(`medmerge.studies.search`), each is merged and scored on the dev part of a local suite, and
the best few are judged once, at the end, on its test part.

The folder holds `tune.yaml`, `optuna.sqlite3` (the search: a rerun with the same config
resumes it; one with another search space, objective, suite or protocol is refused), `suites/`
(the dev and test parts), `results.sqlite` (the evaluation store: merged weights that hash the
same as an earlier trial's reuse its evaluation), `heldout.json`, `best.yaml` and `report.md`
with its figures. Each trial's sampler is seeded by the seed and the number of trials finished
before it, so a search that was stopped and resumed proposes what an uninterrupted one does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Literal

import optuna
import sqlalchemy.exc
import yaml

from medmerge.errors import ConfigError, MergeError
from medmerge.io.folders import locked, refuse_output_near, sweep
from medmerge.io.references import local_folders
from medmerge.studies.records import (
    Run,
    RunRecord,
    expand,
    read_mapping,
)
from medmerge.studies.search import (
    Search,
    Space,
    TuneConfig,
    accuracies,
    as_study,
    evaluate_run,
    load_tune,
    merge_run,
    objective_value,
    split_suite,
    suggest,
    tune_suite,
    validated,
)

log = logging.getLogger("medmerge")


class Reseeded(optuna.samplers.BaseSampler):
    """TPE or CMA-ES, each trial drawn by a fresh sampler seeded by the search seed and the
    number of trials before it (a trial a killed process left running aside): a trial's values
    depend only on the history before it, so a resumed search, or one run by Ray Tune, draws
    what an uninterrupted sequential one does."""

    def __init__(self, kind: str, seed: int, startup: int):
        self.kind, self.seed, self.startup = kind, seed, startup
        self._inner: dict[int, optuna.samplers.BaseSampler] = {}

    def _for(self, study, trial) -> optuna.samplers.BaseSampler:
        if trial.number not in self._inner:
            earlier = sum(
                1
                for t in study.get_trials(deepcopy=False)
                if t.number < trial.number and not t.user_attrs.get("interrupted")
            )
            # hashed: consecutive integer seeds draw alike first values
            key = f"{self.seed}:{earlier}".encode()
            seed = int.from_bytes(hashlib.sha256(key).digest()[:4], "big")
            self._inner[trial.number] = (
                optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
                if self.kind == "cmaes"
                else optuna.samplers.TPESampler(seed=seed, n_startup_trials=self.startup)
            )  # fmt: skip
        return self._inner[trial.number]

    def infer_relative_search_space(self, study, trial):
        return self._for(study, trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._for(study, trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        inner = self._for(study, trial)
        return inner.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial):
        self._for(study, trial).before_trial(study, trial)

    def after_trial(self, study, trial, state, values):
        self._for(study, trial).after_trial(study, trial, state, values)
        self._inner.pop(trial.number, None)


class _Search:
    """One tune folder's search: the Optuna study in SQLite, the dev part, the base's scores."""

    def __init__(self, cfg: TuneConfig, folder: Path, suites: dict[str, Path],
                 storage: optuna.storages.RDBStorage):  # fmt: skip
        self.cfg, self.folder, self.suites = cfg, folder, suites
        self.study = optuna.create_study(
            study_name=cfg.name,
            storage=storage,
            direction="maximize",
            load_if_exists=True,
            sampler=self.sampler(),
            pruner=(
                optuna.pruners.MedianPruner(n_startup_trials=3)
                if cfg.search.prune_limit
                else optuna.pruners.NopPruner()
            ),
        )
        # a trial left running by a killed process is failed; the next trial, drawn with the
        # same history and seed, proposes what it would have
        for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            storage.set_trial_user_attr(t._trial_id, "interrupted", True)
            storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        self._sweep()
        base = Run(name="base", kind="base", model=cfg.base)
        record = self.evaluate(base, "dev", None)
        self.base_dev = accuracies(record.result)

    def _sweep(self) -> None:
        """Remove what a killed search left in `models/`: half-written merges and their locks,
        and the merged models of trials that did not finish (a finished trial's model is kept
        only by the final step)."""
        models = self.folder / "models"
        sweep(models)
        complete = {t.number for t in self.study.get_trials(
            deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))}  # fmt: skip
        for left in models.glob("trial-*"):
            number = left.name.removeprefix("trial-")
            if not (number.isdigit() and int(number) in complete):
                log.info("removing the model of unfinished trial %s", left.name)
                shutil.rmtree(left, ignore_errors=True)

    def evaluate(self, run: Run, part: str, limit: int | None, keep: bool = False) -> RunRecord:
        return evaluate_run(run, self.cfg, str(self.folder), str(self.suites[part]), limit,
                            keep)  # fmt: skip

    def finished(self) -> int:
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        return len(self.study.get_trials(deepcopy=False, states=states))

    def failed(self) -> int:
        """Trials whose merge was refused (a config error)."""
        return sum(1 for t in self.study.get_trials(deepcopy=False) if "error" in t.user_attrs)

    def sampler(self) -> Reseeded:
        search = self.cfg.search
        return Reseeded(search.sampler, search.seed, max(2, min(10, search.trials // 4)))

    def ask(self):
        trial = self.study.ask()
        method, params, per_model = suggest(trial, self.cfg)
        run = merge_run(self.cfg, f"trial-{trial.number}", method, params, per_model)
        trial.set_user_attr("merge_config", run.merge_config)
        return trial, run

    def tell(self, trial, record: RunRecord, pruned: bool = False) -> float:
        """Record a trial's dev scores and constraints; tell Optuna its value (or that it was
        pruned on these early scores)."""
        scores = accuracies(record.result)
        value = objective_value(scores, self.cfg.objective)
        trial.set_user_attr("dev", scores)
        trial.set_user_attr("fingerprint", record.fingerprint)
        violations = self._violations(scores)
        trial.set_user_attr("constraints", violations)
        for c, v in zip(self.cfg.constraints, violations, strict=True):
            trial.set_constraint(f"{c.task} drop", v)  # <= 0: feasible (the sampler reads it)
        if pruned:
            self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            self.study.tell(trial, value)
        return value

    def _violations(self, scores: dict[str, float]) -> list[float]:
        """Per constraint, points below the base beyond the allowed drop (<= 0: met)."""
        return [(self.base_dev[c.task] - scores[c.task]) * 100 - c.max_drop
                for c in self.cfg.constraints]  # fmt: skip

    def run_local(self, trials: int, progress: bool) -> None:
        from tqdm.auto import tqdm

        with tqdm(total=trials, initial=self.finished(), desc=self.cfg.name, unit="trial",
                  disable=not progress) as bar:  # fmt: skip
            while self.finished() < trials:
                trial, run = self.ask()
                try:
                    record, pruned = self._dev_scores(trial, run)
                except ConfigError as e:
                    self.refuse(trial, e, trials)
                    continue
                value = self.tell(trial, record, pruned)
                log.info("trial %d: %.4f %s", trial.number, value, trial.params)
                bar.update()

    def _dev_scores(self, trial, run: Run) -> tuple[RunRecord, bool]:
        """The trial's merge scored on the dev part, and whether the pruner stopped it after
        its first look at `prune_limit` questions per task."""
        limit = self.cfg.search.prune_limit
        if not limit:
            return self.evaluate(run, "dev", None), False
        early = self.evaluate(run, "dev", limit, keep=True)
        merged = self.folder / "models" / run.name
        try:
            trial.report(objective_value(accuracies(early.result), self.cfg.objective), 0)
            if trial.should_prune():
                return early, True
            merged_run = Run(name=run.name, kind="parent", model=str(merged))  # merged once
            return self.evaluate(merged_run, "dev", None), False
        finally:
            shutil.rmtree(merged, ignore_errors=True)

    def refuse(self, trial, error: ConfigError, trials: int) -> None:
        """A trial whose merge the method refuses (weights summing to 0, say) fails with its
        reason recorded; the search goes on, unless failures outnumber the trials asked."""
        trial.set_user_attr("error", str(error))
        self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        log.warning("trial %d refused: %s", trial.number, error)
        if self.failed() > trials:
            raise ConfigError(
                f"tune {self.cfg.name}: {self.failed()} trials were refused, the last with: "
                f"{error}; narrow the search space"
            )

    def run_ray(self, trials: int) -> None:
        """Ray Tune trials drawn by its Optuna searcher from this folder's study (the storage
        and sampler of the local executor), each trial's merge and dev evaluation in a Ray
        worker (`medmerge.studies.tune_ray`)."""
        try:
            from medmerge.studies.tune_ray import run_trials
        except ImportError as e:
            raise ConfigError("--executor ray needs Ray Tune: pip install 'medmerge[ray]'") from e
        remaining = trials - self.finished()
        if remaining > 0:
            run_trials(self, remaining)

    def best(self, n: int) -> list:
        """The n best finished trials that meet the constraints, distinct merge configs."""
        complete = self.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        feasible = [t for t in complete if "dev" in t.user_attrs
                    and all(c <= 0 for c in t.user_attrs["constraints"])]  # fmt: skip
        found, seen = [], set()
        for t in sorted(feasible, key=lambda t: (-t.value, t.number)):
            key = json.dumps(t.user_attrs["merge_config"], sort_keys=True)
            if key not in seen:
                seen.add(key)
                found.append(t)
        return found[:n]


def run_tune(
    config: str | Path | dict | TuneConfig,
    out: str | Path | None = None,
    *,
    trials: int | None = None,
    executor: Literal["local", "ray"] = "local",
    progress: bool = True,
) -> Path:
    """Run (or resume) a search into `out`, then judge its best configs on the test part and
    write the report; returns the folder.

    >>> run_tune("tune.yaml", "tunes/cardio", trials=16)
    """
    cfg = load_tune(config)
    if trials is not None:
        search = {**cfg.search.model_dump(), "trials": trials}
        cfg = cfg.model_copy(update={"search": validated(Search, search, f"--trials {trials}")})
    # local paths made absolute: Ray Tune runs each trial in a folder of its own
    local = {k: str(Path(v).resolve()) if isinstance(v, str) and Path(v).exists() else v
             for k, v in (("base", cfg.base), ("suite", cfg.suite))}  # fmt: skip
    models = [str(Path(m).resolve()) if isinstance(m, str) and Path(m).exists() else m
              for m in cfg.models]  # fmt: skip
    cfg = cfg.model_copy(update={**local, "models": models})
    folder = Path(out or f"tunes/{cfg.name}")
    try:  # its files written into a model would change it
        refuse_output_near(folder, local_folders([cfg.base, *cfg.models]), "tune folder",
                           contains=False)  # fmt: skip
    except MergeError as e:
        raise ConfigError(str(e)) from e
    folder.mkdir(parents=True, exist_ok=True)
    with locked(folder):
        _check_merges(cfg)
        suite_hash = tune_suite(cfg).content_hash
        storage = _storage(folder)
        _check_resume(cfg, folder, storage, suite_hash)
        (folder / "models").mkdir(exist_ok=True)
        (folder / "tune.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"),
                                                         sort_keys=False))  # fmt: skip
        suites = split_suite(cfg.suite, folder / "suites", cfg.split.dev, cfg.split.seed)
        search = _Search(cfg, folder, suites, storage)
        search.study.set_user_attr("suite", suite_hash)
        if executor == "ray":
            search.run_ray(cfg.search.trials)
        else:
            search.run_local(cfg.search.trials, progress)
        heldout = _held_out(search)
        from medmerge.studies.tune_report import write_tune_report

        write_tune_report(folder, search.study, heldout, cfg)
    return folder


def _storage(folder: Path) -> optuna.storages.RDBStorage:
    """The folder's Optuna storage, read once through; a damaged file is a ConfigError."""
    path = folder / "optuna.sqlite3"
    try:
        storage = optuna.storages.RDBStorage(f"sqlite:///{path}")
        optuna.get_all_study_summaries(storage)
    except (sqlalchemy.exc.SQLAlchemyError, RuntimeError) as e:
        raise ConfigError(
            f"{path} cannot be read as an Optuna search ({type(e).__name__}); move it away to "
            "search anew in this folder, or give a new folder with --out"
        ) from e
    return storage


# what a resumed search may change: how many trials, how they run, what the final step judges
RESUMABLE = ("search.trials", "search.concurrent", "protocol.batch_size", "protocol.device",
             "merge.device", "baselines", "study", "final_top", "keep_models")  # fmt: skip


def _check_resume(cfg: TuneConfig, folder: Path, storage, suite_hash: str) -> None:
    """A folder's trials were drawn from its `tune.yaml` and scored on its suite: resuming
    them with another space, objective, split, protocol, models or suite content would mix
    incomparable trials (or fail in Optuna), so it is refused before `tune.yaml` is
    rewritten. More trials and another final step are fine."""
    summaries = [s for s in optuna.get_all_study_summaries(storage) if s.n_trials]
    if not summaries:
        return
    stored = folder / "tune.yaml"
    fix = f"search anew in a new folder (--out), or resume with the config in {stored}"
    try:
        before = _search_defining(validated(TuneConfig, read_mapping(stored, "tune config"),
                                             f"invalid {stored}"))  # fmt: skip
    except ConfigError as e:
        raise ConfigError(f"{folder} holds a search, but: {e}; {fix}") from e
    changed = [k for k, v in _search_defining(cfg).items() if before[k] != v]
    if any(s.user_attrs.get("suite", suite_hash) != suite_hash for s in summaries):
        changed.append("suite content")
    if changed:
        raise ConfigError(
            f"{folder} holds a search whose {', '.join(changed)} differ from this config's; "
            f"its trials cannot be resumed with this config: {fix}"
        )


def _search_defining(cfg: TuneConfig) -> dict:
    """The config's keys (`search.seed`, `spaces`, ...) less those a resumed search may change
    (`RESUMABLE`)."""
    flat = {}
    dumped = cfg.model_dump(mode="json")
    dumped["spaces"] = [_canonical(s) for s in dumped["spaces"]]
    for key, value in dumped.items():
        for sub, v in value.items() if isinstance(value, dict) else [("", value)]:
            flat[f"{key}.{sub}" if sub else key] = v
    return {k: v for k, v in flat.items() if k not in RESUMABLE}


def _canonical(space: dict) -> dict:
    """A method's space with every range written out in full (`log: false` given or not)."""

    def values(params: dict) -> dict:
        return {k: Space.model_validate(v).model_dump() if isinstance(v, dict) else v
                for k, v in params.items()}  # fmt: skip

    per_model = [values(p) for p in space.get("per_model") or []]
    return {**space, "parameters": values(space["parameters"]), "per_model": per_model or None}


def _check_merges(cfg: TuneConfig) -> None:
    """Every space and baseline planned strictly (at its ranges' middles) before anything
    runs: incompatible models or a parameter the method refuses fail now."""
    from medmerge.studies.study import check_merges

    runs = []
    for i, space in enumerate(cfg.spaces):
        single = cfg.model_copy(update={"spaces": [space]})
        method, top, per_model = suggest(_Middle(), single)
        runs.append(merge_run(cfg, f"space-{i}", method, top, per_model))
    check_merges(runs + _baselines(cfg), "tune")


def _baselines(cfg: TuneConfig) -> list[Run]:
    """The merge runs the tuned merge is judged against: the config's baselines and the best
    merge (by mean accuracy) of `cfg.study`, a study folder."""
    runs = [r.model_copy(update={"name": f"baseline-{r.name}"})
            for r in expand(as_study(cfg, cfg.baselines)) if r.kind == "merge"]  # fmt: skip
    if cfg.study:
        from medmerge.studies.records import load_records
        from medmerge.studies.report import accuracy_tasks, mean_acc

        if not (Path(cfg.study) / "study.yaml").is_file():
            raise ConfigError(f"tune config: study {cfg.study} is not a study folder")
        merges = [r for r in load_records(cfg.study) if r.run.kind == "merge"]
        if not merges:
            raise ConfigError(f"tune config: study {cfg.study} has no finished merge")
        tasks = accuracy_tasks(merges)
        if not tasks:
            raise ConfigError(
                f"tune config: study {cfg.study} has no accuracy task to choose its best merge "
                "by; leave `study` out"
            )
        best = max(merges, key=lambda r: mean_acc(r, tasks)[0])
        runs.append(best.run.model_copy(update={"name": f"study-{best.run.name}"}))
    return runs


class _Middle:
    """A stand-in trial that draws each range's middle and each first choice."""

    def suggest_float(self, name, low, high, log=False):  # noqa: ARG002
        return math.sqrt(low * high) if log else (low + high) / 2

    def suggest_int(self, name, low, high, log=False):  # noqa: ARG002
        return round(self.suggest_float(name, low, high, log))

    def suggest_categorical(self, name, choices):  # noqa: ARG002
        return choices[0]


def _held_out(search: _Search) -> list[RunRecord]:
    """The final step, the only one that reads the test part: the best trials (merged again),
    the baselines, the parents and the base."""
    cfg = search.cfg
    runs = [Run(name="base", kind="base", model=cfg.base)]
    runs += [Run(name=f"parent_{chr(ord('a') + i)}", kind="parent", model=m)
             for i, m in enumerate(cfg.models)]  # fmt: skip
    for t in search.best(cfg.final_top):
        mc = t.user_attrs["merge_config"]
        runs.append(Run(name=f"trial-{t.number}", kind="merge", method=mc["merge_method"],
                        parameters=mc["parameters"], merge_config=mc))  # fmt: skip
    runs += _baselines(cfg)
    test = str(search.suites["test"])
    records = [evaluate_run(run, cfg, str(search.folder), test, None, keep=cfg.keep_models)
               for run in runs]  # fmt: skip
    (search.folder / "heldout.json").write_text(
        json.dumps([r.model_dump() for r in records], indent=1)
    )
    return records
