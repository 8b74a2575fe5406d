"""Every popular decoder family, on tiny random models built from its transformers config: every
method merges it into a model that loads and runs; head alignment undoes a planted permutation
of heads, however the family stores them; `check` sees its layers and tensor types."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import logits, state
from method_cases import merge_config
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

import medmerge
from medmerge import plan
from medmerge.check import check
from medmerge.errors import ConfigError
from medmerge.methods import REGISTRY
from medmerge.synthetic import ARCHITECTURES, tiny_config, write_family

FAMILIES = [a for a in ARCHITECTURES if a not in ("mistral", "llama")]  # those: everywhere else


@pytest.fixture(scope="module", params=FAMILIES)
def arch_family(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    return request.param, write_family(root, tiny_config(request.param), seed=7)


METHODS = sorted({m.name for m in REGISTRY.values()})


def test_every_method_merges_every_family_into_a_model_that_runs(arch_family, device, tmp_path):
    arch, (base, a, b) = arch_family
    tokens = torch.arange(3, 19).unsqueeze(0)
    for method in METHODS:
        cfg = merge_config(method, (base, a, b))
        out = medmerge.merge(cfg, tmp_path / method, device=device, progress=False)
        assert logits(out, tokens).isfinite().all(), (arch, method)
        shutil.rmtree(out)


def test_a_model_merged_with_itself_gives_back_its_logits(arch_family, tmp_path):
    arch, (_, a, _) = arch_family
    twin = shutil.copytree(a, tmp_path / "twin")
    cfg = {"merge_method": "linear", "dtype": "bfloat16",
           "models": [{"model": str(a), "parameters": {"weight": 1.0}},
                      {"model": str(twin), "parameters": {"weight": 1.0}}]}  # fmt: skip
    out = medmerge.merge(cfg, tmp_path / "out", progress=False)
    assert torch.equal(logits(out), logits(a))


# ---- a planted head permutation, written here independently of medmerge's alignment code ----


def _head_rows(heads: list[int], width: int) -> torch.Tensor:
    """Row indices that put old block heads[i] (of `width` rows) at block i."""
    return torch.cat([torch.arange(h * width, (h + 1) * width) for h in heads])


def _planted(tensors: dict, config: dict, perms: dict) -> dict:
    """`tensors` with each layer's heads permuted by perms[layer] = (q, kv): every tensor that
    carries the head index, as each family stores it."""
    H, K = config["num_attention_heads"], config.get("num_key_value_heads") or 0
    K = K or H
    D = config.get("head_dim") or config["hidden_size"] // H
    out = dict(tensors)
    for layer, (q, kv) in perms.items():
        qr, kr = _head_rows(q, D), _head_rows(kv, D)
        for name, t in tensors.items():
            if not name.startswith(layer + "."):
                continue
            part = name[len(layer) + 1 :]
            if part.startswith(("self_attn.q_proj.", "self_attn.q_norm.")) and len(t) == H * D:
                out[name] = t[qr]
            elif part.startswith(("self_attn.k_proj.", "self_attn.v_proj.", "self_attn.k_norm.")):
                out[name] = t[kr] if len(t) == K * D else t
            elif part in ("self_attn.o_proj.weight", "attention.dense.weight"):
                out[name] = t[:, qr]
            elif part == "self_attn.qkv_proj.weight":
                out[name] = t[torch.cat([qr, H * D + kr, H * D + K * D + kr])]
            elif part.startswith("attention.query_key_value."):
                out[name] = t[_head_rows(q, 3 * D)]
    return out


def _attention_parts(name: str) -> bool:
    return any(p in name for p in ("self_attn.", "attention.query_key_value", "attention.dense"))


def _write(src, dst, tensors):
    shutil.copytree(src, dst)
    for f in dst.glob("model*.safetensors*"):
        f.unlink()
    save_file({k: v.contiguous() for k, v in tensors.items()}, dst / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    return dst


def _spy_group_blocks(monkeypatch) -> list[dict]:
    """The groups the engine will merge in row blocks (each a dict name -> row blocks)."""
    blocked, group_blocks = [], plan._group_blocks

    def spy(*args):
        found = group_blocks(*args)
        if found:
            blocked.append(found)
        return found

    monkeypatch.setattr(plan, "_group_blocks", spy)
    return blocked


def test_joint_alignment_undoes_a_planted_head_permutation(arch_family, tmp_path, monkeypatch):
    arch, (base, a, _) = arch_family
    config = json.loads((a / "config.json").read_text())
    H = config["num_attention_heads"]
    K = config.get("num_key_value_heads") or H
    g = torch.Generator().manual_seed(11)
    # attention made to matter in a tiny random model's logits
    sharp = {k: v.float() * (6.0 if _attention_parts(k) else 1.0) for k, v in state(a).items()}
    a = _write(a, tmp_path / "a", sharp)
    layers = sorted({n.split(".self_attn.")[0].split(".attention.")[0]
                     for n in sharp if _attention_parts(n)})  # fmt: skip
    perms = {}
    for layer in layers:
        kv = torch.randperm(K, generator=g).tolist()
        group = H // K
        q = [kv[k] * group + int(i) for k in range(K) for i in torch.randperm(group, generator=g)]
        perms[layer] = (q, kv)
    planted = _planted(sharp, config, perms)
    b_exact = _write(a, tmp_path / "b_exact", planted)
    torch.testing.assert_close(logits(b_exact), logits(a), rtol=1e-4, atol=1e-4)  # same function
    noisy = {k: v + 1e-3 * v.std() * torch.randn(v.shape, generator=g) for k, v in planted.items()}
    b = _write(a, tmp_path / "b", noisy)

    def merge(alignment, out, max_memory=None):
        cfg = {"merge_method": "hierarchical", "base_model": str(base), "dtype": "float32",
               "parameters": {"alignment": alignment, "weighting": "fixed", "weight": 0.5},
               "models": [{"model": str(a)}, {"model": str(b)}]}  # fmt: skip
        return medmerge.merge(cfg, tmp_path / out, progress=False, max_memory=max_memory)

    reference = logits(a)
    aligned = merge("joint", "aligned")
    err_aligned = (logits(aligned) - reference).abs().max()
    err_unaligned = (logits(merge("none", "unaligned")) - reference).abs().max()
    assert err_aligned < 0.1 * err_unaligned, (arch, err_aligned, err_unaligned)
    found = {r["group"]: r for r in json.loads((aligned / "merge_diagnostics.json").read_text())[
        "records"] if r["alignment"] == "joint"}  # fmt: skip
    for layer, (q, kv) in perms.items():  # B's heads put back: the inverse of the planted ones
        assert found[layer]["q_perm"] == sorted(range(H), key=q.__getitem__), (arch, layer)
        assert found[layer]["kv_perm"] == sorted(range(K), key=kv.__getitem__), (arch, layer)
    # every layer's head-indexed tensors read from the shards in row blocks, B's permuted
    # heads read from where they lie: the same bits
    blocked = _spy_group_blocks(monkeypatch)
    for alignment in ("joint", "per_tensor"):
        whole = aligned if alignment == "joint" else merge(alignment, alignment)
        in_blocks = merge(alignment, f"{alignment}-blocks", max_memory="16KB")
        torch.testing.assert_close(state(in_blocks), state(whole), rtol=0, atol=0)
    assert sum(any(_attention_parts(n) for n in how) for how in blocked) == 2 * len(perms)


def test_an_unknown_architecture_merges_but_alignment_names_the_fix(tmp_path):
    base, a, b = write_family(tmp_path / "x", tiny_config("mistral"), seed=2)
    for folder in (base, a, b):
        config = json.loads((folder / "config.json").read_text())
        config["model_type"] = "mistral_custom"
        (folder / "config.json").write_text(json.dumps(config))
    assert medmerge.merge(
        merge_config("ties", (base, a, b)), tmp_path / "ties", progress=False
    ).is_dir()
    with pytest.raises(ConfigError, match="model_type 'mistral_custom'.*alignment: none"):
        medmerge.merge(merge_config("hierarchical", (base, a, b)), tmp_path / "h", progress=False)
    cfg = merge_config("hierarchical", (base, a, b))
    cfg["parameters"] = {"alignment": "none"}
    assert medmerge.merge(cfg, tmp_path / "none", progress=False).is_dir()


def test_check_sees_every_layer_and_tensor_type(arch_family):
    arch, (base, a, b) = arch_family
    report = check(base, [a, b], progress=False)
    assert report.compatible
    pair = report.pairs[0]
    assert {k for k in pair.per_layer if k != "other"} == {"0", "1"}
    expected = {"qkv"} if arch in ("phi3", "gpt_neox") else {"q", "k", "v"}
    expected |= {"o", "norms", "embeddings"}
    if arch in ("mixtral", "qwen2_moe"):
        expected |= {"experts", "router"}
    assert expected <= set(pair.per_type), (arch, set(pair.per_type))
    assert "other" not in pair.per_type, (arch, set(pair.per_type))


# ---- experts: both layouts, and a planted permutation of experts written here ----

MOE = ["mixtral", "qwen2_moe"]
EXPERT = re.compile(r"^(.*\.layers\.\d+\.)(mlp|block_sparse_moe)\.(gate\.|experts\.)(.*)$")


def _published(src: Path, dst: Path) -> Path:
    """`src` as transformers saves it: one tensor per expert, as checkpoints on the Hub store
    experts (transformers holds them fused in memory)."""
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=torch.float32)
    model.load_state_dict(state(src), strict=False)  # a tied head is absent
    model.save_pretrained(dst)  # a model loaded from the fused layout would save it fused
    for f in src.glob("tokenizer*"):
        shutil.copy(f, dst / f.name)
    return dst


def _planted_experts(tensors: dict, perm: list[int]) -> dict:
    """Every layer's experts reordered, new expert e being old expert perm[e]: the router's
    rows, fused expert tensors along their first axis, per-expert tensors by name."""
    out = dict(tensors)
    for name, t in tensors.items():
        m = EXPERT.match(name)
        if not m:
            continue
        layer, block, kind, rest = m.groups()
        number, _, tail = rest.partition(".")
        if kind == "experts." and number.isdigit():
            out[name] = tensors[f"{layer}{block}.experts.{perm[int(number)]}.{tail}"]
        else:  # the router, or experts fused along axis 0
            out[name] = t[perm]
    return out


@pytest.fixture(scope="module", params=[(a, layout) for a in MOE for layout in ("fused", "each")],
                ids=lambda p: "-".join(p))  # fmt: skip
def moe_family(request, tmp_path_factory):
    arch, layout = request.param
    root = tmp_path_factory.mktemp(f"{arch}-{layout}")
    folders = write_family(root / "fused", tiny_config(arch), seed=5)
    if layout == "each":
        fused, folders = folders, [_published(f, root / f.name) for f in folders]
        assert any(".experts.0." in n for n in state(folders[0])), "not the per-expert layout"
        torch.testing.assert_close(logits(folders[1]), logits(fused[1]))  # the same model
    return arch, layout, folders


def test_moe_layouts_merge_with_every_method_into_models_that_run(moe_family, device, tmp_path):
    arch, layout, (base, a, b) = moe_family
    for method in ("linear", "ties", "della", "slerp", "hierarchical"):
        cfg = merge_config(method, (base, a, b))
        if method == "hierarchical":
            cfg["parameters"] = {"align_experts": True}
        out = medmerge.merge(cfg, tmp_path / method, device=device, progress=False)
        assert sorted(state(out)) == sorted(state(a)), (arch, layout, method)
        assert logits(out).isfinite().all(), (arch, layout, method)
    per_type = check(base, [a, b], progress=False).pairs[0].per_type
    assert {"experts", "router"} <= set(per_type), (arch, layout, sorted(per_type))


def test_expert_alignment_undoes_a_planted_permutation_of_experts(moe_family, tmp_path,
                                                                  monkeypatch):  # fmt: skip
    arch, layout, (base, a, _) = moe_family
    config = json.loads((a / "config.json").read_text())
    n = config.get("num_local_experts") or config["num_experts"]
    # the experts (and the router, which picks them) made to matter in the tiny model's logits
    sharp = {k: v.float() * (4.0 if EXPERT.match(k) else 1.0) for k, v in state(a).items()}
    a = _write(a, tmp_path / "a", sharp)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(3)).tolist()
    assert all(i != p for i, p in enumerate(perm)), "every expert moves"
    planted = _planted_experts(sharp, perm)
    b_exact = _write(a, tmp_path / "b_exact", planted)
    torch.testing.assert_close(logits(b_exact), logits(a), rtol=1e-4, atol=1e-4)  # same function
    assert not torch.allclose(
        logits(
            _write(
                a,
                tmp_path / "half",
                {**sharp, **{k: v for k, v in planted.items() if "gate." in k}},
            )
        ),
        logits(a),
    )  # the router matters
    g = torch.Generator().manual_seed(4)
    noisy = {k: v + 1e-3 * v.std() * torch.randn(v.shape, generator=g) for k, v in planted.items()}
    b = _write(a, tmp_path / "b", noisy)

    def merge(align_experts, out, max_memory=None):
        cfg = {"merge_method": "hierarchical", "base_model": str(base), "dtype": "float32",
               "parameters": {"align_experts": align_experts, "weighting": "fixed",
                              "weight": 0.5},
               "models": [{"model": str(a)}, {"model": str(b)}]}  # fmt: skip
        return medmerge.merge(cfg, tmp_path / out, progress=False, max_memory=max_memory)

    reference = logits(a)
    aligned = merge(True, "aligned")
    err_aligned = (logits(aligned) - reference).abs().max()
    err_unaligned = (logits(merge(False, "unaligned")) - reference).abs().max()
    assert err_aligned < 0.1 * err_unaligned, (arch, layout, err_aligned, err_unaligned)
    diagnostics = json.loads((aligned / "merge_diagnostics.json").read_text())
    found = [r for r in diagnostics["records"] if r["alignment"] == "experts"]
    assert len(found) == config["num_hidden_layers"]
    inverse = sorted(range(n), key=perm.__getitem__)  # B's experts put back
    assert all(r["expert_perm"] == inverse and r["experts_moved"] == n for r in found)
    assert len(diagnostics["summary"]["layers_with_moved_experts"]) == len(found)
    # the experts read from the shards in row blocks: the same permutation and bits
    blocked = _spy_group_blocks(monkeypatch)
    in_blocks = merge(True, "aligned_blocks", max_memory="16KB")
    assert sum(any(EXPERT.match(n) for n in how) for how in blocked) == len(found)
    torch.testing.assert_close(state(in_blocks), state(aligned), rtol=0, atol=0)


def test_expert_alignment_on_a_model_without_experts_names_the_fix(arch_family, tmp_path):
    arch, (base, a, b) = arch_family
    cfg = merge_config("hierarchical", (base, a, b))
    cfg["parameters"] = {"align_experts": True}
    if arch in MOE:
        assert medmerge.merge(cfg, tmp_path / "out", progress=False).is_dir()
    else:
        model_type = json.loads((a / "config.json").read_text())["model_type"]
        with pytest.raises(ConfigError, match=f"model_type '{model_type}'.*align_experts"):
            medmerge.merge(cfg, tmp_path / "out", progress=False)
