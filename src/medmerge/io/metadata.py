"""The files of a model folder besides its weights: their names, where they may lie (a link
may point only inside the folder, or into a Hub snapshot's blobs), and what an output keeps of
them."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from medmerge.errors import CheckpointError

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
# every file besides the weights that medmerge reads from a model folder, or copies out of it
METADATA_FILES = (
    "config.json",
    "generation_config.json",
    "adapter_config.json",
    SAFE_INDEX,
    BIN_INDEX,
    "chat_template.json",
    *TOKENIZER_FILES,
)


def metadata_file(folder: str | os.PathLike, name: str) -> Path | None:
    """`folder/name`, a file besides the weights, where it exists; None where it does not.

    Such files are copied into merged models, so one that links out of its folder (a
    `tokenizer.model` linked to a private key) would be published with the merge: a link may
    point only inside the folder, or, for a Hub cache snapshot, into its repository's blobs."""
    path = Path(folder) / name
    if not path.is_file():
        return None
    real = path.resolve()
    if not any(real.is_relative_to(place) for place in _own_places(Path(folder))):
        raise CheckpointError(
            f"{path} links to {real}, outside its model folder; medmerge copies such files into "
            "merged models, so it reads them only from inside the folder: copy the file in "
            "place of the link"
        )
    return path


def _own_places(folder: Path) -> list[Path]:
    """Where a model folder's files may lie: the folder, and for a Hub cache snapshot
    (`repo/snapshots/<commit>/`) its repository's `blobs` folder, itself no link."""
    places = [folder.resolve()]
    for f in {Path(os.path.abspath(folder)), folder.resolve()}:
        repo = f.parent.parent
        blobs = repo / "blobs"
        if f.parent.name == "snapshots" and blobs.is_dir() and not blobs.is_symlink():
            places.append(blobs.resolve())
    return places


def drop_code_references(folder: Path) -> None:
    """Remove `auto_map` (the Python classes a model or tokenizer would load with
    `trust_remote_code`) from an output's config and tokenizer settings: medmerge never
    copies that code, so an output must not point at it."""
    for name in ("config.json", "tokenizer_config.json"):
        file = folder / name
        if not file.is_file():
            continue
        data = json.loads(file.read_text(encoding="utf-8"))
        if isinstance(data, dict) and data.pop("auto_map", None) is not None:
            file.write_text(json.dumps(data, indent=2) + "\n")


def check_metadata(folder: str | os.PathLike) -> None:
    """Refuse a model or adapter folder any of whose known non-weight files links outside it."""
    for name in METADATA_FILES:
        metadata_file(folder, name)


def chat_template_of(folder: Path) -> str | None:
    """A model folder's chat template: chat_template.jinja, or tokenizer_config.json's (of a
    list of named templates, the default one)."""
    jinja = metadata_file(folder, "chat_template.jinja")
    if jinja is not None:
        return _text(jinja).strip() or None
    config = metadata_file(folder, "tokenizer_config.json")
    if config is None:
        return None
    try:
        template = json.loads(_text(config))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config} is not valid JSON ({e}); re-download it") from e
    if not isinstance(template, dict):
        raise CheckpointError(f"{config} must be a JSON object (the tokenizer's settings)")
    template = template.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template.strip() if isinstance(template, str) and template.strip() else None


def _text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(
            f"{file} is not UTF-8 text (byte {e.start}); re-save it as UTF-8"
        ) from e


def set_chat_template(folder: Path, template: str) -> None:
    """Give the tokenizer in `folder` this chat template (in both places transformers reads)."""
    (folder / "chat_template.jinja").write_text(template)
    config = folder / "tokenizer_config.json"
    data = json.loads(config.read_text()) if config.is_file() else {}
    data["chat_template"] = template
    config.write_text(json.dumps(data, indent=2) + "\n")


def copy_files(folder: Path, names, sources: list[Path]) -> None:
    """Copy each file `names` lists into `folder` from the first of `sources` that has it."""
    for name in names:
        found = next((f for src in sources if (f := metadata_file(src, name))), None)
        if found is not None:
            shutil.copy2(found, folder / name)


def write_config(folder: Path, config: dict, dtype: str) -> None:
    """An output's `config.json`: `config` with its dtype (`torch_dtype` too, where given)."""
    config = {**config, "dtype": dtype}
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
