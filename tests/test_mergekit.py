"""mergekit configs run unchanged and mean what they mean in mergekit 0.1.5.

A corpus of configs shaped like published ones (tests/mergekit_configs) merges end to end on a
tiny family; each of medmerge's former silent differences from mergekit is pinned to mergekit's
behaviour; and, where a side environment with mergekit is given, every shared deterministic
method is compared with mergekit's own output.
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import leftovers, logits, state

import medmerge
from medmerge.errors import ConfigError
from medmerge.methods import REGISTRY, REQUIRED
from medmerge.methods import spherical as sph
from medmerge.synthetic import tiny_config, write_family

CORPUS = Path(__file__).parent / "mergekit_configs"
LAYERS = 8


@pytest.fixture(scope="module")
def family8(tmp_path_factory) -> list[Path]:
    """A base and three fine-tunes of an 8-layer tiny Mistral."""
    root = tmp_path_factory.mktemp("family8")
    config = tiny_config("mistral", num_hidden_layers=LAYERS)
    return write_family(root, config, seed=4, members=3, shard_size=200_000)


def localize(text: str, family: list[Path]) -> tuple[str, int]:
    """A corpus config with its models mapped to the family (the base model to the base, the
    others in order of appearance to the fine-tunes) and its layer ranges scaled to the family;
    and the merged model's layer count."""
    documents = [d for d in yaml.safe_load_all(text) if d]
    stages = {d["name"] for d in documents[:-1] if d.get("name")}
    bases = {d["base_model"] for d in documents if d.get("base_model")} - stages
    names: dict[str, str] = {}

    def model(ref: str) -> str:
        if ref in stages:
            return ref
        if ref not in names:
            others = len([r for r in names if r not in bases])
            names[ref] = str(family[0]) if ref in bases else str(family[1 + others % 3])
        return names[ref]

    ends = [s["layer_range"][1] for d in documents for sl in d.get("slices", [])
            for s in sl["sources"]]  # fmt: skip
    scale = LAYERS / max(ends) if ends and max(ends) > LAYERS else 1

    def walk(node):
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                if k in ("model", "base_model", "tokenizer_source") and isinstance(v, str):
                    out[k] = model(v)
                elif k == "layer_range":
                    start = math.floor(v[0] * scale)
                    out[k] = [start, start + round((v[1] - v[0]) * scale)]
                else:
                    out[k] = walk(v)
            return out
        return [walk(v) for v in node] if isinstance(node, list) else node

    mapped = [walk(d) for d in documents]
    final = mapped[-1]
    layers = sum(sl["sources"][0]["layer_range"][1] - sl["sources"][0]["layer_range"][0]
                 for sl in final["slices"]) if "slices" in final else LAYERS  # fmt: skip
    return yaml.safe_dump_all(mapped, sort_keys=False), layers


@pytest.mark.parametrize("name", sorted(p.name for p in CORPUS.glob("*.yaml")))
def test_corpus_config_merges_unchanged(family8, tmp_path, name):
    text = (CORPUS / name).read_text()
    assert text.startswith("# shape of: "), "every corpus config names the config it follows"
    localized, layers = localize(text, family8)
    path = tmp_path / name
    path.write_text(localized)
    out = medmerge.merge(path, tmp_path / "out", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == layers
    merged = state(out)
    assert {int(m.group(1)) for n in merged if (m := re.search(r"layers\.(\d+)\.", n))} == set(
        range(layers)
    )
    assert torch.isfinite(logits(out)).all()
    assert leftovers(tmp_path / "out") == [tmp_path / "out"]  # no intermediates left beside


# ---- mergekit's meaning, pinned ---------------------------------------------------------


def test_the_sparse_family_has_mergekits_parameters_and_defaults():
    expected = {  # (normalize, rescale) as mergekit's generalized task arithmetic registers them
        "task_arithmetic": (False, False),
        "ties": (True, False),
        "dare_ties": (False, True),
        "dare_linear": (False, True),
        "breadcrumbs": (False, False),
        "breadcrumbs_ties": (False, False),
        "della": (True, True),
        "della_linear": (False, True),
    }
    for name, (normalize, rescale) in expected.items():
        method = REGISTRY[name]
        d = method.defaults
        assert (d["normalize"], d["rescale"], d["int8_mask"], d["lambda_"]) == (
            normalize, rescale, False, 1.0,
        ), name  # fmt: skip
        assert d["density"] == 1.0 and d["weight"] is REQUIRED, name
        assert {"weight", "density"} <= method.per_model, name
    assert (
        REGISTRY["della"].defaults["epsilon"] == 0.15 and "epsilon" in REGISTRY["della"].per_model
    )
    assert REGISTRY["breadcrumbs"].defaults["gamma"] == 0.01
    assert REGISTRY["slerp"].defaults["t"] is REQUIRED
    assert "weight" not in REGISTRY["karcher"].defaults


def delta_l1(folder, base, name):
    return float((state(folder)[name].double() - state(base)[name].double()).abs().sum())


def test_dare_rescales_to_the_l1_norm_by_default(mistral, tmp_path):
    """mergekit 0.1.x: the survivors of the random drop are scaled so that the task vector's
    L1 norm is kept (not by 1/p per entry, which stays available as rescale: inverse_density)."""
    base, a, _ = mistral
    model = {"model": str(a), "parameters": {"weight": 1.0, "density": 0.5}}
    cfg = {"merge_method": "dare_linear", "base_model": str(base), "dtype": "float32",
           "models": [model]}  # fmt: skip
    out = medmerge.merge(cfg, tmp_path / "l1", progress=False)
    for name in ("model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight"):
        assert delta_l1(out, base, name) == pytest.approx(delta_l1(a, base, name), rel=1e-5)
    cfg["parameters"] = {"rescale": "inverse_density"}
    unbiased = medmerge.merge(cfg, tmp_path / "p", progress=False)
    kept = state(out)["model.norm.weight"] != state(base)["model.norm.weight"]
    ratio = (state(unbiased)["model.norm.weight"] - state(base)["model.norm.weight"])[kept] / (
        state(a)["model.norm.weight"] - state(base)["model.norm.weight"]
    )[kept]
    torch.testing.assert_close(ratio, torch.full_like(ratio, 2.0))  # divided by p = 0.5


def test_gradients_put_embeddings_head_and_final_norm_at_t0(mistral, tmp_path):
    """mergekit (since 0.1.2): tensors outside the layers take a gradient's first value."""
    base, a, _ = mistral
    cfg = {"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32",
           "models": [{"model": str(a), "parameters": {"weight": [0.2, 1.0]}}]}  # fmt: skip
    out = state(medmerge.merge(cfg, tmp_path / "m", progress=False))
    B, A = ({k: v.float() for k, v in state(x).items()} for x in (base, a))
    for name, w in (("lm_head.weight", 0.2), ("model.norm.weight", 0.2),
                    ("model.embed_tokens.weight", 0.2), ("model.layers.0.mlp.up_proj.weight", 0.2),
                    ("model.layers.1.mlp.up_proj.weight", 1.0)):  # fmt: skip
        torch.testing.assert_close(out[name], B[name] + w * (A[name] - B[name]), msg=name)


def test_linear_takes_a_base_that_is_not_among_the_models(mistral, tmp_path):
    """mergekit adds base_model to the inputs; linear weighs it like the others."""
    base, a, b = mistral
    cfg = {"merge_method": "linear", "base_model": str(base), "dtype": "float32",
           "models": [{"model": str(a)}, {"model": str(b), "parameters": {"weight": 2.0}}],
           "parameters": {"weight": 1.0}}  # fmt: skip
    out = state(medmerge.merge(cfg, tmp_path / "m", progress=False))
    W, A, B = ({k: v.float() for k, v in state(x).items()} for x in (base, a, b))
    for name in out:
        torch.testing.assert_close(out[name], (W[name] + A[name] + 2 * B[name]) / 4, msg=name)


def test_slerp_of_two_models_beside_an_unlisted_base_is_refused_before_reading(mistral, tmp_path):
    base, a, b = mistral
    cfg = {"merge_method": "slerp", "base_model": str(base), "parameters": {"t": 0.5},
           "models": [{"model": str(a)}, {"model": str(b)}]}  # fmt: skip
    with pytest.raises(ConfigError, match="interpolates its base_model and one other model"):
        medmerge.merge(cfg, tmp_path / "m", progress=False)
    assert leftovers(tmp_path / "m") == []
    cfg["models"] = [{"model": str(base)}, {"model": str(b)}]
    out = state(medmerge.merge(cfg, tmp_path / "ok", dtype="float32", progress=False))
    direct = sph.slerp(state(base)["model.norm.weight"], [state(b)["model.norm.weight"]], t=0.5)
    torch.testing.assert_close(out["model.norm.weight"], direct)


def test_karcher_takes_the_base_as_an_input_and_no_weights(mistral, tmp_path, caplog):
    base, a, b = mistral
    models = [{"model": str(a), "parameters": {"weight": 0.9}}, {"model": str(b)}]
    cfg = {"merge_method": "karcher", "base_model": str(base), "dtype": "float32",
           "models": models}  # fmt: skip
    with caplog.at_level("WARNING", logger="medmerge"):
        out = state(medmerge.merge(cfg, tmp_path / "m", progress=False))
    assert any("karcher has no parameter 'weight'" in r.getMessage() for r in caplog.records)
    name = "model.layers.1.self_attn.q_proj.weight"
    inputs = [state(x)[name] for x in (a, b, base)]
    torch.testing.assert_close(out[name], sph.karcher(None, inputs), rtol=1e-6, atol=1e-7)


def test_model_stock_does_not_clamp_the_cosine():
    """Task vectors pointing apart give a negative ratio t, as in mergekit; `clamp_cosine`
    keeps medmerge's former t = 0 there."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(40, 30, generator=g)
    d = torch.randn(40, 30, generator=g)
    models = [base + d, base - 0.5 * d + 0.1 * torch.randn(40, 30, generator=g)]
    deltas = [(m - base).double().reshape(-1) for m in models]
    cos = float(deltas[0] @ deltas[1] / (deltas[0].norm() * deltas[1].norm()))
    assert cos < -0.5
    t = 2 * cos / (1 + cos)
    expected = base + t * ((models[0] - base) + (models[1] - base)) / 2
    torch.testing.assert_close(sph.model_stock(base, models), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(sph.model_stock(base, models, clamp_cosine=True), base)


def test_nuslerp_row_wise_takes_columns_as_its_vectors():
    """mergekit's nuslerp: without flattening, each row is a vector; row-wise, each column."""
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(6, 9, generator=g), torch.randn(6, 9, generator=g)

    def by_vectors(x, y, t):  # x, y: vectors as rows
        ux, uy = x / x.norm(dim=1, keepdim=True), y / y.norm(dim=1, keepdim=True)
        theta = torch.arccos((ux * uy).sum(1, keepdim=True))
        return (torch.sin((1 - t) * theta) * x + torch.sin(t * theta) * y) / torch.sin(theta)

    for row_wise, expected in (
        (False, by_vectors(a, b, 0.75)),
        (True, by_vectors(a.T, b.T, 0.75).T),
    ):
        out = sph.nuslerp(None, [a, b], weight=[0.25, 0.75], nuslerp_flatten=False,
                          nuslerp_row_wise=row_wise)  # fmt: skip
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def ref_nuslerp_pairwise(weights, vectors):
    """mergekit's nuslerp of vectors (the rows of float64 arrays), pairwise: each step
    interpolates the result so far and the next at t = w / (sum so far + w), its norms
    clamped to 1e-7, linear where 1 - cos^2 <= 1e-16."""

    def one(t, a, b):
        na, nb = max(np.linalg.norm(a), 1e-7), max(np.linalg.norm(b), 1e-7)
        cos = np.clip((a / na) @ (b / nb), -1, 1)
        if 1 - cos**2 <= 1e-16:
            return (1 - t) * a + t * b
        theta = math.acos(cos)
        return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)

    acc, acc_w = vectors[0], weights[0]
    for v, w in zip(vectors[1:], weights[1:]):
        t = 0.5 if abs(acc_w + w) < 1e-6 else w / (acc_w + w)
        acc = np.stack([one(t, x, y) for x, y in zip(acc, v)])
        acc_w += w
    return acc


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("mode", ["flat", "rows", "columns"])
def test_nuslerp_of_three_models_is_pairwise_in_every_mode(mode, with_base):
    """Vectors: the whole tensor, its rows, or (row-wise) its columns; three models pairwise.
    Vector 3's task vectors are tiny (norms under the 1e-7 clamp), vector 4 is 0 in one model
    and vector 5 is colinear in two."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(9, 6, generator=g) if with_base else torch.zeros(9, 6)
    base[3] = 0
    deltas = torch.randn(3, 9, 6, generator=g)
    deltas[:, 3] *= 1e-8
    deltas[0, 4] = 0
    deltas[2, 5] = 2 * deltas[1, 5]
    # the vectors are rows here; row-wise NuSLERP is given the transposed tensors
    layout = (lambda x: x.T.contiguous()) if mode == "columns" else (lambda x: x)
    out = sph.nuslerp(layout(base) if with_base else None, [layout(base + d) for d in deltas],
                      weight=[0.2, 0.5, 0.3], nuslerp_flatten=mode == "flat",
                      nuslerp_row_wise=mode == "columns")  # fmt: skip
    got = (layout(out) - base).double().numpy()
    vectors = [d.reshape(1, -1) if mode == "flat" else d for d in deltas.double().numpy()]
    expected = ref_nuslerp_pairwise([0.2, 0.5, 0.3], vectors).reshape(9, 6)
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-6)
    if mode != "flat":  # the tiny vector, to its own scale
        np.testing.assert_allclose(got[3], expected[3], rtol=1e-4, atol=0)


@pytest.mark.parametrize("use_kernels", ["1", "0"])
def test_ties_elects_positive_where_the_weighted_sum_is_zero(use_kernels, monkeypatch):
    """mergekit's sign election: a sum of exactly 0 elects +, so the positive entry is kept
    (and divided by its weight) where medmerge's former rule gave 0; a 0 agrees with nothing."""
    monkeypatch.setenv("MEDMERGE_KERNELS", use_kernels)
    base = torch.zeros(4)
    models = [torch.tensor([0.5, -0.5, 0.0, 0.25]), torch.tensor([-0.5, 0.5, 0.0, -0.25])]
    out = REGISTRY["ties"].fn(base, models, weight=[1.0, 1.0])
    assert out.tolist() == [0.5, 0.5, 0.0, 0.25]
    weighted = REGISTRY["ties"].fn(base, models, weight=[1.0, -1.0], normalize=False)
    assert weighted.tolist() == [1.0, -1.0, 0.0, 0.5]  # signs of w * d agree: both kept


@pytest.mark.parametrize("use_kernels", ["1", "0"])
def test_counts_are_mergekits(use_kernels, monkeypatch):
    """TIES keeps int(density n), at least one; Breadcrumbs keeps int(density n) below at most
    int(gamma n) outliers (fewer where they leave no room)."""
    monkeypatch.setenv("MEDMERGE_KERNELS", use_kernels)
    base = torch.zeros(1000)
    d = torch.arange(1, 1001, dtype=torch.float32)
    ties_ = REGISTRY["ties"].fn
    assert int((ties_(base, [d], weight=[1.0], density=[0.0019]) != 0).sum()) == 1
    assert int((ties_(base, [d], weight=[1.0], density=[0.0509]) != 0).sum()) == 50
    crumbs = REGISTRY["breadcrumbs"].fn(base, [d], weight=[1.0], density=[0.7], gamma=[0.5])
    kept = torch.nonzero(crumbs).squeeze(1)
    assert len(kept) == 700 and int(kept.max()) == 999 - 300  # 300 outliers, not 500


def test_della_epsilon_beyond_the_probabilities_is_refused_before_reading(mistral, tmp_path):
    base, a, b = mistral
    cfg = {"merge_method": "della", "base_model": str(base),
           "models": [{"model": str(a), "parameters": {"weight": 0.6}},
                      {"model": str(b), "parameters": {"weight": 0.4}}],
           "parameters": {"density": 0.66, "epsilon": 0.35, "lambda": 0.5}}  # fmt: skip
    with pytest.raises(ConfigError, match=r"della, tensor .*density \+ epsilon < 1"):
        medmerge.merge(cfg, tmp_path / "m", progress=False)
    assert leftovers(tmp_path / "m") == []
    cfg["parameters"] = {"density": 1, "epsilon": 0.1}  # density 1 keeps all: no bound applies
    assert medmerge.merge(cfg, tmp_path / "m", progress=False).is_dir()


def test_tokenizer_union_and_chat_template(mistral, tmp_path):
    """union of one vocabulary is that vocabulary; a token only one model has takes that
    model's row; chat_template auto takes the template most models have, a Jinja string is set
    as it is."""
    base, a, b = mistral
    cfg = {"merge_method": "ties", "base_model": str(base), "tokenizer": {"source": "union"},
           "chat_template": "{{ 'custom' }}",
           "models": [{"model": str(a), "parameters": {"weight": 1}},
                      {"model": str(b), "parameters": {"weight": 1}}]}  # fmt: skip
    out = medmerge.merge(cfg, tmp_path / "m", progress=False)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == "{{ 'custom' }}"
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(base).get_vocab()
    assert state(out).keys() == state(base).keys()
    other = tmp_path / "other"
    __import__("shutil").copytree(b, other)
    data = json.loads((other / "tokenizer.json").read_text())
    data["added_tokens"].append({**data["added_tokens"][-1], "id": 999, "content": "<|new|>"})
    (other / "tokenizer.json").write_text(json.dumps(data))
    cfg["models"][1]["model"] = str(other)
    union = medmerge.merge(cfg, tmp_path / "u", progress=False)
    new = AutoTokenizer.from_pretrained(union).convert_tokens_to_ids("<|new|>")
    own = AutoTokenizer.from_pretrained(other).convert_tokens_to_ids("<|new|>")
    embed = "model.embed_tokens.weight"
    assert torch.equal(state(union)[embed][new], state(other)[embed][own])
    cfg["models"][1]["model"] = str(b)
    cfg["chat_template"] = "chatml"
    tok = AutoTokenizer.from_pretrained(medmerge.merge(cfg, tmp_path / "c", progress=False))
    chat = [{"role": "user", "content": "Dose?"}]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nDose?<|im_end|>\n<|im_start|>assistant\n"
    templated = []
    for folder, template in ((a, "{{ 'A' }}"), (b, "{{ 'B' }}"), (other, "{{ 'B' }}")):
        copy = __import__("shutil").copytree(folder, tmp_path / f"t-{folder.name}")
        (copy / "chat_template.jinja").write_text(template)
        templated.append({"model": str(copy), "parameters": {"weight": 1}})
    cfg.update(models=templated, chat_template="auto", tokenizer={"source": "base"})
    out = medmerge.merge(cfg, tmp_path / "auto", progress=False)
    assert AutoTokenizer.from_pretrained(out).chat_template == "{{ 'B' }}"  # the most common


def test_slices_stack_layers_and_rename_them(family8, tmp_path):
    base, a, b, _ = family8
    cfg = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(b), "layer_range": [2, 8]}]},
    ]}  # fmt: skip
    out = state(medmerge.merge(cfg, tmp_path / "m", progress=False))
    A, B = state(a), state(b)
    for k in range(9):
        source, layer = (A, k) if k < 3 else (B, k - 1)
        name = f"model.layers.{k}.mlp.down_proj.weight"
        assert torch.equal(out[name], source[name.replace(f".{k}.", f".{layer}.")]), name
    assert torch.equal(out["model.embed_tokens.weight"], A["model.embed_tokens.weight"])
    assert torch.equal(out["lm_head.weight"], B["lm_head.weight"])  # after the last slice


def test_multi_document_intermediates_are_kept_only_where_asked(family8, tmp_path):
    base, a, b, _ = family8
    text = (
        f"name: first\nmerge_method: linear\nmodels: [{{model: {a}}}, {{model: {b}}}]\n"
        "parameters: {weight: 0.5}\n---\n"
        f"merge_method: task_arithmetic\nbase_model: {base}\n"
        "models: [{model: first, parameters: {weight: 1.0}}]\n"
    )
    path = tmp_path / "multi.yaml"
    path.write_text(text)
    out = medmerge.merge(path, tmp_path / "final", progress=False)
    A, B, M = state(a), state(b), state(out)
    for name in ("model.norm.weight", "model.layers.3.mlp.up_proj.weight"):
        expected = ((A[name].float() + B[name].float()) / 2).bfloat16()
        assert torch.equal(M[name], expected), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final", "multi.yaml"]
    medmerge.merge(path, tmp_path / "again", progress=False, intermediate_dir=tmp_path / "parts")
    assert (tmp_path / "parts" / "first" / "config.json").is_file()
    with pytest.raises(ConfigError, match="unique name for every document but at most one"):
        path.write_text(text.replace("name: first\n", ""))
        medmerge.merge(path, tmp_path / "x", progress=False)


# ---- against mergekit itself, where a side environment has it ------------------------------

MERGEKIT = os.environ.get("MEDMERGE_MERGEKIT_PYTHON")


@pytest.mark.skipif(not MERGEKIT, reason="set MEDMERGE_MERGEKIT_PYTHON to a python with mergekit")
def test_every_shared_deterministic_method_equals_mergekits_to_float_rounding(tmp_path):
    script = Path(__file__).parents[1] / "benchmarks" / "mergekit_equality.py"
    run = subprocess.run(
        [sys.executable, str(script), "--mergekit", MERGEKIT, "--json", str(tmp_path / "t.json")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    rows = json.loads((tmp_path / "t.json").read_text())
    assert len(rows) >= 20, run.stdout
    for label, result in rows:
        assert not isinstance(result, str), f"{label}: {result}"
        assert result[1] < 1e-6, f"{label}: {result}"  # relative difference: float32 rounding


def test_mergekit_config_shapes_cover_every_layout():
    texts = [p.read_text() for p in CORPUS.glob("*.yaml")]
    assert sum("slices:" in t for t in texts) >= 4 and sum("---" in t for t in texts) >= 1
    assert any("modules:" in t for t in texts) and any("int8_mask" in t for t in texts)
    assert np.unique([yaml.safe_load_all(t).__next__()["merge_method"] for t in texts]).size >= 15


def test_a_slice_may_name_its_own_base(family8, tmp_path):
    """A slice's `base_model` stands in for the config's: a method that needs a base runs
    without a top-level one."""
    base, a, b, _ = family8
    sources = [{"model": str(base), "layer_range": [0, 4]},
               {"model": str(a), "layer_range": [4, 8], "parameters": {"weight": 1.0}}]  # fmt: skip
    cfg = {"merge_method": "task_arithmetic", "dtype": "float32",
           "slices": [{"base_model": str(base), "sources": sources}]}  # fmt: skip
    out = state(medmerge.merge(cfg, tmp_path / "m", progress=False))
    B, A = ({k: v.float() for k, v in state(x).items()} for x in (base, a))
    name = "model.layers.1.mlp.up_proj.weight"  # base layer 1 plus (a's layer 5 - base layer 1)
    torch.testing.assert_close(out[name], A[name.replace(".1.", ".5.")])
    assert len({n for n in out if ".layers." in n}) == len({n for n in B if ".layers.3." in n}) * 4
