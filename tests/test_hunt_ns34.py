"""Session 34 (nonsmooth): a kink inside a custom autograd.Function next to one gradwise sees. References: float64
one-sided differences, the pieces of relu enumerated by hand (slopes 0 and 1)."""
from __future__ import annotations

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
