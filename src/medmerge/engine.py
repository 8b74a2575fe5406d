"""The streaming merge: plan (validate everything up front), then merge group by group and write.

Data flow: config -> `plan_merge` (open checkpoints lazily, check compatibility, resolve every
parameter of every tensor) -> `merge` (read a group of tensors from each model, call the method
in float32 on the device, check and cast the result, stream it into the shard writer) -> metadata
and provenance -> atomic rename into OUT_DIR.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch
from tqdm.auto import tqdm

from medmerge import buffers
from medmerge.checkpoint import (
    TOKENIZER_FILES,
    Checkpoint,
    ShardWriter,
    atomic_folder,
    parse_size,
)
from medmerge.config import ConditionalParameter, MergeConfig, ParameterValue, load_config
from medmerge.errors import ConfigError, IncompatibleModelsError, MergeError
from medmerge.hashing import cache_dir, sha256_file
from medmerge.methods import (
    REQUIRED,
    MergeMethod,
    config_name,
    get_method,
    largest_magnitude,
)
from medmerge.methods.rng import tensor_keys
from medmerge.version import __version__

log = logging.getLogger("medmerge")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")
PROVENANCE = "medmerge_provenance.json"
DIAGNOSTICS = "merge_diagnostics.json"


def layer_position(name: str, num_layers: int) -> float:
    """Where a tensor sits in the depth of the model, in [0, 1], for gradient parameters.

    Layer i of L is at i / (L - 1); embeddings are at 0 and everything after the last layer
    (final norm, output head) at 1, as in mergekit.
    """
    m = LAYER_INDEX.search(name)
    if m:
        return int(m.group(1)) / max(num_layers - 1, 1)
    return 0.0 if "embed" in name or "wte" in name else 1.0


def evaluate(value: ParameterValue, name: str, t: float):
    """A parameter's value for one tensor: scalar, gradient over depth, or filtered list."""
    if not isinstance(value, list):
        return value
    if value and isinstance(value[0], ConditionalParameter):
        for cond in value:
            if cond.filter in (None, "*") or cond.filter in name:
                return evaluate(cond.value, name, t)
        return None
    if len(value) == 1:
        return value[0]
    x = t * (len(value) - 1)
    i = min(int(x), len(value) - 2)
    return value[i] + (x - i) * (value[i + 1] - value[i])


@dataclass
class MergePlan:
    config: MergeConfig
    method: MergeMethod
    base: Checkpoint | None
    models: list[Checkpoint]
    out_dtype: torch.dtype
    groups: list[list[str]]
    params: dict[str, dict] = field(default_factory=dict)  # tensor name -> method kwargs
    temp_dirs: list[Path] = field(default_factory=list)  # adapters folded for this merge

    @property
    def reference(self) -> Checkpoint:
        """The model whose tensor names, config and layout the output takes."""
        return self.base or self.models[0]

    @property
    def inputs(self) -> list[Checkpoint]:
        return ([self.base] if self.base else []) + self.models

    @property
    def order(self) -> list[str]:
        return [n for g in self.groups for n in g]


def plan_merge(config: MergeConfig | dict | str | Path, dtype: str | None = None) -> MergePlan:
    """Open the inputs and check everything that can fail before a byte is written."""
    cfg = load_config(config)
    method = get_method(cfg.merge_method)
    if method.needs_base and not cfg.base_model:
        raise ConfigError(f"merge_method {method.name} needs a base_model (the common ancestor)")
    base = Checkpoint(cfg.base_model) if cfg.base_model else None
    entries = cfg.models
    if base is not None:
        is_base = [Path(e.model).resolve() == base.path.resolve() for e in entries]
        if method.uses_base:
            # mergekit lets the base appear among the models; its task vector is zero: drop it
            entries = [e for e, b in zip(entries, is_base, strict=True) if not b]
        else:
            # methods of models alone (slerp): the base, when listed, is the first (t = 0) end
            entries = sorted(entries, key=lambda e: not is_base[cfg.models.index(e)])
    temp_dirs: list[Path] = []
    models = [_open_model(e.model, cfg, temp_dirs) for e in entries]
    n = len(models)
    if n < method.min_models or (method.max_models and n > method.max_models):
        want = f"{method.min_models}" + (
            f" to {method.max_models}" if method.max_models != method.min_models else ""
        )
        raise ConfigError(
            f"merge_method {method.name} takes {want} models (besides the base); got {n}"
        )
    plan = MergePlan(cfg, method, base, models, torch.bfloat16, [], temp_dirs=temp_dirs)
    _check_compatible(plan)
    plan.out_dtype = _output_dtype(plan, dtype)
    names = plan.reference.names()
    floats = [n for n in names if plan.reference.info(n).dtype.is_floating_point]
    others = [[n] for n in names if n not in set(floats)]
    grouped = method.group(floats, plan.reference.config) if method.group else [[n] for n in floats]
    plan.groups = grouped + others
    plan.params = _resolve_parameters(cfg, method, entries, floats, _num_layers(plan))
    return plan


def _open_model(path: str, cfg: MergeConfig, temp_dirs: list[Path]) -> Checkpoint:
    """A model entry's checkpoint; a LoRA adapter is folded into its base when the config asks."""
    from medmerge.adapters import adapter_base, is_adapter, materialize

    if not (cfg.materialize_adapters and is_adapter(path)):
        return Checkpoint(path)  # refuses an adapter with advice
    own_base = adapter_base(Path(path))
    base = own_base if own_base and Path(own_base).is_dir() else cfg.base_model
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix="adapter-", dir=cache))
    temp_dirs.append(temp)
    log.info("folding LoRA adapter %s into %s", path, base)
    # folded in float32: the merge rounds once, at the end
    return Checkpoint(materialize(path, temp / "model", base=base, dtype="float32"))


def _num_layers(plan: MergePlan) -> int:
    cfg = plan.reference.config
    cfg = cfg.get("text_config", cfg)
    if "num_hidden_layers" in cfg:
        return int(cfg["num_hidden_layers"])
    found = [int(m.group(1)) for n in plan.reference.names() if (m := LAYER_INDEX.search(n))]
    return max(found, default=0) + 1


def _check_compatible(plan: MergePlan) -> None:
    ref = plan.reference
    for other in plan.inputs:
        if other is ref:
            continue
        for key in ("model_type", "architectures"):
            if ref.config.get(key) != other.config.get(key):
                raise IncompatibleModelsError(
                    f"{other.path} has {key}={other.config.get(key)!r} but {ref.path} has "
                    f"{ref.config.get(key)!r}; only models of one architecture can be merged"
                )
        for name in ref.names():
            if other.resolve(name) is None:
                raise IncompatibleModelsError(
                    f"tensor {name!r} of {ref.path} is missing from {other.path}; the models do "
                    "not share one architecture (check `num_hidden_layers` and the tensor names)"
                )
            a, b = ref.info(name).shape, other.info(name).shape
            if a != b:
                raise IncompatibleModelsError(
                    f"tensor {name!r} has shape {list(b)} in {other.path} but {list(a)} in "
                    f"{ref.path}; merged models need identical shapes (a resized vocabulary must "
                    "be resized the same way in every model)"
                )
        extra = set(other.names()) - set(ref.names()) - {"lm_head.weight"}
        if extra:
            log.warning(
                "%s has %d tensors that %s lacks; they are ignored (e.g. %s)",
                other.path,
                len(extra),
                ref.path,
                sorted(extra)[0],
            )


def _output_dtype(plan: MergePlan, override: str | None) -> torch.dtype:
    name = override or plan.config.out_dtype or plan.config.dtype
    if name is None:
        stored = [i.dtype for i in plan.reference.tensors.values() if i.dtype.is_floating_point]
        return stored[0] if stored else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"dtype {name!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _resolve_parameters(
    cfg: MergeConfig, method: MergeMethod, entries, names: list[str], num_layers: int
) -> dict[str, dict]:
    known = {config_name(k): k for k in method.defaults}
    allowed = ", ".join(known) or "none"
    for where, params in [("parameters", cfg.parameters)] + [
        (f"parameters of model {e.model}", e.parameters) for e in entries
    ]:
        for key in params:
            if key not in known:
                raise ConfigError(
                    f"{method.name} has no parameter {key!r} (in {where}); allowed: {allowed}"
                )
            if where != "parameters" and known[key] not in method.per_model:
                raise ConfigError(
                    f"{method.name} parameter {key!r} applies to the whole merge; set it in the "
                    f"top-level parameters, not per model ({where})"
                )
    resolved = {}
    for name in names:
        t = layer_position(name, num_layers)
        kwargs = {}
        for cname, key in known.items():
            if key in method.per_model:
                values = []
                for e in entries:
                    v = _lookup(e.parameters, cname, name, t)
                    if v is None:
                        v = _lookup(cfg.parameters, cname, name, t)
                    values.append(_required(v, method, key, name, e.model))
                kwargs[key] = values
            else:
                v = _lookup(cfg.parameters, cname, name, t)
                kwargs[key] = _required(v, method, key, name, None)
        resolved[name] = kwargs
    return resolved


def _lookup(params: dict, key: str, name: str, t: float):
    return evaluate(params[key], name, t) if key in params else None


def _required(value, method: MergeMethod, key: str, name: str, model: str | None):
    if value is not None:
        return value
    default = method.defaults[key]
    if default is REQUIRED:
        where = f" for model {model}" if model else ""
        raise ConfigError(
            f"{method.name} needs parameter {config_name(key)!r}{where} (tensor {name!r}); set it "
            "in `parameters` (top level or per model)"
        )
    return default


PREFETCH = 2  # groups read ahead of, and written behind, the arithmetic


@dataclass
class GroupInput:
    """The raw tensors of one group, as stored: `base` (or None) and one dict per model."""

    names: list[str]
    base: dict[str, torch.Tensor] | None
    models: list[dict[str, torch.Tensor]]
    nbytes: int


def _read_group(plan: MergePlan, names: list[str]) -> GroupInput:
    use_base = plan.base is not None and plan.method.uses_base
    readers = ([plan.base] if use_base else []) + plan.models
    # where a NaN would surely reach the output, the output's check stands in for a pass over
    # the inputs
    check = not plan.method.spreads_nonfinite
    tensors = [{n: _read_finite(c, n) if check else c.read(n) for n in names} for c in readers]
    nbytes = sum(c.info(n).nbytes for c in readers for n in names)
    if use_base:
        return GroupInput(names, tensors[0], tensors[1:], nbytes)
    return GroupInput(names, None, tensors, nbytes)


def _read_finite(ckpt: Checkpoint, name: str) -> torch.Tensor:
    """Read a tensor, refusing NaN/inf: some methods would silently drop them (one fast pass)."""
    t = ckpt.read(name)
    _refuse_nonfinite(ckpt, name, t)
    return t


def _refuse_nonfinite(ckpt: Checkpoint, name: str, t: torch.Tensor) -> None:
    if t.dtype.is_floating_point and not math.isfinite(largest_magnitude(t)):
        raise MergeError(
            f"tensor {name!r} of {ckpt.path} has NaN or inf values; that model is damaged "
            "(re-download or re-save it)"
        )


def _engine_kwargs(plan: MergePlan, key: str, seed: int, diagnostics: list) -> dict:
    method, extra = plan.method, {}
    if "config" in method.engine_args:
        extra["config"] = plan.reference.config
    if "diagnostics" in method.engine_args:
        extra["diagnostics"] = diagnostics
    if "out_dtype" in method.engine_args:
        extra["out_dtype"] = plan.out_dtype
    if "keys" in method.engine_args:
        extra["keys"] = tensor_keys(seed, key, len(plan.models))
    if "name" in method.engine_args:
        extra["name"] = key
    return extra


def _merge_group(
    plan: MergePlan, group: GroupInput, device: torch.device, seed: int, diagnostics: list
) -> dict[str, torch.Tensor]:
    """Merged tensors of one group, in the output dtype, on the CPU, checked finite."""
    names, method = group.names, plan.method
    first = plan.reference.info(names[0])
    if not first.dtype.is_floating_point:
        # integer and bool buffers (none in Llama/Mistral) are not merged: the reference's is kept
        src = group.base if group.base is not None else group.models[0]
        return {names[0]: src[names[0]]}

    def f32(t: torch.Tensor) -> torch.Tensor:
        if method.raw_inputs:  # the method converts chunk by chunk, sparing full-size copies
            return t.to(device=device)
        return t.to(device=device, dtype=torch.float32)

    base = {n: f32(t) for n, t in group.base.items()} if group.base is not None else None
    models = [{n: f32(t) for n, t in m.items()} for m in group.models]
    if method.group:
        extra = _engine_kwargs(plan, names[0], seed, diagnostics)
        extra.pop("name", None)
        out = method.fn(base, models, names=names, **plan.params[names[0]], **extra)
    else:
        out = {
            n: method.fn(
                base[n] if base else None,
                [m[n] for m in models],
                **plan.params[n],
                **_engine_kwargs(plan, n, seed, diagnostics),
            )
            for n in names
        }
    result = {}
    for n in names:
        _check_finite(plan, group, n, out[n])
        result[n] = out[n].to(plan.out_dtype).cpu()
    return result


def _check_finite(plan: MergePlan, group: GroupInput, name: str, merged: torch.Tensor) -> None:
    """Raise if the float32 result has NaN/inf or does not fit the output dtype: naming the
    input that has NaN/inf, if one has (only methods that spread them skip the inputs' check
    when reading)."""
    if largest_magnitude(merged) <= torch.finfo(plan.out_dtype).max:  # False for NaN
        return
    if group.base is not None:
        _refuse_nonfinite(plan.base, name, group.base[name])
    for ckpt, tensors in zip(plan.models, group.models, strict=True):
        _refuse_nonfinite(ckpt, name, tensors[name])
    raise MergeError(
        f"merged tensor {name!r} has non-finite values: the result overflows {plan.out_dtype} "
        "or the parameters are extreme; check the weights, or write float32"
    )


def merge(
    config: MergeConfig | dict | str | Path,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    dtype: str | None = None,
    shard_size: str | int = "5GB",
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Merge the models a config names into a new checkpoint folder `out_dir`; returns it."""
    started = time.time()
    plan = plan_merge(config, dtype)
    try:
        return _merge(plan, out_dir, device, shard_size, seed, overwrite, progress, started)
    finally:
        buffers.release()
        for ckpt in plan.inputs:
            ckpt.close()
        for temp in plan.temp_dirs:
            shutil.rmtree(temp, ignore_errors=True)


def _merge(plan: MergePlan, out_dir, device, shard_size, seed, overwrite, progress, started):
    out = Path(out_dir)
    for ckpt in plan.inputs:
        if out.resolve() == ckpt.path.resolve():
            raise MergeError(f"output folder {out} is an input of the merge; choose another folder")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MergeError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    try:
        max_shard = parse_size(shard_size)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    ref = plan.reference
    layout = [
        (
            n,
            ref.info(n).shape,
            plan.out_dtype if ref.info(n).dtype.is_floating_point else ref.info(n).dtype,
        )
        for n in plan.order
    ]
    readers = plan.inputs if plan.method.uses_base else plan.models
    total_in = sum(c.info(n).nbytes for c in readers for n in plan.order)
    diagnostics: list = []
    with (
        atomic_folder(out, overwrite) as tmp,
        ThreadPoolExecutor(1) as hasher,
        ThreadPoolExecutor(1) as reader,
        ThreadPoolExecutor(1) as writer_thread,
    ):
        # Three things overlap with the arithmetic: hashing the inputs for provenance, reading the
        # next group, writing the previous one (file I/O and hashlib release the GIL).
        hashes = hasher.submit(_hash_inputs, plan)
        writer = ShardWriter(tmp, layout, max_shard)
        groups = plan.groups
        with tqdm(
            total=total_in,
            unit="B",
            unit_scale=True,
            desc=f"merge {plan.method.name}",
            disable=not progress,
        ) as bar:
            # bounded queues: at most PREFETCH groups read ahead and PREFETCH waiting to be written
            reads = deque(reader.submit(_read_group, plan, g) for g in groups[:PREFETCH])
            writes: deque = deque()
            for k in range(len(groups)):
                group = reads.popleft().result()
                if k + PREFETCH < len(groups):
                    reads.append(reader.submit(_read_group, plan, groups[k + PREFETCH]))
                merged = _merge_group(plan, group, dev, seed, diagnostics)
                if len(writes) == PREFETCH:
                    writes.popleft().result()
                writes.append(writer_thread.submit(_write_group, writer, group.names, merged))
                bar.update(group.nbytes)
                bar.set_postfix_str(f"{k + 1}/{len(groups)} groups", refresh=False)
            for w in writes:
                w.result()
        shards = writer.finish()
        _write_metadata(
            plan, tmp, shards, hashes.result(), diagnostics, seed, device, time.time() - started
        )
    log.info("merged %s into %s in %.1f s", plan.method.name, out, time.time() - started)
    return out


def _write_group(writer: ShardWriter, names: list[str], tensors: dict[str, torch.Tensor]) -> None:
    for n in names:
        writer.write(n, tensors[n])


def _hash_inputs(plan: MergePlan) -> list[dict]:
    records = []
    for role, ckpt in [("base", plan.base)] + [("model", m) for m in plan.models]:
        if ckpt is None:
            continue
        files = [
            {"file": f.name, "bytes": f.stat().st_size, "sha256": sha256_file(f)}
            for f in ckpt.files
        ]
        records.append({"role": role, "path": str(ckpt.path.resolve()), "files": files})
    return records


def _tokenizer_folder(plan: MergePlan) -> Path:
    source = plan.config.tokenizer_source
    if source in (None, "base"):
        if source == "base" and plan.base is None:
            raise ConfigError("tokenizer_source: base needs a base_model")
        return plan.reference.path
    if source == "union":
        raise ConfigError("tokenizer_source: union is not supported; use base or a model folder")
    folder = Path(source)
    if not folder.is_dir():
        raise ConfigError(f"tokenizer_source {source} is not a folder")
    return folder


def _write_metadata(plan, folder: Path, shards, inputs, diagnostics, seed, device, seconds):
    config = dict(plan.reference.config)
    dtype_name = str(plan.out_dtype).removeprefix("torch.")
    config["dtype"] = dtype_name
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype_name
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tok = _tokenizer_folder(plan)
    for name in TOKENIZER_FILES:
        if (tok / name).is_file():
            shutil.copy2(tok / name, folder / name)
    for src in (tok, plan.reference.path):
        if (src / "generation_config.json").is_file():
            shutil.copy2(src / "generation_config.json", folder / "generation_config.json")
            break
    (folder / "merge_config.yaml").write_text(plan.config.to_yaml())
    provenance = {
        "medmerge_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "merge_method": plan.method.name,
        "config": plan.config.model_dump(mode="json", exclude_defaults=True),
        "seed": seed,
        "device": device,
        "dtype": dtype_name,
        "seconds": round(seconds, 3),
        "inputs": inputs,
        "output_files": shards,
    }
    (folder / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
    if diagnostics:
        summary = plan.method.summarize(diagnostics) if plan.method.summarize else None
        if summary and "verdict" in summary:
            log.info("%s: %s", plan.method.name, summary["verdict"])
        record = {"merge_method": plan.method.name, "summary": summary, "records": diagnostics}
        (folder / DIAGNOSTICS).write_text(json.dumps(record, indent=2) + "\n")
