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


class NonFiniteCosts(MergeError):
    """Alignment costs that are NaN or inf: some input of the tensors `names` has NaN or inf
    values (the engine finds and names it), or values whose products overflow float32."""

    def __init__(self, names: list[str]):
        self.names = names
        super().__init__(
            f"the alignment costs of {', '.join(names)} are not finite: their weights' products "
            "overflow float32; check those weights"
        )


class EvalError(MedmergeError):
    """An evaluation that cannot run: missing extra, unreachable dataset, bad suite."""
