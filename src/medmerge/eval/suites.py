"""Evaluation suites: the paper's lm-eval tasks, or local suites of JSONL files in their formats.

A local suite is a folder with `suite.yaml`:

```yaml
name: cardio
tasks:
  - name: cardio_mcq
    format: medqa    # medqa | medqa_cloze | pubmedqa | mmlu | medmcqa | hellaswag | perplexity
    test: cardio_test.jsonl
    fewshot: cardio_dev.jsonl  # optional; else few-shot examples come from test (never the item)
```

Records use the upstream datasets' field names, so an export of the real dataset drops in. Each
task becomes an lm-eval task YAML that `include`s the upstream task's own YAML, so the prompt
functions (and so the prompts) are exactly the paper's; only the data source is replaced by
`dataset_path: json` with local `data_files`. The generated YAML goes to the medmerge cache
(`suites/`), or to a private temporary folder where the cache cannot be written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from medmerge.config import read_yaml
from medmerge.errors import ConfigError
from medmerge.io.hashing import cache_dir

log = logging.getLogger("medmerge")

Format = Literal["medqa", "medqa_cloze", "pubmedqa", "mmlu", "medmcqa", "hellaswag", "perplexity"]

# the paper's protocol: lm-eval task -> the hub dataset (and config) it downloads
PAPER_TASKS = {
    "medqa_4options": ("GBaker/MedQA-USMLE-4-options-hf", None),
    "pubmedqa": ("bigbio/pubmed_qa", "pubmed_qa_labeled_fold0_source"),
    "mmlu_professional_medicine": ("cais/mmlu", "professional_medicine"),
    "medmcqa": ("openlifescienceai/medmcqa", None),
    "hellaswag": ("Rowan/hellaswag", None),
}

# format -> the upstream lm-eval YAML (relative to lm_eval/tasks) whose prompts a local task reuses
UPSTREAM = {
    "medqa": "medqa/medqa.yaml",
    "pubmedqa": "pubmedqa/pubmedqa.yaml",
    "mmlu": "mmlu/default/_default_template_yaml",
    "medmcqa": "medmcqa/medmcqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
}

# MedQA records scored as a cloze: the text of each option is the continuation, as lm-eval's
# mmlu_continuation does for MMLU. Small models cannot map knowledge to answer letters (the
# letter prompt scores chance on SmolLM2-135M), so their evaluations use this formulation.
MEDQA_CLOZE = {
    "output_type": "multiple_choice",
    "doc_to_text": "Question: {{sent1}}\nAnswer:",
    "doc_to_choice": "{{[ending0, ending1, ending2, ending3]}}",
    "doc_to_target": "{{label}}",
    "metric_list": [
        {"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")
    ],
    "metadata": {"version": 1.0},
}

# strict: medqa, mmlu and medmcqa hand the label to lm-eval as it is, and a string "1" (or true)
# is then never the right answer. Hellaswag's upstream YAML converts its label with int().
Label4 = Annotated[int, Field(ge=0, le=3, strict=True)]


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow")


class MedQARecord(_Record):
    sent1: str
    ending0: str
    ending1: str
    ending2: str
    ending3: str
    label: Label4


class PubMedQARecord(_Record):
    QUESTION: str
    CONTEXTS: list[str]
    final_decision: Literal["yes", "no", "maybe"]


class MMLURecord(_Record):
    question: str
    choices: Annotated[list[str], Field(min_length=4, max_length=4)]
    answer: Label4


class MedMCQARecord(_Record):
    question: str
    opa: str
    opb: str
    opc: str
    opd: str
    cop: Label4


class HellaSwagRecord(_Record):
    activity_label: str
    ctx_a: str
    ctx_b: str
    endings: Annotated[list[str], Field(min_length=4, max_length=4)]
    label: int | str

    @field_validator("label")
    @classmethod
    def _label(cls, v):
        if str(v) not in {"0", "1", "2", "3"}:
            raise ValueError("label must be 0, 1, 2 or 3")
        return v


class PerplexityRecord(_Record):
    text: Annotated[str, Field(min_length=1)]


RECORDS: dict[str, type[_Record]] = {
    "medqa": MedQARecord,
    "medqa_cloze": MedQARecord,
    "pubmedqa": PubMedQARecord,
    "mmlu": MMLURecord,
    "medmcqa": MedMCQARecord,
    "hellaswag": HellaSwagRecord,
    "perplexity": PerplexityRecord,
}


# a plain name: it becomes a file name and an lm-eval task name
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)]


class TaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Name
    format: Format
    test: str
    fewshot: str | None = None
    description: str | None = None

    @field_validator("description")
    @classmethod
    def _plain_text(cls, v):
        """lm-eval renders a description as a Jinja template: a suite is data, so none."""
        if v is not None and any(mark in v for mark in ("{{", "{%", "{#")):
            raise ValueError("must be plain text: template syntax ({{, {%, {#) is not allowed")
        return v


class SuiteManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Name
    tasks: list[TaskSpec]

    @field_validator("tasks")
    @classmethod
    def _unique_names(cls, tasks):
        """Each task becomes `NAME.yaml`: a second task of a name would replace the first.
        Compared case-blind, as macOS and Windows compare file names."""
        seen: set[str] = set()
        for task in tasks:
            if task.name.casefold() in seen:
                raise ValueError(f"two tasks are named {task.name!r}; give each its own name")
            seen.add(task.name.casefold())
        return tasks


class Suite(BaseModel):
    """A resolved suite: lm-eval task names, and (local suites) the folder of generated YAML."""

    name: str
    tasks: list[str]
    include_path: str | None = None  # folder of generated task YAML, for lm-eval's TaskManager
    content_hash: str  # identifies the exact data and prompts, for the result store
    local: bool
    perplexity: list[str] = []  # the tasks scored by perplexity (lower is better), not accuracy

    @property
    def accuracy_tasks(self) -> list[str]:
        return [t for t in self.tasks if t not in self.perplexity]


def validate_records(path: Path, fmt: str) -> int:
    """Check every line of a JSONL file; returns the record count. Errors name file and line."""
    if not path.is_file():
        raise ConfigError(f"suite data file {path} does not exist")
    model = RECORDS[fmt]
    count = 0
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ConfigError(f"suite data file {path} is not UTF-8 text (byte {e.start})") from e
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{line_no}: not valid JSON ({e.msg})") from e
        try:
            model.model_validate(record)
        except ValidationError as e:
            problems = "; ".join(_problem(err) for err in e.errors())
            raise ConfigError(f"{path}:{line_no}: invalid {fmt} record: {problems}") from e
        count += 1
    if count == 0:
        raise ConfigError(f"suite data file {path} has no records")
    return count


def _problem(err: dict) -> str:
    """One validation error of a record, with the fix where the type is wrong."""
    where = ".".join(map(str, err["loc"])) or "record"
    if err["type"] == "int_type":
        return (
            f"{where}: must be a JSON integer, not {json.dumps(err['input'])}; write the "
            "number without quotes or decimals (e.g. 1)"
        )
    return f"{where}: {err['msg']}"


def _upstream_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def _task_yaml(spec: TaskSpec, folder: Path, suite: str) -> dict:
    files = {"test": str((folder / spec.test).resolve())}
    if spec.fewshot:
        files["train"] = str((folder / spec.fewshot).resolve())
    cfg: dict = {
        "task": spec.name,
        "tag": [f"medmerge_suite_{suite}"],
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": files},
        "test_split": "test",
        "validation_split": None,
        "training_split": "train" if spec.fewshot else None,
        "fewshot_split": "train" if spec.fewshot else "test",
    }
    if spec.format == "perplexity":
        cfg.update(
            output_type="loglikelihood_rolling",
            doc_to_text="",
            doc_to_target="{{text}}",
            metric_list=[
                {"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")
            ],
            metadata={"version": 1.0},
        )
        cfg.pop("fewshot_split")
        cfg["training_split"] = None
    elif spec.format == "medqa_cloze":
        cfg.update(MEDQA_CLOZE)
    else:
        cfg["include"] = str(_upstream_dir() / UPSTREAM[spec.format])
        if spec.format == "mmlu":
            cfg["fewshot_config"] = {"sampler": "first_n"}
    if spec.description:
        cfg["description"] = spec.description
    return cfg


def load_suite(suite: str | Path, tasks: list[str] | None = None) -> Suite:
    """`paper`, or a local suite folder; optionally restricted to some tasks."""
    if tasks is not None and (not tasks or not all(tasks)):
        raise ConfigError(f"the task list {tasks} is empty or names an empty task; name the "
                          "tasks to run, or leave the list out for every task")  # fmt: skip
    if tasks and len(set(tasks)) < len(tasks):
        raise ConfigError(f"the task list {tasks} names a task twice; name each once")
    if str(suite) == "paper":
        names = tasks or list(PAPER_TASKS)
        unknown = set(names) - set(PAPER_TASKS)
        if unknown:
            raise ConfigError(
                f"suite paper has no task {sorted(unknown)}; it has {', '.join(PAPER_TASKS)}"
            )
        digest = hashlib.sha256(json.dumps(names).encode()).hexdigest()[:16]
        return Suite(name="paper", tasks=names, content_hash=digest, local=False)
    folder = Path(suite)
    manifest_file = folder / "suite.yaml"
    if not manifest_file.is_file():
        raise ConfigError(
            f"suite {suite!r} is neither 'paper' nor a folder with suite.yaml "
            "(see docs/eval.md for the manifest format)"
        )
    documents = read_yaml(manifest_file, "suite manifest")
    try:
        manifest = SuiteManifest.model_validate(documents[0] if len(documents) == 1 else None)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or 'manifest'}: "
            + err["msg"].removeprefix("Value error, ")
            for err in e.errors()
        )
        raise ConfigError(f"{manifest_file} is not a valid suite manifest: {problems}") from e
    specs = manifest.tasks
    if tasks:
        unknown = set(tasks) - {t.name for t in specs}
        if unknown:
            raise ConfigError(f"suite {manifest.name} has no task {sorted(unknown)}")
        specs = [t for t in specs if t.name in tasks]
    h = hashlib.sha256(manifest_file.read_bytes())
    for spec in specs:
        for rel in filter(None, (spec.test, spec.fewshot)):
            if not (folder / rel).resolve().is_relative_to(folder.resolve()):
                raise ConfigError(
                    f"{manifest_file}: task {spec.name} names data file {rel}, outside the "
                    "suite folder; keep the data beside suite.yaml"
                )
            validate_records(folder / rel, spec.format)
            h.update((folder / rel).read_bytes())
    digest = h.hexdigest()[:16]
    files = {f"{spec.name}.yaml": _task_yaml(spec, folder, manifest.name) for spec in specs}
    return Suite(
        name=manifest.name,
        tasks=[s.name for s in specs],
        include_path=str(_write_task_yaml(f"{manifest.name}-{digest}", files)),
        content_hash=digest,
        local=True,
        perplexity=[s.name for s in specs if s.format == "perplexity"],
    )


_FALLBACK: dict[str, Path] = {}  # suite folder name -> its temporary folder, one per process


def _write_task_yaml(name: str, files: dict[str, dict]) -> Path:
    """Write a suite's task YAML under the cache (`suites/NAME`); where the cache cannot be
    written (read-only, a path under a file), into a private temporary folder instead, with one
    warning: the cache only saves rewriting a few small files."""
    out = cache_dir() / "suites" / name
    try:
        _write_files(out, files)
    except OSError as e:
        if name not in _FALLBACK:
            _FALLBACK[name] = Path(tempfile.mkdtemp(prefix="medmerge-suite-"))
            log.warning(
                "cannot write the suite's task files under %s (%s); using %s instead",
                out,
                e.strerror or e,
                _FALLBACK[name],
            )
        out = _FALLBACK[name]
        _write_files(out, files)
    return out


def _write_files(folder: Path, files: dict[str, dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, cfg in files.items():
        (folder / name).write_text(yaml.safe_dump(cfg, sort_keys=False))
