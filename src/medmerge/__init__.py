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

from medmerge.config import MergeConfig, load_config  # noqa: E402
from medmerge.engine import merge  # noqa: E402
from medmerge.errors import (  # noqa: E402
    CheckpointError,
    ConfigError,
    IncompatibleModelsError,
    MedmergeError,
    MergeError,
)
from medmerge.plan import plan_merge  # noqa: E402
from medmerge.version import __version__  # noqa: E402

__all__ = [
    "CheckpointError",
    "ConfigError",
    "IncompatibleModelsError",
    "MedmergeError",
    "MergeConfig",
    "MergeError",
    "__version__",
    "load_config",
    "merge",
    "plan_merge",
]
