"""Model references as users write them, resolved to local folders before any model is opened.

A reference is one of
- a local folder;
- a Hugging Face Hub ID `org/name`, optionally `org/name@revision` (a branch, tag or commit);
- `MODEL+ADAPTER`: a PEFT LoRA adapter (folder or Hub ID) folded into MODEL (folder or Hub ID).

mergekit's dict form (`{model: {path, revision}, lora: {path, revision}}`) is read into the
string form by `reference_string`, so a config holds strings only.

Hub models come through `huggingface_hub` (its cache, `HF_HOME`/`HF_HUB_CACHE`, `HF_HUB_OFFLINE`
and token), and only what a merge reads is downloaded: config, weights (safetensors and their
index; `.bin` only where there are no safetensors), tokenizer and generation files; never code.
Adapters fold through `adapters.fold`, cached, so a second merge of the same pair reuses them.
`resolve` is the one place where a reference becomes a folder: the engine, `check` and
`eval` only open folders.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from medmerge.errors import CheckpointError
from medmerge.io.adapters import adapter_base, fold, is_adapter
from medmerge.io.metadata import BIN_INDEX, SAFE_INDEX, TOKENIZER_FILES

log = logging.getLogger("medmerge")

# what a merge reads from a Hub repository besides its weights
METADATA = ("config.json", "generation_config.json", "adapter_config.json", *TOKENIZER_FILES)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class Resolved:
    """A reference and the local folder it names; where it came from the Hub, the repository
    and commit; where it folds an adapter, the model and adapter it was made of."""

    reference: str
    path: Path
    repo: str | None = None
    commit: str | None = None
    parts: tuple[Resolved, ...] = ()

    def record(self) -> dict:
        """What provenance keeps of it."""
        out: dict = {"reference": self.reference}
        if self.repo:
            out |= {"repo": self.repo, "revision": self.commit}
        if self.parts:
            out["folded"] = [p.record() for p in self.parts]
        return out


def reference_string(value) -> str:
    """mergekit's dict form of a model reference as a string (`path@revision+lora@revision`);
    a string as it is."""
    if isinstance(value, str):
        return value
    if not isinstance(value, dict) or "model" not in value:
        raise ValueError(f"a model reference is a string or {{model, lora}}, not {value!r}")
    if value.get("override_architecture"):
        raise ValueError(
            "override_architecture is not supported: medmerge merges models as their "
            "config.json describes them"
        )
    unknown = set(value) - {"model", "lora", "override_architecture"}
    if unknown:
        raise ValueError(f"unknown keys in a model reference: {', '.join(sorted(unknown))}")

    def path(part) -> str:
        if isinstance(part, str):
            return part
        if isinstance(part, dict) and "path" in part and set(part) <= {"path", "revision"}:
            return part["path"] + (f"@{part['revision']}" if part.get("revision") else "")
        raise ValueError(f"a model path is a string or {{path, revision}}, not {part!r}")

    lora = value.get("lora")
    return path(value["model"]) + (f"+{path(lora)}" if lora else "")


def resolve(reference: str | Path, *, fold: bool = False, fold_into: str | None = None) -> Resolved:
    """The local folder of `reference`. With `fold`, a bare adapter folds into its own base
    where that resolves, else into `fold_into`."""
    text = str(reference)
    if Path(text).is_dir():
        found = Resolved(text, Path(text))
    elif "+" in text:
        model, adapter = text.split("+", 1)
        return _fold(text, resolve(model), resolve(adapter))
    else:
        found = _hub(text)
    if fold and is_adapter(found.path):
        own = adapter_base(found.path)
        base = own if own and _exists(own) else fold_into
        if base is None:
            raise CheckpointError(
                f"adapter {text}: its base {own!r} cannot be found here; set base_model in the "
                "config (the adapter is folded into it), or name it as MODEL+ADAPTER"
            )
        return _fold(text, resolve(base), found)
    return found


def local_folders(refs) -> set[Path]:
    """The local folders references name (each part of a `MODEL+ADAPTER`), without resolving
    any Hub ID: what an output must stay apart from, known before anything is read."""
    parts = {part for ref in refs if ref for part in str(ref).split("+")}
    return {Path(p) for p in parts | {p.partition("@")[0] for p in parts} if Path(p).is_dir()}


def folder(reference: str | Path) -> Path:
    """The local folder a reference names (a Hub model downloaded or found in the cache)."""
    return resolve(reference).path


def _exists(reference: str) -> bool:
    """Whether a reference can be resolved without an error (a folder, or a cached Hub model)."""
    try:
        resolve(reference)
    except CheckpointError:
        return False
    return True


# ---- the Hub -------------------------------------------------------------------------------


def _split_revision(text: str) -> tuple[str, str | None]:
    if text.count("@") > 1:
        raise CheckpointError(f"model reference {text!r} has more than one '@revision'")
    repo, _, revision = text.partition("@")
    return repo, revision or None


def _hub(text: str) -> Resolved:
    """A Hub model in the local cache, downloading what a merge reads when the Hub is
    reachable."""
    import huggingface_hub as hf
    from huggingface_hub import constants

    repo, revision = _split_revision(text)
    if not _REPO_ID.match(repo) or ".." in repo:
        raise CheckpointError(
            f"model folder {text} does not exist, and {text!r} is not a Hub ID (org/name)"
        )
    offline = constants.HF_HUB_OFFLINE
    try:
        if offline:
            path = Path(hf.snapshot_download(repo, revision=revision, local_files_only=True))
        else:
            path = _download(repo, revision)
    except hf.errors.LocalEntryNotFoundError as e:
        raise CheckpointError(_not_cached(text, repo, revision)) from e
    except (hf.errors.RepositoryNotFoundError, hf.errors.GatedRepoError) as e:
        raise CheckpointError(
            f"model {text}: no such local folder, and the Hub has no model {repo} this token "
            "can read (check the name, or log in with `hf auth login` for a gated model)"
        ) from e
    except hf.errors.RevisionNotFoundError as e:
        raise CheckpointError(f"model {text}: Hub model {repo} has no revision {revision}") from e
    except hf.errors.HfHubHTTPError as e:
        raise CheckpointError(f"model {text}: the Hub could not be read ({e})") from e
    except Exception as e:  # no network (the client's own error types): not here, nor reachable
        raise CheckpointError(
            f"model {text}: no such local folder, and the Hub cannot be reached "
            f"({type(e).__name__}: {e}); give a local folder, or set HF_HUB_OFFLINE=1 to use "
            "the Hugging Face cache"
        ) from e
    _check_files(text, repo, revision, path)
    return Resolved(text, path, repo, path.name)


def _download(repo: str, revision: str | None) -> Path:
    """Download the files a merge reads of `repo` at `revision` into the Hub cache."""
    import huggingface_hub as hf

    info = hf.model_info(repo, revision=revision)
    files = [s.rfilename for s in info.siblings or []]
    wanted = [f for f in files if f in METADATA or f in (SAFE_INDEX, BIN_INDEX)]
    path = Path(hf.snapshot_download(repo, revision=info.sha, allow_patterns=wanted))
    weights = _weight_files(path, files)
    if weights:
        hf.snapshot_download(repo, revision=info.sha, allow_patterns=weights)
    return path


def _weight_files(path: Path, files: list[str]) -> list[str]:
    """The weight files a merge reads: those the index names; else the top-level safetensors
    files (an adapter's, a single-file model's); else the top-level `.bin` files."""
    for index in (SAFE_INDEX, BIN_INDEX):
        if (path / index).is_file():
            return sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
    top = [f for f in files if "/" not in f]
    safe = [f for f in top if f.endswith(".safetensors") and not f.startswith("consolidated")]
    return safe or [f for f in top if f.endswith(".bin")]


def _check_files(text: str, repo: str, revision: str | None, path: Path) -> None:
    """Refuse a cached snapshot that lacks what a merge reads, naming the file and the fix."""
    present = [p.name for p in path.iterdir()]
    missing = []
    if "config.json" not in present and "adapter_config.json" not in present:
        missing.append("config.json")
    weights = _weight_files(path, present)
    missing += [f for f in weights if not (path / f).is_file()]
    if not weights:
        missing.append("model.safetensors")
    if missing:
        fetch = f"hf download {repo}" + (f" --revision {revision}" if revision else "")
        raise CheckpointError(
            f"model {text}: {missing[0]} is not in the Hugging Face cache ({path}); fetch it "
            f"where the Hub is reachable (`{fetch}`), with HF_HUB_OFFLINE unset"
        )


def _not_cached(text: str, repo: str, revision: str | None) -> str:
    from huggingface_hub import constants

    cache = Path(constants.HF_HUB_CACHE)
    folder = cache / f"models--{repo.replace('/', '--')}"
    fetch = f"`hf download {repo}" + (f" --revision {revision}`" if revision else "`")
    if folder.is_dir() and revision:
        cached = sorted(p.name for p in (folder / "refs").glob("*")) + sorted(
            p.name for p in (folder / "snapshots").glob("*")
        )
        return (
            f"model {text}: revision {revision} of {repo} is not in the Hugging Face cache "
            f"{cache} (cached: {', '.join(cached) or 'none'}); fetch it with {fetch} where the "
            "Hub is reachable, with HF_HUB_OFFLINE unset"
        )
    return (
        f"model {text}: no such local folder, and the Hub model {repo} is not in the Hugging "
        f"Face cache {cache} (HF_HUB_OFFLINE is set); fetch it with {fetch} where the Hub is "
        "reachable, or give a local folder"
    )


# ---- adapters ------------------------------------------------------------------------------


def _fold(text: str, model: Resolved, adapter: Resolved) -> Resolved:
    if not is_adapter(adapter.path):
        raise CheckpointError(
            f"model reference {text}: {adapter.reference} is not a PEFT adapter (it has no "
            "adapter_config.json); MODEL+ADAPTER folds an adapter into a model"
        )
    if is_adapter(model.path):
        raise CheckpointError(
            f"model reference {text}: {model.reference} is an adapter; the part before '+' is "
            "the full model the adapter is folded into"
        )
    return Resolved(text, fold(adapter.path, model.path), parts=(model, adapter))
