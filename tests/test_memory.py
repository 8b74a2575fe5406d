"""Tensors over the memory budget, merged in row blocks: the same bits as whole, and a peak
memory that does not follow the tensor's size."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import method_cases as cases
import pytest
import torch
import yaml
from conftest import state
from method_cases import CASES
from safetensors.torch import save_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

import medmerge
from medmerge import engine, plan
from medmerge.errors import ConfigError, MergeError
from medmerge.methods import REGISTRY, align
from medmerge.methods.align import HeadLayout, permute_heads, random_valid_permutation
from medmerge.methods.basic import combination
from medmerge.methods.spherical import gram
from medmerge.methods.streaming import Blocked
from medmerge.synthetic import tiny_config, write_family, write_model

# case -> (method, its parameters, the mode a tensor over the budget is merged in): every
# method's case (tests/method_cases.py), and options whose blocks work another way
OPTIONS = {
    "ties_l1": ("ties", {"weight": [0.6, 0.5], "density": [0.3, 0.5], "rescale": True}, "streams"),
    "dare_linear_inverse": ("dare_linear", {"weight": [0.6, 0.5], "density": [0.7, 0.4],
                                            "rescale": "inverse_density"}, "streams"),
    "breadcrumbs_gamma": ("breadcrumbs", {"weight": [0.6, 0.5], "density": [0.8, 0.6],
                                          "gamma": [0.02, 0.05]}, "streams"),
    "della_epsilon": ("della", {"weight": [0.6, 0.5], "density": [0.5, 0.6],
                                "epsilon": [0.1, 0.2]}, "streams"),
    "nuslerp_rows": ("nuslerp", {"weight": [0.4, 0.6], "nuslerp_flatten": False}, "rows"),
    "model_stock_rows": ("model_stock", {"filter_wise": True}, "rows"),
    "nuslerp_columns": ("nuslerp", {"weight": [0.4, 0.6], "nuslerp_flatten": False,
                                    "nuslerp_row_wise": True}, "streams"),
    "hierarchical_deltas": ("hierarchical", {"align_on": "deltas", "min_weight": 0.2}, "streams"),
}  # fmt: skip
BLOCKWISE = {m: (m, c.params, c.blocks) for m, c in CASES.items()
             if c.blocks and REGISTRY[m].name == m} | OPTIONS  # fmt: skip


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A family whose embedding and head (20000 x 64) hold more than one chunk of entries
    (`streaming.CHUNK`), as the blocks of the methods that take `Blocked` inputs hold."""
    root = tmp_path_factory.mktemp("wide")
    return write_family(root, tiny_config("mistral", vocab_size=20000), seed=4)


def merge_config(name: str, family, params: dict) -> dict:
    """The case's merge, in the output dtype the test asks for (the inputs' by default)."""
    cfg = cases.merge_config(name, family, params)
    del cfg["dtype"]
    return cfg


def modes(monkeypatch) -> list[str]:
    """The modes of the tensors the engine will merge in row blocks."""
    found = []
    row_blocks = plan._row_blocks

    def spy(*args):
        how = row_blocks(*args)
        if how is not None:
            found.append(how.mode)
            assert len(how.blocks) > 1 or how.mode == "streams"
        return how

    monkeypatch.setattr(plan, "_row_blocks", spy)
    return found


def group_blocks(monkeypatch) -> dict:
    """The row blocks of the tensors of the groups the engine will merge in row blocks."""
    found = {}
    blocks = plan._group_blocks

    def spy(*args):
        how = blocks(*args)
        found.update({n: b.blocks for n, b in how.items()})
        return how

    monkeypatch.setattr(plan, "_group_blocks", spy)
    return found


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("case", list(BLOCKWISE))
def test_row_blocks_give_the_whole_tensors_bits(case, dtype, mistral, wide, tmp_path, monkeypatch):
    method, params, mode = BLOCKWISE[case]
    # small blocks of rows; for `Blocked` inputs, blocks of 2^20 entries: two in the embedding
    family, budget = (mistral, "40KB") if mode == "rows" else (wide, "4MB")
    cfg = merge_config(method, family, params)
    whole = medmerge.merge(cfg, tmp_path / "whole", dtype=dtype, progress=False)
    found = modes(monkeypatch)
    blocks = medmerge.merge(cfg, tmp_path / "blocks", dtype=dtype, progress=False,
                            max_memory=budget)  # fmt: skip
    assert found and set(found) == {mode}
    assert_bitwise_equal(state(whole), state(blocks))


@pytest.mark.parametrize("method", ["ties", "slerp"])
def test_a_merge_on_any_device_takes_large_tensors_in_blocks_on_the_cpu(
    method, wide, device, tmp_path, monkeypatch
):
    """A method given the blocks works through them on the CPU whatever the merge's device: a
    GPU holds none of the tensors over the budget, and they get the CPU's whole-tensor bits."""
    params = BLOCKWISE[method][1]
    cfg = merge_config(method, wide, params)
    whole = state(medmerge.merge(cfg, tmp_path / "whole", progress=False))
    found = modes(monkeypatch)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    blocks = state(medmerge.merge(cfg, tmp_path / "blocks", device=device, progress=False,
                                  max_memory="4MB"))  # fmt: skip
    assert found == ["streams", "streams"]  # the embedding and the head
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(whole[name].view(torch.uint8), blocks[name].view(torch.uint8)), name
    if device.startswith("cuda"):
        assert torch.cuda.max_memory_allocated() < whole["lm_head.weight"].numel() * 4


def test_a_tensor_a_method_cannot_block_merges_whole_under_any_budget(
    mistral, tmp_path, monkeypatch
):
    # Arcee Fusion's softmax runs along rows: a 1-D tensor (a norm's weight) is one row
    cfg = merge_config("arcee_fusion", mistral, {})
    whole = medmerge.merge(cfg, tmp_path / "whole", progress=False)
    decided = {}
    row_blocks = plan._row_blocks

    def spy(merge_plan, name, budget):
        decided[name] = row_blocks(merge_plan, name, budget)
        assert plan._stored_bytes(merge_plan, name) > budget, name  # none small enough for whole
        return decided[name]

    monkeypatch.setattr(plan, "_row_blocks", spy)
    small = medmerge.merge(cfg, tmp_path / "small", progress=False, max_memory="2KB")
    out = state(small)
    assert {n for n, how in decided.items() if how is None} == {n for n in out if out[n].dim() < 2}
    assert all(how.mode == "streams" for how in decided.values() if how is not None)
    assert_bitwise_equal(state(whole), out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("base", [True, False])
def test_gram_and_combination_of_blocks_match_the_whole_tensor(dtype, base):
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(3000, 64, generator=gen).to(dtype) for _ in range(3)]
    blocks = tuple((r, min(r + 256, 3000)) for r in range(0, 3000, 256))  # 16384 entries each

    def blocked(t):
        return Blocked(tuple(t.shape), t.dtype, blocks, lambda k: t[slice(*blocks[k])])

    origin = tensors[0] if base else None
    models = tensors[1:]
    lazy_origin = blocked(origin) if base else None
    assert torch.equal(gram(models, origin), gram([blocked(m) for m in models], lazy_origin))
    coef = [0.3, -1.7]
    whole = combination(coef, models, origin, torch.bfloat16)
    lazy = combination(coef, [blocked(m) for m in models], lazy_origin, torch.bfloat16)
    assert isinstance(lazy, Blocked) and lazy.blocks == blocks
    joined = torch.cat([lazy.get(k) for k in range(len(blocks))])
    assert torch.equal(whole.view(torch.int16), joined.view(torch.int16))


def test_a_bad_memory_budget_is_refused_before_any_tensor_is_read(mistral, tmp_path):
    cfg = merge_config("linear", mistral, BLOCKWISE["linear"][1])
    with pytest.raises(ConfigError, match="not a size: 'lots'"):
        medmerge.merge(cfg, tmp_path / "m", progress=False, max_memory="lots")
    assert not (tmp_path / "m").exists()


def test_the_command_line_takes_a_memory_budget(mistral, tmp_path):
    from typer.testing import CliRunner

    from medmerge.cli import app

    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump(merge_config("linear", mistral, BLOCKWISE["linear"][1])))
    whole = medmerge.merge(config, tmp_path / "whole", progress=False)
    run = CliRunner().invoke(app, ["merge", str(config), str(tmp_path / "cli"), "--quiet",
                                   "--max-memory", "40KB"])  # fmt: skip
    assert run.exit_code == 0, run.output
    assert_bitwise_equal(state(whole), state(tmp_path / "cli"))
    run = CliRunner().invoke(app, ["merge", str(config), str(tmp_path / "bad"), "--max-memory",
                                   "2 gigs"])  # fmt: skip
    assert run.exit_code == 2 and "error: not a size: '2 gigs'" in run.output


# Merges a family whose largest tensors (the embedding and the head, 32768 x 1024 bfloat16)
# hold 64 MiB per model, after a small merge that loads what a merge loads (libraries, the
# kernels); prints by how much the large merge raised the resident memory at its peak, in
# bytes. (The kernel's peak, VmHWM, reset before the merge: getrusage's ru_maxrss would carry
# the peak of the process this one was forked from.)
PEAK = """
import pathlib, re, sys, medmerge
small, large, method, budget, out = sys.argv[1:]
def config(root):
    base, a, b = (str(root / n) for n in ("base", "model_1", "model_2"))
    if method == "union" and (root / "added").is_dir():
        a = str(root / "added")
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": base, "models": [{"model": a}],
                "parameters": {"t": 0.3}}
    cfg = {"merge_method": "linear", "base_model": base, "models": [{"model": a}, {"model": b}],
           "parameters": {"weight": 0.5}}
    return {**cfg, "tokenizer_source": "union"} if method == "union" else cfg
def kib(field):
    return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
medmerge.merge(config(pathlib.Path(small)), out + "-warm", progress=False)
pathlib.Path("/proc/self/clear_refs").write_text("5")
before = kib("VmRSS")
medmerge.merge(config(pathlib.Path(large)), out, progress=False, max_memory=budget)
print((kib("VmHWM") - before) * 1024)
"""


@pytest.fixture(scope="module")
def large_family(tmp_path_factory):
    """Models with 32768 x 1024 embeddings and heads, each with a tokenizer of as many tokens,
    and `added`, a fine-tune with two more tokens (and rows), which the others lack."""
    root = tmp_path_factory.mktemp("large")
    for k, name in enumerate(("base", "model_1", "model_2", "added")):
        tokens = 32768 + 2 * (name == "added")
        config = tiny_config("mistral", vocab_size=tokens, hidden_size=1024,
                             num_hidden_layers=1, intermediate_size=256)  # fmt: skip
        folder = write_model(root / name, config, seed=3, member=k)
        words = WordLevel({f"t{i}": i for i in range(tokens)}, unk_token="t0")
        PreTrainedTokenizerFast(tokenizer_object=Tokenizer(words)).save_pretrained(folder)
    return root


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux's /proc")
@pytest.mark.parametrize("method", ["linear", "slerp", "union"])
def test_peak_memory_stays_below_the_largest_tensor(method, large_family, mistral, tmp_path):
    largest = 32768 * 1024 * 4  # bytes of the largest tensor in float32

    def growth(budget: str) -> int:
        run = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(PEAK), str(mistral[0].parent),
             str(large_family), method, budget, str(tmp_path / budget)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return int(run.stdout.split()[-1])

    bounded = growth("16MB")
    assert bounded < largest, f"{bounded / 2**20:.0f} MiB"
    # the measurement sees a merge that holds the tensors whole: the bound is not vacuous
    whole = growth("100GB")
    assert whole > largest, f"{whole / 2**20:.0f} MiB"
    assert_bitwise_equal(state(tmp_path / "16MB"), state(tmp_path / "100GB"))


@pytest.mark.parametrize("case", ["ties_l1", "dare_ties", "della", "sce", "slerp", "hierarchical"])
def test_row_blocks_give_the_whole_tensors_bits_on_the_torch_path(case, wide, tmp_path,
                                                                   monkeypatch):  # fmt: skip
    monkeypatch.setenv("MEDMERGE_KERNELS", "0")  # as on a GPU, or with models in mixed dtypes
    method, params, mode = BLOCKWISE[case]
    cfg = merge_config(method, wide, params)
    whole = medmerge.merge(cfg, tmp_path / "whole", progress=False)
    found = modes(monkeypatch)
    blocks = medmerge.merge(cfg, tmp_path / "blocks", progress=False, max_memory="4MB")
    assert found and set(found) == {mode}
    assert_bitwise_equal(state(whole), state(blocks))


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """A family of one layer whose q and o projections (2048 x 2048) hold four chunks of
    entries, and a parent B whose query heads and kv groups are permuted, so that aligning
    them moves rows across row blocks."""
    root = tmp_path_factory.mktemp("heads")
    config = tiny_config("mistral", hidden_size=2048, num_attention_heads=16, head_dim=128,
                         num_key_value_heads=4, num_hidden_layers=1, intermediate_size=64,
                         vocab_size=256)  # fmt: skip
    base, a, b = write_family(root, config, seed=6)
    layout = HeadLayout.from_config(config.to_dict())
    q, kv = random_valid_permutation(layout, torch.Generator().manual_seed(1))
    tensors = state(b)
    attention = {n: t for n, t in tensors.items() if ".self_attn." in n}
    tensors.update(permute_heads(attention, q, kv, layout))
    moved = root / "moved"
    shutil.copytree(b, moved)
    for f in moved.glob("model*.safetensors*"):
        f.unlink()
    save_file({k: v.contiguous() for k, v in tensors.items()}, moved / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    return base, a, moved


@pytest.mark.parametrize(
    "params", [{}, {"alignment": "per_tensor"}, {"align_on": "deltas", "weighting": "fixed"}]
)
def test_attention_groups_in_row_blocks_give_the_whole_groups_bits(params, heads, tmp_path,
                                                                   monkeypatch):  # fmt: skip
    monkeypatch.setattr(align, "GRAM", 1 << 16)  # head costs summed over several parts
    cfg = merge_config("hierarchical", heads, params)
    whole = medmerge.merge(cfg, tmp_path / "whole", progress=False)
    found = group_blocks(monkeypatch)
    blocks = medmerge.merge(cfg, tmp_path / "blocks", progress=False, max_memory="4MB")
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert len(found) == 4 and len(found[q_proj]) == 4  # the layer's q, k, v and o
    assert_bitwise_equal(state(whole), state(blocks))
    records = [json.loads((out / engine.DIAGNOSTICS).read_text())["records"]
               for out in (whole, blocks)]  # fmt: skip
    for record in records[0] + records[1]:
        record.pop("assignment_seconds", None)
    assert records[0] == records[1]
    if not params:
        layer = next(r for r in records[0] if r["group"] == "model.layers.0")
        assert layer["heads_moved"] > 0


def test_nan_in_an_attention_group_in_row_blocks_is_named(heads, tmp_path):
    base, a, b = heads
    tensors = state(a)
    tensors["model.layers.0.self_attn.o_proj.weight"][1500, 7] = float("nan")
    bad = tmp_path / "bad"
    shutil.copytree(a, bad)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    cfg = merge_config("hierarchical", (base, bad, b), {})
    with pytest.raises(MergeError, match=r"'model.layers.0.self_attn.o_proj.weight' of .*bad "
                                         r"has NaN or inf values"):  # fmt: skip
        medmerge.merge(cfg, tmp_path / "out", progress=False, max_memory="4MB")
    assert not (tmp_path / "out").exists()
