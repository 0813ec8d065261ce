"""The max-pool rule's channels-last route (`_rules_select._native_pool`, issue #14, speed): PyTorch's channels-last
kernel picks each window's element, a gather of x at it is the value (in x's graph), and the ranking of tied
windows (`_first_best`, one channels-last max-pool over the (window element, window) keys) writes into the
indices the gather reads. References: PyTorch's own NCHW max-pool (values, indices and gradient, bit for bit), the
same gradients with the route off and with the generic ranking (`_lex_argmax`), and PyTorch's gradient at
x + t d where the direction separates the ties."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import gradwise as gw
from gradwise._nonsmooth import _engine, _rules_select
from gradwise._nonsmooth._engine import _LAST_TIE, _random_direction
from gradwise._nonsmooth._records import _lex_argmax

# (kernel, stride, padding, ceil_mode): disjoint windows, at the border too (padding, ceil_mode's partial windows)
GEOMETRIES = [(2, 2, 0, False), (2, 2, 1, False), (2, 2, 0, True), (3, 3, 1, True), (2, 3, 0, True),
              ((2, 3), (2, 3), (1, 0), True)]


def _tied_input(dtype, trial: int, gen) -> torch.Tensor:
    """Integer values (ties in most windows), with NaN, +-inf, windows of -inf, or -0.0 beside 0.0."""
    x = torch.randint(-2, 3, (3, 8 + trial % 5, 7 + trial % 4, 9 - trial % 3), generator=gen).to(dtype)
    m = torch.rand(x.shape, generator=gen)
    kind = trial % 5
    if kind == 1:
        x[m < 0.1] = math.nan
    if kind == 2:
        x[m < 0.2], x[m > 0.9] = -math.inf, math.inf
    if kind == 3:
        x[(x == 0) & (m < 0.5)] = -0.0
    if kind == 4:
        x[:, :, :4] = -math.inf
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_channels_last_route_is_pytorchs_pool(dtype, geometry):
    """Values (NaN, signed zeros included), indices and gradient of the route equal PyTorch's NCHW max-pool's bit
    for bit, on inputs where most windows tie."""
    k, s, p, ceil = geometry
    ks, ss, ps = (v if isinstance(v, tuple) else (v, v) for v in (k, s, p))
    gen = torch.Generator().manual_seed(7)
    for trial in range(15):
        x = _tied_input(dtype, trial, gen).requires_grad_()
        want, want_idx = F.max_pool2d(x, k, s, p, 1, ceil, return_indices=True)
        got, idx = _rules_select._native_pool(F.max_pool2d, x, ks, ss, ps, (1, 1), ceil, False)
        assert type(got.grad_fn).__name__ != type(want.grad_fn).__name__  # (the route was taken)
        assert torch.equal(idx, want_idx)
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.nan_to_num(), want.nan_to_num())
        assert torch.equal(got.signbit(), want.signbit())
        g = torch.randint(-2, 3, want.shape, generator=gen).to(dtype)
        g[g == 0] = -0.0
        ours, theirs = torch.autograd.grad(got, x, g)[0], torch.autograd.grad(want, x, g)[0]
        assert torch.equal(ours, theirs) and torch.equal(ours.signbit(), theirs.signbit())


def test_channels_last_route_only_where_it_is_exact():
    """Overlapping windows (a gather's backward would sum an element's gradients in another order), dilation, few
    channels, a non-contiguous input and returned indices keep PyTorch's own max-pool node."""
    x = torch.randint(0, 3, (2, 8, 9, 9)).double().requires_grad_()
    native = "MaxPool2DWithIndicesBackward0"
    for args in [(x, (3, 3), (2, 2), (0, 0), (1, 1), False, False), (x, (2, 2), (2, 2), (0, 0), (2, 2), False, False),
                 (x[:, :4], (2, 2), (2, 2), (0, 0), (1, 1), False, False),
                 (x.transpose(2, 3), (2, 2), (2, 2), (0, 0), (1, 1), False, False),
                 (x, (2, 2), (2, 2), (0, 0), (1, 1), False, True)]:
        assert type(_rules_select._native_pool(F.max_pool2d, *args)[0].grad_fn).__name__ == native


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [2, 4, 16, 31])
def test_first_best_ties_in_key(dtype, k):
    """Candidates whose keys tie exactly (0.0 beside -0.0, equal integers): the first of them, as `_lex_argmax`
    picks it."""
    gen = torch.Generator().manual_seed(k)
    for trial in range(20):
        g = 500
        cand = torch.rand(k, g, generator=gen) < 0.7
        cand[torch.randint(0, k, (g,), generator=gen), torch.arange(g)] = True
        key = torch.randint(-1, 2, (k, g), generator=gen).to(dtype)
        zero = key == 0
        key[zero & (torch.rand(k, g, generator=gen) < 0.5)] = -0.0
        if trial % 2:
            key = key * torch.finfo(dtype).smallest_normal / 8  # subnormal keys
        ours = _rules_select._first_best(cand.to(torch.uint8), key)
        assert torch.equal(ours, _lex_argmax(cand.t(), [key.t()], False)[0])


class _Net(torch.nn.Module):
    """conv (8 or 16 channels) + relu + max-pool, twice, on blocky images: live ties whose elements have equal
    patches, so equal values and equal tangents (the first such element is chosen), and windows at the border
    (padding, ceil_mode) in the second pool."""

    def __init__(self, dtype):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = torch.nn.Conv2d(3, 16, 3, padding=1).to(dtype)
        self.c2 = torch.nn.Conv2d(16, 8, 3, padding=1).to(dtype)
        self.head = torch.nn.Linear(8 * 2 * 3, 3).to(dtype)

    def forward(self, x):
        h = F.max_pool2d(torch.relu(self.c1(x)), 2)
        h = F.max_pool2d(torch.relu(self.c2(h)), 3, 3, 1, ceil_mode=True)
        return self.head(h.flatten(1)).square().mean()


def _blocky(dtype):
    g = torch.Generator().manual_seed(3)
    small = torch.randint(0, 3, (6, 3, 3, 3), generator=g).to(dtype)
    x = F.interpolate(small, scale_factor=4, mode="nearest")[..., :11, :]  # 12 x 12, cut to 11 rows
    x[x == 0] = -0.0
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ranked_ties_match_the_native_route_and_the_generic_ranking(dtype, monkeypatch):
    """generalized_grad over the input and the weights, called 3 times (tangent-free then ranked; then ranked in
    the first pass, with lazy tangents): the same gradients, bit for bit, with the channels-last route off and with
    the generic ranking; the input's gradient shows which tied element each window chose."""
    net, x = _Net(dtype), _blocky(dtype)
    params = (x, *net.parameters())
    f = lambda x, *p: net(x)
    answered = []
    first_best = _rules_select._first_best
    monkeypatch.setattr(_rules_select, "_first_best", lambda c, k: answered.append(r := first_best(c, k)) or r)
    _LAST_TIE.clear()
    got = [gw.generalized_grad(f, params, seed=1) for _ in range(3)]
    assert any(r is not None for r in answered)  # the vectorised ranking ran
    assert got[0][0].abs().sum() > 0
    monkeypatch.setattr(_rules_select, "_native_pool",
                        lambda fn, xp, k, s, p, dil, ceil, ri: fn(xp, k, s, p, dil, ceil, return_indices=True))
    monkeypatch.setattr(_rules_select, "_first_best", lambda c, k: None)  # and the generic ranking
    _LAST_TIE.clear()
    for want in got:
        for a, b in zip(gw.generalized_grad(f, params, seed=1), want, strict=True):
            assert torch.equal(a, b)


def test_ranked_ties_match_pytorch_where_the_direction_separates_them():
    """Pools over the parameter itself (integer values: ties in most windows, tangents all distinct): PyTorch's
    gradient at w + t d, d the direction drawn from the seed."""
    g = torch.Generator().manual_seed(5)
    w = torch.randint(0, 3, (4, 8, 10, 10), generator=g).double()
    c1 = torch.randn(4, 8, 5, 5, generator=g, dtype=torch.float64)
    c2 = torch.randn(4, 8, 4, 4, generator=g, dtype=torch.float64)
    f = lambda w: (F.max_pool2d(w, 2) * c1).sum() + (F.max_pool2d(w, 3, 3, 1, ceil_mode=True) * c2).sum()
    d = _random_direction((w,), 2)[0][0]
    wp = (w + 1e-7 * d).requires_grad_()
    want = torch.autograd.grad(f(wp), wp)[0]
    _LAST_TIE.clear()
    for _ in range(3):
        assert torch.equal(gw.generalized_grad(f, w, seed=2)[0], want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ties_whose_tangents_tie_too(dtype, monkeypatch):
    """A direction of integers (zeros too) ties the tangents of tied elements whose gradients differ: each window
    keeps the first of its elements largest in (value, tangent), as the generic ranking (`_lex_argmax`) over
    PyTorch's own max-pool picks it; repeated calls (ranked in their first pass) too. Pools of 2 x 2 and of
    3 x 3 with padding and ceil_mode's partial windows."""
    g = torch.Generator().manual_seed(11)
    w = torch.randint(0, 2, (2, 8, 7, 8), generator=g).to(dtype)
    w[(w == 0) & (torch.rand(w.shape, generator=g) < 0.5)] = -0.0  # -0.0 beside 0.0
    d = torch.randint(-1, 2, w.shape, generator=g).to(dtype)
    c1 = torch.randn(2, 8, 3, 4, generator=g).to(dtype)
    c2 = torch.randn(2, 8, 3, 3, generator=g).to(dtype)

    def f(w):
        h = w * 2
        return (F.max_pool2d(h, 2) * c1).sum() + (F.max_pool2d(h, 3, 3, 1, ceil_mode=True) * c2).sum()

    def grads():
        _LAST_TIE.clear()
        return [_engine._locked_grad(f, (w,), True, 0, direction=(d,))[0][0] for _ in range(3)]

    answered = []
    first_best = _rules_select._first_best
    monkeypatch.setattr(_rules_select, "_first_best", lambda c, k: answered.append(r := first_best(c, k)) or r)
    got = grads()
    assert any(r is not None for r in answered)
    monkeypatch.setattr(_rules_select, "_native_pool",
                        lambda fn, xp, k, s, p, dil, ceil, ri: fn(xp, k, s, p, dil, ceil, return_indices=True))
    monkeypatch.setattr(_rules_select, "_first_best", lambda c, k: None)
    for a, b in zip(grads(), got, strict=True):
        assert torch.equal(a, b)
