"""Kink-aware gradcheck: passes smooth code, tells PyTorch's kink conventions apart, still fails wrong backwards."""
from __future__ import annotations

import pytest
import torch

import gradwise as gw
from gradwise._nonsmooth import GradcheckError


class BadSquare(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**2

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x * g  # wrong: should be 2 x g


def _relu_function(backward, jvp=None) -> type[torch.autograd.Function]:
    """relu as a custom Function whose backward is ``backward(x, g)`` (and jvp ``jvp(x, t)``, if given)."""

    class Relu(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            ctx.save_for_forward(x)
            return x.clamp_min(0)

        @staticmethod
        def backward(ctx, g):
            return backward(ctx.saved_tensors[0], g)

    if jvp is not None:
        Relu.jvp = staticmethod(lambda ctx, t: jvp(ctx.saved_tensors[0], t))
    return Relu


BadRelu = _relu_function(lambda x, g: g * (x > 0) * 2)  # wrong slope on the active side
GoodRelu = _relu_function(lambda x, g: g * (x > 0))
# wrong, and without a jvp gradwise cannot check it at the kink
ReluNoJvp = _relu_function(lambda x, g: g * 5)


d = lambda *v: torch.tensor(v, dtype=torch.float64)


def test_smooth_function_passes():
    assert gw.gradcheck(lambda x: (x.sin() * x).sum(), d(0.3, -1.2))


def test_wrong_backward_fails_at_a_smooth_point():
    with pytest.raises(GradcheckError, match="wrong gradient"):
        gw.gradcheck(lambda x: BadSquare.apply(x).sum(), d(0.5, 1.0))


def test_wrong_backward_fails_at_a_kink_too():
    result = gw.gradcheck(lambda x: BadRelu.apply(x).sum(), d(0.0, 1.0), raise_exception=False)
    assert not result.passed and "next to x" in str(result)


def test_kink_where_pytorch_is_a_generalized_gradient():
    result = gw.gradcheck(lambda x: torch.relu(x).sum() + x.abs().sum(), d(0.0, 2.0))
    assert result.passed and result.kink and result.generalized
    assert "is a generalized gradient" in str(result)


def test_kink_where_pytorch_is_not_a_generalized_gradient():
    result = gw.gradcheck(lambda x: torch.relu(x) - torch.relu(-x), d(0.0), raise_exception=False)
    assert not result.passed and result.kink and result.generalized is False
    assert "is not a generalized gradient" in str(result) and "(1, 1)" in str(result)


def test_an_undecided_kink_is_no_pass():
    """relu(x) - relu(-x) at 0 in 7 coordinates: 14 ties, so the pieces are sampled and the verdict on PyTorch's
    zero gradient (the true one is all ones) may stay undecided. That is no pass (it passed, raising nothing)."""
    f = lambda x: (torch.relu(x) - torch.relu(-x)).sum()
    result = gw.gradcheck(f, torch.zeros(7, dtype=torch.float64), raise_exception=False)
    assert result.kink and result.generalized is not True and not result.passed
    with pytest.raises(GradcheckError):
        gw.gradcheck(f, torch.zeros(7, dtype=torch.float64))


def test_a_kink_tied_everywhere_around_x_is_no_pass():
    """relu(0 * x) ties at every point near x, so no nearby point checks the backward the ordinary way, and the
    subdifferential at x comes from that same backward: a wrong custom backward (3x for x^2) passed as 'a
    generalized gradient'. No independent check: no pass."""

    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            ctx.save_for_forward(x)
            return x**2

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return 3 * x * g  # wrong (2x)

        @staticmethod
        def jvp(ctx, t):
            (x,) = ctx.saved_tensors
            return 2 * x * t

    f = lambda x: (torch.relu(0 * x) + Square.apply(x)).sum()
    result = gw.gradcheck(f, torch.tensor([0.5, 1.0], dtype=torch.float64), raise_exception=False)
    assert not result.passed and "could not be checked" in str(result)


class SquareWrongAtZero(torch.autograd.Function):
    """x^2 with a correct jvp and a backward that is wrong exactly where x == 0 (nowhere nearby)."""

    @staticmethod
    def forward(x):
        return x**2

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.x = inputs[0]

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (2 * x + 5 * (x == 0))

    @staticmethod
    def jvp(ctx, t):
        return 2 * ctx.x * t


def test_a_backward_wrong_only_at_the_kink_fails():
    """The subdifferential at x comes through the backward under test (5 + relu's [0, 1] looked like a hull);
    the reverse pass along a direction must match the forward-mode derivative along it: it does not."""
    result = gw.gradcheck(lambda x: (SquareWrongAtZero.apply(x) + torch.relu(x)).sum(), d(0.0, 0.5),
                          raise_exception=False)
    assert result.kink and not result.passed and "forward mode" in str(result)
    assert gw.gradcheck(lambda x: (x**2 + torch.relu(x)).sum(), d(0.0, 0.5))  # the same f, PyTorch's backward


def test_a_kink_without_a_subdifferential_is_no_pass():
    """Where the subdifferential cannot be computed (a Function without jvp, a jump) gradcheck cannot vouch for
    the backward: no pass (it passed with generalized=None)."""
    result = gw.gradcheck(lambda x: (ReluNoJvp.apply(x) + torch.relu(x)).sum(), d(0.0, 0.5),
                          raise_exception=False)
    assert result.kink and not result.passed and result.generalized is None
    jump = gw.gradcheck(lambda x: torch.where(x > 0, x + 1, x).sum(), d(0.0, 0.5), raise_exception=False)
    assert not jump.passed and jump.generalized is None


def test_a_kink_gradwise_cannot_see_is_named_as_such():
    """A kink inside a custom Function's forward (no kink op gradwise sees): PyTorch's central differences across
    it disagree with any backward. gradcheck cannot check x, and says that, not 'wrong gradient'."""
    result = gw.gradcheck(lambda x: GoodRelu.apply(x).sum(), d(0.0, 0.5), raise_exception=False)
    assert not result.passed and not result.kink and "code it cannot see" in str(result)
    wrong = gw.gradcheck(lambda x: BadSquare.apply(x).sum(), d(0.3, 0.5), raise_exception=False)
    assert not wrong.passed and str(wrong).startswith("wrong gradient")
