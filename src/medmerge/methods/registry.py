"""The registry of merge methods: name -> MergeMethod.

A method is a plain function decorated with `@register`; a newcomer's looks like

    @register("scaled_sum")
    def scaled_sum(base: Tensor, models: list[Tensor], *, weight: list[float],
                   scale: float = 1.0) -> Tensor:
        # the docstring's first paragraph is what `medmerge methods` shows
        return base + scale * sum(w * (m - base) for w, m in zip(weight, models))

Its keyword-only parameters are the method's config parameters (their defaults are the
defaults; a parameter without one is required). What the signature says is not repeated: a
parameter annotated `list[float]` arrives as one value per model, in model order (a default
such as `list[float] = 1.0` is each model's value when none is set), and a `base` annotated
without `None` makes the method need a base model. A family of variants registers rows
instead (`add`, with explicit `Param` specs: see `sparse.VARIANTS`).

Tensors arrive in float32 on the merge device (or, registered `raw_inputs=True`, in their
stored dtype: the method converts chunk by chunk or runs a CPU kernel on them). Group methods
(`group=` a function of the tensor names, the model config and each tensor's parameters that
splits the names into groups, e.g. one layer's q, k, v and o) take and return dicts
name -> Tensor, with the parameters of the group's first tensor. A tensor larger than the
merge's memory budget is merged in row blocks where the method says it can be (`rows`,
`streams`), else whole; a group method that `streams` is given a group over the budget as
`Blocked` tensors.

The engine also passes, when the function names them, these keyword arguments:
- `keys`: one 63-bit random key per model, derived from (seed, tensor name, model index), for
  `medmerge.methods.rng.uniform` (counter-based: a draw depends only on the key and the entry's
  position, so chunks can be drawn in any order, on any device);
- `name`: the tensor name (tensor-wise) or `names` (group methods);
- `config`: the base model's `config.json` as a dict;
- `diagnostics`: a list to append JSON-able records to (written beside the provenance);
- `out_dtype`: the output dtype; a method that asks for it may return tensors already in it
  (saving a full-size float32 copy), otherwise results are float32.
"""

from __future__ import annotations

import difflib
import inspect
import math
import reprlib
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from medmerge.errors import ConfigError

ENGINE_ARGS = frozenset({"keys", "name", "names", "config", "diagnostics", "out_dtype"})
REQUIRED = inspect.Parameter.empty
Group = Callable[[Sequence[str], dict, dict[str, dict]], list[list[str]]]


@dataclass(frozen=True)
class Param:
    """A config parameter of a method: its Python name (`lambda_` is `lambda` in YAML), its
    default (REQUIRED: none), whether it takes one value per model, and its kind: float, int,
    bool, str, a tuple of the values allowed, or None (anything)."""

    name: str
    default: object = REQUIRED
    per_model: bool = False
    kind: object = None

    def value(self, raw: object, where: str) -> object:
        """`raw` as this parameter's kind (a number written as a string, as YAML leaves
        `1e-3`, is a number), or a ConfigError that says what `where` needs."""
        kind = self.kind
        if kind is float or kind is int:
            number = raw
            if isinstance(raw, str):
                try:
                    number = float(raw)
                except ValueError:
                    number = None
            if _finite(number) and (kind is float or float(number).is_integer()):
                return kind(number)
            what = "a finite number" if kind is float else "an integer"
        elif kind is bool:  # as pydantic reads a bool, as mergekit does: 1.0 is true
            if isinstance(raw, bool):
                return raw
            if isinstance(raw, int | float) and raw in (0, 1):
                return bool(raw)
            if isinstance(raw, str) and raw.lower() in TRUE | FALSE:
                return raw.lower() in TRUE
            what = "true or false"
        elif kind is str:
            if isinstance(raw, str):
                return raw
            what = "a string"
        elif isinstance(kind, tuple):
            if raw in kind:
                return raw
            what = "one of " + ", ".join(map(str, kind))
        else:
            return raw
        raise ConfigError(
            f"parameter {config_name(self.name)!r} ({where}) must be {what}, got "
            f"{reprlib.repr(raw)}"
        )


TRUE = {"true", "yes", "on", "1", "t", "y"}
FALSE = {"false", "no", "off", "0", "f", "n"}


def _finite(number: object) -> bool:
    """Whether `number` is a number a float holds (not a bool, NaN, inf or 1 followed by 400
    zeros)."""
    if not isinstance(number, (int, float)) or isinstance(number, bool):
        return False
    try:
        return math.isfinite(float(number))
    except OverflowError:
        return False


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable
    doc: str  # one line: what it computes, the paper
    needs_base: bool
    uses_base: bool  # read the base when there is one (true for every method that needs it)
    # a NaN or inf input entry always makes its output entry NaN or inf (even where the method
    # drops it): the engine checks the output, not the inputs first
    spreads_nonfinite: bool
    raw_inputs: bool  # tensors arrive in their stored dtype; the method converts (per chunk)
    params: tuple[Param, ...]
    engine_args: frozenset[str]
    group: Group | None = None
    min_models: int = 1
    max_models: int | None = None
    summarize: Callable[[list[dict]], dict] | None = None  # condenses the diagnostics records
    # (models, whether a base is passed) -> what is wrong with that, or None: for a method whose
    # inputs min_models and max_models cannot describe
    inputs: Callable[[int, bool], str | None] | None = None
    # (one tensor's resolved parameters, the model config) -> raises ConfigError for parameters
    # that do not go together, or do not suit the model
    check: Callable[[dict, dict], None] | None = None
    # (one tensor's resolved parameters, its shape) -> whether a tensor over the merge's memory
    # budget can be merged in row blocks, and how: `rows`, the method called on each block (its
    # output rows depend only on the same input rows, not on their positions); `streams`, the
    # method given `streaming.Blocked` inputs (on the CPU): None where it cannot take them,
    # else the entries per row its chunks hold whole (1 unless it works on rows, as DELLA)
    rows: Callable[[dict, tuple[int, ...]], bool] | None = None
    streams: Callable[[dict, tuple[int, ...]], int | None] | None = None

    def takes_base(self, models: int) -> bool:
        """Whether a config of `models` models that may leave its base out (a study's, an
        example's) should name it: where the method reads the base beside those models."""
        return self.uses_base and not (self.inputs and self.inputs(models, True))

    @property
    def per_model(self) -> frozenset[str]:
        return frozenset(p.name for p in self.params if p.per_model)

    @property
    def defaults(self) -> dict[str, object]:
        """Parameter -> default, REQUIRED where it has none."""
        return {p.name: p.default for p in self.params}


REGISTRY: dict[str, MergeMethod] = {}


def add(method: MergeMethod, aliases: Sequence[str] = ()) -> None:
    """Register a method under its name and `aliases`, none of them taken."""
    keys = (method.name, *aliases)
    if taken := [k for k in keys if k in REGISTRY]:
        raise ValueError(f"a merge method named {taken[0]!r} is registered already; choose "
                         "another name")  # fmt: skip
    for key in keys:
        REGISTRY[key] = method


def register(
    name: str,
    *,
    aliases: Sequence[str] = (),
    uses_base: bool | None = None,
    spreads_nonfinite: bool = False,
    raw_inputs: bool = False,
    group: Group | None = None,
    min_models: int = 1,
    max_models: int | None = None,
    summarize: Callable[[list[dict]], dict] | None = None,
    inputs: Callable[[int, bool], str | None] | None = None,
    check: Callable[[dict, dict], None] | None = None,
    rows: Callable[[dict, tuple[int, ...]], bool] | None = None,
    streams: Callable[[dict, tuple[int, ...]], int | None] | None = None,
) -> Callable[[Callable], Callable]:
    """Register the decorated function as method `name`; its parameters, which of them are per
    model and whether it needs a base come from its signature."""

    def decorate(fn: Callable) -> Callable:
        hints = typing.get_type_hints(fn)
        kw = [
            p
            for p in inspect.signature(fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        ]
        base = hints.get("base", type(None))
        needs_base = type(None) not in (typing.get_args(base) or (base,))
        method = MergeMethod(
            name=name,
            fn=fn,
            doc=_first_paragraph(fn.__doc__),
            needs_base=needs_base,
            uses_base=needs_base if uses_base is None else uses_base,
            spreads_nonfinite=spreads_nonfinite,
            raw_inputs=raw_inputs,
            params=tuple(
                Param(p.name, p.default, hints.get(p.name) == list[float], _kind(hints.get(p.name)))
                for p in kw
                if p.name not in ENGINE_ARGS
            ),
            engine_args=frozenset(p.name for p in kw if p.name in ENGINE_ARGS),
            group=group,
            min_models=min_models,
            max_models=max_models,
            summarize=summarize,
            inputs=inputs,
            check=check,
            rows=rows,
            streams=streams,
        )
        add(method, aliases)
        return fn

    return decorate


def _kind(hint) -> object:
    """A parameter's kind from its annotation: a `list[float]` per model is a float, a
    `Literal` the tuple of its values; unions and the rest take anything."""
    if hint == list[float]:
        return float
    if hint in (float, int, bool, str):
        return hint
    if typing.get_origin(hint) is typing.Literal:
        return typing.get_args(hint)
    return None


def _first_paragraph(doc: str | None) -> str:
    """A docstring's first paragraph, on one line."""
    first = (doc or "").strip().split("\n\n")[0]
    return " ".join(line.strip() for line in first.splitlines())


def always(params: dict, shape: tuple[int, ...]) -> bool:
    """`rows` of a method whose every tensor can be merged in row blocks."""
    return True


def entries(params: dict, shape: tuple[int, ...]) -> int:
    """`streams` of a method that takes `Blocked` inputs for every tensor, in chunks of any
    entries."""
    return 1


def get_method(name: str) -> MergeMethod:
    """The method registered as `name`; a ConfigError with the nearest names otherwise."""
    if name not in REGISTRY:
        near = difflib.get_close_matches(str(name), list(REGISTRY), n=2)
        hint = f"did you mean {' or '.join(map(repr, near))}? " if near else ""
        raise ConfigError(
            f"unknown merge_method {name!r}; {hint}available: {', '.join(sorted(REGISTRY))}"
        )
    return REGISTRY[name]


def config_name(key: str) -> str:
    """Config spelling of a parameter: `lambda_` in Python is `lambda` in YAML."""
    return key.rstrip("_")
