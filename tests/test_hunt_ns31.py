"""Session 31's hunt in the nonsmooth calculus: comparisons whose argument has tangent 0 (decided by the second-order
tangent s'' = dᵀ(∇²s)d) through every public entry point, and custom backwards that build no graph. References:
float64 one-sided differences along the direction, and the gradients of the pieces by float64 central differences
at points inside each piece, never a formula derived by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import gradwise as gw
from gradwise import NonsmoothError
from gradwise._nonsmooth._engine import _random_direction, kinks_hit

D = torch.float64
ORIGIN = (torch.zeros((), dtype=D), torch.zeros((), dtype=D))


def one_sided(f, xs, ds, s=1e-7):
    with torch.no_grad():
        return float(f(*[x + s * d for x, d in zip(xs, ds, strict=True)]) - f(*xs)) / s


def piece_gradients(f, n=64, r=1e-3, h=1e-7) -> list[np.ndarray]:
    """The gradients of f's pieces near 0 (f of two scalars): float64 central differences at random points of
    radius r (off the boundaries between pieces, almost surely), distinct ones."""
    gen, found = torch.Generator().manual_seed(1), []
    with torch.no_grad():
        for _ in range(n):
            p = torch.randn(2, generator=gen, dtype=D) * r
            g = np.array([float(f(*(p + h * e)) - f(*(p - h * e))) / (2 * h) for e in torch.eye(2, dtype=D)])
            if all(np.abs(g - q).max() > 1e-5 for q in found):
                found.append(g)
    return found


def least_norm(points: list[np.ndarray]) -> float:
    """Distance from 0 to the hull of ``points`` (SciPy NNLS, as in the docs' least-norm problem)."""
    from scipy.optimize import nnls

    g = np.stack(points)
    a = np.vstack([g.T, np.ones((1, len(g)))])
    b = np.zeros(a.shape[0])
    b[-1] = 1.0
    mu = nnls(a, b)[0]
    return float(np.linalg.norm((mu / mu.sum()) @ g))


def _linf(x, y):  # max(|x|, |y|), the branch chosen by a comparison of squares: s = x² - y², gradient 0 at 0
    return torch.where(x * x > y * y, x.abs(), y.abs())


# f continuous, piecewise linear at 0, with a comparison whose argument s has gradient 0 there: its sides are the
# cones {dᵀ(∇²s)d > 0} and {< 0}, not half-spaces
SECOND_ORDER_PROGRAMS = {
    "max(|x|,|y|) by where": _linf,
    "max(|x|,|y|) + y/2": lambda x, y: _linf(x, y) + 0.5 * y,
    "-max(|x|,|y|) + y/2": lambda x, y: -_linf(x, y) + 0.5 * y,
    "max(|x|,|y|) + 1.5 y": lambda x, y: _linf(x, y) + 1.5 * y,
    "max(|x|,|y|) + 0.9 (x + y)": lambda x, y: _linf(x, y) + 0.9 * (x + y),
    "where(x*x >= y*y, |x| + y, |y| + y)": lambda x, y: torch.where(x * x - y * y >= 0, x.abs() + y, y.abs() + y),
    "where(y + x**2 > 0, x, -x) + y": lambda x, y: torch.where(y + x**2 > 0, x, -x) + y,
    # s definite: one side alone is active (the enumeration stays exact)
    "where(x*x + y*y > 0, x, 0)": lambda x, y: torch.where(x * x + y * y > 0, x, 0 * x),
    "where(-x*x - y*y > 0, 0, x) + y/2": lambda x, y: torch.where(-x * x - y * y > 0, 0 * x, x) + 0.5 * y,
    "where(x*x + y*y == 0, 0, x)": lambda x, y: torch.where(x * x + y * y == 0, 0 * x, x),
}
DEFINITE = {"where(x*x + y*y > 0, x, 0)", "where(-x*x - y*y > 0, 0, x) + y/2", "where(x*x + y*y == 0, 0, x)"}
DIRECTIONS = [(1.0, 0.0), (-1.0, 0.0), (0.0, 1.0), (0.0, -1.0), (1.0, 0.5), (0.5, -1.0), (-0.3, 0.8)]


@pytest.mark.parametrize("name", SECOND_ORDER_PROGRAMS)
def test_stationarity_with_a_second_order_comparison_matches_the_pieces(name):
    """The exact enumeration kept one side of a comparison whose argument has gradient 0 (the two candidates s and
    0 had the same gradient, so "the same piece to first order"), dropping the pieces on the other side:
    max(|x|,|y|) + y/2 at 0 (convex, minimum at 0) had 2 of its 4 pieces and was proved *not* stationary
    (exact=True, min_norm 0.5 for 0), silently; -max(|x|,|y|) + y/2 too; where(-x*x - y*y > 0, 0, x) + y/2 (s < 0
    near 0: the piece x + y/2) got the other side's piece (0, 0.5), proved False with min_norm 0.5 for 1.118. Now
    the side of a definite s is the only piece (exact), and an indefinite s is sampled: the pieces found are
    pieces of f, and the verdict never contradicts the pieces' hull."""
    f = SECOND_ORDER_PROGRAMS[name]
    pieces = piece_gradients(f)
    truth = least_norm(pieces)
    sd = gw.subdifferential(f, ORIGIN)
    for e in sd.elements:  # every element is a piece's gradient
        v = np.array([float(t) for t in e])
        assert min(np.abs(v - q).max() for q in pieces) < 1e-6, (v, pieces)
    if sd.exact:
        assert len(sd.elements) == len(pieces)
    assert sd.exact == (name in DEFINITE or "y + x**2" in name)  # (s = y + x²: gradient (0, 1), half-spaces)
    cert = gw.stationarity(f, ORIGIN)
    if truth < 1e-9:
        assert cert.stationary is True
    else:
        assert cert.stationary in (False, None)
        assert cert.min_norm >= truth - 1e-9 and cert.lower_bound <= truth + 1e-9


@pytest.mark.parametrize("name", SECOND_ORDER_PROGRAMS)
def test_second_order_comparison_agrees_across_entry_points(name):
    """directional_derivative along d is f's one-sided difference; generalized_grad is a piece's gradient and its
    slope along its own direction is f'(x; d); gradcheck passes where PyTorch's gradient (the tie's convention)
    is one of the pieces' (and in their hull), and says no where it is not in the hull."""
    f = SECOND_ORDER_PROGRAMS[name]
    pieces = piece_gradients(f)
    for d in DIRECTIONS:
        ds = tuple(torch.tensor(v, dtype=D) for v in d)
        assert float(gw.directional_derivative(f, ORIGIN, ds)) == pytest.approx(one_sided(f, ORIGIN, ds), abs=1e-6)
    for seed in range(4):
        g = np.array([float(t) for t in gw.generalized_grad(f, ORIGIN, seed=seed)])
        assert min(np.abs(g - q).max() for q in pieces) < 1e-6
        d = _random_direction(ORIGIN, seed)[0]
        assert float(g @ np.array([float(v) for v in d])) == pytest.approx(one_sided(f, ORIGIN, d), abs=1e-5)
    xs = tuple(x.clone().requires_grad_(True) for x in ORIGIN)
    torch_grad = np.array([0.0 if g is None else float(g) for g in torch.autograd.grad(f(*xs), xs, allow_unused=True)])
    if least_norm([q - torch_grad for q in pieces]) < 1e-9:
        assert gw.gradcheck(f, ORIGIN)
    elif len(pieces) <= 2:  # (a segment's hull: not on it is not in it)
        assert not gw.gradcheck(f, ORIGIN, raise_exception=False).passed


def test_a_comparison_decided_at_third_order_is_not_proved_non_stationary():
    """where(x³ > y³, x, y) is max(x, y); minus (x + y)/2 it is |x - y|/2, minimal at 0. s = x³ - y³ has gradient
    and Hessian 0 there: the enumeration kept one side and proved 'not stationary' (exact, min_norm 0.71), silently.
    Now sampled: the side is a third-order question (a known limit of generalized_grad, which keeps the tie value),
    so the verdict may be undecided, never False."""
    f = lambda x, y: torch.where(x**3 > y**3, x, y) - 0.5 * x - 0.5 * y
    assert least_norm(piece_gradients(f)) < 1e-9
    cert = gw.stationarity(f, ORIGIN)
    assert cert.stationary is not False and not cert.exact


def test_kinks_hit_follows_the_second_order_side():
    """kinks_hit along a random d ran without a graph, so a comparison whose argument has tangent 0 kept its tie
    value (False) and the relu it masks in was not reported; generalized_grad's pass takes the side of s''."""
    def f(v):
        s = v[0] * v[0] - v[1] * v[1]
        return torch.relu(v[2:3][(s > 0).reshape(1)]).sum() + v.sum()

    v = torch.zeros(3, dtype=D)
    for seed in range(6):
        d = _random_direction((v,), seed)[0][0]
        ops = [k.op for k in kinks_hit(f, v, seed=seed)[0]]
        assert ("aten.relu" in ops) == bool(d[0] ** 2 > d[1] ** 2), (seed, ops)


# -- custom Functions whose backward builds no graph: s'' through them reads 0 (or misses their part) ------------


def _square(backward):
    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            ctx.save_for_forward(x)
            return x * x

        @staticmethod
        def jvp(ctx, t):
            (x,) = ctx.saved_tensors
            return 2 * x * t

    Square.backward = staticmethod(lambda ctx, g: backward(ctx.saved_tensors[0], g))
    Square.__qualname__ = Square.__name__ = f"Square_{backward.__name__}"
    return Square


def no_grad(x, g):
    with torch.no_grad():
        return 2 * x * g


def detached(x, g):
    return (2 * x * g).detach()


def numpy(x, g):
    return torch.from_numpy(np.asarray(2 * x.detach().numpy() * g.detach().numpy()))


@pytest.mark.parametrize("backward", [no_grad, detached, numpy])
@pytest.mark.parametrize("d", [(1.0, 0.5), (0.5, 1.0)])
def test_a_custom_backward_without_a_graph_refuses_the_second_order_tie(backward, d):
    """where(Sq(x) - y*y > 0, x + y, -x - y) at 0, Sq a custom x*x whose backward builds no graph: s'' read through
    it was -2 dy² (Sq's part lost), so directional_derivative along (1, 0.5) gave -1.5 where f'(0; d) = 1.5 and
    generalized_grad (-1, -1) on every seed, silently (base). Now an error naming the Function."""
    sq = _square(backward)
    f = lambda x, y: torch.where(sq.apply(x) - y * y > 0, x + y, -x - y)
    ds = tuple(torch.tensor(v, dtype=D) for v in d)
    assert abs(one_sided(f, ORIGIN, ds)) == pytest.approx(1.5)
    with pytest.raises(NonsmoothError, match=f"second-order.*{sq.__qualname__}"):
        gw.directional_derivative(f, ORIGIN, ds)
    with pytest.raises(NonsmoothError, match="second-order"):
        gw.generalized_grad(f, ORIGIN, seed=0)


def test_a_custom_backward_with_a_graph_is_exact():
    sq = _square(lambda x, g: 2 * x * g)
    f = lambda x, y: torch.where(sq.apply(x) - y * y > 0, x + y, -x - y)
    for d in DIRECTIONS:
        ds = tuple(torch.tensor(v, dtype=D) for v in d)
        assert float(gw.directional_derivative(f, ORIGIN, ds)) == pytest.approx(one_sided(f, ORIGIN, ds), abs=1e-6)


# -- p-norms with 0 < p < 1 at 0 -------------------------------------------------------------------------------

QUASI = {
    "vector_norm": lambda p: lambda v: torch.linalg.vector_norm(v, ord=p),
    "3 norm + sum": lambda p: lambda v: 3 * torch.linalg.vector_norm(v, ord=p) + v.sum(),
    "torch.norm": lambda p: lambda v: torch.norm(v, p=p),
    "rows, one at 0": lambda p: lambda v: torch.linalg.vector_norm(
        torch.stack([v, v + torch.tensor([1.0, 2.0, 3.0], dtype=D)]), ord=p, dim=1).sum(),
    "cdist, coincident": lambda p: lambda v: torch.cdist(v[None, :2], -v[None, 1:], p=p).sum(),
}


@pytest.mark.parametrize("p", [0.5, 0.3])
@pytest.mark.parametrize("name", QUASI)
def test_quasi_norm_at_zero_is_its_norm_of_the_direction(name, p):
    """||x||_p with 0 < p < 1 at a slice that is 0: the base refused ('infinite derivative; f'(x; d) does not exist
    ... Write norms with torch.linalg.vector_norm', said to a vector_norm call), yet ||td||_p = t ||d||_p: the
    one-sided derivative exists (5.83 along (1, 2, 0) for p = 0.5). Now exact; a generalized gradient (none exists:
    the slope is unbounded near 0) refuses, naming the op."""
    f, x = QUASI[name](p), torch.zeros(3, dtype=D)
    for d in ([1.0, 0.0, 0.0], [1.0, 2.0, 0.0], [-1.0, 2.0, 0.5]):
        d = torch.tensor(d, dtype=D)
        ref = [one_sided(lambda v: f(v), (x,), (d,), s) for s in (1e-6, 1e-8)]
        assert ref[0] == pytest.approx(ref[1], rel=1e-4)  # (converged: no infinite slope along d)
        assert float(gw.directional_derivative(f, x, d)) == pytest.approx(ref[1], rel=1e-6)
    with pytest.raises(NonsmoothError, match=r"vector_norm.*Lipschitz"):
        gw.generalized_grad(f, x, seed=0)


def test_quasi_norm_with_some_entries_at_zero_says_why():
    """Some entries of the slice at 0, others not: the slope in them is infinite (f(x + t e_1) - f(x) ~ 2 sqrt(t));
    the error says so (the base said 'use torch.linalg.vector_norm' to a vector_norm call)."""
    f, x = (lambda v: torch.linalg.vector_norm(v, ord=0.5)), torch.tensor([1.0, 0.0, 0.0], dtype=D)
    d = torch.tensor([0.0, 1.0, 0.0], dtype=D)
    assert one_sided(f, (x,), (d,), 1e-8) > 50 * one_sided(f, (x,), (d,), 1e-4)  # diverges as t -> 0
    with pytest.raises(NonsmoothError, match=r"vector_norm .* ord 0.5 < 1 .* 2 entries are 0 .* infinite"):
        gw.directional_derivative(f, x, d)


# -- directional_derivative along a ray that leaves a comparison's argument on its tie ------------------------------

RAY_PROGRAMS = {
    "where(x0 > 0, x1, -x1)": lambda x: torch.where(x[0] > 0, x[1], -x[1]),
    "where(x0 >= 0, x1, -x1)": lambda x: torch.where(x[0] >= 0, x[1], -x[1]),
    "where(x0 == 0, x1, -x1)": lambda x: torch.where(x[0] == 0, x[1], -x[1]),
    "where(relu(x0) > 0, x1, -x1)": lambda x: torch.where(torch.relu(x[0]) > 0, x[1], -x[1]),
    "where(x0**3 > 0, x1, -x1)": lambda x: torch.where(x[0] ** 3 > 0, x[1], -x[1]),
}


@pytest.mark.parametrize("name", RAY_PROGRAMS)
@pytest.mark.parametrize("d", [(0.0, 1.0), (0.0, -1.0)])
def test_a_comparison_the_direction_does_not_move_keeps_its_value(name, d):
    """where(x0 > 0, x1, -x1) at 0 along (0, 1): x0 stays 0, so f(x + t d) = -t and f'(x; d) = -1; the base broke the
    tie with a further random direction and returned 1, silently (f's value at x is 0 on both branches, so the
    check for jumps saw nothing). Along the ray such an element (argument's first and second tangents 0) keeps
    its value, as docs/nonsmooth.md says; generalized_grad still ranks it by further directions (a piece)."""
    f, x = RAY_PROGRAMS[name], torch.zeros(2, dtype=D)
    d = torch.tensor(d, dtype=D)
    assert float(gw.directional_derivative(f, x, d)) == pytest.approx(one_sided(f, (x,), (d,)), abs=1e-6)


@pytest.mark.parametrize("mask", [lambda v: v[0] > 0, lambda v: v[0] * v[0] - v[1] * v[1] > 0],
                         ids=["first order", "second order"])
def test_generalized_grad_sees_a_kink_that_only_the_comparison_side_reaches(mask):
    """w = v2 selected where the comparison holds; relu(w) - relu(-w) (the identity) there, 3 v2 elsewhere. At 0 the
    relu ties exist only on the side the comparison takes, after the tangent-free pass's last tie, whose tangents
    the full pass dropped: relu'(0) = 0 gave (0, 0, 0), outside the subdifferential's hull of (0, 0, 1) and
    (0, 0, 3), silently (base too; gradcheck blamed the backward). Now the piece along the direction."""
    def f(v):
        m = mask(v).reshape(1)
        w = v[2:3][m]
        return (torch.relu(w) - torch.relu(-w)).sum() + (3 * v[2:3][~m]).sum()

    v = torch.zeros(3, dtype=D)
    for seed in range(4):
        g = gw.generalized_grad(f, v, seed=seed)[0]
        d = _random_direction((v,), seed)[0][0]
        assert float(g @ d) == pytest.approx(one_sided(f, (v,), (d,)), abs=1e-6)
