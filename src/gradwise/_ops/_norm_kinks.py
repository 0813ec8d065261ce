"""Where norms and distances are singular (an all-zero slice, coincident points) or kink (ties of an inf-norm,
renorm at its bound) and PyTorch's convention there: added to ``_kinks.KINKS`` apart from the elementwise and
selection facts, as ``_pool_kinks`` adds pooling's.

May import: torch, math, ``_kinks``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from gradwise._ops._kinks import Site, _float, _kink, _slice_ties, slice_dims

aten = torch.ops.aten
Tensor = torch.Tensor


@_kink(aten.linalg_vector_norm, aten.norm, kind="singular", needs_out=True, convention="0 at 0")
def _norm_at_zero(c):
    """A vector norm of an all-zero slice: not differentiable there; PyTorch's backward uses 0. For p <= 1 also
    each zero element (|x| kinks; the backward uses sign(0) = 0), for p = ±inf ties among the largest
    (smallest) |x| of a slice (the backward splits evenly)."""
    x, out = c.args[0], c.out
    if not isinstance(x, Tensor) or not (x.is_floating_point() or x.is_complex()):
        return None
    p = c.arg(1, "ord", c.kwargs.get("p", 2))
    p = 2 if p is None else p
    dim, keepdim = c.arg(2, "dim", None), c.arg(3, "keepdim", False)
    if dim is not None and not isinstance(dim, int) and not list(dim):
        dim = None
    if dim is not None and not keepdim:
        for d in sorted(d % x.dim() for d in ([dim] if isinstance(dim, int) else dim)):
            out = out.unsqueeze(d)
    mask = torch.broadcast_to(out == 0, x.shape)
    if p in (math.inf, -math.inf):
        site = Site(mask | _slice_ties(x.abs(), out, dim, True), aligned=False, kind="kink",
                    convention="split evenly among tied |x|; 0 at an all-zero slice")
    elif p <= 1:
        site = Site(mask | (x == 0), aligned=False, kind="kink", convention="0 at a zero element (sign(0) = 0)")
    else:
        site = Site(mask, aligned=False)
    dims = tuple(slice_dims(x, dim))  # the norms whose slice holds a kink

    def reads() -> Tensor:
        at = site.mask.any(dims, keepdim=True) if x.dim() else site.mask
        return at if keepdim or not x.dim() else at.squeeze(dims)

    site.reads = reads
    return site


def _distance_site(out: Tensor, p: float, diffs: Callable[[], Tensor]) -> Site | None:
    """Where distances ``out`` = ||d||_p of pair differences (``diffs()``: shaped like out plus one last dim,
    made only for p other than 2) sit at a kink: coincident points (a norm at 0; PyTorch's backward uses 0) for
    any p > 0; for p <= 1 also a coordinate difference of 0 (|t|^p kinks there, singular for p < 1), for p = inf
    ties among the largest |coordinate difference| (the backward splits evenly). p = 0 counts differing
    coordinates: it jumps where one is equal."""
    if p == 0:
        return Site((diffs() == 0).any(-1), kind="jump", convention="0, as on both sides")
    if p == math.inf:
        return Site((out == 0) | ((diffs().abs() == out.unsqueeze(-1)).sum(-1) > 1), kind="kink",
                    convention="split evenly among tied |coordinate differences|; 0 at coincident points")
    if p <= 1:
        return Site((out == 0) | (diffs() == 0).any(-1), kind="kink" if p == 1 else "singular",
                    convention="0 at a zero coordinate difference (sign(0) = 0)")
    return Site(out == 0)


@_kink(aten._cdist_forward, kind="singular", needs_out=True, convention="0 at coincident points")
def _cdist_at_coincident_points(c):
    """cdist(x1, x2, p) at a pair of points that coincide (and, by p, at equal coordinates): ``_distance_site``.
    (torch.cdist with p = 2 and more than 25 rows takes the matrix-product route: ``_euclidean_dist``.)"""
    x1, x2 = c.args[0], c.args[1]
    if not _float(x1):
        return None
    return _distance_site(c.out, float(c.arg(2, "p", 2.0)), lambda: x1.unsqueeze(-2) - x2.unsqueeze(-3))


@_kink(aten._euclidean_dist, kind="singular", needs_out=True, convention="0 at coincident points")
def _euclidean_dist_at_coincident_points(c):
    """cdist's matrix-product route (p = 2, more than 25 rows): sqrt(|a|^2 + |b|^2 - 2 a.b) clamped at 1e-30, whose
    backward masks res == 0 only, but gives 0 wherever the rows coincide (their difference is 0). The rounded
    product leaves no exact 0 there, so the pairs near 0 (within the rounding of the squared norms) are read
    again, row against row: coincident rows, as ``_cdist_forward``'s p = 2 route reports them."""
    x1, x2, out = c.args[0], c.args[1], c.out
    if not _float(x1) or not out.numel():
        return None
    n1, n2 = x1.square().sum(-1, keepdim=True), x2.square().sum(-1).unsqueeze(-2)
    near = out.square() <= 16 * torch.finfo(out.dtype).eps * (n1 + n2) + 1e-28
    if not near.any():
        return Site(near)
    # coincident: the same distinct row on both sides (ids per batch, in float64: exact for every float), not a copy
    # of both rows per near pair (2,000 equal rows of 64 made two 4M x 64 copies: 23x the plain backward)
    rows = torch.cat((x1.expand(*out.shape[:-2], *x1.shape[-2:]), x2.expand(*out.shape[:-2], *x2.shape[-2:])), -2)
    rows = rows.reshape(-1, *rows.shape[-2:]).double()
    tag = torch.arange(rows.shape[0], dtype=rows.dtype).view(-1, 1, 1).expand(-1, rows.shape[1], 1)
    ids = torch.unique(torch.cat((tag, rows), -1).flatten(0, 1), dim=0, return_inverse=True)[1].view(rows.shape[:2])
    k = x1.shape[-2]
    return Site(near & (ids[:, :k, None] == ids[:, None, k:]).view(out.shape))


@_kink(aten._pdist_forward, kind="singular", needs_out=True, convention="0 at coincident points")
def _pdist_at_coincident_points(c):
    """pdist(x, p) at a pair of rows that coincide (and, by p, at equal coordinates): ``_distance_site``, pairs
    (i < j) in pdist's order."""
    x = c.args[0]
    if not _float(x) or x.shape[0] < 2:
        return None

    def diffs() -> Tensor:
        i, j = torch.triu_indices(x.shape[0], x.shape[0], 1, device=x.device)
        return x[i] - x[j]

    return _distance_site(c.out, float(c.arg(1, "p", 2.0)), diffs)


@_kink(aten.dist, kind="singular", needs_out=True, convention="0 at coincident points")
def _dist_at_coincident_points(c):
    """dist(a, b, p) = ||a - b||_p where a == b (and, by p, where an element of a equals b's): ``_distance_site``,
    aligned with the (scalar) output."""
    a, b = c.args[0], c.args[1]
    if not _float(a):
        return None
    return _distance_site(c.out, float(c.arg(2, "p", 2.0)), lambda: (a - b).reshape(-1))


@_kink(aten.renorm, convention="the unscaled side (gradient 1) at norm = maxnorm")
def _renorm_boundary(c):
    """renorm where a slice's norm equals maxnorm: rescaling starts there; the backward takes the unscaled side."""
    x, p, dim, maxnorm = c.args[:4]
    if not _float(x):
        return None
    dim %= x.dim()
    norms = torch.linalg.vector_norm(x.movedim(dim, 0).reshape(x.shape[dim], -1), p, 1)
    shape = [1] * x.dim()
    shape[dim] = -1
    return Site(torch.broadcast_to((norms == maxnorm).view(shape), x.shape))
