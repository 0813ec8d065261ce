"""Strong-zero rules for backwards the op_db sweep (and reported cases) found contaminated: logcumsumexp,
segment_reduce, the FFTs, matrix_exp.

logcumsumexp's backward (FunctionsManual.cpp, after TensorFlow) takes log|g| and runs a reverse logcumsumexp of
``log|g_i| - result_i``: a structural g_i = 0 becomes the lowest float there, which then meets the NaN of
``result_i`` (a discarded NaN input) and spreads along the whole dimension. The exact gradient is
``grad_j = sum over i >= j of g_i exp(x_j - result_i)``, in which a structural g_i has no term at all. The rule
recomputes the formula when its last op runs (the node's saved self, result and dim; g and its support stashed
at its first op, ``abs(g)``), with the structural terms left out (-inf in log space) and the positions that no
kept term reaches set to structural zeros. For complex inputs the formula is ``conj(exp(rlcse(log(conj g) -
result) + x))``: g is stashed at its ``log`` and the exact value replaces the output of its ``exp``.

May import: torch, _rules, _rules_pointwise, _rules_bilinear, _rules_registry, _engine.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from gradwise._masks import mask_any
from gradwise._strong_zeros._engine import grad_in_pass
from gradwise._strong_zeros._rules import (
    _UNRULED,
    _annihilate,
    _hooked,
    _in_formula,
    _is_float,
    _reads_nodes,
    _register,
    _run_unruled,
    _tracked_slots,
)
from gradwise._strong_zeros._rules_bilinear import _finite
from gradwise._strong_zeros._rules_pointwise import _exp, _in_node, _linear, _sum
from gradwise._strong_zeros._rules_registry import _placement

aten = torch.ops.aten


class _Stash(threading.local):
    # [g, its support, how many subs the formula has run or "complex", its saved result, self (_saved)]
    lcse: list | None = None


_STASH = _Stash()
_LCSE = "LogcumsumexpBackward0"


def _abs(func, args, kwargs, sup):
    """abs: |x| is 0 exactly where x is, so a structural zero stays one (as _linear). In logcumsumexp's backward
    (its first op on g) the sensitivity and its support are kept for the formula's last op."""
    g = args[0]
    if _in_formula() and _in_node(_LCSE) and _is_float(g) and not g.is_complex() and _reads_nodes():
        s = sup.of(g)
        _STASH.lcse = None if s is None else [g, s.expand(g.shape), 0, None, None]  # (result, self: _saved)
        out = func(*args, **kwargs)
        sup.record(out, None)  # the formula's result is recomputed at its end: its steps need no supports
        return out
    return _linear(func, args, kwargs, sup)


def _reverse_logcumsumexp(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t.flip(dim).logcumsumexp(dim).flip(dim)


def _logcumsumexp_grad(g: torch.Tensor, s: torch.Tensor, x: torch.Tensor, result: torch.Tensor,
                       dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact gradient with the structural terms left out, and its support (some kept term reaches j)."""
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
    if stash is None or not _in_node(_LCSE):
        return _sum(func, args, kwargs, sup)
    if stash[2] == "complex":  # log(conj g) - result: the saved result, as the formula reads it (``_saved``)
        stash[3] = args[1] if stash[3] is None else stash[3]
        return _sum(func, args, kwargs, sup)
    stash[2] += 1
    if stash[2] == 1:  # log|g+| - result: the saved result, as the formula reads it (``_saved``)
        stash[3] = args[1]
    if stash[2] < 3:  # log|g+| - result, log|g-| - result, then output_pos - output_neg
        return _sum(func, args, kwargs, sup)
    _STASH.lcse = None
    saved = _saved(torch._C._current_autograd_node(), stash)
    if saved is None:
        return _sum(func, args, kwargs, sup)
    return _recorded(_logcumsumexp_grad(stash[0], stash[1], *saved), args[0].dtype, sup)


def _add(func, args, kwargs, sup):
    """add, as _sum. In logcumsumexp's backward, ``rlcse(...) + self`` gives the saved self as the formula reads it
    (``_saved``)."""
    stash = _STASH.lcse
    if stash is not None and stash[4] is None and _in_node(_LCSE) and \
            isinstance(args[1], torch.Tensor):
        stash[4] = args[1]
    return _sum(func, args, kwargs, sup)


def _saved(node: Any, stash: list | None = None) -> tuple | None:
    """(self, result, dim) that a LogcumsumexpBackward0 node saved: the tensors its formula's ops received
    (``stash``) where they were seen, else read from the node unless they unpack through a hook (None then).
    Reading them again ran a user's unpack hook once more (saved_tensors_hooks: its side effects twice), and in a
    non-reentrant checkpoint raised CheckpointError ("Unpack is being triggered for a tensor that was already
    unpacked once"): gw.strong_zeros() crashed on logcumsumexp there."""
    if stash is not None and stash[3] is not None and stash[4] is not None:
        return stash[4], stash[3], node._saved_dim  # (an int: no hook)
    if _hooked(node, "_raw_saved_self", "_raw_saved_result"):
        return None
    return node._saved_self, node._saved_result, node._saved_dim


def _recorded(grad_and_support: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype, sup) -> torch.Tensor:
    """The exact gradient in ``dtype``, with its support recorded."""
    out, kept = grad_and_support
    out = out.to(dtype)
    sup.record(out, kept)
    return out


_register(aten.abs.default)(_abs)
_register(aten.sub.Tensor)(_sub)
_register(aten.add.Tensor)(_add)


def _log(func, args, kwargs, sup):
    """log (no rule of its own: its output is fully supported). In complex logcumsumexp's backward its input
    is conj(g), kept with its support for the formula's exp."""
    g = args[0]
    if sup.tracked(g) and _in_formula() and g.is_complex() and _in_node(_LCSE) and _reads_nodes():
        _STASH.lcse = [g, sup.of(g).expand(g.shape), "complex", None, None]  # (result, self: _saved)
        return _run_unruled(func, args, kwargs, sup, None)
    return _run_unruled(func, args, kwargs, sup, "a tracked input" if sup.tracked(g) else None)


def _logcumsumexp_exp(func, args, kwargs, sup):
    """exp, as _exp. The last op of complex logcumsumexp's backward before its conj: the exact value from the
    stash, ``exp(rlcse(log(conj g_i) - result_i over kept i) + x_j)``, 0 where no kept term reaches j."""
    stash = _STASH.lcse
    if stash is None or stash[2] != "complex" or not _in_node(_LCSE):
        return _exp(func, args, kwargs, sup)
    _STASH.lcse = None
    conj_g, s = stash[0], stash[1]
    node = torch._C._current_autograd_node()
    saved = _saved(node, stash)
    if saved is None:  # (not seen, and a hook's: PyTorch's value, its saved values unpacked once)
        return _exp(func, args, kwargs, sup)
    x, result, dim = saved
    dim = dim % max(conj_g.dim(), 1)
    terms = torch.where(s, conj_g.log() - result, complex(-math.inf, 0.0))  # a structural term is absent
    kept = s.to(torch.uint8).flip(dim).cummax(dim).values.flip(dim).bool()
    out = torch.where(kept, (_reverse_logcumsumexp(terms, dim) + x).exp(), 0).to(args[0].dtype)
    sup.record(out, kept)
    return out


def logcumsumexp_backward(func, args, kwargs, sup):
    """The rule of ``gradwise::logcumsumexp_backward(g, self, result, dim)``, the whole formula as one op, which
    compiled graphs hold decomposed (``_graph_forms._logcumsumexp_node`` puts it back together): the exact
    gradient with the structural terms of g left out, as at the last op of the eager formula."""
    g, x, result, dim = args
    s = sup.of(g)
    if s is None or g.is_complex():
        return _run_unruled(func, args, kwargs, sup, None)
    return _recorded(_logcumsumexp_grad(g, s.expand(g.shape), x, result, dim), g.dtype, sup)


class WholeFormula(NamedTuple):
    """A backward formula whose strong-zero rule is the whole formula, recomputed at its last op (``exact(g,
    support of g, node, saved)`` -> the node's gradient): the trace classifies its NaN/Inf there, as the rule
    decides. ``saved``: the node's saved tensors as its formula's ops received them (``reads``: (op, argument),
    the first such op of the formula each), never unpacked again (a user's unpack hook ran twice; a checkpoint's
    raised)."""

    first: Any  # the formula's first op, on g
    last: Any  # its last op, which returns the node's gradient
    exact: Callable
    reads: tuple = ()


# keyed by the forward op whose node it is, as the trace names nodes
WHOLE_FORMULAS = {"aten.logcumsumexp": WholeFormula(
    aten.abs.default, aten.sub.Tensor,
    lambda g, s, node, saved: _logcumsumexp_grad(g, s, saved[1], saved[0], node._saved_dim)[0],
    ((aten.sub.Tensor, 1), (aten.add.Tensor, 1)))}  # (log|g+| - result, rlcse(...) + self)


_register(aten.log.default)(_log)
_register(aten.exp.default)(_logcumsumexp_exp)


def _segment_reduce_backward(func, args, kwargs, sup):
    """_segment_reduce_backward(grad, output, data, reduce, lengths, offsets, axis, initial): for sum, mean, max
    and min each element's gradient is its segment's sensitivity times a non-negative weight (1, 1/length, a tie
    share of the selected extreme), so an element whose segment's sensitivity is a structural zero gets one (a
    dropped segment's NaN data then meets no zero downstream). prod's weights are values (the product of the
    others): the same support, from the sum's placement, and its NaN/Inf met there annihilated."""
    reduce = args[3] if len(args) > 3 else kwargs.get("reduce")
    if reduce not in ("sum", "mean", "max", "min", "prod") or _tracked_slots(args, sup) not in ([], [0]):
        return _run_unruled(func, args, kwargs, sup, "a tracked value" if sup.tracked(args[0]) else None)
    if reduce != "prod":
        return _placement(func, args, kwargs, sup)
    s = sup.of(args[0])
    if s is None:  # no structural zero in: none out (prod's weights are values, no placement)
        return _run_unruled(func, args, kwargs, sup, None)
    out = func(*args, **kwargs)
    as_sum = [s.to(args[0].dtype), *args[1:]]
    as_sum[3] = "sum"  # a sum's backward spreads each segment's sensitivity over its elements (data unread)
    support = func(*as_sum, **kwargs) > 0
    sup.record(_annihilate(out, support), support, fresh=True)
    return out


_register(aten._segment_reduce_backward)(_segment_reduce_backward)


def _transformed(func, args, kwargs, sup):
    """_fft_c2c / _fft_r2c / _fft_c2r (every torch.fft function, stft and istft, forward and backward): each
    output element is a sum over the transformed dims with coefficients of modulus 1 (times the norm), so it is a
    structural zero exactly where every element it sums over is one: the support's any over those dims, the
    other dims kept. Nothing is multiplied by a value: nothing to annihilate."""
    out = func(*args, **kwargs)
    s = sup.of(args[0])
    if s is None:
        sup.record(out, None)
        return out
    dims = [d % max(s.dim(), 1) for d in args[1]]
    sup.record(out, mask_any(s, dims, keepdim=True).expand(out.shape) if dims else s)
    return out


_register(aten._fft_c2c, aten._fft_r2c, aten._fft_c2r)(_transformed)


def _matrix_exp(func, args, kwargs, sup):
    """linalg_matrix_exp of a 2n x 2n matrix whose lower-left n x n block is all zeros (structural or values: in a
    compiled graph the block can be a zeros tensor the forward made), [[A, G], [0, B]]:
    its exponential's upper-right block, the integral of e^(sA) G e^((1-s)B) over s in [0, 1], is linear in G. So
    per matrix of the batch, a G block of structural zeros gives a structurally zero upper-right block, exactly 0
    whatever NaN/Inf A and B hold. matrix_exp's own backward has this form (PyTorch's
    differential_analytic_matrix_function: [[A^H, g], [0, A^H]], its upper-right block kept), eager or in a
    compiled graph. Elsewhere the output is fully supported."""
    x = args[0]
    s = sup.of(x)
    n = x.shape[-1] // 2
    if s is None or x.shape[-1] != 2 * n or x.shape[-2] != 2 * n:
        return _run_unruled(func, args, kwargs, sup, None if s is None else "not a 2n x 2n block matrix")
    out = func(*args, **kwargs)
    triangular = ~mask_any(s[..., n:, :n] & (x[..., n:, :n] != 0), [-2, -1], keepdim=True)
    dead = triangular & ~mask_any(s[..., :n, n:], [-2, -1], keepdim=True)
    if not bool(dead.any()):
        sup.record(out, None)
        return out
    support = torch.ones(out.shape, dtype=torch.bool, device=out.device)
    support[..., :n, n:] = ~dead
    sup.record(_annihilate(out, support), support, fresh=True)
    return out


_register(aten.linalg_matrix_exp)(_matrix_exp)


# ---------------------------------------------------------------------------------------------------------
# float32 LSTM on CPU: oneDNN's fused layer backward. When a structural zero in its sensitivities meets a NaN/Inf
# inside it (a padded step's NaN input, sliced away), the layer's gradients are recomputed by re-running the layer
# in PyTorch ops and differentiating that under the strong-zero mode (each cell's ops through their rules);
# wherever the fused result is finite it is kept as it is (PyTorch's bits), as for DECOMPOSED normalisations.
# ---------------------------------------------------------------------------------------------------------

_LSTM = 2  # mkldnn_rnn_layer's mode for LSTM


def _lstm_layer(x, w_ih, w_hh, b_ih, b_hh, h, c, reverse):
    """One LSTM layer in one direction, time-major (T, B, I), PyTorch's gate order i, f, g, o."""
    outs: list[Any] = [None] * x.shape[0]
    for t in range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0]):
        gates = x[t] @ w_ih.t() + h @ w_hh.t()
        if b_ih is not None:
            gates = gates + b_ih + b_hh
        i, f, g, o = gates.chunk(4, 1)
        c = f.sigmoid() * c + i.sigmoid() * g.tanh()
        h = o.sigmoid() * c.tanh()
        outs[t] = h
    return torch.stack(outs), h, c


def _autograd_on() -> Any:
    """Inside a dispatch mode's handler the autograd keys are excluded (the op is being run below autograd):
    include them again to record the re-run layer's graph."""
    keys = torch._C._dispatch_tls_local_exclude_set()
    for key in ("AutogradFunctionality", "ADInplaceOrView", "AutogradCPU", "AutogradCUDA", "AutogradOther"):
        keys = keys.remove(getattr(torch._C.DispatchKey, key))
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), keys)


def _mkldnn_rnn_layer_backward(func, args, kwargs, sup):
    """mkldnn_rnn_layer_backward(input, w_ih, w_hh, b_ih, b_hh, hx, cx, output, hy, cy, grad_output, grad_hy,
    grad_cy, reverse, mode, hidden_size, num_layers, has_biases, train, bidirectional, batch_sizes, batch_first,
    workspace): see above. Outputs are fully supported (every weight reads every step)."""
    fused = func(*args, **kwargs)
    seeds = [(i, args[i]) for i in (10, 11, 12) if isinstance(args[i], torch.Tensor)]
    tracked = any(sup.tracked(g) for _, g in seeds)
    if not tracked or args[14] != _LSTM or args[20] or args[0].dim() != 3 or \
            all(not isinstance(o, torch.Tensor) or _finite(o) for o in fused):
        if tracked and args[14] != _LSTM:
            _UNRULED.add(f"{func} (not an LSTM)")
        for o in fused:
            if isinstance(o, torch.Tensor):
                sup.record(o, None)
        return fused
    has_biases = args[17]
    values = [args[0], args[1], args[2], args[3] if has_biases else None, args[4] if has_biases else None,
              args[5], args[6]]
    # (a backward run under torch.inference_mode(): the re-run layer's graph must be recorded all the same, on
    # tensors that are not inference tensors, which autograd refuses to save)
    with torch.inference_mode(False):
        leaves = [None if v is None else (v.clone() if v.is_inference() else v.detach()).requires_grad_()
                  for v in values]
        with _autograd_on(), torch.enable_grad():
            y, hy, cy = _lstm_layer(*leaves, args[13])
    outputs = [(y, hy, cy)[i - 10] for i, _ in seeds]
    grads = grad_in_pass(outputs, [v for v in leaves if v is not None], [g for _, g in seeds], sup)
    it = iter(grads)
    decomposed = [None if v is None else next(it) for v in leaves]
    out = []
    for f, d in zip(fused, decomposed, strict=True):
        if isinstance(f, torch.Tensor) and isinstance(d, torch.Tensor):
            merged = torch.where(torch.isfinite(f), f, d.to(f.dtype))
            sup.record(merged, sup.of(d))
            out.append(merged)
        else:
            out.append(f)
    return tuple(out)


_register(aten.mkldnn_rnn_layer_backward)(_mkldnn_rnn_layer_backward)
