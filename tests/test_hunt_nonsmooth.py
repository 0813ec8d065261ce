"""Hunt for defects in the nonsmooth calculus: regressions found by checking against float64 one-sided
differences and gradients at nearby differentiable points."""
from __future__ import annotations

import pytest
import torch

import gradwise as gw

D = torch.float64
W = torch.tensor([0.3, -1.2, 0.7], dtype=D)


def one_sided(f, xs, ds, h=1e-7):
    """Forward difference (f(x + h d) - f(x)) / h in float64: the reference for f'(x; d)."""
    with torch.no_grad():
        return float((f(*[x + h * d for x, d in zip(xs, ds, strict=True)]) - f(*xs)) / h)


def nearby_gradients(f, xs, n=64, radius=1e-6, seed=0):
    """Gradients at random differentiable points next to x: the active pieces' gradients."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ys = [(x + radius * torch.randn(x.shape, generator=gen, dtype=x.dtype)).requires_grad_(True) for x in xs]
        out.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(f(*ys), ys)]))
    return torch.stack(out)


# an upper bound given only as a tensor: clamp(max=hi), clamp_max, clip(max=hi), and their in-place forms
UPPER_ONLY = {
    "clamp(max=hi)": lambda x, hi: x.clamp(max=hi),
    "torch.clamp(x, None, hi)": lambda x, hi: torch.clamp(x, None, hi),
    "clamp_max": lambda x, hi: torch.clamp_max(x, hi),
    "Tensor.clamp_max_": lambda x, hi: x.clone().clamp_max_(hi),
    "clip(max=hi)": lambda x, hi: x.clip(max=hi),
}


@pytest.mark.parametrize("name", list(UPPER_ONLY))
def test_clamp_with_only_a_tensor_upper_bound_at_the_bound(name):
    """x.clamp(max=hi) with a tensor hi and no lower bound, with x touching hi: the rule looked for the lower
    bound to see where hi meets x and crashed (TypeError from torch.maximum(x, None)) in directional_derivative,
    generalized_grad and stationarity. Reference: one-sided float64 differences; nearby gradients."""
    op = UPPER_ONLY[name]
    f = lambda x, hi: (op(x, hi) * W).sum()
    xs = (torch.tensor([0.0, 1.0, 2.0], dtype=D), torch.tensor([0.0, 1.0, 1.0], dtype=D))
    for ds in [(torch.tensor([1.0, -1.0, 0.5], dtype=D), torch.tensor([-1.0, 0.0, 2.0], dtype=D)),
               (torch.tensor([-1.0, 1.0, 0.0], dtype=D), torch.tensor([0.0, 2.0, -1.0], dtype=D))]:
        got = float(gw.directional_derivative(f, xs, ds))
        assert got == pytest.approx(one_sided(f, xs, ds), abs=1e-6)
    pieces = nearby_gradients(f, xs)
    for seed in (0, 1):
        g = torch.cat([e.reshape(-1) for e in gw.generalized_grad(f, xs, seed=seed)])
        assert bool((pieces - g).norm(dim=1).min() < 1e-9)  # one of the active pieces
    # min(x, hi) - x/2 - hi/2 at x == hi: pieces (1/2, -1/2) and (-1/2, 1/2) hold 0 between them
    g = lambda x, hi: (op(x, hi) - 0.5 * x - 0.5 * hi).sum()
    assert gw.stationarity(g, (torch.tensor([1.0], dtype=D), torch.tensor([1.0], dtype=D))).stationary is True


def _penalised(x):
    """A gradient computed inside f (torch.autograd.grad with create_graph, as a gradient penalty), then kinks:
    |g| at g = 0 and relu at 0."""
    (g,) = torch.autograd.grad((x**3).sum() / 3, x, create_graph=True)  # g = x * x
    return (g.abs() + torch.relu(x)).sum()


def test_a_reverse_pass_inside_f_before_a_kink():
    """generalized_grad ranks the ties in a second pass that builds no graph; an f that takes a gradient inside
    (before its kinks) then ran torch.autograd.grad on tensors in no graph, and gradwise refused ("this pass
    follows the direction with forward-mode AD only ... take f's gradient with gw.generalized_grad", which was
    the call), on the first call of f's code or on the second (whichever ranked in a second pass). Now that pass
    builds a graph where f runs a reverse pass. Reference: the gradients at nearby differentiable points."""
    x = torch.tensor([0.0, 1.0, -2.0], dtype=D)
    pieces = nearby_gradients(_penalised, [x])
    for seed in (0, 1, 0, 1):  # (the second call of the same code takes the other route)
        g = gw.generalized_grad(_penalised, x, seed=seed)[0]
        assert bool((pieces - g).norm(dim=1).min() < 1e-5), (g, pieces[:4])
