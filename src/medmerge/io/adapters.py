"""PEFT LoRA adapters made full checkpoints: fold the adapter into its base with peft.

An adapter is not a model: merging its folder as if it were one is the degradation the paper
warns about. `materialize` loads the base (a local folder, never remote code), applies the adapter
with `peft` and `merge_and_unload()`, and writes the result through medmerge's atomic writer.
It holds one full model in memory, which peft needs.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from medmerge.errors import CheckpointError
from medmerge.io import loaders
from medmerge.io.card import PROVENANCE
from medmerge.io.checkpoint import Checkpoint
from medmerge.io.folders import atomic_folder, locked, refuse_output_near
from medmerge.io.hashing import cache_dir, sha256_file
from medmerge.io.metadata import (
    METADATA_FILES,
    check_metadata,
    copy_files,
    drop_code_references,
    metadata_file,
    write_config,
)
from medmerge.io.shards import parse_size, write_state

log = logging.getLogger("medmerge")

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def is_adapter(folder: str | Path) -> bool:
    return (Path(folder) / "adapter_config.json").is_file()


def adapter_config(adapter_dir: Path) -> dict:
    """An adapter's `adapter_config.json`: a LoRA adapter's settings, checked to be data peft
    reads without importing anything."""
    file = metadata_file(adapter_dir, "adapter_config.json")
    if file is None:
        raise CheckpointError(f"{adapter_dir} has no adapter_config.json: it is not a PEFT adapter")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(config, dict) or not config:
        raise CheckpointError(
            f"{file} must be a JSON object of the adapter's settings (peft_type, r, "
            "target_modules, ...); re-save the adapter with peft"
        )
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise CheckpointError(f"{file}: peft_type {kind!r}; medmerge folds LoRA adapters only")
    r = config.get("r", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise CheckpointError(f"{file}: r must be a positive whole number, not {r!r}")
    alpha = config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise CheckpointError(f"{file}: lora_alpha must be a finite number, not {alpha!r}")
    for key in ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias"):
        if not isinstance(config.get(key, False), bool):
            raise CheckpointError(f"{file}: {key} must be true or false, not {config[key]!r}")
    if config.get("lora_bias"):
        raise CheckpointError(f"{file} sets lora_bias: peft cannot fold such an adapter")
    if config.get("megatron_config"):  # peft would import the module `megatron_core` names
        raise CheckpointError(f"{file} sets megatron_config; medmerge folds plain LoRA adapters")
    return config


def adapter_base(adapter_dir: Path) -> str | None:
    base = adapter_config(adapter_dir).get("base_model_name_or_path")
    return base if isinstance(base, str) and base else None


def materialize(
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    base: str | Path | None = None,
    dtype: str | None = None,
    shard_size: str | int = "5GB",
    overwrite: bool = False,
) -> Path:
    """Fold a LoRA adapter into its base; write the full checkpoint to `out_dir`.

    >>> materialize("adapters/cardio-lora", "models/cardio", base="models/base")
    """
    adapter_dir = Path(adapter_dir)
    adapter_config(adapter_dir)
    check_metadata(adapter_dir)
    named = base or adapter_base(adapter_dir)
    if not named:
        raise CheckpointError(
            f"adapter {adapter_dir} names no base model (base_model_name_or_path in "
            "adapter_config.json); pass --base BASE_DIR"
        )
    base = Path(named)
    if not base.is_dir():
        raise CheckpointError(
            f"the adapter's base {str(base)!r} is not a local folder; pass --base BASE_DIR"
        )
    with Checkpoint(base) as reference:  # validates the base (and refuses an adapter as base)
        refuse_output_near(out_dir, [adapter_dir, base])
        check_adapter_fits(adapter_dir, reference)
        _fold_into(adapter_dir, reference, Path(out_dir), dtype, parse_size(shard_size), overwrite)
    return Path(out_dir)


def _fold_into(adapter_dir: Path, reference: Checkpoint, out_dir: Path, dtype, shard_size: int,
               overwrite: bool) -> None:  # fmt: skip
    try:
        import peft  # noqa: F401
    except ImportError as e:
        raise CheckpointError(
            "folding adapters needs peft: pip install 'medmerge[adapters]'"
        ) from e
    base = reference.path
    model = loaders.causal_lm(base, torch.float32)
    state = loaders.folded(model, adapter_dir).state_dict()
    names = [n for n in reference.names() if n in state]
    out_dtype = (
        getattr(torch, dtype)
        if dtype
        else next(
            reference.info(n).dtype for n in names if reference.info(n).dtype.is_floating_point
        )
    )
    with atomic_folder(out_dir, overwrite) as tmp:
        write_state(tmp, {n: state[n] for n in names}, out_dtype, shard_size)
        write_config(tmp, reference.config, str(out_dtype).removeprefix("torch."))
        copy_files(tmp, _COPIED, [adapter_dir, base])
        drop_code_references(tmp)
        provenance = {
            "materialized_from": str(adapter_dir.resolve()),
            "base": str(base.resolve()),
            "adapter_files": {f.name: sha256_file(f) for f in _adapter_files(adapter_dir)},
        }
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")


# what a folded model takes from its adapter, else its base, besides the weights
_COPIED = tuple(n for n in METADATA_FILES if n not in ("config.json", "adapter_config.json")
                and "index" not in n)  # fmt: skip


def _adapter_files(adapter_dir: Path) -> list[Path]:
    """The files of an adapter folder that make the folded model: settings, weights, and the
    tokenizer and generation files it carries."""
    names = ("adapter_config.json", *_COPIED)
    own = [f for n in names if (f := metadata_file(adapter_dir, n))]
    return own + [adapter_dir / n for n in ADAPTER_WEIGHTS if (adapter_dir / n).is_file()]


def fold(adapter: Path, model: Path) -> Path:
    """The folder of `adapter` folded into `model` in float32 (so that a merge rounds once), in
    medmerge's cache under a key of both folders' file hashes: folded once per pair, by one
    process at a time (another waits, then reuses it). Where the cache cannot be written, in
    a temporary folder removed at exit."""
    adapter_config(adapter)
    with Checkpoint(model) as reference:  # a model folder: nothing is read before this check
        weights = reference.files
    own = [f for n in METADATA_FILES if (f := metadata_file(model, n))]
    digest = hashlib.sha256(b"float32\n")
    for part, files in (("model", own + weights), ("adapter", _adapter_files(adapter))):
        for f in files:
            digest.update(f"{part}:{f.name}:{sha256_file(f)}\n".encode())
    folded = cache_dir() / "folded"
    try:
        folded.mkdir(parents=True, exist_ok=True)
        writable = os.access(folded, os.W_OK)
    except OSError:
        writable = False
    if not writable:
        log.warning("the cache %s cannot be written; folding %s into a temporary folder",
                    folded, adapter)  # fmt: skip
        scratch = Path(tempfile.mkdtemp(prefix="medmerge-folded-"))
        atexit.register(shutil.rmtree, scratch, ignore_errors=True)
        return materialize(adapter, scratch / "model", base=model, dtype="float32")
    out = folded / digest.hexdigest()[:24]
    with locked(out, wait=True):
        if not (out / "config.json").is_file():
            log.info("folding adapter %s into %s (cached in %s)", adapter, model, out)
            materialize(adapter, out, base=model, dtype="float32", overwrite=out.exists())
    return out


def check_adapter_fits(adapter: Path, ckpt: Checkpoint) -> None:
    """Refuse an adapter that does not fit the model's weights (an adapter of another base, a
    rank its weights do not have, target modules the model lacks), naming the first tensor or
    module that does not fit; before anything is loaded."""
    config = adapter_config(adapter)
    _check_targets(adapter, config, ckpt)
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        return  # a legacy .bin adapter: peft checks it as it loads
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(weights, "pt") as f:
            shapes = {n: f.get_slice(n).get_shape() for n in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights} cannot be read ({e}); re-download the adapter") from e
    ranks = {config.get("r", 8), *(config.get("rank_pattern") or {}).values()}
    model, base = ckpt.path, config.get("base_model_name_or_path")
    for name, shape in shapes.items():
        m = re.match(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.\w+)?\.weight$", name)
        if not m:
            continue
        target = ckpt.resolve(f"{m.group(1)}.weight")
        if target is None:
            raise CheckpointError(
                f"adapter {adapter} changes {m.group(1)}, which {model} does not have: the "
                f"adapter was trained on another base ({base})"
            )
        rows, cols = ckpt.info(target).shape[:2]
        fits = shape[1] == cols if m.group(2) == "A" else shape[0] == rows
        if not fits:
            raise CheckpointError(
                f"adapter {adapter}: {name} has shape {list(shape)}, which does not fit "
                f"{target} {[rows, cols]} of {model}: the adapter was trained on another base "
                f"({base})"
            )
        rank = shape[0] if m.group(2) == "A" else shape[1]
        if rank not in ranks:
            raise CheckpointError(
                f"adapter {adapter}: {name} has rank {rank}, but adapter_config.json says r "
                f"{config.get('r', 8)}; the adapter's files do not belong together (re-save it)"
            )


def _check_targets(adapter: Path, config: dict, ckpt: Checkpoint) -> None:
    """Refuse `target_modules` that name no module of the model (peft would fail on loading)."""
    targets = config.get("target_modules")
    if targets is None or targets == "all-linear":
        return
    modules = {n.removesuffix(".weight") for n in ckpt.names() if n.endswith(".weight")}
    if isinstance(targets, str):
        try:
            found = any(re.fullmatch(targets, m) for m in modules)
        except re.error as e:
            raise CheckpointError(
                f"adapter {adapter}: target_modules {targets!r} is not a regular expression ({e})"
            ) from e
    elif isinstance(targets, list) and all(isinstance(t, str) for t in targets):
        found = any(m == t or m.endswith(f".{t}") for m in modules for t in targets)
    else:
        raise CheckpointError(
            f"adapter {adapter}: target_modules must be a list of module names or a regular "
            f"expression, not {targets!r}"
        )
    if not found:
        raise CheckpointError(
            f"adapter {adapter}: target_modules {targets!r} match no module of {ckpt.path}; "
            "the adapter was made for another architecture"
        )
