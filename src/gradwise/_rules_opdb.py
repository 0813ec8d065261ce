"""Strong-zero rules for backwards the op_db sweep found contaminated: logcumsumexp, segment_reduce.

logcumsumexp's backward (FunctionsManual.cpp, after TensorFlow) takes log|g| and runs a reverse logcumsumexp of
``log|g_i| - result_i``: a structural g_i = 0 becomes the lowest float there, which then meets the NaN of
``result_i`` (a discarded NaN input) and spreads along the whole dimension. The exact gradient is
``grad_j = sum over i >= j of g_i exp(x_j - result_i)``, in which a structural g_i has no term at all. The rule
recomputes the formula when its last op runs (the node's saved self, result and dim; g and its support stashed
at its first op, ``abs(g)``), with the structural terms left out (-inf in log space) and the positions that no
kept term reaches set to structural zeros.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import torch

from gradwise import _strong_zeros as _sz
from gradwise._rules_registry import _placement

aten = torch.ops.aten


class _Stash(threading.local):
    lcse: list | None = None  # [g, its support, how many subs the formula has run]


_STASH = _Stash()
_LCSE = "LogcumsumexpBackward0"


def _abs(func, args, kwargs, sup):
    """abs: |x| is 0 exactly where x is, so a structural zero stays one (as _linear). In logcumsumexp's backward
    (its first op on g) the sensitivity and its support are kept for the formula's last op."""
    g = args[0]
    if _sz._in_formula() and _sz._in_node(_LCSE) and _sz._is_float(g) and not g.is_complex():
        s = sup.of(g)
        _STASH.lcse = None if s is None else [g, s.expand(g.shape), 0]
        out = func(*args, **kwargs)
        sup.record(out, None)  # the formula's result is recomputed at its end: its steps need no supports
        return out
    return _sz._linear(func, args, kwargs, sup)


def _reverse_logcumsumexp(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t.flip(dim).logcumsumexp(dim).flip(dim)


def _logcumsumexp_grad(g: torch.Tensor, s: torch.Tensor, node: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact gradient with the structural terms left out, and its support (some kept term reaches j)."""
    x, result, dim = node._saved_self, node._saved_result, node._saved_dim
    dim = dim % max(g.dim(), 1)
    lowest = torch.finfo(g.dtype).min
    log_abs = g.abs().log()
    parts = []
    for sign in (g > 0, g < 0):
        log_g = torch.where(sign, log_abs, lowest)  # as PyTorch for kept terms
        terms = torch.where(s, log_g - result, -math.inf)  # a structural term is absent
        parts.append((_reverse_logcumsumexp(terms, dim) + x).exp())
    kept = s.to(torch.uint8).flip(dim).cummax(dim).values.flip(dim).bool()
    return torch.where(kept, parts[0] - parts[1], 0), kept


def _sub(func, args, kwargs, sup):
    """sub, as _sum. The last op of logcumsumexp's backward (output_pos - output_neg) returns the exact gradient
    computed from the stash (see the module docstring) instead."""
    stash = _STASH.lcse
    if stash is None or not _sz._in_node(_LCSE):
        return _sz._sum(func, args, kwargs, sup)
    stash[2] += 1
    if stash[2] < 3:  # log|g+| - result, log|g-| - result, then output_pos - output_neg
        return _sz._sum(func, args, kwargs, sup)
    _STASH.lcse = None
    g, s = stash[0], stash[1]
    out, kept = _logcumsumexp_grad(g, s, torch._C._current_autograd_node())
    out = out.to(args[0].dtype)
    sup.record(out, kept)
    return out


_sz._register(aten.abs.default)(_abs)
_sz._register(aten.sub.Tensor)(_sub)


def _segment_reduce_backward(func, args, kwargs, sup):
    """_segment_reduce_backward(grad, output, data, reduce, lengths, offsets, axis, initial): for sum, mean, max
    and min each element's gradient is its segment's sensitivity times a non-negative weight (1, 1/length, a tie
    share of the selected extreme), so an element whose segment's sensitivity is a structural zero gets one (a
    dropped segment's NaN data then meets no zero downstream). prod's weights are values: run as it is."""
    reduce = args[3] if len(args) > 3 else kwargs.get("reduce")
    if reduce not in ("sum", "mean", "max", "min") or _sz._tracked_slots(args, sup) not in ([], [0]):
        return _sz._run_unruled(func, args, kwargs, sup, "a value-weighted reduction" if sup.tracked(args[0]) else None)
    return _placement(func, args, kwargs, sup)


_sz._register(aten._segment_reduce_backward)(_segment_reduce_backward)
