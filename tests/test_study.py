"""Studies of tiny models over a local suite: grid expansion and run names, resume (and redo
when the suite changes), report (perplexity too), Ray executor."""

import csv
import json
import struct
from pathlib import Path

import pytest
import yaml
from conftest import cli, one_line_error

from medmerge.errors import ConfigError
from medmerge.io.card import text as markdown_text
from medmerge.studies.records import expand, load_records, load_study
from medmerge.studies.report import mcnemar, write_report
from medmerge.studies.study import run_study
from medmerge.synthetic import write_suite


@pytest.fixture(scope="module")
def study_config(tmp_path_factory):
    from medmerge.synthetic import tiny_config, write_family

    root = tmp_path_factory.mktemp("study-inputs")
    base, a, b = write_family(root / "models", tiny_config("mistral"), seed=4)
    suite = write_suite(root / "suite", n=16, seed=1, formats=("medqa", "mmlu"))
    return {
        "name": "tiny",
        "base": str(base),
        "models": [str(a), str(b)],
        "suite": str(suite),
        "protocol": {"num_fewshot": 0, "dtype": "float32"},
        "merges": [
            {"method": "linear", "parameters": {"weight": 0.5}},
            {"method": "task_arithmetic", "parameters": {"weight": [0.5, 1.0]}},
            {"method": "ties", "parameters": {"weight": 0.5, "density": 0.9}},
            {"method": "hierarchical"},
            {"method": "linear", "name": "linear-again", "parameters": {"weight": 0.5}},
        ],
    }


def test_grid_expansion_and_names(study_config):
    runs = expand(
        load_study(
            {
                **study_config,
                "merges": [
                    {"method": "dare_ties", "parameters": {"weight": 0.5, "density": [0.6, 0.9]}},
                    {"method": "linear", "parameters": {"weight": {"value": [0.2, 0.8]}}},
                ],
            }
        )
    )
    assert [r.name for r in runs] == [
        "base",
        "parent_a",
        "parent_b",
        "dare_ties-density0.6",
        "dare_ties-density0.9",
        "linear",
    ]
    assert runs[4].merge_config["parameters"] == {"weight": 0.5, "density": 0.9}
    assert runs[5].merge_config["parameters"] == {"weight": [0.2, 0.8]}  # a gradient, one run


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_study_end_to_end_resume_and_report(study_config, tmp_path, monkeypatch):
    import medmerge.studies.study as st

    calls = []
    real = st.execute_run

    def crash_after_first(run, study, folder):
        if calls:
            raise KeyboardInterrupt("simulated kill")
        calls.append(run.name)
        return real(run, study, folder)

    monkeypatch.setattr(st, "execute_run", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        run_study(study_config, tmp_path / "s", progress=False)
    assert [r.run.name for r in load_records(tmp_path / "s")] == ["base"]

    resumed = []

    def counting(run, study, folder):
        resumed.append(run.name)
        return real(run, study, folder)

    monkeypatch.setattr(st, "execute_run", counting)
    folder = run_study(study_config, tmp_path / "s", progress=False)
    names = [
        "base",
        "parent_a",
        "parent_b",
        "linear",
        "task_arithmetic-weight0.5",
        "task_arithmetic-weight1.0",
        "ties",
        "hierarchical",
        "linear-again",
    ]
    assert resumed == names[1:]  # the finished run was not redone
    records = load_records(folder)
    assert [r.run.name for r in records] == names
    merge = records[3]
    assert merge.merge_seconds > 0 and merge.merge_peak_rss_mb > 0 and merge.fingerprint
    # the merged model's card carries its scores, as text and as Hub model-index results
    from huggingface_hub import ModelCard

    card = ModelCard.load(folder / "models" / "linear" / "README.md")
    task, score = next(iter(merge.result["tasks"].items()))
    metric, value = next(iter(score["metrics"].items()))
    found = [r for r in card.data.eval_results if (r.dataset_name, r.metric_type) == (task, metric)]
    assert [r.metric_value for r in found] == [value]
    assert "## Scores (study tiny)" in card.text
    assert f"| {markdown_text(task)} | {metric} | {value:.4f} |" in card.text

    report = (folder / "report.md").read_text()
    assert report.startswith("# Study report: tiny\n")
    assert "questions), 0-shot, float32, lm-eval" in report
    # the same merge twice: one evaluation, and the report says why the rows agree (task
    # arithmetic at weight 0.5 over two models is the 0.5/0.5 linear merge, bit for bit)
    assert records[-1].eval_cached and records[-1].fingerprint == merge.fingerprint
    assert "identical weights" in report
    assert "\n- linear, task_arithmetic-weight0.5, linear-again\n" in report
    for name in names:
        assert f"| {name} |" in report
    assert "McNemar" in report and "Cost per merge" in report
    for fig in (
        "fig2_ranking.png",
        "fig3_delta_vs_base.png",
        "fig4_radar.png",
        "sensitivity_task_arithmetic_weight.png",
    ):
        width, height = png_size(folder / fig)
        assert width > 500 and height > 300, fig
        assert f"]({fig})" in report
    html = (folder / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and "<table>" in html
    assert "\\begin{tabular}" in (folder / "table.tex").read_text()

    # the CSV gives back the stored numbers
    with open(folder / "results.csv") as f:
        rows = list(csv.DictReader(f))
    by_key = {(r["model"], r["task"], r["metric"]): r for r in rows}
    for rec in records:
        for task, score in rec.result["tasks"].items():
            for metric, value in score["metrics"].items():
                row = by_key[(rec.run.name, task, metric)]
                assert float(row["value"]) == value
                se = score["stderr"].get(metric)
                assert (float(row["stderr"]) if row["stderr"] else None) == se

    # rerunning does nothing; the report re-renders from stored results
    resumed.clear()
    run_study(study_config, tmp_path / "s", progress=False)
    assert resumed == []
    (folder / "report.md").unlink()
    write_report(folder)
    assert (folder / "report.md").read_text() == report


def test_mcnemar_known_answers():
    merge = [{"doc_id": i, "acc": 1.0} for i in range(12)]
    parent = [{"doc_id": i, "acc": 0.0 if i < 10 else 1.0} for i in range(12)]
    b, c, p = mcnemar(merge, parent)
    assert (b, c) == (10, 0)
    assert p == pytest.approx(2 * 0.5**10)  # exact binomial, two-sided
    same = mcnemar(merge, merge)
    assert same == (0, 0, 1.0)
    mixed = [{"doc_id": i, "acc": float(i % 2)} for i in range(20)]
    flipped = [{"doc_id": i, "acc": float(1 - i % 2)} for i in range(20)]
    b, c, p = mcnemar(mixed, flipped)
    assert (b, c) == (10, 10) and p == pytest.approx(1.0)


def test_ray_executor_matches_local(study_config, tmp_path):
    ray = pytest.importorskip("ray")
    config = {**study_config, "merges": study_config["merges"][:1]}
    local = run_study(config, tmp_path / "local", progress=False, report=False)
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        distributed = run_study(config, tmp_path / "ray", executor="ray", report=False)
    finally:
        ray.shutdown()
    a = {r.run.name: r.result["tasks"] for r in load_records(local)}
    b = {r.run.name: r.result["tasks"] for r in load_records(distributed)}
    assert a == b and set(a) == {"base", "parent_a", "parent_b", "linear"}
    fa = {r.run.name: r.fingerprint for r in load_records(local)}
    fb = {r.run.name: r.fingerprint for r in load_records(distributed)}
    assert fa == fb


# run names are file names: unique, plain, never a reference row's


def _names(config, merges) -> list[str]:
    return [r.name for r in expand(load_study({**config, "merges": merges}))][3:]


LINEAR = {"method": "linear", "parameters": {"weight": 0.5}}


def test_unnamed_merges_are_numbered_past_every_name_given(study_config):
    names = _names(study_config, [LINEAR, LINEAR, {**LINEAR, "name": "linear-2"}])
    assert names == ["linear", "linear-3", "linear-2"]
    # case-blind, as macOS and Windows compare file names
    assert _names(study_config, [LINEAR, {**LINEAR, "name": "Linear"}]) == ["linear-2", "Linear"]


def test_grid_names_are_plain_file_names_whatever_the_keys_and_values(study_config):
    long = [[0.123456789] * 16, [0.123456789] * 15 + [0.5]]
    merges = [{"method": "linear", "parameters": {"../../x": [0.1, 0.2]}},
              {"method": "linear", "parameters": {"weight": long}}]  # fmt: skip
    names = _names(study_config, merges)
    assert len(set(names)) == 4
    for name in names:
        assert "/" not in name and "\\" not in name and len(name) <= 100, name
        assert (Path("runs") / f"{name}.json").parent == Path("runs")
    assert names[0] == "linear-.._.._x0.1"  # the key's characters replaced like a value's


@pytest.mark.parametrize(
    ("merges", "message"),
    [
        ([{**LINEAR, "name": "parent_a"}], "'parent_a' is a reference row's"),
        ([{**LINEAR, "name": "base"}], "'base' is a reference row's"),
        ([{**LINEAR, "name": "x"}, {**LINEAR, "name": "X"}], "two runs are named 'X'"),
        ([{**LINEAR, "name": "x", "parameters": {"weight": [0.5, 0.5]}}],
         "parameter weight lists 0.5 twice"),
    ],
)  # fmt: skip
def test_clashing_run_names_are_refused_before_any_work(study_config, tmp_path, merges, message):
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({**study_config, "merges": merges}))
    out = tmp_path / "s"
    one_line_error(*cli("study", config, "--out", out), message)
    assert not out.exists()


# a changed suite redoes the study; stale records are never mixed into the report


def _relabel(path, field="label"):
    """Every answer moved to the next option; returns the new labels."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for r in records:
        r[field] = (r[field] + 1) % 4
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return [r[field] for r in records]


def test_a_changed_suite_redoes_the_runs_and_stale_records_are_left_out(
    study_config, tmp_path, monkeypatch
):
    import medmerge.studies.study as st

    suite = write_suite(tmp_path / "suite", n=8, seed=2, formats=("medqa",))
    config = {**study_config, "suite": str(suite), "merges": study_config["merges"][:1]}
    folder = run_study(config, tmp_path / "s", progress=False, report=False)
    first = {r.run.name: r for r in load_records(folder)}
    done = []
    real = st.execute_run

    def counting(run, study, out):
        done.append(run.name)
        return real(run, study, out)

    monkeypatch.setattr(st, "execute_run", counting)
    labels = _relabel(suite / "medqa.jsonl")
    run_study(config, folder, progress=False, report=False)
    assert done == ["base", "parent_a", "parent_b", "linear"]
    for name, record in first.items():  # the same answers chosen, scored on the new labels
        preds = {s["doc_id"]: s["pred"] for s in record.result["samples"]["tiny_medqa"]}
        expected = sum(preds[i] == y for i, y in enumerate(labels)) / len(labels)
        now = next(r for r in load_records(folder) if r.run.name == name)
        assert now.result["tasks"]["tiny_medqa"]["metrics"]["acc"] == pytest.approx(expected)

    # an added task and merge: every run redone, the report has the new column (no KeyError)
    write_suite(tmp_path / "more", n=8, seed=3, formats=("mmlu",))
    (suite / "mmlu.jsonl").write_text((tmp_path / "more" / "mmlu.jsonl").read_text())
    manifest = yaml.safe_load((suite / "suite.yaml").read_text())
    manifest["tasks"].append({"name": "tiny_mmlu", "format": "mmlu", "test": "mmlu.jsonl"})
    (suite / "suite.yaml").write_text(yaml.safe_dump(manifest))
    config["merges"] = study_config["merges"][:2]
    done.clear()
    run_study(config, folder, progress=False)
    assert len(done) == 6
    assert "| model | tiny_medqa | tiny_mmlu | mean |" in (folder / "report.md").read_text()

    # changed again and stopped after the base: the others are stale, named, not reported
    _relabel(suite / "mmlu.jsonl", "answer")

    def stopped_after_base(run, study, out):
        if run.name != "base":
            raise KeyboardInterrupt("simulated kill")
        return real(run, study, out)

    monkeypatch.setattr(st, "execute_run", stopped_after_base)
    with pytest.raises(KeyboardInterrupt):
        run_study(config, folder, progress=False)
    assert [r.run.name for r in load_records(folder)] == ["base"]
    write_report(folder)
    report = (folder / "report.md").read_text()
    assert "| base |" in report and "| parent_a |" not in report
    assert "stale" in report and "parent_a, parent_b, linear, task_arithmetic-weight0.5" in report


# suites without accuracy tasks


@pytest.mark.parametrize("formats", [("perplexity",), ("medqa", "perplexity")])
def test_perplexity_tasks_are_reported_lower_is_better(study_config, tmp_path, formats):
    suite = write_suite(tmp_path / "suite", n=6, seed=5, formats=formats)
    config = {**study_config, "suite": str(suite), "merges": study_config["merges"][:1]}
    folder = run_study(config, tmp_path / "s", progress=False)
    records = load_records(folder)
    report = (folder / "report.md").read_text()
    assert "Perplexity (lower is better)" in report
    header = ("| model | tiny_perplexity word_perplexity | tiny_perplexity byte_perplexity | "
              "tiny_perplexity bits_per_byte |")  # fmt: skip
    assert header in report
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in report.splitlines()
            if line.startswith("| ") and "perplexity" not in line}  # fmt: skip
    word = {r.run.name: r.result["tasks"]["tiny_perplexity"]["metrics"]["word_perplexity"]
            for r in records}  # fmt: skip
    best = min(word, key=word.get)
    assert f"| {best} | **{word[best]:.4g}** |" in report
    assert all(name in rows for name in word)
    assert ("| model | tiny_medqa | mean |" in report) == ("medqa" in formats)
    assert ("McNemar" in report) == ("medqa" in formats)
    assert "Cost per merge" in report and (folder / "table.tex").is_file()


@pytest.mark.parametrize(
    ("store", "fragment"),
    [("notes.txt", "must name a SQLite file"), ("bashrc.db", "is not a SQLite database")],
)
def test_a_result_store_path_must_name_a_sqlite_file(mistral, tmp_path, store, fragment):
    (tmp_path / "bashrc.db").write_text("export PATH=...")
    with pytest.raises(ConfigError, match=fragment):
        load_study({"base": str(mistral[0]), "models": [str(mistral[1])],
                    "result_store": str(tmp_path / store)})  # fmt: skip
    assert (tmp_path / "bashrc.db").read_text() == "export PATH=..."


@pytest.mark.parametrize(
    ("values", "fragment"), [([], "is an empty list"), ([0.3, 0.30], "lists 0.3 twice")]
)
def test_a_grid_axis_must_list_distinct_values(mistral, values, fragment):
    study = load_study(
        {
            "base": str(mistral[0]),
            "models": [str(mistral[1]), str(mistral[2])],
            "merges": [{"method": "linear", "parameters": {"weight": values}}],
        }
    )
    with pytest.raises(ConfigError, match=f"parameter weight {fragment}"):
        expand(study)
