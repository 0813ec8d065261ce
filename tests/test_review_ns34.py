"""Review of ns34 (gradcheck's differences along d, complex branch cuts). References: float64 one-sided
differences, PyTorch's own gradient at smooth points, the random state one run of f leaves."""
from __future__ import annotations

import pytest
import torch

import gradwise as gw
from test_hunt_ns34 import _complex_parts, _relu_with_jvp

D = torch.float64


def test_gradcheck_leaves_the_random_state_of_one_run():
    """ns34's differences along d ran f without putting back the call's random state: after gw.gradcheck at a
    kink, the generator had moved by every extra run of f (a dropout or rand in f), not by the one run of f the
    contract promises (the base kept it)."""
    x = torch.zeros(3, dtype=D)

    def f(x):
        return torch.relu(x).sum() + 0 * torch.rand(())

    torch.manual_seed(0)
    f(x)
    one_run = torch.random.get_rng_state()
    torch.manual_seed(0)
    assert gw.gradcheck(f, x, raise_exception=False).passed
    assert torch.equal(torch.random.get_rng_state(), one_run)


@pytest.mark.parametrize("p", [float("inf"), float("-inf"), float("nan")])
def test_pow_with_a_non_finite_exponent_is_pytorchs(p):
    """crash: the new branch-cut test ``p != int(p)`` raised OverflowError / ValueError for x ** inf or x ** nan
    (real x too) under generalized_grad. At these smooth points the result is PyTorch's."""
    x = torch.tensor([0.5, 2.0], dtype=D, requires_grad=True)
    expected = torch.autograd.grad((x**p).sum(), x)[0]
    got = gw.generalized_grad(lambda x: (x**p).sum(), x.detach())[0]
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got.nan_to_num(), expected.nan_to_num())


def test_gradcheck_fails_a_small_wrong_slope_in_a_large_f():
    """The hidden relu of test_hunt_ns34 scaled by 1e-3 (one-sided slopes 0 and 1e-3, backward and jvp 2e-3) plus
    a constant 1e5: the gap along d (~1e-3) is under the rounding bound (0.022) and gw.gradcheck passes a wrong
    gradient. The real rounding of the quotient here is ulp(1e5) / 1e-6 ~ 1.5e-5."""
    bad = _relu_with_jvp(2.0)
    x, y = torch.zeros(2, dtype=D), torch.zeros(2, dtype=D)

    def f(x, y):
        return 1e5 + 1e-3 * bad.apply(x).sum() + torch.relu(y).sum()

    h, e = 1e-7, torch.tensor([1.0, 0.0], dtype=D)
    with torch.no_grad():  # (f less its constant, which would round the differences)
        g = lambda x: 1e-3 * bad.apply(x).sum()
        left, right = float((g(x) - g(x - h * e)) / h), float((g(x + h * e) - g(x)) / h)
    assert abs(left) < 1e-9 and abs(right - 1e-3) < 1e-9  # PyTorch's 2e-3 is no generalized gradient
    assert not gw.gradcheck(f, (x, y), raise_exception=False).passed


@pytest.mark.filterwarnings("ignore:Input #:UserWarning")
def test_gradcheck_fails_a_wrong_slope_in_float32():
    """The hidden relu of test_hunt_ns34 (backward and jvp 2 at 0, one-sided slopes 0 and 1) plus torch.relu at
    its own kink and a constant 100, in float32 with the tolerances float32 needs (eps 1e-3, atol 1e-2, points
    nearby 0.1 away): a slope error of 1 passes gw.gradcheck."""
    bad = _relu_with_jvp(2.0)
    x, y = torch.zeros(2), torch.zeros(2)

    def f(x, y):
        return 100 + bad.apply(x).sum() + torch.relu(y).sum()

    h, e = 1e-7, torch.tensor([1.0, 0.0], dtype=D)
    with torch.no_grad():
        x64, y64 = x.double(), y.double()
        left = float((f(x64, y64) - f(x64 - h * e, y64)) / h)
        right = float((f(x64 + h * e, y64) - f(x64, y64)) / h)
    assert abs(left) < 1e-6 and abs(right - 1) < 1e-6  # PyTorch's 2 is no generalized gradient
    res = gw.gradcheck(f, (x, y), eps=1e-3, atol=1e-2, nearby_radius=0.1, raise_exception=False)
    assert not res.passed


@pytest.mark.filterwarnings("ignore:Input #:UserWarning")
def test_gradcheck_does_not_call_float32_rounding_an_unseen_kink():
    """be74d40's case, with a custom Function so that the differences along d are taken: a correct relu Function
    away from its kink, 100 x² at x = 1 and torch.relu at its kink, in float32 at the default eps 1e-6. The
    quotient's rounding there (ulp(200) / 1e-6 ~ 15 from f, ulp(1) * 400 / 1e-6 ~ 48 from x + eps d) is no kink:
    without a rounding bound gradcheck said undecided, 'cannot see'. PyTorch's own check fails at the points
    nearby (float32 at eps 1e-6); the value at x is a generalized gradient. At float32's eps (1e-3) all passes."""
    good = _relu_with_jvp(0.5)
    x, y = torch.ones(2), torch.zeros(2)

    def f(x, y):
        return good.apply(x).sum() + 100 * (x**2).sum() + torch.relu(y).sum()

    h, e = 1e-7, torch.tensor([1.0, 0.0], dtype=D)
    with torch.no_grad():  # the reference: f is differentiable in x at 1, slope 201 on both sides
        x64, y64 = x.double(), y.double()
        left = float((f(x64, y64) - f(x64 - h * e, y64)) / h)
        right = float((f(x64 + h * e, y64) - f(x64, y64)) / h)
    assert abs(left - 201) < 1e-4 and abs(right - 201) < 1e-4
    res = gw.gradcheck(f, (x, y), raise_exception=False)
    assert res.kink and res.generalized is True and "cannot see" not in str(res), str(res)
    assert gw.gradcheck(f, (x, y), eps=1e-3, atol=1e-2, nearby_radius=0.1, raise_exception=False).passed


_POWERS = {"tensor exponent": lambda z: z ** torch.tensor(0.5, dtype=D),
           "complex exponent": lambda z: z ** (0.5 + 0j),
           "float_power": lambda z: torch.float_power(z, 0.5),
           "pow_": lambda z: z.clone().pow_(0.5),
           "sqrt_": lambda z: z.clone().sqrt_()}


@pytest.mark.parametrize("name", list(_POWERS))
def test_complex_powers_refuse_on_their_branch_cut(name):
    """SILENT (fixed in ns35): imag(z ** 0.5) at z = -1 along -imag: f jumps (the one-sided quotients grow as
    1 / h), and a tensor or complex exponent (float_power passes 0.5 + 0j), pow_ and sqrt_ gave PyTorch's formula."""
    f = _complex_parts(_POWERS[name])
    y, x = torch.tensor(0.0, dtype=D), torch.tensor(-1.0, dtype=D)
    with torch.no_grad():
        quotients = [float((f(y - h, x) - f(y, x)) / h) for h in (1e-6, 1e-8)]
    assert abs(quotients[1]) > 50 * abs(quotients[0]) > 1e5, quotients
    with pytest.raises(gw.NonsmoothError):
        gw.directional_derivative(f, (y, x), (torch.tensor(-1.0, dtype=D), torch.tensor(0.0, dtype=D)))


@pytest.mark.parametrize("op, at", [(torch.log, (-1.0, -2.0)), (torch.sqrt, (-1.0, -2.0)),
                                     (lambda z: z**1.5, (-1.0, -2.0)), (torch.acosh, (-2.0, 0.5)),
                                     (torch.atanh, (-2.0, 1.5))],
                         ids=["log", "sqrt", "pow", "acosh", "atanh"])
def test_a_real_input_cast_to_complex_is_smooth_on_its_cut(op, at):
    """log / sqrt / z ** 1.5 / acosh / atanh of x.to(complex) on their cuts: smooth along every real direction
    (one-sided differences agree); the base returned PyTorch's gradient, ns34 raised NonsmoothError (a needless
    refusal, fixed in ns35: the cast is marked as lying on the real axis)."""
    x = torch.tensor(at, dtype=D)

    def f(x):
        w = op(x.to(torch.complex128))
        return (w.real + w.imag).sum()

    h = 1e-7
    with torch.no_grad():
        right = [float((f(x + h * e) - f(x)) / h) for e in torch.eye(2, dtype=D)]
        left = [float((f(x) - f(x - h * e)) / h) for e in torch.eye(2, dtype=D)]
    assert max(abs(a - b) for a, b in zip(left, right, strict=True)) < 1e-5
    got = gw.generalized_grad(f, x)[0]
    assert max(abs(float(g) - r) for g, r in zip(got, right, strict=True)) < 1e-5


def test_gradcheck_passes_a_slowly_vanishing_smooth_term_beside_a_kink():
    """relu(x) + |x|^1.05 at 0: every op is one gradwise sees, |x|^1.05 is C1 with slope 0 there, PyTorch's value
    0 is in relu's [0, 1]. The base passed; ns34 says f has a kink it cannot see."""
    x = torch.zeros(3, dtype=D)
    smooth = lambda x: (x.abs() ** 1.05).sum()
    h = torch.tensor([1e-300, 0.0, 0.0], dtype=D)
    with torch.no_grad():
        assert abs(float((smooth(h) - smooth(x)) / 1e-300)) < 1e-12  # its one-sided slopes at 0 are 0
    assert gw.gradcheck(lambda x: torch.relu(x).sum(), x, raise_exception=False).passed  # the kink alone passes
    assert gw.gradcheck(lambda x: torch.relu(x).sum() + smooth(x), x, raise_exception=False).passed


@pytest.mark.parametrize("op, at, d", [(torch.asinh, (0.0, 2.0), (-1.0, 0.0)), (torch.atan, (0.0, 2.0), (-1.0, 0.0)),
                                       (torch.acosh, (-2.0, 0.0), (0.0, -1.0)), (torch.acosh, (0.5, 0.0), (0.0, -1.0))],
                         ids=["asinh", "atan", "acosh", "acosh-inside"])
def test_the_other_inverse_functions_refuse_on_their_cut(op, at, d):
    """ns34's facts for asinh / atan (imaginary axis beyond ±i) and acosh (real axis below 1) had no test: at a
    point of each cut along a direction across it, f jumps (the quotients grow as 1 / h), and gradwise refuses."""
    def f(x, y):
        w = op(torch.complex(x, y))
        return w.real + w.imag

    xs, ds = tuple(torch.tensor(v, dtype=D) for v in at), tuple(torch.tensor(v, dtype=D) for v in d)
    with torch.no_grad():
        q = [float((f(*(a + h * b for a, b in zip(xs, ds, strict=True))) - f(*xs)) / h) for h in (1e-6, 1e-8)]
    assert abs(q[1]) > 50 * abs(q[0]) > 1e5, q
    with pytest.raises(gw.NonsmoothError):
        gw.directional_derivative(f, xs, ds)


@pytest.mark.parametrize("p", [float("inf"), float("nan")])
def test_strong_zeros_pow_with_a_non_finite_exponent(p):
    """crash (the base too): strong zeros' pow fact tested ``p != int(p)``, OverflowError / ValueError for x ** inf
    and x ** nan. Reference: the same program with the unused value deleted (its genuine Inf / NaN kept)."""
    x = torch.tensor([0.5, 2.0], dtype=D, requires_grad=True)
    with gw.strong_zeros():
        torch.where(x > 1, x**p, 0.0).sum().backward()
    kept = x.detach()[1:].requires_grad_()
    (kept**p).sum().backward()
    assert x.grad[0] == 0
    assert torch.equal(x.grad[1:].isnan(), kept.grad.isnan()) and torch.equal(x.grad[1:].nan_to_num(),
                                                                               kept.grad.nan_to_num())
