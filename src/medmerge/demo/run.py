"""The demo study, end to end and offline: base, two specialists, every merge, evaluated, reported.

1. SmolLM2-135M-Instruct from its GGUF file to a safetensors checkpoint (the base);
2. the evaluation suite: one ICD-10-CM question set per specialty and the general control;
3. two specialists, each fully fine-tuned from the base on its own ICD-10-CM chapter;
4. a study: the base, both specialists and a merge by every method, evaluated and reported;
   or, with `tune`, a search of merge hyperparameters judged on held-out questions.

The base and the specialists are cached under `$MEDMERGE_CACHE/demo`, keyed by everything that
makes them (the GGUF file's hash; the base, the training texts and settings), so a rerun trains
nothing. Evaluations go to the demo's result store beside them, keyed by weight fingerprint and
protocol, so an unchanged model is never evaluated twice either.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from medmerge.demo.icd10 import chapter_items, load_table, training_texts
from medmerge.demo.suite import CONTROL_TASK, task_name, write_suite
from medmerge.io.hashing import cache_dir, sha256_file
from medmerge.studies.study import PAPER_MERGES

log = logging.getLogger("medmerge")

# bump when the conversion or the training code changes what it produces
CONVERT_VERSION = 2
FINETUNE_VERSION = 1


@dataclass(frozen=True)
class DemoSettings:
    chapters: tuple[str, str] = ("circulatory", "endocrine")
    epochs: int = 8  # passes over a specialist's training texts
    lr: float = 3e-4
    seed: int = 0
    fewshot_pool: int = 12  # items per task held out as few-shot examples
    num_fewshot: int = 0
    limit: int | None = None  # questions per task (None: all)
    control_size: int = 200
    max_items: int | None = None  # first items of each chapter only (toy runs)
    merges: tuple[dict, ...] = tuple(PAPER_MERGES)
    trials: int = 16  # `tune`: trials of the search


FULL = DemoSettings()
QUICK = replace(FULL, epochs=2, limit=24, trials=4)

# `tune`: DARE-TIES and TIES densities and the linear and task-arithmetic weights, with the
# general control kept within 5 points of the base; judged against the paper's recommendation
# (DARE-TIES at density 0.9), a plain average and the hierarchical method
TUNE_SPACES = [
    {"method": "dare_ties", "parameters": {"weight": 0.5, "density": {"low": 0.5, "high": 1.0}}},
    {"method": "ties", "parameters": {"weight": 0.5, "density": {"low": 0.3, "high": 1.0}}},
    {"method": "linear", "per_model": [{"weight": {"low": 0.2, "high": 1.0}},
                                       {"weight": {"low": 0.2, "high": 1.0}}]},
    {"method": "task_arithmetic", "parameters": {"weight": {"low": 0.3, "high": 1.2}}},
]  # fmt: skip
TUNE_BASELINES = [
    {"method": "dare_ties", "parameters": {"weight": 0.5, "density": 0.9}},
    {"method": "linear", "parameters": {"weight": 0.5}},
    {"method": "hierarchical"},
]


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def cached_base(cache: Path) -> Path:
    """The SmolLM2 checkpoint, converted once per GGUF file."""
    from medmerge.demo.convert import convert_gguf, smollm2_gguf

    gguf = smollm2_gguf()
    folder = cache / f"smollm2-135m-instruct-{_key(sha256_file(gguf), CONVERT_VERSION)}"
    if not folder.is_dir():
        log.info("converting %s to %s", gguf.name, folder)
        convert_gguf(folder, gguf)
    return folder


def cached_specialist(
    cache: Path, base: Path, chapter: str, settings: DemoSettings, table: dict, progress: bool
) -> Path:
    """A specialist fine-tuned on its chapter, trained once per (base, data, settings)."""
    from medmerge.demo.finetune import finetune
    from medmerge.eval.store import model_fingerprint

    texts = training_texts(chapter_items(table, chapter)[: settings.max_items], settings.seed)
    key = _key(
        model_fingerprint(base),
        texts,
        settings.epochs,
        settings.lr,
        settings.seed,
        FINETUNE_VERSION,
    )
    folder = cache / f"specialist-{chapter}-{key}"
    if not folder.is_dir():
        record = finetune(
            base,
            texts,
            folder,
            epochs=settings.epochs,
            lr=settings.lr,
            seed=settings.seed,
            progress=progress,
            desc=f"fine-tune {chapter}",
        )
        (folder / "training.json").write_text(json.dumps({"texts": len(texts), **record}))
    return folder


def _inputs(base: Path, specialists: list[Path], suite: Path, settings: DemoSettings) -> dict:
    """What the demo's study and search share: the models, the suite, the protocol."""
    return {
        "base": str(base),
        "models": [str(s) for s in specialists],
        "suite": str(suite),
        "protocol": {
            "num_fewshot": settings.num_fewshot,
            "dtype": "bfloat16",
            "limit": settings.limit,
            "seed": settings.seed,
        },
        "merge": {"dtype": "bfloat16", "seed": settings.seed},
    }


def study_config(
    base: Path, specialists: list[Path], suite: Path, settings: DemoSettings, store: Path
) -> dict:
    return {
        "name": "icd10_demo",
        **_inputs(base, specialists, suite, settings),
        "result_store": str(store),
        "merges": list(settings.merges),
    }


def tune_config(base: Path, specialists: list[Path], suite: Path, settings: DemoSettings) -> dict:
    return {
        "name": "icd10_tune",
        **_inputs(base, specialists, suite, settings),
        "split": {"dev": 0.5, "seed": settings.seed},
        "constraints": [{"task": CONTROL_TASK, "max_drop": 5.0}],
        "search": {"trials": settings.trials, "seed": settings.seed},
        "spaces": TUNE_SPACES,
        "baselines": TUNE_BASELINES,
        "final_top": 3,
    }


def run_demo(
    out: str | Path = "runs/demo",
    *,
    quick: bool = False,
    tune: bool = False,
    settings: DemoSettings | None = None,
    cache: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Run (or resume) the demo into `out`; returns the summary (also in `out/summary.json`).
    With `tune`, a search (`out/tune`) instead of the study, summarised with its held-out
    verdict in `out/summary-tune.json`."""
    from medmerge.studies.records import load_records
    from medmerge.studies.study import run_study

    settings = settings or (QUICK if quick else FULL)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache) if cache else cache_dir() / "demo"
    cache.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    started = time.time()
    base = cached_base(cache)
    seconds["base"] = time.time() - started

    started = time.time()
    table = load_table()
    counts = write_suite(
        out / "suite",
        table,
        list(settings.chapters),
        fewshot=settings.fewshot_pool,
        seed=settings.seed,
        control_size=settings.control_size,
        max_items=settings.max_items,
    )
    seconds["suite"] = time.time() - started

    specialists = []
    for chapter in settings.chapters:
        started = time.time()
        specialists.append(cached_specialist(cache, base, chapter, settings, table, progress))
        seconds[f"fine-tune {chapter}"] = time.time() - started

    started = time.time()
    if tune:
        from medmerge.studies.tune import run_tune

        config = tune_config(base, specialists, out / "suite", settings)
        runs = (out / "study" / "runs").glob("*.json")
        if any(not r.stem.startswith(("base", "parent_")) for r in runs):
            config["study"] = str(out / "study")  # the demo study's best merge is judged too
        folder = run_tune(config, out / "tune", progress=progress)
        seconds["tune"] = time.time() - started
        summary = summarize_tune(folder)
    else:
        config = study_config(base, specialists, out / "suite", settings, cache / "results.sqlite")
        folder = run_study(config, out / "study", progress=progress)
        seconds["study"] = time.time() - started
        summary = summarize(load_records(folder), settings.chapters)
    summary.update(
        report=str(folder / "report.md"),
        questions=counts if settings.limit is None else {t: settings.limit for t in counts},
        seconds={k: round(v, 1) for k, v in seconds.items()},
        settings=asdict(settings),
        specialists=[str(s) for s in specialists],
    )
    (out / ("summary-tune.json" if tune else "summary.json")).write_text(
        json.dumps(summary, indent=2) + "\n"
    )
    return summary


def summarize_tune(folder: Path) -> dict:
    """A search's headline: held-out accuracies, the verdict and the best configuration."""
    from medmerge.studies.records import RunRecord
    from medmerge.studies.report import acc, accuracy_tasks, mean_acc
    from medmerge.studies.tune_report import verdict

    stored = json.loads((folder / "heldout.json").read_text())
    records = [RunRecord.model_validate(r) for r in stored]
    tasks = accuracy_tasks(records)
    text, tests = verdict(records, tasks)
    return {
        "accuracy": {
            r.run.name: {
                "kind": r.run.kind,
                **{t: round(acc(r, t)[0], 4) for t in tasks},
                "mean": round(mean_acc(r, tasks)[0], 4),
            }
            for r in records
        },
        "verdict": text,
        "paired_tests": tests,
        "best_config": str(folder / "best.yaml"),
    }


def summarize(records: list, chapters: tuple[str, str]) -> dict:
    """The headline: every model's accuracies; the best merge by mean accuracy; its gain over
    each specialist on the other specialist's domain; its change on the control versus the base."""
    from medmerge.studies.report import acc, accuracy_tasks, mean_acc

    tasks = accuracy_tasks(records)
    by_name = {r.run.name: r for r in records}
    rows = {
        r.run.name: {
            "kind": r.run.kind,
            **{t: round(acc(r, t)[0], 4) for t in tasks},
            "mean": round(mean_acc(r, tasks)[0], 4),
        }
        for r in records
    }
    merges = [r for r in records if r.run.kind == "merge"]
    summary: dict = {"accuracy": rows}
    if not merges or "base" not in by_name:
        return summary
    best = max(merges, key=lambda r: mean_acc(r, tasks)[0])
    domains = [task_name(c) for c in chapters]
    parents = ["parent_a", "parent_b"]
    other = {parents[0]: domains[1], parents[1]: domains[0]}
    summary["best_merge"] = {
        "name": best.run.name,
        "mean": rows[best.run.name]["mean"],
        "gain_over_specialist_on_other_domain": {
            f"{p} ({domains[i]} specialist) on {other[p]}": round(
                acc(best, other[p])[0] - acc(by_name[p], other[p])[0], 4
            )
            for i, p in enumerate(parents)
            if p in by_name
        },
        "control_change_vs_base": round(
            acc(best, CONTROL_TASK)[0] - acc(by_name["base"], CONTROL_TASK)[0], 4
        ),
    }
    return summary
