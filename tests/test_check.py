"""The Check stage on tiny models with known relationships."""

import json
import math
import shutil

import pytest
import torch
from conftest import state
from safetensors.torch import save_file
from typer.testing import CliRunner

from medmerge.check import CheckReport, check
from medmerge.cli import app
from medmerge.errors import ConfigError
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
        (dict(num_hidden_layers=3), "config num_hidden_layers", "differs"),
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


UP = "model.layers.1.mlp.up_proj.weight"


def poisoned(value):
    """fn for `rewrite`: `value` (NaN or inf) in one entry of UP."""

    def fn(name, t):
        if name == UP:
            t = t.clone()
            t[1, 2] = value
        return t

    return fn


@pytest.mark.parametrize("where, value", [("model", math.nan), ("base", -math.inf)])
def test_nonfinite_weights_fail_and_stay_out_of_the_statistics(mistral, tmp_path, where, value):
    base, a, b = mistral
    if where == "base":
        base = rewrite(base, tmp_path / "damaged", poisoned(value))
    else:
        b = rewrite(b, tmp_path / "damaged", poisoned(value))
    report = run(base, a, b)
    assert not report.compatible
    bad = [f for f in report.compatibility if not f.ok]
    assert [f.check for f in bad] == [f"finite weights of {tmp_path / 'damaged'}"]
    assert UP in bad[0].detail and "NaN or inf" in bad[0].detail
    assert any(r.advice == "do not merge these models as they are" for r in report.recommendations)
    # the damaged tensor is in no figure; the others' figures are those of the whole models
    pair = report.pairs[0]
    assert UP not in pair.per_tensor and len(pair.per_tensor) == len(state(a)) - 1
    W, A, B = (state(x) for x in mistral)
    da = torch.cat([(A[n].double() - W[n].double()).flatten() for n in W if n != UP])
    db = torch.cat([(B[n].double() - W[n].double()).flatten() for n in W if n != UP])
    expected = float((da * db).sum() / (da.norm() * db.norm()))
    assert pair.overall.cosine == pytest.approx(expected, abs=1e-5)
    assert all(math.isfinite(lin.relative_delta) for lin in report.lineage)


def test_nonfinite_weights_in_a_tensor_not_compared_fail_too(mistral, tmp_path):
    # a resized vocabulary's embeddings are not compared, but merge would refuse their NaN
    base, a, _ = mistral
    other = write_model(tmp_path / "other", tiny_config("mistral", vocab_size=400))
    name = "model.embed_tokens.weight"
    other = rewrite(other, tmp_path / "damaged", lambda n, t: t * math.inf if n == name else t)
    report = run(base, a, other)
    assert not report.compatible
    bad = [f for f in report.compatibility if not f.ok]
    assert len(bad) == 1 and str(other) in bad[0].check and name in bad[0].detail


runner = CliRunner()


def cli_error(*args) -> str:
    """The one error line of `medmerge check ARGS`, which must exit 2 without a traceback."""
    result = runner.invoke(app, ["check", *map(str, args), "--quiet"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--plot", "heat.xyz"], "matplotlib writes files ending in"),
        (["--plot", "heat"], "matplotlib writes files ending in"),
        (["--device", "cuda"], "torch sees no CUDA GPU; use --device cpu"),
        (["--topk", "0"], "(0, 1]"),
        (["--topk", "-1"], "(0, 1]"),
        (["--topk", "5"], "(0, 1]"),
        (["--json", "{tmp}/missing/r.json"], "missing does not exist"),
        (["--json", "{tmp}"], "is a folder"),
        (["--plot", "{tmp}/missing/h.png"], "missing does not exist"),
    ],
)
def test_bad_arguments_are_one_line_errors_before_any_model_is_read(
    mistral, tmp_path, monkeypatch, args, message
):
    def unread(path):
        raise AssertionError(f"{path} was opened")

    monkeypatch.setattr("medmerge.check.Checkpoint", unread)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    base, a, b = mistral
    args = [x.format(tmp=tmp_path) for x in args]
    line = cli_error("--base", base, a, b, *args)
    assert message in line and args[0] in line


def test_plot_errors_say_what_works(mistral, tmp_path):
    base, a, b = mistral
    assert ".png, .ps" in cli_error("--base", base, a, b, "--plot", tmp_path / "h.xyz")
    assert "two or more" in cli_error("--base", base, a, "--plot", tmp_path / "h.png")
    if shutil.which("xelatex") is None:  # .pgf is a format whose writer needs LaTeX
        assert "xelatex" in cli_error("--base", base, a, b, "--plot", tmp_path / "h.pgf")
    run(base, a, b, plot_path=tmp_path / "h.svg")
    assert (tmp_path / "h.svg").read_text().lstrip().startswith("<?xml")


def test_a_model_listed_twice_is_refused(mistral, tmp_path):
    base, a, b = mistral
    (tmp_path / "link").symlink_to(a)
    with pytest.raises(ConfigError, match="listed twice"):
        run(base, a, b, tmp_path / "link")


def test_a_file_is_not_taken_for_a_model_or_a_hub_id(mistral, tmp_path):
    base, a, _ = mistral
    weights = next(a.glob("*.safetensors"))
    report = run(base, a, weights)
    assert not report.compatible
    assert any(f.check == f"readable: {weights}" and "is a file" in f.detail
               for f in report.compatibility)  # fmt: skip


@pytest.mark.parametrize(
    "content, detail",
    [
        (b"", "the file is empty"),
        (b"[1, 2]", "JSON list, not an object"),
        (b"\xff\xfe{", "tokenizer.json"),
        (b'{"model": ', "tokenizer.json"),
    ],
)
def test_an_unreadable_tokenizer_json_is_a_finding(mistral, tmp_path, content, detail):
    base, a, b = mistral
    b = rewrite(b, tmp_path / "b", lambda n, t: t)
    (b / "tokenizer.json").write_bytes(content)
    report = run(base, a, b)
    bad = [f for f in report.compatibility if not f.ok]
    assert [f.check for f in bad] == [f"tokenizer of {b}"]
    assert str(b / "tokenizer.json") in bad[0].detail and detail in bad[0].detail
