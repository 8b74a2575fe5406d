"""Merge configs: mergekit's YAML schema, validated by pydantic.

```yaml
merge_method: task_arithmetic
base_model: path/to/base
models:                           # or `slices:` (layer ranges), or `modules:` (one module)
  - model: path/to/parent_a
    parameters: {weight: 0.5}
  - model: path/to/parent_b
    parameters: {weight: 0.5}
parameters: {normalize: false}    # apply to every model unless a model sets its own
dtype: bfloat16                   # output dtype (`out_dtype` wins if both are given)
tokenizer_source: base            # base, union, or a model: the output's vocabulary
materialize_adapters: false       # true: fold PEFT LoRA adapters among the models first
```

A model is a local folder, a Hub ID `org/name` or `org/name@revision`, `MODEL+ADAPTER` (a LoRA
adapter folded into MODEL), or mergekit's `{model: {path, revision}, lora: {path, revision}}`.

A parameter value is a number (or bool/string), a gradient (a list of values interpolated over
the layers, as in mergekit), a `{filter, value}` entry, or a list of them, where the first whose
`filter` is a substring of the tensor name (or absent, or "*") applies.

A key the schema does not know is reported with the nearest known one: a warning, or with
`strict` an error. A file may hold several YAML documents, each with a `name`, later documents
using earlier ones as models (as mergekit-multi does): `load_configs` reads them all.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from medmerge.errors import ConfigError
from medmerge.io.references import reference_string

log = logging.getLogger("medmerge")

Scalar = bool | int | float | str
# a model: a folder, `org/name[@revision]`, `MODEL+ADAPTER`, or mergekit's {model, lora} form
Reference = Annotated[str, BeforeValidator(reference_string)]
DType = Literal["float32", "float16", "bfloat16", "float64"]
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}")


def plain_name(value: str) -> str:
    """A name medmerge makes a file or folder name of: letters, digits and `_.+-`, never a path
    (`../x`, `/x`) or a hidden file (`.x`)."""
    if not PLAIN_NAME.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a plain name: use letters, digits and _ . + - (at most 100, "
            "starting with a letter or digit); it becomes a file or folder name"
        )
    return value


Name = Annotated[str, AfterValidator(plain_name)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ConditionalParameter(Strict):
    filter: str | None = None
    value: Scalar | list[Scalar]


ParameterValue = Scalar | list[Scalar] | ConditionalParameter | list[ConditionalParameter]
Parameters = dict[str, ParameterValue]


class InputModel(Strict):
    model: Reference
    parameters: Parameters = {}


class InputSlice(Strict):
    """Layers `layer_range` = [start, end) of one model."""

    model: Reference
    layer_range: tuple[int, int]
    parameters: Parameters = {}


class OutputSlice(Strict):
    """A run of output layers merged from one layer range of each source (ranges of equal
    length); `base_model` overrides the config's for this slice."""

    sources: list[InputSlice]
    base_model: Reference | None = None
    residual_weight: float | None = None  # accepted as mergekit does, which ignores it
    parameters: Parameters = {}


class OutputModule(Strict):
    slices: list[OutputSlice] | None = None
    models: list[InputModel] | None = None
    parameters: Parameters = {}


class ZeroEmbedding(Strict):
    """A token's embedding: zeros."""

    kind: Literal["zero"]


class ModelTokenEmbedding(Strict):
    """A token's embedding: model `model`'s row of `token`, or its row `token_id`."""

    kind: Literal["model_token"]
    model: str
    token: str | None = None
    token_id: Annotated[int, Field(strict=True, ge=0)] | None = None

    @model_validator(mode="after")
    def _one_token(self):
        if (self.token is None) == (self.token_id is None):
            raise ValueError("give token or token_id (one of them)")
        return self


class TokenEmbedding(Strict):
    source: str | ZeroEmbedding | ModelTokenEmbedding | None = None
    force: bool = False


class TokenizerConfig(Strict):
    source: Reference = "union"
    tokens: dict[str, TokenEmbedding] | None = None
    pad_to_multiple_of: Annotated[int, Field(strict=True, ge=1, le=65536)] | None = None


class MergeConfig(Strict):
    merge_method: str
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    modules: dict[str, OutputModule] | None = None
    base_model: Reference | None = None
    parameters: Parameters = {}
    dtype: DType | None = None
    out_dtype: DType | None = None
    tokenizer_source: Reference | None = None
    tokenizer: TokenizerConfig | None = None
    chat_template: str | None = None
    name: str | None = None  # a document's name in a multi-document file (`plain_name`)
    materialize_adapters: bool = False  # fold LoRA adapter entries into their base on the fly

    @model_validator(mode="before")
    @classmethod
    def _dtype_names(cls, data):
        """`torch.bfloat16` is mergekit's spelling too."""
        if isinstance(data, dict):
            for key in ("dtype", "out_dtype"):
                if isinstance(data.get(key), str):
                    data = {**data, key: data[key].removeprefix("torch.")}
        return data

    @model_validator(mode="after")
    def _one_layout(self):
        given = [k for k in ("models", "slices", "modules") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                "exactly one of models, slices or modules must be given, not "
                + (" and ".join(given) or "none")
            )
        if self.tokenizer_source and self.tokenizer:
            raise ValueError("give tokenizer_source or a tokenizer block, not both")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_defaults=True), sort_keys=False)

    def references(self) -> set[str]:
        """Every model the config names: models, slice sources, base models, the tokenizer
        source and the models of `tokenizer.tokens` entries."""
        found: set[str] = set()
        _walk_references(self.model_dump(exclude_defaults=True), lambda r: found.add(r) or r)
        return found

    def with_references(self, folders: dict[str, str]) -> MergeConfig:
        """The config with each model reference in `folders` replaced by its folder."""
        swapped = _walk_references(self.model_dump(exclude_defaults=True),
                                   lambda r: folders.get(r, r))  # fmt: skip
        return MergeConfig.model_validate(swapped)

    def parameter_scopes(self):
        """(where, parameters, whether per model) for every `parameters` of the config."""
        yield "parameters", self.parameters, False
        for m in self.models or []:
            yield f"parameters of model {m.model}", m.parameters, True
        modules = list((self.modules or {}).items())
        layouts = [("", self.slices or [])] + [
            (f"modules.{k}.", m.slices or []) for k, m in modules
        ]
        for name, module in modules:
            yield f"modules.{name}.parameters", module.parameters, False
            for m in module.models or []:
                yield f"parameters of model {m.model}", m.parameters, True
        for prefix, slices in layouts:
            for i, sl in enumerate(slices):
                yield f"{prefix}slices[{i}].parameters", sl.parameters, False
                for s in sl.sources:
                    yield f"{prefix}slices[{i}] source {s.model}", s.parameters, True


# keys whose string values name a model (`source` as a tokenizer's or a token's); the
# tokenizer sources `union` and `base` are settings, not models
REFERENCE_KEYS = ("model", "base_model", "tokenizer_source", "source")


def _walk_references(node, visit):
    """`node` (a dumped config) with `visit(reference)` in place of every model reference;
    parameters are not walked."""
    if isinstance(node, list):
        return [_walk_references(v, visit) for v in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in REFERENCE_KEYS and isinstance(value, str) and value not in ("union", "base"):
            out[key] = visit(value)
        elif key != "parameters":
            out[key] = _walk_references(value, visit)
        else:
            out[key] = value
    return out


# where a key may appear: a path of field names (int: any list index, str: any mapping key)
_SCHEMAS: dict[tuple, type[BaseModel]] = {
    (): MergeConfig,
    ("models", int): InputModel,
    ("slices", int): OutputSlice,
    ("slices", int, "sources", int): InputSlice,
    ("modules", str): OutputModule,
    ("modules", str, "models", int): InputModel,
    ("modules", str, "slices", int): OutputSlice,
    ("modules", str, "slices", int, "sources", int): InputSlice,
    ("tokenizer",): TokenizerConfig,
    ("tokenizer", "tokens", str): TokenEmbedding,
    ("tokenizer", "tokens", str, "source"): ModelTokenEmbedding,
}


def unknown_keys(raw: dict, found: list[str]) -> dict:
    """`raw` without the keys the schema does not know; each is described in `found`, with the
    nearest known one. Values inside `parameters` are the method's to check."""

    def walk(node, path: tuple, shape: tuple):
        if isinstance(node, list):
            return [walk(item, (*path, i), (*shape, int)) for i, item in enumerate(node)]
        if not isinstance(node, dict):
            return node
        schema = _SCHEMAS.get(shape)
        if schema is None:
            if shape and shape[-1] in ("modules", "tokens"):  # mappings of named entries
                return {k: walk(v, (*path, k), (*shape, str)) for k, v in node.items()}
            return node
        kept = {}
        for key, value in node.items():
            if key in schema.model_fields:
                if key == "parameters":
                    kept[key] = _conditional_keys(value, (*path, key), found)
                else:
                    kept[key] = walk(value, (*path, key), (*shape, key))
                continue
            found.append(_unknown(".".join(map(str, (*path, key))), key, list(schema.model_fields)))
        return kept

    return walk(raw, (), ())


def _conditional_keys(parameters, path: tuple, found: list[str]):
    """Parameters without the unknown keys of their {filter, value} entries (each described
    in `found`); the caller's dicts are left as they are."""
    if not isinstance(parameters, dict):
        return parameters
    known = list(ConditionalParameter.model_fields)

    def clean(entry, where: tuple):
        if not isinstance(entry, dict):
            return entry
        for key in [k for k in entry if k not in known]:
            found.append(_unknown(".".join(map(str, (*where, key))), key, known))
        return {k: v for k, v in entry.items() if k in known}

    out = {}
    for name, value in parameters.items():
        if isinstance(value, list):
            out[name] = [clean(entry, (*path, name, i)) for i, entry in enumerate(value)]
        else:
            out[name] = clean(value, (*path, name))
    return out


def _unknown(where: str, key: str, known: list[str]) -> str:
    near = difflib.get_close_matches(str(key), known, n=1)
    hint = f"did you mean {near[0]!r}?" if near else f"known here: {', '.join(known)}"
    return f"unknown key {where} ({hint})"


def _describe(err: ValidationError, source: str) -> str:
    lines = [f"invalid merge config {source}:"]
    seen = set()
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        msg = e["msg"]
        if "parameters" in loc:
            # pydantic reports every branch of the value union; one plain sentence is clearer
            loc = loc[: loc.index("parameters") + 2]
            msg = (
                "expected a number, bool or string, a list of them (a gradient over layers), "
                "or {filter, value} entries"
            )
        where = ".".join(p for p in loc if not p.startswith(("list[", "function-")))
        msg = msg.removeprefix("Value error, ")
        if (where, msg) not in seen:
            seen.add((where, msg))
            lines.append(f"  {where or '(top level)'}: {msg}")
    return "\n".join(lines)


def load_configs(
    config: MergeConfig | dict | str | os.PathLike, *, strict: bool = False
) -> list[MergeConfig]:
    """The merge configs of a model, a dict, or a YAML file of one or more documents (all but
    one with a `name`: `engine.merge` orders them); ConfigError if any is invalid."""
    if isinstance(config, MergeConfig):
        return [config]
    if isinstance(config, dict):
        return [_validate(config, "(dict)", strict)]
    path = Path(config)
    documents = read_yaml(path, "merge config")
    if not documents:
        raise ConfigError(f"merge config {path} is empty")
    configs = []
    for i, document in enumerate(documents):
        where = str(path) if len(documents) == 1 else f"{path} (document {i + 1})"
        if not isinstance(document, dict):
            raise ConfigError(f"merge config {where} must be a YAML mapping")
        configs.append(_validate(document, where, strict))
    return configs


MAX_YAML_VALUES = 100_000


def read_yaml(path: Path, what: str) -> list:
    """The documents of a YAML file as plain data (no Python tags), refusing text that is not
    UTF-8 and aliases that expand past MAX_YAML_VALUES values (a "billion laughs" file)."""
    if not path.is_file():
        state = "is a folder" if path.is_dir() else "is not a file" if path.exists() else None
        raise ConfigError(f"{what} {path} {state or 'does not exist'}; give the YAML file")
    try:
        documents = [
            d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None
        ]
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path} is not valid YAML: {e}") from e
    sizes: dict[int, int] = {}

    def size(node) -> int:  # shared (aliased) nodes count once per use, computed once
        if not isinstance(node, dict | list):
            return 1
        if id(node) not in sizes:
            items = list(node.items()) if isinstance(node, dict) else [(None, v) for v in node]
            sizes[id(node)] = 1 + sum(size(v) for _, v in items)
        return sizes[id(node)]

    if sum(size(d) for d in documents) > MAX_YAML_VALUES:
        raise ConfigError(
            f"{what} {path} expands to more than {MAX_YAML_VALUES} values through its aliases "
            "(&anchor / *alias); write the values out"
        )
    return documents


def load_config(
    config: MergeConfig | dict | str | os.PathLike, *, strict: bool = False
) -> MergeConfig:
    """The one merge config of a model, a dict, or a YAML file; ConfigError if invalid or if
    the file holds several documents (`load_configs` reads those).

    >>> load_config("merge.yaml").merge_method
    """
    configs = load_configs(config, strict=strict)
    if len(configs) > 1:
        raise ConfigError(
            f"merge config {config} holds {len(configs)} documents; merge it with "
            "medmerge.merge (or the CLI), which runs them in order"
        )
    return configs[0]


def _validate(raw: dict, source: str, strict: bool) -> MergeConfig:
    """The config, its unknown keys reported: a warning each, or with `strict` an error; and
    in the error of a config that is invalid besides (a misspelt required key, say)."""
    found: list[str] = []
    known = unknown_keys(raw, found)
    if found and strict:
        raise ConfigError(f"merge config {source}: {'; '.join(found)} (strict: unknown keys are "
                          "errors)")  # fmt: skip
    try:
        config = MergeConfig.model_validate(known)
    except ValidationError as e:
        raise ConfigError("\n  ".join([_describe(e, source), *found])) from e
    for message in found:
        log.warning("merge config %s: %s; ignored", source, message)
    return config


def stage_order(configs: list[MergeConfig]) -> tuple[list[MergeConfig], MergeConfig]:
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
    needs = {id(c): {r for r in c.references() if r in names} for c in configs}
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
