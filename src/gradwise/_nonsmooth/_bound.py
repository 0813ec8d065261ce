"""A proved lower bound on the least norm of the Clarke subdifferential, however many ties: interval tangents.

Every element g of the Clarke subdifferential of a piecewise-smooth f at x is a convex combination of the
gradients of the pieces active at x, so for any direction w, ``min over g of g . w`` is the least directional
derivative ``grad p . w`` over those pieces. One forward pass of f at x bounds all of them at once: each tensor
carries an interval of tangents along w (a center and a radius), exact where f is smooth (the radius stays 0)
and, where an op sits at a kink, the hull of the tangents of its branches (relu at 0: between 0 and the incoming
tangent; a tied max: the hull over the tied candidates). Linear maps move radii through the absolute values of
their coefficients (``|J| r``), a superset whatever branch the other ties take. If the output's interval
[lo, hi] excludes 0, every element g satisfies ``g . w >= lo > 0`` (or ``<= hi < 0``), hence
``|g| >= max(lo, -hi) / |w|``: the least norm is at least that, whatever the number of ties.

``lower_bound(f, xs, w)`` returns that bound (0.0 where the interval holds 0), or None where some op of f has
no interval rule (``INTERVAL_RULES``, keyed by aten op; pointwise ops take their own derivative, and at a kink
need a rule of their own; an in-place op takes its out-of-place form's), reads a tensor written in place since
its interval was set (a stale view), or fails: never a bound it cannot prove. ``stationarity`` tries it with w
the least-norm element of the pieces it sampled.

No autograd graph is recorded: `_NoGraph` turns grad off around each call f makes in grad mode, and tells the
interval mode so, which thus still reads f's own grad mode per op (a part of f under ``torch.no_grad()`` is a
constant, as in every other pass).

May import: torch, gradwise._ops (the shared kink facts: where an op sits at its kink), ``_contexts``,
``_kink_watch`` (``_composite``, ``_unguarded``), ``_interval_rules`` (the table of interval rules this engine
applies), ``_bound_split`` (elements that read one input element: exact, not hulled).
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable
from types import FunctionType

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from gradwise._nonsmooth import _contexts as _ctx
from gradwise._nonsmooth._bound_split import Sources
from gradwise._nonsmooth._interval_rules import (
    INTERVAL_RULES,
    KINK_RULES,
    Intervals,
    Unbounded,
    nonneg_linear,
    pointwise,
)
from gradwise._nonsmooth._kink_watch import _composite, _unguarded
from gradwise._ops._kinks import OpCall, at_kink, kink_fact

__all__ = ["lower_bound"]

aten = torch.ops.aten
Tensor = torch.Tensor


class _IntervalMode(TorchDispatchMode):
    """Carries a tangent interval for every float tensor f computes from its inputs."""

    def __init__(self, w: Tensor) -> None:
        super().__init__()
        self.iv = Intervals()
        self.sources = Sources(w)  # elements that depend on one input element: exact (`_bound_split`)
        self.graph_off = False  # grad is off for `_NoGraph` (inside a call f made in grad mode), not for f

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        carried = [t for t in flat if isinstance(t, Tensor) and self.iv.get(t) is not None]
        if not carried:
            return func(*args, **kwargs)
        if not (self.graph_off or torch.is_grad_enabled()):  # f's no_grad: a constant, as in every pass (`_KinkMode`)
            if _in_custom_function():
                raise Unbounded(f"{func} inside a custom autograd.Function's forward (its derivative is its own)")
            if func._schema.is_mutable:
                raise Unbounded(f"{func} writes in place under no_grad (a value the derivative holds fixed)")
            return func(*args, **kwargs)
        if kwargs.get("out") is not None:
            raise Unbounded(f"{func} with out=")
        if func._schema.is_mutable:
            return self._in_place(func, args, kwargs)
        out = func(*args, **kwargs)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        if any(isinstance(o, Tensor) and o.is_complex() for o in outs):
            raise Unbounded(f"{func}: a complex output (no real interval)")
        if not any(isinstance(o, Tensor) and o.is_floating_point() for o in outs):
            self._check_comparison(func, args, kwargs, out)
            return out
        result = self.sources.refine(func, args, kwargs, out, self._rule(func, args, kwargs, out), self._carries)
        for o, interval in zip(outs, result if isinstance(result, list) else [result], strict=True):
            if isinstance(o, Tensor) and o.is_floating_point():
                if interval is None:
                    raise Unbounded(f"{func}: no interval for one of its outputs")
                self.iv.set(o, interval)
        return out

    def _in_place(self, func, args, kwargs):
        """``op_(x, ...)`` (nn.ReLU(inplace=True), a residual ``out += identity``): the interval of its out-of-place
        form, computed before x is written, becomes x's. Tensors that alias x (views) go stale with its version."""
        name = func.overloadpacket.__name__
        packet = getattr(aten, name[:-1], None) if name.endswith("_") else None
        functional = getattr(packet, func._overloadname, None) if packet is not None else None
        if functional is None or not isinstance(args[0], Tensor) or not args[0].is_floating_point():
            raise Unbounded(f"{func} writes in place")
        out = functional(*args, **kwargs)
        interval = self.sources.refine(functional, args, kwargs, out, self._rule(functional, args, kwargs, out),
                                       self._carries)
        func(*args, **kwargs)
        self.sources.move(out, args[0])
        if isinstance(interval, list) or interval is None:
            raise Unbounded(f"{func}: no interval for the tensor it writes")
        self.iv.set(args[0], interval, written=True)
        return args[0]

    def _carries(self, t) -> bool:
        return isinstance(t, Tensor) and self.iv.get(t) is not None

    def _rule(self, func, args, kwargs, out):
        packet = func.overloadpacket
        fact, call = kink_fact(func), OpCall(args, kwargs, out, packet.__name__)
        if fact is not None and fact.possible is not None and not fact.possible(call):
            fact = None  # (true division, a float-to-float copy: no kink for these arguments)
        if fact is not None and packet not in INTERVAL_RULES:
            kinked = fact.kind != "jump" and at_kink(fact, call)
            if fact.kind == "jump" or kinked:
                rule = KINK_RULES.get(packet)
                if rule is None or fact.kind != "kink":
                    raise Unbounded(f"{func} at its {fact.kind} (no interval rule)")
                return rule(func, args, kwargs, out, self.iv)
        rule = INTERVAL_RULES.get(packet)
        if rule is not None:
            return rule(func, args, kwargs, out, self.iv)
        if func.is_view:
            return nonneg_linear(func, args, kwargs, out, self.iv)
        if torch.Tag.pointwise in func.tags:
            return pointwise(func, args, kwargs, out, self.iv)
        raise Unbounded(f"{func} has no interval rule")

    def _check_comparison(self, func, args, kwargs, out) -> None:
        """A comparison of carried values at a tie decides a branch (where(a > b, a, b)): not bounded here."""
        fact = kink_fact(func)
        if fact is not None and at_kink(fact, OpCall(args, kwargs, out, func.overloadpacket.__name__)):
            raise Unbounded(f"{func} compares tied values")


class _NoGraph(TorchFunctionMode):
    """Turns grad off around each call f makes in grad mode, so that autograd records no graph of the pass (f's
    modules' parameters require grad), and sets ``graph_off`` for the interval mode meanwhile. A call f makes
    under its own no_grad runs as it is. Only builtins run with grad off, as no Python no_grad block can hide in
    them: F's Python functions run their bodies under this mode, so their no_grad blocks (F.gaussian_nll_loss's
    clamp) are read per op as before, and other Python functions run in f's grad mode. (`_KinkMode` does the
    same with ``graph``.)"""

    def __init__(self, intervals: _IntervalMode) -> None:
        super().__init__()
        self.intervals = intervals

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch._C._set_grad_enabled or not torch.is_grad_enabled():
            return func(*args, **kwargs)
        if isinstance(func, FunctionType):  # Python: its own no_grad blocks must stay visible per op
            if _composite(func) and func.__code__.co_filename == F.__file__:  # (not boolean_dispatch's wrappers)
                with self:
                    return _unguarded(func)(*args, **kwargs)
            return func(*args, **kwargs)  # in f's grad mode (a graph of what parameters feed inside it)
        outer = self.intervals.graph_off
        self.intervals.graph_off = True
        torch._C._set_grad_enabled(False)
        try:
            return func(*args, **kwargs)
        finally:
            torch._C._set_grad_enabled(True)
            self.intervals.graph_off = outer


# ``Function.apply`` is Python up to torch 2.13 (its frame marks a forward of any kind, a builtin one included)
# and a builtin from 2.14 (no frame): there the frame of the forward itself marks it
_APPLY = getattr(getattr(torch.autograd.Function.apply, "__func__", None), "__code__", None)
# (classes' counter when read, {code of a forward or of what it wraps: for each wrapper of that code that wraps a
# forward, the id of what it wraps and its closure (``_held``); None for a code of its own})
_forwards: tuple[str | None, dict] = ("", {})


def _forward_codes() -> dict:
    """The code of every custom ``autograd.Function``'s forward and of what it wraps (``custom_fwd``), read again
    only when a class was defined since (PyTorch counts them; without the counter, on every call). A wrapper's
    code maps to its closures: that code may be shared (torch.no_grad()'s ``decorate_context`` wraps f's own
    no_grad helpers too, which were then taken for a custom forward), so its frame marks a forward only where it
    runs that closure (``_marks``); its ops before the call (custom_fwd's casts) are the forward's."""
    global _forwards
    counter = getattr(torch.autograd.function, "AUTOGRAD_FUNCTION_COUNTER", None)
    key = None if counter is None else repr(counter)
    if key is None or key != _forwards[0]:
        codes: dict = {}
        todo = [torch.autograd.function._SingleLevelFunction]
        while todo:
            cls = todo.pop()
            todo.extend(type.__subclasses__(cls))
            fn = cls.__dict__.get("forward")
            fn = getattr(fn, "__func__", fn)
            while fn is not None:
                if hasattr(fn, "__code__"):
                    inner = getattr(fn, "__wrapped__", None)
                    if inner is None or codes.get(fn.__code__, inner) is None:
                        codes[fn.__code__] = None
                    else:
                        codes.setdefault(fn.__code__, set()).update((id(inner), _held(
                            getattr(c, "cell_contents", None) for c in fn.__closure__ or ())))
                    fn = inner
                elif isinstance(fn, functools.partial):
                    fn = fn.func
                else:  # an object with a Python __call__ (its frame runs the body), else nothing more to read
                    fn = type(fn).__call__ if callable(fn) and not isinstance(fn, type) else None
                    fn = fn if hasattr(fn, "__code__") else None
        _forwards = (key, codes)
    return _forwards[1]


def _held(values) -> tuple:
    """A closure as the identities of what its cells hold (a wrapper's frame holds them as its free variables)."""
    return tuple(map(id, values))


def _marks(frame, forwards: dict) -> bool:
    """Whether ``frame`` runs a custom forward: apply's (up to torch 2.13), a forward's own code, or a wrapper's
    (``functools.wraps``) that holds the forward it wraps or runs a closure found wrapping one: one calling it
    through another object (a partial of it) holds no forward, one keeping state (``nonlocal``) no longer runs the
    closure found, and either's ops, taken for constants, bounded another function."""
    if frame.f_code is _APPLY:
        return True
    wrapped = forwards.get(frame.f_code, False)
    if wrapped is None or wrapped is False:
        return wrapped is None
    held = frame.f_locals
    return _held(held.get(name) for name in frame.f_code.co_freevars) in wrapped or \
        any(id(v) in wrapped for v in held.values())


def _in_custom_function() -> bool:
    """Whether a custom ``autograd.Function``'s forward is running (PyTorch turns grad off there, unseen by
    `_NoGraph`): its output's derivative is its ``jvp``/``backward``, not its ops, and without a graph nothing
    marks that output, so treating those ops as constants would bound another function. Read only for ops on
    carried tensors under no_grad."""
    # up to 2.13 apply's frame marks every forward: the codes would only add false marks there
    forwards = _forward_codes() if _APPLY is None else {}
    frame = sys._getframe(2)
    while frame is not None:
        if _marks(frame, forwards):
            return True
        frame = frame.f_back
    return False


def lower_bound(f: Callable, xs: tuple[Tensor, ...], single: bool, w: tuple[Tensor, ...]) -> float | None:
    """A proved lower bound on the least norm of f's Clarke subdifferential at ``xs`` from the tangent interval
    along ``w`` (see the module docstring); 0.0 where that interval holds 0, None where f cannot be bounded."""
    norm = math.sqrt(sum(float(d.double().square().sum()) for d in w))
    if not math.isfinite(norm):
        return None
    if norm == 0:  # no direction: the trivial bound
        return 0.0
    mode = _IntervalMode(torch.cat([d.detach().reshape(-1).double().cpu() for d in w]))
    inputs = tuple(x.detach().clone() for x in xs)
    try:
        # compiled code eagerly, checkpoints plainly; grad on, so that f's own no_grad parts are seen, and off
        # around each call (`_NoGraph`: the inputs are fresh copies, but f's modules' parameters require grad)
        with _ctx.pass_context(), torch.enable_grad(), _NoGraph(mode), mode:
            for x, d in zip(inputs, w, strict=True):
                mode.iv.set(x, (d.to(x.dtype), torch.zeros_like(x)))
                mode.sources.seed(x)
            _ctx.restore_state()
            out = f(inputs[0]) if single else f(*inputs)
            got = mode.iv.get(out) if isinstance(out, Tensor) and out.numel() == 1 else None
    except Unbounded:
        return None
    except Exception:  # a bound is optional: any failure of the pass claims nothing
        return None
    if got is None:
        return None
    c, r = float(got[0].reshape(())), float(got[1].reshape(()))
    if not (math.isfinite(c) and math.isfinite(r)):
        return None
    return max(0.0, c - r, -(c + r)) / norm
