"""medmerge: check, merge (streaming) and evaluate merges of fine-tuned LLMs."""

import os

# OpenMP worker threads (torch's and numba's) spin after each parallel region by default,
# taking the cores the merge engine's reader and writer threads need. Read when OpenMP starts,
# so this applies only where medmerge is imported before torch (the CLI, `python -c "import
# medmerge; ..."`); a value the user set stays.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import importlib  # noqa: E402
import importlib.abc  # noqa: E402
import importlib.util  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

# modules that moved into the layers' folders: the old paths keep working, with a warning
MOVED = {
    "adapters": "io.adapters",
    "align": "methods.align",
    "architectures": "models.architectures",
    "buffers": "io.buffers",
    "card": "io.card",
    "chat_templates": "models.chat_templates",
    "checkpoint": "io.checkpoint",
    "hashing": "io.hashing",
    "records": "studies.records",
    "references": "io.references",
    "report": "studies.report",
    "study": "studies.study",
    "tune": "studies.tune",
    "tune_ray": "studies.tune_ray",
    "tune_report": "studies.tune_report",
}


class _Moved(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import medmerge.study` gives `medmerge.studies.study` itself (one module object, so
    a patch of either name patches both), with a DeprecationWarning."""

    def find_spec(self, name, path=None, target=None):
        old = name.removeprefix(f"{__name__}.")
        return importlib.util.spec_from_loader(name, self) if old in MOVED else None

    def create_module(self, spec):
        new = f"{__name__}.{MOVED[spec.name.removeprefix(f'{__name__}.')]}"
        warnings.warn(f"{spec.name} is now {new}", DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module):
        pass  # imported already


sys.meta_path.append(_Moved())

from medmerge.version import __version__  # noqa: E402

# the Python API, imported when first used (so `medmerge --help` needs no torch)
API = {
    "merge": "engine",
    "plan_merge": "plan",
    "MergeConfig": "config",
    "load_config": "config",
    "CheckpointError": "errors",
    "ConfigError": "errors",
    "IncompatibleModelsError": "errors",
    "MedmergeError": "errors",
    "MergeError": "errors",
}
# the stages and layers, as attributes: `medmerge.studies.run_study(...)`
SUBMODULES = ("check", "config", "engine", "eval", "io", "methods", "models", "plan", "studies",
              "synthetic", "vocab")  # fmt: skip


def __getattr__(name: str):
    if name in API:
        return getattr(importlib.import_module(f"{__name__}.{API[name]}"), name)
    if name in SUBMODULES or name in MOVED:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["__version__", *API]
