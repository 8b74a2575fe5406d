"""medmerge: check, merge (streaming) and evaluate merges of fine-tuned LLMs."""

__version__ = "0.1.0"

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
