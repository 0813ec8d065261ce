"""More functions evaluated exactly at kinks, with their exact nonsmooth derivatives (same format as
../shared/cases/nonsmooth.py). Directional derivatives are float64 finite-difference validated
(check_nonsmooth.py --self-check); vertices are the gradients of the smooth pieces active at x, enumerated by
autograd at points pushed slightly into each piece. Cases with a continuum of pieces (norms at 0, repeated
eigenvalues) list ``vertices=None`` and are checked on directions and stationarity only.
"""
from __future__ import annotations

import itertools
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # loaded by path: _format sits beside this file
from _format import NonsmoothCase as Case

CASES: list[Case] = []
D = torch.float64


def t(v, **kw):
    return torch.tensor(v, dtype=D, **kw)


def leaf(v):
    return t(v).requires_grad_(True)


def dirs(pairs):
    """[(tuple of direction lists, expected)] -> [(tuple of tensors, expected)]"""
    return [(tuple(t(d) for d in ds), float(e)) for ds, e in pairs]


def seg_min_norm(a, b):
    """Least norm of the segment [a, b]."""
    d = [y - x for x, y in zip(a, b, strict=False)]
    lam = min(max(-sum(x * y for x, y in zip(a, d, strict=False)) / sum(y * y for y in d), 0.0), 1.0)
    return math.sqrt(sum((x + lam * y) ** 2 for x, y in zip(a, d, strict=False)))


def signs(n):
    return list(itertools.product((-1.0, 1.0), repeat=n))


# ----------------------------------------------------------------------------- ReLU / hinge / L1 (routed ops)

XIN = (1.0, 2.0)


def _relu_net(W1, b1, w2):
    return w2 @ torch.relu(W1 @ t(XIN).to(W1) + b1)


def _relu_net_dd(dW1, db1, dw2):
    p0 = dW1[0][0] * XIN[0] + dW1[0][1] * XIN[1] + db1[0]
    p1 = dW1[1][0] * XIN[0] + dW1[1][1] * XIN[1] + db1[1]
    return 2 * max(p0, 0.0) - p1 + dw2[1] * 1.0


_rn_dirs = [([[1.0, 0.0], [0.0, 0.0]], [0.0, 0.0], [0.0, 0.0]), ([[-1.0, 0.0], [0.0, 0.0]], [0.0, 0.0], [0.0, 0.0]),
            ([[0.3, -0.2], [0.5, 0.1]], [-0.4, 0.2], [1.0, -2.0]), ([[0.0, 0.0], [0.0, 0.0]], [-1.0, 0.0], [0.5, 0.5])]
CASES.append(Case(
    "relu-net-hidden-unit-at-kink", "2-layer ReLU net, one hidden pre-activation exactly 0 (bias = -w.x)",
    _relu_net, lambda: (leaf([[1.0, -1.0], [0.5, 0.25]]), leaf([1.0, 0.0]), leaf([2.0, -1.0])),
    dirs([(d, _relu_net_dd(*d)) for d in _rn_dirs]),
    [[2, 4, -1, -2, 2, -1, 0, 1], [0, 0, -1, -2, 0, -1, 0, 1]], False,
    math.sqrt(1 + 4 + 1 + 1)))  # least-norm: the V0 endpoint (V1 - V0 = (2,4,0,0,2,0,0,0) points away)

_X = [[1.0, 2.0], [2.0, 0.0], [-1.0, -1.0]]
_Y = [1.0, -1.0, -1.0]


def _svm(w, b):
    X, y = t(_X).to(w), t(_Y).to(w)
    return torch.relu(1 - y * (X @ w + b)).mean() + 0.05 * (w ** 2).sum()


def _svm_dd(dw, db, w=(1.0, -0.25)):
    m = [-_Y[i] * (_X[i][0] * dw[0] + _X[i][1] * dw[1] + db) for i in range(3)]
    return (max(m[0], 0.0) + m[1] + m[2]) / 3 + 0.1 * (w[0] * dw[0] + w[1] * dw[1])


_gw0, _gb0 = [1 / 3 + 0.1, -1 / 3 - 0.025], 2 / 3
CASES.append(Case(
    "svm-hinge-sample-on-margin", "linear SVM: mean hinge + L2, one sample exactly on the margin (y s = 1)",
    _svm, lambda: (leaf([1.0, -0.25]), leaf(0.5)),
    dirs([(([1.0, 0.0], 0.0), _svm_dd((1.0, 0.0), 0.0)), (([-1.0, 0.0], 0.0), _svm_dd((-1.0, 0.0), 0.0)),
          (([0.0, 0.0], -1.0), _svm_dd((0.0, 0.0), -1.0)), (([0.2, -0.7], 0.4), _svm_dd((0.2, -0.7), 0.4))]),
    [[_gw0[0], _gw0[1], _gb0], [_gw0[0] - 1 / 3, _gw0[1] - 2 / 3, _gb0 - 1 / 3]], False,
    seg_min_norm([_gw0[0], _gw0[1], _gb0], [_gw0[0] - 1 / 3, _gw0[1] - 2 / 3, _gb0 - 1 / 3])))

CASES.append(Case(
    "l1-loss-pred-and-target-match", "F.l1_loss with pred == target at 2 of 3 elements, both require grad",
    lambda p, q: F.l1_loss(p, q), lambda: (leaf([1.0, 2.0, 3.0]), leaf([1.0, 0.0, 3.0])),
    dirs([(([1.0, 0.0, 0.0], [0.0, 0.0, 0.0]), 1 / 3), (([-1.0, 0.0, 0.0], [0.0, 0.0, 0.0]), 1 / 3),
          (([0.5, 1.0, -0.5], [1.0, 0.0, 0.5]), (0.5 + 1.0 + 1.0) / 3)]),
    [[a / 3, 1 / 3, c / 3, -a / 3, -1 / 3, -c / 3] for a, c in signs(2)], False, math.sqrt(2) / 3))

_A, _B = [[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]], [0.5, -0.5]


def _lasso3(x):
    A, b = t(_A).to(x), t(_B).to(x)
    return 0.5 * ((A @ x - b) ** 2).sum() + x.abs().sum()


CASES.append(Case(
    "lasso-3d-at-zero-optimum", "lasso 0.5||Ax-b||^2 + ||x||_1 at x = 0 with ||A^T b||_inf < 1",
    _lasso3, lambda: (leaf([0.0, 0.0, 0.0]),),
    dirs([(([1.0, 0.0, 0.0],), 0.5), (([-1.0, 0.0, 0.0],), 1.5), (([0.0, 0.0, -1.0],), 1.0),
          (([0.2, -0.3, 0.4],), -0.1 - 0.15 + 0.9)]),
    [[-0.5 + s0, 0.5 + s1, 0.0 + s2] for s0, s1, s2 in signs(3)], True, 0.0))

_C13 = [-0.9 + 0.15 * i for i in range(13)]


def _lasso13(x):
    return 0.5 * ((x - t(_C13).to(x)) ** 2).sum() + x.abs().sum()


_d13a = [1.0 if i % 2 else -0.5 for i in range(13)]
_d13b = [0.1 * (i - 6) for i in range(13)]
CASES.append(Case(
    "lasso-13d-at-zero-optimum", "L1 penalty on a 13-weight layer at 0 (more tied abs than MAX_KINKS=12)",
    _lasso13, lambda: (leaf([0.0] * 13),),
    dirs([((d,), sum(-c * di + abs(di) for c, di in zip(_C13, d, strict=False))) for d in (_d13a, _d13b)]),
    [[-c + s for c, s in zip(_C13, ss, strict=False)] for ss in signs(13)], True, 0.0))

# ----------------------------------------------------------------------------- max / min selections (routed)

CASES.append(Case(
    "max-dim-ties-two-rows", "torch.max(X, dim=1) with ties in both rows, weighted +1/-1",
    lambda X: (X.max(dim=1).values * t([1.0, -1.0]).to(X)).sum(),
    lambda: (leaf([[1.0, 1.0, 0.0], [2.0, -1.0, 2.0]]),),
    dirs([(([[1.0, -1.0, 5.0], [1.0, 0.0, -1.0]],), 1.0 - 1.0), (([[-1.0, -2.0, 0.0], [-1.0, 0.0, -2.0]],), -1.0 + 1.0),
          (([[0.3, 0.4, 0.0], [0.5, 9.0, 0.2]],), 0.4 - 0.5)]),
    [[a, 1 - a, 0, -b, 0, -(1 - b)] for a in (0.0, 1.0) for b in (0.0, 1.0)], False, 1.0))

CASES.append(Case(
    "clamp-min-tensor-bound-tie", "x.clamp(min=lo) with a learnable lower bound touching x",
    lambda x, lo: torch.clamp(x, min=lo).sum(), lambda: (leaf([0.0, 1.0]), leaf([0.0, 0.0])),
    dirs([(([-1.0, 0.0], [1.0, 0.0]), 1.0), (([-1.0, 0.0], [-2.0, 0.0]), -1.0), (([0.5, 2.0], [0.2, 0.0]), 2.5)]),
    [[1, 1, 0, 0], [0, 1, 1, 0]], False, math.sqrt(1.5)))

CASES.append(Case(
    "leaky-relu-stationary", "leaky_relu(x, 0.1) - 0.5 x at 0: slopes -0.4 and 0.5",
    lambda x: F.leaky_relu(x, 0.1) - 0.5 * x, lambda: (leaf(0.0),),
    dirs([((1.0,), 0.5), ((-1.0,), 0.4), ((2.0,), 1.0)]), [[0.5], [-0.4]], True, 0.0))

CASES.append(Case(
    "hardswish-at-both-breakpoints", "F.hardswish at x = -3 and x = 3",
    lambda x: F.hardswish(x).sum(), lambda: (leaf([-3.0, 3.0]),),
    dirs([(([1.0, 1.0],), -0.5 + 1.0), (([-1.0, -1.0],), 0.0 - 1.5), (([-1.0, 1.0],), 1.0), (([1.0, -1.0],), -2.0)]),
    [[a, b] for a in (0.0, -0.5) for b in (1.5, 1.0)], False, 1.0))

# max_pool1d k=3 s=1 over (1,1,1,0,2,2): windows tie {0,1,2}, {1,2}, -, {4,5}


def _pool1(x):
    return (F.max_pool1d(x.reshape(1, 1, 6), 3, stride=1).reshape(-1) * t([1.0, -1.0, 1.0, 2.0]).to(x)).sum()


def _pool1_dd(d):
    return max(d[0], d[1], d[2]) - max(d[1], d[2]) + d[4] + 2 * max(d[4], d[5])


_p1 = [[1.0, -1.0, 0.5, 0.0, 1.0, 2.0], [-1.0, 0.5, 0.5, 3.0, -1.0, -2.0], [0.2, 0.7, -0.3, 0.0, 0.3, 0.1]]
CASES.append(Case(
    "max-pool1d-overlapping-ties", "max_pool1d(k=3, stride=1) with ties shared by overlapping windows",
    _pool1, lambda: (leaf([1.0, 1.0, 1.0, 0.0, 2.0, 2.0]),),
    dirs([((d,), _pool1_dd(d)) for d in _p1]),
    [[1, -1, 0, 0, 3, 0], [1, 0, -1, 0, 3, 0], [1, -1, 0, 0, 1, 2], [1, 0, -1, 0, 1, 2],
     [0, 0, 0, 0, 3, 0], [0, 0, 0, 0, 1, 2]], False, 3 / math.sqrt(2)))

CASES.append(Case(
    "max-pool2d-over-relu-dead-and-live", "max_pool2d(relu(x), 2, stride=1): dead windows and one live zero",
    lambda x: F.max_pool2d(torch.relu(x).reshape(1, 1, 3, 3), 2, stride=1).sum(),
    lambda: (leaf([[-1.0, -2.0, 0.0], [-1.0, -3.0, -1.0], [1.0, -1.0, -2.0]]),),
    dirs([(([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]],), 2.0),
          (([[0.0, 0.0, -1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]],), 1.0),
          (([[0.5, 0.5, 0.3], [0.5, 0.5, 0.5], [-0.2, 0.5, 0.5]],), 0.1)]),
    [[0, 0, a, 0, 0, 0, 1, 0, 0] for a in (0.0, 1.0)], False, 1.0))

CASES.append(Case(
    "topk-tie-across-k", "topk(x, 2) with three elements tied for 2nd place",
    lambda x: torch.topk(x, 2).values.sum(), lambda: (leaf([3.0, 1.0, 1.0, 1.0, 0.0]),),
    dirs([(([0.0, -1.0, 0.5, 0.2, 9.0],), 0.5), (([1.0, -1.0, -2.0, -3.0, 0.0],), 0.0)]),
    [[1, 1 if j == 1 else 0, 1 if j == 2 else 0, 1 if j == 3 else 0, 0] for j in (1, 2, 3)], False,
    math.sqrt(1 + 1 / 3)))

CASES.append(Case(
    "median-ties-stationary", "median(x) - mean of the tied middle values, three 2's tied",
    lambda x: torch.median(x) - (x[1] + x[2] + x[3]) / 3, lambda: (leaf([1.0, 2.0, 2.0, 2.0, 3.0]),),
    dirs([(([0.0, 1.0, 0.0, -1.0, 0.0],), 0.0), (([0.0, 1.0, 1.0, -1.0, 0.0],), 1 - 1 / 3),
          (([5.0, 0.3, -0.6, 0.9, -5.0],), 0.3 - 0.2)]),
    [[0, (j == 1) - 1 / 3, (j == 2) - 1 / 3, (j == 3) - 1 / 3, 0] for j in (1, 2, 3)], True, 0.0))

CASES.append(Case(
    "cummax-plateau-ties", "sum of cummax over (1, 0, 1, 1): running max attained repeatedly",
    lambda x: torch.cummax(x, 0).values.sum(), lambda: (leaf([1.0, 0.0, 1.0, 1.0]),),
    dirs([(([1.0, 0.0, 2.0, 3.0],), 2 + 2 + 3), (([-1.0, 5.0, -2.0, -0.5],), -2 - 1 - 0.5),
          (([0.1, 0.0, 0.3, 0.2],), 0.2 + 0.3 + 0.3)]),
    [[4, 0, 0, 0], [2, 0, 2, 0], [3, 0, 0, 1], [2, 0, 1, 1]], False, math.sqrt(6)))

# ----------------------------------------------------------------------------- norms at 0 (routed)

_C3 = [0.3, -0.4, 0.5]
CASES.append(Case(
    "group-lasso-at-zero-optimum", "0.5||x - c||^2 + ||x||_2 at x = 0, ||c|| < 1: stationary (continuum)",
    lambda x: 0.5 * ((x - t(_C3).to(x)) ** 2).sum() + torch.linalg.vector_norm(x), lambda: (leaf([0.0, 0.0, 0.0]),),
    dirs([((d,), -sum(c * di for c, di in zip(_C3, d, strict=False)) + math.sqrt(sum(di * di for di in d)))
          for d in ([1.0, 0.0, 0.0], [0.3, -0.4, 0.5], [-1.0, 2.0, 2.0])]),
    None, True, 0.0))

CASES.append(Case(
    "row-norms-with-a-zero-row", "torch.norm(X, dim=1).sum() with X[0] = 0: not stationary (row 1 fixed)",
    lambda X: torch.norm(X, dim=1).sum(), lambda: (leaf([[0.0, 0.0], [3.0, 4.0]]),),
    dirs([(([[1.0, 1.0], [0.0, 0.0]],), math.sqrt(2)), (([[-3.0, 4.0], [1.0, -1.0]],), 5 + 0.6 - 0.8)]),
    None, False, 1.0))

CASES.append(Case(
    "inf-norm-at-zero-plus-linear", "x.abs().max() + 0.3 x0 at 0: abs kinks feeding a 3-way max tie",
    lambda x: x.abs().max() + 0.3 * x[0], lambda: (leaf([0.0, 0.0, 0.0]),),
    dirs([(([-1.0, 0.0, 0.0],), 0.7), (([0.5, -2.0, 1.0],), 2.15), (([0.0, 0.0, 0.0],), 0.0)]),
    [[(i == 0) * s + 0.3, (i == 1) * s, (i == 2) * s] for i in range(3) for s in (-1.0, 1.0)], True, 0.0))

CASES.append(Case(
    "abs-of-max-difference", "|max(x) - max(y)| with a tie inside max(x) and equal maxima",
    lambda x, y: (x.max() - y.max()).abs(), lambda: (leaf([1.0, 1.0]), leaf([1.0, 0.0])),
    dirs([(([1.0, -1.0], [0.0, 5.0]), 1.0), (([-1.0, -2.0], [0.5, 0.0]), 1.5), (([0.2, 0.3], [0.3, 0.0]), 0.0)]),
    [[s * (i == 0), s * (i == 1), -s, 0] for i in range(2) for s in (-1.0, 1.0)], True, 0.0))

CASES.append(Case(
    "clamp-split-identity", "x.clamp(min=0) + x.clamp(max=0) = x at 0 (autograd: 2)",
    lambda x: x.clamp(min=0) + x.clamp(max=0), lambda: (leaf(0.0),),
    dirs([((1.0,), 1.0), ((-1.0,), -1.0)]), [[1.0]], False, 1.0))

# ----------------------------------------------------------------------------- losses at their margin (routed)

CASES.append(Case(
    "margin-ranking-at-margin", "F.margin_ranking_loss(margin=0.5): pair 0 exactly at the margin",
    lambda a, b: F.margin_ranking_loss(a, b, t([1.0, -1.0]).to(a), margin=0.5),
    lambda: (leaf([1.0, 0.0]), leaf([0.5, 1.0])),
    dirs([(([-1.0, 0.0], [0.0, 0.0]), 0.5), (([1.0, 0.0], [0.0, 0.0]), 0.0), (([0.2, 3.0], [0.6, -1.0]), 0.2)]),
    [[0, 0, 0, 0], [-0.5, 0, 0.5, 0]], True, 0.0))

CASES.append(Case(
    "multi-margin-at-margin", "F.multi_margin_loss: class 1 exactly at margin 1 below the target's score",
    lambda x: F.multi_margin_loss(x.reshape(1, 3), torch.tensor([0])), lambda: (leaf([2.0, 1.0, 0.5]),),
    dirs([(([0.0, 1.0, 0.0],), 1 / 3), (([0.0, -1.0, 0.0],), 0.0), (([-0.5, 0.1, 7.0],), 0.2)]),
    [[0, 0, 0], [-1 / 3, 1 / 3, 0]], True, 0.0))


def _triplet_dd(da, dp, dn):  # a=(0,0), p=(1,1), n=(2,1): sign(a-p) = sign(a-n) = (-1,-1)
    return max(0.0, -(da[0] - dp[0]) - (da[1] - dp[1]) + (da[0] - dn[0]) + (da[1] - dn[1]))


_trip_dirs = [([0.0, 0.0], [1.0, 0.0], [0.0, 0.0]), ([0.0, 0.0], [-1.0, 0.0], [0.0, 0.0]),
              ([0.4, -0.3], [0.2, 0.5], [-0.1, 0.3])]
CASES.append(Case(
    "triplet-l1-at-margin", "F.triplet_margin_loss(p=1, eps=0, margin=1): d(a,p) + 1 = d(a,n) exactly",
    lambda a, p, n: F.triplet_margin_loss(a, p, n, margin=1.0, p=1, eps=0.0),
    lambda: (leaf([[0.0, 0.0]]), leaf([[1.0, 1.0]]), leaf([[2.0, 1.0]])),
    dirs([(tuple([x] for x in d), _triplet_dd(*d)) for d in _trip_dirs]),
    [[0, 0, 0, 0, 0, 0], [0, 0, 1, 1, -1, -1]], True, 0.0))

# ----------------------------------------------------------------------------- ops gradwise has no rule for

CASES.append(Case(
    "triplet-with-distance-l1-at-margin", "F.triplet_margin_with_distance_loss (L1 distance) at the margin",
    lambda a, p, n: F.triplet_margin_with_distance_loss(a, p, n, distance_function=lambda u, v: (u - v).abs().sum(-1),
                                                        margin=1.0),
    lambda: (leaf([[0.0, 0.0]]), leaf([[1.0, 1.0]]), leaf([[2.0, 1.0]])),
    dirs([(tuple([x] for x in d), _triplet_dd(*d)) for d in _trip_dirs]),
    [[0, 0, 0, 0, 0, 0], [0, 0, 1, 1, -1, -1]], True, 0.0))

CASES.append(Case(
    "dist-at-coincident-points", "torch.dist(a, b) + 0.5 (a0 - b0) at a == b (center/contrastive loss)",
    lambda a, b: torch.dist(a, b) + 0.5 * (a[0] - b[0]), lambda: (leaf([1.0, 2.0]), leaf([1.0, 2.0])),
    dirs([(([1.0, 0.0], [0.0, 1.0]), math.sqrt(2) + 0.5), (([-1.0, 0.0], [0.0, 0.0]), 0.5),
          (([0.3, 0.4], [0.0, 0.0]), 0.5 + 0.15)]),
    None, True, 0.0))

CASES.append(Case(
    "pairwise-distance-eps0-coincident", "F.pairwise_distance(a, b, eps=0) at a == b (siamese positive pair)",
    lambda a, b: F.pairwise_distance(a, b, eps=0.0).sum(), lambda: (leaf([[1.0, 2.0]]), leaf([[1.0, 2.0]])),
    dirs([(([[1.0, 0.0]], [[0.0, 1.0]]), math.sqrt(2)), (([[3.0, 4.0]], [[0.0, 0.0]]), 5.0)]),
    None, True, 0.0))

CASES.append(Case(
    "frobenius-norm-matrix-at-zero", "torch.linalg.norm(W) + <G, W> at W = 0, ||G||_F < 1 (matrix group lasso)",
    lambda W: torch.linalg.norm(W) + (W * t([[0.2, -0.3], [0.1, 0.4]]).to(W)).sum(), lambda: (leaf([[0.0, 0.0], [0.0, 0.0]]),),
    dirs([(([[1.0, 0.0], [0.0, 1.0]],), math.sqrt(2) + 0.6), (([[-0.2, 0.3], [-0.1, -0.4]],), math.sqrt(0.3) - 0.3)]),
    None, True, 0.0))

CASES.append(Case(
    "std-of-constant-vector", "x.std() at a constant vector (normalization layers): f'(x; d) = std(d)",
    lambda x: x.std(), lambda: (leaf([1.0, 1.0, 1.0, 1.0]),),
    dirs([((d,), float(t(d).std())) for d in ([1.0, -2.0, 0.5, 0.3], [1.0, 1.0, 1.0, 0.0])]),
    None, True, 0.0))

CASES.append(Case(
    "sqrt-of-square-at-zero", "torch.sqrt(x ** 2) = |x| at 0 (hand-written norms)",
    lambda x: torch.sqrt(x ** 2), lambda: (leaf(0.0),),
    dirs([((1.0,), 1.0), ((-2.0,), 2.0)]), [[1.0], [-1.0]], True, 0.0))

CASES.append(Case(
    "aminmax-range-of-constant", "max - min via torch.aminmax at a constant vector",
    lambda x: (lambda r: r.max - r.min)(torch.aminmax(x)), lambda: (leaf([1.0, 1.0, 1.0]),),
    dirs([(([1.0, -2.0, 0.5],), 3.0), (([0.1, 0.2, 0.3],), 0.2)]),
    [[(k == i) - (k == j) for k in range(3)] for i in range(3) for j in range(3) if i != j], True, 0.0))

CASES.append(Case(
    "quantile-median-with-ties", "torch.quantile(x, 0.5) of four equal values (linear interpolation)",
    lambda x: torch.quantile(x, 0.5), lambda: (leaf([1.0, 1.0, 1.0, 1.0]),),
    dirs([(([1.0, -2.0, 0.5, 0.3],), 0.4), (([0.0, 0.0, 0.0, 1.0],), 0.0), (([-1.0, -1.0, 0.0, 0.0],), -0.5)]),
    [[0.5 * (k in (i, j)) for k in range(4)] for i in range(4) for j in range(i + 1, 4)], False, 0.5))

CASES.append(Case(
    "argsort-gather-weighted-ties", "(x[x.argsort()] * w).sum() with x0 == x1 (sort written with argsort)",
    lambda x: (x[x.argsort()] * t([1.0, 2.0, 3.0]).to(x)).sum(), lambda: (leaf([1.0, 1.0, 0.0]),),
    dirs([(([1.0, -2.0, 0.5],), 0.5 + 2 * -2 + 3 * 1), (([-1.0, 1.0, 0.0],), -2 + 3)]),
    [[2, 3, 1], [3, 2, 1]], False, math.sqrt(13.5)))

_SELU_SCALE, _SELU_ALPHA = 1.0507009873554804934193349852946, 1.6732632423543772848170429916717
CASES.append(Case(
    "selu-at-zero-stationary", "F.selu(x) - 1.4 x at 0: selu has slopes 1.0507 (right) and 1.7581 (left)",
    lambda x: F.selu(x) - 1.4 * x, lambda: (leaf(0.0),),
    dirs([((1.0,), _SELU_SCALE - 1.4), ((-1.0,), -(_SELU_SCALE * _SELU_ALPHA - 1.4))]),
    [[_SELU_SCALE - 1.4], [_SELU_SCALE * _SELU_ALPHA - 1.4]], True, 0.0))

CASES.append(Case(
    "smooth-l1-beta0-stationary", "F.smooth_l1_loss(beta=0) (= L1) at zero residual plus a linear term",
    lambda x: F.smooth_l1_loss(x, torch.zeros_like(x), beta=0.0, reduction="sum") + 0.5 * x[0] - 0.5 * x[1],
    lambda: (leaf([0.0, 0.0]),),
    dirs([(([1.0, 0.0],), 1.5), (([-1.0, 0.0],), 0.5), (([0.0, 1.0],), 0.5), (([0.4, -0.2],), 0.6 + 0.3)]),
    [[s0 + 0.5, s1 - 0.5] for s0, s1 in signs(2)], True, 0.0))

CASES.append(Case(
    "max-eigenvalue-repeated", "eigvalsh((X + X^T)/2)[-1] at X = I (double eigenvalue; spectral penalties)",
    lambda X: torch.linalg.eigvalsh((X + X.T) / 2)[-1], lambda: (leaf([[1.0, 0.0], [0.0, 1.0]]),),
    dirs([(([[1.0, 0.0], [0.0, -1.0]],), 1.0), (([[-1.0, 0.0], [0.0, -2.0]],), -1.0),
          (([[0.0, 1.0], [0.0, 0.0]],), 0.5)]),
    None, False, 1 / math.sqrt(2)))

CASES.append(Case(
    "hypot-at-origin-plus-linear", "torch.hypot(a, b) + 0.5 a at (0, 0): a 2-norm written with hypot",
    lambda a, b: torch.hypot(a, b) + 0.5 * a, lambda: (leaf(0.0), leaf(0.0)),
    dirs([((3.0, 4.0), 5.0 + 1.5), ((-1.0, 0.0), 0.5), ((0.0, -2.0), 2.0)]),
    None, True, 0.0))
