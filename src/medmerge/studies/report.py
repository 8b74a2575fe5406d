"""Study reports: the paper's Table IV, its figures, sensitivity plots, costs and significance.

`write_report(study_dir)` re-renders everything from the stored run records:
- `results.csv` (one row per model, task and metric), `table.tex`, `report.md`, `report.html`
  (self-contained: figures embedded);
- `fig2_ranking.png` (mean accuracy, ranked, with error bars), `fig3_delta_vs_base.png`
  (accuracy points versus the base, per task), `fig4_radar.png` (normalised profile, best = 1
  per task) and `sensitivity_<method>_<parameter>.png` for every swept parameter;
- a cost table (merge seconds, peak memory, evaluation seconds) and, for each merge and task, a
  paired exact McNemar test against the better parent on that task (per-question results), so
  that differences of one standard error are not over-read;
- a perplexity table (lower is better) for the suite's perplexity tasks: a suite of perplexity
  tasks alone gets that table and the costs.

Only the records of the study as it is configured now are reported: a record stored under an
older config or suite content is named as stale and left out of every table.
"""

from __future__ import annotations

import base64
import csv
import html
import math
from pathlib import Path

from scipy.stats import binomtest

from medmerge.errors import ConfigError
from medmerge.studies.records import RunRecord, load_study, stored_records

PLOT_STYLE = {
    "figure.facecolor": "white",
    "axes.facecolor": "white",
    "savefig.facecolor": "white",
    "text.color": "#222222",
    "axes.labelcolor": "#222222",
    "xtick.color": "#222222",
    "ytick.color": "#222222",
    "axes.edgecolor": "#444444",
}


PERPLEXITY = ("word_perplexity", "byte_perplexity", "bits_per_byte")  # lower is better


def tasks_with(records: list[RunRecord], metric: str) -> list[str]:
    """The tasks that report `metric`, in the order the records give them."""
    tasks: list[str] = []
    for r in records:
        for task, score in r.result["tasks"].items():
            if metric in score["metrics"] and task not in tasks:
                tasks.append(task)
    return tasks


def accuracy_tasks(records: list[RunRecord]) -> list[str]:
    return tasks_with(records, "acc")


def metric(record: RunRecord, task: str, name: str) -> tuple[float, float | None]:
    """A task's metric and its standard error (None where lm-eval gives none)."""
    score = record.result["tasks"][task]
    return score["metrics"][name], score["stderr"].get(name)


def acc(record: RunRecord, task: str) -> tuple[float, float | None]:
    return metric(record, task, "acc")


def mean_acc(record: RunRecord, tasks: list[str]) -> tuple[float, float]:
    """Mean accuracy over tasks and its standard error (independent task errors)."""
    values = [acc(record, t) for t in tasks]
    mean = sum(v for v, _ in values) / len(values)
    se = math.sqrt(sum((s or 0.0) ** 2 for _, s in values)) / len(values)
    return mean, se


def mcnemar(merge: list[dict], parent: list[dict]) -> tuple[int, int, float]:
    """Exact two-sided McNemar test on paired per-question correctness.

    Returns (questions only the merge gets right, only the parent gets right, p-value)."""
    right = {s["doc_id"]: s["acc"] for s in parent}
    b = sum(1 for s in merge if s["acc"] == 1.0 and right.get(s["doc_id"]) == 0.0)
    c = sum(1 for s in merge if s["acc"] == 0.0 and right.get(s["doc_id"]) == 1.0)
    p = binomtest(b, b + c, 0.5).pvalue if b + c else 1.0
    return b, c, float(p)


def significance(records: list[RunRecord], tasks: list[str]) -> list[dict]:
    parents = [r for r in records if r.run.kind == "parent"]
    rows = []
    for r in records:
        if r.run.kind != "merge" or not parents:
            continue
        for task in tasks:
            best = max(parents, key=lambda p, task=task: acc(p, task)[0])
            b, c, p = mcnemar(r.result["samples"][task], best.result["samples"][task])
            rows.append(
                {
                    "model": r.run.name,
                    "task": task,
                    "versus": best.run.name,
                    "delta_points": 100 * (acc(r, task)[0] - acc(best, task)[0]),
                    "only_merge_right": b,
                    "only_parent_right": c,
                    "p_value": p,
                }
            )
    return rows


def write_csv(records: list[RunRecord], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "kind", "method", "swept", "task", "metric", "value", "stderr", "n"])
        for r in records:
            for task, score in r.result["tasks"].items():
                for metric, value in score["metrics"].items():
                    se = score["stderr"].get(metric)
                    w.writerow(
                        [
                            r.run.name,
                            r.run.kind,
                            r.run.method or "",
                            " ".join(f"{k}={v}" for k, v in r.run.swept.items()),
                            task,
                            metric,
                            repr(value),
                            "" if se is None else repr(se),
                            score["n"],
                        ]
                    )


def _cell(value: float, se: float | None, scale: float = 100.0, spec: str = ".2f") -> str:
    v = f"{scale * value:{spec}}"
    return v if se is None else f"{v} ± {scale * se:{spec}}"


def _cells(records, tasks):
    """Formatted `acc +- stderr` cells with the best of each column marked."""
    best = {t: max(acc(r, t)[0] for r in records) for t in tasks}
    best["mean"] = max(mean_acc(r, tasks)[0] for r in records)
    rows = []
    for r in records:
        cells = [(_cell(*acc(r, t)), acc(r, t)[0] == best[t]) for t in tasks]
        m, mse = mean_acc(r, tasks)
        cells.append((_cell(m, mse), m == best["mean"]))
        rows.append((r.run.name, cells))
    return rows


def _perplexity_cells(records, tasks):
    """Every perplexity metric of every perplexity task, the lowest of each column marked."""
    columns = [(t, m) for t in tasks for m in PERPLEXITY]
    best = {c: min(metric(r, *c)[0] for r in records) for c in columns}
    rows = [
        (
            r.run.name,
            [(_cell(*metric(r, *c), 1.0, ".4g"), metric(r, *c)[0] == best[c]) for c in columns],
        )
        for r in records
    ]
    return [f"{t} {m}" for t, m in columns], rows


def _markdown(header: list[str], rows) -> str:
    lines = ["| model | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
    for name, cells in rows:
        shown = [f"**{c}**" if bold else c for c, bold in cells]
        lines.append(f"| {name} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def markdown_table(records, tasks) -> str:
    return _markdown([*tasks, "mean"], _cells(records, tasks))


def perplexity_table(records, tasks) -> str:
    return _markdown(*_perplexity_cells(records, tasks))


def _latex(header: list[str], rows) -> str:
    def esc(s):
        return s.replace("_", r"\_")

    lines = [
        r"\begin{tabular}{l" + "c" * len(header) + "}",
        r"\toprule",
        "Model & " + " & ".join(esc(t) for t in header) + r" \\",
        r"\midrule",
    ]
    for name, cells in rows:
        shown = [(r"\textbf{%s}" if bold else "%s") % c.replace("±", r"$\pm$") for c, bold in cells]
        lines.append(esc(name) + " & " + " & ".join(shown) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def latex_table(records, tasks) -> str:
    return _latex([*tasks, "Mean"], _cells(records, tasks))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(PLOT_STYLE)
    return plt


def fig_ranking(records, tasks, path: Path) -> None:
    plt = _plt()
    ranked = sorted(records, key=lambda r: mean_acc(r, tasks)[0])
    means = [100 * mean_acc(r, tasks)[0] for r in ranked]
    errs = [100 * mean_acc(r, tasks)[1] for r in ranked]
    colors = {"base": "#7f7f7f", "parent": "#1f77b4", "merge": "#ff7f0e"}
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.4 * len(ranked)))
    ax.barh(
        [r.run.name for r in ranked],
        means,
        xerr=errs,
        capsize=3,
        color=[colors[r.run.kind] for r in ranked],
    )
    ax.set_xlabel(f"mean accuracy over {len(tasks)} tasks (%)")
    ax.set_title("Models ranked by mean accuracy (error bars: ±1 stderr)")
    lo = min(m - e for m, e in zip(means, errs, strict=True))
    ax.set_xlim(max(0, lo - 5), min(100, max(means) + max(errs) + 5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig_delta(records, tasks, path: Path) -> None:
    plt = _plt()
    base = next(r for r in records if r.run.kind == "base")
    others = [r for r in records if r.run.kind != "base"]
    fig, ax = plt.subplots(figsize=(max(7, 1.5 * len(tasks) + 0.35 * len(others)), 4.5))
    width = 0.8 / max(len(others), 1)
    cmap = plt.get_cmap("tab20")
    for i, r in enumerate(others):
        deltas = [100 * (acc(r, t)[0] - acc(base, t)[0]) for t in tasks]
        ax.bar(
            [j + i * width for j in range(len(tasks))],
            deltas,
            width,
            label=r.run.name,
            color=cmap(i % 20),
        )
    ax.axhline(0, color="#444444", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks, rotation=15)
    ax.set_ylabel("accuracy minus base (points)")
    ax.set_title("Accuracy difference versus the base, per task")
    if others:  # a study stopped after its base has no bars yet
        ax.legend(fontsize=7, ncol=2, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig_radar(records, tasks, path: Path) -> None:
    plt = _plt()
    best = {t: max(acc(r, t)[0] for r in records) or 1.0 for t in tasks}
    angles = [2 * math.pi * i / len(tasks) for i in range(len(tasks))] + [0.0]
    fig = plt.figure(figsize=(7, 7))
    ax = fig.add_subplot(polar=True)
    cmap = plt.get_cmap("tab20")
    for i, r in enumerate(records):
        values = [acc(r, t)[0] / best[t] for t in tasks]
        ax.plot(angles, values + values[:1], label=r.run.name, color=cmap(i % 20), linewidth=1.2)
    ax.set_xticks(angles[:-1], tasks, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title("Normalised performance profile (best = 1.0 per task)")
    ax.legend(fontsize=7, loc="upper right", bbox_to_anchor=(1.35, 1.1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig_sensitivity(records, tasks, method: str, param: str, path: Path) -> bool:
    runs = [
        r
        for r in records
        if r.run.kind == "merge"
        and r.run.method == method
        and param in r.run.swept
        and isinstance(r.run.swept[param], (int, float))
    ]
    if len({r.run.swept[param] for r in runs}) < 2:
        return False
    plt = _plt()
    runs.sort(key=lambda r: r.run.swept[param])
    xs = [r.run.swept[param] for r in runs]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t in tasks:
        ax.plot(xs, [100 * acc(r, t)[0] for r in runs], marker="o", label=t)
    ax.plot(
        xs,
        [100 * mean_acc(r, tasks)[0] for r in runs],
        marker="s",
        color="black",
        linewidth=2,
        label="mean",
    )
    ax.set_xlabel(param)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{method}: sensitivity to {param}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def protocol_line(records: list[RunRecord], suite: str) -> str:
    """How the models were evaluated, from the stored protocol of the base's result."""
    base = next(r for r in records if r.run.kind == "base")
    p = base.result["protocol"]
    sizes = ", ".join(f"{t} {s['n']}" for t, s in base.result["tasks"].items())
    return (
        f"Suite `{p.get('suite', suite)}` ({sizes} questions), {p['num_fewshot']}-shot, "
        f"{p['dtype']}, lm-eval {p.get('lm_eval', '?')}"
        + (f", limit {p['limit']} per task" if p.get("limit") else "")
        + "."
    )


def identical_weights(records: list[RunRecord]) -> list[list[str]]:
    """Names of the rows that share a weight fingerprint, in groups of two or more."""
    groups: dict[str, list[str]] = {}
    for r in records:
        groups.setdefault(r.fingerprint, []).append(r.run.name)
    return [names for names in groups.values() if len(names) > 1]


def write_report(folder: str | Path) -> Path:
    """Render the report of a study folder from its stored run records.

    >>> write_report("studies/cardio")  # studies/cardio/report.md, report.html, figures
    """
    folder = Path(folder)
    study = load_study(folder / "study.yaml")
    records, stale = stored_records(folder)
    if not any(r.run.kind == "base" for r in records):
        raise ConfigError(
            f"study {folder} has no finished base run under its current config and suite"
            + (f" ({len(stale)} stored runs are stale)" if stale else "")
            + "; run the study to (re)do it"
        )
    tasks, perplexity = accuracy_tasks(records), tasks_with(records, "word_perplexity")
    write_csv(records, folder / "results.csv")
    md = [f"# Study report: {study.name}", "", protocol_line(records, study.suite), ""]
    if stale:
        md += [
            f"Left out as stale (stored under an older config or suite; rerun the study to "
            f"redo them): {', '.join(stale)}.",
            "",
        ]
    figures: dict[str, str] = {}
    if tasks:
        (folder / "table.tex").write_text(latex_table(records, tasks))
        md += ["Accuracy (%) ± standard error, best per column in bold.", ""]
        md += [markdown_table(records, tasks), ""]
    if perplexity:
        if not tasks:
            (folder / "table.tex").write_text(_latex(*_perplexity_cells(records, perplexity)))
        md += ["Perplexity (lower is better), best per column in bold.", ""]
        md += [perplexity_table(records, perplexity), ""]
    same = identical_weights(records)
    if same:
        md += ["Rows with identical weights (same fingerprint), so identical scores:", ""]
        md += [f"- {', '.join(names)}" for names in same]
        md += [""]
    if tasks:
        figures = _figures(records, tasks, folder)
    for file, title in figures.items():
        md += [f"## {title}", "", f"![{title}]({file})", ""]
    md += _costs(records)
    if tasks:
        md += _significance(records, tasks)
    (folder / "report.md").write_text("\n".join(md) + "\n")
    (folder / "report.html").write_text(_html("\n".join(md), folder, figures))
    return folder / "report.md"


def _figures(records: list[RunRecord], tasks: list[str], folder: Path) -> dict[str, str]:
    """The accuracy figures, written into `folder`: file name -> title."""
    figures = {
        "fig2_ranking.png": "Models ranked by mean accuracy",
        "fig3_delta_vs_base.png": "Accuracy difference versus the base",
        "fig4_radar.png": "Normalised performance profile",
    }
    fig_ranking(records, tasks, folder / "fig2_ranking.png")
    fig_delta(records, tasks, folder / "fig3_delta_vs_base.png")
    fig_radar(records, tasks, folder / "fig4_radar.png")
    swept = sorted({(r.run.method, k) for r in records for k in r.run.swept})
    for method, param in swept:
        name = f"sensitivity_{method}_{param}.png"
        if fig_sensitivity(records, tasks, method, param, folder / name):
            figures[name] = f"{method}: accuracy versus {param}"
    return figures


def _costs(records: list[RunRecord]) -> list[str]:
    md = [
        "## Cost per merge",
        "",
        "| model | method | merge s | peak memory MB | eval s |",
        "|---|---|---|---|---|",
    ]
    md += [
        f"| {r.run.name} | {r.run.method} | {r.merge_seconds} | {r.merge_peak_rss_mb} | "
        f"{r.eval_seconds} |"
        for r in records
        if r.run.kind == "merge"
    ]
    return md


def _significance(records: list[RunRecord], tasks: list[str]) -> list[str]:
    md = [
        "",
        "## Is the difference real? Merge versus the better parent, per task",
        "",
        "Exact McNemar test on the per-question results (two-sided). Only p < 0.05 "
        "differences should be read as real.",
        "",
        "| model | task | versus | Δ points | only merge right | only parent right | p |",
        "|---|---|---|---|---|---|---|",
    ]
    md += [
        f"| {s['model']} | {s['task']} | {s['versus']} | {s['delta_points']:+.2f} | "
        f"{s['only_merge_right']} | {s['only_parent_right']} | {s['p_value']:.3g}"
        f"{' *' if s['p_value'] < 0.05 else ''} |"
        for s in significance(records, tasks)
    ]
    return md


def _html(markdown: str, folder: Path, figures: dict[str, str]) -> str:
    """A self-contained HTML page: markdown tables rendered, figures embedded as data URIs."""
    body = []
    table: list[str] = []

    def flush():
        if table:
            rows = [r.strip("|").split("|") for r in table if not set(r) <= set("|-")]
            head, *rest = rows
            out = [
                "<table><tr>"
                + "".join(f"<th>{html.escape(c.strip())}</th>" for c in head)
                + "</tr>"
            ]
            for row in rest:
                cells = []
                for c in row:
                    c = html.escape(c.strip())
                    if c.startswith("**") and c.endswith("**"):
                        c = f"<b>{c[2:-2]}</b>"
                    cells.append(f"<td>{c}</td>")
                out.append("<tr>" + "".join(cells) + "</tr>")
            body.append("".join(out) + "</table>")
            table.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("!["):
            file = line[line.index("(") + 1 : -1]
            data = base64.b64encode((folder / file).read_bytes()).decode()
            body.append(
                f'<img alt="{html.escape(figures.get(file, file))}" '
                f'src="data:image/png;base64,{data}">'
            )
        elif line:
            body.append(f"<p>{html.escape(line)}</p>")
    flush()
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:auto;background:#fff;"
        "color:#222}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid "
        "#ccc;padding:4px 8px;text-align:right}td:first-child,th:first-child{text-align:"
        "left}img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{folder.name}</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )
