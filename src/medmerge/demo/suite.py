"""The demo's evaluation suite: one MedQA-format task per specialty and the general control.

Written as an ordinary local suite (docs/eval.md), so the Evaluate stage and any user read it
like their own data. Tasks use the `medqa_cloze` format: MedQA records, each option scored as
the continuation of the question (a 135M model scores chance with answer letters).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

from medmerge.demo.control import control_records
from medmerge.demo.icd10 import chapter_items, mcq_records, split

CONTROL_TASK = "general_control"


def task_name(chapter: str) -> str:
    return f"icd10_{chapter}"


def _write(folder: Path, name: str, test: list[dict], shots: list[dict]) -> dict:
    for part, records in (("test", test), ("dev", shots)):
        with open(folder / f"{name}_{part}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return {
        "name": name,
        "format": "medqa_cloze",
        "test": f"{name}_test.jsonl",
        "fewshot": f"{name}_dev.jsonl",
    }


def write_suite(
    folder: str | Path,
    table: dict,
    chapters: list[str],
    *,
    fewshot: int = 12,
    seed: int = 0,
    control_size: int | None = None,
    max_items: int | None = None,
) -> dict[str, int]:
    """Write the suite into `folder`; returns the number of test questions per task.

    Per chapter: test questions on every item but `fewshot` of them, which become the few-shot
    pool (disjoint by code). Control: the capital and element questions, shuffled, the first
    `fewshot` as its few-shot pool and the next `control_size` (default all) as its test.
    `max_items` keeps the first items of each chapter only (toy runs)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tasks, counts = [], {}
    for chapter in chapters:
        pool = chapter_items(table, chapter)[:max_items]
        shots, test = split(pool, fewshot, seed)
        name = task_name(chapter)
        tasks.append(
            _write(folder, name, mcq_records(test, pool, seed), mcq_records(shots, pool, seed))
        )
        counts[name] = len(test)
    control = control_records(seed)
    random.Random(seed).shuffle(control)
    test = control[fewshot:][:control_size]
    tasks.append(_write(folder, CONTROL_TASK, test, control[:fewshot]))
    counts[CONTROL_TASK] = len(test)
    manifest = {"name": "icd10_demo", "tasks": tasks}
    (folder / "suite.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return counts
