"""The transformers and peft loaders medmerge calls, each data only: `trust_remote_code=False`
on every one, so a model folder's Python (a config's `auto_map`) never runs and transformers
never stops to ask on stdin; a folder whose files link out of it is refused first
(`checkpoint.check_metadata`). Their failures become one-line `CheckpointError`s naming the
folder."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from medmerge.errors import CheckpointError
from medmerge.io.metadata import check_metadata


def tokenizer(folder: str | Path):
    """The fast tokenizer of a model folder."""
    from transformers import AutoTokenizer

    check_metadata(folder)
    with _refused(folder, "tokenizer"):
        return AutoTokenizer.from_pretrained(folder, use_fast=True, trust_remote_code=False)


def causal_lm(folder: str | Path, dtype: torch.dtype = torch.float32):
    """The transformers causal LM of a model folder, on the CPU."""
    from transformers import AutoModelForCausalLM

    check_metadata(folder)
    with _refused(folder, "model"):
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=False)


def folded(model, adapter: str | Path):
    """`model` with the PEFT adapter in folder `adapter` merged into its weights; an adapter
    whose weights lack some of what its settings name is refused (peft would only warn)."""
    from peft import PeftModel

    check_metadata(adapter)
    with _refused(adapter, "adapter"):
        peft = PeftModel.from_pretrained(
            model, adapter, strict_adapter_check="error", trust_remote_code=False
        )
        return peft.merge_and_unload()


@contextmanager
def _refused(folder: str | Path, what: str) -> Iterator[None]:
    """Turn a loader's failure (custom code it may not run, unreadable files) into a one-line
    CheckpointError naming the folder."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as error:  # transformers and peft raise many types for bad files
        text = " ".join(str(error).split())
        if "trust_remote_code" in text or "custom code" in text:
            raise CheckpointError(
                f"the {what} in {folder} needs its own Python code (an `auto_map` for a model "
                "type transformers does not know); medmerge never runs code that comes with a "
                "checkpoint: convert it to a transformers architecture first"
            ) from error
        raise CheckpointError(
            f"the {what} in {folder} cannot be loaded ({type(error).__name__}: {text[:300]}); "
            "check its files, or re-download them"
        ) from error
