"""Review (session 31, review_n31) of nest31 (a backward nested in a 'check' pass runs strong and hands its results'
structural zeros to the pass where padding's zeros reach them) and of review_s31's fixes.

The outer programs' NaN is made in a custom backward from finite saved data (_Sqrt's g / (2 sqrt(x)) at x = 0), so
the outer plan is 'check'. References are independent of gradwise: plain PyTorch with the nested backward's result
computed before the pass (a constant there: the same values), float64.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import gradwise as gw
from _fresh_warnings import fresh_warnings  # noqa: F401 (an autouse fixture: every test here)

D = torch.float64


class _Sqrt(torch.autograd.Function):
    """sqrt with a hand-written backward g / (2 sqrt(x)): 0/0 where x = 0 and g = 0, finite saved data."""

    @staticmethod
    def forward(ctx, x):
        y = x.sqrt()
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g / (2 * y)


_C = [1.0, -1.0, 4.0]


def _aux(h):
    """The gradient of h (unrelated to the outer program) at _C, by a torch.autograd.grad seeded with ones."""
    def run():
        with torch.enable_grad():
            c = torch.tensor(_C, dtype=D, requires_grad=True)
            return torch.autograd.grad(h(c), c)[0]
    return run


AUX = {  # h's structural zero at c[1] (a masked entry; a dropped one)
    "where, finite": _aux(lambda c: torch.where(c > 0, c, 0.0).sum() * 2),
    "where of sqrt (nested plan strong)": _aux(lambda c: torch.where(c > 0, c.sqrt(), 0.0).sum()),
    "index": _aux(lambda c: c[torch.tensor([0, 2])].pow(2).sum()),
    "masked_fill": _aux(lambda c: c.masked_fill(c < 0, 0.0).exp().sum()),
}


def _scaled_by(aux):
    class Scaled(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 1.0

        @staticmethod
        def backward(ctx, g):
            return g * aux()

    return Scaled


@pytest.mark.parametrize("name", AUX)
def test_a_nested_grad_of_an_unrelated_function_hands_no_zeros_to_a_check_pass(name):
    """SILENT (nest31): the custom backward scales its sensitivity by the gradient of an unrelated h, whose zero at
    c[1] nest31 handed to the 'check' pass as a structural zero: _Sqrt's 0/0 at w[1] = 0 (w[1] is used by the
    program) gave 0, PyTorch NaN. The base ran it plain (PyTorch's NaN). Now a nested backward in a 'check' pass
    hands zeros only where it is seeded with the custom backward's sensitivity."""
    aux = AUX[name]
    with gw.strong_zeros():
        value = aux()

    def run(fn):
        w = torch.tensor([1.0, 0.0, 4.0], dtype=D, requires_grad=True)
        return torch.autograd.grad(_scaled_by(fn).apply(_Sqrt.apply(w)).sum(), w)[0]

    ref = run(lambda: value)  # plain PyTorch, the auxiliary gradient a constant
    assert bool(ref[1].isnan()) and bool(ref[[0, 2]].isfinite().all())
    with gw.strong_zeros(), warnings.catch_warnings():
        warnings.simplefilter("ignore", gw.OpaqueBackwardWarning)  # (named: the nested backward handed nothing)
        got = run(aux)
    torch.testing.assert_close(got, ref, equal_nan=True, rtol=0, atol=0)


def test_the_unseeded_nested_backward_is_named_only_when_the_gradients_end_nonfinite():
    """The nested backward that hands nothing (not seeded with the sensitivity) is named in the pass's
    OpaqueBackwardWarning where the gradients end NaN/Inf, and on finite data nothing is said (PyTorch's bits)."""
    aux = AUX["index"]
    w = torch.tensor([1.0, 2.0, 4.0], dtype=D, requires_grad=True)
    want = torch.autograd.grad(_scaled_by(aux).apply(_Sqrt.apply(w)).sum(), w)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = gw.grad(_scaled_by(aux).apply(_Sqrt.apply(w)).sum(), w)[0]
    assert torch.equal(got, want)
    w = torch.tensor([1.0, 0.0, 4.0], dtype=D, requires_grad=True)
    with pytest.warns(gw.OpaqueBackwardWarning, match="nested in ScaledBackward"):
        gw.grad(_scaled_by(aux).apply(_Sqrt.apply(w)).sum(), w)
