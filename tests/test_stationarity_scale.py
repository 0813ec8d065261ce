"""stationarity with thousands of ties (sampled pieces): decided by a proved certificate either way, checked
against independent references: float64 one-sided finite differences (for a sum of functions of one element
each, the Clarke subdifferential is the box of each element's one-sided slopes) and exact enumeration."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradwise as gw
from gradwise._nonsmooth._bound import lower_bound

f64 = torch.float64


def fd_box(f, x: torch.Tensor, h: float = 1e-9) -> tuple[np.ndarray, np.ndarray]:
    """Per element, the hull of the one-sided slopes (f(x + h e_i) - f(x)) / h and (f(x) - f(x - h e_i)) / h."""
    fx = float(f(x))
    right, left = np.empty(x.numel()), np.empty(x.numel())
    for i in range(x.numel()):
        e = torch.zeros_like(x)
        e.view(-1)[i] = h
        right[i] = (float(f(x + e)) - fx) / h
        left[i] = (fx - float(f(x - e))) / h
    return np.minimum(left, right), np.maximum(left, right)


def box_least_norm(lo: np.ndarray, hi: np.ndarray) -> float:
    return float(np.linalg.norm(np.clip(0.0, lo, hi)))


N = 3000
CASES = {  # name: (f, stationary)
    "abs": (lambda x: x.abs().sum(), True),
    "max(x, -x) - 0.3 x": (lambda x: (torch.maximum(x, -x) - 0.3 * x).sum(), True),
    "abs + 2 x0": (lambda x: x.abs().sum() + 2 * x[0], False),
    "relu(x) - relu(-x)": (lambda x: (torch.relu(x) - torch.relu(-x)).sum(), False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_thousands_of_ties_decided(name):
    f, truth = CASES[name]
    x = torch.zeros(N, dtype=f64)
    cert = gw.stationarity(f, x)
    assert not cert.exact and cert.stationary is truth
    lo, hi = fd_box(f, x[:50])  # the same function of 50 elements: each element's slopes (f is a sum of them)
    small = gw.stationarity(f, x[:50])
    least = box_least_norm(lo, hi)
    assert small.stationary is truth
    if truth:  # the certificate: a convex combination of generalized gradients within atol of 0
        assert cert.min_norm <= 1e-6 and small.min_norm <= 1e-6 and least <= 1e-6
        for e in cert.subdifferential.elements[:8]:  # each element inside the box of one-sided slopes
            v = e[0][:50].numpy()
            assert (v >= lo - 1e-6).all() and (v <= hi + 1e-6).all()
    else:  # proved: a lower bound above atol and below the true least norm (the same on the first 50 elements)
        assert 1e-6 < small.lower_bound <= least + 1e-5 <= small.min_norm + 1e-5
        if name == "abs + 2 x0":  # only x0's slopes exclude 0: the least norm is 1 however many elements
            assert cert.lower_bound == pytest.approx(1.0, abs=1e-9)
        else:
            assert cert.lower_bound == pytest.approx(np.sqrt(N), rel=1e-9)


def test_paired_relus_are_exact_in_the_interval_pass():
    """relu(x) - relu(-x) is x: the two relus of one element decide together (its source, `_bound_split`), so
    the bound along any w is |sum w| / |w|, where plain intervals give 0."""
    x = torch.zeros(5, dtype=f64)
    w = torch.tensor([1.0, 2.0, -0.5, 0.0, 3.0], dtype=f64)
    got = lower_bound(lambda x: (torch.relu(x) - torch.relu(-x)).sum(), (x,), True, (w,))
    assert got == pytest.approx(float(w.sum() / w.norm()))


class _Expr:
    """An elementwise expression of x with its description (shown by hypothesis when a law fails)."""

    def __init__(self, fn, desc: str) -> None:
        self.fn, self.desc = fn, desc

    def __call__(self, x):
        return self.fn(x)

    def __repr__(self) -> str:
        return self.desc


def _element_fn(draw, depth: int) -> _Expr:
    """A random elementwise expression of x built from kink ops that all tie at x = 0."""
    if depth == 0 or draw(st.integers(0, 3)) == 0:
        scale = draw(st.sampled_from([1.0, -1.0, 2.0, -0.5]))
        return _Expr(lambda x: scale * x, f"{scale} x")
    kind = draw(st.sampled_from(["relu", "abs", "max", "min", "clamp_max", "neg", "square", "sin", "add"]))
    a = _element_fn(draw, depth - 1)
    if kind in ("max", "min", "add"):
        b = _element_fn(draw, depth - 1)
        op = {"max": torch.maximum, "min": torch.minimum, "add": torch.add}[kind]
        return _Expr(lambda x: op(a(x), b(x)), f"{kind}({a}, {b})")
    op = {"relu": torch.relu, "abs": torch.abs, "clamp_max": lambda y: y.clamp(max=0), "neg": torch.neg,
          "square": lambda y: y * y, "sin": torch.sin}[kind]
    return _Expr(lambda x: op(a(x)), f"{kind}({a})")


@st.composite
def separable(draw):
    h = _element_fn(draw, 3)
    coef = draw(st.sampled_from([0.0, 0.25, -0.5]))
    return _Expr(lambda x: h(x).sum() + coef * x[::2].sum(), f"sum({h}) + {coef} sum(x[::2])")


@settings(max_examples=30, deadline=None)
@given(separable())
def test_law_separable_compositions_match_one_sided_differences(f):
    """f = sum_i h(x_i) + c sum of the even x_i (h a random composition of kink ops) at 0, 40 elements (sampled):
    the Clarke subdifferential is the box of the one-sided slopes; stationarity decides and is never wrong."""
    x = torch.zeros(40, dtype=f64)
    cert = gw.stationarity(f, x)
    lo, hi = fd_box(f, x)
    least = box_least_norm(lo, hi)
    assert cert.lower_bound <= least + 1e-5 <= cert.min_norm + 2e-5
    if cert.stationary is True:
        assert least <= 1e-5
    elif cert.stationary is False:
        assert least > 1e-6
    assert cert.stationary is (least <= 1e-5)  # decided, with the right answer


@st.composite
def paired(draw):
    """A small f whose elements each tie several times (enumerated exactly), mixed by a linear layer after."""
    hs = [_element_fn(draw, 2) for _ in range(2)]
    m = torch.tensor(draw(st.lists(st.sampled_from([1.0, -1.0, 0.5, 0.0]), min_size=6, max_size=6)), dtype=f64)
    return _Expr(lambda x: (m.view(2, 3) * torch.stack([h(x) for h in hs])).sum() + 0.3 * x[0],
                 f"sum({m.view(2, 3).tolist()} * [{hs[0]}, {hs[1]}]) + 0.3 x0")


@settings(max_examples=30, deadline=None)
@given(paired(), st.integers(0, 1000))
def test_law_never_above_the_enumerated_least_norm(f, seed):
    """The bound with sources never exceeds the exact least norm of enumerated pieces (along the least-norm
    element and along a random w); forced sampling never decides against the enumeration."""
    x = torch.zeros(3, dtype=f64)
    sd = gw.subdifferential(f, x)
    if not sd.exact:
        return
    exact = float(torch.linalg.vector_norm(sd.min_norm_element()[0]))
    w = torch.randn(3, generator=torch.Generator().manual_seed(seed), dtype=f64)
    for d in (sd.min_norm_element()[0], w):
        got = lower_bound(f, (x,), True, (d,))
        assert got is None or got <= exact + 1e-9
    cert = gw.stationarity(f, x, samples=4, seed=seed)
    assert cert.lower_bound <= exact + 1e-9 and exact <= cert.min_norm + 1e-9
    if cert.stationary is not None:
        assert cert.stationary is (exact <= 1e-6)
