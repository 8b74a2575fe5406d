"""Fixtures: tiny model families with real HF architectures, written sharded in bf16.

`mistral` uses grouped-query attention (8 query heads, 2 kv heads) and an untied head; `llama`
has tied embeddings. Each family is a base and two fine-tunes (independent random deltas).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from medmerge.synthetic import tiny_config, write_family

SHARD = 40_000  # bytes: several shards per tiny model, to exercise the index


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    os.environ["MEDMERGE_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session", params=["mistral", "llama"])
def family(request, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp(f"family-{request.param}")
    return write_family(root, tiny_config(request.param), seed=1, shard_size=SHARD)


@pytest.fixture(scope="session")
def mistral(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("mistral")
    return write_family(root, tiny_config("mistral"), seed=2, shard_size=SHARD)


def state(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder, read independently of medmerge (safetensors' own loader)."""
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def logits(folder: Path, tokens: torch.Tensor | None = None) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    if tokens is None:
        tokens = torch.arange(3, 19).unsqueeze(0)
    with torch.no_grad():
        return model(tokens).logits


def leftovers(out: Path) -> list[Path]:
    """The output folder and any temporary siblings a failed merge might have left."""
    return [
        p for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}.")
    ]


WORDS = (
    "heart lung fever cough pain blood pressure sugar kidney liver bone skin virus "
    "bacteria nerve muscle"
).split()


def write_suite(folder: Path, n: int = 24, seed: int = 0, formats=None) -> Path:
    """A small local suite with one task per format, records in the upstream field names."""
    import json
    import random

    import yaml

    rng = random.Random(seed)

    def s(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    makers = {
        "medqa": lambda: {
            "sent1": s(8) + "?",
            **{f"ending{i}": s(2) for i in range(4)},
            "label": rng.randrange(4),
        },
        "pubmedqa": lambda: {
            "QUESTION": s(6) + "?",
            "CONTEXTS": [s(10), s(8)],
            "final_decision": rng.choice(["yes", "no", "maybe"]),
        },
        "mmlu": lambda: {
            "question": s(7) + "?",
            "choices": [s(2) for _ in range(4)],
            "answer": rng.randrange(4),
        },
        "medmcqa": lambda: {
            "question": s(7) + "?",
            "opa": s(2),
            "opb": s(2),
            "opc": s(2),
            "opd": s(2),
            "cop": rng.randrange(4),
        },
        "hellaswag": lambda: {
            "activity_label": "Medicine",
            "ctx_a": s(6),
            "ctx_b": s(3),
            "endings": [s(3) for _ in range(4)],
            "label": str(rng.randrange(4)),
        },
        "perplexity": lambda: {"text": s(20)},
    }
    folder.mkdir(parents=True, exist_ok=True)
    tasks = []
    for fmt in formats or makers:
        with open(folder / f"{fmt}.jsonl", "w") as f:
            for _ in range(n):
                f.write(json.dumps(makers[fmt]()) + "\n")
        tasks.append({"name": f"tiny_{fmt}", "format": fmt, "test": f"{fmt}.jsonl"})
    (folder / "suite.yaml").write_text(yaml.safe_dump({"name": "tiny", "tasks": tasks}))
    return folder
