"""Review of session 30's second-order tangents (comparisons whose argument has tangent 0, decided by
s'' = dᵀ(∇²s)d computed by reverse passes on the pass's graph) and of generalized_grad through a reverse pass
inside f. References: float64 one-sided differences at several steps, never a formula derived by hand."""
from __future__ import annotations

import pytest
import torch
from torch.autograd.function import once_differentiable

import gradwise as gw
from gradwise import NonsmoothError
from test_engine_threads import DEPTHS, _at_depth

D = torch.float64
STEPS = (1e-4, 1e-6, 1e-7)


def one_sided(f, x, d):
    with torch.no_grad():
        return [((f(x + s * d) - f(x)) / s).item() for s in STEPS]


def _branches_meet(s_of, x0):
    """where(s > 0, g, -g) with g = sum(x - x0): continuous at x0 (both branches 0), slope ±sum(d) by side."""
    c = float(x0.sum())
    return lambda x: torch.where(s_of(x) > 0, x.sum() - c, c - x.sum())


# -- an op on the way to s without a second derivative: refuse, never a coin flip ---------------------------------

_ORIGIN = torch.zeros(1, 2, dtype=D)
CDIST_CASES = [((1.0, 0.0), (0.0, 1.0)), ((1.0, 0.0), (0.0, -1.0)), ((0.0, 1.0), (1.0, 0.0)),
               ((0.0, 1.0), (-1.0, 0.0)), ((-1.0, 0.0), (0.0, 1.0)), ((0.0, -1.0), (1.0, 0.0))]


@pytest.mark.parametrize(("x", "d"), CDIST_CASES)
def test_second_order_tie_through_cdist_refuses_or_is_exact(x, d):
    """s = cdist(x, 0) - 1 on the unit circle moved tangentially: s' = 0, s'' = |d|² > 0, so f takes the s > 0
    branch. PyTorch has no derivative of ``_cdist_backward``. The base ranked these ties by further random
    directions (3 of these 6 silently wrong, -1 for 1); session 30's branch leaked NotImplementedError from its
    reverse passes. Now: an error naming the comparison (or the exact value)."""
    x, d = torch.tensor([x], dtype=D), torch.tensor([d], dtype=D)
    f = _branches_meet(lambda v: torch.cdist(v, _ORIGIN)[0, 0] - 1, x)
    ref = one_sided(f, x, d)
    try:
        got = gw.directional_derivative(f, x, d).item()
    except NonsmoothError as e:
        assert "second" in str(e)
        return
    assert got == pytest.approx(ref[-1], abs=1e-5)


# -- a custom Function whose backward is not differentiable: its s'' reads 0 ---------------------------------------


class _SquareOnce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)
        return x * x

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g

    @staticmethod
    def jvp(ctx, t):
        (x,) = ctx.saved_tensors
        return 2 * x * t


class _SquareNoGrad(_SquareOnce):
    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        with torch.no_grad():
            return 2 * x * g


class _SquareDifferentiable(_SquareOnce):
    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


NO_GRAD_BACKWARD = pytest.param(_SquareNoGrad, id="no_grad backward")


@pytest.mark.parametrize("n", [1, 3, 100])
@pytest.mark.parametrize("fn", [pytest.param(_SquareOnce, id="once_differentiable"), NO_GRAD_BACKWARD])
def test_second_order_tie_through_a_non_differentiable_custom_backward_refuses(fn, n):
    """where(Sq(x) > 0, x, -x) at 0 along +1 with Sq a custom x*x whose backward has no graph: f'(0; 1) = 1; the
    s'' taken through that backward reads 0, and the element kept its tie value: -1, silently (base too)."""
    f = lambda x: torch.where(fn.apply(x) > 0, x, -x).sum()
    x, d = torch.zeros(n, dtype=D), torch.ones(n, dtype=D)
    assert one_sided(f, x, d) == pytest.approx([n] * 3)
    with pytest.raises(NonsmoothError, match="second-order"):
        gw.directional_derivative(f, x, d)


def test_second_order_tie_through_a_differentiable_custom_backward_is_exact():
    f = lambda x: torch.where(_SquareDifferentiable.apply(x) > 0, x, -x).sum()
    x, d = torch.zeros(3, dtype=D), torch.ones(3, dtype=D)
    assert gw.directional_derivative(f, x, d).item() == pytest.approx(one_sided(f, x, d)[-1])


# -- generalized_grad of f that takes a gradient inside, then compares ---------------------------------------------


def _penalty_first_order(x):
    (g,) = torch.autograd.grad((x**2).sum() / 2, x, create_graph=True)  # g = x
    return torch.where(g.sum() > 0, x.sum(), -x.sum())  # |x0 + x1|


def _penalty_second_order(x):
    (g,) = torch.autograd.grad((x**3).sum() / 3, x, create_graph=True)  # g = x², so g.sum() moves at 2nd order
    return torch.where(g.sum() > 0, x.sum(), -x.sum())  # x0 + x1 (at 0 too: -0)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("f", [_penalty_first_order, _penalty_second_order], ids=lambda f: f.__name__)
def test_generalized_grad_of_a_gradient_penalty_feeding_a_comparison(f, seed):
    """The check for jumps called f with detached inputs under no_grad, so f's own torch.autograd.grad raised
    RuntimeError ('element 0 of tensors does not require grad'; the second-order one refused on the base). The
    result must be the gradient of a piece: its one-sided slopes along ±g and along the axes match."""
    x = torch.zeros(2, dtype=D, requires_grad=True)
    (g,) = gw.generalized_grad(f, x, seed=seed)
    def plain(v):
        with torch.enable_grad():
            return f(v.detach().requires_grad_()).detach()
    slope = one_sided(plain, x.detach(), g)[-1]  # along g: |g|² for a piece active along g
    assert slope == pytest.approx(float(g @ g), abs=1e-5)
    assert g.abs().tolist() == [1.0, 1.0]
    if f is _penalty_second_order:  # differentiable off 0 with gradient (1, 1) on every side
        assert g.tolist() == [1.0, 1.0]


# -- the new reverse passes inside a pass, made on an autograd pool thread ----------------------------------------


def _second(x):
    return torch.where((x * x).sum() > 0, x.sum(), -x.sum()) + torch.where(x[0] * x[1] > 0, x[0], -x[0])


_X0, _D0 = torch.zeros(2, dtype=D), torch.tensor([1.0, -2.0], dtype=D)
SECOND_ORDER_CALLS = {
    "directional_derivative": lambda x: float(gw.directional_derivative(_second, x, _D0)),
    "generalized_grad": lambda x: gw.generalized_grad(_second, x, seed=3)[0].tolist(),
}


@pytest.mark.parametrize("depth", [60, 70], ids=["nodes on a pool thread", "called and run on a pool thread"])
@pytest.mark.parametrize("name", list(SECOND_ORDER_CALLS))
def test_second_order_calls_tell_the_same_on_every_engine_thread(name, depth):
    """Regression guard (no defect found): the reverse passes for s'' run inside a backward on a pool thread."""
    told: dict[int, object] = {}
    for at in (3, depth):
        def bottom(xi, at=at):
            told[at] = SECOND_ORDER_CALLS[name](xi.detach().clone())
            return torch.zeros_like(xi)
        _, elsewhere = _at_depth(at, bottom, _X0, strong=False)
        assert elsewhere[0] == DEPTHS[at][0]
    assert told[depth] == told[3]
    if name == "directional_derivative":
        assert told[3] == pytest.approx(one_sided(_second, _X0, _D0)[-1])


# -- an s'' of rounding noise where s is constant along d -----------------------------------------------------------

_GEN = torch.Generator().manual_seed(0)
NOISE_DIRECTIONS = [torch.randn(2, generator=_GEN, dtype=D) for _ in range(12)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", range(len(NOISE_DIRECTIONS)))
def test_an_s_constant_along_d_written_with_cancelling_terms_keeps_its_value(k, dtype):
    """s = (x + y)² - x² - 2xy - y² is 0 everywhere: where(s >= 0, x, -x) is x, slope d_x. Its s'' is rounding
    noise (2(dx + dy)² - 2dx² - 4dx·dy - 2dy²), and its sign picked -x for about 1 in 3 directions (slope -d_x,
    silently; the base kept the tie value). The same for a variance written mean(v²) - mean(v)² along a constant
    shift (float32)."""
    d = NOISE_DIRECTIONS[k].to(dtype)
    f = lambda v: torch.where((v[0] + v[1]) ** 2 - v[0] ** 2 - 2 * v[0] * v[1] - v[1] ** 2 >= 0, v[0], -v[0])
    assert gw.directional_derivative(f, torch.zeros(2, dtype=dtype), d).item() == d[0].item()
    shift = torch.full((5,), d[0].item(), dtype=dtype)
    var = lambda v: torch.where((v * v).mean() - v.mean() ** 2 > 0, v.sum(), -v.sum())
    got = gw.directional_derivative(var, torch.zeros(5, dtype=dtype), shift).item()
    assert got == pytest.approx(-shift.sum().item(), rel=1e-6)


def _writes_into_its_input(x):
    x.mul_(1.0)
    return torch.where(x * x > 0, x, -x)


def test_directional_derivative_of_f_writing_into_its_input_at_a_second_order_tie():
    """f'(0; 1) = 1 (x * x > 0 off 0). The base said -1 (silently); session 30's extra pass with a graph leaked
    autograd's RuntimeError ('a view of a leaf Variable that requires grad is being used in an in-place
    operation'), which f never asked for. Now a NonsmoothError naming the comparison and the way out."""
    x = torch.zeros(2, dtype=D)
    with torch.no_grad():
        assert ((_writes_into_its_input(1e-6 * torch.ones(2, dtype=D)) - 0) / 1e-6).tolist() == [1.0, 1.0]
    with pytest.raises(NonsmoothError, match="in place"):
        gw.directional_derivative(_writes_into_its_input, x, torch.ones(2, dtype=D))
