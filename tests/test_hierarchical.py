"""The paper's Hierarchical Cosine-OT-LERP and its head alignment, on tiny Llama and Mistral-GQA."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import logits, state
from safetensors.torch import save_file
from scipy.optimize import linear_sum_assignment

import medmerge
from medmerge.engine import DIAGNOSTICS
from medmerge.errors import IncompatibleModelsError
from medmerge.methods.align import (
    HeadLayout,
    permute_heads,
    permute_segment,
    random_valid_permutation,
)
from medmerge.models.architectures import SEPARATE, segments

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def layout_of(folder):
    return HeadLayout.from_config(json.loads((folder / "config.json").read_text()))


def layers(tensors):
    return sorted({n.split(".self_attn.")[0] for n in tensors if ".self_attn." in n})


def permuted_model(src, dst, perms, noise=0.0, per_tensor=False, attention_scale=1.0):
    """Write a copy of `src` whose attention heads are permuted: `perms[layer] = (q, kv)`;
    `per_tensor` permutes each projection with its own random permutation instead.
    `attention_scale` > 1 makes attention matter in the logits of a tiny random model."""
    tensors = {
        k: v.float() * (attention_scale if ".self_attn." in k else 1.0)
        for k, v in state(src).items()
    }
    layout = layout_of(src)
    g = torch.Generator().manual_seed(99)
    for layer in layers(tensors):
        names = [n for n in tensors if n.startswith(layer + ".self_attn.")]
        if per_tensor:
            for n in names:
                count = layout.kv_heads if ("k_proj" in n or "v_proj" in n) else layout.heads
                perm = torch.randperm(count, generator=g).tolist()
                for seg in segments(n, tuple(tensors[n].shape), SEPARATE, layout):
                    tensors[n] = permute_segment(tensors[n], seg, perm, count)
        else:
            q, kv = perms[layer]
            tensors.update(permute_heads({n: tensors[n] for n in names}, q, kv, layout))
    if noise:
        tensors = {
            k: v + noise * v.std() * torch.randn(v.shape, generator=g) for k, v in tensors.items()
        }
    shutil.copytree(src, dst)
    for f in dst.glob("model*.safetensors*"):
        f.unlink()
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        dst / "model.safetensors",
        metadata={"format": "pt"},
    )
    return dst


def random_perms(folder, seed=0):
    layout = layout_of(folder)
    g = torch.Generator().manual_seed(seed)
    perms = {}
    for layer in layers(state(folder)):
        q, kv = random_valid_permutation(layout, g)
        while q == list(range(layout.heads)):
            q, kv = random_valid_permutation(layout, g)
        perms[layer] = (q, kv)
    return perms


def test_valid_permutation_preserves_function_per_tensor_does_not(family, tmp_path):
    _, a, _ = family
    same = permuted_model(a, tmp_path / "joint", random_perms(a))
    torch.testing.assert_close(logits(same), logits(a), rtol=1e-5, atol=1e-5)
    # why the paper's per-tensor permutation is wrong: q, k, v and o no longer line up
    broken = permuted_model(a, tmp_path / "per_tensor", None, per_tensor=True)
    assert (logits(broken) - logits(a)).abs().max() > 1e-3


def merge(base, a, b, out, **parameters):
    cfg = {
        "merge_method": "hierarchical",
        "base_model": str(base),
        "models": [{"model": str(a)}, {"model": str(b)}],
        "parameters": parameters,
        "dtype": "float32",
    }
    return medmerge.merge(cfg, out, progress=False)


def test_joint_alignment_recovers_a_planted_permutation(family, tmp_path):
    base, a, _ = family
    identity = {
        layer: (list(range(layout_of(a).heads)), list(range(layout_of(a).kv_heads)))
        for layer in layers(state(a))
    }
    a = permuted_model(a, tmp_path / "a", identity, attention_scale=20.0)
    planted = random_perms(a, seed=3)
    b = permuted_model(a, tmp_path / "b", planted, noise=0.01)
    aligned = merge(base, a, b, tmp_path / "aligned", weighting="fixed", weight=0.5)
    unaligned = merge(
        base, a, b, tmp_path / "unaligned", weighting="fixed", weight=0.5, alignment="none"
    )
    records = json.loads((aligned / DIAGNOSTICS).read_text())["records"]
    joint = {r["group"]: r for r in records if r["alignment"] == "joint"}
    for layer, (q, kv) in planted.items():
        assert joint[layer]["q_perm"] == np.argsort(q).tolist()
        assert joint[layer]["kv_perm"] == np.argsort(kv).tolist()
        assert joint[layer]["cost_after"] < joint[layer]["cost_before"]
    reference = logits(a)
    err_aligned = (logits(aligned) - reference).abs().max()
    err_unaligned = (logits(unaligned) - reference).abs().max()
    assert err_aligned < 0.1 * err_unaligned, (err_aligned, err_unaligned)


def ref_per_tensor(base, a, b, layout):
    """Algorithms 1 and 2 transcribed: w from unaligned deltas, then per-projection head matching
    (rows of q/k/v, columns of o) by 1 - cos and the Hungarian method, then LERP."""
    out = {}
    for name in a:
        da, db = a[name] - base[name], b[name] - base[name]
        cos = (da * db).sum() / (np.linalg.norm(da) * np.linalg.norm(db))
        w = max(0.0, cos)
        bt = b[name]
        proj = next((p for p in ATTN if f".{p}." in name), None)
        if proj:
            count = layout.kv_heads if proj in ("k_proj", "v_proj") else layout.heads
            d = layout.head_dim
            is_o = proj == "o_proj" and name.endswith("weight")

            def blocks(x, count=count, d=d, is_o=is_o):
                if is_o:
                    return x.reshape(x.shape[0], count, d).transpose(1, 0, 2).reshape(count, -1)
                return x.reshape(count, -1)

            ha, hb = blocks(a[name]), blocks(bt)
            ha = ha / np.linalg.norm(ha, axis=1, keepdims=True)
            hb = hb / np.linalg.norm(hb, axis=1, keepdims=True)
            rows, cols = linear_sum_assignment(1 - ha @ hb.T)
            perm = cols[np.argsort(rows)]
            if is_o:
                bt = bt.reshape(bt.shape[0], count, d)[:, perm].reshape(bt.shape)
            else:
                bt = bt.reshape(count, -1)[perm].reshape(bt.shape)
        out[name] = (1 - w) * a[name] + w * bt
    return out


def test_per_tensor_matches_a_transcription_of_the_paper(family, tmp_path):
    base, a, _ = family
    b = permuted_model(a, tmp_path / "b", random_perms(a, seed=5), noise=0.3)
    out = merge(base, a, b, tmp_path / "m", alignment="per_tensor")
    B, A, Bm, M = ({k: v.double().numpy() for k, v in state(x).items()} for x in (base, a, b, out))
    expected = ref_per_tensor(B, A, Bm, layout_of(a))
    for name in M:
        np.testing.assert_allclose(M[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_weights_are_the_clamped_cosine_and_negative_cosine_keeps_a(family, tmp_path):
    base, a, b = family
    out = merge(base, a, b, tmp_path / "m")
    diag = json.loads((out / DIAGNOSTICS).read_text())
    assert diag["summary"]["layers_with_moved_heads"] == []
    assert "identity permutation in all 2 layers" in diag["summary"]["verdict"]
    W, A, Bm = ({k: v.double() for k, v in state(x).items()} for x in (base, a, b))
    weights = {n: w for r in diag["records"] for n, w in r["weights"].items()}
    for name, w in weights.items():
        da, db = A[name] - W[name], Bm[name] - W[name]
        cos = float((da * db).sum() / (da.norm() * db.norm()))
        assert w == pytest.approx(max(0.0, cos), abs=1e-6), name
    # B's task vector is -A's: every cosine is -1, every weight 0, the merge is A
    opposite = tmp_path / "opposite"
    shutil.copytree(a, opposite)
    for f in opposite.glob("model*.safetensors*"):
        f.unlink()
    save_file(
        {n: (2 * W[n] - A[n]).float().contiguous() for n in A},
        opposite / "model.safetensors",
        metadata={"format": "pt"},
    )
    for alignment in ("joint", "none"):
        merged = state(merge(base, a, opposite, tmp_path / alignment, alignment=alignment))
        for name, t in merged.items():
            assert torch.equal(t, A[name].float()), name


def test_clamps_and_fixed_weighting(mistral, tmp_path):
    base, a, b = mistral
    out = merge(base, a, b, tmp_path / "m", weighting="fixed", weight=0.3, max_weight=0.2)
    A, Bm, M = (state(x) for x in (a, b, out))
    for name in M:
        torch.testing.assert_close(M[name], torch.lerp(A[name].float(), Bm[name].float(), 0.2))


def test_missing_head_counts_is_a_clear_error(mistral, tmp_path):
    base, a, b = mistral
    bad = []
    for folder in (base, a, b):
        copy = shutil.copytree(folder, tmp_path / folder.name)
        cfg = json.loads((copy / "config.json").read_text())
        del cfg["num_attention_heads"]
        (copy / "config.json").write_text(json.dumps(cfg))
        bad.append(copy)
    with pytest.raises(IncompatibleModelsError, match="no num_attention_heads"):
        merge(*bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_alias():
    from medmerge.methods import REGISTRY

    assert REGISTRY["cosine_ot_lerp"] is REGISTRY["hierarchical"]
