"""Merge configs: mergekit's YAML schema for what both support, validated by pydantic.

```yaml
merge_method: task_arithmetic
base_model: path/to/base
models:
  - model: path/to/parent_a
    parameters: {weight: 0.5}
  - model: path/to/parent_b
    parameters: {weight: 0.5}
parameters: {normalize: false}     # apply to every model unless a model sets its own
dtype: bfloat16                   # output dtype (`out_dtype` wins if both are given)
tokenizer_source: base            # base, or a model folder
materialize_adapters: false       # true: fold PEFT LoRA adapters among the models first
```

A parameter value is a number (or bool/string), a gradient (a list of numbers interpolated over
the layers, as in mergekit), or a list of `{filter, value}` entries where the first whose `filter`
is a substring of the tensor name (or absent, or "*") applies.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from medmerge.errors import ConfigError

Scalar = bool | int | float | str
DType = Literal["float32", "float16", "bfloat16"]


class ConditionalParameter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Scalar | list[float]


ParameterValue = Scalar | list[float] | list[ConditionalParameter]


class InputModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, ParameterValue] = {}


class MergeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    merge_method: str
    models: list[InputModel]
    base_model: str | None = None
    parameters: dict[str, ParameterValue] = {}
    dtype: DType | None = None
    out_dtype: DType | None = None
    tokenizer_source: str | None = None
    materialize_adapters: bool = False  # fold LoRA adapter entries into their base on the fly

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_defaults=True), sort_keys=False)


_FIELDS = {
    (): MergeConfig,
    ("models", int): InputModel,
}


def _allowed_keys(loc: tuple) -> str:
    """Which keys are allowed where pydantic found an unknown one."""
    parent = loc[:-1]
    shape = tuple(int if isinstance(p, int) else p for p in parent)
    if shape in _FIELDS:
        return ", ".join(_FIELDS[shape].model_fields)
    if "parameters" in parent:  # inside a list of {filter, value} entries
        return ", ".join(ConditionalParameter.model_fields)
    return ""


def _describe(err: ValidationError, source: str) -> str:
    lines = [f"invalid merge config {source}:"]
    seen = set()
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = f"unknown key (allowed: {_allowed_keys(e['loc'])})"
        elif "parameters" in loc:
            # pydantic reports every branch of the value union; one plain sentence is clearer
            loc = loc[: loc.index("parameters") + 2]
            msg = (
                "expected a number, bool or string, a list of numbers (a gradient over "
                "layers), or a list of {filter, value} entries"
            )
        where = ".".join(p for p in loc if not p.startswith(("list[", "function-")))
        if (where, msg) not in seen:
            seen.add((where, msg))
            lines.append(f"  {where or '(top level)'}: {msg}")
    return "\n".join(lines)


def load_config(config: MergeConfig | dict | str | os.PathLike) -> MergeConfig:
    """A MergeConfig from a model, a dict, or a YAML file path; ConfigError if invalid."""
    if isinstance(config, MergeConfig):
        return config
    source = "(dict)"
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"merge config {path} does not exist")
        try:
            config = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"merge config {path} is not valid YAML: {e}") from e
        if not isinstance(config, dict):
            raise ConfigError(f"merge config {path} must be a YAML mapping")
    try:
        return MergeConfig.model_validate(config)
    except ValidationError as e:
        raise ConfigError(_describe(e, source)) from e
