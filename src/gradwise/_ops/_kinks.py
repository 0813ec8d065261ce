"""Where aten ops kink: ``_KINKY`` (aten op -> test), ``_KINKY_BY_NAME``, ``_UNSEEN_KINKY`` and the tests they use.

Each test takes ``(args, kwargs, out)`` of one aten call (plain tensors) and returns a bool: whether that call
sits at its kink (or singular point). Facts only: no engine here. Moved from ``_nonsmooth``; the trace's detectors
follow into this table next.

May import: torch and math only (no gradwise module).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

aten = torch.ops.aten
Tensor = torch.Tensor


def _any_eq(a, b) -> bool:
    return bool((a == b).any())


def _float(t) -> bool:
    return isinstance(t, Tensor) and t.is_floating_point()


def _at_zero(args, kwargs, out) -> bool:
    return _any_eq(args[0], 0)


def _at_bounds(lo_i: int, hi_i: int | None, lo=None, hi=None) -> Callable:
    def test(args, kwargs, out):
        x = args[0]
        bounds = [args[lo_i] if len(args) > lo_i else lo]
        if hi_i is not None:
            bounds.append(args[hi_i] if len(args) > hi_i else hi)
        return any(b is not None and _any_eq(x, b) for b in bounds)
    return test


def _equal_operands(args, kwargs, out) -> bool:
    return _float(args[0]) and _any_eq(args[0], args[1])


def _extreme_ties(args, kwargs, out) -> bool:
    """max/min/argmax/argmin/aminmax, full or over a dim: more than one element equals the extreme."""
    x = args[0]
    if not _float(x) or x.numel() < 2:
        return False
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    if isinstance(dim, (list, tuple)):
        dim = tuple(dim) or None
    tests = [torch.amax, torch.amin]
    for extreme in tests:
        e = extreme(x) if dim is None else extreme(x, dim, keepdim=True)
        if bool(((x == e).sum(dim if dim is not None else tuple(range(x.dim())) or None) > 1).any()):
            return True
    return False


def _any_ties(args, kwargs, out) -> bool:
    """sort/topk/median/max-pool ...: conservatively, two equal values anywhere in the input."""
    x = args[0]
    return _float(x) and x.numel() > 1 and torch.unique(x).numel() < x.numel()


def _eigen_ties(args, kwargs, out) -> bool:
    """eigh: repeated eigenvalues (they come sorted; a zero eigenvalue is no kink)."""
    vals = out[0]
    return vals.shape[-1] > 1 and bool((vals.diff(dim=-1) == 0).any())


def _singular_value_ties(args, kwargs, out) -> bool:
    """svd: repeated singular values, or a zero one (|sigma| is not differentiable at 0)."""
    vals = out[1]
    return (vals.shape[-1] > 1 and bool((vals.diff(dim=-1) == 0).any())) or bool((vals == 0).any())


def _half_integral(args, kwargs, out) -> bool:
    """round jumps halfway between the numbers it rounds to (x.5, or x.5 * 10**-decimals); it is flat at them."""
    decimals = args[1] if len(args) > 1 else kwargs.get("decimals", 0)
    y = args[0] * 10.0**decimals if decimals else args[0]
    return _any_eq(y - y.floor(), 0.5)


def _integral(args, kwargs, out) -> bool:
    return _any_eq(args[0], args[0].round())


def _norm_at_zero(args, kwargs, out) -> bool:
    return _any_eq(out, 0) or (len(args) > 1 and args[1] in (1, math.inf, -math.inf) and _any_eq(args[0], 0))


def _renorm_boundary(args, kwargs, out) -> bool:
    x, p, dim, maxnorm = args[:4]
    norms = torch.linalg.vector_norm(x.movedim(dim, 0).reshape(x.shape[dim], -1), p, 1)
    return _any_eq(norms, maxnorm)


# aten op -> whether its call sits at its kink (or singular point); values are plain tensors. Comparisons and
# amax/amin are left out: PyTorch's own implementations use them away from kinks (zero and overflow guards).
_KINKY: dict[object, Callable] = {
    **dict.fromkeys([aten.abs, aten.sgn, aten.sign, aten.relu, aten.leaky_relu, aten.prelu, aten._prelu_kernel,
                     aten.rrelu_with_noise, aten.sqrt, aten.rsqrt], _at_zero),
    aten.elu: lambda a, k, o: (a[1] if len(a) > 1 else 1) * (a[3] if len(a) > 3 else 1) != 1 and _at_zero(a, k, o),
    aten.threshold: _at_bounds(1, None),
    aten.hardtanh: _at_bounds(1, 2, -1.0, 1.0),
    aten.clamp: _at_bounds(1, 2),
    aten.clamp_min: _at_bounds(1, None),
    aten.clamp_max: _at_bounds(1, None),
    **dict.fromkeys([aten.softshrink, aten.hardshrink],
                    lambda a, k, o: _any_eq(a[0].abs(), a[1] if len(a) > 1 else 0.5)),
    **dict.fromkeys([aten.maximum, aten.minimum, aten.fmax, aten.fmin, aten.l1_loss], _equal_operands),
    aten.smooth_l1_loss: lambda a, k, o: (a[3] if len(a) > 3 else k.get("beta", 1.0)) == 0 and _equal_operands(a, k, o),
    aten.hypot: lambda a, k, o: bool(((a[0] == 0) & (a[1] == 0)).any()),
    **dict.fromkeys([aten.max, aten.min, aten.argmax, aten.argmin, aten.aminmax], _extreme_ties),
    **dict.fromkeys([aten.sort, aten.topk, aten.kthvalue, aten.median, aten.nanmedian, aten.mode, aten.cummax,
                     aten.cummin, aten.max_pool2d_with_indices, aten.max_pool3d_with_indices,
                     aten.adaptive_max_pool2d, aten.adaptive_max_pool3d, aten.fractional_max_pool2d,
                     aten.fractional_max_pool3d], _any_ties),
    aten._linalg_eigh: _eigen_ties,
    aten._linalg_svd: _singular_value_ties,
    **dict.fromkeys([aten.remainder, aten.fmod], lambda a, k, o: _float(a[0]) and _integral([a[0] / a[1]], k, o)),
    **dict.fromkeys([aten.floor, aten.ceil, aten.trunc, aten.frac], _integral),
    aten.round: _half_integral,
    **dict.fromkeys([aten.linalg_vector_norm, aten.norm], _norm_at_zero),
    aten.renorm: _renorm_boundary,
    aten.copysign: lambda a, k, o: _any_eq(a[0], 0) or (isinstance(a[1], Tensor) and _any_eq(a[1], 0)),
}
def _reduce_ties(src_i: int, reduce_i: int, self_i: int | None) -> Callable:
    """scatter_reduce / index_reduce with amax or amin: more than one element (the destination's own with
    include_self) equals a group's result. Other reductions are smooth (sum, mean) or not kinks (prod)."""
    def test(args, kwargs, out):
        reduce = args[reduce_i] if len(args) > reduce_i else kwargs.get("reduce")
        if reduce not in ("amax", "amin"):
            return False
        dest, dim, index, src = args[0], args[1], args[2], args[src_i]
        include_self = args[self_i] if self_i is not None and len(args) > self_i else kwargs.get("include_self", True)
        if src_i == 3 and index.dim() == 1:  # index_reduce: one index per slice along dim
            shape = [1] * src.dim()
            shape[dim] = -1
            index = index.view(shape).expand(src.shape)
        hits = (src == out.gather(dim, index)).to(out.dtype)
        count = torch.zeros_like(out).scatter_add_(dim, index, hits)
        if include_self:
            count += dest == out
        return bool((count > 1).any())
    return test


def _bag_max_ties(args, kwargs, out) -> bool:
    """embedding_bag(mode='max'): conservatively, two selected rows with an equal value in a column."""
    weight, indices, mode = args[0], args[1], args[4] if len(args) > 4 else kwargs.get("mode", 0)
    if mode != 2 or indices.numel() < 2:
        return False
    return bool((weight[indices.reshape(-1)].sort(0).values.diff(dim=0) == 0).any())


_KINKY[aten._embedding_bag] = _KINKY[aten._embedding_bag_forward_only] = _bag_max_ties
_KINKY[aten.scatter_reduce] = _reduce_ties(3, 4, 5)
_KINKY[aten.index_reduce] = _reduce_ties(3, 4, 5)
_KINKY_BY_NAME = {op.__name__: test for op, test in _KINKY.items()}
# In code the mode cannot see (TorchScript), comparisons and amax/amin at ties are kinks too: nothing routes them.
_UNSEEN_KINKY = {**_KINKY_BY_NAME, **dict.fromkeys(("gt", "ge", "lt", "le", "eq", "ne"), _equal_operands),
                 **dict.fromkeys(("amax", "amin"), _extreme_ties)}
