"""Round 5: functions evaluated exactly at kinks (same format as ../shared/cases/nonsmooth.py), modelled on public
reports: piecewise-linear interpolation through knots (the segment index from torch.searchsorted / bucketize,
then a gather and a lerp: continuous, with a kink at each knot), ELU with alpha != 1, LP pooling at a zero
window, pooling and order statistics with ties, grid_sample at pixel centres.

Data: directional derivatives as <grad f(x + 1e-8 d), d> (autograd inside the piece active along d); vertices
as autograd gradients at x pushed 1e-7 into each piece (hand-chosen plus random pushes); min_norm by NNLS over
the vertices. All validated with ``check_nonsmooth.py --self-check`` (float64 one-sided finite differences,
nearby gradients are listed vertices).
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # loaded by path: _format sits beside this file
from _format import leaves, nonsmooth_table, t

CASES, add = nonsmooth_table()

# ------------------------------------------------------------------------------------ interpolation at knots

_XP, _FP = [0.0, 1.0, 2.0, 3.0], [0.0, 2.0, 1.0, 3.0]
_KNOT_DIRS = [([1, 0],), ([-1, 0],), ([-1, 1],), ([0.3, -0.2],)]


def _interp(x, right=False):
    """pytorch/pytorch#50334's `interp` (slopes and intercepts per segment, the segment from searchsorted)."""
    xp, fp = t(_XP).to(x), t(_FP).to(x)
    m = (fp[1:] - fp[:-1]) / (xp[1:] - xp[:-1])
    b = fp[:-1] - m * xp[:-1]
    i = (torch.searchsorted(xp, x, right=right) - 1).clamp(0, len(_XP) - 2)
    return (m[i] * x + b[i]).sum()


add("interp1d-searchsorted-at-knot", "pytorch/pytorch#50334 (np.interp for torch: the searchsorted "
    "implementation in the thread) evaluated at a knot, x0 = 1 (slope 2 on the left, -1 on the right)",
    _interp, leaves([1.0, 2.5]), _KNOT_DIRS)

add("interp1d-searchsorted-right-at-knot", "as pytorch/pytorch#50334 with searchsorted(right=True)",
    lambda x: _interp(x, right=True), leaves([1.0, 2.5]), _KNOT_DIRS)


def _interp_bucketize(x):
    xp, fp = t(_XP).to(x), t(_FP).to(x)
    i = (torch.bucketize(x, xp) - 1).clamp(0, 2)
    return torch.lerp(fp[i], fp[i + 1], (x - xp[i]) / (xp[i + 1] - xp[i])).sum()


add("interp1d-bucketize-lerp-at-knots", "pytorch/pytorch#1552 (unstructured interpolation, 'simple with a "
    "searchsorted'): torch.bucketize for the segment and torch.lerp, both query points on knots",
    _interp_bucketize, leaves([1.0, 2.0]), [([1, 0],), ([-1, 0],), ([-1, 1],), ([0.3, -0.2],), ([1, -1],)])


def _spender_interp1d(x, y, xnew):
    """pmelchior/spender#54's batched interp1d (searchsorted, gather of slopes, mask outside the range)."""
    indices = (torch.searchsorted(x, xnew) - 1).clamp(0, x.shape[1] - 2)
    slopes = (y[:, :-1] - y[:, 1:]) / (x[:, :-1] - x[:, 1:])
    ynew = torch.gather(y, 1, indices) + (xnew - torch.gather(x, 1, indices)) * torch.gather(slopes, 1, indices)
    mask = (xnew < x[..., 0].reshape(-1, 1)) | (xnew > x[..., -1].reshape(-1, 1))
    return ynew.masked_fill(mask, 0.0)


_SPX, _SPY = [[0.0, 1.0, 2.0], [0.0, 0.5, 1.0]], [[0.0, 2.0, 1.0], [1.0, 0.0, 1.0]]
add("spender-batched-interp1d-at-knots", "pmelchior/spender#54 (batched interp1d with searchsorted and gather, "
    "rewritten because interp1d crashed under autograd): query points on interior knots of both rows",
    lambda xnew: (_spender_interp1d(t(_SPX).to(xnew), t(_SPY).to(xnew), xnew) * t([[1.0, 1.0], [1.0, -1.0]])
                  .to(xnew)).sum(),
    leaves([[1.0, 1.5], [0.5, 0.25]]),
    [([[1, 0], [0, 0]],), ([[-1, 0], [0, 0]],), ([[0, 0], [1, 0]],), ([[0, 0], [-1, 0]],),
     ([[-0.3, 0.1], [0.2, 0.4]],)])


def _mrpro_interp(x, xp):
    """PTB-MR/mrpro#983's torch interp: clamp the query into [xp0, xp-1], searchsorted, lerp (knots learnable)."""
    fp = t(_FP).to(x)
    xc = torch.clamp(x, min=xp[0], max=xp[-1])
    i = (torch.searchsorted(xp, xc, right=True) - 1).clamp(0, len(_XP) - 2)
    return torch.lerp(fp[i], fp[i + 1], (xc - xp[i]) / (xp[i + 1] - xp[i])).sum()


add("mrpro-interp-clamped-query-on-last-knot-learnable-knots", "PTB-MR/mrpro#983 (np.interp in torch: clamp to the "
    "range, then searchsorted): x0 on the last knot (the clamp bound and a knot at once), x1 on an interior "
    "knot, the knots themselves inputs", _mrpro_interp, leaves([3.0, 1.0], _XP),
    [([1, 0], [0, 0, 0, 0]), ([-1, 0], [0, 0, 0, 0]), ([0, 1], [0, 0, 0, 0]), ([0, -1], [0, 0, 0, 0]),
     ([0, 0], [0, 0.5, 0, 0]), ([0, 0], [0, 0, 0, 1]), ([0.2, -0.1], [0.1, -0.3, 0.2, 0.4])],
    stationary=True)  # 1/3 and 2/3 of x1's two segments, x0's clamped piece: 0 (the pushed vertices carry 1e-7 noise)

# ------------------------------------------------------------------------------------ activations and pooling

add("elu-alpha2-at-zero", "tensorflow/tensorflow#62434 and chainer/chainer#754 (ELU is not differentiable at 0 "
    "when alpha != 1): F.elu(x, alpha=2) - 1.5 x at 0, slopes 2 (left) and 1 (right): stationary",
    lambda x: (F.elu(x, 2.0) - 1.5 * x).sum(), leaves([0.0, 1.0]), [([1, 0],), ([-1, 0],), ([-1, 1],)])

add("lp-pool1d-p1-zero-window", "pytorch/pytorch#6765 and PR #6766 (LP pooling at a zero window: sign(out) * "
    "relu(|out|) added to avoid NaN): lp_pool1d with norm_type 1 (window sums) where a window sums to 0",
    lambda x: (F.lp_pool1d(x.reshape(1, 1, 4), 1, 2) * t([1.0, -2.0]).to(x)).sum(), leaves([1.0, -1.0, 2.0, 0.5]),
    [([1, 0, 0, 0],), ([-1, 0, 0, 0],), ([0, 1, 0, 0],), ([0.3, 0.2, -0.1, 0.4],)])

add("lp-pool2d-p2-all-zero-window", "pytorch/pytorch#6765 (the gradient of LP pooling is undefined when the "
    "window is all zero): lp_pool2d with norm_type 2 over a zero window: a 2-norm at 0 (continuum), plus a "
    "linear term", lambda x: F.lp_pool2d(x.reshape(1, 1, 2, 2), 2, 2).sum() + 0.5 * x[0],
    leaves([0.0, 0.0, 0.0, 0.0]), [([1, 0, 0, 0],), ([-1, 0, 0, 0],), ([0.6, 0.8, 0, 0],)],
    vertices=None, stationary=True, mn=0.0)

add("max-pool3d-tied-window", "Theano/Theano#5404 (max pooling gradient at tied maxima differs between "
    "implementations): F.max_pool3d over a 2x2x2 window with three tied maxima",
    lambda x: F.max_pool3d(x.reshape(1, 1, 2, 2, 2), 2).sum() - 0.25 * x.sum(),
    leaves([1.0, 3.0, 3.0, 0.0, 2.0, 1.0, 0.0, 3.0]),
    [([0, 1, 0, 0, 0, 0, 0, 0],), ([0, -1, 0, 0, 0, 0, 0, 0],), ([0.1, 0.2, 0.3, 0.1, 0.2, 0.3, 0.1, 0.5],)])

add("adaptive-max-pool2d-tied-window", "tensorflow/tensorflow#51682 (max pooling and reduce_max disagree at tied "
    "maxima): F.adaptive_max_pool2d to (1, 1) with two tied maxima",
    lambda x: F.adaptive_max_pool2d(x.reshape(1, 1, 2, 2), 1).sum() - 0.5 * x[1] - 0.5 * x[2],
    leaves([1.0, 2.0, 2.0, 0.0]), [([0, 1, 0, 0],), ([0, 0, 1, 0],), ([0.3, 0.1, 0.2, 0.4],)])

# ------------------------------------------------------------------------------------ order statistics

add("kthvalue-tied-kth", "Theano/Theano#4568 (the gradient of max at ties is not in the subdifferential): "
    "torch.kthvalue(x, 2) with the 2nd smallest tied, minus half of each tied entry: stationary",
    lambda x: torch.kthvalue(x, 2).values - 0.5 * x[0] - 0.5 * x[2], leaves([1.0, 0.0, 1.0, 3.0]),
    [([1, 0, 0, 0],), ([0, 0, 1, 0],), ([-1, 0, 0, 0],), ([0.1, 0.2, -0.3, 0.4],)])

add("nanmedian-tied-median", "Theano/Theano#4568 for order statistics: torch.nanmedian (the NaN-padding-safe median) "
    "of a NaN-free vector with the median tied three ways",
    lambda x: torch.nanmedian(x) - 0.2 * x.sum(), leaves([1.0, 1.0, 0.0, 3.0, 1.0]),
    [([1, 0, 0, 0, 0],), ([0, -1, 0, 0, 0],), ([0.1, 0.2, 0.3, 0.4, 0.5],)])

# ------------------------------------------------------------------------------------ known limits

_IMG = [[[[0.0, 1.0, 4.0], [2.0, 5.0, 3.0], [1.0, 0.0, 2.0]]]]
add("grid-sample-bilinear-on-pixel-centre", "pytorch/pytorch#81868 and #23925 (grid_sample bilinear at integer "
    "pixel locations and exactly on the border: wrong gradients in image registration with zero displacement): "
    "the sampled value as a function of the grid point is piecewise bilinear with kinks on the pixel lines",
    lambda g: F.grid_sample(t(_IMG).to(g), g.reshape(1, 1, 1, 2), mode="bilinear", align_corners=True).sum(),
    leaves([0.0, 0.0]), [([1, 0],), ([-1, 0],), ([0, 1],), ([0, -1],), ([0.3, -0.7],)])
