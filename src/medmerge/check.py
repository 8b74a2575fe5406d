"""The Check stage: can these models be merged, and how well do their task vectors agree?

`check(base, models)` streams the checkpoints tensor by tensor (memory: one tensor per model)
and returns a `CheckReport` (a pydantic model; its JSON schema is the report's documentation):
- compatibility: architecture, every tensor name and shape, head and layer counts, vocabulary and
  tokenizer identity, dtypes, tied embeddings, full checkpoint or adapter;
- lineage: each model's relative task-vector size ||theta - base|| / ||base|| over the weight
  matrices (norm vectors, near 1 and rarely tuned, would hide the change), overall and per layer;
  a model far above fine-tuning scale is flagged as not plausibly a fine-tune of the base;
- mergeability, per tensor and per pair of models: task-vector cosine, sign agreement among the
  entries both models change, overlap of their top-k% magnitude entries, norm ratio; summarised
  per layer and per tensor type;
- recommendations, each with the figure that triggered it.

Bad arguments (a `topk` outside (0, 1], a model listed twice, an unusable device, JSON or plot
path) are `ConfigError`s raised before any model is read. What check finds in the models,
unreadable folders and NaN or inf weights included, goes into the report: a tensor with NaN or
inf in any model is left out of every statistic, so no figure is computed from it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from itertools import combinations
from pathlib import Path

import torch
from pydantic import BaseModel
from tqdm.auto import tqdm

from medmerge.errors import CheckpointError, ConfigError, MergeError
from medmerge.io import references
from medmerge.io.checkpoint import Checkpoint
from medmerge.io.folders import refuse_output_near
from medmerge.io.metadata import chat_template_of
from medmerge.methods import largest_magnitude
from medmerge.methods.sparsify import top_k_mask
from medmerge.models.architectures import is_vocabulary_tensor, layer_of, tensor_type
from medmerge.vocab import differences, some_tokens

log = logging.getLogger("medmerge")

# Full fine-tunes move weights by well under 10% of their norm (about 0.1-5% in published
# medical fine-tunes of Mistral-7B); an unrelated model of the same shape sits near sqrt(2).
LINEAGE_LIMIT = 0.5
CONFIG_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "tie_word_embeddings",
)


class Finding(BaseModel):
    check: str
    ok: bool
    detail: str


class ModelLineage(BaseModel):
    model: str
    relative_delta: float  # ||theta - base|| / ||base|| over all floating tensors
    per_layer: dict[str, float]  # layer index (or "other") -> relative delta
    plausible_finetune: bool


class PairStats(BaseModel):
    cosine: float
    sign_agreement: float | None  # among entries both models change; None if none do
    topk_overlap: float  # share of A's top-k% entries that are also in B's top-k%
    norm_ratio: float | None  # ||d_a|| / ||d_b||; None when d_b is zero


class PairReport(BaseModel):
    model_a: str
    model_b: str
    overall: PairStats
    per_tensor: dict[str, PairStats]
    per_layer: dict[str, PairStats]
    per_type: dict[str, PairStats]


class Recommendation(BaseModel):
    advice: str
    because: str


class CheckReport(BaseModel):
    base: str
    models: list[str]
    compatible: bool
    compatibility: list[Finding]
    lineage: list[ModelLineage]
    pairs: list[PairReport]
    recommendations: list[Recommendation]
    topk: float


# ---- compatibility -----------------------------------------------------------------------


def _open(reference: str, findings: list[Finding]) -> Checkpoint | None:
    if Path(reference).is_file():  # else it would be taken for a Hub ID
        detail = f"{reference} is a file; a model is a folder with config.json and its weights"
        findings.append(Finding(check=f"readable: {reference}", ok=False, detail=detail))
        return None
    try:
        return Checkpoint(references.folder(reference))
    except CheckpointError as e:
        findings.append(Finding(check=f"readable: {reference}", ok=False, detail=str(e)))
        return None


def _tokenizer_identity(folder: Path) -> str | None:
    """A hash of the vocabulary and special tokens, or None without tokenizer files; a
    CheckpointError naming the file where tokenizer.json cannot be read."""
    parts = []
    tok = folder / "tokenizer.json"
    if tok.is_file():
        try:
            raw = tok.read_bytes()
            if not raw.strip():
                raise ValueError("the file is empty")
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise TypeError(f"it holds a JSON {type(data).__name__}, not an object")
            parts.append(json.dumps(data.get("model", {}).get("vocab"), sort_keys=True).encode())
            added = sorted((t["id"], t["content"]) for t in data.get("added_tokens", []))
            parts.append(json.dumps(added).encode())
        except (ValueError, TypeError, AttributeError, KeyError) as e:  # not JSON, not UTF-8...
            raise CheckpointError(
                f"{tok} is not a readable tokenizer.json ({e}); re-save the model's tokenizer"
            ) from e
    elif (folder / "tokenizer.model").is_file():
        parts.append((folder / "tokenizer.model").read_bytes())
    else:
        return None
    for name in ("special_tokens_map.json",):
        if (folder / name).is_file():
            parts.append((folder / name).read_bytes())
    return hashlib.sha256(b"\n".join(parts)).hexdigest()[:16]


def _shape(ckpt: Checkpoint, name: str) -> tuple:
    shape = ckpt.info(name).shape
    return shape[1:] if is_vocabulary_tensor(name) else shape


def _vocabularies(base: Checkpoint, models: list[Checkpoint]) -> list[Finding]:
    """Each model's vocabulary against the base's (tokens added and missing, special tokens),
    and their chat templates. Different vocabularies merge with a tokenizer setting."""
    out, ids, unreadable = [], {}, set()
    for c in [base, *models]:
        try:
            ids[c.path] = _tokenizer_identity(c.path)
        except CheckpointError as e:
            ids[c.path] = None
            unreadable.add(c.path)
            out.append(Finding(check=f"tokenizer of {c.path}", ok=False, detail=str(e)))
    if any(i is None and p not in unreadable for p, i in ids.items()):
        detail = "some models have no tokenizer files; cannot compare"
        out.append(Finding(check="tokenizer", ok=True, detail=detail))
    for m in models:
        if None in (ids[m.path], ids[base.path]):
            continue
        if ids[m.path] == ids[base.path]:
            detail = "same vocabulary and special tokens as the base"
        else:
            extra, lacking = differences(base, m)
            detail = (
                "; ".join(
                    [f"adds {len(extra)}: {some_tokens(extra)}"] * bool(extra)
                    + [f"lacks {len(lacking)}: {some_tokens(lacking)}"] * bool(lacking)
                )
                or "same tokens as the base, other special tokens or normalisation"
            )
            detail = f"vocabulary differs from the base's: {detail} (tokenizer_source: union)"
        out.append(Finding(check=f"tokenizer of {m.path}", ok=True, detail=detail))
    templates = {str(c.path): chat_template_of(c.path) for c in [base, *models]}
    kinds = {t for t in templates.values() if t}
    if len(kinds) > 1:
        which = ", ".join(
            f"{Path(p).name}: {hashlib.sha256(t.encode()).hexdigest()[:8] if t else 'none'}"
            for p, t in templates.items()
        )
        detail = f"differs ({which}); set chat_template (auto: the commonest)"
        out.append(Finding(check="chat template", ok=True, detail=detail))
    return out


def _compatibility(base: Checkpoint, models: list[Checkpoint]) -> list[Finding]:
    out = []
    for key in CONFIG_KEYS:
        values = {str(c.path): c.config.get(key) for c in [base, *models]}
        same = len({json.dumps(v) for v in values.values()}) == 1
        detail = f"all {values[str(base.path)]!r}" if same else f"differs: {values}"
        if key == "vocab_size" and not same:  # rows matched by token make it mergeable
            detail += "; the vocabulary differs: merge with a tokenizer setting"
        out.append(Finding(check=f"config {key}", ok=same or key == "vocab_size", detail=detail))
    archs = {str(c.path): c.config.get("architectures") for c in [base, *models]}
    out.append(
        Finding(
            check="architecture class",
            ok=len({str(v) for v in archs.values()}) == 1,
            detail=str(archs[str(base.path)])
            if len({str(v) for v in archs.values()}) == 1
            else f"differs: {archs}",
        )
    )
    for m in models:
        missing = [n for n in base.names() if m.resolve(n) is None]
        # a vocabulary tensor's row count may differ: the tokenizer setting maps rows by token
        shapes = [n for n in base.names() if m.resolve(n) and _shape(m, n) != _shape(base, n)]
        extra = sorted(set(m.names()) - set(base.names()) - {"lm_head.weight"})
        detail = "all tensors present with the base's shapes"
        if missing or shapes or extra:
            detail = "; ".join(
                filter(
                    None,
                    [
                        f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
                        f"{len(shapes)} with other shapes (e.g. {shapes[0]}: "
                        f"{list(m.info(shapes[0]).shape)} vs {list(base.info(shapes[0]).shape)})"
                        if shapes
                        else "",
                        f"{len(extra)} extra (e.g. {extra[0]})" if extra else "",
                    ],
                )
            )
        out.append(Finding(check=f"tensors of {m.path}", ok=not (missing or shapes), detail=detail))
        dtypes = {str(i.dtype) for i in m.tensors.values()}
        base_dtypes = {str(i.dtype) for i in base.tensors.values()}
        out.append(
            Finding(
                check=f"dtypes of {m.path}",
                ok=True,
                detail=f"{sorted(dtypes)}"
                + (
                    ""
                    if dtypes == base_dtypes
                    else f" (base: {sorted(base_dtypes)}; merging computes in float32)"
                ),
            )
        )
    out += _vocabularies(base, models)
    return out


# ---- statistics -----------------------------------------------------------------------------


class _Acc:
    """Running sums for one pair over a set of tensors."""

    def __init__(self):
        self.dot = self.na = self.nb = 0.0
        self.both = self.agree = 0
        self.top_hits = self.top_total = 0

    def add(self, da: torch.Tensor, db: torch.Tensor, topk: float) -> None:
        self.dot += float((da * db).sum())
        self.na += float(da.pow(2).sum())
        self.nb += float(db.pow(2).sum())
        both = (da != 0) & (db != 0)
        self.both += int(both.sum())
        self.agree += int((both & (torch.sign(da) == torch.sign(db))).sum())
        k = max(1, round(topk * da.numel()))
        hits = top_k_mask(da.abs(), k) & top_k_mask(db.abs(), k)
        self.top_hits += int(hits.sum())
        self.top_total += k

    def stats(self) -> PairStats:
        norm = (self.na * self.nb) ** 0.5
        return PairStats(
            cosine=self.dot / norm if norm > 0 else 0.0,
            sign_agreement=self.agree / self.both if self.both else None,
            topk_overlap=self.top_hits / self.top_total if self.top_total else 0.0,
            norm_ratio=(self.na / self.nb) ** 0.5 if self.nb > 0 else None,
        )


def check(
    base: str | Path,
    models: list[str | Path],
    *,
    topk: float = 0.05,
    json_path: str | Path | None = None,
    plot_path: str | Path | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> CheckReport:
    """Check that `models` can be merged with `base` and how their task vectors agree.

    >>> check("models/base", ["models/cardio", "models/endo"], json_path="check.json").compatible
    """
    dev = _refuse_bad_arguments(base, models, topk, json_path, plot_path, device)
    findings: list[Finding] = []
    base_ckpt = _open(str(base), findings)
    ckpts = [_open(str(m), findings) for m in models]
    for f in findings:
        if "PEFT/LoRA adapter" in f.detail:
            f.check = "full checkpoint, not an adapter"
    report = CheckReport(
        base=str(base),
        models=[str(m) for m in models],
        compatible=False,
        compatibility=findings,
        lineage=[],
        pairs=[],
        recommendations=[],
        topk=topk,
    )
    if base_ckpt is None or any(c is None for c in ckpts):
        report.recommendations = _recommend(report)
        return _finish(report, json_path, plot_path)
    findings += _compatibility(base_ckpt, ckpts)
    report.compatibility = findings
    names = [
        n
        for n in base_ckpt.names()
        if base_ckpt.info(n).dtype.is_floating_point
        and all(c.resolve(n) and c.info(n).shape == base_ckpt.info(n).shape for c in ckpts)
    ]
    pairs = list(combinations(range(len(ckpts)), 2))
    overall_acc = {p: _Acc() for p in pairs}
    tensor_acc = {p: {} for p in pairs}
    layer_acc = {p: {} for p in pairs}
    type_acc = {p: {} for p in pairs}
    base_sq: dict[str, float] = {}
    delta_sq = [dict() for _ in ckpts]
    damaged: list[tuple[Checkpoint, str]] = []  # (model, tensor) with NaN or inf values
    # tensors not compared (a vocabulary of other size, extra ones) are only checked for NaN
    others = [
        (c, n)
        for c in [base_ckpt, *ckpts]
        for n in sorted(set(c.names()) - {c.resolve(k) for k in names})
        if c.info(n).dtype.is_floating_point
    ]
    total = sum(base_ckpt.info(n).nbytes for n in names) * (len(ckpts) + 1)
    total += sum(c.info(n).nbytes for c, n in others)
    with tqdm(total=total, unit="B", unit_scale=True, desc="check", disable=not progress) as bar:
        for c, name in others:
            _read(c, name, damaged)
            bar.update(c.info(name).nbytes)
        for name in names:
            seen = len(damaged)
            b = _read(base_ckpt, name, damaged).to(dev, torch.float32)
            deltas = [_read(c, name, damaged).to(dev, torch.float32) - b for c in ckpts]
            bar.update(base_ckpt.info(name).nbytes * (len(ckpts) + 1))
            if len(damaged) > seen:  # its sums would be NaN: left out of every statistic
                continue
            layer = layer_of(name)
            if b.dim() >= 2:  # lineage on matrices: norm vectors (~1, rarely tuned) hide change
                base_sq[layer] = base_sq.get(layer, 0.0) + float(b.pow(2).sum())
                for i, d in enumerate(deltas):
                    delta_sq[i][layer] = delta_sq[i].get(layer, 0.0) + float(d.pow(2).sum())
            for p in pairs:
                da, db = deltas[p[0]], deltas[p[1]]
                for acc in (
                    overall_acc[p],
                    tensor_acc[p].setdefault(name, _Acc()),
                    layer_acc[p].setdefault(layer, _Acc()),
                    type_acc[p].setdefault(tensor_type(name), _Acc()),
                ):
                    acc.add(da, db, topk)
    for c in [base_ckpt, *ckpts]:
        c.close()
    findings += _finite_findings([base_ckpt, *ckpts], damaged)
    report.compatible = all(f.ok for f in findings)
    for i, c in enumerate(ckpts if base_sq else []):  # none without a weight matrix compared
        overall = (sum(delta_sq[i].values()) / max(sum(base_sq.values()), 1e-30)) ** 0.5
        report.lineage.append(
            ModelLineage(
                model=str(c.path),
                relative_delta=overall,
                per_layer={k: (v / max(base_sq[k], 1e-30)) ** 0.5 for k, v in delta_sq[i].items()},
                plausible_finetune=0 < overall <= LINEAGE_LIMIT,  # 0: the base itself
            )
        )
    for p in pairs:
        if not overall_acc[p].top_total:  # no tensor compared: no figure to show
            continue
        report.pairs.append(
            PairReport(
                model_a=str(ckpts[p[0]].path),
                model_b=str(ckpts[p[1]].path),
                overall=overall_acc[p].stats(),
                per_tensor={k: a.stats() for k, a in tensor_acc[p].items()},
                per_layer={k: a.stats() for k, a in layer_acc[p].items()},
                per_type={k: a.stats() for k, a in type_acc[p].items()},
            )
        )
    report.recommendations = _recommend(report)
    return _finish(report, json_path, plot_path)


def _refuse_bad_arguments(
    base, models: list, topk: float, json_path, plot_path, device: str
) -> torch.device:
    """Raise a ConfigError for arguments that cannot work, before any model is read; the device."""
    if not models:
        raise ConfigError("check needs at least one model besides the base")
    if not 0 < topk <= 1:
        raise ConfigError(f"--topk is a fraction of the entries, in (0, 1]; got {topk}")
    seen: dict = {}
    for m in models:
        key = Path(m).resolve() if Path(m).is_dir() else str(m)
        if key in seen:
            raise ConfigError(f"model {m} is listed twice (also as {seen[key]}); list it once")
        seen[key] = m
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"--device {device} is not a torch device; use cpu or cuda") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda was asked for but torch sees no CUDA GPU; use --device cpu"
        )
    for flag, path in (("--json", json_path), ("--plot", plot_path)):
        if not path:
            continue
        folder = Path(path).absolute().parent
        if Path(path).is_dir():
            raise ConfigError(f"{flag} {path} is a folder; give a file name")
        if not folder.is_dir():
            raise ConfigError(f"{flag} {path}: folder {folder} does not exist; create it first")
        if not os.access(folder, os.W_OK):
            raise ConfigError(f"{flag} {path}: folder {folder} is not writable; write elsewhere")
        try:  # never into a model being read
            refuse_output_near(path, [m for m in (base, *models) if Path(m).is_dir()], flag)
        except MergeError as e:
            raise ConfigError(str(e)) from e
    if plot_path:
        if len(models) < 2:
            raise ConfigError("--plot draws a pair of models: give two or more, or leave it out")
        formats = _plot_formats()
        if Path(plot_path).suffix[1:].lower() not in formats:
            raise ConfigError(
                f"--plot {plot_path}: matplotlib writes files ending in "
                f"{', '.join('.' + f for f in formats)}; name the plot with one of them"
            )
    return dev


def _read(ckpt: Checkpoint, name: str, damaged: list) -> torch.Tensor:
    """One tensor as stored; (ckpt, name) goes into `damaged` if it has NaN or inf (one fast
    pass over the stored bits, the merge engine's test)."""
    t = ckpt.read(name)
    if t.dtype.is_floating_point and not math.isfinite(largest_magnitude(t)):
        damaged.append((ckpt, name))
    return t


def _finite_findings(ckpts: list[Checkpoint], damaged: list) -> list[Finding]:
    """Per model, whether its floating tensors are finite, naming the first that are not."""
    out = []
    for c in ckpts:
        names = [n for d, n in damaged if d is c]
        detail = "no NaN or inf"
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            detail = (
                f"NaN or inf in {len(names)} tensor(s): {shown}; the model is damaged "
                "(re-download or re-save it); those tensors are left out of the statistics"
            )
        out.append(Finding(check=f"finite weights of {c.path}", ok=not names, detail=detail))
    return out


def _finish(report: CheckReport, json_path, plot_path) -> CheckReport:
    if json_path:
        Path(json_path).write_text(report.model_dump_json(indent=2))
    if plot_path and report.pairs:
        heatmap(report, plot_path)
    return report


# ---- recommendations --------------------------------------------------------------------------


def _recommend(report: CheckReport) -> list[Recommendation]:
    recs = []
    differ = [f for f in report.compatibility if "vocabulary differs" in f.detail
              or f.check == "config vocab_size" and "differs" in f.detail]  # fmt: skip
    if differ:
        recs.append(
            Recommendation(
                advice="merge with `tokenizer_source: union` (every model's added tokens kept, "
                "rows matched by token), or `base` to keep the base's vocabulary",
                because="; ".join(f"{f.check}: {f.detail}" for f in differ),
            )
        )
    for f in report.compatibility:
        if f.ok:
            continue
        if "adapter" in f.detail:
            recs.append(
                Recommendation(
                    advice="fold the adapter into its base first: `medmerge materialize "
                    "ADAPTER_DIR "
                    "OUT_DIR`, then merge the full checkpoint (the paper saw large degradation "
                    "merging a full fine-tune with an adapter-only model)",
                    because=f.detail,
                )
            )
        else:
            recs.append(
                Recommendation(
                    advice="do not merge these models as they are", because=f"{f.check}: {f.detail}"
                )
            )
    for lin in report.lineage:
        if lin.relative_delta == 0:
            recs.append(
                Recommendation(
                    advice=f"{lin.model} has the base's weights exactly: merging it adds nothing",
                    because="its task vector is zero",
                )
            )
        elif not lin.plausible_finetune:
            recs.append(
                Recommendation(
                    advice=f"{lin.model} does not look like a fine-tune of the base; merging it "
                    "with task-vector methods is unlikely to work",
                    because=f"relative task vector {lin.relative_delta:.3f} > {LINEAGE_LIMIT} "
                    "(fine-tunes are typically below 0.05)",
                )
            )
    if recs or not report.pairs:
        return recs
    cos = min(p.overall.cosine for p in report.pairs)
    agree = [p.overall.sign_agreement for p in report.pairs if p.overall.sign_agreement is not None]
    agreement = min(agree) if agree else None
    ratios = [r for p in report.pairs for r in (p.overall.norm_ratio,) if r]
    imbalance = max(max(ratios), 1 / min(ratios)) if ratios else 1.0
    small = max(lin.relative_delta for lin in report.lineage)
    if cos >= 0.2 and (agreement is None or agreement >= 0.6):
        recs.append(
            Recommendation(
                advice="start simple: linear averaging or task arithmetic (the paper's best "
                "methods "
                "for compatible parents)",
                because=f"task vectors point the same way (cosine {cos:.3f}, sign agreement "
                f"{_fmt(agreement)})",
            )
        )
    elif abs(cos) < 0.2:
        recs.append(
            Recommendation(
                advice="task arithmetic with weight near 1 per model keeps both skills "
                "(near-orthogonal task vectors barely interfere); compare with linear",
                because=f"task vectors are nearly orthogonal (cosine {cos:.3f})",
            )
        )
    if agreement is not None and agreement < 0.55:
        recs.append(
            Recommendation(
                advice="resolve sign conflicts: TIES or DARE-TIES with density >= 0.9",
                because=f"only {agreement:.1%} of entries both models change agree in sign",
            )
        )
    if cos < -0.2:
        recs.append(
            Recommendation(
                advice="the parents pull in opposite directions: expect interference; try TIES and "
                "the hierarchical method (its cosine weight drops conflicting tensors)",
                because=f"task-vector cosine {cos:.3f}",
            )
        )
    if small < 0.05:
        recs.append(
            Recommendation(
                advice="keep pruning light: density >= 0.9 for DARE, DELLA and Breadcrumbs (the "
                "paper's DARE-TIES at density 0.6 lost up to 10 points)",
                because=f"task vectors are small (largest relative size {small:.4f}), so dropping "
                "entries removes much of what fine-tuning learned",
            )
        )
    if imbalance > 3:
        recs.append(
            Recommendation(
                advice="rebalance: lower the weight of the larger task vector or use TIES with "
                "normalize",
                because=f"one task vector is {imbalance:.1f}x the norm of another",
            )
        )
    return recs


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


# ---- plot ----------------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ConfigError("plots need matplotlib: pip install 'medmerge[plot]'") from e
    return plt


def _plot_formats() -> list[str]:
    """The file suffixes (no dot) matplotlib's canvas can write."""
    _pyplot()
    from matplotlib.backend_bases import FigureCanvasBase

    return sorted(FigureCanvasBase.get_supported_filetypes())


def heatmap(report: CheckReport, path: str | Path) -> Path:
    """Layers x tensor type heatmaps of task-vector cosine and sign agreement (first pair)."""
    plt = _pyplot()
    pair = report.pairs[0]
    types = [t for t in ("q", "k", "v", "o", "gate", "up", "down", "norms")]
    layers = sorted({layer_of(n) for n in pair.per_tensor} - {"other"}, key=int)
    grids = {"cosine": [], "sign agreement": []}
    for layer in layers:
        rows = {k: [] for k in grids}
        for t in types:
            acc = [
                s
                for n, s in pair.per_tensor.items()
                if layer_of(n) == layer and tensor_type(n) == t
            ]
            rows["cosine"].append(sum(s.cosine for s in acc) / len(acc) if acc else float("nan"))
            agree = [s.sign_agreement for s in acc if s.sign_agreement is not None]
            rows["sign agreement"].append(sum(agree) / len(agree) if agree else float("nan"))
        for k in grids:
            grids[k].append(rows[k])
    fig, axes = plt.subplots(1, 2, figsize=(11, 1.5 + 0.3 * len(layers)), facecolor="white")
    for ax, (title, grid), (lo, hi, cmap) in zip(
        axes, grids.items(), [(-1, 1, "RdBu_r"), (0, 1, "viridis")], strict=True
    ):
        im = ax.imshow(grid, aspect="auto", vmin=lo, vmax=hi, cmap=cmap)
        ax.set_xticks(range(len(types)), types)
        ax.set_yticks(range(len(layers)), layers)
        ax.set_xlabel("tensor type")
        ax.set_ylabel("layer")
        ax.set_title(f"task-vector {title}")
        fig.colorbar(im, ax=ax)
    fig.suptitle(f"{Path(pair.model_a).name} vs {Path(pair.model_b).name}")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except RuntimeError as e:  # a format whose writer is missing, e.g. .pgf without LaTeX
        raise ConfigError(f"--plot {path}: matplotlib cannot write it here ({e})") from e
    finally:
        plt.close(fig)
    return Path(path)
