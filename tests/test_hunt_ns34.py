"""Session 34 (nonsmooth): a kink inside a custom autograd.Function next to one gradwise sees. References: float64
one-sided differences, the pieces of relu enumerated by hand (slopes 0 and 1)."""
from __future__ import annotations

import pytest
import torch

import gradwise as gw
from test_gradcheck import _relu_function

D = torch.float64


def _relu_with_jvp(at_zero: float) -> type[torch.autograd.Function]:
    """relu as a custom Function whose backward and jvp agree, with slope ``at_zero`` at 0 (opaque to gradwise)."""

    def slope(x):
        return torch.where(x > 0, 1.0, torch.where(x < 0, 0.0, at_zero)).to(x.dtype)

    return _relu_function(lambda x, g: g * slope(x), lambda x, t: t * slope(x))


def _one_sided(f, x, j: int, h: float = 1e-7) -> tuple[float, float]:
    e = torch.zeros_like(x)
    e.view(-1)[j] = h
    with torch.no_grad():
        return float((f(x) - f(x - e)) / h), float((f(x + e) - f(x)) / h)


def test_gradcheck_fails_a_hidden_kink_beside_a_visible_one():
    """SILENT: relu as a custom Function whose backward and jvp both give 2 at 0 (no side has that slope: the
    one-sided differences are 0 and 1), plus torch.relu at a kink of its own. The visible kink sent gradcheck to
    its kink path, where the subdifferential (through the jvp) and the reverse pass (through the backward) agreed
    on 2 and it passed; alone, the hidden kink is refused. Now f'(x; d) from forward mode is also held against
    f's one-sided differences along d, and it does not pass. The same Function away from its kink (x = 1), with
    the visible kink, still passes."""
    x, y = torch.zeros(2, dtype=D), torch.zeros(2, dtype=D)
    bad = _relu_with_jvp(2.0)
    f = lambda x: bad.apply(x).sum()
    assert _one_sided(f, x, 0) == (0.0, 1.0)  # the reference: PyTorch's 2 is no generalized gradient
    assert torch.autograd.grad(f(x.requires_grad_()), x)[0].tolist() == [2.0, 2.0]
    x.requires_grad_(False)
    for g, xs in [(lambda x, y: bad.apply(x).sum() + torch.relu(y).sum(), (x, y)),
                  (lambda x: bad.apply(x).sum() + torch.relu(x).sum(), x)]:
        res = gw.gradcheck(g, xs, raise_exception=False)
        assert res.kink and not res.passed and res.generalized is None, str(res)
        assert "cannot see" in str(res)
    ok = gw.gradcheck(lambda x, y: bad.apply(x).sum() + torch.relu(y).sum(), (x + 1, y), raise_exception=False)
    assert ok.passed and ok.generalized, str(ok)


def _complex_parts(op):
    return lambda y, x: op(torch.complex(x, y)).imag


def test_complex_functions_refuse_on_their_branch_cut():
    """SILENT: imag(log(z)) (the angle) and imag(sqrt(z)) of z = x + iy made inside f, at z = -1 along -y: f
    jumps (pi to -pi, 1 to -1: one-sided differences blow up as the step shrinks), yet directional_derivative
    returned PyTorch's formula (1 and -0). log had no fact, sqrt's fact and rule saw only 0; so z ** 1.5, asin,
    acos, atanh on theirs (the real axis beyond ±1). Now all refuse on the cut (angle already did); off it they
    are PyTorch's."""
    y, x = torch.tensor(0.0, dtype=D), torch.tensor(-1.0, dtype=D)
    d = (torch.tensor(-1.0, dtype=D), torch.tensor(0.0, dtype=D))
    ops = (torch.log, torch.sqrt, torch.log10, lambda z: torch.log1p(z - 1), lambda z: z**0.5, lambda z: z**1.5,
           lambda z: torch.asin(z - 1), lambda z: torch.acos(z - 1), lambda z: torch.atanh(z - 1))
    for op in ops:
        f = _complex_parts(op)
        with torch.no_grad():
            quotients = [float((f(y - h, x) - f(y, x)) / h) for h in (1e-6, 1e-8)]
        assert abs(quotients[1]) > 50 * abs(quotients[0]) > 1e5, quotients  # a jump: no one-sided derivative
        with pytest.raises(gw.NonsmoothError):
            gw.directional_derivative(f, (y, x), d)
        away = (torch.tensor(0.5, dtype=D), x)
        h = 1e-7
        with torch.no_grad():
            reference = float((f(away[0] - h, x) - f(*away)) / h)
        assert abs(float(gw.directional_derivative(f, away, d)) - reference) < 1e-5
    assert gw.directional_derivative(torch.log, torch.tensor(0.5, dtype=D), torch.tensor(1.0, dtype=D)) == 2.0
