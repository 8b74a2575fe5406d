"""The Evaluate stage through the real lm-eval code path, on a tiny model and a local suite."""

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import state
from safetensors.torch import save_file

import medmerge.eval as ev
from medmerge.errors import ConfigError, EvalError
from medmerge.eval.suites import load_suite
from medmerge.synthetic import write_suite


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    return write_suite(tmp_path_factory.mktemp("suite"))


@pytest.fixture
def counted(monkeypatch):
    """Count the runs of lm-eval's simple_evaluate (i.e. of the model)."""
    import lm_eval

    calls = []
    real = lm_eval.simple_evaluate

    def wrapper(*args, **kwargs):
        calls.append(kwargs["tasks"])
        return real(*args, **kwargs)

    monkeypatch.setattr(lm_eval, "simple_evaluate", wrapper)
    return calls


def run(model, suite, store, **kw):
    kw.setdefault("num_fewshot", 2)
    return ev.evaluate(model, suite=suite, dtype="float32", store=store, **kw)


def test_local_suite_results_cache_and_fingerprint(mistral, suite, tmp_path, counted):
    base = mistral[0]
    store = tmp_path / "results.sqlite"
    offline_before = os.environ.get("HF_HUB_OFFLINE")
    first = run(base, suite, store)
    assert os.environ.get("HF_HUB_OFFLINE") == offline_before  # set only during the run
    assert set(first.tasks) == {
        f"tiny_{f}" for f in ("medqa", "pubmedqa", "mmlu", "medmcqa", "hellaswag", "perplexity")
    }
    for task, score in first.tasks.items():
        assert score.n == 24
        if task == "tiny_perplexity":
            assert score.metrics["word_perplexity"] > 1
            continue
        assert 0.0 <= score.metrics["acc"] <= 1.0
        assert 0.0 < score.stderr["acc"] < 0.2
        assert len(first.samples[task]) == 24
        assert {s["acc"] for s in first.samples[task]} <= {0.0, 1.0}
        assert sum(s["acc"] for s in first.samples[task]) / 24 == pytest.approx(
            score.metrics["acc"]
        )
    assert "acc_norm" in first.tasks["tiny_medqa"].metrics
    assert first.protocol["num_fewshot"] == 2 and not first.cached
    assert len(counted) == 1

    again = run(base, suite, store)
    assert again.cached and len(counted) == 1
    assert again.tasks == first.tasks

    changed = shutil.copytree(base, tmp_path / "changed")
    tensors = state(changed)
    for f in changed.glob("model*.safetensors*"):
        f.unlink()
    tensors["model.norm.weight"][0] += 1.0
    save_file(tensors, changed / "model.safetensors", metadata={"format": "pt"})
    other = run(changed, suite, store)
    assert other.fingerprint != first.fingerprint and not other.cached and len(counted) == 2
    forced = run(base, suite, store, use_cache=False)
    assert not forced.cached and len(counted) == 3


def test_forced_answers_score_one(mistral, tmp_path):
    """Relabel every question with the answer the model prefers: accuracy must be 1.0."""
    base = mistral[0]
    formats = ("medqa", "mmlu", "medmcqa", "pubmedqa", "hellaswag")
    folder = write_suite(tmp_path / "suite", n=16, seed=3, formats=formats)
    first = run(base, folder, tmp_path / "r.sqlite", num_fewshot=0)
    answer = {  # each format's label field and value; hellaswag's upstream task takes strings
        "medqa": ("label", int),
        "mmlu": ("answer", int),
        "medmcqa": ("cop", int),
        "pubmedqa": ("final_decision", ["yes", "no", "maybe"].__getitem__),
        "hellaswag": ("label", str),
    }
    for fmt in formats:
        preds = {s["doc_id"]: s["pred"] for s in first.samples[f"tiny_{fmt}"]}
        path = folder / f"{fmt}.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()]
        field, value = answer[fmt]
        for i, r in enumerate(records):
            r[field] = value(preds[i])
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    forced = run(base, folder, tmp_path / "r.sqlite", num_fewshot=0)
    for fmt in formats:
        assert forced.tasks[f"tiny_{fmt}"].metrics["acc"] == 1.0, fmt


@pytest.mark.parametrize(
    "line, pattern",
    [
        (
            '{"sent1": "q?", "ending0": "a", "ending1": "b", "ending2": "c", "label": 1}',
            r"medqa.jsonl:3: invalid medqa record: ending3: Field required",
        ),
        (
            '{"sent1": "q?", "ending0": "a", "ending1": "b", "ending2": "c", "ending3": "d", '
            '"label": 4}',
            r"medqa.jsonl:3: invalid medqa record: label: .*less than or equal to 3",
        ),
        ('{"sent1": "q?", ', r"medqa.jsonl:3: not valid JSON"),
    ],
)
def test_bad_suite_records_name_file_and_line(tmp_path, line, pattern):
    folder = write_suite(tmp_path / "suite", n=4, formats=("medqa",))
    path = folder / "medqa.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = line
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=pattern):
        load_suite(folder)


@pytest.mark.parametrize(
    ("fmt", "field", "value"),
    [("medqa", "label", "1"), ("medqa", "label", True), ("mmlu", "answer", "2"),
     ("mmlu", "answer", 2.0), ("medmcqa", "cop", "0")],
)  # fmt: skip
def test_answer_indices_must_be_json_integers(tmp_path, fmt, field, value):
    """lm-eval's medqa, mmlu and medmcqa tasks compare the label as it is: "1" is never right."""
    folder = write_suite(tmp_path / "suite", n=4, formats=(fmt,))
    path = folder / f"{fmt}.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    records[1][field] = value
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    expected = rf"{fmt}.jsonl:2: invalid {fmt} record: {field}: must be a JSON integer, not "
    with pytest.raises(ConfigError, match=expected + re.escape(json.dumps(value)) + ".*quotes"):
        load_suite(folder)


@pytest.mark.parametrize("second", ["tiny_medqa", "TINY_MEDQA"])
def test_a_task_name_used_twice_is_refused(tmp_path, second):
    folder = write_suite(tmp_path / "suite", n=4, formats=("medqa", "mmlu"))
    manifest = yaml.safe_load((folder / "suite.yaml").read_text())
    manifest["tasks"][1]["name"] = second
    (folder / "suite.yaml").write_text(yaml.safe_dump(manifest))
    with pytest.raises(ConfigError, match=rf"suite.yaml .*two tasks are named '{second}'"):
        load_suite(folder)
    with pytest.raises(ConfigError, match="names a task twice"):
        load_suite("paper", ["pubmedqa", "pubmedqa"])


# the caches are optional


def test_a_store_that_cannot_be_made_is_skipped_with_one_warning(mistral, suite, tmp_path,
                                                                 caplog):  # fmt: skip
    (tmp_path / "file").write_text("not a folder")
    store = tmp_path / "file" / "results.sqlite"
    first = run(mistral[0], suite, store, num_fewshot=0, tasks=["tiny_medqa"])
    again = run(mistral[0], suite, store, num_fewshot=0, tasks=["tiny_medqa"])
    assert not first.cached and not again.cached and again.tasks == first.tasks
    assert caplog.text.count("results.sqlite cannot be used") == 1


@pytest.mark.parametrize("row", ["{damaged", '{"tasks": 3}', "[1, 2]"])
def test_a_damaged_store_row_is_evaluated_again_and_replaced(mistral, suite, tmp_path, counted,
                                                             row):  # fmt: skip
    import sqlite3

    store = tmp_path / "results.sqlite"
    first = run(mistral[0], suite, store, num_fewshot=0, tasks=["tiny_medqa"])
    with sqlite3.connect(store) as db:
        db.execute("UPDATE results SET result = ?", (row,))
    db.close()
    again = run(mistral[0], suite, store, num_fewshot=0, tasks=["tiny_medqa"])
    assert not again.cached and again.tasks == first.tasks and len(counted) == 2
    assert run(mistral[0], suite, store, num_fewshot=0, tasks=["tiny_medqa"]).cached


def test_evaluation_works_with_a_cache_that_cannot_be_written(mistral, tmp_path, monkeypatch,
                                                              caplog):  # fmt: skip
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("MEDMERGE_CACHE", str(tmp_path / "file" / "cache"))
    folder = write_suite(tmp_path / "suite", n=4, formats=("medqa",))
    resolved = load_suite(folder)
    assert not resolved.include_path.startswith(str(tmp_path / "file"))
    assert (Path(resolved.include_path) / "tiny_medqa.yaml").is_file()
    result = ev.evaluate(mistral[0], suite=folder, num_fewshot=0, dtype="float32")  # no store
    assert 0.0 <= result.tasks["tiny_medqa"].metrics["acc"] <= 1.0
    assert "cannot write the suite's task files" in caplog.text
    assert "results.sqlite cannot be used" in caplog.text


def test_local_task_yaml_reuses_the_upstream_prompts(tmp_path):
    folder = write_suite(tmp_path / "suite", n=4, formats=("medqa", "mmlu"))
    suite = load_suite(folder)
    cfg = yaml.safe_load((Path(suite.include_path) / "tiny_medqa.yaml").read_text())
    assert cfg["include"].endswith("lm_eval/tasks/medqa/medqa.yaml")
    assert cfg["dataset_path"] == "json" and cfg["fewshot_split"] == "test"
    assert cfg["dataset_kwargs"]["data_files"]["test"] == str((folder / "medqa.jsonl").resolve())


def test_paper_suite_offline_fails_fast_naming_the_dataset(mistral, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(
        EvalError,
        match=r"medqa_4options needs the dataset "
        r"GBaker/MedQA-USMLE-4-options-hf.*local suite",
    ):
        ev.evaluate(mistral[0], suite="paper", store=tmp_path / "r.sqlite")


def test_a_model_without_tokenizer_files_is_refused_before_lm_eval(mistral, tmp_path):
    bare = shutil.copytree(mistral[0], tmp_path / "bare")
    for f in bare.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(EvalError, match=r"bare has no tokenizer .*copy its base model's"):
        ev.evaluate(bare, suite="paper", store=tmp_path / "r.sqlite")
