"""NearSwap, RAM, RAM+ and Arcee Fusion against their formulas, written here entry by entry in
float64 numpy (mergekit's definitions), on random tensors."""

import numpy as np
import pytest
import torch

from medmerge.methods import REGISTRY

RNG = np.random.default_rng(7)


def tensors(shape=(24, 40), n=2, sparse=0.5):
    """A base and n models whose changes touch about `sparse` of the entries each."""
    base = RNG.normal(size=shape)
    models = []
    for _ in range(n):
        delta = RNG.normal(scale=0.1, size=shape) * (RNG.random(shape) < sparse)
        models.append(base + delta)
    return base, models


def run(method, base, models, **params):
    as_torch = [torch.tensor(x, dtype=torch.float32) for x in (base, *models)]
    out = REGISTRY[method].fn(as_torch[0], as_torch[1:], **params)
    return out.double().numpy()


def f32(x):
    return np.asarray(x, np.float32).astype(np.float64)


@pytest.mark.parametrize("t", [0.0, 0.05, 0.5])
def test_nearswap(t):
    a, (b,) = tensors(n=1)
    a, b = f32(a), f32(b)
    expected = np.empty_like(a)
    for idx in np.ndindex(a.shape):
        w = min(max(t / max(abs(a[idx] - b[idx]), 1e-6), 0.0), 1.0)
        expected[idx] = w * b[idx] + (1 - w) * a[idx]
    np.testing.assert_allclose(run("nearswap", a, [b], t=t), expected, rtol=1e-5, atol=1e-6)


def ram_reference(base, models, epsilon, scale):
    out = np.empty_like(base)
    for idx in np.ndindex(base.shape):
        deltas = [m[idx] - base[idx] for m in models]
        changed = [abs(d) > epsilon for d in deltas]
        count = sum(changed)
        total = 0.0
        for d, c, s in zip(deltas, changed, scale, strict=True):
            if c:
                total += d * s if count == 1 else d / count
        out[idx] = base[idx] + total
    return out


@pytest.mark.parametrize("models", [2, 3])
def test_ram(models):
    base, ms = tensors(n=models)
    base, ms = f32(base), [f32(m) for m in ms]
    expected = ram_reference(base, ms, 1e-3, [1.0] * models)
    np.testing.assert_allclose(run("ram", base, ms, epsilon=1e-3), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("r, alpha", [(0.1, 0.2), (0.5, 2.0)])
def test_ramplus_tl(r, alpha):
    base, ms = tensors(n=3)
    base, ms = f32(base), [f32(m) for m in ms]
    eps = 1e-3
    changed = [np.abs(m - base) > eps for m in ms]
    count = sum(c.astype(int) for c in changed)
    scale = []
    for c in changed:
        shared, unique = (c & (count > 1)).sum(), (c & (count == 1)).sum()
        rho = shared / max(unique, eps)
        scale.append(1 + r * min(max(rho, 0.0), alpha))
    assert all(s > 1.0 for s in scale)  # the scales change the result: the test can fail
    expected = ram_reference(base, ms, eps, scale)
    got = run("ramplus_tl", base, ms, r=r, alpha=alpha, epsilon=eps)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_arcee_fusion():
    base, (model,) = tensors(n=1, sparse=0.3)
    base, model = f32(base), f32(model)

    def softmax(x):
        e = np.exp(x - x.max())
        return e / e.sum()

    importance = np.empty_like(base)
    for r in range(base.shape[0]):
        p = softmax(model[r]) + 1e-8
        q = softmax(base[r]) + 1e-8
        kl = float((p * np.log(p / q)).sum())
        importance[r] = np.abs(model[r] - base[r]) * kl
    ordered = np.sort(importance.reshape(-1))
    n = ordered.size
    q1, median, q3 = (ordered[int(q * (n - 1))] for q in (0.25, 0.5, 0.75))
    fence = median + 1.5 * (q3 - q1)
    expected = np.where(importance >= fence, model, base)
    got = run("arcee_fusion", base, [model], keys=[0])
    near = np.abs(importance - fence) <= 1e-4 * abs(fence)  # float32 may fall either side
    assert (importance >= fence).sum() > 0 and (importance < fence).sum() > 0
    np.testing.assert_allclose(got[~near], expected[~near], rtol=1e-6, atol=1e-6)
