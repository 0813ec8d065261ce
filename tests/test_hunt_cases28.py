"""Hunt round 5 on cases modelled on public reports (tests/reported/*_round5.py): bucket indices at their knots.

Piecewise-linear interpolation through knots (``torch.searchsorted`` / ``torch.bucketize`` for the segment, a
gather and a lerp: torchinterp1d, xitorch, every hand-written ``interp1d``) is continuous, but at a knot the index
jumps. gradwise had no kink rule for either op and refused (NonsmoothError "no kink rule"). References: float64
one-sided differences at several steps (converging, or not: a jump).
"""
from __future__ import annotations

import pytest
import torch

import gradwise as gw
from gradwise import NonsmoothError

D = torch.float64
STEPS = (1e-6, 1e-7)


def one_sided(f, xs, ds):
    with torch.no_grad():
        f0 = f(*xs)
        return [float((f(*[x + t * d for x, d in zip(xs, ds, strict=True)]) - f0) / t) for t in STEPS]


def _interp(knots, values, x, how):
    n = knots.shape[-1]
    if how == "searchsorted":
        i = torch.searchsorted(knots, x) - 1
    elif how == "searchsorted-right":
        i = torch.searchsorted(knots, x, right=True) - 1
    elif how == "side-right-sorter":
        perm = torch.arange(n - 1, -1, -1)
        i = torch.searchsorted(knots.flip(-1), x, side="right", sorter=perm) - 1
    elif how == "bucketize":
        i = torch.bucketize(x, knots) - 1
    elif how == "bucketize-right-int32":
        i = torch.bucketize(x, knots, right=True, out_int32=True).long() - 1
    i = i.clamp(0, n - 2)
    take = (lambda t, j: t.gather(-1, j)) if knots.dim() > 1 else (lambda t, j: t[j])
    k0, k1, v0, v1 = take(knots, i), take(knots, i + 1), take(values, i), take(values, i + 1)
    return torch.lerp(v0, v1, (x - k0) / (k1 - k0)).sum()


HOWS = ["searchsorted", "searchsorted-right", "side-right-sorter", "bucketize", "bucketize-right-int32"]
KNOTS, VALUES = [0.0, 1.0, 2.0, 3.0], [0.0, 2.0, 1.0, 3.0]


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("d", [[1.0, 0.0], [-1.0, 0.0], [-1.0, 1.0], [0.3, -0.2]])
def test_interpolation_at_a_knot_has_the_entered_segments_slope(how, d):
    """x0 = 1 is a knot (slope 2 on the left, -1 on the right), x1 = 2.5 inside a segment."""
    knots, values = torch.tensor(KNOTS, dtype=D), torch.tensor(VALUES, dtype=D)
    x, dx = torch.tensor([1.0, 2.5], dtype=D), torch.tensor(d, dtype=D)
    f = lambda x: _interp(knots, values, x, how)
    ref = one_sided(f, [x], [dx])
    got = float(gw.directional_derivative(f, (x,), (dx,)))
    assert all(abs(got - r) < 1e-5 for r in ref), (got, ref)


def test_learnable_knots_moving_onto_x_and_a_scalar_query():
    """The knots move (a learnable grid) while x stays: the tie is broken by the knots' tangents; searchsorted's
    Scalar overload (a Python float query) too."""
    values = torch.tensor(VALUES, dtype=D)

    def f(knots):
        i = (torch.searchsorted(knots, 1.0) - 1).clamp(0, 2)
        j = (torch.searchsorted(knots, torch.tensor([1.0, 2.5], dtype=D)) - 1).clamp(0, 2)
        w = (1.0 - knots[i]) / (knots[i + 1] - knots[i])
        u = (torch.tensor([1.0, 2.5], dtype=D) - knots[j]) / (knots[j + 1] - knots[j])
        return torch.lerp(values[i], values[i + 1], w) + torch.lerp(values[j], values[j + 1], u).sum()

    k = torch.tensor(KNOTS, dtype=D)
    for d in ([0.0, 1.0, 0.0, 0.0], [0.0, -1.0, 0.0, 0.0], [0.1, 0.5, -0.3, 0.2]):
        dk = torch.tensor(d, dtype=D)
        ref = one_sided(f, [k], [dk])
        got = float(gw.directional_derivative(f, (k,), (dk,)))
        assert all(abs(got - r) < 1e-5 for r in ref), (d, got, ref)


def test_batched_sequences_and_generalized_gradient():
    """2-D sorted sequences (one row of knots per query row); the generalized gradient is one of the two slopes."""
    knots = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.5, 1.0]], dtype=D)
    values = torch.tensor([[0.0, 2.0, 1.0], [1.0, 0.0, 1.0]], dtype=D)
    f = lambda x: _interp(knots, values, x, "searchsorted")
    x = torch.tensor([[1.0], [0.5]], dtype=D)
    for d in ([[1.0], [0.0]], [[-1.0], [1.0]], [[-1.0], [-1.0]]):
        dx = torch.tensor(d, dtype=D)
        ref = one_sided(f, [x], [dx])
        got = float(gw.directional_derivative(f, (x,), (dx,)))
        assert all(abs(got - r) < 1e-5 for r in ref), (d, got, ref)
    g = gw.generalized_grad(f, (x,), seed=0)[0].reshape(-1).tolist()
    assert g[0] in (2.0, -1.0) and g[1] in (-2.0, 2.0)


def test_a_jump_through_the_index_is_still_an_error():
    """The bucket index itself in f (a histogram-like step): f jumps at a knot, no one-sided derivative."""
    knots = torch.tensor(KNOTS, dtype=D)
    f = lambda x: (torch.searchsorted(knots, x).to(D) + x).sum()
    x = torch.tensor([1.0], dtype=D)
    with pytest.raises(NonsmoothError, match="jumps"):
        gw.directional_derivative(f, (x,), (torch.tensor([1.0], dtype=D),))
    # away from the knots: the op's own output, derivative 1
    assert float(gw.directional_derivative(f, (x + 0.5,), (torch.tensor([1.0], dtype=D),))) == 1.0
