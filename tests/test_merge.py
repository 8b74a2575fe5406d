"""Merges of tiny real-architecture models, checked against formulas computed here."""

import hashlib
import json
import re

import pytest
import torch
import yaml
from conftest import logits, state

import medmerge
from medmerge.config import MergeConfig
from medmerge.io.card import PROVENANCE
from medmerge.methods import REGISTRY


def config(method, base, models, weights, **extra):
    """A merge of `models`; their base named where the method takes it beside them (linear
    would take it as one more model, as mergekit does)."""
    cfg = {
        "merge_method": method,
        "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(models, weights)],
    }
    if REGISTRY[method].takes_base(len(models)):
        cfg["base_model"] = str(base)
    cfg.update(extra)
    return cfg


def f64(folder):
    return {k: v.double() for k, v in state(folder).items()}


@pytest.mark.parametrize("alpha", [0.5, 0.3])
def test_linear_is_equation_1(family, tmp_path, alpha):
    base, a, b = family
    out = medmerge.merge(
        config("linear", base, [a, b], [1 - alpha, alpha]),
        tmp_path / "m",
        dtype="float32",
        progress=False,
    )
    A, B, M = f64(a), f64(b), f64(out)
    assert M.keys() == A.keys()
    for name in M:
        expected = (1 - alpha) * A[name] + alpha * B[name]
        torch.testing.assert_close(M[name], expected, rtol=1e-6, atol=1e-7, msg=name)


def test_linear_normalize(family, tmp_path):
    base, a, b = family
    out = medmerge.merge(
        config("linear", base, [a, b], [2.0, 6.0]), tmp_path / "n", dtype="float32", progress=False
    )
    out_raw = medmerge.merge(
        config("linear", base, [a, b], [2.0, 6.0], parameters={"normalize": False}),
        tmp_path / "r",
        dtype="float32",
        progress=False,
    )
    A, B = f64(a), f64(b)
    M, R = f64(out), f64(out_raw)
    for name in M:
        torch.testing.assert_close(M[name], 0.25 * A[name] + 0.75 * B[name], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(R[name], 2 * A[name] + 6 * B[name], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_task_arithmetic_is_equation_2(family, tmp_path, alpha):
    base, a, b = family
    out = medmerge.merge(
        config("task_arithmetic", base, [a, b], [alpha, 1 - alpha]),
        tmp_path / "m",
        dtype="float32",
        progress=False,
    )
    W, A, B, M = f64(base), f64(a), f64(b), f64(out)
    for name in M:
        expected = W[name] + alpha * (A[name] - W[name]) + (1 - alpha) * (B[name] - W[name])
        torch.testing.assert_close(M[name], expected, rtol=1e-6, atol=1e-7, msg=name)


def test_bf16_output_is_the_rounded_float32_result(mistral, tmp_path):
    base, a, b = mistral
    cfg = config("task_arithmetic", base, [a, b], [0.7, 0.6])
    m32 = state(medmerge.merge(cfg, tmp_path / "f32", dtype="float32", progress=False))
    m16 = state(medmerge.merge(cfg, tmp_path / "bf16", progress=False))
    for name, t in m16.items():
        assert t.dtype == torch.bfloat16
        assert torch.equal(t, m32[name].to(torch.bfloat16)), name


def test_gradient_and_filtered_parameters(mistral, tmp_path):
    """weight as a gradient over layers for attention, a constant elsewhere (mergekit syntax)."""
    base, a, b = mistral
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [
            {
                "model": str(a),
                "parameters": {
                    "weight": [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.25}]
                },
            },
            {"model": str(b)},
        ],
        "parameters": {"weight": 0.5},
    }
    out = medmerge.merge(cfg, tmp_path / "m", dtype="float32", progress=False)
    W, A, B, M = f64(base), f64(a), f64(b), f64(out)
    for name in M:
        layer = re.search(r"layers\.(\d+)\.", name)
        wa = (int(layer.group(1)) / 1.0) if (layer and "self_attn" in name) else 0.25
        expected = W[name] + wa * (A[name] - W[name]) + 0.5 * (B[name] - W[name])
        torch.testing.assert_close(M[name], expected, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_output_loads_in_transformers_and_runs(family, device, tmp_path, method):
    base, a, b = family
    cfg = config(method, base, [a, b], [0.5, 0.5])
    out = medmerge.merge(cfg, tmp_path / "m", device=device, progress=False)
    result = logits(out)
    assert result.shape == (1, 16, 384) and torch.isfinite(result).all()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    assert (
        cfg["tie_word_embeddings"]
        == json.loads((base / "config.json").read_text())["tie_word_embeddings"]
    )


def test_merging_a_model_with_itself_gives_back_its_logits(family, tmp_path):
    base, a, _ = family
    for method in ("linear", "task_arithmetic"):
        out = medmerge.merge(
            config(method, base, [a, a], [0.5, 0.5]), tmp_path / method, progress=False
        )
        assert torch.equal(logits(out), logits(a)), method


def test_base_listed_among_models_is_ignored_by_task_arithmetic(mistral, tmp_path):
    base, a, _ = mistral
    with_base = config("task_arithmetic", base, [base, a], [0.3, 1.0])
    without = config("task_arithmetic", base, [a], [1.0])
    x = state(medmerge.merge(with_base, tmp_path / "x", progress=False))
    y = state(medmerge.merge(without, tmp_path / "y", progress=False))
    assert all(torch.equal(x[n], y[n]) for n in x)


def test_provenance_metadata_and_tokenizer(mistral, tmp_path):
    base, a, b = mistral
    cfg = config("task_arithmetic", base, [a, b], [0.5, 0.5], tokenizer_source=str(b))
    out = medmerge.merge(cfg, tmp_path / "m", shard_size="60KB", seed=7, progress=False)
    prov = json.loads((out / PROVENANCE).read_text())
    assert prov["merge_method"] == "task_arithmetic" and prov["seed"] == 7
    assert prov["medmerge_version"] == medmerge.__version__
    roles = [(i["role"], i["path"]) for i in prov["inputs"]]
    assert roles == [
        ("base", str(base.resolve())),
        ("model", str(a.resolve())),
        ("model", str(b.resolve())),
    ]
    for record in prov["inputs"]:
        folder = next(p for p in (base, a, b) if str(p.resolve()) == record["path"])
        shards = sorted(folder.glob("*.safetensors"))
        assert [f["file"] for f in record["files"]] == [s.name for s in shards]
        for f, shard in zip(record["files"], shards):
            assert f["sha256"] == hashlib.sha256(shard.read_bytes()).hexdigest()
    again = MergeConfig.model_validate(yaml.safe_load((out / "merge_config.yaml").read_text()))
    assert again == MergeConfig.model_validate(cfg)
    assert (out / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    assert (out / "generation_config.json").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert sorted(prov["output_files"]) == sorted(p.name for p in out.glob("*.safetensors"))


def test_api_accepts_path_dict_and_model_and_output_is_reproducible(mistral, tmp_path):
    base, a, b = mistral
    cfg = config("linear", base, [a, b], [0.5, 0.5], dtype="float16")
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    outs = [
        medmerge.merge(path, tmp_path / "p", progress=False),
        medmerge.merge(cfg, tmp_path / "d", progress=False),
        medmerge.merge(MergeConfig.model_validate(cfg), tmp_path / "m", progress=False),
    ]
    digests = {hashlib.sha256((o / "model.safetensors").read_bytes()).hexdigest() for o in outs}
    assert len(digests) == 1
    assert next(iter(state(outs[0]).values())).dtype == torch.float16


def test_a_merged_model_is_a_valid_input(mistral, tmp_path):
    base, a, b = mistral
    first = medmerge.merge(
        config("linear", base, [a, b], [0.5, 0.5]), tmp_path / "first", progress=False
    )
    second = medmerge.merge(
        config("task_arithmetic", base, [first, a], [1.0, 0.0]), tmp_path / "second", progress=False
    )
    assert torch.equal(logits(second), logits(first))
