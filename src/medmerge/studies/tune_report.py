"""The report of a search (`medmerge tune`): how it went on the dev part, and the held-out
verdict on the test part, which the search never saw."""

from __future__ import annotations

from pathlib import Path

import yaml

from medmerge.studies.records import RunRecord
from medmerge.studies.report import _plt, accuracy_tasks, markdown_table, mcnemar, mean_acc

ALPHA = 0.05


def pooled_mcnemar(a: RunRecord, b: RunRecord, tasks: list[str]) -> tuple[int, int, float]:
    """McNemar over every question of every task (ids made unique per task)."""

    def samples(r):
        return [
            {**s, "doc_id": f"{t}/{s['doc_id']}"} for t in tasks for s in r.result["samples"][t]
        ]

    return mcnemar(samples(a), samples(b))


def verdict(records: list[RunRecord], tasks: list[str]) -> tuple[str, list[dict]]:
    """Whether the tuned merge (the search's best) beats every alternative on the test part,
    with the paired tests behind the sentence."""
    tuned = next((r for r in records if r.run.name.startswith("trial-")), None)
    if tuned is None:
        return "No trial met the constraints, so there is no tuned merge to judge.", []
    rows = []
    for other in records:
        if other is tuned or other.run.name.startswith("trial-"):
            continue
        only_tuned, only_other, p = pooled_mcnemar(tuned, other, tasks)
        delta = 100 * (mean_acc(tuned, tasks)[0] - mean_acc(other, tasks)[0])
        rows.append({"versus": other.run.name, "delta_points": delta, "only_tuned_right":
                     only_tuned, "only_other_right": only_other, "p_value": p})  # fmt: skip
    beaten = [r for r in rows if r["delta_points"] > 0 and r["p_value"] < ALPHA]
    worse = [r for r in rows if r["delta_points"] < 0 and r["p_value"] < ALPHA]
    m = 100 * mean_acc(tuned, tasks)[0]
    text = f"On the held-out test part, the tuned merge {tuned.run.name} scores {m:.2f}% mean. "
    if rows and len(beaten) == len(rows):
        text += "It beats every alternative, each significantly (McNemar p < 0.05)."
    elif worse:
        text += "It is significantly worse than " + ", ".join(r["versus"] for r in worse) + "."
    else:
        text += (
            f"It significantly beats {len(beaten)} of {len(rows)} alternatives"
            + (f" ({', '.join(r['versus'] for r in beaten)})" if beaten else "")
            + "; against the others the difference is within chance (McNemar p >= 0.05), "
            "so the search's gain is not shown on data it never saw."
        )
    return text, rows


def write_tune_report(folder: Path, study, heldout: list[RunRecord], cfg) -> Path:
    import optuna

    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    pruned = study.get_trials(states=(optuna.trial.TrialState.PRUNED,))
    tasks = accuracy_tasks(heldout)
    best = next((r for r in heldout if r.run.name.startswith("trial-")), None)
    if best is not None:
        (folder / "best.yaml").write_text(yaml.safe_dump(best.run.merge_config, sort_keys=False))
    else:  # no trial met the constraints: an earlier run's best.yaml is not this search's
        (folder / "best.yaml").unlink(missing_ok=True)
    figures = _figures(folder, study, complete)
    importances = _importances(study, complete)
    text, rows = verdict(heldout, tasks)
    lines = [
        f"# Search {cfg.name}",
        "",
        f"{len(complete)} trials finished, {len(pruned)} pruned; objective: "
        f"{cfg.objective.kind} accuracy on the dev part (sampler {cfg.search.sampler}, seed "
        f"{cfg.search.seed}).",
        "",
        "## Held-out verdict",
        "",
        text,
        "",
        markdown_table(heldout, tasks),
        "",
        "| tuned versus | delta (points) | only tuned right | only other right | p (McNemar) |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['versus']} | {r['delta_points']:+.2f} | {r['only_tuned_right']} | "
        f"{r['only_other_right']} | {r['p_value']:.3g} |"
        for r in rows
    ]
    if best is not None:
        best_yaml = yaml.safe_dump(best.run.merge_config, sort_keys=False).strip()
        lines += ["", "## Best configuration (`best.yaml`)", "", "```yaml", best_yaml, "```"]
    lines += ["", "## The search (dev part)", ""]
    lines += [f"![{name}]({file})" for name, file in figures.items()]
    if importances:
        lines += ["", "| parameter | importance |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in importances.items()]
    lines += ["", "| trial | value | parameters |", "|---|---|---|"]
    lines += [f"| {t.number} | {100 * t.value:.2f} | {t.params} |" for t in complete]
    path = folder / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _importances(study, complete) -> dict[str, float]:
    """Optuna's parameter importances, where the finished trials vary in some parameter."""
    import optuna

    varied = {k for t in complete for k in t.params if len({str(u.params.get(k)) for u in
                                                            complete}) > 1}  # fmt: skip
    if len(complete) < 2 or not varied:
        return {}
    return optuna.importance.get_param_importances(
        study, params=sorted(k for k in varied if all(k in t.params for t in complete)) or None
    )


def _figures(folder: Path, study, complete) -> dict[str, str]:
    if not complete:
        return {}
    plt = _plt()
    out = {}
    fig, ax = plt.subplots(figsize=(6, 3.5))
    numbers = [t.number for t in complete]
    values = [100 * t.value for t in complete]
    best_so_far = [max(values[: i + 1]) for i in range(len(values))]
    ax.plot(numbers, values, "o", label="trial")
    ax.step(numbers, best_so_far, where="post", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("dev objective (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "history.png", dpi=120)
    plt.close(fig)
    out["optimisation history"] = "history.png"
    params = sorted({k for t in complete for k in t.params})
    numeric = [k for k in params if all(isinstance(t.params.get(k, 0), (int, float))
                                        for t in complete)]  # fmt: skip
    if numeric:
        fig, axes = plt.subplots(1, len(numeric), figsize=(3 * len(numeric), 3), squeeze=False)
        for ax, k in zip(axes[0], numeric, strict=True):
            seen = [t for t in complete if k in t.params]
            ax.scatter([t.params[k] for t in seen], [100 * t.value for t in seen], s=14)
            ax.set_xlabel(k)
        axes[0][0].set_ylabel("dev objective (%)")
        fig.tight_layout()
        fig.savefig(folder / "slices.png", dpi=120)
        plt.close(fig)
        out["one slice per parameter"] = "slices.png"
    return out
