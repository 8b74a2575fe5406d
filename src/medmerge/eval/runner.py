"""The Evaluate stage: lm-evaluation-harness with the paper's protocol, results cached.

`evaluate(model_dir, suite=...)` runs lm-eval's `hf` model on the suite's tasks (default: the
paper's five, 5-shot, bfloat16) and returns accuracy (and acc_norm where the task has it) with
lm-eval's standard errors, the per-question results (for significance tests) and the protocol.
Results are stored in a SQLite file keyed by the model's weight fingerprint and the protocol,
so evaluating an unchanged model again returns at once (`use_cache=False` forces a rerun).
Local suites run fully offline; no task or model is ever loaded with `trust_remote_code`.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel, ValidationError

from medmerge.errors import EvalError, MergeError
from medmerge.eval.store import ResultStore, model_fingerprint
from medmerge.eval.suites import PAPER_TASKS, Suite, load_suite
from medmerge.io import references
from medmerge.io.folders import refuse_output_near
from medmerge.version import __version__

log = logging.getLogger("medmerge")

PAPER_PROTOCOL = {"num_fewshot": 5, "dtype": "bfloat16", "batch_size": "auto"}
CPU_AUTO_BATCH = 16  # lm-eval's "auto" probes for out-of-memory errors, which CPUs do not raise


class TaskScore(BaseModel):
    n: int
    metrics: dict[str, float]  # acc, acc_norm; or word_perplexity, byte_perplexity, bits_per_byte
    stderr: dict[str, float | None]
    version: str | float | int | None = None


class EvalResult(BaseModel):
    model: str
    fingerprint: str
    protocol: dict
    tasks: dict[str, TaskScore]
    samples: dict[str, list[dict]]  # per question: doc_id and its per-question metrics
    seconds: float
    medmerge_version: str
    cached: bool = False


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise EvalError(
            "evaluation needs lm-evaluation-harness: pip install 'medmerge[eval]'"
        ) from e
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    return lm_eval, TaskManager


@contextmanager
def _environment(values: dict[str, str]):
    """Set environment variables for the block, then restore them."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_MANAGERS: dict = {}


def _task_manager(TaskManager, include_path: str | None):
    """lm-eval's task index; indexing its ~14,000 built-in YAML files takes 10-15 s, so local
    suites (whose YAML include the upstream files by path) index only their own folder, and the
    built-in index is built once per process."""
    if include_path not in _MANAGERS:
        if include_path:
            _MANAGERS[include_path] = TaskManager(include_path=include_path, include_defaults=False)
        else:
            _MANAGERS[include_path] = TaskManager()
    return _MANAGERS[include_path]


def _require_hub_datasets(tasks: list[str]) -> None:
    """Fail fast, naming the dataset, when a paper task's data is neither cached nor reachable."""
    from huggingface_hub import HfApi, constants

    offline = (
        os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    )
    for task in tasks:
        repo, config = PAPER_TASKS[task]
        cached = Path(constants.HF_HUB_CACHE) / f"datasets--{repo.replace('/', '--')}"
        if cached.is_dir():
            continue
        reason = "offline mode is set (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE)"
        if not offline:
            try:
                HfApi().dataset_info(repo, timeout=10)
                continue
            except Exception as e:  # any failure means we cannot download it now
                reason = f"the hub is unreachable ({type(e).__name__})"
        raise EvalError(
            f"task {task} needs the dataset {repo}"
            + (f" ({config})" if config else "")
            + f" from the Hugging Face hub; it is not cached here and {reason}. Offline "
            "alternative: export the data to JSONL with the upstream field names and evaluate a "
            "local suite (--suite PATH; see docs/eval.md)"
        )


def _parse(results: dict, tasks: list[str]) -> tuple[dict[str, TaskScore], dict[str, list]]:
    scores, samples = {}, {}
    for task in tasks:
        raw = results["results"][task]
        metrics, stderr = {}, {}
        for key, value in raw.items():
            if "," not in key or key.startswith("alias"):
                continue
            metric = key.split(",")[0]
            if metric.endswith("_stderr"):
                stderr[metric.removesuffix("_stderr")] = (
                    float(value) if isinstance(value, (int, float)) else None
                )
            elif isinstance(value, (int, float)):
                metrics[metric] = float(value)
        n = results.get("n-samples", {}).get(task, {}).get("effective")
        scores[task] = TaskScore(
            n=int(n) if n is not None else len(results["samples"][task]),
            metrics=metrics,
            stderr=stderr,
            version=results.get("versions", {}).get(task),
        )
        samples[task] = [_sample(s) for s in results.get("samples", {}).get(task, [])]
    return scores, samples


def _sample(s: dict) -> dict:
    """One question: its id, per-question metrics and, for multiple choice, the chosen index."""
    out = {"doc_id": s["doc_id"]}
    out.update({m: float(s[m]) for m in ("acc", "acc_norm") if isinstance(s.get(m), (int, float))})
    resps = s.get("filtered_resps")
    if "acc" in out and resps and all(isinstance(r, (list, tuple)) for r in resps):
        lls = [float(r[0]) for r in resps]
        out["pred"] = max(range(len(lls)), key=lls.__getitem__)
    return out


def evaluate(
    model_dir: str | Path,
    *,
    suite: str | Path = "paper",
    tasks: list[str] | None = None,
    num_fewshot: int = 5,
    dtype: str = "bfloat16",
    device: str = "cpu",
    batch_size: int | str = "auto",
    limit: int | None = None,
    seed: int = 1234,
    store: str | Path | None = None,
    use_cache: bool = True,
    out: str | Path | None = None,
) -> EvalResult:
    """Evaluate a model (a folder, Hub ID or MODEL+ADAPTER) on a suite; cached by weights and
    protocol.

    >>> evaluate("out/merged", suite="suites/cardio", num_fewshot=0).tasks["cardio_mcq"].metrics
    """
    if num_fewshot < 0 or (limit is not None and limit < 1):
        raise EvalError(
            f"num_fewshot must be 0 or more and limit 1 or more (got {num_fewshot}, {limit})"
        )
    if not (isinstance(batch_size, int) and batch_size >= 1 or str(batch_size).startswith("auto")):
        raise EvalError(f"batch size {batch_size!r}: give a whole number of 1 or more, or auto")
    lm_eval, TaskManager = _lm_eval()
    reference, model_dir = str(model_dir), references.folder(model_dir)
    _check_tokenizer(model_dir, reference)
    _refuse_outputs_in(model_dir, out=out, store=store)
    resolved: Suite = load_suite(suite, tasks)
    protocol = {
        "suite": resolved.name,
        "suite_hash": resolved.content_hash,
        "tasks": resolved.tasks,
        "num_fewshot": num_fewshot,
        "dtype": dtype,
        "limit": limit,
        "seed": seed,
        "lm_eval": lm_eval.__version__,
    }
    fingerprint = model_fingerprint(model_dir)
    results_db = ResultStore(store)
    result = _stored(results_db, fingerprint, protocol, reference) if use_cache else None
    if result is None:
        result = _run(
            lm_eval,
            TaskManager,
            resolved,
            Path(model_dir),
            protocol,
            fingerprint,
            device=device,
            batch_size=batch_size,
        )
        result.model = reference
        results_db.put(fingerprint, protocol, result.model_dump(exclude={"cached"}))
    if out:
        Path(out).write_text(result.model_dump_json(indent=2))
    return result


def _stored(store: ResultStore, fingerprint: str, protocol: dict, reference: str):
    """The stored result of this model and protocol, or None (also for a row that no longer
    validates as a result: evaluated again and replaced)."""
    hit = store.get(fingerprint, protocol)
    if hit is None:
        return None
    try:
        result = EvalResult.model_validate({**hit, "model": reference, "cached": True})
    except ValidationError:
        store.damaged()
        return None
    log.info("evaluation of %s found in the result store", reference)
    return result


def _refuse_outputs_in(model_dir: Path, **paths) -> None:
    """Refuse a result file or store that is a folder or lies inside the model evaluated."""
    for flag, path in paths.items():
        if path is None:
            continue
        if Path(path).is_dir():
            raise EvalError(f"--{flag} {path} is a folder; give a file name")
        try:
            refuse_output_near(path, [model_dir], f"--{flag}", contains=False)
        except MergeError as e:
            raise EvalError(str(e)) from e


def _check_tokenizer(folder: Path, reference: str) -> None:
    """Refuse a model without tokenizer files before lm-eval fails on it in its own words."""
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model",
                                                      "vocab.json")):  # fmt: skip
        raise EvalError(
            f"model {reference} has no tokenizer (tokenizer.json, tokenizer.model or "
            "vocab.json); copy its base model's tokenizer files into the folder"
        )


def _run(
    lm_eval,
    TaskManager,
    suite: Suite,
    model_dir: Path,
    protocol: dict,
    fingerprint: str,
    *,
    device: str,
    batch_size,
) -> EvalResult:
    if not suite.local:
        _require_hub_datasets(suite.tasks)
    if batch_size == "auto" and device == "cpu":
        batch_size = CPU_AUTO_BATCH
    started = time.time()
    manager = _task_manager(TaskManager, suite.include_path)
    seed = protocol["seed"]
    # local data only: never reach for the hub (and fail fast if something tries); the
    # variables are restored afterwards, so a later paper-suite run in this process is online
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"} if suite.local else {}
    try:
        with _environment(offline):
            raw = lm_eval.simple_evaluate(
                model="hf",
                model_args={
                    "pretrained": str(model_dir),
                    "dtype": protocol["dtype"],
                    "trust_remote_code": False,
                },
                tasks=suite.tasks,
                num_fewshot=protocol["num_fewshot"],
                batch_size=batch_size,
                device=device,
                limit=protocol["limit"],
                task_manager=manager,
                log_samples=True,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
                bootstrap_iters=1000,
            )
    except Exception as e:
        text = " ".join(str(e).split())  # one line, whatever lm-eval's message looks like
        raise EvalError(f"lm-eval failed on {model_dir}: {type(e).__name__}: {text}") from e
    scores, samples = _parse(raw, suite.tasks)
    return EvalResult(
        model=str(model_dir),
        fingerprint=fingerprint,
        protocol=protocol,
        tasks=scores,
        samples=samples,
        seconds=round(time.time() - started, 2),
        medmerge_version=__version__,
    )


def paper_table_row(result: EvalResult) -> dict[str, str]:
    """`acc +- stderr` in percent per task, as in the paper's Table IV."""
    row = {}
    for task, score in result.tasks.items():
        if "acc" in score.metrics:
            se = score.stderr.get("acc")
            row[task] = f"{100 * score.metrics['acc']:.2f}" + (
                f" +- {100 * se:.2f}" if se is not None else ""
            )
    return row
