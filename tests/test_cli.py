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
