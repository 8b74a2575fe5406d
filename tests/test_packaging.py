"""Each extra installs what its feature imports: the modules medmerge's features load are
covered by the requirements of the core package plus that extra (and what those require)."""

import ast
import importlib.metadata as md
import importlib.util
import sys

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# the modules each extra's feature loads: the lm-eval backend medmerge evaluates with, peft
FEATURES = {
    "eval": ["lm_eval", "lm_eval.models.huggingface"],
    "adapters": ["peft"],
    "tune": ["optuna", "cmaes", "lm_eval", "lm_eval.models.huggingface", "matplotlib.pyplot"],
    "ray": ["ray.tune"],
}


def _requirements(dist: str, extra: str | None = None) -> set[str]:
    """The distributions `dist` requires (with `extra`: only that extra's)."""
    out = set()
    for text in md.requires(dist) or []:
        req = Requirement(text)
        if ("extra" in str(req.marker or "")) != (extra is not None):
            continue  # another extra's, or (with `extra`) the core's
        if req.marker is None or req.marker.evaluate({"extra": extra or ""}):
            out.add(canonicalize_name(req.name))
    return out


def _closure(names: set[str]) -> set[str]:
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            todo += _requirements(name)
        except md.PackageNotFoundError:
            pass
    return seen


def _top_imports(module: str) -> set[str]:
    """The top-level packages a module imports at import time (module-level statements)."""
    source = importlib.util.find_spec(module).origin
    tree = ast.parse(open(source).read())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"__future__"}


@pytest.mark.parametrize("extra", list(FEATURES))
def test_an_extra_alone_installs_what_its_feature_imports(extra):
    allowed = _closure(_requirements("medmerge") | _requirements("medmerge", extra))
    owners = md.packages_distributions()
    for module in FEATURES[extra]:
        pytest.importorskip(module)
        for package in _top_imports(module):
            dists = {canonicalize_name(d) for d in owners.get(package, [])}
            assert dists & allowed, (
                f"{module} imports {package} ({', '.join(sorted(dists))}), which neither "
                f"medmerge nor medmerge[{extra}] requires"
            )
