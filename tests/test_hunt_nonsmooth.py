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


# -- session 30: kinks of ops people train with, at their ties / bounds / switch points ---------------------------

import torch.nn.functional as F  # noqa: E402

_G = torch.Generator().manual_seed(7)
_POOL = torch.tensor([[[[1.0, 1, 0, 2], [1, 0, 2, 2], [3, 3, 1, 1], [3, 0, 1, 1]]]], dtype=D)  # tied windows
_TIES = torch.tensor([1.0, 3, 3, 0, 3, 1, 2, 2], dtype=D)
_LO, _HI = torch.tensor([1.0, 2, 3, -1, 3, 0, 2, 1], dtype=D), torch.tensor([3.0, 3, 3, 0, 4, 1, 2, 2], dtype=D)
_BOUNDS = torch.tensor([-1.0, 1, 0, 6, -2, 3, 0.5, -0.5], dtype=D)  # at hardtanh's, relu6's, leaky_relu's kinks
_TARGET = torch.tensor([-2.0, 0, 0, 5, -1, 3, 0, 0], dtype=D)  # |x - t| = 1, 1, 0, 1, 1, 0, .5, .5: switch points
_W = {n: torch.randn(n, generator=_G, dtype=D) for n in (3, 4, 8, 9)}

TRAINED = {  # name -> (f, x)
    "max_pool2d, tied windows": (lambda x: F.max_pool2d(x, 2).flatten() @ _W[4], _POOL),
    "max_pool2d overlapping": (lambda x: F.max_pool2d(x, 2, 1).flatten() @ _W[9], _POOL),
    "max_pool2d padding, ceil_mode": (lambda x: F.max_pool2d(x, 3, 2, padding=1, ceil_mode=True).flatten() @ _W[9],
                                      _POOL),
    "adaptive_max_pool2d(3)": (lambda x: F.adaptive_max_pool2d(x, 3).flatten() @ _W[9], _POOL),
    "adaptive_max_pool1d(3)": (lambda x: F.adaptive_max_pool1d(x.reshape(1, 4, 4), 3).sum(), _POOL),
    "topk, tied": (lambda x: torch.topk(x, 3).values @ _W[3], _TIES),
    "topk smallest, tied": (lambda x: torch.topk(x, 3, largest=False).values @ _W[3], _TIES),
    "sort, tied": (lambda x: torch.sort(x, descending=True, stable=True).values @ _W[8], _TIES),
    "kthvalue, tied": (lambda x: torch.kthvalue(x, 4).values * 1.5, _TIES),
    "clamp, tensor bounds (x at them, lo == hi)": (lambda x: torch.clamp(x, _LO, _HI) @ _W[8], _TIES),
    "clamp, moving tensor bounds": (lambda v: torch.clamp(v[:8], v[8:16], v[16:]) @ _W[8],
                                    torch.cat([_TIES, _LO, _HI])),
    "vector_norm at 0, ord 2": (lambda x: torch.linalg.vector_norm(x) + 0.3 * x[0], torch.zeros(6, dtype=D)),
    "vector_norm at 0, ord 1": (lambda x: torch.linalg.vector_norm(x, 1) + 0.3 * x[0], torch.zeros(6, dtype=D)),
    "vector_norm at 0, ord inf": (lambda x: torch.linalg.vector_norm(x, float("inf")), torch.zeros(6, dtype=D)),
    "vector_norm rows, ord 3": (lambda x: torch.linalg.vector_norm(x.reshape(3, 2), 3, dim=1) @ _W[3],
                                torch.tensor([0.0, 0, 1, 2, 0, 0], dtype=D)),
    "linalg.norm nuc at 0": (lambda x: torch.linalg.norm(x.reshape(2, 3), "nuc") + 0.2 * x[1], torch.zeros(6, dtype=D)),
    "linalg.norm ord 2 (matrix) at 0": (lambda x: torch.linalg.norm(x.reshape(2, 3), 2), torch.zeros(6, dtype=D)),
    "linalg.norm ord -1 (matrix) at 0": (lambda x: torch.linalg.norm(x.reshape(2, 3), -1), torch.zeros(6, dtype=D)),
    "hardtanh at +-1": (lambda x: F.hardtanh(x) @ _W[8], _BOUNDS),
    "relu6 at 0, 6": (lambda x: F.relu6(x) @ _W[8], _BOUNDS),
    "leaky_relu(0.2) at 0": (lambda x: F.leaky_relu(x, 0.2) @ _W[8], _BOUNDS),
    "leaky_relu(-0.5) at 0": (lambda x: F.leaky_relu(x, -0.5) @ _W[8], _BOUNDS),
    "hardswish at +-3": (lambda x: F.hardswish(3 * x) @ _W[8], _BOUNDS),
    "smooth_l1(beta=1) at its switch": (lambda x: F.smooth_l1_loss(x, _TARGET, beta=1.0), _BOUNDS),
    "smooth_l1(beta=0.5), target moving": (lambda v: F.smooth_l1_loss(v[:8], v[8:], beta=0.5, reduction="sum"),
                                           torch.cat([_BOUNDS, _TARGET])),
    "huber(delta=0.5) at its switch": (lambda x: F.huber_loss(x, _TARGET, delta=0.5), _BOUNDS),
    "smooth_l1(beta=0)": (lambda x: F.smooth_l1_loss(x, _TARGET, beta=0.0, reduction="sum"), _BOUNDS),
}


@pytest.mark.parametrize("name", list(TRAINED))
def test_kinks_of_ops_people_train_with(name):
    """Session 30's hunt (no defect found; a guard): directional_derivative against float64 one-sided
    differences along random and sign directions, and generalized_grad against PyTorch's gradient at a point a
    little way along the random direction it draws (seed): the piece that direction selects."""
    f, x = TRAINED[name]
    gen = torch.Generator().manual_seed(3)
    for k in range(3):
        d = torch.randn(x.shape, generator=gen, dtype=D)
        d = d.sign() if k == 2 else d
        assert float(gw.directional_derivative(f, x, d)) == pytest.approx(one_sided(f, [x], [d], h=1e-8), abs=1e-5)
    for seed in (0, 1):
        drawn = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=D)
        y = (x + 1e-9 * drawn).requires_grad_(True)
        torch.testing.assert_close(gw.generalized_grad(f, x, seed=seed)[0], torch.autograd.grad(f(y), y)[0],
                                   rtol=1e-5, atol=1e-6)
