"""One exception type per kind of user error; the CLI catches `MedmergeError` once and prints it."""


class MedmergeError(Exception):
    """Base class: the message says what is wrong, where (file or tensor), and the fix."""


class ConfigError(MedmergeError):
    """A merge config that is malformed or asks for something medmerge does not support."""


class CheckpointError(MedmergeError):
    """A model folder that cannot be read: missing, corrupt, an adapter, or unsafe."""


class IncompatibleModelsError(MedmergeError):
    """Models that cannot be merged together: other architecture, missing tensor, other shape."""


class MergeError(MedmergeError):
    """A merge that produced an unusable result (e.g. non-finite values) or cannot be written."""


class EvalError(MedmergeError):
    """An evaluation that cannot run: missing extra, unreachable dataset, bad suite."""
