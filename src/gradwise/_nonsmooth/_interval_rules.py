"""The interval rules of ``_bound`` (one per aten op, ``INTERVAL_RULES``; ``KINK_RULES`` for ops at their kink):
how a tangent interval (center, radius) moves through an op. Exact where the op is smooth (the center by
PyTorch's forward AD); at a tie, the hull of the branches' tangents; the radius through the absolute values of
the op's coefficients (``|J| r``) or an upper bound of them. A rule that cannot bound raises ``Unbounded``.

Every rule must keep the radius an upper bound of ``|J| r``: a smaller one would be a false proof. The property
test in tests/test_bound.py checks the result against the exact least norm of enumerated pieces.

May import: torch, gradwise._ops (the shared kink facts: where an op sits at its kink).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.weak import WeakTensorKeyDictionary

from gradwise._ops._kinks import OpCall, kink_fact, slice_dims, slice_equal
from gradwise._ops._pool_kinks import max_pool_windows

__all__ = ["INTERVAL_RULES", "KINK_RULES", "Interval", "Intervals", "Unbounded", "nonneg_linear", "pointwise"]

aten = torch.ops.aten
Tensor = torch.Tensor
Interval = tuple[Tensor, Tensor]  # (center, radius >= 0), shaped like the tensor
Rule = Callable[..., Any]  # (func, args, kwargs, out, iv) -> interval, list of intervals (None: no interval), or None


class Unbounded(Exception):
    """An op the interval pass cannot bound: no lower bound is claimed."""


class Intervals:
    """The tangent interval of each tensor of the pass, checked against in-place writes by version."""

    def __init__(self) -> None:
        self._of = WeakTensorKeyDictionary()

    def get(self, t: object) -> Interval | None:
        if not isinstance(t, Tensor):
            return None
        entry = self._of.get(t)
        if entry is None:
            return None
        c, r, version = entry
        if version is None:  # set by an in-place op, whose version bump comes after its handler returns
            self._of[t] = (c, r, t._version)
        elif t._version != version:  # written in place since (or through a view): the interval is stale
            raise Unbounded(f"an in-place write to a tensor of the pass ({tuple(t.shape)})")
        return c, r

    def set(self, t: Tensor, interval: Interval, written: bool = False) -> None:
        """``written``: t is an in-place op's output, its version read at the next use."""
        c, r = interval
        self._of[t] = (c.to(t.dtype).expand(t.shape), r.to(t.dtype).expand(t.shape), None if written else t._version)


def _floats(args: Sequence) -> tuple[list, list[int]]:
    """The flattened arguments (tensors inside lists too: cat, stack, index) and the positions of float tensors."""
    leaves = tree_flatten(args)[0]
    return leaves, [i for i, a in enumerate(leaves) if isinstance(a, Tensor) and a.is_floating_point()]


def _jvp(func, args: tuple, kwargs: dict, tangents: dict[int, Tensor], out_index: int = 0) -> Tensor:
    """The tangent of ``func``'s output along ``tangents`` (flattened argument position -> tangent), by PyTorch's
    forward AD."""
    leaves, spec = tree_flatten(args)
    positions = sorted(tangents)

    def call(*ts):
        full = list(leaves)
        for i, t in zip(positions, ts, strict=True):
            full[i] = t
        out = func(*tree_unflatten(full, spec), **kwargs)
        return out[out_index] if isinstance(out, (tuple, list)) else out

    primals = tuple(leaves[i] for i in positions)
    # a dispatch mode's handler runs below autograd (its keys excluded): forward AD needs them back
    excluded = torch._C._dispatch_tls_local_exclude_set()
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excluded - excluded):
        return torch.func.jvp(call, primals, tuple(tangents[i].to(leaves[i].dtype) for i in positions))[1]


def _carried(args: Sequence, iv: Intervals) -> dict[int, Interval]:
    """Flattened position -> interval, for the float arguments that carry one."""
    leaves, floats = _floats(args)
    got = {i: iv.get(leaves[i]) for i in floats}
    return {i: v for i, v in got.items() if v is not None}


def pointwise(func, args, kwargs, out, iv: Intervals) -> Interval:
    """A pointwise op away from its kinks (each output element reads one element of each input, broadcasting
    included): the center moves by the op's derivative, each input's radius by its absolute value (a diagonal
    Jacobian: |J| r = |J r| for r >= 0)."""
    got = _carried(args, iv)
    c = _jvp(func, args, kwargs, {i: v[0] for i, v in got.items()})
    r = torch.zeros_like(c)
    for i, (_, ri) in got.items():
        r = r + _jvp(func, args, kwargs, {i: ri}).abs()
    return c, r


def nonneg_linear(func, args, kwargs, out, iv: Intervals) -> Interval | list:
    """An op linear in its float inputs with non-negative coefficients (views, copies, sums, means, cat,
    gathers, padding, where, average pooling): |J| = J, so the radius goes through the op itself."""
    got = _carried(args, iv)
    outs = out if isinstance(out, (tuple, list)) else [out]
    results = []
    for k, o in enumerate(outs):
        if not (isinstance(o, Tensor) and o.is_floating_point()):
            results.append(None)
            continue
        c = _jvp(func, args, kwargs, {i: v[0] for i, v in got.items()}, k)
        r = _jvp(func, args, kwargs, {i: v[1] for i, v in got.items()}, k)
        results.append((c, r))
    return results if isinstance(out, (tuple, list)) else results[0]


def _nll_loss(func, args, kwargs, out, iv: Intervals) -> list:
    """nll_loss_forward: minus non-negative class weights times picked log-probabilities, so every coefficient
    has one sign and |J| r = |J r|. Returns (loss, total_weight)."""
    weight = args[2] if len(args) > 2 else None
    if iv.get(args[0]) is None or (isinstance(weight, Tensor) and bool((weight < 0).any())):
        raise Unbounded(f"{func}: a tangent outside its input, or negative class weights")
    c = _jvp(func, args, kwargs, {0: iv.get(args[0])[0]})
    total = torch.zeros_like(out[1])  # total_weight: the targets' weights, no function of the input
    return [(c, _jvp(func, args, kwargs, {0: iv.get(args[0])[1]}).abs()), (total, total)]


def _batch_norm_eval(func, args, kwargs, out, iv: Intervals) -> list:
    """native_batch_norm with running statistics (eval mode): each output element reads one element of the
    input, the weight and the bias (an affine map per channel), so it bounds as a pointwise op. In training mode
    the batch statistics mix the elements: no bound."""
    training = args[5] if len(args) > 5 else kwargs.get("training")
    if training or any(iv.get(a) is not None for a in args[3:5]):
        raise Unbounded(f"{func} in training mode (batch statistics mix the elements)")
    zeros = [(torch.zeros_like(o), torch.zeros_like(o)) for o in out[1:]]
    return [pointwise(func, args, kwargs, out, iv), *zeros]


def _layer_norm(func, args, kwargs, out, iv: Intervals) -> list:
    """native_layer_norm(x, shape, weight, bias, eps) -> (y, mean, rstd), over the last len(shape) dims. With
    xh = (x - mean) rstd: dxh = rstd (dx - mean(dx) - xh mean(xh dx)), so |J| r <= rstd (r + mean(r) +
    |xh| mean(|xh| r)), times |weight|; the weight moves y by xh, the bias by 1; |d rstd| <= rstd^2 mean(|xh| r)."""
    x, weight, bias = args[0], args[2], args[3]
    dims = list(range(x.dim() - len(args[1]), x.dim()))
    _, mean, rstd = out
    zero = torch.zeros_like(x)
    rx = (iv.get(x) or (zero, zero))[1]
    xh = (x - mean) * rstd
    mean_r = rx.mean(dims, keepdim=True)
    spread = (xh.abs() * rx).mean(dims, keepdim=True)
    r = rstd * (rx + mean_r + xh.abs() * spread)
    if isinstance(weight, Tensor):
        r = r * weight.abs()
        if iv.get(weight) is not None:
            r = r + xh.abs() * iv.get(weight)[1]
    if isinstance(bias, Tensor) and iv.get(bias) is not None:
        r = r + iv.get(bias)[1]
    got = _carried(args, iv)
    centers = [_jvp(func, args, kwargs, {i: v[0] for i, v in got.items()}, k) for k in range(3)]
    return [(centers[0], r), (centers[1], mean_r), (centers[2], rstd * rstd * spread)]


def _constant(func, args, kwargs, out, iv: Intervals):
    """Outputs that are no function of the inputs' values (zeros_like, full_like, ...) and detach (autograd's
    constant): tangent 0."""
    outs = out if isinstance(out, (tuple, list)) else [out]
    zeros = [(torch.zeros_like(o), torch.zeros_like(o)) if isinstance(o, Tensor) else None for o in outs]
    return zeros if isinstance(out, (tuple, list)) else zeros[0]


def _bilinear(func, args, kwargs, out, iv: Intervals) -> Interval:
    """func bilinear in args[0] and args[1] (mm / bmm / mv / dot, convolution without its bias): the center by
    forward AD; the radius r_a through |b| plus |a| through r_b (first order of (a + da)(b + db))."""
    got = {i: iv.get(args[i]) for i in (0, 1)}
    if got[0] is None and got[1] is None:  # (only a bias carries one)
        zero = torch.zeros_like(func(*args, **kwargs))
        return zero, zero
    c = _jvp(func, args, kwargs, {i: v[0] for i, v in got.items() if v is not None})
    r = torch.zeros_like(c)
    for i, other in ((0, 1), (1, 0)):
        if got[i] is not None:
            absolute = list(args)
            absolute[other] = args[other].abs()
            r = r + _jvp(func, tuple(absolute), kwargs, {i: got[i][1]}).abs()
    return c, r


def _addmm(func, args, kwargs, out, iv):
    """addmm(bias, A, B, beta, alpha) = beta bias + alpha A B."""
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    if beta != 1 or alpha != 1:
        raise Unbounded("addmm with beta or alpha other than 1")
    got = iv.get(args[0])
    c, r = _bilinear(aten.mm.default, (args[1], args[2]), {}, None, iv)
    if got is not None:
        c, r = c + got[0], r + got[1]
    return c, r


def _convolution(func, args, kwargs, out, iv):
    """convolution(x, w, b, ...): r = |w| * r_x + |x| * r_w + r_b."""
    c, r = _bilinear(func, (args[0], args[1], None, *args[3:]), kwargs, None, iv)
    got = iv.get(args[2]) if len(args) > 2 else None
    if got is not None:
        shape = (1, -1) + (1,) * (out.dim() - 2)
        c, r = c + got[0].reshape(shape), r + got[1].reshape(shape)
    return c, r


def _log_softmax(func, args, kwargs, out, iv):
    """log_softmax: J = I - 1 p^T, so |J| r <= r + (p . r) along the dim."""
    c, r = iv.get(args[0])
    dim = args[1]
    p = out.exp()
    return _jvp(func, args, kwargs, {0: c}), r + (p * r).sum(dim, keepdim=True)


def _softmax(func, args, kwargs, out, iv):
    """softmax: J = diag(p) - p p^T, so |J| r <= p r + p (p . r) along the dim."""
    c, r = iv.get(args[0])
    return _jvp(func, args, kwargs, {0: c}), out * r + out * (out * r).sum(args[1], keepdim=True)


def _between(lo: Tensor, hi: Tensor) -> Interval:
    """The interval [lo, hi] as (center, radius)."""
    return (lo + hi) / 2, (hi - lo) / 2


def _hull(*intervals: Interval) -> Interval:
    return _between(torch.stack([c - r for c, r in intervals]).amin(0),
                    torch.stack([c + r for c, r in intervals]).amax(0))


def _where_hull(mask: Tensor, exact: Interval, branches: Interval) -> Interval:
    c = torch.where(mask, branches[0], exact[0])
    return c, torch.where(mask, branches[1], exact[1])


def _call(func, args, kwargs, out) -> OpCall:
    return OpCall(args, kwargs, out, func.overloadpacket.__name__)


def _kink_mask(func, args, kwargs, out) -> Tensor:
    """Where the call sits at its kink, from the shared kink facts (the call is known to be at one)."""
    site = kink_fact(func).site(_call(func, args, kwargs, out))
    return (site.mask() if callable(site.mask) else site.mask).bool()


def _zero_branch(func, args, kwargs, out, iv):
    """relu at 0, clamp / hardtanh at a bound, threshold at its threshold: the branches' tangents are 0 and the
    incoming one, so the interval there is the hull of 0 and the incoming interval."""
    if any(iv.get(a) is not None for a in args[1:]):
        raise Unbounded(f"{func} with a bound that carries a tangent")
    x = iv.get(args[0])
    zero = torch.zeros_like(x[0])
    return _where_hull(_kink_mask(func, args, kwargs, out), pointwise(func, args, kwargs, out, iv),
                       _hull(x, (zero, zero)))


def _abs(func, args, kwargs, out, iv):
    """abs at 0: the branches' tangents are t and -t."""
    x = iv.get(args[0])
    return _where_hull(_kink_mask(func, args, kwargs, out), pointwise(func, args, kwargs, out, iv),
                       _hull(x, (-x[0], x[1])))


def _max_min_pair(func, args, kwargs, out, iv):
    """maximum / minimum at a tie: the hull of the two candidates' intervals."""
    zero = torch.zeros_like(out)
    a, b = ((v[0].expand(out.shape), v[1].expand(out.shape)) for v in (iv.get(t) or (zero, zero) for t in args[:2]))
    return _where_hull(_kink_mask(func, args, kwargs, out), pointwise(func, args, kwargs, out, iv), _hull(a, b))


def _tied_hull(values: Tensor, best: Tensor, x: Interval, dim, keepdim: bool) -> Interval:
    """Over ``dim`` (None or []: all): the hull of the intervals of the elements equal to ``best`` (the one element
    that is, where none ties)."""
    tied, dims = slice_equal(values, best, dim, keepdim), slice_dims(values, dim)
    return _between(torch.where(tied, x[0] - x[1], math.inf).amin(dims, keepdim=keepdim),
                    torch.where(tied, x[0] + x[1], -math.inf).amax(dims, keepdim=keepdim))


def _extreme(func, args, kwargs, out, iv):
    """amax / amin / max.dim / min.dim / max / min: the output's tangent is one tied candidate's."""
    if len(args) > 1 and isinstance(args[1], Tensor):  # max.other / min.other: elementwise
        return _max_min_pair(func, args, kwargs, out, iv)
    call = _call(func, args, kwargs, out)
    values = out[0] if isinstance(out, (tuple, list)) else out
    hull = _tied_hull(args[0], values, iv.get(args[0]), call.arg(1, "dim", None), call.arg(2, "keepdim", False))
    return [hull, None] if isinstance(out, (tuple, list)) else hull


def _sorted(func, args, kwargs, out, iv):
    """sort / topk values: each position's tangent is that of one element equal to its value (the hull over
    every element of the row with that value: at the k-th place of topk, tied ones left out included)."""
    call, x = _call(func, args, kwargs, out), args[0]
    if func.overloadpacket is aten.topk:
        k, dim, largest = call.arg(1, "k"), call.arg(2, "dim", -1), call.arg(3, "largest", True)
        if not call.arg(4, "sorted", True):
            raise Unbounded("topk(sorted=False): its order is unspecified")
    else:
        k, dim, largest = None, call.arg(1, "dim", -1), call.arg(2, "descending", False)
    c, r = iv.get(x)
    xm, cm, rm = (t.movedim(dim, -1) for t in (x, c, r))
    vals, perm = torch.sort(xm, dim=-1, descending=bool(largest), stable=True)
    lo, hi = (cm - rm).gather(-1, perm), (cm + rm).gather(-1, perm)
    group = torch.cat([torch.zeros_like(vals[..., :1], dtype=torch.long),
                       (vals[..., 1:] != vals[..., :-1]).long().cumsum(-1)], -1)  # runs of equal values
    lo = torch.full_like(lo, math.inf).scatter_reduce(-1, group, lo, "amin").gather(-1, group)
    hi = torch.full_like(hi, -math.inf).scatter_reduce(-1, group, hi, "amax").gather(-1, group)
    if k is not None:
        lo, hi = lo[..., :k], hi[..., :k]
    return [_between(lo.movedim(-1, dim), hi.movedim(-1, dim)), None]


def _max_pool2d(func, args, kwargs, out, iv):
    """max_pool2d_with_indices: each output's tangent is one tied window element's (the shared kink facts' window
    views of the input, one per kernel position)."""
    call = _call(func, args, kwargs, out)
    if call.arg(5, "ceil_mode", False):
        raise Unbounded("max_pool2d with ceil_mode")
    c, r = iv.get(args[0])
    lo = hi = None
    for at, at_lo, at_hi in zip(max_pool_windows(call, args[0], -math.inf), max_pool_windows(call, c - r, 0.0),
                                max_pool_windows(call, c + r, 0.0), strict=True):
        tied = at == out[0]
        at_lo, at_hi = torch.where(tied, at_lo, math.inf), torch.where(tied, at_hi, -math.inf)
        lo, hi = (at_lo, at_hi) if lo is None else (torch.minimum(lo, at_lo), torch.maximum(hi, at_hi))
    return [_between(lo, hi), None]


INTERVAL_RULES: dict[Any, Rule] = {}


def _register(rule: Rule, *ops) -> None:
    for op in ops:
        INTERVAL_RULES[op] = rule


_register(nonneg_linear, aten.clone, aten.contiguous, aten._to_copy, aten.cat, aten.stack, aten.sum, aten.mean,
          aten.expand, aten.repeat, aten.index_select, aten.gather, aten.constant_pad_nd, aten.where,
          aten.avg_pool2d, aten.adaptive_avg_pool2d, aten._unsafe_view, aten.flip, aten.roll, aten.index,
          aten.lift_fresh, aten.alias, aten.copy, aten.embedding)
_register(_nll_loss, aten.nll_loss_forward)
_register(_batch_norm_eval, aten.native_batch_norm, aten._native_batch_norm_legit_no_training)
_register(_layer_norm, aten.native_layer_norm)
_register(_constant, aten.detach, aten.zeros_like, aten.ones_like, aten.full_like, aten.empty_like,
          aten.new_zeros, aten.new_ones, aten.new_full, aten.new_empty, aten.empty_strided, aten.new_empty_strided)
_register(_bilinear, aten.mm, aten.bmm, aten.mv, aten.dot)
_register(_addmm, aten.addmm)
_register(_convolution, aten.convolution)
_register(_log_softmax, aten._log_softmax)
_register(_softmax, aten._softmax)
# at a kink (the shared facts' site): these rules give the branches' hull; elsewhere the op is smooth
KINK_RULES = {aten.relu: _zero_branch, aten.clamp: _zero_branch, aten.clamp_min: _zero_branch,
               aten.clamp_max: _zero_branch, aten.hardtanh: _zero_branch, aten.threshold: _zero_branch,
               aten.abs: _abs, aten.maximum: _max_min_pair, aten.minimum: _max_min_pair}
_register(_extreme, aten.amax, aten.amin, aten.max, aten.min)
_register(_max_pool2d, aten.max_pool2d_with_indices)
_register(_sorted, aten.sort, aten.topk)
