"""medmerge: check, merge (streaming) and evaluate merges of fine-tuned LLMs."""

import os

# OpenMP worker threads (torch's and numba's) spin after each parallel region by default,
# taking the cores the merge engine's reader and writer threads need. Read when OpenMP starts,
# so this applies only where medmerge is imported before torch (the CLI, `python -c "import
# medmerge; ..."`); a value the user set stays.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
