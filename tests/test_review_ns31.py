"""Review of session 31's nonsmooth changes (ns31): a custom backward that detaches the incoming gradient inside a
comparison's argument, a quasi-norm at 0 under a tie, and known limits. References: float64 one-sided differences
along the direction; the pieces of f."""
from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import gradwise as gw
from gradwise import NonsmoothError
from gradwise._nonsmooth._engine import _LAST_TIE

D = torch.float64
X0 = torch.zeros(2, dtype=D)
DIR = torch.tensor([1.0, 0.5], dtype=D)


def _square_function(name: str, backward):
    """A custom Function a -> a * a with a jvp and the given backward(a, grad)."""

    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            ctx.save_for_backward(a)
            ctx.save_for_forward(a)
            return a * a

        @staticmethod
        def jvp(ctx, t):
            return 2 * ctx.saved_tensors[0] * t

        @staticmethod
        def backward(ctx, g):
            return backward(ctx.saved_tensors[0], g)

    Square.__name__ = Square.__qualname__ = name
    return Square


Detached = _square_function("Detached", lambda a, g: 2 * a * g.detach())
Plain = _square_function("Plain", lambda a, g: 2 * a * g)
LIN = torch.nn.Linear(2, 2).double()
with torch.no_grad():
    LIN.weight.copy_(torch.eye(2, dtype=D))
    LIN.bias.zero_()
LIN.register_full_backward_hook(lambda m, gi, go: None)


def _tie(s):  # where(s > 0, x0, -x0) with s = |x|² (gradient 0 at 0): f = x0 off 0, f'(0; d) = d0
    return lambda v: torch.where(s(v) > 0, v[0], -v[0])


def test_backward_detaching_the_incoming_gradient_refuses():
    """``2 * a * grad.detach()`` requires grad (through a) but is cut from the incoming gradient: s'' read 0, so the
    tie kept its value. Was (SILENT): directional_derivative -1 (one-sided differences: 1), generalized_grad (-1, 0)
    (Clarke: {(1, 0)})."""
    f = _tie(lambda v: Detached.apply(v).sum())
    for call in (lambda: gw.directional_derivative(f, X0, DIR), lambda: gw.generalized_grad(f, X0, seed=0)):
        with pytest.raises(NonsmoothError, match="Detached"):
            call()


# (reentrant checkpoint warns in gradwise's passes without a graph: noted in the review, not a wrong number)
@pytest.mark.parametrize("s", [
    lambda v: (v * v).sum(),
    lambda v: Plain.apply(v).sum(),
    lambda v: (LIN(v) ** 2).sum(),
    lambda v: checkpoint(lambda a: (a * a).sum(), v, use_reentrant=False),
    pytest.param(lambda v: checkpoint(lambda a: (a * a).sum(), v, use_reentrant=True),
                 marks=pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad:UserWarning")),
    lambda v: torch.func.vmap(lambda a: a * a)(v).sum(),
], ids=["plain", "custom-torch-backward", "module-hook", "checkpoint", "checkpoint-reentrant", "vmap"])
def test_second_order_tie_no_false_refusal(s):
    f = _tie(s)
    with torch.no_grad():
        ref = float(f(X0 + 1e-7 * DIR) - f(X0)) / 1e-7
    assert float(gw.directional_derivative(f, X0, DIR)) == pytest.approx(ref, abs=1e-6) == 1.0
    assert gw.generalized_grad(f, X0, seed=0)[0].tolist() == [1.0, 0.0]


@pytest.mark.parametrize("seed", range(4))
def test_quasi_norm_at_zero_under_a_max_tie_refuses(seed):
    """max(||x||_0.5, sum x) at 0 equals the quasi-norm near 0 (||x||_0.5 >= ||x||_1 >= sum x): not Lipschitz, no
    Clarke gradient. The quasi-norm recorded no kink, so the max tie was ranked by a lazy pass where its tangent read
    0: along a direction with sum(d) > 0 (seed 1) generalized_grad returned (1, 1, 1) (SILENT)."""
    f = lambda x: torch.maximum(torch.linalg.vector_norm(x, 0.5), x.sum())
    _LAST_TIE.clear()  # (a first call: a later one of the same code carries tangents from its remembered tie)
    with pytest.raises(NonsmoothError, match="not Lipschitz"):
        gw.generalized_grad(f, torch.zeros(3, dtype=D), seed=seed)


@pytest.mark.parametrize("f", [
    lambda v: torch.where(v[0] ** 3 > 0, v[0], -v[0]),
    lambda v: torch.maximum(torch.where(v[0] ** 3 > 0, v[0], -v[0]), v[1]),
], ids=["abs-by-cube", "max-of-it"])
def test_third_order_comparison_continuous_f(f):
    """Was a known limit (the tie kept its value: slope -1); session 32 decides it by the third-order tangent."""
    d = torch.tensor([1.0, 0.5], dtype=D)
    with torch.no_grad():
        ref = float(f(X0 + 1e-7 * d) - f(X0)) / 1e-7  # 1.0
    assert float(gw.directional_derivative(f, X0, d)) == pytest.approx(ref, abs=1e-6)


def test_stationarity_tiny_gradient_comparison():
    """Fixed in session 32: a gradient in (0, 1e-9] is no longer taken as flat (the pieces are sampled)."""
    # s = 1e-12 x + x² + y²: s < 0 on a disk touching 0, so both y and -y are active pieces: 0 is in their hull
    f = lambda v: torch.where(1e-12 * v[0] + v[0] ** 2 + v[1] ** 2 > 0, v[1], -v[1])
    cert = gw.stationarity(f, torch.zeros(2, dtype=D))
    assert cert.stationary or not cert.exact


def test_quasi_norm_squared_at_zero_refuses():
    """Fixed in session 33: the refusal fires whenever a reverse pass reaches the zero slice (its incoming 0 at 0
    hid a slope 2 q grad(q) that is unbounded near 0 along the axes)."""
    with pytest.raises(NonsmoothError):
        gw.generalized_grad(lambda x: torch.linalg.vector_norm(x, 0.5) ** 2, torch.zeros(3, dtype=D), seed=0)
