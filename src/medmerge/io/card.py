"""The model card of a merged model: `README.md` with Hub front matter, as the Hub shows it."""

from __future__ import annotations

import json
import re
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from medmerge.version import __version__

PROVENANCE = "medmerge_provenance.json"


def write_provenance(folder: Path, provenance: dict, config_yaml: str, name: str,
                     card: bool = True) -> None:  # fmt: skip
    """An output's provenance (`PROVENANCE`) and, with `card`, its model card (`README.md`)."""
    (folder / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
    if card:
        (folder / "README.md").write_text(model_card(provenance, config_yaml, name))


def model_card(provenance: dict, config_yaml: str, name: str) -> str:
    """A card for the merge `provenance` describes (inputs with their Hub revisions, method,
    config), named `name`."""
    inputs = provenance["inputs"]
    data = ModelCardData(
        base_model=[_model_id(i) for i in inputs],
        library_name="transformers",
        tags=["merge", "medmerge", provenance["merge_method"]],
    )
    rows = "\n".join(
        f"| {i['role']} | {text(_model_id(i))} | {text(i.get('revision') or 'local')} |"
        for i in inputs
    )
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall("`+", config_yaml)), default=0))
    body = f"""
# {text(name)}

A merge of {len(inputs)} models with **{provenance["merge_method"]}**, made by
[medmerge](https://pypi.org/project/medmerge/) {__version__} (seed {provenance["seed"]}, output
dtype {provenance["dtype"]}). Every input's files are listed with their SHA-256 in
`medmerge_provenance.json`.

## Inputs

| role | model | revision |
|---|---|---|
{rows}

## Merge config

{fence}yaml
{config_yaml.rstrip()}
{fence}
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def text(value: object) -> str:
    """A user's string (a folder or task name) as literal Markdown text on one line: no
    markup, table cell or code fence of its own."""
    flat = " ".join(str(value).split())
    return re.sub(r"([\\`*_\[\]<>|~])", r"\\\1", flat)


def _model_id(record: dict) -> str:
    """The Hub ID of an input where it came from the Hub, else the reference as written."""
    return record.get("repo") or record.get("reference") or record["path"]


def add_scores(folder: Path, study: str, protocol: dict, tasks: dict) -> None:
    """Add a study's scores of the model in `folder` (task -> TaskScore) to its model card, as
    a table and as Hub `model-index` results."""
    card = ModelCard.load(folder / "README.md")
    rows, results = [], []
    for task, score in tasks.items():
        for metric, value in score.metrics.items():
            err = score.stderr.get(metric)
            shown_err = "" if err is None else f"{err:.4f}"
            rows.append(f"| {text(task)} | {metric} | {value:.4f} | {shown_err} | {score.n} |")
            results.append(
                EvalResult(
                    task_type="text-generation",
                    dataset_type=task,
                    dataset_name=task,
                    metric_type=metric,
                    metric_value=value,
                )
            )
    card.data.eval_results = results
    card.data.model_name = folder.name
    shown = ", ".join(
        f"{k} {text(v)}"
        for k, v in protocol.items()
        if k in ("suite", "num_fewshot", "limit", "seed")
    )
    card.text += (
        f"\n## Scores (study {text(study)})\n\n{shown}; lm-evaluation-harness.\n\n"
        "| task | metric | value | stderr | n |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    card.save(folder / "README.md")
