"""Elements of the interval pass (``_bound``) that depend on one input element only: exact, however many tie.

Interval arithmetic forgets that two ties decide together: in relu(x) - relu(-x) (the identity) each relu at 0
has slopes {0, 1} on its own, so the hull says [0, 2] where every piece has slope 1. But an element y that
depends on a single input element x_j (through pointwise ops and views: its *source*) is a one-dimensional
piecewise-smooth function of x_j, so every piece of f active at x, taken along a generic direction d, has
gradient s e_j for y, with s the one-sided derivative of y along the sign of d_j: ``up`` (the tangent of y along
+1 for every input) or ``-down`` (``down``: the tangent along -1). Both are exact one-sided tangents, computed
op by op alongside the intervals (forward AD away from kinks; at a kink the one-sided rule, ``ONE_SIDED``: relu
at 0 passes a positive tangent, abs takes its absolute value, maximum the larger). Along w, every piece then has
tangent s w_j for y with s in {up, -down}: that hull replaces y's interval. Ties of equal one-sided slope give
equal gradients for y, whichever branch wins, so the pair is exact there too.

An element whose inputs have different sources (or any input without one) has none: only its interval goes on.

May import: torch, gradwise._ops (the shared kink facts), ``_interval_rules``.
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from gradwise._nonsmooth._interval_rules import Interval, _jvp, _kink_mask
from gradwise._ops._kinks import OpCall, at_kink, kink_fact

__all__ = ["ONE_SIDED", "Sources"]

aten = torch.ops.aten
Tensor = torch.Tensor
NONE = -1  # no single source


def _bounds(call: OpCall) -> tuple:
    """(lower, upper) bound of a clamp-like call (None: absent)."""
    name = call.packet.rstrip("_")
    if name == "clamp_min" or name == "threshold":  # threshold(x, t, v) at x == t, continuous: v == t (else a jump)
        return call.args[1], None
    if name == "clamp_max":
        return None, call.args[1]
    if name == "hardtanh":
        return call.arg(1, "min_val", -1.0), call.arg(2, "max_val", 1.0)
    if name == "relu":
        return 0.0, None
    return call.arg(1, "min"), call.arg(2, "max")


def _clamp_one_sided(call: OpCall, u: list) -> Tensor:
    """relu / clamp / hardtanh / threshold at a bound: moving up from the lower bound passes the tangent, down
    from it gives 0 (the constant branch), and the reverse at the upper bound; at both (lower == upper): 0."""
    x, t = call.args[0], u[0]
    lo, hi = _bounds(call)
    if call.packet.rstrip("_") == "threshold" and call.arg(2, "value") != lo:
        raise ValueError("threshold with a value other than its threshold jumps there")
    if lo is not None and hi is not None and bool(torch.as_tensor(lo > hi).any()):
        raise ValueError("clamp with min > max is constant")  # (no one-sided rule: the element gets no source)
    if lo is not None:
        t = torch.where(x == lo, t.clamp(min=0), t)
    if hi is not None:
        t = torch.where(x == hi, t.clamp(max=0), t)
    return t


def _abs_one_sided(call: OpCall, u: list) -> Tensor:
    """abs at 0: |x + t| - |x| = |t| to first order."""
    return u[0].abs()


def _max_one_sided(call: OpCall, u: list) -> Tensor:
    """maximum at a tie: the argument that moves up faster wins, so the tangent is the larger one."""
    return torch.maximum(u[0], u[1])


def _min_one_sided(call: OpCall, u: list) -> Tensor:
    """minimum at a tie: the smaller tangent."""
    return torch.minimum(u[0], u[1])


# a pointwise op at its kink: the one-sided tangent along a direction with input tangents u (all tensors, zero for
# an argument that carries none); ops outside this table leave their outputs without sources
ONE_SIDED = {aten.relu: _clamp_one_sided, aten.clamp: _clamp_one_sided, aten.clamp_min: _clamp_one_sided,
             aten.clamp_max: _clamp_one_sided, aten.hardtanh: _clamp_one_sided, aten.threshold: _clamp_one_sided,
             aten.abs: _abs_one_sided, aten.maximum: _max_one_sided, aten.minimum: _min_one_sided}
_PAIRS = {aten.max: aten.maximum, aten.min: aten.minimum}  # max.other / min.other: elementwise

# ops that move elements without arithmetic: the sources and tangents move the same way (applied to them), or
# stay where they are (same shape)
_MOVES = {aten.view, aten._unsafe_view, aten.expand, aten.permute, aten.transpose, aten.t, aten.select,
          aten.slice, aten.squeeze, aten.unsqueeze, aten.flip, aten.roll}
_SAME = {aten.clone, aten.contiguous, aten._to_copy, aten.alias, aten.lift_fresh}


class Sources:
    """Per tensor of the pass: (source, up, down) of each element (see the module docstring), source NONE for
    elements without one; checked against in-place writes by version (a stale entry is no entry)."""

    def __init__(self, w: Tensor) -> None:
        self.w = w  # the flattened direction of the pass, float64
        self._of = WeakTensorKeyDictionary()
        self._offset = 0

    def seed(self, x: Tensor) -> None:
        """An input: each element its own source, tangent +1 along +1 and -1 along -1."""
        src = torch.arange(self._offset, self._offset + x.numel(), device=x.device).reshape(x.shape)
        self._offset += x.numel()
        one = torch.ones(x.shape, dtype=torch.float64, device=x.device)
        self._set(x, (src, one, -one))

    def _set(self, t: Tensor, entry, written: bool = False) -> None:
        self._of[t] = (*entry, None if written else t._version)

    def get(self, t) -> tuple[Tensor, Tensor, Tensor] | None:
        if not isinstance(t, Tensor):
            return None
        entry = self._of.get(t)
        if entry is None:
            return None
        *got, version = entry
        if version is None:
            self._of[t] = (*got, t._version)
        elif version != t._version:
            return None
        return tuple(got)

    def move(self, src: Tensor, dst: Tensor) -> None:
        """An in-place op wrote ``dst`` from its out-of-place result ``src``."""
        got = self.get(src)
        self._of.pop(dst, None)
        if got is not None:
            self._set(dst, got, written=True)

    def refine(self, func, args, kwargs, out, interval, carried) -> Interval:
        """Record ``out``'s sources and return its interval, replaced by the exact hull where it has one.
        ``carried``: whether an argument carries an interval."""
        if not isinstance(out, Tensor) or not out.is_floating_point() or isinstance(interval, list) \
                or interval is None:
            return interval
        try:
            entry = self._entry(func, args, kwargs, out, carried)
        except (RuntimeError, TypeError, ValueError, IndexError):  # (a shape the move does not take): no sources
            entry = None
        if entry is None:
            return interval
        src, up, down = entry
        self._set(out, entry)
        has = src != NONE
        if not bool(has.any()):
            return interval
        ws = self.w.to(out.device)[src.clamp(min=0)]
        a, b = up * ws, -down * ws
        lo, hi = torch.minimum(a, b), torch.maximum(a, b)
        c, r = interval
        return (torch.where(has, ((lo + hi) / 2).to(c.dtype), c.expand(out.shape)),
                torch.where(has, ((hi - lo) / 2).to(r.dtype), r.expand(out.shape)))

    def _entry(self, func, args, kwargs, out, carried):
        packet = func.overloadpacket
        if (packet in _MOVES or packet in _SAME) and func is not aten.view.dtype:
            got = self.get(args[0])
            if got is None or any(carried(a) for a in args[1:]):
                return None
            if packet in _SAME:
                return tuple(t.expand(out.shape) for t in got)
            moved = tuple(func(t, *args[1:], **kwargs) for t in got)
            return moved if moved[0].shape == out.shape else None
        pair = _PAIRS.get(packet)
        if pair is not None and len(args) > 1 and isinstance(args[1], Tensor):
            packet, func = pair, pair.default
        elif packet not in ONE_SIDED and torch.Tag.pointwise not in func.tags and packet is not aten.where:
            return None
        return self._pointwise(func, packet, args, kwargs, out, carried)

    def _pointwise(self, func, packet, args, kwargs, out, carried):
        """Each output element reads one element of each argument: a source where all carried ones agree."""
        positions = [i for i, a in enumerate(args) if carried(a)]
        got = [self.get(args[i]) for i in positions]
        if not positions or any(g is None for g in got):
            return None
        srcs = [torch.broadcast_to(g[0], out.shape) for g in got]
        src = srcs[0]
        for s in srcs[1:]:
            src = torch.where(s == src, src, NONE)
        fact = kink_fact(func)
        call = OpCall(args, kwargs, out, packet.__name__)
        kinked = fact is not None and fact.kind == "kink" and (fact.possible is None or fact.possible(call)) \
            and at_kink(fact, call)
        if kinked and packet not in ONE_SIDED:
            return None
        mask = _kink_mask(func, args, kwargs, out) if kinked else None
        if mask is not None:
            mask = torch.broadcast_to(mask, out.shape)
        sides = []
        for side in (1, 2):  # along +1, along -1
            tangents = {i: g[side].where(g[0] != NONE, 0.0) for i, g in zip(positions, got, strict=True)}
            t = _jvp(func, args, kwargs, {i: v.to(args[i].dtype) for i, v in tangents.items()}).double()
            if mask is not None:
                zero = torch.zeros(out.shape, dtype=torch.float64, device=out.device)
                us = [torch.broadcast_to(tangents[i], out.shape) if i in tangents else zero for i in range(2)]
                t = torch.where(mask, ONE_SIDED[packet](call, us), t)
            sides.append(t)
        return src, sides[0], sides[1]
