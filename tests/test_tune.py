"""`medmerge tune` on tiny models and local suites: the search finds a known optimum, resumes
after a kill as if never stopped (and refuses to resume with another space, objective or
suite), keeps its test part for the final step, runs on Ray, and refuses bad input before any
merge."""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import cli, one_line_error

import medmerge.studies.tune as tune
from medmerge.errors import ConfigError
from medmerge.eval import evaluate
from medmerge.synthetic import tiny_config, write_family, write_suite

pytest.importorskip("optuna")

# per model a weight in [0, 1] (linear normalises them): 1 and 0 give parent A back
SPACE = {"method": "linear", "per_model": [{"weight": {"low": 0.0, "high": 1.0}},
                                           {"weight": {"low": 0.0, "high": 1.0}}]}  # fmt: skip


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune-inputs")
    base, a, b = write_family(root / "models", tiny_config("mistral"), seed=4, delta=0.6)
    suite = write_suite(root / "suite", n=40, seed=1, formats=("medqa", "mmlu"))
    return root, base, a, b, suite


def _config(inputs, suite=None, **overrides) -> dict:
    _, base, a, b, default_suite = inputs
    return {
        "name": "t",
        "base": str(base),
        "models": [str(a), str(b)],
        "suite": str(suite or default_suite),
        "protocol": {"num_fewshot": 0, "dtype": "float32"},
        "search": {"trials": 4, "seed": 3},
        "spaces": [SPACE],
        "final_top": 1,
        **overrides,
    }


@pytest.fixture(scope="module")
def relabelled(inputs, tmp_path_factory):
    """The suite with every answer set to parent A's prediction: A scores 100%."""
    root, _, a, _, suite = inputs
    out = tmp_path_factory.mktemp("relabelled")
    result = evaluate(a, suite=suite, num_fewshot=0, dtype="float32", store=out / "r.sqlite")
    field = {"tiny_medqa": ("medqa.jsonl", "label"), "tiny_mmlu": ("mmlu.jsonl", "answer")}
    for task, (name, key) in field.items():
        preds = {s["doc_id"]: s["pred"] for s in result.samples[task]}
        lines = (suite / name).read_text().splitlines()
        records = [json.loads(line) | {key: preds[i]} for i, line in enumerate(lines)]
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    (out / "suite.yaml").write_text((suite / "suite.yaml").read_text())
    return out


def test_the_search_moves_the_weight_to_the_parent_whose_answers_are_right(
    inputs, relabelled, tmp_path
):
    cfg = _config(inputs, relabelled, search={"trials": 10, "seed": 0})
    folder = tune.run_tune(cfg, tmp_path / "t", progress=False)
    best = yaml.safe_load((folder / "best.yaml").read_text())
    wa, wb = (m["parameters"]["weight"] for m in best["models"])
    assert wa / (wa + wb) > 0.75, (wa, wb)  # mostly parent A (seeds 1-4 give 0.91-1.0)
    heldout = {r["run"]["name"]: r for r in json.loads((folder / "heldout.json").read_text())}
    tuned = next(r for n, r in heldout.items() if n.startswith("trial-"))

    def mean(r):
        return sum(t["metrics"]["acc"] for t in r["result"]["tasks"].values()) / 2

    assert mean(heldout["parent_a"]) == 1.0
    assert mean(tuned) > mean(heldout["parent_b"])  # on questions the search never saw
    report = (folder / "report.md").read_text()
    assert "Held-out verdict" in report and (folder / "history.png").is_file()


def test_dev_and_test_parts_are_disjoint_stable_and_complete(inputs, tmp_path):
    suite = inputs[4]
    first = tune.split_suite(suite, tmp_path / "one", dev=0.5, seed=7)
    again = tune.split_suite(suite, tmp_path / "two", dev=0.5, seed=7)
    other = tune.split_suite(suite, tmp_path / "three", dev=0.5, seed=8)
    for name in ("medqa", "mmlu"):
        original = (suite / f"{name}.jsonl").read_text().splitlines()

        def lines(parts, part, name=name):
            return (parts[part] / f"tiny_{name}.jsonl").read_text().splitlines()

        dev, test = lines(first, "dev"), lines(first, "test")
        assert not set(dev) & set(test) and sorted(dev + test) == sorted(original)
        assert dev == lines(again, "dev") and test == lines(again, "test")
        assert dev != lines(other, "dev")  # the seed decides


def test_the_test_part_is_read_only_in_the_final_step(inputs, tmp_path, monkeypatch):
    calls = []
    real = tune.evaluate_run

    def counting(run, cfg, folder, suite, limit, keep):
        calls.append((run.name, "test" if suite.endswith("test") else "dev"))
        return real(run, cfg, folder, suite, limit, keep)

    monkeypatch.setattr(tune, "evaluate_run", counting)
    real_held_out = tune._held_out
    final = {}

    def held_out(search):
        final["from"] = len(calls)
        return real_held_out(search)

    monkeypatch.setattr(tune, "_held_out", held_out)
    from medmerge.studies.study import run_study

    grid = {
        **_config(inputs),
        "merges": [{"method": "ties", "parameters": {"density": 0.5, "weight": 0.5}}],
    }
    for key in ("search", "spaces", "final_top"):
        del grid[key]
    study = run_study(grid, tmp_path / "study", progress=False, report=False)
    calls.clear()  # the study's own evaluations
    cfg = _config(inputs, baselines=[{"method": "linear", "parameters": {"weight": 0.5}}],
                  protocol={"num_fewshot": 0, "dtype": "float32", "limit": 5},
                  study=str(study))  # fmt: skip
    folder = tune.run_tune(cfg, tmp_path / "t", progress=False)
    for record in json.loads((folder / "heldout.json").read_text()):  # the protocol's limit
        assert all(len(s) == 5 for s in record["result"]["samples"].values())
    before, after = calls[: final["from"]], calls[final["from"] :]
    assert before and all(part == "dev" for _, part in before)
    assert [name for name, _ in after] == ["base", "parent_a", "parent_b", after[3][0],
                                           "baseline-linear", "study-ties"]  # fmt: skip
    assert all(part == "test" for _, part in after)


def _trials(folder) -> list[tuple]:
    import optuna

    study = optuna.load_study(study_name="t", storage=f"sqlite:///{folder / 'optuna.sqlite3'}")
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    return [(t.params, t.value) for t in done]


def test_a_killed_search_resumes_without_redoing_trials(inputs, tmp_path, monkeypatch):
    cfg = _config(inputs, search={"trials": 5, "seed": 3})
    whole = tune.run_tune(cfg, tmp_path / "whole", progress=False)
    real = tune._Search.tell
    told = []

    def killed_after_three(self, trial, record, pruned=False):
        if len(told) == 3:
            raise KeyboardInterrupt("simulated kill")  # the fourth trial dies mid-way
        told.append(trial.number)
        return real(self, trial, record, pruned)

    monkeypatch.setattr(tune._Search, "tell", killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        tune.run_tune(cfg, tmp_path / "resumed", progress=False)
    assert len(_trials(tmp_path / "resumed")) == 3
    monkeypatch.setattr(tune._Search, "tell", real)
    asked = []
    real_ask = tune._Search.ask

    def counting_ask(self):
        asked.append(1)
        return real_ask(self)

    monkeypatch.setattr(tune._Search, "ask", counting_ask)
    resumed = tune.run_tune(cfg, tmp_path / "resumed", progress=False)
    assert len(asked) == 2  # only the trials that had not finished
    assert _trials(resumed) == _trials(whole)
    assert (resumed / "best.yaml").read_text() == (whole / "best.yaml").read_text()


def test_cma_es_draws_the_same_trials_for_the_same_seed(inputs, tmp_path):
    cfg = _config(inputs, search={"trials": 4, "seed": 2, "sampler": "cmaes"})
    first = _trials(tune.run_tune(cfg, tmp_path / "one", progress=False))
    again = _trials(tune.run_tune(cfg, tmp_path / "two", progress=False))
    assert len(first) == 4 and first == again
    weights = [w for params, _ in first for w in params.values()]
    assert all(0.0 <= w <= 1.0 for w in weights) and len(set(weights)) == len(weights)


def test_ray_gives_the_local_trials_with_one_at_a_time(inputs, tmp_path):
    ray = pytest.importorskip("ray")
    cfg = _config(inputs, search={"trials": 3, "seed": 5})
    local = tune.run_tune(cfg, tmp_path / "local", progress=False)
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        distributed = tune.run_tune(cfg, tmp_path / "ray", executor="ray")
        two = _config(inputs, search={"trials": 4, "seed": 5, "concurrent": 2})
        both = tune.run_tune(two, tmp_path / "two", executor="ray")
    finally:
        ray.shutdown()
    assert _trials(distributed) == _trials(local)
    found = _trials(both)
    assert len(found) == 4 and all(value is not None for _, value in found)
    assert (both / "report.md").is_file()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"spaces": [{"method": "linear", "parameters": {"weight": {"low": 1.0, "high": 0.5}}}]},
         "inverted range"),
        ({"spaces": [{"method": "linear", "parameters": {"weight": {"low": 0.5, "high": 0.5}}}]},
         "empty or inverted range"),
        ({"spaces": [{"method": "ties", "parameters": {"densty": {"low": 0.1, "high": 0.9}}}]},
         "unknown parameter 'densty'"),
        ({"constraints": [{"task": "general", "max_drop": 3}]}, "task 'general'"),
        ({"objective": {"kind": "weighted", "weights": {"nope": 1.0}}}, "task 'nope'"),
        ({"spaces": []}, "spaces"),
        ({"suite": "paper"}, "local suite"),
        ({"spaces": [{"method": "linear", "parameters": {"weight": {"low": 0, "high": 1,
                                                                    "log": True}}}]}, "log"),
    ],
)  # fmt: skip
def test_bad_input_is_refused_before_any_merge(inputs, tmp_path, monkeypatch, change, message):
    monkeypatch.setattr(tune, "evaluate_run", lambda *a: pytest.fail("evaluated"))
    with pytest.raises(ConfigError, match=message):
        tune.run_tune(_config(inputs, **change), tmp_path / "t", progress=False)
    assert not (tmp_path / "t" / "models").exists()


# a resumed search keeps the config that drew its trials


@pytest.fixture(scope="module")
def finished(inputs, tmp_path_factory):
    """A finished search of two trials, over a copy of the suite of its own."""
    root = tmp_path_factory.mktemp("finished")
    suite = shutil.copytree(inputs[4], root / "suite")
    cfg = _config(inputs, suite, search={"trials": 2, "seed": 3})
    return tune.run_tune(cfg, root / "t", progress=False), cfg


OTHER_RANGE = {**SPACE, "per_model": [{"weight": {"low": 0.2, "high": 1.0}}, SPACE["per_model"][1]]}


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"spaces": [OTHER_RANGE]}, "spaces"),
        ({"spaces": [SPACE, {"method": "ties", "parameters": {"weight": 0.5}}]}, "spaces"),
        ({"objective": {"kind": "worst"}}, "objective.kind"),
        ({"search": {"trials": 2, "seed": 4}}, "search.seed"),
        ({"search": {"trials": 2, "seed": 3, "sampler": "cmaes"}}, "search.sampler"),
        ({"split": {"dev": 0.6}}, "split.dev"),
        ({"protocol": {"num_fewshot": 1, "dtype": "float32"}}, "protocol.num_fewshot"),
        ({"name": "other"}, "name"),
    ],
)
def test_a_search_resumed_with_another_space_or_objective_is_refused(
    finished, monkeypatch, change, key
):
    folder, cfg = finished
    before = (folder / "tune.yaml").read_bytes()
    monkeypatch.setattr(tune, "evaluate_run", lambda *a: pytest.fail("evaluated"))
    with pytest.raises(ConfigError, match=rf"holds a search whose {key} differ.*--out.*tune.yaml"):
        tune.run_tune({**cfg, **change}, folder, progress=False)
    assert (folder / "tune.yaml").read_bytes() == before


def test_a_search_resumed_on_changed_questions_is_refused(finished, monkeypatch):
    folder, cfg = finished
    data = Path(cfg["suite"]) / "medqa.jsonl"
    original = data.read_text()
    record = json.loads(original.splitlines()[0])
    data.write_text(json.dumps(record | {"label": (record["label"] + 1) % 4}) + "\n"
                    + "\n".join(original.splitlines()[1:]) + "\n")  # fmt: skip
    monkeypatch.setattr(tune, "evaluate_run", lambda *a: pytest.fail("evaluated"))
    try:
        with pytest.raises(ConfigError, match="whose suite content differ"):
            tune.run_tune(cfg, folder, progress=False)
    finally:
        data.write_text(original)


class Resumed(Exception):
    pass


@pytest.mark.parametrize(
    "change",
    [
        {"search": {"trials": 5, "seed": 3, "concurrent": 2}},
        {"final_top": 2},
        {"keep_models": True},
        {"baselines": [{"method": "linear", "parameters": {"weight": 0.5}}]},
        {"protocol": {"num_fewshot": 0, "dtype": "float32", "batch_size": 2}},
        # the same space written out in full
        {"spaces": [{**SPACE, "per_model": [{"weight": {"low": 0.0, "high": 1.0, "log": False,
                                                        "type": "float"}},
                                            SPACE["per_model"][1]]}]},
    ],
)  # fmt: skip
def test_a_search_resumes_with_more_trials_or_another_final_step(finished, monkeypatch, change):
    folder, cfg = finished

    def resumed(*args):
        raise Resumed  # past the check, tune.yaml rewritten

    monkeypatch.setattr(tune, "split_suite", resumed)
    with pytest.raises(Resumed):
        tune.run_tune({**cfg, **change}, folder, progress=False)
    key = next(iter(change))
    expected = tune.TuneConfig.model_validate({**cfg, **change}).model_dump(mode="json")[key]
    assert yaml.safe_load((folder / "tune.yaml").read_text())[key] == expected


def test_a_damaged_search_file_is_a_one_line_error(inputs, tmp_path, monkeypatch):
    folder = tmp_path / "t"
    folder.mkdir()
    (folder / "optuna.sqlite3").write_bytes(b"not a database" * 100)
    config = tmp_path / "tune.yaml"
    config.write_text(yaml.safe_dump(_config(inputs)))
    monkeypatch.setattr(tune, "evaluate_run", lambda *a: pytest.fail("evaluated"))
    one_line_error(*cli("tune", config, "--out", folder), "t/optuna.sqlite3 cannot be read",
                    "move it away", "--out")  # fmt: skip
    assert not (folder / "tune.yaml").exists()


@pytest.mark.parametrize("trials", ["0", "-3"])
def test_trials_below_one_are_refused_up_front(inputs, tmp_path, trials):
    config = tmp_path / "tune.yaml"
    config.write_text(yaml.safe_dump(_config(inputs)))
    out = tmp_path / "t"
    code, output = cli("tune", config, "--out", out, "--trials", trials)
    one_line_error(code, output, f"--trials {trials}: trials: Input should be greater than or")
    assert not out.exists()


def test_no_feasible_trial_leaves_no_best_yaml(inputs, tmp_path):
    import optuna

    from medmerge.studies.records import Run, RunRecord
    from medmerge.studies.tune_report import write_tune_report

    (tmp_path / "best.yaml").write_text("an earlier search's best")
    result = {"tasks": {"t": {"n": 1, "metrics": {"acc": 1.0}, "stderr": {"acc": 0.0}}},
              "samples": {"t": [{"doc_id": 0, "acc": 1.0}]}}  # fmt: skip
    base = RunRecord(run=Run(name="base", kind="base", model="m"), fingerprint="f",
                     eval_seconds=0.0, eval_cached=False, result=result)  # fmt: skip
    cfg = tune.TuneConfig.model_validate(_config(inputs))
    write_tune_report(tmp_path, optuna.create_study(), [base], cfg)
    assert not (tmp_path / "best.yaml").exists()
    assert "No trial met the constraints" in (tmp_path / "report.md").read_text()


# the objective is accuracy


@pytest.fixture(scope="module")
def perplexity_suites(tmp_path_factory):
    root = tmp_path_factory.mktemp("perplexity")
    return {"mixed": write_suite(root / "mixed", n=12, formats=("medqa", "perplexity")),
            "alone": write_suite(root / "alone", n=12, formats=("perplexity",))}  # fmt: skip


@pytest.mark.parametrize(
    ("suite", "change", "message"),
    [
        ("mixed", {"constraints": [{"task": "tiny_perplexity", "max_drop": 1.0}]},
         "constraint names task 'tiny_perplexity', which is not an accuracy task"),
        ("mixed", {"objective": {"kind": "weighted", "weights": {"tiny_perplexity": 1.0}}},
         "objective weight names task 'tiny_perplexity'"),
        ("mixed", {"objective": {"kind": "weighted", "weights": {"tiny_medqa": 0.0}}},
         "weights must sum to more than 0"),
        ("mixed", {"objective": {"kind": "weighted", "weights": {"tiny_medqa": -1.0}}},
         "weights.tiny_medqa: Input should be greater than or equal to 0"),
        ("alone", {}, "has no accuracy task"),
    ],
)  # fmt: skip
def test_objectives_and_constraints_need_accuracy_tasks(
    inputs, perplexity_suites, tmp_path, monkeypatch, suite, change, message
):
    monkeypatch.setattr(tune, "evaluate_run", lambda *a: pytest.fail("evaluated"))
    with pytest.raises(ConfigError, match=message):
        tune.run_tune(_config(inputs, perplexity_suites[suite], **change), tmp_path / "t",
                      progress=False)  # fmt: skip
    assert not (tmp_path / "t").exists()


def test_a_study_without_accuracy_tasks_is_refused_as_a_baseline(
    inputs, perplexity_suites, tmp_path, monkeypatch
):
    from medmerge.studies.study import run_study

    grid = {**_config(inputs, perplexity_suites["alone"]),
            "merges": [{"method": "linear", "parameters": {"weight": 0.5}}]}  # fmt: skip
    for key in ("search", "spaces", "final_top"):
        del grid[key]
    study = run_study(grid, tmp_path / "study", progress=False, report=False)
    monkeypatch.setattr(tune, "evaluate_run", lambda *a: pytest.fail("evaluated"))
    with pytest.raises(ConfigError, match="study .* has no accuracy task to choose its best"):
        tune.run_tune(_config(inputs, study=str(study)), tmp_path / "t", progress=False)


KILLED = """
import json, os, signal, sys
import medmerge.engine, medmerge.eval, medmerge.studies.tune
where = sys.argv[2]
if where == "merge":  # killed while the first trial's merge is being written
    medmerge.engine._write_metadata = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
else:  # killed after the first trial's merge, before its evaluation
    real = medmerge.eval.evaluate
    def evaluate(model, **kwargs):
        if "trial-" in str(model):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(model, **kwargs)
    medmerge.eval.evaluate = evaluate
medmerge.studies.tune.run_tune(json.loads(sys.argv[1]), sys.argv[3], progress=False)
"""


@pytest.mark.parametrize("where", ["merge", "eval"])
def test_a_search_killed_during_a_trial_leaves_nothing_after_resuming(inputs, tmp_path, where):
    import subprocess
    import sys

    cfg, folder = _config(inputs, search={"trials": 2, "seed": 3}), tmp_path / "t"
    proc = subprocess.run([sys.executable, "-c", KILLED, json.dumps(cfg), where, str(folder)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == -9, proc.stderr
    left = sorted(p.name.split("tmp-")[0] for p in (folder / "models").iterdir())
    assert left == ([".trial-0.", ".trial-0.lock"] if where == "merge" else ["trial-0"])
    tune.run_tune(cfg, folder, progress=False)
    assert sorted(p.name for p in (folder / "models").iterdir()) == []
    assert len(_trials(folder)) == 2
