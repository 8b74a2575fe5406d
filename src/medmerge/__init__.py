"""medmerge: check, merge (streaming) and evaluate merges of fine-tuned LLMs."""

import os

__version__ = "0.1.0"

# OpenMP worker threads (torch's and numba's) spin after each parallel region by default,
# taking the cores the merge engine's reader and writer threads need: a linear merge of the
# benchmark family used 9.8 s of CPU in 5.9 s spinning, 6.7 s in 5.1 s waiting passively (TIES
# 11.7 -> 9.5 s of CPU, 6.8 -> 6.3 s). Read when OpenMP starts, so this applies only where
# medmerge is imported before torch (the CLI, `python -c "import medmerge; ..."`); a value the
# user set stays.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from medmerge.config import MergeConfig, load_config  # noqa: E402
from medmerge.engine import merge, plan_merge  # noqa: E402
from medmerge.errors import (  # noqa: E402
    CheckpointError,
    ConfigError,
    IncompatibleModelsError,
    MedmergeError,
    MergeError,
)

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
