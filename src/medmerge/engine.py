"""The streaming merge: plan (validate everything up front), then merge group by group and write.

Data flow: config -> `plan.plan_merge` (open checkpoints lazily, check compatibility, map every
output tensor to its inputs, resolve every parameter) -> `merge` (read a group of tensors'
inputs, call the method in float32 on the device, check and cast the result, stream it into the
shard writer) -> metadata and provenance -> atomic rename into OUT_DIR. A file of several
configs (mergekit-multi's) runs them in the order their references need.

Memory: a tensor (or a group method's group) whose inputs and output take more than an eighth
of the memory budget (`max_memory`) is merged in row blocks where its method can
(`MergeMethod.rows`, `.streams`): read from the shards block by block and written block by
block, with the same result as whole.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from tqdm.auto import tqdm

from medmerge.config import MergeConfig, load_configs, plain_name
from medmerge.errors import ConfigError, MergeError, NonFiniteCosts
from medmerge.io import buffers
from medmerge.io.card import model_card
from medmerge.io.checkpoint import (
    TOKENIZER_FILES,
    Checkpoint,
    ShardWriter,
    atomic_folder,
    drop_code_references,
    locked,
    metadata_file,
    parse_size,
    raise_open_files_limit,
    refuse_output_near,
    remove_leftovers,
)
from medmerge.io.hashing import sha256_file
from medmerge.io.references import local_folders
from medmerge.methods import largest_magnitude
from medmerge.methods.rng import tensor_keys
from medmerge.methods.streaming import Blocked, chunk_rows
from medmerge.plan import MergePlan, plan_merge
from medmerge.version import __version__
from medmerge.vocab import is_vocabulary_tensor

log = logging.getLogger("medmerge")

PROVENANCE = "medmerge_provenance.json"
DIAGNOSTICS = "merge_diagnostics.json"


PREFETCH = 2  # groups read ahead of, and written behind, the arithmetic
# a tensor whose inputs and output exceed budget / SHARE is merged in row blocks of about that
# size: PREFETCH groups read ahead, PREFETCH written behind and one merged, plus float32 work
SHARE = 8
Blocks = tuple[tuple[int, int], ...]


def default_max_memory() -> int:
    """The memory budget when none is given: a quarter of the machine's memory."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4


@dataclass
class GroupInput:
    """The raw input tensors of one group, as stored: per output name, its inputs in the plan's
    order (the base first where the method takes one)."""

    names: list[str]
    inputs: dict[str, list[torch.Tensor | Blocked]]
    nbytes: int


@dataclass(frozen=True)
class RowBlocks:
    """How a tensor over the memory budget is merged: `mode` "rows" (the method called on each
    block) or "streams" (the method given `Blocked` inputs), in these row blocks."""

    mode: str
    blocks: Blocks


def _row_blocks(plan: MergePlan, name: str, budget: int) -> RowBlocks | None:
    """How tensor `name` is merged in row blocks of about `budget` bytes of inputs, output and
    float32 work, where it exceeds that and the method can; None: whole. A method given the
    blocks (`streams`) works through them on the CPU whatever the merge's device (so a GPU's
    memory is bounded too); one called per block, on the merge's device."""
    method, tensor = plan.method, plan.tensors[name]
    if not _blockable(plan, name) or _stored_bytes(plan, name) <= budget:
        return None
    shape = _shape(plan, name)
    if shape[0] < 2:
        return None
    chunk_row = method.streams(tensor.params, shape) if method.streams else None
    if chunk_row:  # blocks of whole chunks, as the method works through the whole tensor
        return RowBlocks("streams", _blocks(plan, name, chunk_rows(shape, chunk_row), budget))
    if method.rows and not method.group and method.rows(tensor.params, shape):
        return RowBlocks("rows", _blocks(plan, name, 1, budget))
    return None


def _group_blocks(plan: MergePlan, names: list[str], budget: int) -> dict[str, RowBlocks]:
    """Row blocks of every tensor of a group of a group method that takes `Blocked` inputs
    (`streams`, on the CPU whatever the merge's device), where the group's inputs and outputs
    exceed `budget` bytes: each in blocks of about that; none: the group is merged whole."""
    method = plan.method
    if not method.streams or not all(_blockable(plan, n) for n in names):
        return {}
    if sum(_stored_bytes(plan, n) for n in names) <= budget:
        return {}
    found = {}
    for n in names:
        shape = _shape(plan, n)
        if not (chunk_row := method.streams(plan.tensors[n].params, shape)):
            return {}
        found[n] = RowBlocks("streams", _blocks(plan, n, chunk_rows(shape, chunk_row), budget))
    return found


def _blockable(plan: MergePlan, name: str) -> bool:
    """Whether tensor `name` can be merged in row blocks: merged (not copied) floats."""
    tensor = plan.tensors[name]
    info = plan.checkpoints[tensor.inputs[0].model].info(tensor.inputs[0].name)
    return len(info.shape) > 0 and bool(tensor.models) and info.dtype.is_floating_point


def _shape(plan: MergePlan, name: str) -> tuple[int, ...]:
    """The shape of output tensor `name` (a vocabulary tensor's rows: the output vocabulary's)."""
    item = plan.tensors[name].inputs[0]
    shape = tuple(plan.checkpoints[item.model].info(item.name).shape)
    if plan.vocabulary is not None and is_vocabulary_tensor(name):
        return (plan.vocabulary.size, *shape[1:])
    return shape


def _stored_bytes(plan: MergePlan, name: str) -> int:
    """Bytes of tensor `name`'s inputs and output, as stored."""
    infos = [plan.checkpoints[i.model].info(i.name) for i in plan.tensors[name].inputs]
    return sum(i.nbytes for i in infos) + math.prod(_shape(plan, name)) * plan.out_dtype.itemsize


def _blocks(plan: MergePlan, name: str, step: int, budget: int) -> Blocks:
    """Row blocks of tensor `name`, each a multiple of `step` rows, of about `budget` bytes of
    inputs, output and float32 work."""
    infos = [plan.checkpoints[i.model].info(i.name) for i in plan.tensors[name].inputs]
    shape = _shape(plan, name)
    row = math.prod(shape[1:])
    stored = sum(i.dtype.itemsize for i in infos) + plan.out_dtype.itemsize
    per_row = row * (stored + 4 * (len(infos) + 2))  # float32 copies and results, at most
    rows = max(step, budget // per_row // step * step)
    return tuple((r, min(r + rows, shape[0])) for r in range(0, shape[0], rows))


def _blocked_input(plan: MergePlan, item, blocks: Blocks, check: bool) -> Blocked:
    ckpt = plan.checkpoints[item.model]
    info = ckpt.info(item.name)
    # other rows, read by group methods for their alignment costs: not checked here (a NaN
    # makes the costs NaN, `NonFiniteCosts`, and `_merge_group` then checks the blocks)
    read = Blocked(info.shape, info.dtype, blocks, lambda k: ckpt.read(item.name, blocks[k]),
                   lambda a, b: ckpt.read(item.name, (a, b)))  # fmt: skip
    return _checked(ckpt, item.name, read) if check else read


def _checked(ckpt: Checkpoint, name: str, t: Blocked) -> Blocked:
    """`t` whose blocks are refused where they hold NaN or inf (naming tensor `name` of
    `ckpt`)."""

    def get(k: int) -> torch.Tensor:
        block = t.get(k)
        _refuse_nonfinite(ckpt, name, block)
        return block

    return dataclasses.replace(t, get=get)


def _read_group(plan: MergePlan, names: list[str], blocked: dict[str, RowBlocks]) -> GroupInput:
    # where a NaN would surely reach the output, the output's check stands in for a pass over
    # the inputs
    check = not plan.method.spreads_nonfinite
    inputs, nbytes = {}, 0
    for n in names:
        read, items = [], plan.tensors[n].inputs
        vocabulary = plan.vocabulary is not None and is_vocabulary_tensor(n)
        for item in items:
            ckpt = plan.checkpoints[item.model]
            if n in blocked and vocabulary:  # rows read where the output's rows need them
                rows = ((0, ckpt.info(item.name).shape[0]),)
                read.append(_blocked_input(plan, item, rows, False))
            elif n in blocked:  # read block by block as it is merged
                read.append(_blocked_input(plan, item, blocked[n].blocks, check))
                if len(names) > 1:  # a group method reads parts of it out of order first
                    ckpt.advise(item.name)
            else:
                read.append(_read_finite(ckpt, item.name) if check else ckpt.read(item.name))
            nbytes += ckpt.info(item.name).nbytes
        if vocabulary and n in blocked:
            aligned = plan.vocabulary.align([i.model for i in items], read, blocked[n].blocks)
            read = [_checked(plan.checkpoints[item.model], item.name, t) if check else t
                    for item, t in zip(items, aligned, strict=True)]  # fmt: skip
        elif vocabulary:
            read = plan.vocabulary.align([i.model for i in items], read)
        inputs[n] = read
    return GroupInput(names, inputs, nbytes)


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
        extra["config"] = plan.out_config
    if "diagnostics" in method.engine_args:
        extra["diagnostics"] = diagnostics
    if "out_dtype" in method.engine_args:
        extra["out_dtype"] = plan.out_dtype
    if "keys" in method.engine_args:
        extra["keys"] = tensor_keys(seed, key, len(plan.tensors[key].models))
    if "name" in method.engine_args:
        extra["name"] = key
    return extra


def _merge_group(
    plan: MergePlan,
    group: GroupInput,
    device: torch.device,
    seed: int,
    diagnostics: list,
    blocked: dict[str, RowBlocks],
) -> dict[str, torch.Tensor | Blocked]:
    """Merged tensors of one group, in the output dtype, on the CPU, checked finite; those
    merged in row blocks as `Blocked`, whose blocks are computed, checked and cast as they are
    written."""
    names, method = group.names, plan.method
    if not group.inputs[names[0]][0].dtype.is_floating_point:
        # integer and bool buffers (none in Llama/Mistral) are not merged: the first input's
        # (the base's, where the method takes one) is kept
        return {names[0]: group.inputs[names[0]][0]}
    if method.group:
        inputs = {n: [_to_device(plan, t, device) for t in group.inputs[n]] for n in names}
        has_base = plan.tensors[names[0]].has_base
        base = {n: inputs[n][0] for n in names} if has_base else None
        models = [
            {n: inputs[n][i] for n in names} for i in range(int(has_base), len(inputs[names[0]]))
        ]
        extra = _engine_kwargs(plan, names[0], seed, diagnostics)
        extra.pop("name", None)
        try:
            out = method.fn(base, models, names=names, **plan.tensors[names[0]].params, **extra)
        except NonFiniteCosts as e:  # an input read in parts has NaN or inf: name it
            for n in e.names:
                for t in group.inputs[n]:
                    if isinstance(t, Blocked):
                        for k in range(len(t.blocks)):
                            t.get(k)
            raise
    else:
        out = {
            n: _merge_tensor(plan, n, group.inputs[n], device, seed, diagnostics, blocked.get(n))
            for n in names
        }
    result = {}
    for n in names:
        if isinstance(out[n], Blocked):
            result[n] = out[n]
            continue
        _check_finite(plan, n, out[n], lambda n=n: group.inputs[n])
        result[n] = out[n].to(plan.out_dtype).cpu()
    return result


def _to_device(plan: MergePlan, t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """An input as the method takes it: on the device, in float32 unless it converts chunk by
    chunk itself (`raw_inputs`)."""
    if isinstance(t, Blocked):
        return t
    if plan.method.raw_inputs:
        return t.to(device=device)
    return t.to(device=device, dtype=torch.float32)


def _merge_tensor(plan, name, inputs, device, seed, diagnostics, how: RowBlocks | None):
    """The method's result for one tensor: a tensor, or `Blocked` where it is merged in row
    blocks (the method's own, given `Blocked` inputs; or the method called block by block)."""
    if how is not None and how.mode == "rows":

        def block(k: int) -> torch.Tensor:
            return _merge_tensor(plan, name, [t.get(k) for t in inputs], device, seed,
                                 diagnostics, None)  # fmt: skip

        return Blocked(inputs[0].shape, plan.out_dtype, how.blocks, block)
    if how is None:
        inputs = [_to_device(plan, t, device) for t in inputs]
    has_base = plan.tensors[name].has_base
    return plan.method.fn(
        inputs[0] if has_base else None,
        inputs[int(has_base) :],
        **plan.tensors[name].params,
        **_engine_kwargs(plan, name, seed, diagnostics),
    )


def _parts(plan: MergePlan, group: GroupInput, merged: dict):
    """(name, tensor, whether it is a row block, share of the group's input bytes) to write:
    the merged tensors, and those merged in row blocks block by block (computed, checked and
    cast here, one at a time)."""
    for n in group.names:
        out = merged[n]
        if not isinstance(out, Blocked):
            yield n, out, False, 1 / len(group.names)
            continue
        inputs = group.inputs[n]
        for k, (start, stop) in enumerate(out.blocks):
            block = out.get(k)
            _check_finite(plan, n, block, lambda k=k, inputs=inputs: [t.get(k) for t in inputs])
            share = (stop - start) / out.shape[0] / len(group.names)
            yield n, block.to(plan.out_dtype).cpu(), True, share


def _check_finite(plan: MergePlan, name: str, merged: torch.Tensor, inputs) -> None:
    """Raise if the float32 result has NaN/inf or does not fit the output dtype: naming the
    input that has NaN/inf, if one has (only methods that spread them skip the inputs' check
    when reading; `inputs()` gives those the result came from)."""
    if largest_magnitude(merged) <= torch.finfo(plan.out_dtype).max:  # False for NaN
        return
    for item, tensor in zip(plan.tensors[name].inputs, inputs(), strict=True):
        _refuse_nonfinite(plan.checkpoints[item.model], item.name, tensor)
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
    strict: bool = False,
    intermediate_dir: str | Path | None = None,
    max_memory: str | int | None = None,
) -> Path:
    """Merge the models a config names into a new checkpoint folder `out_dir`; returns it.

    `max_memory` ('2GB', bytes; default `default_max_memory()`) bounds the tensor data held at
    once: tensors over an eighth of it are merged in row blocks where the method can.
    A file of several configs (mergekit-multi's) merges each named one into
    `intermediate_dir/NAME` (by default a temporary folder beside `out_dir`, removed at the
    end), where later configs find it by its name, and the final one into `out_dir`."""
    try:
        budget = default_max_memory() if max_memory is None else parse_size(max_memory)
        opts = Options(device, dtype, parse_size(shard_size), seed, progress, strict, budget)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    configs = load_configs(config, strict=strict)
    raise_open_files_limit()
    if len(configs) == 1:
        return _merge_one(configs[0], out_dir, overwrite, opts)
    out = Path(os.path.abspath(out_dir))
    order, final = _stages(configs)
    keep = intermediate_dir is not None
    # no stage may write where any stage reads, before any stage runs
    names = {c.name for c in configs if c.name}
    inputs = local_folders(r for c in configs for r in _references(c) if r not in names)
    refuse_output_near(out, inputs)
    if keep:
        refuse_output_near(intermediate_dir, inputs, "--intermediate-dir")
    out.parent.mkdir(parents=True, exist_ok=True)
    with locked(out):  # the stages' temporary folder is this output's, swept under its lock
        remove_leftovers(out)
        parts = (
            Path(intermediate_dir)
            if keep
            else Path(tempfile.mkdtemp(prefix=f".{out.name}.parts-", dir=out.parent))
        )
        try:
            folders: dict[str, str] = {}
            for cfg in order:
                cfg = _with_models(cfg, folders)
                target = out if cfg is final or cfg.name == final.name else parts / cfg.name
                log.info("merge stage %s -> %s", cfg.name or "(final)", target)
                replace = overwrite or (target != out and not keep)  # a temporary folder's own
                _merge_one(cfg, target, replace, opts)
                if cfg.name:
                    folders[cfg.name] = str(target)
        finally:
            if not keep:
                shutil.rmtree(parts, ignore_errors=True)
    return out


def _stages(configs: list[MergeConfig]) -> tuple[list[MergeConfig], MergeConfig]:
    """The configs in an order where each comes after those it names as models, and the final
    one: the one without a name, else the one no other names."""
    for c in configs:
        if c.name:
            try:  # the folder its merge is written to
                plain_name(c.name)
            except ValueError as e:
                raise ConfigError(f"a multi-document merge config's name {e}") from e
    names = {c.name for c in configs if c.name}
    unnamed = [c for c in configs if not c.name]
    if len(unnamed) > 1 or len(names) != len(configs) - len(unnamed):
        raise ConfigError("a multi-document merge config needs a unique name for every "
                          "document but at most one (the final merge)")  # fmt: skip
    needs = {id(c): {r for r in _references(c) if r in names} for c in configs}
    used = set().union(*needs.values())
    final = unnamed[0] if unnamed else None
    if final is None:
        last = [c for c in configs if c.name not in used]
        if len(last) != 1:
            raise ConfigError(
                "a multi-document merge config needs one final merge: leave its name out, or "
                f"let exactly one document be used by no other (unused: {[c.name for c in last]})"
            )
        final = last[0]
    order, done = [], set()
    while len(order) < len(configs):
        ready = [c for c in configs if c not in order and needs[id(c)] <= done]
        if not ready:
            raise ConfigError("the documents of the merge config name each other in a cycle")
        order.extend(ready)
        done |= {c.name for c in ready if c.name}
    return order, final


def _references(cfg: MergeConfig) -> set[str]:
    refs = {cfg.base_model, cfg.tokenizer_source}
    refs |= {m.model for m in cfg.models or []}
    for sl in cfg.slices or []:
        refs |= {sl.base_model} | {s.model for s in sl.sources}
    for module in (cfg.modules or {}).values():
        refs |= {m.model for m in module.models or []}
        for sl in module.slices or []:
            refs |= {sl.base_model} | {s.model for s in sl.sources}
    return {r for r in refs if r}


def _with_models(cfg: MergeConfig, folders: dict[str, str]) -> MergeConfig:
    """`cfg` with every model reference that names an earlier stage replaced by its folder."""
    if not folders:
        return cfg

    def swap(node):
        if isinstance(node, dict):
            return {
                k: folders.get(v, v)
                if k in ("model", "base_model", "tokenizer_source") and isinstance(v, str)
                else swap(v)
                for k, v in node.items()
            }
        if isinstance(node, list):
            return [swap(v) for v in node]
        return node

    return MergeConfig.model_validate(swap(cfg.model_dump(exclude_defaults=True)))


@dataclass(frozen=True)
class Options:
    """How to merge (the same for every stage of a multi-document config)."""

    device: str
    dtype: str | None  # output dtype, over the config's
    shard_size: int  # bytes
    seed: int
    progress: bool
    strict: bool
    max_memory: int  # bytes


def _merge_one(cfg: MergeConfig, out_dir, overwrite: bool, opts: Options) -> Path:
    started = time.time()
    plan = plan_merge(cfg, opts.dtype, strict=opts.strict)
    try:
        return _merge(plan, out_dir, overwrite, opts, started)
    finally:
        buffers.release()
        for ckpt in plan.checkpoints:
            ckpt.close()


def _merge(plan: MergePlan, out_dir, overwrite: bool, opts: Options, started: float) -> Path:
    out = Path(out_dir)
    # an input replaced would be deleted: a model, an adapter or model it was folded from, the
    # tokenizer source
    inputs = {c.path for c in plan.checkpoints} | {plan.tokenizer}
    refuse_output_near(out, inputs | {p.path for s in plan.sources for p in s.parts})
    dev, seed = torch.device(opts.device), opts.seed
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MergeError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    # tensors and groups over the budget
    share, blocked = opts.max_memory // SHARE, {}
    for group in plan.groups:
        if len(group) > 1:
            blocked |= _group_blocks(plan, group, share)
        elif how := _row_blocks(plan, group[0], share):
            blocked[group[0]] = how
    layout = []
    total_in = 0
    for n in plan.order:
        inputs = plan.tensors[n].inputs
        info = plan.checkpoints[inputs[0].model].info(inputs[0].name)
        dtype = plan.out_dtype if info.dtype.is_floating_point else info.dtype
        layout.append((n, _shape(plan, n), dtype))
        total_in += sum(plan.checkpoints[i.model].info(i.name).nbytes for i in inputs)
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
        writer = ShardWriter(tmp, layout, opts.shard_size)
        groups = plan.groups
        with tqdm(
            total=total_in,
            unit="B",
            unit_scale=True,
            desc=f"merge {plan.method.name}",
            disable=not opts.progress,
        ) as bar:
            # bounded queues: at most PREFETCH groups read ahead and PREFETCH tensors (or row
            # blocks) waiting to be written
            reads = deque(reader.submit(_read_group, plan, g, blocked) for g in groups[:PREFETCH])
            writes: deque = deque()
            for k in range(len(groups)):
                group = reads.popleft().result()
                if k + PREFETCH < len(groups):
                    reads.append(reader.submit(_read_group, plan, groups[k + PREFETCH], blocked))
                merged = _merge_group(plan, group, dev, seed, diagnostics, blocked)
                for name, tensor, rows, share in _parts(plan, group, merged):
                    if len(writes) == PREFETCH:
                        writes.popleft().result()
                    writes.append(writer_thread.submit(writer.write, name, tensor, rows))
                    bar.update(round(group.nbytes * share))
                bar.set_postfix_str(f"{k + 1}/{len(groups)} groups", refresh=False)
            for w in writes:
                w.result()
        shards = writer.finish()
        run = {
            "seed": seed,
            "device": opts.device,
            "seconds": time.time() - started,
            "name": out.name,
        }
        _write_metadata(plan, tmp, shards, hashes.result(), diagnostics, run)
    log.info("merged %s into %s in %.1f s", plan.method.name, out, time.time() - started)
    return out


def set_chat_template(folder: Path, template: str) -> None:
    """Give the tokenizer in `folder` this chat template (in both places transformers reads)."""
    (folder / "chat_template.jinja").write_text(template)
    config = folder / "tokenizer_config.json"
    data = json.loads(config.read_text()) if config.is_file() else {}
    data["chat_template"] = template
    config.write_text(json.dumps(data, indent=2) + "\n")


def _hash_inputs(plan: MergePlan) -> list[dict]:
    records = []
    order = sorted(range(len(plan.checkpoints)), key=lambda i: i != plan.base)  # base first
    for i in order:
        ckpt = plan.checkpoints[i]
        role = "base" if i == plan.base else "model"
        files = [
            {"file": f.name, "bytes": f.stat().st_size, "sha256": sha256_file(f)}
            for f in ckpt.files
        ]
        source = plan.sources[i].record() if plan.sources else {}
        records.append({"role": role, **source, "path": str(ckpt.path.resolve()), "files": files})
    return records


def _write_metadata(plan, folder: Path, shards, inputs, diagnostics, run: dict):
    """config, tokenizer, generation config, merge config, provenance, model card and
    diagnostics into `folder`, the output's temporary folder."""
    config = dict(plan.out_config)
    dtype_name = str(plan.out_dtype).removeprefix("torch.")
    config["dtype"] = dtype_name
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype_name
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tok = plan.tokenizer
    if plan.vocabulary is not None and plan.vocabulary.rebuilt:
        plan.vocabulary.tokenizer.save_pretrained(folder)
    else:
        for name in TOKENIZER_FILES:
            if found := metadata_file(tok, name):
                shutil.copy2(found, folder / name)
    if plan.chat_template is not None:
        set_chat_template(folder, plan.chat_template)
    for src in (tok, plan.checkpoints[plan.reference].path):
        if found := metadata_file(src, "generation_config.json"):
            shutil.copy2(found, folder / "generation_config.json")
            break
    drop_code_references(folder)
    (folder / "merge_config.yaml").write_text(plan.config.to_yaml())
    provenance = {
        "medmerge_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "merge_method": plan.method.name,
        "config": plan.config.model_dump(mode="json", exclude_defaults=True),
        "seed": run["seed"],
        "device": run["device"],
        "dtype": dtype_name,
        "seconds": round(run["seconds"], 3),
        "inputs": inputs,
        "output_files": shards,
    }
    (folder / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
    card = model_card(provenance, plan.config.to_yaml(), run["name"])
    (folder / "README.md").write_text(card)
    if diagnostics:
        summary = plan.method.summarize(diagnostics) if plan.method.summarize else None
        if summary and "verdict" in summary:
            log.info("%s: %s", plan.method.name, summary["verdict"])
        record = {"merge_method": plan.method.name, "summary": summary, "records": diagnostics}
        (folder / DIAGNOSTICS).write_text(json.dumps(record, indent=2) + "\n")
