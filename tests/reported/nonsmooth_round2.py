"""Round 2: more functions evaluated exactly at kinks (same format as ../shared/cases/nonsmooth.py).

Whole nn.Modules through torch.func.functional_call, in-place ops, torch.where / Python control flow at ties,
piecewise-linear losses used in practice, selections and sort-based losses, ops without rules (scatter_reduce,
index_reduce, embedding_bag, std_mean, remainder, ``== 0`` guards, builtins whose decomposition uses in-place
kink ops), float32 and float64, batched inputs, inputs not involved, and one point away from every kink.

How the data was made. Directional derivatives: by hand where a formula is short, otherwise as <grad f(x + e d), d>
with e = 1e-8 (autograd at a point pushed along d into the piece active along d); vertices: gradients of the
smooth pieces active at x, enumerated by autograd at points pushed slightly (1e-7) into each piece by a fixed set
of hand-chosen plus random pushes; min_norm from those vertices (NNLS); continuum cases (norms at 0) by hand.
All of it validated by ``check_nonsmooth.py --self-check`` (float64 finite differences; 200 nearby gradients must
be listed vertices).
"""
from __future__ import annotations

import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # loaded by path: _format sits beside this file
from _format import NonsmoothCase as Case
from _format import leaves, nonsmooth_table, t

CASES, add = nonsmooth_table()


def as_dtype(module_params: dict, like: torch.Tensor) -> dict:
    return {k: v.to(like.dtype) for k, v in module_params.items()}


# ------------------------------------------------------------------------------------------------ nn.Modules

_mlp = nn.Sequential(nn.Linear(2, 3), nn.ReLU(inplace=True), nn.Linear(3, 1))
_MLP_X = [[1.0, 2.0], [2.0, -1.0]]


def _mlp_f(W1, b1, W2, b2):
    # unit 0 at its kink on sample 0, unit 1 at its kink on sample 0 (dead on sample 1), unit 2 dead everywhere
    p = {"0.weight": W1, "0.bias": b1, "2.weight": W2, "2.bias": b2}
    return functional_call(_mlp, p, (t(_MLP_X).to(W1),)).sum()


add("mlp-inplace-relu-dead-and-kink-units", "Sequential(Linear, ReLU(inplace=True), Linear) via functional_call: "
    "two hidden pre-activations exactly 0 on sample 0, one unit dead on the whole batch",
    _mlp_f, leaves([[1.0, -1.0], [0.5, 0.5], [-1.0, -1.0]], [1.0, -1.5, 0.5], [[1.0, -2.0, 3.0]], [0.1]),
    [([1, 0, 0, 0, 0, 0], [0, 0, 0], [0, 0, 0], [0]), ([-1, 0, 0, 0, 0, 0], [0, 0, 0], [0, 0, 0], [0]),
     ([0, 0, 1, 1, 0, 0], [0, 0, 0], [0, 0, 0], [0]), ([0.3, -0.2, -0.5, 0.1, 0.7, 0.7], [0.1, 0.2, -0.3],
                                                       [0.5, -1.0, 2.0], [1.0])])

_cnn = nn.Sequential(nn.Conv2d(1, 1, 2), nn.ReLU(), nn.MaxPool2d(2, stride=1), nn.Flatten(), nn.Linear(4, 1))
_IMG = [[2.0, 2.0, 0.0, 1.0], [1.0, 0.0, 3.0, 0.0], [0.0, 3.0, 1.0, 2.0], [1.0, 0.0, 2.0, 1.0]]


def _cnn_f(w, b):
    # conv output [[1.5, 1.5, -.5], [.5, -.5, 2.5], [-.5, 2.5, .5]]: windows (0,0) and (1,1) tie, dead zeros
    p = {"0.weight": w, "0.bias": b, "4.weight": t([[1.0, -1.0, 2.0, 0.5]]).to(w), "4.bias": t([0.0]).to(w)}
    return functional_call(_cnn, p, (t(_IMG).to(w).reshape(1, 1, 4, 4),)).sum()


add("cnn-conv-relu-maxpool-tied-windows", "Sequential(Conv2d, ReLU, MaxPool2d(2, 1), Flatten, Linear): two "
    "pooling windows with tied positive maxima from different patches, relu-dead zeros elsewhere",
    _cnn_f, leaves([[[[1.0, 0.0], [0.0, 0.0]]]], [-0.5]),
    [([[[[0, 1, 0, 0]]]], [0]), ([[[[0, -1, 0, 0]]]], [0]), ([[[[0, 0, 0, 1]]]], [0]),
     ([[[[0.2, -0.3, 0.1, 0.4]]]], [0.5]), ([[[[-1, 0.5, 0.5, -0.2]]]], [-1])])


def _cnn_smooth_f(w, b):
    p = {"0.weight": w, "0.bias": b, "4.weight": t([[1.0, -1.0, 2.0, 0.5]]).to(w), "4.bias": t([0.0]).to(w)}
    return functional_call(_cnn, p, (t(_IMG).to(w).reshape(1, 1, 4, 4),)).sum()


add("cnn-away-from-kinks-equals-autograd", "same CNN at generic weights: no tie, no zero pre-activation; every "
    "answer must be PyTorch's gradient", _cnn_smooth_f, leaves([[[[0.3, -0.7], [1.1, 0.2]]]], [-0.25]),
    [([[[[1, 0, 0, 0]]]], [0]), ([[[[0.2, -0.3, 0.1, 0.4]]]], [0.5])], n_random=20)

_ht = nn.Sequential(nn.Linear(2, 2), nn.Hardtanh(), nn.Linear(2, 2), nn.LeakyReLU(0.1))
_HT_P = {"0.weight": t([[1.0, 0.0], [0.0, 1.0]], torch.float32), "0.bias": t([0.0, 0.0], torch.float32),
         "2.weight": t([[1.0, 1.0], [1.0, -1.0]], torch.float32), "2.bias": t([0.0, -2.0], torch.float32)}

add("hardtanh-then-leakyrelu-module-float32", "Sequential(Linear, Hardtanh, Linear, LeakyReLU(0.1)), float32 "
    "input at both hardtanh bounds whose images sit at both leaky kinks",
    lambda x: functional_call(_ht, as_dtype(_HT_P, x), (x,)).sum(), leaves([[1.0, -1.0]], dtype=torch.float32),
    [([[1, 0]],), ([[-1, 0]],), ([[0, 1]],), ([[0, -1]],), ([[-0.5, 0.3]],), ([[0.4, -0.9]],)])

_amp = nn.AdaptiveMaxPool1d(3)
add("adaptive-maxpool1d-overlapping-windows-float32", "nn.AdaptiveMaxPool1d(3) on length 5 (windows [0,2), [1,4), "
    "[3,5)) with ties in the first and last window, float32",
    lambda x: (_amp(x.reshape(1, 1, 5)).reshape(-1) * t([1.0, -1.0, 2.0]).to(x)).sum(),
    leaves([1.0, 1.0, 0.0, 2.0, 2.0], dtype=torch.float32),
    [([1, -1, 0, 0.5, 0.2],), ([-1, -2, 0, -1, 1],), ([0.3, 0.1, 5, 0, 0],)])


_prelu = nn.PReLU()
add("prelu-module-learnable-slope-at-zero", "nn.PReLU with its weight an input, x = (0, -1, 2)",
    lambda x, a: functional_call(_prelu, {"weight": a}, (x,)).sum() - 0.5 * x[0], leaves([0.0, -1.0, 2.0], [0.25]),
    [([1, 0, 0], [0]), ([-1, 0, 0], [0]), ([-1, 0.5, 0.2], [1.0]), ([0.3, 0, 0], [-2])])

_mp, _unpool = nn.MaxPool1d(2, return_indices=True), nn.MaxUnpool1d(2)


def _unpool_f(x):
    v, i = _mp(x.reshape(1, 1, 4))
    return (_unpool(v, i, output_size=[1, 1, 4]).reshape(-1) * t([1.0, -2.0, 0.5, 1.0]).to(x)).sum()


add("maxpool-unpool-tied-zero-window", "SegNet-style MaxPool1d(return_indices) + MaxUnpool1d: window (0, 0) tied "
    "at 0, so the unpooled position follows the locked index", _unpool_f, leaves([0.0, 0.0, 1.0, 3.0]),
    [([1, 0, 0, 0],), ([0, 1, 0, 0],), ([-1, -2, 0, 1],), ([0.3, 0.5, 1, -1],)])

# ------------------------------------------------------------------------------------------------ in-place ops


def _setitem_relu(x):
    y = x * 1.0
    y[y < 0] = 0  # hand-written ReLU by masked assignment
    return (y * t([1.0, -2.0, 1.0, 1.0]).to(x)).sum() + 0.5 * x[0]


add("masked-assign-relu", "y[y < 0] = 0 (in-place masked assignment) at two zeros", _setitem_relu,
    leaves([0.0, 0.0, 1.0, -1.0]), [([1, 1, 0, 0],), ([-1, -1, 0, 0],), ([-1, 1, 1, 1],), ([0.5, -0.5, 0, 0],)])


def _clamp_inplace(x):
    y = t([[1.0, 1.0], [1.0, -1.0]]).to(x) @ x
    y.clamp_(min=-1.0, max=1.0)
    return (y * t([2.0, -1.0]).to(x)).sum() - 0.4 * x.sum()


add("inplace-clamp-on-intermediate", "y = A x; y.clamp_(-1, 1) with y at both bounds", _clamp_inplace,
    leaves([0.0, 1.0]), [([1, 0],), ([-1, 0],), ([0, 1],), ([0, -1],), ([0.3, -0.8],)])


def _overwrite(x):
    y = x.clone()
    y[0] = torch.maximum(x[1], x[2])  # overwrite an element with a tied maximum
    return (y * t([1.0, 1.0, -1.0]).to(x)).sum()


add("overwrite-element-with-tied-maximum", "y = x.clone(); y[0] = maximum(x1, x2) at x1 == x2 (x0 overwritten: "
    "not involved)", _overwrite, leaves([5.0, 1.0, 1.0]), [([7, 1, 0],), ([0, 0, 1],), ([0, -1, -0.5],)])

# ------------------------------------------------------------------------------------------------ where / control flow


def _pinball_where(pred, y):
    e = y - pred
    q = 0.9
    return torch.where(e >= 0, q * e, (q - 1) * e).mean()


add("pinball-loss-by-where-two-exact-fits", "quantile (pinball) loss written with torch.where(e >= 0, ...), q = 0.9, "
    "pred == target on 2 of 3 samples, both require grad", _pinball_where,
    leaves([1.0, 2.0, 0.0], [1.0, 2.0, 1.0]),
    [([1, 0, 0], [0, 0, 0]), ([-1, 0, 0], [0, 0, 0]), ([0, 1, 0], [0, 2, 0]), ([0.3, -0.4, 1], [0.1, 0.2, 0.3])])


def _pinball_max(pred):
    e = t([1.0, 2.0, 3.0, 4.0]).to(pred) - pred
    q = 0.25
    return torch.max((q - 1) * e, q * e).mean()  # pytorch-forecasting's QuantileLoss formula


add("pinball-loss-torch-max-at-quantile", "pytorch-forecasting QuantileLoss max((q-1)e, q e), q = 0.25, pred = "
    "target for all 4 samples (stationary: 0 in [-q, 1-q]^4 / 4)", _pinball_max, leaves([1.0, 2.0, 3.0, 4.0]),
    [([1, 0, 0, 0],), ([-1, 0, 0, 0],), ([0.5, -1, 0.2, 0],)])


def _guarded(x):
    return torch.where(x == 0, torch.ones_like(x), torch.expm1(x) / x).sum()


CASES.append(Case(
    "where-eq-zero-guard-expm1-over-x", "(e^x - 1)/x guarded by torch.where(x == 0, 1, ...) (the 'safe division' "
    "idiom of pytorch#16317 / sinc issues): continuous, derivative 1/2 at 0",
    _guarded, leaves([0.0, 1.0]),
    [((t([1.0, 0.0]),), 0.5), ((t([-1.0, 0.0]),), -0.5), ((t([0.2, 1.0]),), 0.1 + 1.0)],
    [[0.5, 1.0]], False, math.sqrt(1.25)))


def _py_min_ensemble(W):
    x, y = t([1.0, 2.0]).to(W), 1.0
    losses = [((W[k] * x).sum() - y) ** 2 for k in range(3)]
    return min(losses)  # Python builtin min over an ensemble's losses


_ENS = [[1.0, 0.5], [0.0, 1.0], [1.0, 1.0]]  # losses (1, 1, 4): members 0 and 1 tie
add("python-min-over-ensemble-losses", "Python builtin min() over three members' squared errors (min-over-ensemble "
    "/ multiple-choice loss), members 0 and 1 tied", _py_min_ensemble, leaves(_ENS),
    [([1, 0, 0, 0, 0, 0],), ([0, 0, -1, 0, 0, 0],), ([0.2, -0.1, 0.3, 0.3, 1, 1],)])


# ------------------------------------------------------------------------------------------------ losses


def _svr(w, b):
    X = t([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 1.0]]).to(w)
    y = t([0.75, 1.25, 1.0, 1.5]).to(w)
    r = X @ w + b - y  # residuals (0.25, -0.25, 0, 0.5) at w = (1, 1), b = 0 (exact in binary)
    return torch.relu(r.abs() - 0.25).mean()  # epsilon-insensitive (SVR) loss, eps = 0.25


add("svr-epsilon-insensitive-at-tube-edge", "relu(|r| - eps): two residuals on the tube edge, one at r = 0 inside "
    "the tube (abs kink under a dead relu)", _svr, leaves([1.0, 1.0], [0.0]),
    [([1, 0], [0]), ([-1, 0], [0]), ([0, 1], [0]), ([0.3, -0.2], [0.4])])


def _ramp(w, b):
    X = t([[1.0, 1.0], [-1.0, 0.0], [2.0, 0.0]]).to(w)
    y = t([1.0, 1.0, -1.0]).to(w)
    m = y * (X @ w + b)  # margins (1, -1, -0.5) at w = (0.5, 0.5), b = 0
    return torch.clamp(1 - m, 0.0, 2.0).mean()  # ramp loss: hinge capped at 2


add("ramp-loss-at-both-caps", "ramp loss clamp(1 - y s, 0, 2): one sample on the margin, one at the cap",
    _ramp, leaves([0.5, 0.5], [0.0]), [([1, 0], [0]), ([-1, 0], [0]), ([0, 1], [-1]), ([0.2, 0.7], [0.1])])


def _huber_l1(w):
    X = t([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]]).to(w)
    y = t([1.0, 0.0, 0.0]).to(w)
    return F.huber_loss(X @ w, y, delta=1.0) + 0.1 * w.abs().sum()


add("huber-at-delta-plus-l1-at-zero", "F.huber_loss with |r| = delta (C1, no kink) plus an L1 penalty with two "
    "weights at 0", _huber_l1, leaves([0.0, 0.0, 1.0]), [([1, 0, 0],), ([-1, 0, 0],), ([0, 1, 0],), ([0.3, -0.2, 0.5],)])


def _cheb(w):
    A = t([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0], [3.0, 1.0]]).to(w)
    b = t([-1.0, 1.0, -1.0, 0.5]).to(w)
    return (A @ w - b).abs().max()  # L-infinity (Chebyshev) regression


add("linf-regression-equioscillation", "Chebyshev fit max_i |a_i w - b_i|: residuals (1, -1, 1, -0.5) equioscillate "
    "(stationary)", _cheb, leaves([0.0, 0.0]), [([1, 0],), ([-1, 0],), ([0, 1],), ([0, -1],), ([0.3, -0.7],)])


def _max_affine(W, c):
    X = t([[1.0, 0.0], [0.0, 1.0]]).to(W)
    return (X @ W.T + c).amax(dim=1).sum()  # max-of-affine (convex piecewise-linear) model, batch of 2


add("max-of-affine-batched-ties", "sum over a batch of max_k (w_k . x + c_k) with 2- and 3-way ties",
    _max_affine, leaves([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [0.0, 1.0, 0.0]),
    [([1, 0, 0, 0, 0, 0], [0, 0, 0]), ([0, 0, 0, 1, 0, 0], [0, 0, 0]), ([0.3, -0.2, 0.1, 0.5, -0.4, 0.2], [0.1, -0.3, 0.2])])


def _topk_mean(pred):
    losses = (pred - t([0.0, 0.0, 0.0, 0.0]).to(pred)) ** 2  # (4, 1, 1, 1)
    return losses.topk(2).values.mean()  # average top-k loss


add("average-top-k-loss-tied-kth", "mean of the 2 largest squared errors, three tied for 2nd place (ATk loss)",
    _topk_mean, leaves([2.0, 1.0, -1.0, 1.0]), [([0, 1, 0, 0],), ([0, -1, -1, 0],), ([0.2, 0.1, -0.3, 0.4],)])


def _trimmed(x):
    return torch.sort(x).values[1:-1].mean()  # trimmed mean


add("trimmed-mean-ties-at-both-trims", "mean of sort(x)[1:-1] with ties at both trimming positions",
    _trimmed, leaves([1.0, 3.0, 2.0, 1.0, 3.0]), [([1, 0, 0, -1, 0],), ([0, 1, 0, 0, 1],), ([0.3, -0.2, 0.5, 0.1, 0.4],)])


def _lmed(pred):
    r = pred - t([0.0, 0.0, 0.0, 0.0, 0.0]).to(pred)
    return torch.median(r.abs())  # least median of absolute residuals


add("least-median-abs-residual-ties", "median |r| with three residuals tied at the median (robust regression)",
    _lmed, leaves([1.0, -1.0, 0.5, 2.0, -1.0]), [([1, 0, 0, 0, 0],), ([0, 1, 0, 0, 1],), ([0.2, -0.3, 0, 0, 0.1],)])

add("hinge-embedding-at-margin", "F.hinge_embedding_loss(margin=1): a y = -1 sample with x exactly 1",
    lambda x: F.hinge_embedding_loss(x, t([-1.0, 1.0, -1.0]).to(x)), leaves([1.0, 0.5, 2.0]),
    [([1, 0, 0],), ([-1, 0, 0],), ([-0.5, 1, 1],)])

add("triplet-swap-equidistant-negative", "F.triplet_margin_loss(swap=True, eps=0): d(a, n) == d(p, n) = 5 < "
    "d(a, p) + 1: the swap's minimum ties", lambda a, p, n: F.triplet_margin_loss(a, p, n, margin=1.0, eps=0.0,
                                                                                   swap=True),
    leaves([[-3.0, 0.0]], [[3.0, 0.0]], [[0.0, 4.0]]),
    [([[1, 0]], [[0, 0]], [[0, 0]]), ([[0, 0]], [[-1, 0]], [[0, 0]]), ([[0.2, 0.1]], [[0.3, -0.2]], [[0.1, 0.5]])])

add("cosine-embedding-at-margin", "F.cosine_embedding_loss(y = -1, margin = 0) at cos = 0: max(0, cos)",
    lambda a, b: F.cosine_embedding_loss(a, b, torch.tensor([-1.0]), margin=0.0),
    leaves([[1.0, 0.0]], [[0.0, 1.0]]),
    [([[0, 1]], [[1, 0]]), ([[0, -1]], [[-1, 0]]), ([[0, -1]], [[0, 0]]), ([[0.3, 0.5]], [[-0.2, 0.1]])])

# ------------------------------------------------------------------------------------------------ selections

add("cummin-batched-dim1-float32", "torch.cummin along dim 1 of a batch, running minima attained repeatedly",
    lambda X: (torch.cummin(X, 1).values * t([[1.0, 2.0, -1.0, 1.0], [1.0, 1.0, 1.0, -2.0]]).to(X)).sum(),
    leaves([[2.0, 1.0, 1.0, 3.0], [0.0, 0.0, -1.0, -1.0]], dtype=torch.float32),
    [([[0, 1, -1, 0], [1, -1, 0, 0]],), ([[0, -1, 0, 0], [0, 0, 1, -1]],), ([[0.1, 0.2, 0.3, 0], [0.3, 0.1, 0.2, 0.5]],)])


def _stem_pool(x):
    # ResNet stem MaxPool2d(3, stride=2, padding=1), ceil_mode=True, on 4 x 4
    return (F.max_pool2d(x.reshape(1, 1, 4, 4), 3, stride=2, padding=1, ceil_mode=True).reshape(-1)
            * t([1.0, -1.0, 2.0, 0.5, 1.0, -1.0, 0.3, 1.0, 2.0]).to(x)).sum()


add("maxpool-stem-padding-ceil-ties", "F.max_pool2d(3, stride 2, padding 1, ceil_mode) with ties across "
    "overlapping padded windows", _stem_pool,
    leaves([[1.0, 1.0, 0.0, 2.0], [1.0, 0.0, 2.0, 2.0], [0.0, 3.0, 3.0, 0.0], [-1.0, 3.0, 0.0, 1.0]]),
    [([[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],),
     ([[0, 0, 0, 1], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 0]],),
     ([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8], [0.9, 1.0, 1.1, 1.2], [1.3, 1.4, 1.5, 1.6]],)])

add("box-projection-learnable-bounds-triple-tie", "clamp(x, lo, hi) with tensor bounds: x0 == lo0 == hi0, x1 == lo1",
    lambda x, lo, hi: (torch.clamp(x, lo, hi) * t([1.0, 2.0]).to(x)).sum(),
    leaves([1.0, 0.0], [1.0, 0.0], [1.0, 2.0]),
    [([1, 0], [0, 0], [0, 0]), ([0, 0], [-1, 0], [1, 0]), ([1, -1], [0.5, 0.5], [0.2, 0]),
     ([0.3, 0.2], [0.6, -0.1], [-0.4, 0.1])])

add("learnable-threshold-maximum-broadcast", "torch.maximum(x, c) with a learnable 0-d threshold c tied with two "
    "elements, plus an input z that only enters times 0", lambda x, c, z: torch.maximum(x, c).sum() - 1.5 * c + 0.0 * z.sum(),
    leaves([0.0, 1.0, 0.0], 0.0, [5.0, 5.0]),
    [([1, 0, 0], 0, [0, 0]), ([0, 0, 0], 1, [1, 1]), ([-1, 0.3, 0.5], 0.2, [3, -3])])

add("geometric-median-at-data-point", "Weber objective sum_i ||p_i - c|| via torch.cdist with c on a data point "
    "(the other points' unit vectors sum to 0): stationary, a continuum of pieces",
    lambda c: torch.cdist(t([[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -3.0]]).to(c), c).sum(),
    leaves([[0.0, 0.0]]), [([[1, 0]],), ([[0, 1]],), ([[0.6, -0.8]],)], vertices=None, stationary=True, mn=0.0)

# ------------------------------------------------------------------------------------------------ ops without rules

_IDX = torch.tensor([0, 0, 1, 1])
add("scatter-reduce-amax-gnn-ties", "GNN max aggregation: zeros(2).scatter_reduce(0, idx, x, 'amax', "
    "include_self=False) with tied messages in both segments",
    lambda x: (torch.zeros(2, dtype=x.dtype).scatter_reduce(0, _IDX, x, "amax", include_self=False)
               * t([1.0, -1.0]).to(x)).sum(),
    leaves([1.0, 1.0, 2.0, 2.0]), [([1, 0, 0, 0],), ([0, 0, 1, -1],), ([0.3, 0.1, 0.2, 0.4],)])

add("index-reduce-amax-ties", "x.index_reduce(0, idx, src, 'amax') (segment max) with ties",
    lambda x: (torch.zeros(2, dtype=x.dtype).index_reduce(0, _IDX, x, "amax", include_self=False)
               * t([1.0, -1.0]).to(x)).sum(),
    leaves([1.0, 1.0, 2.0, 2.0]), [([1, 0, 0, 0],), ([0.3, 0.1, 0.2, 0.4],)])

add("embedding-bag-max-ties", "F.embedding_bag(mode='max') with two bag members tied in column 0",
    lambda W: (F.embedding_bag(torch.tensor([0, 1]), W, torch.tensor([0]), mode="max") * t([[1.0, 2.0]]).to(W)).sum(),
    leaves([[1.0, 2.0], [1.0, 0.0], [5.0, 5.0]]),
    [([[0, 0], [1, 0], [0, 0]],), ([[1, 0], [0, 0], [0, 0]],), ([[0.3, 0.2], [0.5, 0.1], [1, 1]],)])

add("std-mean-of-constant-vector", "torch.std_mean(x)[0] at a constant vector (normalisation code): f'(x; d) = "
    "std(d), 0 in the subdifferential (x.std() has a rule, std_mean not)",
    lambda x: torch.std_mean(x)[0], leaves([1.0, 1.0, 1.0, 1.0]),
    [([1, -2, 0.5, 0.3],), ([1, 1, 1, 0],)], vertices=None, stationary=True, mn=0.0)

add("floor-plus-remainder-is-identity", "floor(x) + x % 1 == x (integer/fractional split, angle wrapping) at an "
    "integer: floor has a rule, remainder not", lambda x: (x.floor() + x % 1).sum(), leaves([1.0, 2.5]),
    [([1, 0],), ([-1, 0],), ([-1, 2],)])
