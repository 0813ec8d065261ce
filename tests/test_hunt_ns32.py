"""Session 32's hunt in the nonsmooth calculus: how a kink op is called (keywords, an integer or bool operand of a
comparison, NumPy and complex operands). References: float64 one-sided differences along the direction at
decreasing steps, never a formula derived by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import gradwise as gw
from gradwise import NonsmoothError

D = torch.float64
X = torch.zeros(2, dtype=D)
DIRS = [torch.tensor([1.0, 0.5], dtype=D), torch.tensor([-1.0, 0.5], dtype=D), torch.tensor([-0.5, -1.0], dtype=D)]


def one_sided(f, x, d) -> float:
    """f'(x; d) by float64 one-sided differences at steps 1e-6, 1e-7, 1e-8 (which must agree)."""
    with torch.no_grad():
        slopes = [float(f(x + s * d) - f(x)) / s for s in (1e-6, 1e-7, 1e-8)]
    assert max(slopes) - min(slopes) < 1e-5, slopes
    return slopes[-1]


Z2 = torch.zeros(2, dtype=D)
# The same kink ops called with their arguments named (`input=`, `other=`): each rule crashed with a TypeError
# ("rule() got an unexpected keyword argument 'input'"; through an operator it would read "'>' not supported")
KEYWORDS = {
    "gt(input=, other=)": lambda v: torch.where(torch.gt(input=v, other=0.0), v, -v).sum(),
    "gt(v, other=tensor)": lambda v: torch.where(torch.gt(v, other=Z2), v, -v).sum(),
    "Tensor.lt(other=)": lambda v: torch.where(v.lt(other=Z2), -v, v).sum(),
    "abs(input=)": lambda v: torch.abs(input=v).sum(),
    "maximum(v, other=)": lambda v: torch.maximum(v, other=-v).sum(),
    "minimum(input=, other=)": lambda v: torch.minimum(input=v, other=-v).sum(),
    "sign(input=)": lambda v: (torch.sign(input=v) * v).sum(),
    "max(input=, dim=)": lambda v: torch.max(input=v, dim=0, keepdim=False).values,
    "amax(input=)": lambda v: torch.amax(input=v, dim=0),
    "sort(input=)": lambda v: torch.sort(input=v, dim=0, descending=True).values[0],
    "topk(input=)": lambda v: torch.topk(input=v, k=1).values[0],
    "cummax(input=)": lambda v: torch.cummax(input=v, dim=0).values.sum(),
    "clamp_min(input=, min=)": lambda v: torch.clamp_min(input=v, min=0.0).sum(),
    "clip(input=, min=)": lambda v: torch.clip(input=v, min=0.0).sum(),
}


@pytest.mark.parametrize("d", DIRS, ids=["d0", "d1", "d2"])
@pytest.mark.parametrize("f", KEYWORDS.values(), ids=KEYWORDS.keys())
def test_kink_ops_called_with_keywords(f, d):
    assert float(gw.directional_derivative(f, X, d)) == pytest.approx(one_sided(f, X, d), abs=1e-6)


# A comparison of the inputs with an integer or bool tensor (or a bool number): `torch.tensor(0) < x` ran with the
# integer operand first and was taken as never tying, so |x| written with it got slope -1 at 0 along +1 (SILENT);
# a bool operand crashed in gradwise's `a - b` ("Subtraction ... with a bool tensor is not supported")
OPERANDS = {
    "int tensor < x": lambda v: torch.where(torch.tensor(0) < v, v, -v).sum(),
    "lt(int tensor, x)": lambda v: torch.where(torch.lt(torch.zeros(2, dtype=torch.long), v), v, -v).sum(),
    "int tensor >= x": lambda v: torch.where(torch.tensor([0, 0]) >= v, -v, v).sum(),
    "bool tensor < x": lambda v: torch.where(torch.zeros(2, dtype=torch.bool) < v, v, -v).sum(),
    "x > False": lambda v: torch.where(v > False, v, -v).sum(),
    "x > bool tensor": lambda v: torch.where(v > torch.zeros(2, dtype=torch.bool), v, -v).sum(),
    "x == numpy 0-d": lambda v: torch.where(v == np.array(0.0), -v, v).sum(),
    "x > numpy int": lambda v: torch.where(v > np.int64(0), v, -v).sum(),
}


@pytest.mark.parametrize("d", DIRS, ids=["d0", "d1", "d2"])
@pytest.mark.parametrize("f", OPERANDS.values(), ids=OPERANDS.keys())
def test_comparison_with_integer_or_bool_operand(f, d):
    ref = one_sided(f, X, d)
    assert float(gw.directional_derivative(f, X, d)) == pytest.approx(ref, abs=1e-6)
    g = gw.generalized_grad(f, X, seed=0)[0]  # |x| summed: a piece's gradient is a sign vector
    assert g.abs().tolist() == [1.0, 1.0]


def test_comparison_with_none_or_an_object_falls_back_as_python_does():
    """Tensor.__eq__(None) is NotImplemented in PyTorch: Python's fallback answers (False), as without gradwise."""
    f = lambda v: v.sum() * (v == None)  # noqa: E711
    assert float(gw.directional_derivative(f, X, DIRS[0])) == 0.0
    with pytest.raises(TypeError, match="not supported"):
        gw.directional_derivative(lambda v: (v > "a").sum(), X, DIRS[0])


def test_complex_equality_at_a_tie_refuses_clearly():
    """`x == 0j` at x = 0 crashed inside the rule ('"max_values_cpu" not implemented for ComplexDouble'); away
    from the tie it is exact."""
    f = lambda v: (v == 0j).sum() * v.sum()
    with pytest.raises(NonsmoothError, match="complex"):
        gw.directional_derivative(f, X, DIRS[0])
    x1 = torch.ones(2, dtype=D)
    assert float(gw.directional_derivative(f, x1, DIRS[0])) == one_sided(f, x1, DIRS[0]) == 0.0


def test_a_type_error_inside_a_rule_names_the_op(monkeypatch):
    """A TypeError from gradwise's rule under an operator (`x > 0`) became NotImplemented in PyTorch's operator
    wrapper and surfaced as "'>' not supported between instances of 'Tensor' and 'int'"; it is an error naming the
    op and the line, since PyTorch accepts the call."""
    from gradwise._nonsmooth import _rules

    def broken(run, func, a, b):
        raise TypeError("internal")

    monkeypatch.setitem(_rules._ROUTES, torch.Tensor.gt, broken)  # (where `x > 0` arrives)
    f = lambda v: torch.where(v > 0, v, -v).sum()
    with pytest.raises(NonsmoothError, match=r"rule for gt \(called at .*test_hunt_ns32.py:\d+\) failed.*internal"):
        gw.directional_derivative(f, X, DIRS[0])


def _nearby_least_norm(f, xs, n: int = 3000, r: float = 1e-7) -> float:
    """The least norm of the hull of f's gradients at random points within ~r of xs (differentiable almost surely):
    the Clarke subdifferential's least norm, approached from above."""
    from scipy.optimize import nnls

    gen, rows = torch.Generator().manual_seed(3), []
    for _ in range(n):
        ps = [(x + r * torch.randn(x.shape, generator=gen, dtype=D)).requires_grad_(True) for x in xs]
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(f(*ps), ps)]).numpy())
    g = np.array(rows)
    mu = nnls(np.vstack([g.T, np.ones(len(g))]), np.r_[np.zeros(g.shape[1]), 1.0], maxiter=20_000)[0]
    return float(np.linalg.norm(mu / mu.sum() @ g))


_A = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.8, -1.0]], dtype=D)
_W = torch.tensor([0.4, -0.9, 1.3], dtype=D)
_B = torch.cat([_A, torch.tensor([[0.2, 0.1, 0.9]], dtype=D)])
# One Euclidean norm at 0 (a round subdifferential: sampled pieces never reach a boundary point, and no interval
# bound covers the norm): ||x|| + x0 at 0 is stationary (0 on the unit ball's boundary shifted by e0) and
# ||x|| + 1.5 x0 is not (least norm 0.5); both said None
BALLS = {
    "||x|| + x0": ((torch.zeros(2, dtype=D),), lambda x: torch.linalg.vector_norm(x) + x[0], True),
    "||x|| + x0 (3-d)": ((torch.zeros(3, dtype=D),), lambda x: torch.linalg.vector_norm(x) + x[0], True),
    "||x|| + 1.5 x0": ((torch.zeros(2, dtype=D),), lambda x: torch.linalg.vector_norm(x) + 1.5 * x[0], False),
    "exp(||Ax||) + w.x": ((torch.zeros(3, dtype=D),), lambda x: torch.exp(torch.linalg.vector_norm(_A @ x)) + _W @ x,
                          False),
    "torch.norm(x) + 0.9 sum x": ((torch.zeros(3, dtype=D),), lambda x: torch.norm(x) + 0.9 * x.sum(), False),
    "||x - y|| at x = y": ((torch.ones(2, dtype=D), torch.ones(2, dtype=D)),
                           lambda x, y: (x - y).norm() + 0.7 * x[0] + 0.6 * y[1], False),
    # (A is 2 x 3: e0 / 10 is 0.066 off the plane A^T B spans)
    "-||Ax|| + 0.1 x0": ((torch.zeros(3, dtype=D),), lambda x: -torch.linalg.vector_norm(_A @ x) + 0.1 * x[0],
                         False),
    "-||Bx|| + 0.1 x0": ((torch.zeros(3, dtype=D),), lambda x: -torch.linalg.vector_norm(_B @ x) + 0.1 * x[0], True),
}


@pytest.mark.parametrize("xs, f, stationary", BALLS.values(), ids=BALLS.keys())
def test_stationarity_of_one_norm_at_zero(xs, f, stationary):
    cert = gw.stationarity(f, xs if len(xs) > 1 else xs[0])
    ref = _nearby_least_norm(f, xs)  # (an upper bound, within ~1e-3 in 3-d)
    assert cert.stationary is stationary
    assert ref - 2e-3 <= cert.lower_bound <= cert.min_norm <= ref + 1e-9
    if not stationary:
        assert cert.min_norm - cert.lower_bound < 1e-6


# A comparison whose argument moves at order 3 to 6 along d kept the tie's value (a documented limit): |x| written
# as where(x ** k > 0, x, -x) got slope -1 along +1 (SILENT, f continuous)
HIGHER = {
    "x^3": lambda v: torch.where(v[0] ** 3 > 0, v[0], -v[0]),
    "x^4 (even)": lambda v: torch.where(v[0] ** 4 > 0, v[0], -v[0]),
    "x^5 - y^5 vs 0": lambda v: torch.where(v[0] ** 5 - v[1] ** 5 > 0, v[0], v[1]),
    "max of x^3 switch": lambda v: torch.maximum(torch.where(v[0] ** 3 > 0, v[0], -v[0]), v[1]),
    "sum x^3 > 0": lambda v: torch.where((v ** 3).sum() > 0, v.sum(), -v.sum()),
    "sin(x)^3 > 0": lambda v: torch.where(torch.sin(v[0]) ** 3 > 0, v[0], -v[0]),
    "sign(x^3) * x": lambda v: torch.sign(v[0] ** 3) * v[0],
    "saturated clamp keeps": lambda v: torch.where(torch.clamp(v[0] - 1, min=0) > 0, v[1], -v[1]),
}


@pytest.mark.parametrize("d", DIRS, ids=["d0", "d1", "d2"])
@pytest.mark.parametrize("f", HIGHER.values(), ids=HIGHER.keys())
def test_comparison_moving_at_higher_order(f, d):
    assert float(gw.directional_derivative(f, X, d)) == pytest.approx(one_sided(f, X, d), abs=1e-6)


def test_step_of_a_cube_jumps():
    """sign(x ** 3) jumps at 0: it said 0 (the tie kept sign(0) = 0)."""
    with pytest.raises(NonsmoothError, match="jumps"):
        gw.directional_derivative(lambda v: torch.sign(v[0] ** 3), X, DIRS[0])


class _MaxSplit(torch.autograd.Function):
    """max(x) with 1/2 to each tied element (no jvp): at a 3-way tie (1/2, 1/2, 1/2) sums to 1.5, outside the
    Clarke subdifferential (the simplex), yet it equals the central differences."""

    @staticmethod
    def forward(ctx, x):
        m = x.max()
        ctx.save_for_backward(x, m)
        return m

    @staticmethod
    def backward(ctx, g):
        x, m = ctx.saved_tensors
        tied = (x == m).to(x.dtype)
        return g * tied / 2 if tied.sum() > 1 else g * tied


@pytest.mark.parametrize("f, x, passes", [
    (lambda v: _MaxSplit.apply(v), torch.zeros(3, dtype=D), False),  # was: passed (SILENT)
    (lambda v: _MaxSplit.apply(v), torch.tensor([0.0, 1.0, 2.0], dtype=D), True),
    (lambda v: 2000 * (v ** 2).sum() + torch.sin(v).sum(), torch.zeros(3, dtype=D), True),  # curvature, no kink
], ids=["hidden-3-tie", "hidden-no-tie", "high-curvature"])
def test_gradcheck_at_a_kink_it_cannot_see(f, x, passes):
    """Where PyTorch's gradcheck passed (central differences) gw.gradcheck passed, even at a kink hidden in a
    custom Function where the backward is no generalized gradient. One-sided differences (confirmed at a 10x
    smaller step) now show the kink: not shown to be a generalized gradient, no pass."""
    with torch.no_grad():
        right = [float(f(x + 1e-7 * e) - f(x)) / 1e-7 for e in torch.eye(3, dtype=D)]
        left = [float(f(x) - f(x - 1e-7 * e)) / 1e-7 for e in torch.eye(3, dtype=D)]
    assert (max(abs(r - l_) for r, l_ in zip(right, left, strict=True)) < 1e-3) is passes  # the reference
    result = gw.gradcheck(f, x, raise_exception=False)
    assert result.passed is passes
    if not passes:
        assert "cannot see" in str(result)


def test_setitem_remembered_smooth_only_for_its_signature():
    """A float `b[idx] = x` reaches index_put_ (no kink op), so Tensor.__setitem__ was remembered smooth for every
    call: a later `b[:] = x` into an int32 b (a cast, jumping at -3) gave slope 1 where f jumps (SILENT, order-
    dependent: test_nonsmooth's 'setitem int' failed after other tests in one process)."""
    def scatter(x):
        b = torch.zeros(2, dtype=D)
        b[torch.tensor([0, 1])] = x
        return b.sum()

    def into_int(x):
        b = torch.zeros(x.shape, dtype=torch.int32)
        b[:] = x
        return b.double().sum() + x.sum()

    assert float(gw.directional_derivative(scatter, torch.ones(2, dtype=D), torch.ones(2, dtype=D))) == 2.0
    x, d = torch.tensor([-3.0], dtype=D), torch.ones(1, dtype=D)
    with torch.no_grad():  # the reference: f jumps (int32(-3 + t) = -2)
        assert float(into_int(x + 1e-9 * d) - into_int(x)) > 0.5
    with pytest.raises(NonsmoothError):
        gw.directional_derivative(into_int, x, d)


@pytest.mark.parametrize("f, x, passes", [
    # a visible kink 1e-8 from x, on both sides: f is flat on [-1e-8, 1e-8], PyTorch's 0 is its gradient
    (lambda v: (v - 1e-8).abs().sum() + (v + 1e-8).abs().sum(), torch.zeros(2, dtype=D), True),
    (lambda v: torch.sqrt(v ** 2 + 1e-16).sum(), torch.zeros(2, dtype=D), True),  # smooth, curved at scale 1e-8
    (lambda v: 1e3 + _MaxSplit.apply(v), torch.ones(3, dtype=D), False),  # the hidden 3-way tie, off 0
    # even, curved at scale 1e-8 (its gap still grows at 1e-7, then shrinks 10x a step: no kink)
    (lambda v: torch.cos(1e8 * v).sum(), torch.zeros(2, dtype=D), True),
], ids=["kinks-1e-8-away", "smooth-abs-1e-8", "hidden-3-tie-at-1", "cos(1e8 x)"])
def test_gradcheck_tells_a_kink_at_x_from_one_within_the_step(f, x, passes):
    """The hidden-kink check compared one-sided differences at eps and eps / 10 only: a feature within 1e-7 of x
    (a visible kink 1e-8 away, a smooth |x| of width 1e-8) kept its gap there, so gw.gradcheck failed where
    PyTorch's check and the base passed, saying "no kink op gradwise sees" of a visible abs. A kink at x keeps its
    gap at every smaller step; these lose it below 1e-8. Reference: one-sided differences at steps 1e-11 and
    1e-12, far under the features' scale."""
    with torch.no_grad():
        gaps = [max(abs(float(f(x + h * e) - 2 * f(x) + f(x - h * e))) / h for e in torch.eye(3 if x.numel() == 3
                    else 2, dtype=D)) for h in (1e-11, 1e-12)]
    assert (gaps[1] < max(1e-2, gaps[0] / 5)) is passes, gaps  # (a kink's gap stays; curvature's shrinks 10x)
    assert torch.autograd.gradcheck(lambda v: f(v), (x.clone().requires_grad_(True),))  # central differences pass
    result = gw.gradcheck(f, x, raise_exception=False, nearby=0)  # (cos(1e8 x) fails PyTorch's check nearby)
    assert result.passed is passes, str(result)


@pytest.mark.parametrize("k", [0.3, 0.7, 1.1, 0.13])
def test_higher_orders_after_a_rounding_noise_second_order(k):
    """s = variance(v) + (v0 - 1)³ at v = (1, 1, 1) along the constant shift k (1, 1, 1): the variance is 0 along
    it, so s moves at third order (0.027 t³ for k = 0.3) and where(s > 0, A, B) takes A. The variance's s'' is
    rounding noise in one of the two runs (along d and 0.7 d); counted as found, it stopped the higher orders there,
    the third order was dropped, and the tie kept its value: slope -0.9 where f's is 0.9 (SILENT)."""
    x, d = torch.ones(3, dtype=D), torch.full((3,), k, dtype=D)

    def f(v):
        s = (v * v).mean() - v.mean() ** 2 + (v[0] - 1) ** 3
        return torch.where(s > 0, v.sum(), -v.sum() + 6)

    with torch.no_grad():  # (f is B at the tie, A just past it: continuous, slope of A)
        slopes = [float(f(x + h * d) - f(x)) / h for h in (1e-2, 1e-3)]
    assert slopes == pytest.approx([3 * k] * 2, abs=1e-9)
    assert float(gw.directional_derivative(f, x, d)) == pytest.approx(slopes[-1], abs=1e-9)
