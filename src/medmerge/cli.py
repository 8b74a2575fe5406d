"""The `medmerge` command: parses arguments, calls the Python API, prints. No logic here."""

from __future__ import annotations

import logging
import os
import signal
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from medmerge.errors import MedmergeError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Check, merge, evaluate and compare merges of fine-tuned LLMs (docs: README.md).",
)


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


class DType(str, Enum):
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


def _run(fn, *args, **kwargs):
    """Call the API; a user error becomes one red line and exit code 2, not a traceback.
    SIGTERM stops it as Ctrl-C does, so what it was writing is removed as it unwinds."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return fn(*args, **kwargs)
    except MedmergeError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from e
    except OSError as e:  # a full disk, a path under a file, permissions: in the system's words
        where = f": {e.filename}" if e.filename else ""
        typer.secho(f"error: {e.strerror or e}{where}", fg="red", err=True)
        raise typer.Exit(2) from e


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


MK = "mergekit-yaml's flags"
# mergekit-yaml flags medmerge accepts without acting on them, and why
ACCEPTED = {
    "allow_crimes": "medmerge merges models of one architecture only",
    "lazy_unpickle": "medmerge always reads tensors lazily",
    "low_cpu_memory": "medmerge keeps at most --max-memory of tensor data in RAM anyway",
    "clone_tensors": "medmerge writes every output tensor on its own",
    "read_to_gpu": "medmerge reads into RAM and moves each tensor to the device as it merges",
    "multi_gpu": "medmerge merges on one device",
    "gpu_rich": "medmerge merges on one device (--device cuda)",
    "async_write": "medmerge always writes behind the arithmetic, in a thread of its own",
    "write_threads": "medmerge writes in one thread of its own",
    "lora_merge_cache": "medmerge folds adapters into $MEDMERGE_CACHE/folded",
    "lora_merge_dtype": "medmerge folds adapters in float32, so that a merge rounds once",
}
# and those it refuses, with the reason
REFUSED = {
    "trust_remote_code": "medmerge never runs code that comes with a checkpoint",
    "no_safe_serialization": "medmerge writes safetensors only",
    "unsafe_truncate_embeddings": "set `tokenizer_source` (rows matched by token) instead",
}


def _mk(kind: type, flag: str, help: str):  # noqa: A002 - typer's name
    return Annotated[kind, typer.Option(flag, help=help, rich_help_panel=MK)]


@app.command()
def merge(
    config: Annotated[Path, typer.Argument(help="mergekit-style YAML merge config")],
    out_dir: Annotated[Path, typer.Argument(help="folder for the merged checkpoint")],
    device: Annotated[Device, typer.Option(help="where the arithmetic runs")] = Device.cpu,
    dtype: Annotated[DType | None, typer.Option(help="output dtype (default: config's)")] = None,
    shard_size: Annotated[str, typer.Option(help="largest output shard, e.g. 5GB")] = "5GB",
    seed: Annotated[int, typer.Option(help="seed of randomised methods (DARE, DELLA)")] = 0,
    overwrite: Annotated[bool, typer.Option(help="replace a non-empty OUT_DIR")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
    strict: Annotated[
        bool, typer.Option(help="unknown keys and ignored parameters are errors, not warnings")
    ] = False,
    intermediate_dir: Annotated[
        Path | None,
        typer.Option(help="a multi-document config's named merges go here (default: removed)"),
    ] = None,
    max_memory: Annotated[
        str | None,
        typer.Option(
            help="memory for tensor data, e.g. 2GB: larger tensors are merged in row blocks "
            "(default: a quarter of RAM)"
        ),
    ] = None,
    cuda: _mk(bool, "--cuda/--no-cuda", "= --device cuda") = False,
    out_shard_size: _mk(
        str | None, "--out-shard-size", "= --shard-size, mergekit's way: 5B is 5e9 bytes"
    ) = None,  # fmt: skip
    random_seed: _mk(int | None, "--random-seed", "= --seed") = None,
    copy_tokenizer: _mk(
        bool, "--copy-tokenizer/--no-copy-tokenizer", "write the tokenizer files"
    ) = True,  # fmt: skip
    write_model_card: _mk(
        bool, "--write-model-card/--no-write-model-card", "write README.md, the model card"
    ) = True,  # fmt: skip
    num_threads: _mk(int | None, "--num-threads", "threads of the arithmetic") = None,
    transformers_cache: _mk(
        str | None, "--transformers-cache", "the Hugging Face cache (HF_HUB_CACHE)"
    ) = None,  # fmt: skip
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, help="more log lines", rich_help_panel=MK)
    ] = 0,  # fmt: skip
    allow_crimes: _mk(bool, "--allow-crimes/--no-allow-crimes", "accepted, see the note") = False,
    lazy_unpickle: _mk(bool, "--lazy-unpickle/--no-lazy-unpickle", "accepted") = False,
    low_cpu_memory: _mk(bool, "--low-cpu-memory/--no-low-cpu-memory", "accepted") = False,
    clone_tensors: _mk(bool, "--clone-tensors/--no-clone-tensors", "accepted") = False,
    read_to_gpu: _mk(bool, "--read-to-gpu/--no-read-to-gpu", "accepted") = False,
    multi_gpu: _mk(bool, "--multi-gpu/--no-multi-gpu", "accepted") = False,
    gpu_rich: _mk(bool, "--gpu-rich/--no-gpu-rich", "accepted") = False,
    async_write: _mk(bool, "--async-write/--no-async-write", "accepted") = False,
    write_threads: _mk(int | None, "--write-threads", "accepted") = None,
    lora_merge_cache: _mk(str | None, "--lora-merge-cache", "accepted") = None,
    lora_merge_dtype: _mk(str | None, "--lora-merge-dtype", "accepted") = None,
    trust_remote_code: _mk(
        bool, "--trust-remote-code/--no-trust-remote-code", "refused: no code from checkpoints"
    ) = False,  # fmt: skip
    safe_serialization: _mk(
        bool, "--safe-serialization/--no-safe-serialization", "safetensors (the only output)"
    ) = True,  # fmt: skip
    unsafe_truncate_embeddings: _mk(bool, "--unsafe-truncate-embeddings", "refused") = False,
) -> None:
    """Merge the models a config names, streaming tensor by tensor, into OUT_DIR (a config of
    several YAML documents, mergekit-multi's, runs them in the order they need).
    mergekit-yaml's flags work too (docs/mergekit.md)."""
    given = {k: v for k, v in locals().items() if k in ACCEPTED and v not in (False, None)}
    refused = {
        "trust_remote_code": trust_remote_code,
        "no_safe_serialization": not safe_serialization,
        "unsafe_truncate_embeddings": unsafe_truncate_embeddings,
    }
    for name in (k for k, on in refused.items() if on):
        typer.secho(f"error: --{name.replace('_', '-')}: {REFUSED[name]}", fg="red", err=True)
        raise typer.Exit(2)
    for name in given:
        typer.echo(f"note: --{name.replace('_', '-')} is accepted: {ACCEPTED[name]}", err=True)
    if transformers_cache:
        os.environ["HF_HUB_CACHE"] = transformers_cache  # read when huggingface_hub loads
    if num_threads:
        import torch

        torch.set_num_threads(num_threads)
    if verbose:
        logging.getLogger("medmerge").setLevel(logging.DEBUG)
    from medmerge.engine import merge as run_merge

    out = _run(
        run_merge,
        config,
        out_dir,
        device="cuda" if cuda or gpu_rich else device.value,
        dtype=dtype.value if dtype else None,
        shard_size=_count(out_shard_size) if out_shard_size else shard_size,
        seed=seed if random_seed is None else random_seed,
        overwrite=overwrite,
        progress=not quiet,
        strict=strict,
        intermediate_dir=intermediate_dir,
        max_memory=max_memory,
        copy_tokenizer=copy_tokenizer,
        model_card=write_model_card,
    )
    typer.echo(f"merged model written to {out}")


def _count(text: str) -> int:
    """A number in mergekit's syntax: 5B is five billion, 500M, 20K, or digits."""
    scale = {"K": 10**3, "M": 10**6, "B": 10**9}.get(text.strip()[-1:].upper(), 1)
    digits = text.strip()[:-1] if scale > 1 else text.strip()
    try:
        return int(float(digits) * scale)
    except ValueError:
        typer.secho(f"error: --out-shard-size {text}: give a size such as 5B or 500M",
                    fg="red", err=True)  # fmt: skip
        raise typer.Exit(2) from None


@app.command()
def check(
    models: Annotated[
        list[str], typer.Argument(help="the models to merge: folders, Hub IDs or MODEL+ADAPTER")
    ],
    base: Annotated[str, typer.Option(help="the common base model")],
    json_out: Annotated[
        Path | None, typer.Option("--json", help="write the report as JSON")
    ] = None,
    plot: Annotated[
        Path | None, typer.Option(help="write the cosine/sign heatmap (.png, .pdf, .svg, ...)")
    ] = None,
    topk: Annotated[float, typer.Option(help="fraction for the top-k overlap")] = 0.05,
    device: Annotated[Device, typer.Option(help="where the statistics are computed")] = Device.cpu,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    """Check compatibility and mergeability of MODELS with --base; recommend methods."""
    from medmerge.check import check as run_check

    report = _run(
        run_check,
        base,
        models,
        topk=topk,
        json_path=json_out,
        plot_path=plot,
        device=device.value,
        progress=not quiet,
    )
    mark = {True: typer.style("ok  ", fg="green"), False: typer.style("FAIL", fg="red")}
    typer.echo(f"compatibility: {'pass' if report.compatible else 'FAIL'}")
    for f in report.compatibility:
        if not f.ok or f.check.startswith(("config model_type", "architecture", "tokenizer")):
            typer.echo(f"  {mark[f.ok]} {f.check}: {f.detail}")
    for lin in report.lineage:
        verdict = "plausible fine-tune" if lin.plausible_finetune else "NOT a plausible fine-tune"
        typer.echo(
            f"lineage: {lin.model}: relative task vector {lin.relative_delta:.4f} ({verdict})"
        )
    for pair in report.pairs:
        o = pair.overall
        typer.echo(
            f"pair {Path(pair.model_a).name} / {Path(pair.model_b).name}: cosine "
            f"{o.cosine:.3f}, sign agreement {_pct(o.sign_agreement)}, top-{topk:.0%} "
            f"overlap {o.topk_overlap:.1%}, norm ratio {_num(o.norm_ratio)}"
        )
        for t, st in sorted(pair.per_type.items()):
            typer.echo(
                f"  {t:<11} cosine {st.cosine:+.3f}  sign agreement "
                f"{_pct(st.sign_agreement)}  top-k overlap {st.topk_overlap:.1%}"
            )
    for r in report.recommendations:
        typer.echo(f"recommendation: {r.advice}\n  because {r.because}")
    if not report.compatible:
        raise typer.Exit(1)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


@app.command()
def materialize(
    adapter: Annotated[str, typer.Argument(help="a PEFT LoRA adapter: folder or Hub ID")],
    out_dir: Annotated[Path, typer.Argument(help="folder for the full checkpoint")],
    base: Annotated[str | None, typer.Option(help="base model (default: the adapter's)")] = None,
    dtype: Annotated[DType | None, typer.Option(help="output dtype (default: base's)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace a non-empty OUT_DIR")] = False,
) -> None:
    """Fold a LoRA adapter into its base (peft merge_and_unload); write a full checkpoint."""
    from medmerge.io.adapters import adapter_base
    from medmerge.io.adapters import materialize as run
    from medmerge.io.references import folder

    adapter_dir = _run(folder, adapter)
    named = base or _run(adapter_base, adapter_dir)  # a folder or Hub ID
    out = _run(
        run,
        adapter_dir,
        out_dir,
        base=_run(folder, named) if named else None,
        dtype=dtype.value if dtype else None,
        overwrite=overwrite,
    )
    typer.echo(f"full checkpoint written to {out}")


@app.command("eval")
def eval_(
    model: Annotated[str, typer.Argument(help="the model: folder, Hub ID or MODEL+ADAPTER")],
    suite: Annotated[str, typer.Option(help="paper, or a local suite folder")] = "paper",
    tasks: Annotated[str | None, typer.Option(help="comma-separated subset of tasks")] = None,
    num_fewshot: Annotated[int, typer.Option(help="few-shot examples")] = 5,
    dtype: Annotated[DType, typer.Option(help="dtype the model runs in")] = DType.bfloat16,
    device: Annotated[Device, typer.Option(help="cpu or cuda")] = Device.cpu,
    batch_size: Annotated[str, typer.Option(help="a number or auto")] = "auto",
    limit: Annotated[int | None, typer.Option(help="at most N questions per task")] = None,
    seed: Annotated[int, typer.Option(help="seed for few-shot sampling")] = 1234,
    store: Annotated[Path | None, typer.Option(help="result store (SQLite file)")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="rerun even if stored")] = False,
    out: Annotated[Path | None, typer.Option(help="write the result as JSON")] = None,
) -> None:
    """Evaluate a model with lm-evaluation-harness (the paper's protocol by default)."""
    from medmerge.eval import evaluate

    result = _run(
        evaluate,
        model,
        suite=suite,
        tasks=tasks.split(",") if tasks is not None else None,
        num_fewshot=num_fewshot,
        dtype=dtype.value,
        device=device.value,
        batch_size=int(batch_size) if batch_size.isdigit() else batch_size,
        limit=limit,
        seed=seed,
        store=store,
        use_cache=not no_cache,
        out=out,
    )
    origin = "from the result store" if result.cached else f"in {result.seconds:.0f} s"
    typer.echo(f"{model} ({origin}):")
    for task, score in result.tasks.items():
        shown = ", ".join(
            f"{m} {v:.4f}" + (f" +- {score.stderr[m]:.4f}" if score.stderr.get(m) else "")
            for m, v in score.metrics.items()
        )
        typer.echo(f"  {task:<32} n={score.n:<6} {shown}")


class Executor(str, Enum):
    local = "local"
    ray = "ray"


@app.command()
def study(
    config: Annotated[Path, typer.Argument(help="study YAML (base, models, suite, merges)")],
    out: Annotated[Path | None, typer.Option(help="study folder (default studies/NAME)")] = None,
    executor: Annotated[Executor, typer.Option(help="local, or ray for a cluster")] = (
        Executor.local
    ),
) -> None:
    """Run a study (merges x hyperparameters, evaluated, reported); rerunning resumes."""
    from medmerge.studies.study import run_study

    folder = _run(run_study, config, out, executor=executor.value)
    typer.echo(f"study in {folder}; report {folder / 'report.md'} and {folder / 'report.html'}")


@app.command()
def tune(
    config: Annotated[Path, typer.Argument(help="tune YAML (base, models, suite, spaces)")],
    out: Annotated[Path | None, typer.Option(help="search folder (default tunes/NAME)")] = None,
    trials: Annotated[int | None, typer.Option(help="trials to finish (default: the YAML's)")] = (
        None
    ),
    executor: Annotated[Executor, typer.Option(help="local, or ray for a cluster")] = (
        Executor.local
    ),
) -> None:
    """Search merge hyperparameters on a dev part of the suite, judge the best on its held-out
    test part; rerunning resumes."""
    try:
        from medmerge.studies.tune import run_tune
    except ImportError as e:
        typer.secho(f"error: medmerge tune needs the tune extra ({e}): pip install "
                    "'medmerge[tune]'", fg="red", err=True)  # fmt: skip
        raise typer.Exit(2) from e

    folder = _run(run_tune, config, out, trials=trials, executor=executor.value)
    typer.echo(f"search in {folder}; report {folder / 'report.md'}, best {folder / 'best.yaml'}")


@app.command()
def report(folder: Annotated[Path, typer.Argument(help="a study folder")]) -> None:
    """Re-render a study's report from its stored results."""
    from medmerge.studies.report import write_report

    typer.echo(f"report written to {_run(write_report, folder)}")


@app.command()
def methods() -> None:
    """List the merge methods and their parameters (defaults in brackets)."""
    from medmerge.methods import REGISTRY, REQUIRED, config_name

    for name, m in sorted(REGISTRY.items()):
        params = ", ".join(
            config_name(k)
            + ("" if d is REQUIRED else f" [{d}]")
            + (" (per model)" if k in m.per_model else "")
            for k, d in m.defaults.items()
        )
        base = "needs base_model" if m.needs_base else "no base needed"
        typer.echo(f"{name}: {m.doc}\n    {base}; parameters: {params or 'none'}")


@app.command()
def example(
    out_dir: Annotated[Path, typer.Argument(help="folder to create")],
    arch: Annotated[str, typer.Option(help="mistral (GQA) or llama (tied embeddings)")] = "mistral",
    method: Annotated[str, typer.Option(help="merge method of merge.yaml")] = "task_arithmetic",
    overwrite: Annotated[bool, typer.Option(help="replace an existing example")] = False,
) -> None:
    """Write a tiny base, two fine-tunes of it, a merge config, a small local suite and a study
    config for them into OUT_DIR (random weights and questions: a smoke test of the workflow)."""
    from medmerge.demo.example import write_example

    _run(write_example, out_dir, arch=arch, method=method, overwrite=overwrite)
    typer.echo(
        f"models in {out_dir / 'models'}, suite in {out_dir / 'suite'}\nnext: medmerge merge "
        f"{out_dir / 'merge.yaml'} {out_dir / 'merged'}\n  or: medmerge study "
        f"{out_dir / 'study.yaml'} --out {out_dir / 'study'}"
    )


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="folder for the suite, study and report")] = Path(
        "runs/demo"
    ),
    quick: Annotated[bool, typer.Option(help="2 epochs, 24 questions per task (~10 min)")] = False,
    tune: Annotated[
        bool,
        typer.Option(
            help="a search of merge settings instead of the study, judged on held-out questions"
        ),
    ] = False,  # fmt: skip
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """The offline demo study: SmolLM2-135M, two ICD-10-CM specialists fine-tuned from it on
    CPU, merged by every method, evaluated and reported (docs/demo.md)."""
    from medmerge.demo.run import run_demo

    summary = _run(run_demo, out, quick=quick, tune=tune, progress=not quiet)
    tasks = [t for t in next(iter(summary["accuracy"].values())) if t not in ("kind", "mean")]
    typer.echo(f"\n{'model':<28}" + "".join(f"{t:>22}" for t in [*tasks, "mean"]))
    for name, row in summary["accuracy"].items():
        typer.echo(f"{name:<28}" + "".join(f"{_pct(row[t]):>22}" for t in [*tasks, "mean"]))
    if "verdict" in summary:
        typer.echo(f"\n{summary['verdict']}")
    best = summary.get("best_merge")
    if best:
        typer.echo(f"\nbest merge by mean accuracy: {best['name']} ({_pct(best['mean'])})")
        for who, gain in best["gain_over_specialist_on_other_domain"].items():
            typer.echo(f"  versus {who}: {100 * gain:+.1f} points")
        typer.echo(
            f"  general control versus the base: {100 * best['control_change_vs_base']:+.1f}"
        )
    seconds = ", ".join(f"{k} {v:.0f} s" for k, v in summary["seconds"].items())
    typer.echo(f"\ntime: {seconds}\nreport: {summary['report']}")


if __name__ == "__main__":
    app()
