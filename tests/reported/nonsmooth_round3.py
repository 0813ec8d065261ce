"""Round 3: functions evaluated exactly at kinks (same format as ../shared/cases/nonsmooth.py).

Compositions of kink ops found by a random-composition fuzzer (fuzz.py: integer points, exact ties, float64
one-sided finite differences at steps 1e-7 and 1e-8), whole nn.Modules through torch.func.functional_call, and
ops whose kinks gradwise does not see (torch.dist / F.pairwise_distance with p=1 or inf where only some
coordinates coincide, torch.copysign, complex abs at 0, NaN-guard comparisons x == x, the double-where safe
norm, second-order comparison ties).

Data: directional derivatives as <grad f(x + 1e-8 d), d> (autograd inside the piece active along d), vertices as
autograd gradients at x pushed 1e-7 into each piece (hand-chosen plus random pushes), min_norm by NNLS over the
vertices; continuum cases (norms at 0) list vertices=None with stationarity by hand. All validated with
``check_nonsmooth.py --self-check``.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # loaded by path: _format sits beside this file
from _format import leaves, nonsmooth_table, t

CASES, add = nonsmooth_table()


# ================================================================================ silently wrong (bugs)

_Z2 = [0.0, 0.0]
add("dist-p1-one-coordinate-equal", "torch.dist(a, c, p=1) (L1 distance / MAE between embeddings) with a0 == c0 but "
    "a1 != c1, plus 0.5 a0 - a1: stationary (0.5 + [-1, 1] holds 0)",
    lambda a: torch.dist(a, t(_Z2).to(a), 1) + 0.5 * a[0] - a[1], leaves([0.0, 1.0]),
    [([1, 0],), ([-1, 0],), ([-2, 2],), ([0.3, -0.7],)])

add("dist-pinf-tied-max-coordinate", "torch.dist(a, b, p=inf) (Chebyshev distance) with |a0-b0| == |a1-b1|",
    lambda a, b: torch.dist(a, b, float("inf")), leaves([1.0, -1.0], _Z2),
    [([1, 1], [-1, -1]), ([1, -1], [0, 0]), ([-2, 2], [2, 1]), ([0.5, 0.1], [0.0, -0.3])])

add("pairwise-distance-p1-eps0-partial", "siamese L1 distance F.pairwise_distance(a, b, p=1, eps=0) where one of two "
    "coordinates coincides (rows 0 and 1)",
    lambda a, b: F.pairwise_distance(a, b, p=1.0, eps=0.0).sum(), leaves([[0.0, 1.0], [2.0, 2.0]], [[0.0, 0.0], [1.0, 2.0]]),
    [([[1, 0], [0, 1]], [[0, 0], [0, 0]]), ([[-1, 0], [0, -1]], [[0, 0], [0, 0]]),
     ([[-2, 2], [1, 1]], [[2, 1], [0, -1]])])

_ONES2 = [1.0, 1.0]
add("copysign-one-as-sign-times-x", "torch.copysign(1, x) * x (a sign that maps 0 to +1, sign-SGD / STE code) = |x|: "
    "copysign has no rule and is not watched",
    lambda x: (torch.copysign(torch.ones_like(x), x) * x).sum(), leaves([0.0, 2.0]),
    [([1, 0],), ([-1, 0],), ([-1, -1],), ([0.4, 0.3],)])

add("copysign-magnitude-at-zero", "torch.copysign(x, s) with x = 0 and s < 0: -|x| (kink at 0)",
    lambda x: torch.copysign(x, t([-1.0, 1.0]).to(x)).sum(), leaves([0.0, 0.0]),
    [([1, 0],), ([-1, 0],), ([0, -1],), ([0.4, -0.3],)])

add("complex-abs-at-zero-stft-silence", "magnitude |a + ib| of complex spectra with a silent bin (STFT losses): "
    "complex abs at 0 is a 2-norm (continuum); gradwise raises RuntimeError 'argmax(): does not support complex'",
    lambda a, b: torch.complex(a, b).abs().sum(), leaves([0.0, 3.0], [0.0, 4.0]),
    [([1, 0], [1, 0]), ([3, 1], [-4, 0]), ([0, 0], [-1, 2])], vertices=None, stationary=False, mn=1.0)


def _safe_norm(v):
    r2 = (v * v).sum()
    safe = torch.where(r2 > 0, r2, torch.ones_like(r2))
    return torch.where(r2 > 0, torch.sqrt(safe), torch.zeros_like(r2))


add("double-where-safe-norm-at-zero", "the 'double where' safe norm (where(r2 > 0, sqrt(where(r2 > 0, r2, 1)), 0), "
    "JAX/PyTorch NaN-gradient FAQ) at v = 0, plus 0.5 v0: f'(0; d) = ||d|| + 0.5 d0, stationary (continuum)",
    lambda v: _safe_norm(v) + 0.5 * v[0], leaves([0.0, 0.0]),
    [([3, 4],), ([-1, 0],), ([0, 1],)], vertices=None, stationary=True, mn=0.0)

add("where-curved-boundary-second-order", "torch.where(x1 < -x0^2, x0 - x1, -x1 - x0) at 0 along the tangent of the "
    "boundary: x1 - (-x0^2) = t^2 > 0 keeps the 'else' branch; gradwise breaks the first-order tie with a random "
    "second direction instead of the second-order term",
    lambda x: torch.where(x[1] < -x[0] * x[0], x[0] - x[1], -x[1] - x[0]), leaves([0.0, 0.0]),
    [([1, 0],), ([-1, 0],), ([2, 0],), ([1, 1],)], vertices=None, stationary=None)

# ================================================================================ unhelpful errors

add("nan-guard-eq-self-abs", "torch.where(x == x, x, 0) (NaN guard) then |.|: x == x is a tie that no direction "
    "changes; stationarity's enumeration forces the impossible branch and reports a jump",
    lambda x: torch.where(x == x, x, torch.zeros_like(x)).abs().sum(), leaves([0.0, 1.0]),
    [([1, 0],), ([-1, 1],), ([0.3, -0.2],)])

add("nan-guard-ne-self-smooth", "torch.where(x != x, 0, x) ** 2 at a smooth point: stationarity raises 'f jumps'",
    lambda x: (torch.where(x != x, torch.zeros_like(x), x) ** 2).sum(), leaves([1.0, 2.0]),
    [([1, 0],), ([-1, 1],)])

add("round-decimals0-minus-round", "torch.round(x, decimals=0) - torch.round(x) == 0 at x = 0.5: the decimals form "
    "runs natively, the plain one is ranked, so gradwise reports a jump of a constant function",
    lambda x: (torch.round(x, decimals=0) - torch.round(x)).sum() + 0.5 * x.sum(), leaves([0.5, 1.0]),
    [([1, 0],), ([-1, 2],)])

add("msort-ties", "torch.msort (= sort along dim 0) with ties: a NonsmoothError although sort has a rule",
    lambda X: (torch.msort(X) * t([[1.0], [2.0], [3.0]]).to(X)).sum(), leaves([[1.0], [1.0], [0.0]]),
    [([[1], [0], [0]],), ([[-1], [2], [0]],), ([[0.3], [0.1], [0.5]],)])

# ================================================================================ random compositions (pass)

_A = [[1, 2, 0, 0], [0, 1, 0, 0], [2, 0, 2, 0], [2, 0, 2, 0]]
_W = [1.0, -2.0, 3.0, 0.5]
add("fuzz-sorted-affine-weighted", "fuzz: sum_i w_i sort(Ax + b)_i with a double tie in the sorted values",
    lambda x: (torch.sort(t(_A).to(x) @ x + t([0, -1, 1, -1]).to(x)).values * t(_W).to(x)).sum(),
    leaves([-1.0, 1.0, 0.0, 0.0]), [([1, 0, 0, 0],), ([0, 0, 1, -1],), ([1, -1, 2, 0.5],), ([-0.3, 0.2, 0.1, 0.7],)])

_C = [[-1, -1, -1, 2], [0, 2, 2, 0], [2, 0, 2, 0], [1, 0, 2, 0]]
_E = [[0, 0, 0, 2], [-1, 2, -1, 0], [1, 2, -1, 1], [-1, 1, 2, 1]]
add("fuzz-abs-of-amax-minus-l1-plus-amax-abs", "fuzz: |amax(Ex + e) - l1(x, c)| + amax(|Cx + g|)",
    lambda x: torch.abs(torch.amax(t(_E).to(x) @ x + t([0, 0, 1, 1]).to(x))
                        - F.smooth_l1_loss(x, t([0.0, 1.0, 0.0, -1.0]).to(x), beta=0.0))
    + torch.amax((t(_C).to(x) @ x + t([-1, 0, 0, -1]).to(x)).abs()),
    leaves([-1.0, 0.0, 1.0, 0.0]), [([1, 0, 0, 0],), ([0, 1, 0, 0],), ([0, 0, -1, 1],), ([0.2, -0.5, 0.3, 0.1],)])

add("fuzz-index-by-argmax-of-other", "fuzz: u[argmax(x)] with x tied at its max, u = relu(x) - relu(-x) + |x| "
    "(= 2 relu(x), its own kink at x2 = 0), minus 0.5 x0",
    lambda x: (torch.relu(x) - torch.relu(-x) + x.abs())[x.argmax()] - 0.5 * x[0], leaves([1.0, -1.0, 0.0, 1.0]),
    [([1, 0, 0, 0],), ([0, -1, 0, 0],), ([0, 0, 0, 1],), ([0.1, -0.3, 0.2, 0.25],)])

add("fuzz-topk-of-maximum-ties", "fuzz: topk(maximum(x, 1 - x), 2).sum() at x = (0, 1, 0.5, 0.5)",
    lambda x: torch.topk(torch.maximum(x, 1 - x), 2).values.sum(), leaves([0.0, 1.0, 0.5, 0.5]),
    [([1, 0, 0, 0],), ([-1, 1, 0, 0],), ([0, 0, 1, 1],), ([0.3, -0.2, 0.4, -0.1],)])

add("fuzz-cummax-of-clamp-min", "fuzz: sum cummax(clamp_min(x, 1)) - 2 x3 with x touching the bound",
    lambda x: torch.cummax(x.clamp_min(1.0), 0).values.sum() - 2 * x[3], leaves([1.0, 0.0, 1.0, 1.0]),
    [([1, 0, 0, 0],), ([-1, 1, 1, 0],), ([0, 0, 1, 2],), ([0.3, -0.2, 0.1, 0.4],)])

add("fuzz-median-of-hardtanh", "fuzz: median(hardtanh(x)) with inputs at both bounds and a tie at the median",
    lambda x: torch.median(F.hardtanh(x)) + 0.1 * x.sum(), leaves([1.0, -1.0, 1.0, 0.0, 1.0]),
    [([1, 0, 0, 0, 0],), ([-1, 0, -2, 0, -1],), ([0, 1, 0, 1, 0],), ([0.3, -0.1, 0.2, 0.5, -0.4],)])

add("fuzz-margin-ranking-leaky-at-margin", "fuzz: margin_ranking_loss(leaky_relu(x), y, target, margin=1) with leaky "
    "kinks and pairs exactly at the margin",
    lambda x, y: F.margin_ranking_loss(F.leaky_relu(x, 0.1), y, t([1.0, -1.0, 1.0]).to(x), margin=1.0),
    leaves([0.0, 0.0, 2.0], [-1.0, -1.0, 1.0]),
    [([1, 0, 0], [0, 0, 0]), ([-1, 1, 0], [0, 0, 0]), ([0, 0, -1], [0, 1, 1]), ([0.3, -0.2, 0.1], [0.1, 0.4, -0.3])])

add("fuzz-hinge-embedding-relu6", "fuzz: hinge_embedding_loss(relu6(3x), y) at relu6 bounds and the hinge margin",
    lambda x: F.hinge_embedding_loss(F.relu6(3 * x), t([1.0, -1.0, -1.0, 1.0]).to(x)), leaves([0.0, 1.0 / 3, 2.0, 2.0]),
    [([1, 0, 0, 0],), ([0, -1, 0, 0],), ([0, 1, 0, -1],), ([0.2, -0.3, 0.1, 0.4],)])

add("fuzz-maxpool-over-abs-and-relu", "fuzz: max_pool1d(|x| - relu(x)) (= relu(-x)) with tied windows, minus 0.5 x",
    lambda x: F.max_pool1d((x.abs() - torch.relu(x))[None], 2, 1)[0].sum() + 0.5 * x.sum(),
    leaves([0.0, 0.0, -1.0, -1.0, 2.0]),
    [([1, 0, 0, 0, 0],), ([-1, -1, 0, 0, 0],), ([0, 0, 1, -1, 0],), ([0.3, -0.4, 0.2, 0.1, 0.5],)])

add("fuzz-hardswish-hardsigmoid-breakpoints", "fuzz: hardswish(x) * hardsigmoid(y) at x = -3, 3 and y = 3, -3",
    lambda x, y: (F.hardswish(x) * F.hardsigmoid(y) + F.hardsigmoid(x)).sum(), leaves([-3.0, 3.0], [3.0, -3.0]),
    [([1, 0], [0, 0]), ([-1, 1], [0, 0]), ([0, 0], [-1, 1]), ([0.3, -0.2], [0.4, 0.1])])

add("fuzz-softshrink-minimum", "fuzz: min(softshrink(x, 1), |y|) at the shrink breakpoints and y = 0",
    lambda x, y: torch.minimum(F.softshrink(x, 1.0), y.abs()).sum() + 0.25 * x.sum(), leaves([1.0, -1.0], [0.0, 0.0]),
    [([1, 0], [0, 0]), ([0, -1], [1, 0]), ([1, 1], [-1, 1]), ([0.3, -0.2], [0.4, 0.1])])

add("fuzz-where-ge-two-inputs", "torch.where(x >= y, x - y, 0) (relu by where) with x == y, float32",
    lambda x, y: (torch.where(x >= y, x - y, torch.zeros_like(x)) * t([1.0, 2.0], x.dtype)).sum(),
    leaves([0.0, 1.0], [0.0, 1.0], dtype=torch.float32),
    [([1, 0], [0, 0]), ([0, -1], [0, 0]), ([0.5, 1], [1, 0.5])])

# ================================================================================ nn.Modules via functional_call

_mlp = nn.Sequential(nn.Linear(2, 2), nn.Hardtanh(), nn.Linear(2, 1)).double()
_MLP_X = t([[1.0, 1.0], [2.0, 1.0]])


def _mlp_f(W1, b1, W2, b2):
    # sample 0: unit 0 at 0 (smooth), unit 1 at -1 (hardtanh bound); sample 1: unit 0 at +1 (bound)
    p = {"0.weight": W1, "0.bias": b1, "2.weight": W2, "2.bias": b2}
    return functional_call(_mlp, p, (_MLP_X.to(W1),)).abs().sum()


add("module-mlp-hardtanh-bounds-abs-loss", "nn.Sequential(Linear, Hardtanh, Linear) via functional_call: "
    "pre-activations at both hardtanh bounds, an output exactly 0 under an abs loss", _mlp_f,
    leaves([[1.0, 0.0], [1.0, -1.0]], [-1.0, -1.0], [[1.0, 1.0]], [0.0]),
    [([[1, 0], [0, 0]], [0, 0], [[0, 0]], [0]), ([[0, 0], [0, 1]], [0, 1], [[0, 0]], [0]),
     ([[-1, 0], [1, 0]], [0, -1], [[1, -1]], [1]), ([[0.1, -0.2], [0.3, 0.1]], [0.2, -0.1], [[0.3, 0.2]], [-0.1])])

_cnn = nn.Sequential(nn.Conv1d(1, 1, 2, bias=True), nn.ReLU(), nn.MaxPool1d(2, 1)).double()
_CNN_X = t([[[1.0, 1.0, 0.0, 1.0, 1.0]]])
_CNN_Y = t([[[1.0, 0.5, 1.0]]])


def _cnn_f(w, b):
    out = functional_call(_cnn, {"0.weight": w, "0.bias": b}, (_CNN_X.to(w),))
    return nn.L1Loss()(out, _CNN_Y.to(w))


add("module-cnn-conv-relu-maxpool-l1", "Conv1d -> ReLU -> MaxPool1d(2, 1) -> L1Loss via functional_call: tied "
    "conv outputs in pooling windows, an output equal to its target", _cnn_f, leaves([[[0.5, 0.5]]], [0.0]),
    [([[[1, 0]]], [0]), ([[[0, 1]]], [0]), ([[[-1, 1]]], [0.5]), ([[[0.2, -0.3]]], [0.1])])

_leaky = nn.Sequential(nn.Linear(3, 3, bias=False), nn.LeakyReLU(0.2, inplace=True), nn.AdaptiveMaxPool1d(1)).double()


def _leaky_f(W):
    return functional_call(_leaky, {"0.weight": W}, (t([[1.0, -1.0, 0.0]]).to(W),)).sum()


add("module-leakyrelu-inplace-adaptive-maxpool", "Linear -> LeakyReLU(inplace) -> AdaptiveMaxPool1d(1): all three "
    "units at 0 (leaky kink and a 3-way max tie)", _leaky_f, leaves([[1.0, 1.0, 0.0], [0.0, 0.0, 5.0], [2.0, 2.0, 1.0]]),
    [([[1, 0, 0], [0, 0, 0], [0, 0, 0]],), ([[-1, 0, 0], [0, -1, 0], [0, 0, 0]],),
     ([[0, 0, 0], [-1, 0, 0], [0, 1, 0]],), ([[0.1, 0.2, -0.3], [0.4, -0.1, 0.2], [-0.2, 0.3, 0.1]],)])
