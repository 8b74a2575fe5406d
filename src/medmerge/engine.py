"""The streaming merge: plan (validate everything up front), then merge group by group and write.

Data flow: config -> `plan.plan_merge` (open checkpoints lazily, check compatibility, map every
output tensor to its inputs, resolve every parameter) -> `merge` (read a group of tensors'
inputs, call the method in float32 on the device, check and cast the result, stream it into the
shard writer) -> metadata and provenance -> atomic rename into OUT_DIR. A file of several
configs (mergekit-multi's) runs them in the order their references need.

Memory: the tensors (or a group method's groups) the plan puts in row blocks to stay within
the memory budget (`MergePlan.blocked`) are read from the shards block by block and written
block by block, with the same result as whole.
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

from medmerge.config import MergeConfig, load_configs, stage_order
from medmerge.errors import ConfigError, MergeError, NonFiniteCosts
from medmerge.io import buffers
from medmerge.io.card import write_provenance
from medmerge.io.checkpoint import Checkpoint, raise_open_files_limit
from medmerge.io.folders import atomic_folder, locked, refuse_output_near, remove_leftovers
from medmerge.io.hashing import input_records
from medmerge.io.metadata import (
    TOKENIZER_FILES,
    copy_files,
    drop_code_references,
    set_chat_template,
    write_config,
)
from medmerge.io.references import local_folders
from medmerge.io.shards import ShardWriter, parse_size
from medmerge.methods import largest_magnitude
from medmerge.methods.rng import tensor_keys
from medmerge.methods.streaming import Blocked
from medmerge.models.architectures import is_vocabulary_tensor
from medmerge.plan import Blocks, MergePlan, RowBlocks, default_max_memory, plan_merge
from medmerge.version import __version__

log = logging.getLogger("medmerge")

DIAGNOSTICS = "merge_diagnostics.json"


PREFETCH = 2  # groups read ahead of, and written behind, the arithmetic


@dataclass
class GroupInput:
    """The raw input tensors of one group, as stored: per output name, its inputs in the plan's
    order (the base first where the method takes one)."""

    names: list[str]
    inputs: dict[str, list[torch.Tensor | Blocked]]
    nbytes: int


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
    copy_tokenizer: bool = True  # the tokenizer's files into the output
    model_card: bool = True  # README.md


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
    copy_tokenizer: bool = True,
    model_card: bool = True,
) -> Path:
    """Merge the models a config names into a new checkpoint folder `out_dir`; returns it.

    `max_memory` ('2GB', bytes; default `default_max_memory()`) bounds the tensor data held at
    once: tensors over an eighth of it are merged in row blocks where the method can.
    A file of several configs (mergekit-multi's) merges each named one into
    `intermediate_dir/NAME` (by default a temporary folder beside `out_dir`, removed at the
    end), where later configs find it by its name, and the final one into `out_dir`.

    >>> medmerge.merge("merge.yaml", "out/merged", dtype="bfloat16", max_memory="2GB")
    """
    try:
        budget = default_max_memory() if max_memory is None else parse_size(max_memory)
        opts = Options(device, dtype, parse_size(shard_size), seed, progress, strict, budget,
                       copy_tokenizer, model_card)  # fmt: skip
    except ValueError as e:
        raise ConfigError(str(e)) from e
    configs = load_configs(config, strict=strict)
    raise_open_files_limit()
    if len(configs) == 1:
        return _merge_one(configs[0], out_dir, overwrite, opts)
    out = Path(os.path.abspath(out_dir))
    order, final = stage_order(configs)
    keep = intermediate_dir is not None
    # no stage may write where any stage reads, before any stage runs
    names = {c.name for c in configs if c.name}
    inputs = local_folders(r for c in configs for r in c.references() if r not in names)
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
                cfg = cfg.with_references(folders)
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


def _merge_one(cfg: MergeConfig, out_dir, overwrite: bool, opts: Options) -> Path:
    started = time.time()
    with plan_merge(cfg, opts.dtype, strict=opts.strict, max_memory=opts.max_memory) as plan:
        try:
            return _merge(plan, out_dir, overwrite, opts, started)
        finally:
            buffers.release()


def _merge(plan: MergePlan, out_dir, overwrite: bool, opts: Options, started: float) -> Path:
    out = Path(out_dir)
    # an input replaced would be deleted: a model, an adapter or model it was folded from, the
    # tokenizer source
    inputs = {c.path for c in plan.checkpoints} | {plan.tokenizer}
    refuse_output_near(out, inputs | {p.path for s in plan.sources for p in s.parts})
    dev, seed = torch.device(opts.device), opts.seed
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MergeError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    blocked = plan.blocked  # tensors and groups over the budget
    layout = []
    total_in = 0
    for n in plan.order:
        inputs = plan.tensors[n].inputs
        info = plan.checkpoints[inputs[0].model].info(inputs[0].name)
        dtype = plan.out_dtype if info.dtype.is_floating_point else info.dtype
        layout.append((n, plan.shape(n), dtype))
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
        hashes = hasher.submit(input_records, plan.checkpoints, plan.sources, plan.base)
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
        _write_metadata(plan, tmp, shards, hashes.result(), diagnostics, run, opts)
    log.info("merged %s into %s in %.1f s", plan.method.name, out, time.time() - started)
    return out


def _write_metadata(plan, folder: Path, shards, inputs, diagnostics, run: dict, opts: Options):
    """config, tokenizer (unless `opts.copy_tokenizer` is off), generation config, merge
    config, provenance, model card (unless `opts.model_card` is off) and diagnostics into
    `folder`, the output's temporary folder."""
    dtype_name = str(plan.out_dtype).removeprefix("torch.")
    write_config(folder, plan.out_config, dtype_name)
    if opts.copy_tokenizer and plan.vocabulary is not None and plan.vocabulary.rebuilt:
        plan.vocabulary.tokenizer.save_pretrained(folder)
    elif opts.copy_tokenizer:
        copy_files(folder, TOKENIZER_FILES, [plan.tokenizer])
    if opts.copy_tokenizer and plan.chat_template is not None:
        set_chat_template(folder, plan.chat_template)
    copy_files(folder, ["generation_config.json"], [plan.tokenizer, plan.reference_path])
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
    write_provenance(folder, provenance, plan.config.to_yaml(), run["name"], opts.model_card)
    if diagnostics:
        summary = plan.method.summarize(diagnostics) if plan.method.summarize else None
        if summary and "verdict" in summary:
            log.info("%s: %s", plan.method.name, summary["verdict"])
        record = {"merge_method": plan.method.name, "summary": summary, "records": diagnostics}
        (folder / DIAGNOSTICS).write_text(json.dumps(record, indent=2) + "\n")
