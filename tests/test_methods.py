"""Every merge method against an independent transcription of its formula.

References here use numpy (float32, the precision the methods are specified in, so sign
elections of near-cancelling sums agree) and full sorts (never the code under test's selection), and
draw random masks the documented way: `uniform(key) < p` with the counter-based draws keyed by
(seed, tensor name, model index); the draws themselves are checked against a plain-Python hash.
"""

import hashlib
import math

import numpy as np
import pytest
import torch
from conftest import logits, state
from method_cases import CASES
from scipy.stats import rankdata

import medmerge
from medmerge.errors import ConfigError, MergeError
from medmerge.methods import REGISTRY, REQUIRED, config_name, register
from medmerge.methods import sparsify as sp
from medmerge.methods import spherical as sph
from medmerge.methods.rng import tensor_keys, tensor_seed, uniform

ties, dare_ties, dare_linear, della, sce = (
    REGISTRY[m].fn for m in ("ties", "dare_ties", "dare_linear", "della", "sce")
)

# ---- references (numpy) ------------------------------------------------------------


def ref_topk(x, k):
    """Mask of the k largest; ties go to the earliest positions (stable full sort)."""
    flat = np.asarray(x, dtype=np.float64).reshape(-1)
    order = np.argsort(-flat, kind="stable")
    mask = np.zeros(flat.size, bool)
    mask[order[:k]] = True
    return mask.reshape(np.shape(x))


def ref_rand(seed, name, i, shape):
    n = math.prod(shape)
    return uniform(tensor_seed(seed, name, i), slice(0, n)).reshape(shape).numpy()


def ref_combine(base, deltas, w, ties, normalize, lam=1.0, votes=None, at_least=None):
    """mergekit's generalized task arithmetic: the weighted deltas, where `ties` only those
    whose sign (of the delta times its vote, by default its weight) agrees with the sign of the
    votes' sum, positive where that sum is 0; divided by the weights that contributed (by 1
    where they sum to 0; by at least `at_least` where given), or without consensus by the
    weights' sum (by 1 below 1e-8)."""
    deltas = np.stack(deltas)
    w = np.asarray(w, dtype=base.dtype).reshape(-1, *[1] * base.ndim)
    v = w if votes is None else np.asarray(votes, dtype=base.dtype).reshape(w.shape)
    weighted = deltas * w
    if ties:
        majority = np.where((deltas * v).sum(0) >= 0, 1.0, -1.0)
        agree = np.sign(deltas * v) == majority
        weighted = weighted * agree
        wsum = (w * agree).sum(0)
        wsum = np.maximum(wsum, at_least) if at_least else np.where(wsum == 0, 1.0, wsum)
    else:
        total = w.sum()
        wsum = total if abs(total) >= 1e-8 else 1.0
    merged = weighted.sum(0)
    if normalize or at_least:
        merged = merged / wsum
    return base + lam * merged


def ref_rescale(d, keep, p, how):
    """Kept entries, rescaled: by 1/p, or to the unsparsified L1 norm (not where either norm is
    below 1e-7, as mergekit)."""
    kept = d * keep
    if how == "inverse_density":
        return np.where(keep, kept / p, 0.0)
    if how == "l1":
        before, after = np.abs(d).sum(), np.abs(kept).sum()
        return kept * (before / after) if before >= 1e-7 and after >= 1e-7 else kept
    return kept


def ref_della_p(d, density, eps, ties="position"):
    """DELLA's keep probabilities by the ascending |d| rank in each row: ties in position order
    (a stable sort), or at their average rank."""
    rows = d.reshape(d.shape[0], -1) if d.ndim > 1 else d.reshape(1, -1)
    if ties == "average":
        ranks = rankdata(np.abs(rows), method="average", axis=1) - 1
    else:
        ranks = np.argsort(np.argsort(np.abs(rows), axis=1, kind="stable"), axis=1)
    scale = (ranks / max(rows.shape[1] - 1, 1)).astype(np.float32)
    return (np.float32(density - eps) + np.float32(2 * eps) * scale).reshape(d.shape)


def ref_trim_count(density, n):
    """mergekit's magnitude: all from density 1, none at 0, else int(density n), at least 1."""
    return n if density >= 1 else 0 if density <= 0 else max(1, int(density * n))


def ref_slerp_vectors(t, a, b, colinear=lambda cos: abs(cos) > 0.9995):
    ua, ub = a / np.linalg.norm(a), b / np.linalg.norm(b)
    cos = np.clip((ua * ub).sum(), -1, 1)
    if colinear(cos):
        return (1 - t) * a + t * b
    th = math.acos(cos)
    return math.sin((1 - t) * th) / math.sin(th) * a + math.sin(t * th) / math.sin(th) * b


SEED = 11


def ref_linear(name, base, models, p):
    w = p["weight"]
    merged = sum(wi * m for wi, m in zip(w, models))
    return merged / sum(w) if p["normalize"] else merged


def ref_task_arithmetic(name, base, models, p):
    deltas = [m - base for m in models]
    return ref_combine(base, deltas, p["weight"], False, p["normalize"], p["lambda_"])


def ref_ties(name, base, models, p):
    d = [m - base for m in models]
    trimmed = [
        ref_rescale(di, ref_topk(np.abs(di), ref_trim_count(k, di.size)), 1.0, _l1(p))
        for di, k in zip(d, p["density"])
    ]
    return ref_combine(base, trimmed, p["weight"], True, p["normalize"], p["lambda_"])


def _l1(p):
    return {True: "l1", False: "none"}.get(p["rescale"], p["rescale"])


def ref_dare(ties):
    def ref(name, base, models, p):
        dropped = []
        for i, (m, k) in enumerate(zip(models, p["density"])):
            di = m - base
            keep = ref_rand(SEED, name, i, di.shape) < k
            dropped.append(ref_rescale(di, keep, k, _l1(p)))
        return ref_combine(base, dropped, p["weight"], ties, p["normalize"], p["lambda_"])

    return ref


def ref_della(ties):
    def ref(name, base, models, p):
        pruned = []
        for i, (m, k, eps) in enumerate(zip(models, p["density"], p["epsilon"])):
            di = m - base
            prob = ref_della_p(di, k, eps, p["rank_ties"])
            keep = ref_rand(SEED, name, i, di.shape) < prob
            pruned.append(ref_rescale(di, keep, prob, _l1(p)))
        return ref_combine(base, pruned, p["weight"], ties, p["normalize"], p["lambda_"])

    return ref


def ref_breadcrumbs(ties):
    def ref(name, base, models, p):
        crumbs = []
        for m, k, gamma in zip(models, p["density"], p["gamma"]):
            di = m - base
            n = di.size
            kept = int(k * n)  # mergekit: below the gamma outliers where they leave room
            outliers = n - max(0, n - kept - int(gamma * n)) - kept
            a = np.abs(di)
            mask = ref_topk(a, outliers + kept) & ~ref_topk(a, outliers)
            crumbs.append(ref_rescale(di, mask, 1.0, _l1(p)))
        return ref_combine(base, crumbs, p["weight"], ties, p["normalize"], p["lambda_"])

    return ref


def ref_sce(name, base, models, p):
    D = np.stack([m - base for m in models])
    var = D.var(0)
    k = int(np.count_nonzero(var) * p["select_topk"]) if p["select_topk"] < 1 else var.size
    D = D * ref_topk(var, k)
    means = (D**2).reshape(len(models), -1).mean(1)
    weights = means / means.sum() if means.sum() >= 1e-6 else np.full(len(models), 1 / len(models))
    ones = [1.0] * len(models)
    merged = ref_combine(np.zeros_like(base), list(D), weights, True, True, 1.0, ones, 1e-6)
    return base + p["lambda_"] * merged


def ref_slerp(name, base, models, p):
    return ref_slerp_vectors(p["t"], models[0], models[1])


def ref_nuslerp(name, base, models, p):
    w = p["weight"]
    exact = lambda cos: 1 - cos**2 <= 1e-16  # noqa: E731 - mergekit's nuslerp threshold
    return base + ref_slerp_vectors(w[1] / (w[0] + w[1]), models[0] - base, models[1] - base, exact)


def ref_model_stock(name, base, models, p):
    d = [m - base for m in models]
    cos = (d[0] * d[1]).sum() / max(np.linalg.norm(d[0]) * np.linalg.norm(d[1]), 1e-6)
    t = 2 * cos / (1 + cos) if abs(1 + cos) >= 1e-6 else 0.0  # no clamp of cos, as mergekit
    return t * (models[0] + models[1]) / 2 + (1 - t) * base


def ref_karcher(name, base, models, p):
    # two directions, equal weights: the Karcher mean is the geodesic midpoint
    u = [m / np.linalg.norm(m) for m in models]
    mid = (u[0] + u[1]) / np.linalg.norm(u[0] + u[1])
    return mid * (np.linalg.norm(models[0]) + np.linalg.norm(models[1])) / 2


def ref_multislerp(name, base, models, p):
    d = [m - base for m in models]
    w = np.asarray(p["weight"]) / sum(p["weight"])
    norms = [np.linalg.norm(x) for x in d]
    units = [x / (n + 1e-8) for x, n in zip(d, norms)]
    mean = sum(wi * u for wi, u in zip(w, units))
    mean = mean / np.linalg.norm(mean)
    tangent = sum(wi * (u - (u * mean).sum() * mean) for wi, u in zip(w, units))
    step = np.linalg.norm(tangent) + 1e-8
    result = mean * math.cos(step) + tangent * math.sin(step) / step
    return base + result * sum(wi * n for wi, n in zip(w, norms))


REFERENCES = {
    "linear": ref_linear,
    "task_arithmetic": ref_task_arithmetic,
    "ties": ref_ties,
    "dare_ties": ref_dare(ties=True),
    "dare_linear": ref_dare(ties=False),
    "della": ref_della(ties=True),
    "della_linear": ref_della(ties=False),
    "breadcrumbs": ref_breadcrumbs(ties=False),
    "breadcrumbs_ties": ref_breadcrumbs(ties=True),
    "sce": ref_sce,
    "slerp": ref_slerp,
    "nuslerp": ref_nuslerp,
    "multislerp": ref_multislerp,
    "model_stock": ref_model_stock,
    "karcher": ref_karcher,
}


def reference(method, name, base, models, p):
    """The expected merged tensor for one tensor name: the parameters given, the rest at the
    registry's defaults (per-model ones as one value per model)."""
    spec = REGISTRY[method]
    full = {}
    for key, default in spec.defaults.items():
        value = p.get(key, default)
        if value is not REQUIRED:
            full[key] = (
                [value] * len(models)
                if key in spec.per_model and not isinstance(value, list)
                else value
            )
    return REFERENCES[method](name, base, models, full)


def params_of(method: str) -> dict:
    """The method's case parameters (tests/method_cases.py) under their Python names."""
    names = {config_name(p.name): p.name for p in REGISTRY[method].params}
    return {names[k]: v for k, v in CASES[method].params.items()}


PARAMS = {method: params_of(method) for method in REFERENCES}


# checked against their formulas in tests/test_entrywise.py and test_hierarchical.py, and
# against mergekit by benchmarks/mergekit_equality.py
ELSEWHERE = {"cosine_ot_lerp", "hierarchical", "passthrough", "nearswap", "arcee_fusion", "ram",
             "ramplus_tl"}  # fmt: skip


def test_every_registered_method_has_a_reference():
    assert set(REGISTRY) - ELSEWHERE <= set(REFERENCES)


def test_a_method_name_is_registered_once():
    with pytest.raises(ValueError, match="'linear' is registered already"):

        @register("linear")
        def linear(base: None, models: list[torch.Tensor]) -> torch.Tensor:
            """Another linear."""
            return models[0]

    assert REGISTRY["linear"].doc != "Another linear."


def test_every_method_has_a_case():
    missing = sorted(set(REGISTRY) - set(CASES))
    assert not missing, (
        f"add a Case for {', '.join(missing)} to tests/method_cases.py: example parameters "
        "(per-model ones as a list of two) and how it takes row blocks (rows, streams or None)"
    )


def merge_config(method, base, a, b):
    """The two fine-tunes merged; their base named where the method takes it beside them."""
    p = PARAMS[method]
    per_model = REGISTRY[method].per_model
    models = [
        {"model": str(m), "parameters": {k: v[i] for k, v in p.items() if k in per_model}}
        for i, m in enumerate((a, b))
    ]
    top = {k.rstrip("_"): v for k, v in p.items() if k not in per_model}
    base_model = {"base_model": str(base)} if REGISTRY[method].takes_base(2) else {}
    return {"merge_method": method, **base_model, "models": models, "parameters": top,
            "dtype": "float32"}  # fmt: skip


@pytest.fixture(params=["whole", "chunked"])
def chunking(request, monkeypatch):
    """Tiny tensors fit in one chunk; "chunked" cuts them into 96-entry chunks, so statistics
    passes, tie budgets carried across chunks and row-aligned chunks are exercised."""
    if request.param == "chunked":
        # every chunk loop goes by `spans`
        monkeypatch.setattr("medmerge.methods.streaming.CHUNK", 96)
    return request.param


@pytest.mark.parametrize("method", sorted(PARAMS))
def test_method_matches_reference_and_runs_in_transformers(family, tmp_path, method, chunking):
    base, a, b = family
    out = medmerge.merge(
        merge_config(method, base, a, b), tmp_path / "m", seed=SEED, progress=False
    )
    B, A, Bm, M = ({k: v.float().numpy() for k, v in state(x).items()} for x in (base, a, b, out))
    p = PARAMS[method]
    for name in M:
        expected = reference(method, name, B[name], [A[name], Bm[name]], p)
        np.testing.assert_allclose(M[name], expected, rtol=2e-5, atol=2e-6, err_msg=name)
    result = logits(out)
    assert torch.isfinite(result).all()


@pytest.fixture
def toy_methods():
    """Methods as a newcomer writes them: plain float32 functions, registered by decorator."""

    @register("toy_shifted_sum")
    def shifted_sum(
        base: torch.Tensor, models: list[torch.Tensor], *, weight: list[float], shift: float = 0.5
    ) -> torch.Tensor:
        """base + shift * sum_i w_i (theta_i - base)."""
        return base + shift * sum(w * (m - base) for w, m in zip(weight, models))

    @register("toy_mean")
    def mean(
        base: torch.Tensor | None, models: list[torch.Tensor], *, weight: list[float] = 1.0
    ) -> torch.Tensor:
        """sum_i w_i theta_i / sum_i w_i."""
        return sum(w * m for w, m in zip(weight, models)) / sum(weight)

    yield REGISTRY["toy_shifted_sum"], REGISTRY["toy_mean"]
    del REGISTRY["toy_shifted_sum"], REGISTRY["toy_mean"]


def test_a_toy_method_registers_from_its_signature_and_merges_end_to_end(
    family, tmp_path, toy_methods
):
    shifted, mean = toy_methods
    assert shifted.needs_base and shifted.uses_base and not mean.needs_base
    assert shifted.per_model == mean.per_model == {"weight"}
    assert shifted.defaults == {"weight": REQUIRED, "shift": 0.5} and mean.defaults == {
        "weight": 1.0
    }
    assert shifted.doc == "base + shift * sum_i w_i (theta_i - base)."
    base, a, b = family
    cfg = {
        "merge_method": "toy_shifted_sum",
        "base_model": str(base),
        "models": [
            {"model": str(a), "parameters": {"weight": 0.3}},
            {"model": str(b), "parameters": {"weight": 0.9}},
        ],
        "parameters": {"shift": 0.25},
        "dtype": "float32",
    }
    out = medmerge.merge(cfg, tmp_path / "toy", progress=False)
    B, A, Bm, M = ({k: v.float().numpy() for k, v in state(x).items()} for x in (base, a, b, out))
    for name in M:
        expected = B[name] + 0.25 * (0.3 * (A[name] - B[name]) + 0.9 * (Bm[name] - B[name]))
        np.testing.assert_allclose(M[name], expected, rtol=1e-6, atol=1e-7, err_msg=name)
    assert torch.isfinite(logits(out)).all()
    cfg = {"merge_method": "toy_mean", "models": cfg["models"], "dtype": "float32"}
    out = medmerge.merge(cfg, tmp_path / "mean", progress=False)
    for name, merged in state(out).items():
        expected = (0.3 * A[name] + 0.9 * Bm[name]) / 1.2
        np.testing.assert_allclose(merged.numpy(), expected, rtol=1e-6, atol=1e-7, err_msg=name)
    with pytest.raises(ConfigError, match="toy_shifted_sum needs a base_model"):
        medmerge.merge({**cfg, "merge_method": "toy_shifted_sum"}, tmp_path / "x", progress=False)


# ---- selection and sparsifiers -----------------------------------------------------------------


def test_radix_selection_equals_a_full_sort_including_ties(chunking):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 257, generator=g).abs()
    x[::7] = 0.5  # many exact ties
    for k in (0, 1, 17, 3000, 40_000, x.numel() - 1, x.numel()):
        assert np.array_equal(sp.top_k_mask(x, k).numpy(), ref_topk(x.numpy(), k)), k


def test_dare_keeps_density_within_three_sigma_and_is_unbiased():
    d = torch.randn(400, 500, generator=torch.Generator().manual_seed(1))
    for density in (0.1, 0.6, 0.9):
        kept = sp.random_drop(d, density, 2, "inverse_density")
        n = d.numel()
        sigma = math.sqrt(n * density * (1 - density))
        assert abs(int((kept != 0).sum()) - density * n) < 3 * sigma
    small = d[:20, :25]
    draws = torch.stack([sp.random_drop(small, 0.5, s, "inverse_density") for s in range(2000)])
    z = (draws.mean(0) - small) / (small.abs() * math.sqrt((1 - 0.5) / 0.5 / 2000))
    assert z.abs().mean() < 1.0 and z.abs().max() < 5


def test_dare_rescale_l1_and_none():
    d = torch.randn(50, 60, generator=torch.Generator().manual_seed(3))
    l1 = sp.random_drop(d, 0.3, 4, "l1")
    torch.testing.assert_close(l1.abs().sum(), d.abs().sum())
    none = sp.random_drop(d, 0.3, 4, "none")
    assert torch.equal(none != 0, l1 != 0) and torch.equal(none[none != 0], d[none != 0])
    with pytest.raises(ConfigError, match="rescale must be"):
        sp.random_drop(d, 0.3, 0, "sqrt")


def test_della_keep_rate_rises_with_magnitude_rank():
    d = torch.randn(2000, 100, generator=torch.Generator().manual_seed(5))
    kept = sp.della_prune(d, 0.5, 0.2, 6, "none") != 0
    ranks = d.abs().argsort(1).argsort(1)
    rates = [
        kept[(ranks >= lo) & (ranks < lo + 20)].float().mean().item() for lo in range(0, 100, 20)
    ]
    assert rates == sorted(rates)
    expected = [0.5 - 0.2 + 0.4 * (lo + 9.5) / 99 for lo in range(0, 100, 20)]
    assert np.allclose(rates, expected, atol=0.02)


def test_della_ranks_equal_magnitudes_in_order_or_at_their_average():
    """mergekit's ranks (a sort: equal |d| take consecutive ranks, here in position order) by
    default; `rank_ties: average` gives equal |d| one probability, from their average rank."""
    d = torch.randint(-3, 4, (20, 30), generator=torch.Generator().manual_seed(2)).float()
    flat = d.reshape(-1)
    for ties, method in (("position", "ordinal"), ("average", "average")):
        _, prob = sp.magprune(0.5, 0.2, 1, 30, ties)()(flat, slice(0, d.numel()))
        prob = prob.view(20, 30)
        if method == "ordinal":
            ranks = np.argsort(np.argsort(d.abs().numpy(), axis=1, kind="stable"), axis=1)
        else:
            ranks = rankdata(d.abs().numpy(), method="average", axis=1) - 1
        assert np.allclose(prob.numpy(), 0.3 + 0.4 * ranks / 29)
    for row, p in zip(d.abs(), prob):  # the average: one probability per magnitude
        for value in row.unique():
            assert p[row == value].unique().numel() == 1


def test_breadcrumbs_removes_exactly_the_top_gamma_outliers():
    d = torch.randn(100, 100, generator=torch.Generator().manual_seed(7))
    out = sp.breadcrumbs(d, 0.5, 0.05)
    top = torch.from_numpy(ref_topk(d.abs().numpy(), 500))
    assert (out[top] == 0).all()
    assert int((out != 0).sum()) == 5000
    assert (out[out != 0].abs() < d.abs()[top].min()).all()
    assert torch.equal(sp.breadcrumbs(d, 0.3, 0.0), sp.magnitude(d, 0.3))


def test_ties_never_mixes_opposite_signs():
    g = torch.Generator().manual_seed(8)
    base = torch.zeros(200, 30)
    models = [torch.randn(200, 30, generator=g) for _ in range(3)]
    out = ties(base, models, weight=[1.0, 1.0, 1.0], density=[1.0] * 3)
    stacked = torch.stack(models)
    elected = torch.sign(stacked.sum(0))
    assert ((torch.sign(out) == elected) | (out == 0)).all()
    agreeing = torch.where(torch.sign(stacked) == elected, stacked.abs(), 0.0)
    assert (out.abs() <= agreeing.max(0).values + 1e-6).all()


# ---- edge cases ------------------------------------------------------------------------------


def test_density_zero_and_one():
    g = torch.Generator().manual_seed(9)
    base = torch.randn(30, 40, generator=g)
    models = [base + torch.randn(30, 40, generator=g) for _ in range(2)]
    keys = [0, 1]
    for method in (ties, dare_ties, dare_linear):
        kw = {"keys": keys} if method is not ties else {}
        assert torch.equal(method(base, models, weight=[0.5, 0.5], density=[0.0, 0.0], **kw), base)
    full = dare_linear(base, models, weight=[0.5, 0.5], density=[1.0, 1.0], keys=keys)
    torch.testing.assert_close(full, base + 0.5 * (models[0] - base) + 0.5 * (models[1] - base))
    # as in mergekit, a density above 1 keeps everything and one below 0 nothing
    over = ties(base, models, weight=[1, 1], density=[1.5, 1])
    assert torch.equal(over, ties(base, models, weight=[1, 1], density=[1.0, 1.0]))
    assert torch.equal(dare_linear(base, models, weight=[1, 1], density=[-1, -1], keys=keys), base)


def test_single_identical_and_zero_task_vectors():
    g = torch.Generator().manual_seed(10)
    base = torch.randn(8, 9, generator=g)
    m = base + torch.randn(8, 9, generator=g)
    keys = [0, 1]
    # identical models: consensus methods give that model back
    assert torch.allclose(ties(base, [m, m], weight=[0.5, 0.5], density=[1, 1]), m)
    assert torch.allclose(sce(base, [m, m]), m)
    assert torch.allclose(sph.slerp(None, [m, m], t=0.4), m)
    assert torch.allclose(sph.karcher(None, [m, m]), m, atol=1e-6)
    # a single model
    assert torch.allclose(ties(base, [m], weight=[1.0], density=[1.0]), m)
    assert torch.allclose(sce(base, [m]), m)
    # as mergekit: one model's task vectors do not vary, so SCE's selection keeps none of them
    assert torch.equal(sce(base, [m], select_topk=0.5), base)
    # zero task vectors: the base back, never NaN
    for out in (
        ties(base, [base, base], weight=[1, 1], density=[0.5, 0.5]),
        dare_ties(base, [base, base], weight=[1, 1], density=[0.5, 0.5], keys=keys),
        sce(base, [base, base]),
        sph.model_stock(base, [base, base]),
        sph.nuslerp(base, [base, base], weight=[1, 1]),
    ):
        assert torch.equal(out, base)
    zero = torch.zeros(3)
    assert torch.equal(sph.karcher(None, [zero, zero]), zero)


def test_one_element_tensors():
    base, a, b = torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([-1.0])
    keys = [0, 1]
    # deltas +1 and -2: the elected sign is -, so only the second model's delta survives
    assert torch.equal(ties(base, [a, b], weight=[1, 1], density=[1, 1]), torch.tensor([-1.0]))
    out = della(base, [a, b], weight=[1, 1], density=[0.5, 0.5], epsilon=0.1, keys=keys)
    assert torch.isfinite(out).all()
    assert torch.equal(sph.slerp(None, [a, b], t=0.0), a)


def test_slerp_nearly_parallel_falls_back_to_lerp():
    a = torch.tensor([1.0, 0.0, 0.0])
    b = torch.tensor([2.0, 1e-4, 0.0])
    torch.testing.assert_close(sph.slerp(None, [a, b], t=0.25), 0.75 * a + 0.25 * b)


def test_karcher_three_models_satisfies_the_first_order_condition():
    g = torch.Generator().manual_seed(12)
    models = [torch.randn(50, generator=g) for _ in range(3)]
    w = [1 / 3] * 3  # mergekit's karcher: equal weights
    out = sph.karcher(None, models, max_iter=200, tol=1e-12).double()
    x = out / out.norm()
    tangent = torch.zeros_like(x)
    for wi, m in zip(w, models):
        u = m.double() / m.double().norm()
        cos = torch.dot(x, u).clamp(-1, 1)
        th = torch.arccos(cos)
        tangent += wi * (u - cos * x) * th / torch.sin(th)
    assert tangent.norm() < 1e-6  # the weighted log-maps sum to zero at the mean
    expected_norm = sum(wi * m.double().norm() for wi, m in zip(w, models))
    torch.testing.assert_close(out.norm(), expected_norm)


def test_integer_tensors_pass_through_and_nan_input_is_refused(tmp_path):
    from safetensors.torch import save_file

    from medmerge.synthetic import tiny_config, write_family

    base, a, b = write_family(tmp_path / "f", tiny_config("mistral"))
    for i, folder in enumerate((base, a, b)):
        extra = {"model.step_counter": torch.tensor([7 + i], dtype=torch.int64)}
        tensors = {**state(folder), **extra}
        if folder == b:
            tensors["model.norm.weight"] = tensors["model.norm.weight"].clone()
            tensors["model.norm.weight"][0] = float("nan")
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    cfg = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [
            {"model": str(a), "parameters": {"weight": 1.0}},
            {"model": str(b), "parameters": {"weight": 1.0}},
        ],
    }
    with pytest.raises(MergeError, match=r"'model.norm.weight' of .*model_2 has NaN or inf"):
        medmerge.merge(cfg, tmp_path / "out", progress=False)
    fixed = state(b)
    fixed["model.norm.weight"] = state(a)["model.norm.weight"]
    save_file(fixed, b / "model.safetensors", metadata={"format": "pt"})
    out = medmerge.merge(cfg, tmp_path / "out", progress=False)
    assert state(out)["model.step_counter"].item() == 7  # the base's, unmerged


# ---- determinism ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_same_seed_same_bytes_any_thread_count_different_seed_differs(mistral, tmp_path, method):
    base, a, b = mistral
    cfg = merge_config(method, base, a, b)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = state(medmerge.merge(cfg, tmp_path / "1", seed=5, progress=False))
        torch.set_num_threads(2)
        two = state(medmerge.merge(cfg, tmp_path / "2", seed=5, progress=False))
    finally:
        torch.set_num_threads(threads)
    other = state(medmerge.merge(cfg, tmp_path / "3", seed=6, progress=False))
    assert all(torch.equal(one[n], two[n]) for n in one)
    assert any(not torch.equal(one[n], other[n]) for n in one)


def test_keys_depend_on_name_not_order():
    first = [tensor_keys(3, n, 2)[1] for n in ("a", "b", "c")]
    later = [tensor_keys(3, n, 2)[1] for n in ("c", "b", "a")][::-1]
    assert first == later and len(set(first)) == 3


def _fmix32(h):
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def test_uniform_draws_are_the_documented_hash_in_any_chunking():
    key = 0x5DEECE66D1234567
    digest = hashlib.blake2b(key.to_bytes(8, "little"), digest_size=8).digest()
    k1, k2 = int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")

    def draw(j):  # two keyed rounds of MurmurHash3's finaliser on the position's 32-bit pattern
        h = _fmix32((j ^ 0x80000000) ^ k1)
        return (_fmix32(h ^ k2) >> 8) / 2**24

    for start, stop in ((0, 1000), (2**31 - 5, 2**31 + 5), (2**32 - 7, 2**32)):
        assert uniform(key, slice(start, stop)).tolist() == [draw(j) for j in range(start, stop)]
    whole = uniform(key, slice(0, 10_000))
    pieces = {s: uniform(key, slice(s, min(s + 333, 10_000))) for s in range(9_990, -1, -333)}
    assert torch.equal(torch.cat([pieces[s] for s in sorted(pieces)]), whole)
    with pytest.raises(ConfigError, match="up to 2\\^32"):
        uniform(key, slice(0, 2**32 + 1))
