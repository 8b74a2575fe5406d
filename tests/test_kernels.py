"""The CPU kernels (numba) against the torch implementation of the sparse methods: bit for bit,
for every method and option, in both stored dtypes, whatever the thread count."""

import numpy as np
import pytest
import torch
from method_cases import CASES as METHOD_CASES

from medmerge.methods import REGISTRY, config_name, get_method, kernels
from medmerge.methods.kernels import topk
from medmerge.methods.sparse import VARIANTS

numba = pytest.importorskip("numba")


def _case(method: str) -> dict:
    """A method's case (tests/method_cases.py) as keyword arguments of its function, with
    per-model keys for a randomised one."""
    names = {config_name(p.name): p.name for p in REGISTRY[method].params}
    params = {names[k]: v for k, v in METHOD_CASES[method].params.items()}
    return params | ({"keys": [11, 12]} if "keys" in REGISTRY[method].engine_args else {})


# every sparse method's case, and options and corners that take other paths of the kernels
SPARSE = [v.name for v in VARIANTS if v.name != "task_arithmetic"] + ["sce"]
CASES = {m: _case(m) for m in SPARSE} | {
    "ties_all": dict(method="ties", weight=[0.5, 0.5], density=[1.0, 0.0], normalize=False),
    "dare_linear_lambda": dict(
        method="dare_linear", weight=[0.5, 0.5], density=[0.6, 0.3], keys=[11, 12], lambda_=1.5
    ),
    "dare_l1": dict(
        method="dare_linear", weight=[0.5, 0.5], density=[0.6, 0.3], keys=[3, 4], rescale="l1"
    ),  # fmt: skip
    "dare_none": dict(
        method="dare_ties", weight=[1.0, -0.5], density=[0.2, 0.7], keys=[3, 4], rescale="none"
    ),  # fmt: skip
    "della_epsilon": dict(
        method="della", weight=[0.5, 0.5], density=[0.6, 0.4], keys=[5, 6], epsilon=[0.1, 0.2]
    ),
    "della_linear_lambda": dict(
        method="della_linear", weight=[0.3, 0.6], density=[0.5, 0.5], keys=[5, 6], lambda_=0.8
    ),
    "della_l1": dict(
        method="della", weight=[0.5, 0.5], density=[0.6, 0.4], keys=[5, 6], rescale="l1"
    ),  # fmt: skip
    "breadcrumbs_gamma": dict(
        method="breadcrumbs", weight=[0.5, 0.5], density=[0.8, 0.7], gamma=[0.05, 0.0]
    ),
    "breadcrumbs_ties_gamma": dict(
        method="breadcrumbs_ties", weight=[0.5, 0.5], density=[0.9, 0.5], gamma=[0.01, 0.2]
    ),
    "sce_lambda": dict(method="sce", select_topk=0.4, lambda_=1.2),
    "sce_all": dict(method="sce", select_topk=1.0),
    "dare_drop_all": dict(method="dare_ties", weight=[0.5, 0.5], density=[0.0, 0.0], keys=[1, 2]),
    "della_sparse": dict(
        method="della", weight=[0.5, 0.5], density=[0.05, 0.05], epsilon=[0.04, 0.01], keys=[1, 2]
    ),  # fmt: skip
    "della_average": dict(
        method="della_linear",
        weight=[0.5, 0.7],
        density=[0.6, 0.4],
        keys=[5, 6],
        rank_ties="average",
        rescale="inverse_density",
    ),  # fmt: skip
    "dare_inverse": dict(
        method="dare_ties",
        weight=[0.5, 0.8],
        density=[0.6, 0.9],
        keys=[11, 12],
        rescale="inverse_density",
        normalize=True,
    ),  # fmt: skip
    "ties_rescaled": dict(method="ties", weight=[0.7, 0.4], density=[0.6, 0.3], rescale=True),
    "breadcrumbs_rescaled": dict(
        method="breadcrumbs_ties",
        weight=[0.5, 0.5],
        density=[0.5, 0.3],
        rescale=True,
        normalize=True,
    ),  # fmt: skip
    "sce_none": dict(method="sce", select_topk=0.0),
    "ties_negative": dict(method="ties", weight=[-0.5, 1.0], density=[0.5, 0.5]),
}


def family(shape, dtype, models=2, seed=0):
    """Base and fine-tunes with many exactly equal task-vector entries (bfloat16 steps)."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    tuned = [
        (base.float() + torch.randn(shape, generator=g) * 0.002).to(dtype) for _ in range(models)
    ]
    return base, tuned


def run(case, base, models, out_dtype, monkeypatch, use_kernels):
    params = dict(CASES[case])
    method = get_method(params.pop("method", case))
    if len(models) == 1:
        params = {k: (v[:1] if isinstance(v, list) else v) for k, v in params.items()}
    monkeypatch.setenv("MEDMERGE_KERNELS", "1" if use_kernels else "0")
    assert kernels.usable(base, *models, out_dtype=out_dtype) == use_kernels
    return method.fn(base, models, out_dtype=out_dtype, **params)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(64, 700), (5000,)])
def test_kernels_match_torch_bit_for_bit(case, dtype, shape, monkeypatch):
    base, models = family(shape, dtype)
    fast = run(case, base, models, dtype, monkeypatch, use_kernels=True)
    reference = run(case, base, models, dtype, monkeypatch, use_kernels=False)
    assert fast.dtype == reference.dtype == dtype
    assert torch.equal(bits(fast), bits(reference)), f"{case}: kernels and torch differ"


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("use_kernels", [True, False])
def test_nonfinite_inputs_reach_the_output_where_kept_or_dropped(case, use_kernels, monkeypatch):
    """NaN and +-inf in the base and in the models: every such entry is non-finite in the
    output, also where the method drops it (density 0, outliers, random drops) or where its
    sign loses the election (a negative weight), so the engine's check of the output finds
    every damaged input and no pass over the inputs is needed."""
    base, models = family((64, 700), torch.bfloat16, seed=9)
    poison = {0: {10: "nan", 20000: "inf"}, 1: {5: "nan", 3000: "-inf", 40000: "inf"}}
    poison[2] = {7: "inf", 44000: "nan", 3000: "-inf"}
    tensors = [base, *models]
    for member, spots in poison.items():
        for spot, value in spots.items():
            tensors[member].view(-1)[spot] = float(value)
    out = run(case, tensors[0], tensors[1:], torch.bfloat16, monkeypatch, use_kernels)
    spots = sorted({spot for spots in poison.values() for spot in spots})
    assert not torch.isfinite(out.view(-1)[spots].float()).any()


@pytest.mark.parametrize("case", ["ties", "della", "breadcrumbs", "dare_l1"])
def test_kernels_one_model_and_float32_output(case, monkeypatch):
    base, models = family((40, 130), torch.bfloat16, models=1, seed=3)
    fast = run(case, base, models, torch.float32, monkeypatch, use_kernels=True)
    reference = run(case, base, models, torch.float32, monkeypatch, use_kernels=False)
    assert torch.equal(bits(fast), bits(reference))


def della_rows(kind: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Rows that take each path of the kernel's rank histogram."""
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(30, 200, generator=g)
    zero = torch.zeros(30, 200)
    if kind == "regular":  # a zero base leaves every |d| a bfloat16: no lower bits set
        return zero.bfloat16(), [(noise * 0.1).bfloat16(), (noise * 0.3).bfloat16()]
    if kind == "all_equal":
        base = torch.full((30, 200), 0.5).bfloat16()
        return base, [torch.full_like(base, 0.75)] * 2
    if kind == "wide":  # |d| over 60 decades: coarser buckets, most entries sorted in them
        wide = noise.sign() * 10 ** (torch.rand(30, 200, generator=g) * 60 - 30)
        wide[:, ::7] = wide[:, 3:4]  # and ties among them
        return zero, [wide, wide.flip(1)]
    if kind == "tiny":  # subnormal |d| share bucket 0 with zero and rank above it
        regular = (noise * 0.01).bfloat16().float().where(noise.abs() > 0.3, 0.0)
        tiny = (noise * 1e-41).where(noise.abs() > 1, regular)
        return zero, [tiny, tiny * 3]
    if kind == "float32_ties":  # a coarse grid: many equal |d| among the sorted ones
        grid = (noise * 64).round() / 64 + 1e-3
        return zero + 0.3, [0.3 + grid, 0.3 - grid]
    if kind == "narrow":  # float32 |d| in one bucket: the whole row sorts within it
        return zero, [1 + torch.rand(30, 200, generator=g) / 256, 1 + noise.abs() / 512]
    raise ValueError(kind)


@pytest.mark.parametrize("case", ["della", "della_average"])
@pytest.mark.parametrize("kind", ["regular", "all_equal", "wide", "tiny", "float32_ties", "narrow"])
def test_della_rank_histogram_every_path(kind, case, monkeypatch):
    """Ranks in position order (mergekit's) and average ranks, on rows that take each path of
    the kernel's rank histogram."""
    base, models = della_rows(kind)
    fast = run(case, base, models, base.dtype, monkeypatch, use_kernels=True)
    reference = run(case, base, models, base.dtype, monkeypatch, use_kernels=False)
    assert torch.equal(bits(fast), bits(reference))


def top_ks(mode, base, models, ks, parts=1):
    """`kernels.top_ks`, or with parts > 1 `top_ks_of_parts` over that many flat parts of
    uneven sizes."""
    if parts == 1:
        return kernels.top_ks(mode, base, models, 0, ks)
    n = base.numel()
    starts = tuple(n * j // parts + 13 * j for j in range(parts))
    ends = [*starts[1:], n]
    flats = [t.reshape(-1) for t in (base, *models)]

    def part(k):
        a, b = starts[k], ends[k]
        return flats[0][a:b], [f[a:b] for f in flats[1:]]

    return kernels.top_ks_of_parts(mode, part, starts, n, 0, ks)


def two_thresholds():
    """A family, two ks (one of them the median) and their whole-tensor top-k."""
    base, models = family((300, 400), torch.bfloat16, seed=1)
    ks = [base.numel() // 50, base.numel() // 2]
    return base, models, ks, kernels.top_ks(0, base, models, 0, ks)


def spied(monkeypatch, name: str, note) -> list:
    """`topk.<name>` recording `note(*args)` of each call, in order: the list of them."""
    found, fn = [], getattr(topk, name)
    monkeypatch.setattr(topk, name, lambda *a: found.append(note(*a)) or fn(*a))
    return found


@pytest.mark.parametrize("parts", [1, 3])
def test_top_k_recovers_from_a_wrong_prediction(parts, monkeypatch):
    """A tiny sample mispredicts the threshold's bucket: the second pass still finds it."""
    base, models, ks, expected = two_thresholds()
    n = base.numel()
    monkeypatch.setattr(topk, "SAMPLE", 2)
    histograms = spied(monkeypatch, "_histogram", lambda *a: 1)
    assert top_ks(0, base, models, ks, parts) == expected
    assert histograms, "the two-entry sample predicted right: the test needs another case"
    magnitude = (models[0].float() - base.float()).abs().reshape(-1)
    for k, (value, cut) in zip(ks, expected):
        kept = (magnitude > value) | ((magnitude == value) & (torch.arange(n) < cut))
        assert int(kept.sum()) == k
        assert magnitude[kept].min() >= magnitude[~kept].max()


def top_k_reference(values: torch.Tensor, k: int) -> tuple[float, int]:
    """(value, cut) by a stable sort: the k-th largest, and the position after the last kept."""
    order = torch.sort(values, descending=True, stable=True).indices
    if k == 0:
        return float("inf"), 0
    if k == len(values):
        return -1.0, 0
    value = float(values[order[k - 1]])
    return value, int(order[:k][values[order[:k]] == value].max()) + 1


@pytest.mark.parametrize("parts", [1, 4])
@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("ks", [[1, 2], [0, 5000], [999, 1000], [59999, 60000], [17, 30000]])
def test_top_ks_match_a_sort(mode, ks, parts):
    """Many equal values (bfloat16 task vectors), thresholds close together or far apart."""
    base, models = family((200, 300), torch.bfloat16, seed=4)
    deltas = torch.stack([m.float() - base.float() for m in models]).reshape(2, -1)
    mean = (deltas[0] + deltas[1]) / 2
    variance = ((deltas[0] - mean) ** 2 + (deltas[1] - mean) ** 2) / 2  # as SCE in float32
    values = deltas[0].abs() if mode == 0 else variance
    found = top_ks(mode, base, models, ks, parts)
    assert found == [top_k_reference(values, k) for k in ks]


@pytest.mark.parametrize("parts", [1, 3])
def test_top_k_recovers_from_too_little_room(parts, monkeypatch):
    """Room for one collected entry per thread: a second pass with enough room."""
    base, models, ks, expected = two_thresholds()
    scans = spied(monkeypatch, "_scan", lambda *a: a[6])
    monkeypatch.setattr(topk, "_capacity", lambda expected, threads: 1)
    assert top_ks(0, base, models, ks, parts) == expected
    assert scans[:parts] == [1] * parts and len(scans) > parts and min(scans[parts:]) > 1


@pytest.mark.parametrize("parts", [1, 3])
def test_top_k_samples_more_where_it_would_collect_too_much(parts, monkeypatch):
    """Room for few collected entries: a larger sample narrows the range, same result."""
    base, models, ks, expected = two_thresholds()
    sampled = spied(monkeypatch, "_sample", lambda *a: len(a[-1]))
    monkeypatch.setattr(topk, "COLLECTED", 12 * 500)
    assert top_ks(0, base, models, ks, parts) == expected
    first = sum(sampled[:parts])
    assert first == min(topk.SAMPLE, base.numel() // 64) and sum(sampled[parts:]) > 4 * first


@pytest.mark.parametrize("parts", [1, 3])
@pytest.mark.parametrize("where", ["high", "low", "between"])
def test_top_k_in_a_tie_group_at_either_end_or_between(where, parts, monkeypatch):
    """The k-th largest sits in a tie group spread over many blocks and both threads' ranges.
    A forced sample puts it at the predicted range's upper end, its lower end (the histogram
    pass's bucket starts at it), or strictly inside; each way gives the stable sort's cut."""
    base, models = family((300, 400), torch.bfloat16, seed=5)
    values = (models[0].float() - base.float()).abs().reshape(-1)
    n = len(values)
    k = n // 2
    value, _ = top_k_reference(values, k)
    assert int((values == value).sum()) > 1000, "the test needs a large tie group at k"
    pattern = int(torch.tensor(value).view(torch.int32))
    assert pattern & 0xFFFF == 0  # the histogram's bucket for it starts at it
    predicted = {
        "high": [pattern] * 2,
        "low": [0x7F000000] * 2,
        "between": [pattern - 1, pattern + 1],
    }
    half = lambda spots: np.repeat(predicted[where], (len(spots) + 1) // 2)[: len(spots)]  # noqa: E731
    monkeypatch.setattr(topk, "_sample", lambda *a: half(a[-1]).astype(np.uint32).view(np.float32))
    calls = []
    for name in ("_cut_equal", "_resolve"):
        spied(monkeypatch, name, lambda *a, name=name: calls.append(name))
    assert top_ks(0, base, models, [k], parts) == [(value, top_k_reference(values, k)[1])]
    assert calls == ["_resolve" if where == "between" else "_cut_equal"]


def selection_reference(base, models, k):
    """SCE's Select and Calculate by a stable sort: (value, cut) of the k entries of largest
    variance, and per model the float64 sum of the float32 squares d * d over them."""
    deltas = torch.stack([m.float() - base.float() for m in models]).reshape(len(models), -1)
    mean = deltas.sum(0) / len(models)
    variance = sum((d - mean) * (d - mean) for d in deltas) / len(models)
    value, cut = top_k_reference(variance, k)
    kept = (variance > value) | ((variance == value) & (torch.arange(len(variance)) < cut))
    energy = [float((d * d)[kept].double().sum()) for d in deltas]
    return (value, cut), energy


def selection(base, models, k, parts=1):
    """`kernels.selection_energy`, or with parts > 1 `selection_energy_of_parts` over that
    many flat parts of whole blocks, of uneven sizes."""
    if parts == 1:
        return kernels.selection_energy(base, models, k)
    n, block = base.numel(), kernels.BLOCK
    starts = tuple(j * j * block for j in range(parts))
    assert starts[-1] < n
    ends = [*starts[1:], n]
    flats = [t.reshape(-1) for t in (base, *models)]

    def part(j):
        return flats[0][starts[j] : ends[j]], [f[starts[j] : ends[j]] for f in flats[1:]]

    return kernels.selection_energy_of_parts(part, starts, n, k)


def assert_selection(base, models, k, parts=1):
    top, energy = selection(base, models, k, parts)
    expected_top, expected_energy = selection_reference(base, models, k)
    assert top == expected_top
    np.testing.assert_allclose(energy, expected_energy, rtol=1e-12)


@pytest.mark.parametrize("fraction", [1e-4, 0.01, 0.3, 0.5, 0.77, 0.999])
@pytest.mark.parametrize("models", [2, 3])
def test_selection_energy_sums_the_squares_of_the_selected(fraction, models):
    """SCE's one pass: the selected entries' summed squares, whichever way the k-th largest
    variance falls among many equal ones (bfloat16 steps)."""
    base, tuned = family((300, 500), torch.bfloat16, models=models, seed=6)
    assert_selection(base, tuned, int(fraction * base.numel()))


@pytest.mark.parametrize("fraction", [1e-4, 0.3, 0.77, 0.999])
def test_selection_energy_of_parts_gives_the_whole_tensors_bits(fraction):
    base, tuned = family((300, 500), torch.bfloat16, models=3, seed=6)
    k = int(fraction * base.numel())
    (top, energy), whole = selection(base, tuned, k, 3), selection(base, tuned, k)
    assert top == whole[0] and energy.tobytes() == whole[1].tobytes()


@pytest.mark.parametrize("parts", [1, 3])
@pytest.mark.parametrize("where", ["high", "low", "between", "wrong"])
def test_selection_energy_with_the_cut_at_either_end_between_or_mispredicted(
    where, parts, monkeypatch
):
    """A forced sample puts the k-th largest variance, inside a tie group over many blocks, at
    the predicted range's upper end, its lower end, strictly inside, or outside (the
    histogram pass finds it): each way the energies count the selected entries alone."""
    base, models = family((300, 700), torch.bfloat16, seed=5)
    k = base.numel() // 2
    (value, _), _ = selection_reference(base, models, k)
    pattern = int(torch.tensor(value).view(torch.int32))
    predicted = {
        "high": [pattern] * 2,
        "low": [pattern, pattern + 0x100],
        "between": [pattern - 1, pattern + 1],
        "wrong": [0x7F000000] * 2,
    }
    half = lambda spots: np.repeat(predicted[where], (len(spots) + 1) // 2)[: len(spots)]  # noqa: E731
    monkeypatch.setattr(topk, "_sample", lambda *a: half(a[-1]).astype(np.uint32).view(np.float32))
    calls = []
    for name in ("_histogram", "_resolve", "_before_cut"):
        spied(monkeypatch, name, lambda *a, name=name: calls.append(name))
    assert_selection(base, models, k, parts)
    paths = {"high": ["_before_cut"], "low": ["_before_cut"], "between": ["_resolve"]}
    histograms = ["_histogram"] * parts  # a pass over every part
    assert calls == paths.get(where, [*histograms, "_resolve"])  # its bucket holds others


def test_selection_energy_does_not_depend_on_the_thread_count():
    base, models = family((300, 700), torch.bfloat16, seed=7)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = kernels.selection_energy(base, models, base.numel() // 3)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        every = kernels.selection_energy(base, models, base.numel() // 3)
    finally:
        numba.set_num_threads(before)
    assert one[0] == every[0] and one[1].tobytes() == every[1].tobytes()


@pytest.mark.parametrize(
    "k", [kernels.BLOCK, 2 * kernels.BLOCK, kernels.BLOCK - 1, kernels.BLOCK + 1, 5, 0]
)
def test_top_k_cut_on_or_beside_a_merge_block_boundary(k, monkeypatch):
    """Every |d| equal: the cut is position k itself. Blocks that hold no cut use a plain
    comparison (every tie kept before the cut's block, none after it); a cut on a block's first
    position must keep none of that block's ties, one at its end all of them."""
    n = 3 * kernels.BLOCK
    base = torch.zeros(n, dtype=torch.bfloat16)
    models = [torch.full((n,), 0.5, dtype=torch.bfloat16)]
    density = [k / n]
    out = {}
    for use_kernels in (True, False):
        monkeypatch.setenv("MEDMERGE_KERNELS", "1" if use_kernels else "0")
        out[use_kernels] = get_method("ties").fn(
            base, models, weight=[1.0], density=density, out_dtype=torch.bfloat16
        )
    expected = torch.where(torch.arange(n) < k, 0.5, 0.0).bfloat16()
    assert torch.equal(bits(out[False]), bits(expected))
    assert torch.equal(bits(out[True]), bits(expected))


@pytest.mark.parametrize("case", ["dare_ties", "della", "ties", "sce"])
def test_kernels_do_not_depend_on_the_thread_count(case, monkeypatch):
    base, models = family((64, 700), torch.bfloat16, seed=2)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = run(case, base, models, torch.bfloat16, monkeypatch, use_kernels=True)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        every = run(case, base, models, torch.bfloat16, monkeypatch, use_kernels=True)
    finally:
        numba.set_num_threads(before)
    assert torch.equal(bits(one), bits(every))


def test_other_dtypes_and_devices_use_torch():
    half = torch.zeros(4, dtype=torch.float16)
    assert not kernels.usable(half)
    assert not kernels.usable(torch.zeros(4), out_dtype=torch.float16)
    assert not kernels.usable(torch.zeros(4, device="meta"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("bad", [None, "inf", "-inf", "nan", "-nan", "max", "tiny"])
def test_largest_magnitude_is_max_abs_with_nan_above_inf(dtype, bad, monkeypatch):
    """The engine's finite checks: max |x| from the stored bits, bit for bit what torch gives
    (float16 runs on torch), NaN where any entry is NaN, whatever its sign or place."""
    _, (t,) = family((300, 1001), dtype, models=1, seed=9)
    t = t.clone()
    special = {"inf": float("inf"), "-inf": float("-inf"), "max": -torch.finfo(dtype).max,
               "tiny": torch.finfo(dtype).tiny}  # fmt: skip
    if bad in ("nan", "-nan"):
        t[299, 1000] = float("nan")
        if bad == "-nan":
            t.neg_()  # a NaN with the sign bit set
    elif bad is not None:
        t[0, 0] = special[bad]
    expected = t.float().abs().max().item()
    for use_kernels in ("1", "0"):
        monkeypatch.setenv("MEDMERGE_KERNELS", use_kernels)
        got = kernels.largest_magnitude(t)
        assert got == expected or (np.isnan(got) and np.isnan(expected)), use_kernels
    assert kernels.largest_magnitude(t[:0]) == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("w", [0.0, 0.3, 0.4999999, 0.5, 0.8, 1.0])
def test_lerp_matches_torch_bit_for_bit(dtype, out_dtype, w):
    _, (a, b) = family((37, 1001), dtype, seed=4)
    expected = torch.lerp(a.float(), b.float(), w).to(out_dtype)
    fast = kernels.lerp(a, b, w, out_dtype)
    assert fast.shape == a.shape and fast.dtype == out_dtype
    assert torch.equal(bits(fast), bits(expected))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_delta_products_are_float64_sums(dtype):
    """Near-orthogonal task vectors: the float64 sums give the cosine to ~1e-12, where a float32
    sum of this many products would be off in the third digit."""
    base, (a, b) = family((300, 1000), dtype, seed=5)
    da, db = ((x.float() - base.float()).double() for x in (a, b))  # float32 differences
    expected = [float((da * db).sum()), float((da * da).sum()), float((db * db).sum())]
    got = kernels.delta_products(base, a, b)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12 * expected[1])
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        assert kernels.delta_products(base, a, b) == got
    finally:
        numba.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_hierarchical_kernels_match_torch(dtype, monkeypatch):
    hierarchical = get_method("hierarchical").fn
    base, (a, b) = family((96, 500), dtype, seed=6)
    name = "model.layers.0.mlp.up_proj.weight"
    out = {}
    for use_kernels in (True, False):
        monkeypatch.setenv("MEDMERGE_KERNELS", "1" if use_kernels else "0")
        records: list = []
        merged = hierarchical(
            {name: base}, [{name: a}, {name: b}], names=[name], config={},
            diagnostics=records, out_dtype=dtype,
        )  # fmt: skip
        out[use_kernels] = merged[name], records[0]["weights"][name]
    (fast, w_fast), (reference, w_reference) = out[True], out[False]
    assert 0 < w_fast == pytest.approx(w_reference, rel=1e-12)
    assert torch.equal(bits(fast), bits(reference))


COMBINATIONS = {
    "linear": dict(weight=[0.4, 0.6]),
    "task_arithmetic": dict(weight=[0.7, -0.5], lambda_=0.8, normalize=True),
    "slerp": dict(t=0.3),
    "nuslerp": dict(weight=[0.4, 0.6]),
    "multislerp": dict(weight=[0.4, 0.6]),
    "karcher": dict(),
    "model_stock": dict(),
}


@pytest.mark.parametrize("method", list(COMBINATIONS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_combination_kernels_match_torch(method, dtype, monkeypatch):
    """Linear combinations of the models: the same output bits from the kernel and torch
    (for the spherical methods: the same Gram matrix up to float64 rounding, the sums adding
    in another order, so the same coefficients)."""
    base, models = family((64, 700), dtype, seed=7)
    out = {}
    for use_kernels in (True, False):
        monkeypatch.setenv("MEDMERGE_KERNELS", "1" if use_kernels else "0")
        out[use_kernels] = get_method(method).fn(
            base, models, out_dtype=dtype, **COMBINATIONS[method]
        )
    assert torch.equal(bits(out[True]), bits(out[False]))


@pytest.mark.parametrize("centered", [True, False])
def test_gram_is_float64_sums(centered):
    base, models = family((300, 1000), torch.bfloat16, models=3, seed=8)
    x = torch.stack([(m.float() - (base.float() if centered else 0)).double() for m in models])
    expected = (x.reshape(3, -1) @ x.reshape(3, -1).T).numpy()
    got = kernels.gram(base if centered else None, models)
    assert got == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("method, params", [
    ("ties", CASES["ties"]), ("della", CASES["della"]), ("sce", CASES["sce"]),
    ("linear", COMBINATIONS["linear"]), ("slerp", COMBINATIONS["slerp"]),
])  # fmt: skip
def test_models_in_mixed_dtypes_use_torch(method, params, monkeypatch):
    """A bfloat16 and a float32 fine-tune (say, one folded from an adapter): the kernels take
    the models as one typed tuple, so this runs on torch, the same with kernels on or off."""
    base, (a, b) = family((64, 700), torch.bfloat16, seed=10)
    models = [a, b.float()]
    assert not kernels.usable(base, *models)
    out = {}
    for use_kernels in (True, False):
        monkeypatch.setenv("MEDMERGE_KERNELS", "1" if use_kernels else "0")
        out[use_kernels] = get_method(method).fn(base, models, out_dtype=torch.bfloat16, **params)
    assert torch.equal(bits(out[True]), bits(out[False]))


def _widened(case: str, n: int) -> str:
    """CASES[case] for n models: per-model lists cycled to length n."""
    params = {k: ([v[i % len(v)] for i in range(n)] if isinstance(v, list) else v)
              for k, v in CASES[case].items()}  # fmt: skip
    CASES[f"{case}_{n}"] = {"method": case.split("_")[0] if case != "dare_ties" else case,
                            **params}  # fmt: skip
    return f"{case}_{n}"


@pytest.mark.parametrize("case", ["ties", "dare_ties", "della", "sce"])
def test_one_compiled_sparse_pass_serves_every_number_of_models(case, monkeypatch):
    """The sparse pass takes the models padded to ARITY: one compiled version for 1 to ARITY
    models (each count bit for bit the torch result), the torch path beyond."""
    from medmerge.methods.kernels import sparse

    def compiled():
        return {s for s in sparse._sparse_pass.signatures if s[0].dtype == s[4].dtype}

    for n in (1, 3, kernels.ARITY):
        base, models = family((37, 450), torch.bfloat16, models=n, seed=n)
        name = _widened(case, n)
        fast = run(name, base, models, torch.bfloat16, monkeypatch, use_kernels=True)
        reference = run(name, base, models, torch.bfloat16, monkeypatch, use_kernels=False)
        assert torch.equal(bits(fast), bits(reference)), (case, n)
    assert len({s for s in compiled() if str(s[0].dtype) == "uint16"}) == 1
    base, models = family((37, 450), torch.bfloat16, models=kernels.ARITY + 1, seed=9)
    name = _widened(case, kernels.ARITY + 1)
    params = dict(CASES[name])
    method = get_method(params.pop("method"))
    monkeypatch.setenv("MEDMERGE_KERNELS", "1")
    beyond = method.fn(base, models, out_dtype=torch.bfloat16, **params)
    monkeypatch.setenv("MEDMERGE_KERNELS", "0")
    assert torch.equal(bits(beyond), bits(method.fn(base, models, out_dtype=torch.bfloat16,
                                                    **params)))  # fmt: skip


# A TIES merge in a process with an empty numba cache and no MEDMERGE_COMPILE: it prints
# whether it compiled the sparse pass itself, and the pids of the compilations it started
FIRST_USE = """
import sys, medmerge
from medmerge.methods.kernels import precompile, sparse
config, out = sys.argv[1:]
medmerge.merge(config, out, progress=False)
print(len(sparse._sparse_pass.overloads), *(p.pid for p in precompile._started.values()))
"""


def test_a_first_merge_runs_torch_while_the_sparse_pass_compiles_elsewhere(mistral, tmp_path):
    import contextlib
    import os
    import signal
    import subprocess
    import sys

    import yaml
    from conftest import state

    import medmerge

    base, a, b = mistral
    models = [{"model": str(m), "parameters": {"weight": 0.5}} for m in (a, b)]
    cfg = {"merge_method": "ties", "base_model": str(base), "parameters": {"density": 0.4},
           "models": models}  # fmt: skip
    (tmp_path / "ties.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    env.pop("MEDMERGE_COMPILE")
    run = subprocess.run(
        [sys.executable, "-c", FIRST_USE, str(tmp_path / "ties.yaml"), str(tmp_path / "first")],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    compiled, *pids = (int(x) for x in run.stdout.split())
    for pid in pids:  # the test needs no compiled pass: stop the compilation
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    assert compiled == 0 and len(pids) == 1
    kernel = medmerge.merge(cfg, tmp_path / "kernel", progress=False)  # compiled here
    first, second = state(tmp_path / "first"), state(kernel)
    assert all(torch.equal(first[n].view(torch.int16), second[n].view(torch.int16)) for n in first)
