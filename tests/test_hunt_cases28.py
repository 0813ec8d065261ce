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


# -- logaddexp's weight of a -inf argument -------------------------------------------------------------------
# pytorch/pytorch#49724: logaddexp is logsumexp of two, and ((-inf (+) -inf) (+) x) gave NaN gradients where
# logsumexp's gave 0. Under strong zeros logsumexp's exp(x - result) of a -inf entry is a structural zero (the
# entry contributes nothing), but logaddexp's formula g / (1 + exp(b - a)) divides by +inf there: an ordinary 0,
# which then met the NaN of the inner logaddexp(-inf, -inf) (the program without those entries has no NaN).

INF = float("inf")


@pytest.mark.parametrize("op", [torch.logaddexp, torch.logaddexp2])
@pytest.mark.parametrize("outer_first", [True, False])
def test_a_minus_inf_argument_of_logaddexp_is_weightless(op, outer_first):
    x = torch.tensor([0.3, -1.0], dtype=D, requires_grad=True)
    z = torch.tensor([[-INF, -INF], [-INF, -INF]], dtype=D, requires_grad=True)
    f = (lambda: op(x, op(z[0], z[1])).sum()) if outer_first else (lambda: op(op(z[0], z[1]), x).sum())
    assert torch.autograd.grad(f(), z)[0].isnan().all()  # PyTorch
    gx, gz = gw.grad(f(), [x, z])
    assert torch.equal(gz, torch.zeros_like(z))  # the program without the -inf entries: op(x) = x
    assert torch.equal(gx, torch.ones_like(x))
    same = torch.logsumexp(torch.stack([x, torch.logsumexp(z, 0)]), 0).sum()  # logsumexp's answer agrees
    assert torch.equal(gw.grad(same, [z])[0], gz)


def test_hmm_forward_with_unreachable_states():
    """A log-space forward algorithm (HMM / CRF) with logaddexp over previous states: state 1 is unreachable
    (its scores stay -inf), state 2 has no incoming transition. Reference: the recursion over state 0 alone."""
    log_a = torch.tensor([[0.0, -INF, -INF], [-0.5, -1.0, -INF], [-INF, -INF, -INF]], dtype=D)
    em = (torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=D) * 0.3).requires_grad_(True)

    def forward(em):
        a = torch.tensor([0.0, -INF, -INF], dtype=D) + em[0]
        for t in range(1, 4):
            nxt = []
            for j in range(3):
                v = a[0] + log_a[0, j]
                for i in (1, 2):
                    v = torch.logaddexp(v, a[i] + log_a[i, j])
                nxt.append(v)
            a = torch.stack(nxt) + em[t]
        return a[0]

    assert torch.autograd.grad(forward(em), em)[0].isnan().any()  # PyTorch
    (got,) = gw.grad(forward(em), em)
    e = em.detach().clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(sum(e[t, 0] for t in range(4)), e)  # state 0 alone: a_t = a_{t-1} + em[t, 0]
    assert torch.equal(got, ref)


def test_an_overflowing_finite_weight_keeps_pytorchs_nan():
    """logaddexp(x, y) with y = -1000 finite: y's weight 1 / (1 + exp(1000.3)) overflows to 0 and meets sqrt's
    infinite derivative at 0. Neither argument is -inf, so nothing is structural: PyTorch's NaN stays."""
    x = torch.tensor(0.3, dtype=D, requires_grad=True)
    z = torch.tensor(0.0, dtype=D, requires_grad=True)
    f = lambda: torch.logaddexp(x, torch.sqrt(z) - 1000.0)
    (t,) = torch.autograd.grad(f(), z)
    (g,) = gw.grad(f(), z)
    assert t.isnan() and g.isnan()


def test_logaddexp_on_finite_data_is_pytorchs_bitwise():
    gen = torch.Generator().manual_seed(3)
    a, b = (torch.randn(5, 3, generator=gen, dtype=torch.float32).requires_grad_(True) for _ in range(2))
    f = lambda: (torch.logaddexp(a, b * 3) * torch.arange(3.0)).sum() + torch.logaddexp2(a[:, :1], b).sum()
    assert all(torch.equal(p, q) for p, q in zip(gw.grad(f(), [a, b]), torch.autograd.grad(f(), [a, b]),
                                                  strict=True))


# -- grid_sample at pixel centres and clipped borders -----------------------------------------------------------
# pytorch/pytorch#81868 and #23925: an identity grid (zero displacement in image registration) puts every sample on
# a pixel centre, where bilinear sampling has a kink in the grid; border padding clips at the edges. PyTorch's
# grid_sampler_2d has no forward-mode derivative: every nonsmooth call refused ('no forward-mode derivative').

_GEN = torch.Generator().manual_seed(5)
_IMAGES = {True: torch.randn(2, 3, 5, 5, generator=_GEN, dtype=D),
           False: torch.randn(2, 3, 4, 4, generator=_GEN, dtype=D)}


def _sample(image, grid, padding, align):
    return (torch.nn.functional.grid_sample(image, grid, mode="bilinear", padding_mode=padding,
                                            align_corners=align) * torch.arange(1.0, 4.0, dtype=D).view(1, 3, 1, 1)
            ).sum()


def _pixel_grid(align):
    """Grid points exactly on pixel centres, the border pixels among them (sizes with exact normalised
    coordinates: 5 pixels with align_corners, 4 without)."""
    xs, ys = (torch.tensor([0.0, 1.0, 4.0]), torch.tensor([0.0, 2.0, 3.0])) if align else \
        (torch.tensor([0.0, 1.0, 3.0]), torch.tensor([0.0, 2.0, 3.0]))
    g = (lambda v: v / 2 - 1) if align else (lambda v: (2 * v + 1) / 4 - 1)
    grid = torch.stack(torch.meshgrid(g(xs.to(D)), g(ys.to(D)), indexing="xy"), -1)
    return grid.unsqueeze(0).expand(2, -1, -1, -1).clone()


@pytest.mark.parametrize("padding", ["zeros", "border"])
@pytest.mark.parametrize("align", [True, False])
def test_grid_sample_on_pixel_centres_has_one_sided_derivatives(padding, align):
    grid = _pixel_grid(align)
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        dg = torch.randn(grid.shape, generator=gen, dtype=D)
        image = _IMAGES[align]
        di = torch.randn(image.shape, generator=gen, dtype=D)
        f = lambda image, grid: _sample(image, grid, padding, align)
        ref = one_sided(f, [image, grid], [di, dg])
        got = float(gw.directional_derivative(f, (image, grid), (di, dg)))
        richardson = (10 * ref[1] - ref[0]) / 9  # the image and grid directions together are bilinear: O(t) error
        assert abs(got - richardson) < 1e-6 * max(1.0, abs(got)), (got, ref)


@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_grid_sample_generalized_gradient_is_a_cells_gradient_and_pytorchs_off_the_kinks(padding):
    """On the kinks: each grid point's generalized gradient is the gradient of one of the cells around it (a
    gradient at a point pushed into that cell); off them: torch.autograd.grad, bit for bit."""
    grid = _pixel_grid(True)
    f = lambda grid: _sample(_IMAGES[True], grid, padding, True)
    for seed in (0, 1):
        (g,) = gw.generalized_grad(f, (grid,), seed=seed)
        cells = []
        for sx in (-1, 1):
            for sy in (-1, 1):
                push = torch.tensor([sx, sy], dtype=D) * 1e-7
                x = (grid + push).requires_grad_(True)
                cells.append(torch.autograd.grad(f(x), x)[0])
        per_point = torch.stack(cells)  # (4, n, h, w, 2)
        close = ((per_point - g).abs().amax(-1) < 1e-5).any(0)
        assert close.all()
    off = (grid + 0.0123).requires_grad_(True)
    assert torch.equal(gw.generalized_grad(f, (off.detach(),))[0], torch.autograd.grad(f(off), off)[0])


def test_grid_sample_stationarity_at_a_local_maximum():
    """A pixel brighter than its four neighbours is a local maximum of the sampled value: Clarke stationary."""
    img = torch.tensor([[[[0.0, 1.0, 4.0], [2.0, 5.0, 3.0], [1.0, 0.0, 2.0]]]], dtype=D)
    f = lambda g: torch.nn.functional.grid_sample(img, g.reshape(1, 1, 1, 2), align_corners=True).sum()
    assert gw.stationarity(f, torch.zeros(2, dtype=D)).stationary is True
    assert gw.stationarity(f, torch.tensor([0.5, 0.0], dtype=D)).stationary is False


def test_grid_sample_modes_without_a_rule_still_refuse():
    grid = _pixel_grid(True)
    f = lambda grid: torch.nn.functional.grid_sample(_IMAGES[True], grid, mode="nearest", align_corners=True).sum()
    with pytest.raises(NonsmoothError):
        gw.directional_derivative(f, (grid,), (torch.ones_like(grid),))
