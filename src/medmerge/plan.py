"""Planning a merge: everything a merge needs decided, and every check that can fail, before a
tensor is read.

config -> its slices (mergekit's `models:` form is one slice over every layer of each model, the
base added as a source when it is not listed) -> the models they name, opened lazily -> the
output tensors, each with its inputs (which model's which tensor; the method's base first) and
the method's parameters for it -> groups of tensors for the method.

Parameters resolve as in mergekit: a source's own `parameters` (per-model parameters only), then
its slice's, its module's, the config's; a gradient takes the tensor's depth t in its slice
(layer i of n at i / (n - 1), a slice of one layer at 1; embeddings, final norm and head at 0);
a filter matches a substring of the tensor's name.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medmerge import vocab
from medmerge.config import (
    ConditionalParameter,
    InputSlice,
    MergeConfig,
    Parameters,
    ParameterValue,
    load_config,
)
from medmerge.errors import ConfigError, IncompatibleModelsError
from medmerge.io import references
from medmerge.io.checkpoint import Checkpoint
from medmerge.io.metadata import chat_template_of
from medmerge.io.shards import parse_size
from medmerge.methods import REQUIRED, MergeMethod, Param, config_name, get_method
from medmerge.methods.streaming import chunk_rows
from medmerge.models.architectures import (
    EMBEDDING_PATTERN,
    EMBEDDINGS,
    LAYER_INDEX,
    is_vocabulary_tensor,
)
from medmerge.models.chat_templates import chosen_template
from medmerge.vocab import Vocabulary

log = logging.getLogger("medmerge")

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


@dataclass(frozen=True)
class Input:
    """One input of an output tensor: tensor `name` of checkpoint `model` of the plan."""

    model: int
    name: str


@dataclass
class OutputTensor:
    name: str
    inputs: tuple[Input, ...]  # the method's base first when `has_base`, then its models
    has_base: bool
    params: dict  # the method's keyword arguments for this tensor

    @property
    def models(self) -> tuple[Input, ...]:
        return self.inputs[1:] if self.has_base else self.inputs


@dataclass
class MergePlan:
    config: MergeConfig
    method: MergeMethod
    checkpoints: list[Checkpoint]  # every model the merge reads
    base: int | None  # the base_model's index in checkpoints, if there is one
    reference: int  # whose config, tokenizer and layout the output takes
    tensors: dict[str, OutputTensor]  # by output name
    groups: list[list[str]]  # output names, in output order, as the method takes them
    out_dtype: torch.dtype
    out_config: dict  # the output's config.json
    index: dict[str, int]  # each model reference of the config -> its checkpoint's index
    tokenizer: Path  # the folder whose tokenizer files the output gets
    chat_template: str | None  # the output tokenizer's template, where the config sets one
    vocabulary: Vocabulary | None = None  # where the config sets a tokenizer
    sources: list[references.Resolved] = field(default_factory=list)  # per checkpoint
    blocked: dict[str, RowBlocks] = field(default_factory=dict)  # tensors over the budget

    @property
    def order(self) -> list[str]:
        return [n for g in self.groups for n in g]

    @property
    def reference_path(self) -> Path:
        """The folder of the model whose config and layout the output takes."""
        return self.checkpoints[self.reference].path

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of output tensor `name`."""
        return _shape(self, name)

    def __enter__(self) -> MergePlan:
        return self

    def __exit__(self, *exc) -> None:
        for ckpt in self.checkpoints:
            ckpt.close()


@dataclass
class _Slice:
    """An output slice, normalised: its sources (model, layer range, parameters; the layer
    ranges unused where `whole`), its base, and the parameters of the slice, its module and
    the config."""

    sources: list[InputSlice]
    whole: bool  # the `models:` form: every layer of each source, names unchanged
    base: str | None
    settings: list[Parameters]  # slice, module, config: after a source's own


def plan_merge(
    config: MergeConfig | dict | str | Path,
    dtype: str | None = None,
    *,
    strict: bool = False,
    max_memory: str | int | None = None,
) -> MergePlan:
    """Open the inputs and check everything that can fail before a byte is written; decide
    which tensors are merged in row blocks to stay within `max_memory` ('2GB', bytes; default
    `default_max_memory()`).

    >>> plan = plan_merge("merge.yaml", "bfloat16", max_memory="2GB")
    """
    try:
        budget = default_max_memory() if max_memory is None else parse_size(max_memory)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    cfg = load_config(config, strict=strict)
    method = get_method(cfg.merge_method)
    slices = _slices(cfg)
    if method.needs_base and not all(sl.base for sl in slices):
        raise ConfigError(f"merge_method {method.name} needs a base_model (the common ancestor)")
    named = [s.model for sl in slices for s in sl.sources] + [sl.base for sl in slices if sl.base]
    refs = list(dict.fromkeys(named))
    # adapters among the models fold into their own base, else the config's, when asked
    resolved = [references.resolve(ref, fold=cfg.materialize_adapters, fold_into=cfg.base_model)
                for ref in refs]  # fmt: skip
    checkpoints = [Checkpoint(r.path) for r in resolved]  # refuses an adapter with advice
    index = _identities(refs, checkpoints)
    plan = _plan(cfg, method, slices, checkpoints, index, dtype, strict)
    plan.sources = resolved
    plan.blocked = _blocked(plan, budget // SHARE)
    return plan


def _slices(cfg: MergeConfig) -> list[_Slice]:
    """The config's output slices (one module at most: medmerge merges text decoders)."""
    module_params: Parameters = {}
    models, slices = cfg.models, cfg.slices
    if cfg.modules:
        if len(cfg.modules) > 1:
            raise ConfigError(
                f"modules {', '.join(cfg.modules)}: medmerge merges one module (a text decoder); "
                "merge the language model alone, with `models:` or `slices:`"
            )
        (module,) = cfg.modules.values()
        module_params = module.parameters
        models, slices = module.models, module.slices
    settings = [module_params, cfg.parameters]
    if models:
        sources = [InputSlice(model=m.model, layer_range=(0, 0), parameters=m.parameters)
                   for m in models]  # fmt: skip
        if cfg.base_model and not any(_same(m.model, cfg.base_model) for m in models):
            sources.append(InputSlice(model=cfg.base_model, layer_range=(0, 0)))
        return [_Slice(sources, True, cfg.base_model, [{}, *settings])]
    out = []
    for i, sl in enumerate(slices):
        lengths = {s.layer_range[1] - s.layer_range[0] for s in sl.sources}
        if len(lengths) != 1 or min(lengths) <= 0:
            ranges = [list(s.layer_range) for s in sl.sources]
            raise ConfigError(
                f"slices[{i}]: every source needs a layer range of the same, positive length "
                f"(got {ranges})"
            )
        base = sl.base_model or cfg.base_model
        out.append(_Slice(sl.sources, False, base, [sl.parameters, *settings]))
    return out


def _same(a: str, b: str) -> bool:
    """Whether two model references name one folder."""
    return a == b or Path(a).resolve() == Path(b).resolve()


def _identities(refs: list[str], checkpoints: list[Checkpoint]) -> dict[str, int]:
    """Each reference's checkpoint index; two spellings of one folder are one model."""
    index, seen = {}, {}
    for i, (ref, ckpt) in enumerate(zip(refs, checkpoints, strict=True)):
        index[ref] = seen.setdefault(ckpt.path.resolve(), i)
    return index


def _plan(cfg, method, slices, checkpoints, index, dtype, strict) -> MergePlan:
    base = index[cfg.base_model] if cfg.base_model else None
    reference = base if base is not None else index[slices[0].sources[0].model]
    ref = checkpoints[reference]
    _check_architecture(checkpoints, reference)
    tokenizer, vocabulary = _tokenizer(cfg, checkpoints, index, base, reference)
    if cfg.chat_template is not None:  # the output's template is written into its settings
        chat_template_of(tokenizer)
    layouts = _layouts(slices, checkpoints, index, ref)
    tensors: dict[str, OutputTensor] = {}
    known = {config_name(p.name): p for p in method.params}
    _check_parameter_names(cfg, method, known, strict)
    for name, (sl, mapping, t) in layouts.items():
        aligned = vocabulary is not None and is_vocabulary_tensor(name)
        tensors[name] = _output_tensor(method, sl, name, mapping, t, index, checkpoints, known,
                                       aligned)  # fmt: skip
    floats = [
        n for n in tensors if _info(checkpoints, tensors[n].inputs[0]).dtype.is_floating_point
    ]
    others = [[n] for n in tensors if n not in set(floats)]
    if method.group:
        grouped = method.group(floats, ref.config, {n: tensors[n].params for n in floats})
    else:
        grouped = [[n] for n in floats]
    out_config = copy.deepcopy(ref.config)
    if not all(sl.whole for sl in slices):
        layers = [(checkpoints[index[sl.sources[0].model]], layer) for sl in slices
                  for layer in range(*sl.sources[0].layer_range)]  # fmt: skip
        _slice_config(_layer_config(out_config), layers)
    if vocabulary is not None:
        for config in (out_config, out_config.get("text_config")):
            if isinstance(config, dict) and "vocab_size" in config:
                config["vocab_size"] = vocabulary.size
    return MergePlan(cfg, method, checkpoints, base, reference, tensors, grouped + others,
                     _output_dtype(cfg, ref, dtype), out_config, index, tokenizer,
                     _chat_template(cfg.chat_template, checkpoints), vocabulary)  # fmt: skip


# per-layer config lists that name layers by index rather than one entry per layer
LAYER_INDEX_KEYS = ("mlp_only_layers",)


def _layer_config(config: dict) -> dict:
    """The part of a model's config that describes its layers: a multimodal model's
    `text_config`, else the config itself."""
    text = config.get("text_config")
    return text if isinstance(text, dict) and "num_hidden_layers" in text else config


def _slice_config(config: dict, layers: list[tuple[Checkpoint, int]]) -> None:
    """Make `config` (the layers' part, in place) describe output layers `layers` (each a
    source checkpoint and its layer): the layer count, and every per-layer list (`layer_types`,
    `no_rope_layers`, ...: a list of one entry per layer, or of layer indices) taken from
    each output layer's source, so that transformers accepts the stacked model."""
    config["num_hidden_layers"] = len(layers)
    for key in list(config):
        if "layer" not in key or not isinstance(config[key], list):
            continue
        sources = [(_layer_config(c.config).get(key), i) for c, i in layers]
        if all(isinstance(v, list) and len(v) == _num_layers(c) for (v, _), (c, _) in
               zip(sources, layers, strict=True)):  # fmt: skip
            config[key] = [v[i] for v, i in sources]
        elif key in LAYER_INDEX_KEYS and all(isinstance(v, list) for v, _ in sources):
            config[key] = [j for j, (v, i) in enumerate(sources) if i in v]


def _check_architecture(checkpoints: list[Checkpoint], reference: int) -> None:
    ref = checkpoints[reference]
    for other in checkpoints:
        for key in ("model_type", "architectures"):
            if ref.config.get(key) != other.config.get(key):
                raise IncompatibleModelsError(
                    f"{other.path} has {key}={other.config.get(key)!r} but {ref.path} has "
                    f"{ref.config.get(key)!r}; only models of one architecture can be merged"
                )


def _layer_names(ckpt: Checkpoint) -> tuple[list[str], dict[int, list[str]], list[str]]:
    """A checkpoint's tensor names: before the layers, per layer, after the layers."""
    pre, layers, post = [], {}, []
    for name in ckpt.names():
        m = LAYER_INDEX.search(name)
        if m:
            layers.setdefault(int(m.group(1)), []).append(name)
        else:
            (pre if EMBEDDINGS.search(name) else post).append(name)
    return pre, layers, post


def _renamed(name: str, layer: int) -> str:
    m = LAYER_INDEX.search(name)
    return f"{name[: m.start(1)]}{layer}{name[m.end(1) :]}"


def _layouts(slices, checkpoints, index, ref) -> dict[str, tuple[_Slice, dict, float]]:
    """Output name -> (its slice, {source position: its input tensor name}, its depth t)."""
    out: dict[str, tuple[_Slice, dict, float]] = {}
    if slices[0].whole:  # names as the reference has them; layer i of n at i / (n - 1)
        (sl,) = slices
        n = _num_layers(ref)
        for name in ref.names():
            m = LAYER_INDEX.search(name)
            t = int(m.group(1)) / (n - 1) if m and n > 1 else (1.0 if m else 0.0)
            out[name] = (sl, dict.fromkeys(range(len(sl.sources)), name), t)
        return out
    first = checkpoints[index[slices[0].sources[0].model]]
    pre, _, post = _layer_names(first)
    for name in pre:
        out[name] = (slices[0], dict.fromkeys(range(len(slices[0].sources)), name), 0.0)
    layer = 0
    for sl in slices:
        start = sl.sources[0].layer_range[0]
        n = sl.sources[0].layer_range[1] - start
        _, layers, _ = _layer_names(checkpoints[index[sl.sources[0].model]])
        for offset in range(n):
            if start + offset not in layers:
                raise ConfigError(
                    f"slice source {sl.sources[0].model} has no layer {start + offset} "
                    f"(its layers: 0-{max(layers, default=-1)}); fix its layer_range"
                )
            t = offset / (n - 1) if n > 1 else 1.0
            for name in layers[start + offset]:
                inputs = {
                    k: _renamed(name, s.layer_range[0] + offset) for k, s in enumerate(sl.sources)
                }
                out[_renamed(name, layer)] = (sl, inputs, t)
            layer += 1
    for name in post:
        out[name] = (slices[-1], dict.fromkeys(range(len(slices[-1].sources)), name), 0.0)
    return out


def _num_layers(ckpt: Checkpoint) -> int:
    cfg = ckpt.config.get("text_config", ckpt.config)
    if "num_hidden_layers" in cfg:
        return int(cfg["num_hidden_layers"])
    found = [int(m.group(1)) for n in ckpt.names() if (m := LAYER_INDEX.search(n))]
    return max(found, default=0) + 1


def _info(checkpoints: list[Checkpoint], item: Input):
    return checkpoints[item.model].info(item.name)


def _output_tensor(
    method, sl, name, mapping, t, index, checkpoints, known, aligned
) -> OutputTensor:
    """The inputs of output tensor `name` and the method's parameters for it; `aligned`: a row
    per token, mapped to the output vocabulary (row counts may differ)."""
    base = index[sl.base] if sl.base else None
    sources = [(index[s.model], s, mapping[k]) for k, s in enumerate(sl.sources)]
    # the input the others are compared with: the base's where it is one, else the first
    ref_model, ref_name = next(((m, t) for m, _, t in sources if m == base), sources[0][::2])
    ref = checkpoints[ref_model]
    for model, _, stored in sources:
        other = checkpoints[model]
        if other.resolve(stored) is None:
            raise IncompatibleModelsError(
                f"tensor {stored!r} of {ref.path} is missing from {other.path}; the models do "
                "not share one architecture (check `num_hidden_layers`, the tensor names and "
                "the layer ranges)"
            )
        a, b = ref.info(ref_name).shape, other.info(stored).shape
        if (a[1:], len(a)) != (b[1:], len(b)) if aligned else a != b:
            raise IncompatibleModelsError(
                f"tensor {stored!r} has shape {list(b)} in {other.path} but {list(a)} in "
                f"{ref.path}; merged models need identical shapes (a resized vocabulary must "
                "be resized the same way in every model)"
            )
    takes_base = method.uses_base and base is not None and any(m == base for m, _, _ in sources)
    if method.needs_base and not takes_base:
        raise ConfigError(
            f"merge_method {method.name} needs its base_model among the inputs of tensor "
            f"{name!r}; add the base as a source of that slice"
        )
    if takes_base:
        base_source = next(src for src in sources if src[0] == base)
        models = [src for src in sources if src[0] != base]
        ordered = [base_source, *models]
    else:
        models = ordered = sources
    _check_model_count(method, len(models), takes_base)
    if method.inputs and (problem := method.inputs(len(models), takes_base)):
        raise ConfigError(f"merge_method {method.name}: {problem} (tensor {name!r})")
    params = _parameters(method, known, sl, name, t, models)
    if method.check:
        try:
            method.check(params, ref.config)
        except ConfigError as e:
            raise ConfigError(f"{method.name}, tensor {name!r}: {e}") from e
    return OutputTensor(name, tuple(Input(m, s) for m, _, s in ordered), takes_base, params)


def _check_model_count(method: MergeMethod, n: int, with_base: bool) -> None:
    if n < method.min_models or (method.max_models and n > method.max_models):
        want = f"{method.min_models}" + (
            f" to {method.max_models}" if method.max_models != method.min_models else ""
        )
        besides = " besides the base" if with_base else ""
        raise ConfigError(f"merge_method {method.name} takes {want} models{besides}; got {n}")


def _parameters(method, known, sl: _Slice, name: str, t: float, models) -> dict:
    """The method's keyword arguments for one output tensor: shared parameters from the
    slice, module and config; per-model ones from each model's source first."""
    kwargs = {}
    for param in known.values():
        if param.per_model:
            kwargs[param.name] = [
                _resolve(param, [source.parameters, *sl.settings], stored, t, method, source.model)
                for _, source, stored in models
            ]
        else:
            kwargs[param.name] = _resolve(param, sl.settings, name, t, method, None)
    return kwargs


def _resolve(param: Param, settings: list[Parameters], name: str, t: float, method, model):
    for scope in settings:
        if config_name(param.name) in scope:
            value = evaluate(scope[config_name(param.name)], name, t, param)
            if value is not None:
                return param.value(value, _where(method, name, model))
    if param.default is REQUIRED:
        where = f" for model {model}" if model else ""
        raise ConfigError(
            f"{method.name} needs parameter {config_name(param.name)!r}{where} (tensor {name!r}); "
            "set it in `parameters` (top level or per model)"
        )
    return param.default


def _where(method: MergeMethod, name: str, model: str | None) -> str:
    return f"{method.name}, tensor {name!r}" + (f", model {model}" if model else "")


def evaluate(value: ParameterValue, name: str, t: float, param: Param | None = None):
    """A parameter's value for one tensor: a scalar, a gradient over depth (numbers
    interpolate; other values step), or the first `{filter, value}` entry that matches."""
    if isinstance(value, ConditionalParameter):
        value = [value]
    if not isinstance(value, list):
        return value
    if not value:
        return None
    if isinstance(value[0], ConditionalParameter):
        for cond in value:
            if cond.filter in (None, "*") or cond.filter in name:
                return evaluate(cond.value, name, t, param)
        return None
    if param is not None and param.kind in (float, int):
        values = [param.value(v, f"gradient of {config_name(param.name)}") for v in value]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * values[i0] + frac * values[i1]
    return value[int(t * (len(value) - 1))]


def _check_parameter_names(cfg: MergeConfig, method: MergeMethod, known: dict, strict: bool):
    """Warn of (with `strict`, refuse) parameters the method does not have, and per-model
    values of parameters that apply to the whole merge: mergekit ignores both."""
    import difflib

    problems: list[str] = []

    def report(message: str) -> None:
        if strict:
            problems.append(message)
        else:
            log.warning("%s; ignored, as mergekit does", message)

    for where, params, per_source in cfg.parameter_scopes():
        for key, value in params.items():
            if key in known:  # every value checked, also those no tensor ends up using
                _check_values(known[key], value, f"{method.name}, {where}")
            if key not in known:
                near = difflib.get_close_matches(key, list(known), n=1)
                hint = (
                    f"did you mean {near[0]!r}?"
                    if near
                    else f"allowed: {', '.join(known) or 'none'}"
                )
                report(f"{method.name} has no parameter {key!r} (in {where}; {hint})")
            elif per_source and not known[key].per_model:
                report(
                    f"{method.name} parameter {key!r} applies to the whole merge, not per model "
                    f"(in {where}); set it in the top-level parameters"
                )
    if problems:  # every one, so that one run shows them all
        raise ConfigError("; ".join(problems))


def _check_values(param: Param, value: ParameterValue, where: str) -> None:
    if isinstance(value, ConditionalParameter):
        value = [value]
    if isinstance(value, list) and not value:
        raise ConfigError(
            f"{where}: parameter {config_name(param.name)!r} is an empty list; give a value, "
            "or a gradient of one or more"
        )
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, ConditionalParameter):
            _check_values(param, item.value, where)
        else:
            param.value(item, where)


def _tokenizer(cfg: MergeConfig, checkpoints: list[Checkpoint], index, base, reference: int):
    """The folder the output's tokenizer comes from and, where the config sets a tokenizer
    (`tokenizer_source`, or the `tokenizer` block), the output vocabulary the models' rows are
    mapped to. Without one the models must share a vocabulary; the base's (else the first
    model's) tokenizer is copied."""
    block = cfg.tokenizer
    source = block.source if block else cfg.tokenizer_source
    ref = checkpoints[reference]
    embed = next((n for n in ref.names() if EMBEDDING_PATTERN.search(n)), None)
    if source is None or embed is None:
        if embed is not None:
            vocab.check_shared(checkpoints, reference, embed)
        return ref.path, None
    if source == "base" and base is None:
        raise ConfigError("tokenizer_source: base needs a base_model")
    vocabulary, folder = vocab.build(cfg, checkpoints, index, base, reference, embed)
    return folder, vocabulary


def _chat_template(value: str | None, checkpoints: list[Checkpoint]) -> str | None:
    """The output's chat template (the input models' read only for `auto`)."""
    found = [chat_template_of(c.path) for c in checkpoints] if value == "auto" else []
    return chosen_template(value, found)


def _output_dtype(cfg: MergeConfig, ref: Checkpoint, override: str | None) -> torch.dtype:
    name = override or cfg.out_dtype or cfg.dtype
    if name is None:
        stored = [i.dtype for i in ref.tensors.values() if i.dtype.is_floating_point]
        return stored[0] if stored else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"dtype {name!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


# ---- the memory budget: tensors merged in row blocks ----------------------------------------

# a tensor whose inputs and output exceed budget / SHARE is merged in row blocks of about that
# size: PREFETCH groups read ahead, PREFETCH written behind and one merged, plus float32 work
SHARE = 8
Blocks = tuple[tuple[int, int], ...]


def default_max_memory() -> int:
    """The memory budget when none is given: a quarter of the machine's memory."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4


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


def _blocked(plan: MergePlan, share: int) -> dict[str, RowBlocks]:
    """The tensors (and groups' tensors) whose inputs and output exceed `share` bytes, and the
    row blocks each is merged in."""
    blocked = {}
    for group in plan.groups:
        if len(group) > 1:
            blocked |= _group_blocks(plan, group, share)
        elif how := _row_blocks(plan, group[0], share):
            blocked[group[0]] = how
    return blocked
