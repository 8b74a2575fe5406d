"""PEFT LoRA adapters made full checkpoints: fold the adapter into its base with peft.

An adapter is not a model: merging its folder as if it were one is the degradation the paper
warns about. `materialize` loads the base (a local folder, never remote code), applies the adapter
with `peft` and `merge_and_unload()`, and writes the result through medmerge's atomic writer.
It holds one full model in memory, which peft needs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

import torch

from medmerge.checkpoint import TOKENIZER_FILES, Checkpoint, atomic_folder, parse_size, write_state
from medmerge.errors import CheckpointError
from medmerge.hashing import cache_dir, sha256_file

log = logging.getLogger("medmerge")


def is_adapter(folder: str | Path) -> bool:
    return (Path(folder) / "adapter_config.json").is_file()


def adapter_base(adapter_dir: Path) -> str | None:
    try:
        return json.loads((adapter_dir / "adapter_config.json").read_text()).get(
            "base_model_name_or_path"
        )
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{adapter_dir}/adapter_config.json is not valid JSON: {e}") from e


def materialize(
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    base: str | Path | None = None,
    dtype: str | None = None,
    shard_size: str | int = "5GB",
    overwrite: bool = False,
) -> Path:
    """Fold a LoRA adapter into its base; write the full checkpoint to `out_dir`."""
    adapter_dir = Path(adapter_dir)
    if not is_adapter(adapter_dir):
        raise CheckpointError(f"{adapter_dir} has no adapter_config.json: it is not a PEFT adapter")
    base = Path(base or adapter_base(adapter_dir) or "")
    if not base.is_dir():
        raise CheckpointError(
            f"the adapter's base {str(base)!r} is not a local folder; pass --base BASE_DIR"
        )
    reference = Checkpoint(base)  # validates the base folder (and refuses an adapter as base)
    check_adapter_fits(adapter_dir, base)
    try:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise CheckpointError(
            "folding adapters needs peft: pip install 'medmerge[adapters]'"
        ) from e
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    state = model.state_dict()
    names = [n for n in reference.names() if n in state]
    out_dtype = (
        getattr(torch, dtype)
        if dtype
        else next(
            reference.info(n).dtype for n in names if reference.info(n).dtype.is_floating_point
        )
    )
    with atomic_folder(out_dir, overwrite) as tmp:
        write_state(tmp, {n: state[n] for n in names}, out_dtype, parse_size(shard_size))
        config = dict(reference.config)
        config["dtype"] = str(out_dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name in (*TOKENIZER_FILES, "generation_config.json"):
            src = adapter_dir / name if (adapter_dir / name).is_file() else base / name
            if src.is_file():
                shutil.copy2(src, tmp / name)
        provenance = {
            "materialized_from": str(adapter_dir.resolve()),
            "base": str(base.resolve()),
            "adapter_files": {
                f.name: sha256_file(f) for f in sorted(adapter_dir.iterdir()) if f.is_file()
            },
        }
        (tmp / "medmerge_provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    reference.close()
    return Path(out_dir)


def fold(adapter: Path, model: Path) -> Path:
    """The folder of `adapter` folded into `model` in float32 (so that a merge rounds once), in
    medmerge's cache under a key of both folders' file hashes: folded once per pair."""
    digest = hashlib.sha256(b"float32\n")
    for part in (model, adapter):
        for f in sorted(p for p in part.iterdir() if p.is_file()):
            digest.update(f"{f.name}:{sha256_file(f)}\n".encode())
    out = cache_dir() / "folded" / digest.hexdigest()[:24]
    if not (out / "config.json").is_file():
        log.info("folding adapter %s into %s (cached in %s)", adapter, model, out)
        out.parent.mkdir(parents=True, exist_ok=True)
        materialize(adapter, out, base=model, dtype="float32", overwrite=out.exists())
    return out


def check_adapter_fits(adapter: Path, model: Path) -> None:
    """Refuse an adapter whose LoRA matrices do not fit the model's weights (an adapter of
    another base), naming the first tensor that does not fit; before anything is loaded."""
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        return  # a legacy .bin adapter: peft checks it as it loads
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(weights, "pt") as f:
            shapes = {n: f.get_slice(n).get_shape() for n in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights} cannot be read ({e}); re-download the adapter") from e
    ckpt = Checkpoint(model)  # headers only: nothing is read
    for name, shape in shapes.items():
        m = re.match(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.\w+)?\.weight$", name)
        if not m:
            continue
        target = ckpt.resolve(f"{m.group(1)}.weight")
        if target is None:
            raise CheckpointError(
                f"adapter {adapter} changes {m.group(1)}, which {model} does not have: the "
                f"adapter was trained on another base ({adapter_base(adapter)})"
            )
        rows, cols = ckpt.info(target).shape[:2]
        fits = shape[1] == cols if m.group(2) == "A" else shape[0] == rows
        if not fits:
            raise CheckpointError(
                f"adapter {adapter}: {name} has shape {list(shape)}, which does not fit "
                f"{target} {[rows, cols]} of {model}: the adapter was trained on another base "
                f"({adapter_base(adapter)})"
            )
