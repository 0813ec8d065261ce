"""Rounded division (div with rounding_mode, floor_divide, //), logit with eps, and threshold / hardshrink along a
direction that leaves their jumping element alone: exact where the answer is known, an error where f jumps.
References: float64 one-sided differences, and gradients at random points next to x (the pieces)."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import nnls

import gradwise as gw
from gradwise._nonsmooth import NonsmoothError

f64 = torch.float64


def one_sided(f, xs, ds, h=1e-7):
    """(f(x + h d) - f(x)) / h in float64: the reference for f'(x; d)."""
    with torch.no_grad():
        return float((f(*[x + h * d for x, d in zip(xs, ds, strict=True)]) - f(*xs)) / h)


def pieces(f, xs, n=200, radius=1e-6, seed=0, decimals=6) -> np.ndarray:
    """The distinct gradients of f (PyTorch's, at differentiable points) at random points next to x (to
    ``decimals``: a curved piece's gradient moves by ~radius)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ys = [(x + radius * torch.randn(x.shape, generator=gen, dtype=x.dtype)).requires_grad_(True) for x in xs]
        out.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(f(*ys), ys)]))
    return np.unique(torch.stack(out).numpy().round(decimals), axis=0)


def least_norm(vertices: np.ndarray) -> float:
    """Distance from 0 to the hull of the vertices (NNLS on [V^T; 1] mu = [0; 1], a heavy last row)."""
    a = np.vstack([vertices.T, 1e6 * np.ones(len(vertices))])
    mu, _ = nnls(a, np.concatenate([np.zeros(vertices.shape[1]), [1e6]]))
    return float(np.linalg.norm(mu @ vertices))


def flat(grads) -> np.ndarray:
    return torch.cat([g.reshape(-1) for g in grads]).numpy()


# --- rounded division -------------------------------------------------------------------------------------------

QUOTIENTS = {  # floor(x / y), each way of writing it (the in-place ones on a copy)
    "div floor": lambda x, y: torch.div(x, y, rounding_mode="floor"),
    "divide": lambda x, y: torch.divide(x, y, rounding_mode="floor"),
    "Tensor.div": lambda x, y: x.div(y, rounding_mode="floor"),
    "floor_divide": torch.floor_divide,
    "Tensor.floor_divide": lambda x, y: x.floor_divide(y),
    "//": lambda x, y: x // y,
    "//=": lambda x, y: x.clone().__ifloordiv__(y),
    "div_": lambda x, y: x.clone().div_(y, rounding_mode="floor"),
    "floor_divide_": lambda x, y: x.clone().floor_divide_(y),
}


@pytest.mark.parametrize("name", sorted(QUOTIENTS))
def test_a_rounded_quotient_at_its_jump_is_exact_where_f_is_continuous(name):
    """f(x, y) = floor(x / y) (x - 2 y) at (2, 1): floor jumps there, f does not (x - 2 y = 0): the slopes are those of
    the pieces floor = 2 (q moving up) and floor = 1. Was refused (div: 'no kink rule'; floor_divide and //: 'no
    forward-mode derivative'); now every entry point answers, as for torch.floor(x / y)."""
    q = QUOTIENTS[name]
    f = lambda x, y: (q(x, y) * (x - 2 * y)).sum()
    xs = (torch.tensor([2.0], dtype=f64), torch.tensor([1.0], dtype=f64))
    for d in [(1.0, 0.0), (-1.0, 0.0), (0.0, 1.0), (0.0, -1.0), (1.0, 3.0), (-0.5, 0.7), (2.0, 1.0)]:
        ds = tuple(torch.tensor([v], dtype=f64) for v in d)
        assert float(gw.directional_derivative(f, xs, ds)) == pytest.approx(one_sided(f, xs, ds), abs=1e-5)
    reference = lambda x, y: (torch.floor(x / y) * (x - 2 * y)).sum()  # PyTorch differentiates this one
    near = pieces(reference, xs)
    assert len(near) == 2
    got = np.unique(np.array([flat(e) for e in gw.subdifferential(f, xs).elements]).round(9), axis=0)
    np.testing.assert_allclose(got, near, atol=1e-5)
    for seed in range(3):
        g = flat(gw.generalized_grad(f, xs, seed=seed))
        assert min(np.abs(near - g).max(1)) < 1e-5
    cert = gw.stationarity(f, xs)
    assert cert.stationary is False and cert.min_norm == pytest.approx(least_norm(near), abs=1e-5)


@pytest.mark.parametrize("mode", ["floor", "trunc", "//", "rfloordiv"])
def test_a_rounded_quotient_where_f_jumps_is_an_error(mode):
    """frac-like sawtooth x - y q(x / y) jumps at multiples of y on one side only: the continuous side is exact, the
    other (and generalized_grad, subdifferential, stationarity) an error, as for floor."""
    q = {"floor": lambda x, y: torch.div(x, y, rounding_mode="floor"),
         "trunc": lambda x, y: torch.div(x, y, rounding_mode="trunc"),
         "//": lambda x, y: x // y,
         "rfloordiv": lambda x, y: 6.0 // y * (x / 6.0)}[mode]  # (x is 6 at the jump: the same sawtooth)
    f = lambda x, y: (x - y * q(x, y)).sum()
    xs = (torch.tensor([6.0], dtype=f64), torch.tensor([1.5], dtype=f64))
    up, down = (tuple(torch.tensor([s * v], dtype=f64) for v in (1.0, 0.0)) for s in (1, -1))
    if mode == "rfloordiv":  # 6 // y jumps as y moves
        up, down = (tuple(torch.tensor([v], dtype=f64) for v in (0.0, s)) for s in (-1.0, 1.0))
    with torch.no_grad():  # the reference: f jumps along `down`
        assert abs(float(f(*[x + 1e-9 * d for x, d in zip(xs, down, strict=True)]) - f(*xs))) > 1
    assert float(gw.directional_derivative(f, xs, up)) == pytest.approx(one_sided(f, xs, up), abs=1e-5)
    for call in (lambda: gw.directional_derivative(f, xs, down), lambda: gw.generalized_grad(f, xs),
                 lambda: gw.subdifferential(f, xs), lambda: gw.stationarity(f, xs)):
        with pytest.raises(NonsmoothError, match="jumps"):
            call()


def test_floor_divide_has_the_floor_rule_in_forward_mode():
    """floor_divide and // have no forward-mode (nor reverse) derivative in PyTorch 2.13: gradwise refused every
    call. Away from jumps their derivative is 0, as div(rounding_mode='floor')'s; float32 too."""
    for dtype in (f64, torch.float32):
        x = torch.tensor([0.7, 2.3, -1.3], dtype=dtype)
        f = lambda x: (x // 0.5 * x).sum() + (torch.floor_divide(3.0, x) * x).sum()
        reference = lambda x: (torch.div(x, 0.5, rounding_mode="floor") * x).sum() \
            + (torch.div(torch.full_like(x, 3.0), x, rounding_mode="floor") * x).sum()
        d = torch.tensor([1.0, -2.0, 0.5], dtype=dtype)
        xd = x.double()
        assert float(gw.directional_derivative(f, x, d)) == pytest.approx(
            one_sided(reference, [xd], [d.double()]), rel=1e-5)
        xr = x.clone().requires_grad_(True)
        assert torch.equal(gw.generalized_grad(f, x)[0], torch.autograd.grad(reference(xr), xr)[0])


def test_rounded_quotient_jumps_only_at_exact_multiples():
    """1.0 / 0.1 rounds to 10.0, but 0.1's float is above 0.1: the kernel's floor is 9 and no jump is at x (it is
    5.6e-17 away). Was refused (the quotient looked integral); now exact along the directions a float64 difference
    resolves. 0 // inf jumps (PyTorch gives -1 below 0): refused along -x, 0 along +x."""
    f = lambda x, y: x - y * (x // y)
    xs = (torch.tensor(1.0, dtype=f64), torch.tensor(0.1, dtype=f64))
    for d in [(-1.0, 0.0), (0.0, 1.0)]:
        ds = tuple(torch.tensor(v, dtype=f64) for v in d)
        assert float(gw.directional_derivative(f, xs, ds)) == pytest.approx(one_sided(f, xs, ds), abs=1e-5)
    g = lambda x: x // torch.tensor(math.inf, dtype=f64)
    zero = torch.tensor(0.0, dtype=f64)
    assert float(gw.directional_derivative(g, zero, torch.tensor(1.0, dtype=f64))) == 0.0
    with pytest.raises(NonsmoothError, match="jumps"):
        gw.directional_derivative(g, zero, torch.tensor(-1.0, dtype=f64))


def test_rounded_quotient_jumps_that_cancel():
    """div(x, 1, 'floor') + x % 1 is x (the jumps cancel: slope 1 both ways, one piece); div(x, 1, 'floor') +
    div(-x, 1, 'floor') is -1 off the integers and 0 on them: a jump, refused there, 0 elsewhere."""
    x = torch.tensor([2.0, -1.0, 0.0], dtype=f64)
    f = lambda x: (torch.div(x, 1, rounding_mode="floor") + torch.remainder(x, 1.0)).sum()
    for d in (torch.ones(3, dtype=f64), -torch.ones(3, dtype=f64), torch.tensor([1.0, -2.0, 0.5], dtype=f64)):
        assert float(gw.directional_derivative(f, x, d)) == pytest.approx(one_sided(f, [x], [d]), abs=1e-5)
    assert torch.equal(gw.generalized_grad(f, x)[0], torch.ones(3, dtype=f64))
    assert len(gw.subdifferential(f, x).elements) == 1
    g = lambda x: (torch.div(x, 1, rounding_mode="floor") + torch.div(-x, 1, rounding_mode="floor")).sum()
    for d in (torch.ones(3, dtype=f64), -torch.ones(3, dtype=f64)):
        with pytest.raises(NonsmoothError, match="jumps"):
            gw.directional_derivative(g, x, d)
    assert float(gw.directional_derivative(g, x + 0.5, torch.ones(3, dtype=f64))) == 0.0


# --- remainder and fmod ------------------------------------------------------------------------------------------

MODULOS = {"remainder": torch.remainder, "%": lambda x, m: x % m, "Tensor.remainder": lambda x, m: x.remainder(m),
           "fmod": torch.fmod, "Tensor.fmod": lambda x, m: x.fmod(m)}


def _jumps(f, xs, ds) -> bool:
    """Whether f (float64) jumps along d: a step of 1e-12 moves it by far more than 1e-12 times the slope (a jump of
    float32 inputs is an exact multiple, 1e-12 is below the distance to the next one)."""
    with torch.no_grad():
        moved = [float(f(*[x + h * d for x, d in zip(xs, ds, strict=True)]) - f(*xs)) for h in (1e-12, 2e-12)]
    return abs(moved[0]) > 1e-6 or abs(moved[1] - 2 * moved[0]) > 1e-9


@pytest.mark.parametrize("name", sorted(MODULOS))
def test_remainder_and_fmod_jump_only_at_exact_multiples(name):
    """x % m at float32 points (x, m): float 0.1 is above 0.1, so 1.0, 2.0, -1.0 are no multiples of it (1.0 % 0.1 is
    0.0999...) though x / m rounds to an integer there: both slopes are 1 (x) and -q (m). Was refused in every
    direction (the quotient looked integral); now exact against float64 one-sided differences of the same float32
    inputs, and refused where f jumps (exact multiples: 0.5 % 0.25, 0 % m for remainder, not for fmod)."""
    mod = MODULOS[name]
    f = lambda x, m: mod(x, m).sum()
    dirs = [(1.0, 0.0), (-1.0, 0.0), (0.0, 1.0), (0.0, -1.0), (1.0, 3.0), (-0.5, 0.7)]
    answered = refused = 0
    for x0 in (1.0, 2.0, -1.0, 0.3, 0.0, 0.5, -0.75):
        for m0 in (0.1, -0.1, 0.3, 0.25, -0.25):
            xs32 = (torch.tensor([x0]), torch.tensor([m0]))
            xs = tuple(v.double() for v in xs32)  # the same numbers: fmod (and so the jumps) exact in both
            for d in dirs:
                ds = tuple(torch.tensor([v], dtype=f64) for v in d)
                if _jumps(f, xs, ds):
                    refused += 1
                    with pytest.raises(NonsmoothError, match="jumps"):
                        gw.directional_derivative(f, xs32, tuple(v.float() for v in ds))
                elif x0 == 0 and d[0] == 0:  # the quotient stays at 0 to first order: further directions, which
                    continue                  # may cross (documented: a zero tangent at a jump may be refused)
                else:
                    answered += 1
                    got = float(gw.directional_derivative(f, xs32, tuple(v.float() for v in ds)))
                    assert got == pytest.approx(one_sided(f, xs, ds, h=1e-12), abs=1e-3), (x0, m0, d)
    assert answered > 100 and refused > 20


def test_remainder_limit_is_the_other_side_of_the_multiple():
    """At x = 0.75 = 3 m (m = 0.25), floor(x / m) m + x % m is x for both limits: % takes m on the side where the
    quotient falls, so every direction (in x and m) is exact and there is one piece; fmod with trunc likewise at
    -0.75. Without the limit written in, PyTorch's 0 there would make f jump (refused)."""
    for mod, mode, x0 in ((torch.remainder, "floor", 0.75), (torch.fmod, "trunc", -0.75)):
        f = lambda x, m, mod=mod, mode=mode: (torch.div(x, m, rounding_mode=mode) * m + mod(x, m)).sum()
        xs = (torch.tensor([x0], dtype=f64), torch.tensor([0.25], dtype=f64))
        for d in [(1.0, 0.0), (-1.0, 0.0), (0.0, 1.0), (0.0, -1.0), (1.0, 3.0), (-0.5, 0.7)]:
            ds = tuple(torch.tensor([v], dtype=f64) for v in d)
            assert float(gw.directional_derivative(f, xs, ds)) == pytest.approx(one_sided(f, xs, ds), abs=1e-5)
        assert np.allclose(flat(gw.generalized_grad(f, xs)), [1.0, 0.0])
        assert len(gw.subdifferential(f, xs).elements) == 1


def test_trunc_division_and_fmod_use_the_real_quotient():
    """ATen's trunc division truncates the rounded x / y: 1.0 / 0.1 rounds to 10, but float 0.1 is above 0.1 and the
    real quotient is 9.99...: trunc 9, with no jump near (floor division already floors the real one). gradwise
    gave 10 for d/dx of trunc(x / m) * x (silent, as PyTorch's own backward: float64 differences give 9), and fmod's
    slope in m (-trunc(x / m), PyTorch: -10) was refused. Both follow the real quotient now."""
    x, m = torch.tensor([1.0, 2.0, -1.0, 0.5, 0.3]), torch.tensor([0.1, 0.1, 0.1, -0.1, 0.7])
    xs = (x.double(), m.double())  # the same numbers
    for f in (lambda x, m: (torch.div(x, m, rounding_mode="trunc") * x).sum(), lambda x, m: torch.fmod(x, m).sum(),
              lambda x, m: (x.fmod(m) * m).sum()):
        got = flat(gw.generalized_grad(f, (x, m)))
        for i in range(10):
            e = torch.zeros(10, dtype=f64)
            e[i] = 1.0
            ds = (e[:5], e[5:])
            assert got[i] == pytest.approx(one_sided(f, xs, ds, h=1e-12), abs=1e-2)
            for d in (ds, tuple(-v for v in ds)):
                got_d = float(gw.directional_derivative(f, (x, m), tuple(v.float() for v in d)))
                assert got_d == pytest.approx(one_sided(f, xs, d, h=1e-12), abs=1e-2)
    xr = x.clone().requires_grad_(True)  # away from rounding, PyTorch's gradient bit for bit
    y = torch.tensor([0.7, 2.5, -1.2, 0.4, 0.9])
    assert torch.equal(gw.generalized_grad(lambda x: torch.fmod(x, y).sum() * 3, x)[0],
                       torch.autograd.grad(torch.fmod(xr, y).sum() * 3, xr)[0])


# --- logit with eps ---------------------------------------------------------------------------------------------

LOGITS = {"torch.logit": lambda x: torch.logit(x, 0.25), "Tensor.logit": lambda x: x.logit(eps=0.25),
          "special.logit": lambda x: torch.special.logit(x, eps=0.25)}


@pytest.mark.parametrize("name", sorted(LOGITS))
def test_logit_eps_is_its_clamp(name):
    """logit(x, eps) clamps x to [eps, 1 - eps]: a kink at each bound (slope 0 outside, 1 / (x (1 - x)) inside).
    Was refused there; now exact like clamp: one-sided slopes, both pieces, stationarity where 0 is between."""
    lg = LOGITS[name]
    x = torch.tensor([0.25, 0.75, 0.5], dtype=f64)
    f = lambda x: lg(x).sum()
    for d in (torch.eye(3, dtype=f64)[i] * s for i in range(3) for s in (1, -1)):
        assert float(gw.directional_derivative(f, x, d)) == pytest.approx(one_sided(f, [x], [d]), rel=1e-5)
    near = pieces(f, [x], decimals=3)
    assert len(near) == 4
    got = np.unique(np.array([flat(e) for e in gw.subdifferential(f, x).elements]).round(3), axis=0)
    np.testing.assert_allclose(got, near, atol=1e-3)
    # f(x) = logit(x, 1/4) - 2 x at 1/4: the pieces -2 and 16/3 - 2 hold 0 between them
    for c, stationary in ((-2.0, True), (1.0, False)):
        h = lambda x: lg(x).sum() + c * x.sum()  # noqa: B023
        at = torch.tensor([0.25], dtype=f64)
        cert = gw.stationarity(h, at)
        assert cert.stationary is stationary
        assert cert.min_norm == pytest.approx(least_norm(pieces(h, [at], decimals=3)), abs=1e-3)


def test_logit_eps_keeps_pytorch_values_and_refuses_an_empty_range():
    x = torch.tensor([0.1, 0.25, 0.5, 0.9, math.nan, math.inf], dtype=torch.float32)
    out = gw._nonsmooth._engine._run(lambda x: torch.logit(x, 0.1), (x,), True, (torch.ones_like(x),),
                                     gw._nonsmooth._records._Run(), False)[1][0][0]
    assert torch.equal(out.nan_to_num(7.0), torch.logit(x, 0.1).nan_to_num(7.0))
    with pytest.raises(NonsmoothError, match="eps"):
        gw.directional_derivative(lambda x: torch.logit(x, 0.75).sum(), torch.tensor([0.75]), torch.ones(1))


# --- threshold / hardshrink along a direction that leaves the jumping element alone --------------------------


def test_threshold_on_an_input_moved_in_place_still_refuses():
    """x.mul_(x) at 0 has tangent 0 but moves at second order (x = t^2 along d): threshold there jumps. The input's
    elements stay put only while it is unmodified: refused as before."""
    f = lambda x: F.threshold(x.mul_(x), 0.0, 5.0).sum()
    x = torch.tensor([0.0], dtype=f64)
    with torch.no_grad():
        assert abs(float(f(x + 1e-4) - f(x.clone()))) > 1
    with pytest.raises(NonsmoothError, match="does not move to first order"):
        gw.directional_derivative(f, x, torch.ones(1, dtype=f64))


@pytest.mark.parametrize("how", ["view", "closure", "hardshrink of a row"])
def test_threshold_on_a_view_of_an_input_the_direction_leaves_alone_is_exact(how):
    w = torch.tensor([[1.0, 2.0], [0.5, -0.5]], dtype=f64)
    f = {"view": lambda w: F.threshold(w[0], 1.0, 5.0).sum() + F.threshold(w.reshape(-1), 1.0, 5.0).sum(),
         "closure": lambda v: F.threshold(w, 1.0, 5.0).sum() * 0 + F.threshold(v.t(), 1.0, 5.0).sum(),
         "hardshrink of a row": lambda w: F.hardshrink(w[1], 0.5).sum() * w[0, 1]}[how]
    d = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=f64)  # moves only w[0, 1], which sits at no jump
    assert float(gw.directional_derivative(f, w, d)) == pytest.approx(one_sided(f, [w], [d]), abs=1e-5)


_EPS = 0.4223186145843559  # float32(1) - float32(eps) is not float32(1 - eps): the kernel's upper bound is the first


def _logit_fixed_eps(x):
    return torch.logit(x, 0.4223186145843559)


def test_logit_eps_bound_in_float32_is_the_kernels():
    """The logit fact located the upper bound at 1 - eps rounded from float64, which for float32 can miss the
    kernel's float32(1) - float32(eps): at that x gradwise answered PyTorch's convention, 4.10 along +1 where the
    slope is 0 (and TorchScript's call 0 along -1 where it is -4.10). Now the rule is exact and the watch refuses
    the scripted call."""
    hi = (torch.tensor(1.0) - torch.tensor(_EPS, dtype=torch.float32)).reshape(1)
    f = lambda x: torch.logit(x, _EPS).sum()
    with warnings.catch_warnings():  # (PyTorch deprecates TorchScript)
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(_logit_fixed_eps)
    for d in (torch.ones(1), -torch.ones(1)):
        want = one_sided(lambda x: torch.logit(x, _EPS).double().sum(), [hi], [d], h=1e-3)  # float32 steps
        assert float(gw.directional_derivative(f, hi, d)) == pytest.approx(want, rel=1e-3)
        with pytest.raises(NonsmoothError, match="cannot see"):
            gw.directional_derivative(lambda x: scripted(x).sum(), hi, d)
