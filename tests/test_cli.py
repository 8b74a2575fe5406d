"""The command line: example models, a merge, a user error as one line and exit code 2."""

import torch
from conftest import logits
from typer.testing import CliRunner

from medmerge.cli import app

runner = CliRunner()


def test_example_then_merge(tmp_path):
    result = runner.invoke(app, ["example", str(tmp_path / "ex")])
    assert result.exit_code == 0, result.output
    from medmerge.studies.records import expand, load_study

    runs = expand(load_study(tmp_path / "ex" / "study.yaml"))
    assert {r.method for r in runs if r.kind == "merge"} >= {
        "linear",
        "task_arithmetic",
        "ties",
        "dare_ties",
        "della",
        "breadcrumbs",
        "slerp",
        "sce",
        "hierarchical",
    }
    config = tmp_path / "ex" / "merge.yaml"
    out = tmp_path / "ex" / "merged"
    result = runner.invoke(app, ["merge", str(config), str(out), "--quiet", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert f"merged model written to {out}" in result.output
    assert torch.isfinite(logits(out)).all()
    again = runner.invoke(app, ["merge", str(config), str(out), "--quiet"])
    assert again.exit_code == 2
    assert "not empty; pass --overwrite" in again.output
    assert "Traceback" not in again.output


def test_methods_lists_parameters():
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0
    assert "task_arithmetic: base + lambda * sum_i w_i (theta_i - base)" in result.output
    assert "weight (per model)" in result.output
    # every method of mergekit 0.1.5's registry, with mergekit's parameters
    mergekit = ("multislerp nearswap ram ramplus_tl sce linear slerp nuslerp passthrough "
                "model_stock arcee_fusion karcher task_arithmetic ties dare_ties dare_linear "
                "breadcrumbs breadcrumbs_ties della della_linear").split()  # fmt: skip
    listed = {line.split(":")[0] for line in result.output.splitlines() if ": " in line}
    assert set(mergekit) <= listed
    assert "int8_mask [False], normalize [False], rescale [True], lambda [1.0]" in result.output


def test_help_answers_without_torch_numba_or_transformers():
    import subprocess
    import sys

    from medmerge.cli import app as cli_app

    commands = [[]] + [[c.name or c.callback.__name__] for c in cli_app.registered_commands]
    code = (
        "import sys\n"
        "for heavy in ('torch', 'numba', 'transformers', 'scipy', 'lm_eval'):\n"
        "    sys.modules[heavy] = None  # importing it raises ImportError\n"
        "from medmerge.cli import app\n"
        "sys.argv = ['medmerge', *sys.argv[1:], '--help']\n"
        "app()\n"
    )
    for command in commands:
        done = subprocess.run([sys.executable, "-c", code, *command], capture_output=True,
                              text=True)  # fmt: skip
        assert done.returncode == 0, (command, done.stderr[-2000:])
        assert "Usage" in done.stdout, command


def test_mergekit_yaml_flags_work_on_merge(mistral, tmp_path, monkeypatch):
    import json

    import yaml
    from conftest import cli, one_line_error

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = tmp_path / "merge.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "merge_method": "dare_ties",
                "base_model": str(mistral[0]),
                "models": [
                    {"model": str(m), "parameters": {"weight": 0.5, "density": 0.5}}
                    for m in mistral[1:]
                ],
            }
        )
    )
    out = tmp_path / "out"
    code, text = cli("merge", config, out, "--quiet", "--random-seed", 7, "--out-shard-size",
                     "40K", "--no-copy-tokenizer", "--no-write-model-card", "--lazy-unpickle",
                     "--allow-crimes", "--low-cpu-memory")  # fmt: skip
    assert code == 0, text
    assert "note: --lazy-unpickle is accepted: medmerge always reads tensors lazily" in text
    assert "note: --allow-crimes is accepted" in text
    assert json.loads((out / "medmerge_provenance.json").read_text())["seed"] == 7
    assert len(list(out.glob("*.safetensors"))) > 1
    assert not (out / "README.md").exists() and not list(out.glob("tokenizer*"))
    own = tmp_path / "own"  # medmerge's own flags for the same
    assert cli("merge", config, own, "--quiet", "--seed", 7, "--shard-size", 40000)[0] == 0
    assert {f.name: f.read_bytes() for f in own.glob("*.safetensors")} == {
        f.name: f.read_bytes() for f in out.glob("*.safetensors")
    }
    one_line_error(*cli("merge", config, tmp_path / "c", "--cuda"), "--device cuda was asked")
    one_line_error(*cli("merge", config, tmp_path / "t", "--trust-remote-code"),
                   "never runs code that comes with a checkpoint")  # fmt: skip
    one_line_error(*cli("merge", config, tmp_path / "s", "--no-safe-serialization"),
                   "safetensors only")  # fmt: skip
    assert not any((tmp_path / n).exists() for n in "cts")
