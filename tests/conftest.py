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
# merges compile the sparse pass in the foreground: the tests take the kernel path whether
# numba's cache holds it or not (test_kernels tests the background compile)
os.environ["MEDMERGE_COMPILE"] = "foreground"


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        default="cpu",
        help="the merge device of the tests that take the `device` fixture (cuda: run by "
        "benchmarks/gpu_check.sh on a machine with a GPU)",
    )


@pytest.fixture(scope="session")
def device(request) -> str:
    found = request.config.getoption("--device")
    if found.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("--device cuda needs a CUDA device")
    return found


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


def cli(*args) -> tuple[int, str]:
    """`medmerge ARGS` in this process: its exit code and output."""
    from typer.testing import CliRunner

    from medmerge.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def one_line_error(code: int, output: str, *fragments: str) -> None:
    """Assert a user error: exit code 2, no traceback, one `error:` line holding `fragments`."""
    assert code == 2, output
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
