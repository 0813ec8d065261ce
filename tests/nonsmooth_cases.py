"""Nonsmooth test functions from the literature, evaluated exactly at their kinks.

Each case is only a function and a point: the tests check gradwise against independent references computed
here (one-sided float64 differences, gradients sampled at nearby differentiable points), never against answers
derived by hand.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

t = lambda v: torch.tensor(v, dtype=torch.float64)


@dataclass(frozen=True)
class Case:
    name: str
    source: str
    f: Callable
    point: Callable[[], tuple[torch.Tensor, ...]]
    continuum: bool = False  # the subdifferential is not a polytope (norm at 0): checked up to sampling density


def _cheb_rosenbrock(x):
    """Nesterov's nonsmooth Chebyshev-Rosenbrock: 1/4 (x1 - 1)^2 + sum |x_{i+1} - 2 x_i^2 + 1|."""
    return 0.25 * (x[0] - 1) ** 2 + (x[1:] - 2 * x[:-1] ** 2 + 1).abs().sum()


def _cheb_rosenbrock_2(x):
    """Nesterov's second variant: 1/4 |x1 - 1| + sum |x_{i+1} - 2 |x_i| + 1| (Clarke stationary points abound)."""
    return 0.25 * (x[0] - 1).abs() + (x[1:] - 2 * x[:-1].abs() + 1).abs().sum()


def _chained_lq(x):
    """Chained LQ (Lukšan & Vlček 2000): sum max(-x_i - x_{i+1}, -x_i - x_{i+1} + x_i^2 + x_{i+1}^2 - 1)."""
    a, b = x[:-1], x[1:]
    return torch.maximum(-a - b, -a - b + a**2 + b**2 - 1).sum()


def _mifflin2(x):
    """Mifflin 2: -x1 + 2 (x1^2 + x2^2 - 1) + 1.75 |x1^2 + x2^2 - 1|; minimum -1 at (1, 0)."""
    r = x[0] ** 2 + x[1] ** 2 - 1
    return -x[0] + 2 * r + 1.75 * r.abs()


def _hinge(w, b):
    """Mean hinge loss of a linear classifier with two samples exactly on the margin."""
    xs = t([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    ys = t([1.0, -1.0, 1.0])
    return (1 - ys * (xs @ w + b)).clamp_min(0).mean()


def _relu_net_tied(w1, w2):
    """A 2-4-1 ReLU network whose hidden units 0 and 1 are exact copies, both at pre-activation 0."""
    x = t([[1.0, -1.0], [2.0, 0.5]])
    h = torch.relu(x @ w1.T)
    return (h @ w2).pow(2).mean()


def _heat_integration(t):
    """Khan & Barton 2013, Example 6.5: minimum heating and cooling of a heat exchanger network (pinch analysis,
    Duran & Grossmann 1986) as functions of the inlet/outlet temperatures t = (Tin_1, Tout_1, ..., Tin_4, Tout_4);
    stream data of their Table V as used in the authors' replication script (kamilkhanlab/nonsmooth-forward-ad,
    test/test.jl). Returns (Q^H, Q^C)."""
    fcp, delta = [8.79, 10.55, 7.62, 6.08], 10.0
    t_in, t_out = [t[2 * i] for i in range(4)], [t[2 * i + 1] for i in range(4)]
    for j in range(4):  # hot streams: subtract the minimum temperature approach
        if t_out[j] < t_in[j]:
            t_in[j], t_out[j] = t_in[j] - delta, t_out[j] - delta
    zero = torch.zeros((), dtype=t.dtype)
    q_h = zero
    for i in range(4):
        z = sum(fcp[j] * (torch.maximum(zero, t_out[j] - t_in[i]) - torch.maximum(zero, t_in[j] - t_in[i]))
                for j in range(4))
        q_h = torch.maximum(q_h, z)
    return q_h, q_h + sum(fcp[j] * (t_in[j] - t_out[j]) for j in range(4))


_HEAT_POINT = [160.0, 93.0, 170.0, 126.0, 60.0, 160.0, 116.0, 260.0]  # Table V: (Tin, Tout) of streams 1-4


def _maxpool_distinct(x):
    """Max-pool whose tied window entries are different linear functions of x (integer coefficients): the choice
    changes the gradient, unlike ties between equal pixels."""
    c = t([[[1.0, 2.0], [2.0, 1.0], [3.0, 0.0], [0.0, 3.0]], [[1.0, 1.0], [2.0, 0.0], [0.0, 2.0], [0.5, 1.5]],
           [[4.0, 0.0], [1.0, 2.0], [0.0, 1.0], [3.0, 1.0]], [[0.0, 0.0], [1.0, -1.0], [-1.0, 1.0], [2.0, -2.0]]])
    img = (c @ x).reshape(1, 1, 4, 4)  # at x = (1, 1) two windows tie between entries of different slopes
    return (F.max_pool2d(img, 2) * t([[[[1.0, -2.0], [0.5, 3.0]]]])).sum()


def _maxpool_ties(w):
    """Max-pool over an integer image scaled by w: every window has tied maxima."""
    img = t([[[[1.0, 1.0, 0.0, 2.0], [0.0, 1.0, 2.0, 2.0], [3.0, 3.0, 1.0, 0.0], [3.0, 0.0, 1.0, 1.0]]]])
    return (F.max_pool2d(img * w[0] + w[1], 2) * t([[[[1.0, -2.0], [0.5, 3.0]]]])).sum()


# Khan & Barton, "Evaluating an element of the Clarke generalized Jacobian of a composite piecewise differentiable
# function", ACM TOMS 39(4), 2013. The paper's text was not found in the sources searched; examples 6.1, 6.2, 6.3
# and 6.5 are taken from the authors' own replication script (kamilkhanlab/nonsmooth-forward-ad, test/test.jl).
# Example 6.4 was not found anywhere: the two "style" cases below stand in for it and are not from the paper.
CASES: list[Case] = [
    Case("khan-barton-6.1-abs-minus-abs", "Khan & Barton 2013, Example 6.1: |x| - |x| at 0 (identically 0)",
         lambda x: x[0].abs() - x[0].abs(), lambda: (t([0.0]),)),
    Case("khan-barton-6.1-max-minus-min", "Khan & Barton 2013, Example 6.1: max(x, 0) - min(x, 0) at 0 (= |x|)",
         lambda x: torch.maximum(x[0], t(0.0)) - torch.minimum(x[0], t(0.0)), lambda: (t([0.0]),)),
    Case("khan-barton-6.2-max-min", "Khan & Barton 2013, Example 6.2: max(min(x1, -x2), x2 - x1) at (0, 0)",
         lambda x: torch.maximum(torch.minimum(x[0], -x[1]), x[1] - x[0]), lambda: (t([0.0, 0.0]),)),
    Case("khan-barton-6.3-abs-product", "Khan & Barton 2013, Example 6.3: (1 + |x1 - x2|)(x1 - x2) at (0, 0)",
         lambda x: (1.0 + (x[0] - x[1]).abs()) * (x[0] - x[1]), lambda: (t([0.0, 0.0]),)),
    Case("khan-barton-6.5-heating", "Khan & Barton 2013, Example 6.5: minimum heating Q^H at Table V's streams",
         lambda x: _heat_integration(x)[0], lambda: (t(_HEAT_POINT),)),
    Case("khan-barton-6.5-cooling", "Khan & Barton 2013, Example 6.5: minimum cooling Q^C at Table V's streams",
         lambda x: _heat_integration(x)[1], lambda: (t(_HEAT_POINT),)),
    Case("khan-barton-style-abs-of-max", "nested abs and max at 0, Khan & Barton style (not from the paper)",
         lambda x: (torch.maximum(x[0], x[1]) - x[0].abs()).abs() + x[1], lambda: (t([0.0, 0.0]),)),
    Case("khan-barton-style-relu-chain", "relu of a kinked argument, Khan & Barton style (not from the paper)",
         lambda x: torch.relu(x[0].abs() - x[1].abs()) - 0.5 * torch.relu(x[1] - x[0]), lambda: (t([0.0, 0.0]),)),
    Case("bolte-pauwels-relu-identity", "Bolte & Pauwels 2021: relu(x) - relu(-x) = x",
         lambda x: torch.relu(x) - torch.relu(-x), lambda: (t(0.0),)),
    Case("bolte-pauwels-relu-shifted", "Bolte & Pauwels 2021: relu(-x) + x = relu(x)",
         lambda x: torch.relu(-x) + x, lambda: (t(0.0),)),
    Case("bolte-pauwels-relu-zero", "Bolte & Pauwels 2021: relu(x) - relu(x) + x: PyTorch's 'spurious' pieces",
         lambda x: torch.relu(x) - torch.relu(x) + x, lambda: (t(0.0),)),
    Case("mifflin2-minimum", "Mifflin 2 (Lukšan & Vlček 2000), at its minimizer (1, 0)", _mifflin2,
         lambda: (t([1.0, 0.0]),)),
    Case("cheb-rosenbrock-minimum", "Nesterov's Chebyshev-Rosenbrock (Gurbuzbalaban & Overton 2012)",
         _cheb_rosenbrock, lambda: (t([1.0, 1.0, 1.0, 1.0]),)),
    Case("cheb-rosenbrock-2-stationary", "Nesterov's second variant at a nonminimizing Clarke point",
         _cheb_rosenbrock_2, lambda: (t([0.0, -1.0, 1.0]),)),
    # (its minimizer x_i = 1/sqrt(2) is not a float: there the kink is only a near-tie, see docs/nonsmooth.md)
    Case("chained-lq-on-kinks", "Chained LQ (Lukšan & Vlček 2000) where x_i^2 + x_{i+1}^2 = 1 exactly",
         _chained_lq, lambda: (t([1.0, 0.0, 1.0, 0.0]),)),
    Case("hinge-on-margin", "hinge loss with samples exactly on the margin", _hinge,
         lambda: (t([1.0, -0.5]), t(0.0))),
    Case("maxpool-integer-ties", "max-pool over an integer image (Park, Chun & Lee 2024)", _maxpool_ties,
         lambda: (t([1.0, 1.0]),)),
    Case("maxpool-distinct-gradient-ties", "max-pool windows tied between different functions of the input",
         _maxpool_distinct, lambda: (t([1.0, 1.0]),)),
    Case("margin-losses-on-the-margin", "hinge-embedding, margin-ranking and multi-margin losses on their margins",
         lambda x: F.hinge_embedding_loss(x, t([-1.0, 1.0, -1.0])) + F.margin_ranking_loss(x[:2], x[1:], t(
             [1.0, -1.0]), margin=1.0) + F.multi_margin_loss(x.reshape(1, 3), torch.tensor([0])),
         lambda: (t([1.0, 0.0, 1.0]),)),
    Case("cummax-mode-ties", "running maximum over repeated values, mode over a repeated minimum",
         lambda x: torch.cummax(x, 0).values @ t([1.0, -2.0, 0.5, 3.0]) + torch.mode(x[:3]).values,
         lambda: (t([0.0, 2.0, 0.0, 2.0]),)),
    Case("relu-net-tied-units", "ReLU network with two identical hidden units at pre-activation 0",
         _relu_net_tied, lambda: (t([[1.0, 1.0], [1.0, 1.0], [0.5, -1.0], [-1.0, 0.2]]), t([1.0, -1.0, 0.5, 2.0]))),
    Case("sort-topk-ties", "sum of the top 2 of a vector with a three-way tie",
         lambda x: torch.topk(x, 2).values.sum() - 0.1 * torch.sort(x).values[0], lambda: (t([1.0, 1.0, 1.0, 0.0]),)),
    Case("clamp-hardtanh-bounds", "hardtanh and clamp exactly at their bounds",
         lambda x: F.hardtanh(x).sum() + x.clamp(min=0.5).pow(2).sum(), lambda: (t([1.0, -1.0, 0.5]),)),
    Case("clamp-tensor-bounds-meeting", "clamp(x, lo, hi) with lo == hi tensors, x below (min(lo, hi) ties) and above",
         lambda x, lo, hi: (torch.clamp(x, lo, hi) * t([1.0, 2.0])).sum() + 0.25 * x.sum(),
         lambda: (t([0.0, 2.0]), t([1.0, 1.0]), t([1.0, 1.0]))),
    Case("amax-median-ties", "amax over rows and median with ties",
         lambda x: x.amax(dim=1).sum() + x.reshape(-1).median(), lambda: (t([[2.0, 2.0, 0.0], [1.0, 0.0, 1.0]]),)),
    Case("leaky-hardswish-kinks", "leaky_relu at 0 and hardswish at -3 and 3",
         lambda x: F.leaky_relu(x[0], 0.1) + F.hardswish(x[1:]).sum(), lambda: (t([0.0, -3.0, 3.0]),)),
    Case("where-on-comparison", "where(a > b, a, b) at a == b (the seed's third formulation)",
         lambda a, b: torch.where(a > b, a, b).sum(), lambda: (t([1.0, 2.0]), t([1.0, 2.0]))),
    Case("vector-norm-at-zero", "Euclidean norm at 0 plus a linear term",
         lambda x: torch.linalg.vector_norm(x) + 0.3 * x[0], lambda: (t([0.0, 0.0]),), True),
    Case("copysign-kinks", "copysign(x, y) at x = 0 with a constant sign, and copysign(1, x) * x (= |x|) at 0",
         lambda x: torch.copysign(x[:2], t([-1.0, 1.0])).sum() + (torch.copysign(torch.ones_like(x[2]), x[2]) * x[2]),
         lambda: (t([0.0, 0.0, 0.0]),)),
]
