"""The Check stage on tiny models with known relationships."""

import json
import shutil

import pytest
import torch
from conftest import state
from safetensors.torch import save_file

from medmerge.check import CheckReport, check
from medmerge.synthetic import tiny_config, write_model


def rewrite(src, dst, fn):
    """Copy a model folder with every tensor replaced by fn(name, tensor)."""
    shutil.copytree(src, dst)
    for f in dst.glob("model*.safetensors*"):
        f.unlink()
    save_file(
        {n: fn(n, t).contiguous() for n, t in state(src).items()},
        dst / "model.safetensors",
        metadata={"format": "pt"},
    )
    return dst


def run(base, *models, **kw):
    return check(base, list(models), progress=False, **kw)


def test_identical_copies(mistral, tmp_path):
    base, a, _ = mistral
    twin = rewrite(a, tmp_path / "twin", lambda n, t: t)
    report = run(base, a, twin)
    assert report.compatible
    o = report.pairs[0].overall
    assert o.cosine == pytest.approx(1.0, abs=1e-6)
    assert o.sign_agreement == 1.0 and o.topk_overlap == 1.0
    assert o.norm_ratio == pytest.approx(1.0)
    assert any(
        "start simple" in r.advice and "cosine 1.000" in r.because for r in report.recommendations
    )


def test_independent_and_opposite_deltas(mistral, tmp_path):
    base, a, b = mistral
    report = run(base, a, b)
    assert abs(report.pairs[0].overall.cosine) < 0.1
    assert 0.45 < report.pairs[0].overall.sign_agreement < 0.55
    W = state(base)
    opposite = rewrite(a, tmp_path / "opp", lambda n, t: 2 * W[n].float() - t.float())
    report = run(base, a, opposite)
    o = report.pairs[0].overall
    assert o.cosine == pytest.approx(-1.0, abs=1e-3)
    assert o.sign_agreement < 0.01
    assert any("opposite directions" in r.advice for r in report.recommendations)
    for stats in report.pairs[0].per_type.values():
        assert stats.cosine < -0.99


def test_lineage_flags_a_random_model_posing_as_a_finetune(mistral, tmp_path):
    base, a, _ = mistral
    stranger = write_model(tmp_path / "stranger", tiny_config("mistral"), seed=99)
    report = run(base, a, stranger)
    by_model = {lin.model: lin for lin in report.lineage}
    assert by_model[str(a)].plausible_finetune
    assert 0.03 < by_model[str(a)].relative_delta < 0.08  # the fixture's 5% deltas
    assert not by_model[str(stranger)].plausible_finetune
    assert by_model[str(stranger)].relative_delta > 1.0
    assert set(by_model[str(a)].per_layer) == {"0", "1", "other"}
    assert any(
        str(stranger) in r.advice and "relative task vector" in r.because
        for r in report.recommendations
    )


@pytest.mark.parametrize(
    "variant, failing, detail",
    [
        (dict(arch="llama"), "config model_type", "differs"),
        (dict(intermediate_size=96), "tensors of", "with other shapes"),
    ],
)
def test_incompatible_models_fail_with_reasons(mistral, tmp_path, variant, failing, detail):
    base, a, _ = mistral
    arch = variant.pop("arch", "mistral")
    other = write_model(tmp_path / "other", tiny_config(arch, **variant))
    report = run(base, a, other)
    assert not report.compatible
    bad = [f for f in report.compatibility if not f.ok]
    assert any(f.check.startswith(failing) and detail in f.detail for f in bad), bad
    assert any(r.advice == "do not merge these models as they are" for r in report.recommendations)


def test_a_resized_vocabulary_is_mergeable_with_a_tokenizer_setting(mistral, tmp_path):
    base, a, _ = mistral
    other = write_model(tmp_path / "other", tiny_config("mistral", vocab_size=400))
    report = run(base, a, other)
    assert report.compatible
    vocab = next(f for f in report.compatibility if f.check == "config vocab_size")
    assert "differs" in vocab.detail and "tokenizer setting" in vocab.detail
    assert any("tokenizer_source: union" in r.advice for r in report.recommendations)


def test_adapter_is_reported_with_the_fix(mistral, tmp_path):
    base, a, _ = mistral
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    report = run(base, a, adapter)
    assert not report.compatible
    assert any(f.check == "full checkpoint, not an adapter" for f in report.compatibility)
    assert any("medmerge materialize" in r.advice for r in report.recommendations)


def test_json_report_schema_and_heatmap(mistral, tmp_path):
    base, a, b = mistral
    report = run(base, a, b, json_path=tmp_path / "r.json", plot_path=tmp_path / "h.png")
    data = json.loads((tmp_path / "r.json").read_text())
    assert set(data) == {
        "base",
        "models",
        "compatible",
        "compatibility",
        "lineage",
        "pairs",
        "recommendations",
        "topk",
    }
    assert set(data["pairs"][0]["overall"]) == {
        "cosine",
        "sign_agreement",
        "topk_overlap",
        "norm_ratio",
    }
    assert CheckReport.model_validate(data) == report
    names = set(state(base))
    assert set(report.pairs[0].per_tensor) == names
    png = (tmp_path / "h.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_cosine_matches_an_independent_computation(mistral):
    base, a, b = mistral
    report = run(base, a, b)
    W, A, B = (state(x) for x in (base, a, b))
    name = "model.layers.1.mlp.up_proj.weight"
    da, db = (A[name].double() - W[name].double()), (B[name].double() - W[name].double())
    expected = float((da * db).sum() / (da.norm() * db.norm()))
    assert report.pairs[0].per_tensor[name].cosine == pytest.approx(expected, abs=1e-5)
    both = (da != 0) & (db != 0)
    agree = float((both & (torch.sign(da) == torch.sign(db))).sum() / both.sum())
    assert report.pairs[0].per_tensor[name].sign_agreement == pytest.approx(agree)
