"""Exact derivatives at kinks: one-sided directional derivatives, branch locking, generalized gradients.

How it works. ``f`` runs once under `_KinkMode` (a ``TorchFunctionMode``) inside a forward-AD dual level, every
input carrying a tangent: the direction. Smooth ops run exactly as PyTorch runs them. A kink op goes to its rule
in `KINK_RULES` (keyed by aten op). Where no element sits at a kink the rule calls the op itself, so away from
kinks everything is PyTorch's own computation. Where some elements tie, the rule ranks the competing branches
lexicographically: by value, then by tangent along the direction, then by the tangents of further directions
from earlier passes (Nesterov 2005; Khan & Barton 2013). It then rebuilds the op's output from the winning
branches with ``where``/``gather``. That *locked* output is an ordinary differentiable tensor: its tangent is the
exact one-sided directional derivative, and back-propagating through it gives the gradient of one smooth piece of
f that is active at x, an element of the Bouligand (hence Clarke) subdifferential (Kakade & Lee 2018).

Each tie that a rule resolves is recorded as a `Kink` (op, user line, candidate branches, the keys that ranked
them); `_stationarity` replays runs with chosen branches forced to enumerate the active pieces.
"""
from __future__ import annotations

import functools
import itertools
import math
import os
import sys
import types
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._python_dispatch import _get_current_dispatch_mode as _current_dispatch_mode
from torch.utils._python_dispatch import _pop_mode as _pop_dispatch_mode
from torch.utils._python_dispatch import _push_mode as _push_dispatch_mode
from torch.utils._pytree import tree_map
from torch.utils.weak import WeakTensorKeyDictionary

from gradwise import _nonsmooth_contexts as _ctx
from gradwise._masks import mask_any

aten = torch.ops.aten
Tensor = torch.Tensor

# Forward AD imports this on first use; it warns about torch.jit.script, which pytest would turn into an error.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import torch._decomp.decompositions_for_jvp

__all__ = ["JVP_RULES", "KINK_RULES", "NonsmoothError", "directional_derivative", "generalized_backward",
           "generalized_grad"]


class NonsmoothError(ValueError):
    """f has no (finite) one-sided derivative here, or gradwise cannot compute it; the message says which op."""


# ------------------------------------------------------------------------------------------------ records


@dataclass
class Kink:
    """One kink op call in which some elements tie.

    The tied elements form ``G`` groups of ``m`` candidate branches (``cand``: which ones tie in value).
    ``kind`` is "select" (one candidate wins: max, relu, clamp, comparisons ...) or "order" (the candidates
    are ranked: sort, topk, median ...). ``keys`` are the further ranking columns (tangents of each
    direction, or a forced choice); ``values`` the candidates' values as differentiable tensors when the
    run collects them (subdifferential enumeration).
    """

    op: str
    location: str
    kind: str
    cand: Tensor
    descending: bool = True
    keys: list[Tensor] = field(default_factory=list)
    values: Tensor | None = None
    unresolved: int = 0
    comparison: bool = False
    continuum: bool = False  # norm at 0: infinitely many pieces
    call: tuple[int, int] = (0, 0)  # (mode call count, kink index within the call): the same on every pass
    choice: Tensor | None = None
    write: Callable | None = None  # writes another choice into this pass's lock tensors (graph reuse)
    site: tuple | None = None  # what a rule needs to rank this kink again in the ranked pass (max-pool)
    tangent: bool = False  # ranked by this pass's tangent (the op's arguments carried one)

    @property
    def count(self) -> int:
        return int(self.cand.shape[0])

    def describe(self) -> str:
        return f"{self.op} at {self.location}: {self.count} tied element(s)"


@dataclass
class NearKink:
    """Elements within a tolerance of a kink but not exactly on it (treated as smooth)."""

    op: str
    location: str
    count: int
    gap: float


class _Run:
    """State of one pass of f: history from earlier passes, forced choices, what this pass records."""

    def __init__(self, history=None, forced=None, collect=False, tie_tol=0.0, near_tol=None):
        self.history: list[Kink] | None = history
        self.forced: dict[int, Tensor] = forced or {}
        self.collect = collect
        self.tie_tol = tie_tol
        self.near_tol = near_tol
        self.kinks: list[Kink] = []
        self.near: list[NearKink] = []
        self.call = 0  # set by the mode before each rule
        # Ranked pass of `_locked_grad`: the tangent-free probe's kinks by mode call. Calls without one have no
        # tie (the primal values are the probe's), so they run natively; rules may reuse a kink's saved site.
        self.known: dict[int, list[Kink]] | None = None
        # Outputs of relu-like switches -> (c, live): the output is locally constant (relu-dead) wherever it equals
        # c, except at ``live`` (the switch's own ties, or None): ties among dead elements are no kinks.
        self.flat = WeakTensorKeyDictionary()

    def known_here(self) -> list[Kink] | None:
        """The probe's kinks at the current call (ranked pass only), else None."""
        return None if self.known is None else self.known.get(self.call)

    def mark_flat(self, out: Tensor, c: float, live: Tensor | None) -> None:
        """Record that ``out`` is locally constant where it equals ``c``, except at the ``live`` mask."""
        self.flat[out] = (c, live, out._version)

    def flat_source(self, x: Tensor) -> tuple[float, Tensor | None] | None:
        """(c, live) recorded by `mark_flat` for x, unless x was modified in place since."""
        entry = self.flat.get(x)
        return None if entry is None or entry[2] != x._version else entry[:2]

    def resolve(self, op: str, kind: str, cand: Tensor, key: Tensor | None, values: Callable | None,
                descending: bool = True, primal: Tensor | None = None, comparison: bool = False,
                lazy: bool = False) -> tuple[Tensor | None, Tensor | None]:
        """Rank the tied candidates (G, m) lexicographically; return the winner (select) or order (order), and
        (comparisons only) the rows still tied after every key.

        Keys in order: the value (``primal``, order only: select candidates already tie in value), a forced
        column, the keys of earlier passes, this pass's tangent ``key``. ``lazy``: with no key at all, only
        record the kink (the caller keeps PyTorch's first-candidate choice) and return (None, None).
        """
        index = len(self.kinks)
        keys: list[Tensor] = []
        if index in self.forced:
            keys.append(self.forced[index])
        if self.history is not None:
            if index >= len(self.history) or self.history[index].op != op \
                    or self.history[index].cand.shape != cand.shape:
                raise NonsmoothError(f"f did not hit the same kinks on a second run ({op} at {_user_line()}); "
                                     "gradwise needs f to be deterministic")
            keys.extend(self.history[index].keys)
        if key is not None:
            keys.append(key.to(cand.device))
        record = Kink(op, _user_line(), kind, cand, descending, keys, comparison=comparison,
                      call=(self.call, sum(k.call[0] == self.call for k in self.kinks)))
        if self.collect and values is not None:
            record.values = values()
        self.kinks.append(record)
        if lazy and not keys:
            return None, None
        if kind == "select":
            sign = 1.0 if descending else -1.0
            result, still = _lex_argmax(cand, [sign * k for k in keys], comparison)
        else:
            result, still = _lex_order(primal, keys, descending, cand)
        record.unresolved, record.choice = (int(still.sum()) if still is not None else 0), result
        return result, still

    def note_near(self, op: str, gap: Tensor) -> None:
        """Record elements whose gap to a kink is positive but within near_tol."""
        if self.near_tol is None or gap.numel() == 0:
            return
        near = (gap > 0) & (gap <= self.near_tol)
        if near.any():
            self.near.append(NearKink(op, _user_line(), int(near.sum()), float(gap[near].min())))


def _lex_argmax(cand: Tensor, keys: list[Tensor], still: bool = True) -> tuple[Tensor, Tensor | None]:
    """First candidate that is largest in keys[0], then among those in keys[1], ...; and (``still``) the rows
    still tied after the last key."""
    if keys and not still:  # the last key by argmax (its first maximum), unless a key is -inf or NaN there
        for k in keys[:-1]:
            km = k.masked_fill(~cand, -math.inf)
            cand = cand & (km == km.amax(-1, keepdim=True))
        choice = keys[-1].masked_fill(~cand, -math.inf).argmax(-1)
        if bool(cand.gather(-1, choice.unsqueeze(-1)).all()):
            return choice, None
    for k in keys:
        km = k.masked_fill(~cand, -math.inf)
        cand = cand & (km == km.amax(-1, keepdim=True))
    return cand.to(torch.uint8).argmax(-1), cand.sum(-1) > 1 if still else None


def _lex_order(primal: Tensor, keys: list[Tensor], descending: bool, cand: Tensor) -> tuple[Tensor, Tensor]:
    """Permutation sorting each row by (primal, keys...) lexicographically (stable); the rows with ties left."""
    perm = torch.arange(primal.shape[-1], device=primal.device).expand_as(primal)
    for k in reversed([primal, *keys]):
        perm = perm.gather(-1, torch.sort(k.gather(-1, perm), dim=-1, descending=descending, stable=True).indices)
    full = torch.stack([primal, *keys], -1).gather(-2, perm.unsqueeze(-1).expand(*perm.shape, len(keys) + 1))
    still = (full[..., 1:, :] == full[..., :-1, :]).all(-1) & cand.gather(-1, perm)[..., 1:]
    return perm, still.any(-1)


_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIR = os.path.dirname(__file__)


def _user_line() -> str:
    """file:line of the innermost frame outside torch and gradwise (the user's call)."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        if not (name.startswith(_TORCH_DIR) or name.startswith(_OWN_DIR) or "contextlib" in name):
            return f"{os.path.relpath(name) if not name.startswith('<') else name}:{frame.f_lineno}"
        frame = frame.f_back
    return "<unknown>"


# ------------------------------------------------------------------------------------------------ rule table

KINK_RULES: dict[object, Callable] = {}
_ROUTES: dict[Callable, Callable] = {}
# Ops with kinks but no rule: f hitting one with a direction gets a clear error instead of a silent convention.
UNRULED: dict[Callable, str] = {}


def _registrar(table: dict, routes: dict) -> Callable:
    """A decorator factory filling ``table`` (keyed by aten op) and ``routes`` (torch-level callables)."""

    def register_for(op, *calls: Callable):
        def register(rule: Callable) -> Callable:
            table[op] = rule
            for c in calls:
                routes[c] = rule
            return rule

        return register

    return register_for


kink_rule = _registrar(KINK_RULES, _ROUTES)
kink_rule.__doc__ = "Register a rule for aten ``op``; ``calls`` are the torch-level callables that reach it."


def rule_for(op) -> Callable:
    """The kink rule for an aten op (the one lookup point)."""
    try:
        return KINK_RULES[op]
    except KeyError:
        raise NonsmoothError(f"gradwise has no kink rule for {op}; the ops with rules are: "
                             f"{', '.join(sorted(str(k) for k in KINK_RULES))}") from None


def _split(x) -> tuple[Tensor, Tensor | None]:
    if not isinstance(x, Tensor):
        return x, None
    p, t = fwAD.unpack_dual(x)
    return p, t


def _tied_rows(mask: Tensor) -> Tensor:
    return mask.reshape(-1).nonzero().squeeze(1)


def _near_zero(t: Tensor, tol: float) -> bool:
    """Whether some |t| <= tol: one min-reduction instead of a full-size boolean pass (the everyday path)."""
    if t.numel() == 0:
        return False
    t = t.detach()
    m = float(t.abs().amin())
    if m != m:  # amin propagates NaN: look past it
        return bool(mask_any(t.abs() <= tol))
    return m <= tol


# --- elementwise switches ----------------------------------------------------------------------------------


def _resolve_sign(run: _Run, op: str, s, tie, **kw):
    """At the tied elements of a switch on the sign of ``s``: which side (0: s > 0, 1: s < 0) wins along the
    direction, comparing the tangent of ``s`` with 0 (then further directions). Returns (rows, choice, still)."""
    sp, st = _split(s)
    rows = _tied_rows(tie)
    ds = st.reshape(-1)[rows] if st is not None else sp.new_zeros(len(rows))
    key = torch.stack([ds, torch.zeros_like(ds)], 1)
    cand = torch.ones(len(rows), 2, dtype=torch.bool, device=sp.device)
    values = lambda: torch.stack([s.reshape(-1)[rows], torch.zeros_like(s.reshape(-1)[rows])], 1)
    choice, still = run.resolve(op, "select", cand, key, values, **kw)
    return rows, choice, still


def _switch(run: _Run, op: str, s, pos, neg, native: Callable, *, jumps: bool = False, flat: bool = False,
            skip: Callable | None = None):
    """Elementwise ``pos`` where s > 0, ``neg`` where s < 0; at s == 0 the piece that wins along the direction.

    For continuous ops (relu, max, clamp ...) both pieces agree where s == 0, so the tangent there is that of
    the winning piece: the exact one-sided derivative. Ops that ``jumps`` (threshold, hardshrink) have
    different pieces at s == 0: moving to the other piece there is an error, not a derivative. ``flat``: ``neg``
    is a constant that ``pos`` never equals where s > 0 (relu), so the output equals it exactly where it is dead.
    ``skip(tie)``: the tied elements that are no kink (both sides locally constant and equal), or None.
    """
    sp = _split(s)[0]
    if run.near_tol is not None:
        run.note_near(op, sp.abs())
    tie = None
    if _near_zero(sp, run.tie_tol):
        tie = sp == 0 if run.tie_tol == 0 else sp.abs() <= run.tie_tol
        dead = skip(tie) if skip is not None else None
        if dead is not None:
            tie = tie & ~dead
            tie = tie if mask_any(tie) else None
    if tie is None:
        out = native() if native is not None else torch.where(sp > 0, pos, neg)
        if flat:
            run.mark_flat(out, neg, None)
        return out
    rows, choice, _ = _resolve_sign(run, op, s, tie)
    lock = (sp > 0) | sp.isnan()  # NaN propagates through pos, as in PyTorch's kernels
    lock.view(-1)[rows] = choice == 0
    run.kinks[-1].write = lambda c: lock.data.view(-1).index_put_((rows,), c == 0)
    if jumps:
        pp, nn_ = (torch.broadcast_to(torch.as_tensor(_split(v)[0], dtype=sp.dtype), sp.shape).reshape(-1)[rows]
                   for v in (pos, neg))
        if ((pp != nn_) & (choice == 0)).any():
            raise NonsmoothError(f"{op} at {_user_line()} jumps here: f is discontinuous at x along this "
                                 "direction, so the one-sided derivative does not exist")
    out = torch.where(lock, pos, neg)
    if flat and run.tie_tol == 0:  # the tied elements sit on the kink: live, whichever side is locked
        run.mark_flat(out, neg, tie)
    return out


def _finish(func, x: Tensor, out: Tensor, inplace: bool) -> Tensor:
    """In-place variants write the locked result back into x."""
    return x.copy_(out) if inplace and out is not x else out


@kink_rule(aten.relu, torch.relu, torch.relu_, F.relu, F.relu_, Tensor.relu, Tensor.relu_)
def relu(run, func, x, inplace=False):
    """max(x, 0). At 0: x where the direction has x' > 0, else 0, so f'(x; d) = max(x', 0)."""
    inplace = inplace or func in (torch.relu_, F.relu_, Tensor.relu_)
    out = _switch(run, "aten.relu", x, x, 0.0, lambda: F.relu(x, inplace=inplace), flat=True)
    return _finish(func, x, out, inplace)


@kink_rule(aten.abs, torch.abs, torch.absolute, Tensor.abs, Tensor.absolute, Tensor.abs_)
def abs(run, func, x):
    """|x|. At 0: x or -x, whichever grows along the direction: f'(x; d) = |x'|. A complex 0 is a cone
    (|z'| is not a max of two pieces): an error."""
    if x.is_complex():
        if mask_any(_split(x)[0] == 0):
            raise NonsmoothError(f"aten.abs at {_user_line()} of a complex 0: its one-sided derivative |z'| is a "
                                 "cone, not a choice of pieces; gradwise has no rule for it. Keep the argument "
                                 "away from 0 or write |z| as linalg.vector_norm of (real, imag)")
        return func(x)
    out = _switch(run, "aten.abs", x, x, -x, lambda: func(x))
    return _finish(func, x, out, func is Tensor.abs_)


def _as_tensor(v, like: Tensor):
    return v if isinstance(v, Tensor) or v is None else torch.as_tensor(v, dtype=like.dtype, device=like.device)


def _pair(run, op: str, a, b, larger: bool, native: Callable):
    """max (larger) or min of a and b elementwise; a wins ties unless the direction says otherwise."""
    like = a if isinstance(a, Tensor) else b
    a, b = _as_tensor(a, like), _as_tensor(b, like)
    if run.near_tol is None and not _near_zero(_split(a)[0] - _split(b)[0], run.tie_tol):
        return native()
    return _switch(run, op, a - b if larger else b - a, a, b, native, skip=lambda tie: _both_dead(run, a, b, tie))


def _both_dead(run: _Run, a, b, tie: Tensor) -> Tensor | None:
    """The tied elements where a and b are both relu-dead (locally the same constant): no kink there."""
    fa = run.flat_source(a) if isinstance(a, Tensor) and run.tie_tol == 0 else None
    fb = run.flat_source(b) if fa is not None and isinstance(b, Tensor) else None
    if fb is None or fa[0] != fb[0]:
        return None
    ap = _split(a)[0].detach()
    dead = tie & (ap == fa[0])  # at a tie b equals a
    for live in (fa[1], fb[1]):
        if live is not None:
            dead &= ~live
    return dead


@kink_rule(aten.maximum, torch.maximum, Tensor.maximum, torch.fmax, Tensor.fmax)
def maximum(run, func, a, b):
    """Elementwise max. At a tie: the argument that is larger along the direction: f' = max(a', b')."""
    return _pair(run, "aten.maximum", a, b, True, lambda: func(a, b))


@kink_rule(aten.minimum, torch.minimum, Tensor.minimum, torch.fmin, Tensor.fmin)
def minimum(run, func, a, b):
    """Elementwise min. At a tie: the argument that is smaller along the direction: f' = min(a', b')."""
    return _pair(run, "aten.minimum", a, b, False, lambda: func(a, b))


def _clamp(run, x, lo, hi, native: Callable):
    """min(max(x, lo), hi) with the pair rule at each bound that x touches."""
    lo, hi = _as_tensor(lo, x), _as_tensor(hi, x)
    xp = _split(x)[0]
    touches = [b for b in (lo, hi) if b is not None and ((xp - _split(b)[0]).abs() <= run.tie_tol).any()]
    if not touches and run.near_tol is None:
        return native()
    out = x
    if lo is not None:
        out = _pair(run, "aten.clamp", out, lo, True, lambda: torch.clamp(out, min=lo))
    if hi is not None:
        out = _pair(run, "aten.clamp", out, hi, False, lambda: torch.clamp(out, max=hi))
    return out


@kink_rule(aten.clamp, torch.clamp, torch.clip, Tensor.clamp, Tensor.clip, Tensor.clamp_, Tensor.clip_,
           torch.clamp_, torch.clip_)
def clamp(run, func, x, min=None, max=None):
    """clamp(x, lo, hi). At a bound: x if it moves inside along the direction, else the bound."""
    out = _clamp(run, x, min, max, lambda: func(x, min, max))
    return _finish(func, x, out, func in (Tensor.clamp_, Tensor.clip_, torch.clamp_, torch.clip_))


@kink_rule(aten.clamp_min, torch.clamp_min, Tensor.clamp_min, Tensor.clamp_min_)
def clamp_min(run, func, x, min):
    """max(x, min): the clamp rule at the lower bound."""
    return _finish(func, x, _clamp(run, x, min, None, lambda: func(x, min)), func is Tensor.clamp_min_)


@kink_rule(aten.clamp_max, torch.clamp_max, Tensor.clamp_max, Tensor.clamp_max_)
def clamp_max(run, func, x, max):
    """min(x, max): the clamp rule at the upper bound."""
    return _finish(func, x, _clamp(run, x, None, max, lambda: func(x, max)), func is Tensor.clamp_max_)


@kink_rule(aten.hardtanh, F.hardtanh, F.hardtanh_)
def hardtanh(run, func, x, min_val=-1.0, max_val=1.0, inplace=False):
    """clamp(x, min_val, max_val), with the clamp rule at both bounds."""
    inplace = inplace or func is F.hardtanh_
    out = _clamp(run, x, min_val, max_val, lambda: F.hardtanh(x, min_val, max_val, inplace))
    return _finish(func, x, out, inplace)


@kink_rule(aten.relu6, F.relu6)
def relu6(run, func, x, inplace=False):
    """clamp(x, 0, 6), with the clamp rule at both bounds."""
    return _finish(func, x, _clamp(run, x, 0.0, 6.0, lambda: F.relu6(x, inplace)), inplace)


@kink_rule(aten.leaky_relu, F.leaky_relu, F.leaky_relu_)
def leaky_relu(run, func, x, negative_slope=0.01, inplace=False):
    """x for x > 0, slope*x for x < 0. At 0: the piece chosen by the sign of x' along the direction."""
    inplace = inplace or func is F.leaky_relu_
    out = _switch(run, "aten.leaky_relu", x, x, negative_slope * x,
                  lambda: F.leaky_relu(x, negative_slope, inplace))
    return _finish(func, x, out, inplace)


@kink_rule(aten.prelu, F.prelu, torch.prelu)
def prelu(run, func, x, weight):
    """x for x > 0, weight*x for x < 0 (weight per channel, dim 1). At 0: chosen by the sign of x'."""
    w = weight.reshape(()) if weight.numel() == 1 else weight.reshape(1, -1, *[1] * (x.dim() - 2))
    return _switch(run, "aten.prelu", x, x, w * x, lambda: F.prelu(x, weight))


@kink_rule(aten.hardsigmoid, F.hardsigmoid)
def hardsigmoid(run, func, x, inplace=False):
    """clamp(x + 3, 0, 6) / 6: the clamp rule at x = -3 and x = 3."""
    if not _touches(run, x, (-3.0, 3.0)):
        return F.hardsigmoid(x, inplace)
    return _finish(func, x, _clamp(run, x + 3, 0.0, 6.0, None) / 6, inplace)


@kink_rule(aten.hardswish, F.hardswish)
def hardswish(run, func, x, inplace=False):
    """x * clamp(x + 3, 0, 6) / 6: the clamp rule at x = -3 and x = 3, then the product rule."""
    if not _touches(run, x, (-3.0, 3.0)):
        return F.hardswish(x, inplace)
    return _finish(func, x, x * _clamp(run, x + 3, 0.0, 6.0, None) / 6, inplace)


def _touches(run, x, points) -> bool:
    xp = _split(x)[0]
    return run.near_tol is not None or any(((xp - p).abs() <= run.tie_tol).any() for p in points)


@kink_rule(aten.threshold, F.threshold, torch.threshold, F.threshold_)
def threshold(run, func, x, threshold, value, inplace=False):
    """x where x > threshold, else value. A jump unless value == threshold: an error if the direction crosses."""
    inplace = inplace or func is F.threshold_
    out = _switch(run, "aten.threshold", x - threshold, x, value,
                  lambda: F.threshold(x, threshold, value, inplace), jumps=True,
                  flat=isinstance(value, (int, float)) and isinstance(threshold, (int, float)) and value <= threshold)
    return _finish(func, x, out, inplace)


@kink_rule(aten.softshrink, F.softshrink)
def softshrink(run, func, x, lambd=0.5):
    """x - clamp(x, -lambd, lambd): the clamp rule at both breakpoints."""
    if not _touches(run, x, (-lambd, lambd)):
        return F.softshrink(x, lambd)
    return x - _clamp(run, x, -lambd, lambd, None)


@kink_rule(aten.hardshrink, F.hardshrink, torch.hardshrink, Tensor.hardshrink)
def hardshrink(run, func, x, lambd=0.5):
    """x where |x| > lambd, else 0: jumps at +-lambd, an error if the direction crosses one."""
    if not _touches(run, x, (-lambd, lambd)):
        return func(x, lambd)
    inner = _switch(run, "aten.hardshrink", -lambd - x, x, 0.0, None, jumps=True)
    return _switch(run, "aten.hardshrink", x - lambd, x, inner, None, jumps=True)


def _reduce(loss: Tensor, reduction: str, size_average=None, reduce=None) -> Tensor:
    if isinstance(size_average, int) and not isinstance(size_average, bool):  # torch.*_loss(..., reduction_enum)
        reduction, size_average = ("none", "mean", "sum")[size_average], None
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    return {"mean": loss.mean, "sum": loss.sum, "none": lambda: loss}[reduction]()


@kink_rule(aten.l1_loss, F.l1_loss)
def l1_loss(run, func, input, target, size_average=None, reduce=None, reduction="mean"):
    """mean/sum of |input - target|: the abs rule elementwise."""
    return _reduce(abs(run, torch.abs, input - target), reduction, size_average, reduce)


def _hinge(run, op: str, z):
    """max(z, 0) with the pair rule at z = 0 (the margin)."""
    return _pair(run, op, z, 0.0, True, lambda: torch.clamp_min(z, 0.0))


@kink_rule(aten.hinge_embedding_loss, F.hinge_embedding_loss, torch.hinge_embedding_loss)
def hinge_embedding_loss(run, func, input, target, margin=1.0, size_average=None, reduce=None, reduction="mean"):
    """x where y == 1, max(0, margin - x) where y == -1 (PyTorch's formula: both terms for other y). At
    margin - x == 0: the hinge side chosen along the direction, f'(x; d) = max(-x', 0)."""
    hinge = _hinge(run, "aten.hinge_embedding_loss", margin - input)
    loss = hinge.masked_fill(target == 1, 0.0) + input.masked_fill(target == -1, 0.0)
    return _reduce(loss, reduction, size_average, reduce)


@kink_rule(aten.margin_ranking_loss, F.margin_ranking_loss, torch.margin_ranking_loss)
def margin_ranking_loss(run, func, input1, input2, target, margin=0.0, size_average=None, reduce=None,
                        reduction="mean"):
    """max(0, -y (x1 - x2) + margin). At the margin: the hinge side chosen along the direction."""
    loss = _hinge(run, "aten.margin_ranking_loss", -target * (input1 - input2) + margin)
    return _reduce(loss, reduction, size_average, reduce)


@kink_rule(aten.multi_margin_loss, F.multi_margin_loss)
def multi_margin_loss(run, func, input, target, p=1, margin=1.0, weight=None, size_average=None, reduce=None,
                      reduction="mean"):
    """sum over i != y of w[y] max(0, margin - x[y] + x[i])^p / C (PyTorch's formula). At a margin: the hinge
    side chosen along the direction (for p = 2 both sides have slope 0 there)."""
    x = input if input.dim() == 2 else input.reshape(1, -1)
    y = target.reshape(-1, 1)
    own = torch.arange(x.shape[1], device=y.device) == y
    z = margin - x.gather(1, y) + x
    z = z.masked_fill(own | _split(z)[0].isnan(), -1.0)  # the target class is no term; PyTorch drops NaN terms
    h = _hinge(run, "aten.multi_margin_loss", z)
    h = h * h if p == 2 else h
    if weight is not None:
        h = h * weight.gather(0, y.reshape(-1)).unsqueeze(1)
    loss = h.sum(1) / x.shape[1]
    return _reduce(loss if input.dim() == 2 else loss.reshape(()), reduction, size_average, reduce)


@kink_rule(aten.triplet_margin_loss, F.triplet_margin_loss, torch.triplet_margin_loss)
def triplet_margin_loss(run, func, anchor, positive, negative, margin=1.0, p=2, eps=1e-6, swap=False,
                        size_average=None, reduce=None, reduction="mean"):
    """max(d(a, p) - d(a, n) + margin, 0), d(u, v) = ||u - v + eps||_p (with ``swap``: min of d(a, n), d(p, n)):
    the hinge rule at the margin, the minimum rule for swap, the norm rule where u - v + eps is 0."""
    dist = lambda u, v: vector_norm(run, torch.linalg.vector_norm, u - v + eps, p, -1)
    d_an = dist(anchor, negative)
    if swap:
        d_an = _pair(run, "aten.triplet_margin_loss", d_an, dist(positive, negative), False,
                     lambda: torch.minimum(d_an, dist(positive, negative)))
    loss = _hinge(run, "aten.triplet_margin_loss", dist(anchor, positive) - d_an + margin)
    return _reduce(loss, reduction, size_average, reduce)


# --- comparisons -------------------------------------------------------------------------------------------

# name -> (outcome on the side where a > b, None for eq/ne whose outcome is the same on both sides; outcome at a tie)
_CMP = {"gt": (True, False), "ge": (True, True), "lt": (False, False), "le": (False, True), "eq": (None, True),
        "ne": (None, False)}


def _comparison(name: str):
    above, at_tie = _CMP[name]

    def rule(run, func, a, b):
        ap, bp = _split(a)[0], _split(b)[0] if isinstance(b, Tensor) else b
        result = func(ap, bp)
        if not torch.is_floating_point(ap) or a is b:  # x == x (a NaN test) ties everywhere: never a kink
            return result
        s = a - b
        sp = _split(s)[0]
        tie = sp.abs() <= run.tie_tol
        run.note_near(f"aten.{name}", sp.abs())
        if not tie.any():
            return result
        rows, choice, still = _resolve_sign(run, f"aten.{name}", s, tie, comparison=True)
        result = result.expand(sp.shape).clone()
        moved = (choice == 0) == above if above is not None else torch.full_like(still, not at_tie)
        result.view(-1)[rows] = torch.where(still, at_tie, moved)
        return result

    rule.__name__ = name
    rule.__doc__ = (f"a {name} b. At a tie, the outcome along the direction (compare a' with b', then further "
                    "directions); unchanged where the tangents tie too.")
    return rule


for _name in _CMP:
    _op = getattr(aten, _name)
    _calls = [getattr(torch, _name), getattr(Tensor, _name), getattr(Tensor, f"__{_name}__")]
    kink_rule(_op, *_calls)(_comparison(_name))


# --- piecewise-constant ops -----------------------------------------------------------------------------------
# Derivative 0 away from their jumps. At a jump the op takes its one-sided limit along the direction (then further
# directions), like a comparison; if f's value then differs from f(x), f jumps at x and there is no one-sided
# derivative and no Clarke gradient: directional_derivative, generalized_grad and subdifferential raise. Where f
# stays continuous (x * sign(x), floor(x) + floor(-x) + ...), the locked piece gives the exact answer.

# name -> (jump points of x, left limit, right limit)
_STEPS: dict[str, tuple[Callable, Callable, Callable]] = {
    "sign": (lambda x: x == 0, lambda x: -torch.ones_like(x), lambda x: torch.ones_like(x)),
    "floor": (lambda x: (x == x.floor()) & x.isfinite(), lambda x: x - 1, lambda x: x),
    "ceil": (lambda x: (x == x.ceil()) & x.isfinite(), lambda x: x, lambda x: x + 1),
    "trunc": (lambda x: (x == x.trunc()) & x.isfinite() & (x != 0), lambda x: torch.where(x > 0, x - 1, x),
              lambda x: torch.where(x > 0, x, x + 1)),
    "round": (lambda x: (x.abs() - x.abs().trunc()) == 0.5, lambda x: x - 0.5, lambda x: x + 0.5),
}


def _step(name: str, inplace: bool = False):
    at_jump, left, right = _STEPS[name]

    def rule(run, func, x, *args, **kwargs):
        xp = _split(x)[0]
        if args or kwargs or not xp.is_floating_point():  # round(decimals=k): jumps are not floats; kept as is
            return func(x, *args, **kwargs)
        jump = at_jump(xp.detach())
        if not mask_any(jump):
            return func(x)
        rows, choice, still = _resolve_sign(run, f"aten.{name}", x, jump, comparison=True)
        own = xp.detach().reshape(-1)[rows].clone()
        value = func(x).clone()  # PyTorch's own (zero derivative, in the graph), the limits written in
        limit = torch.where(choice == 0, right(own), left(own))
        value.view(-1)[rows] = torch.where(still, _split(value)[0].detach().reshape(-1)[rows], limit)
        return x.copy_(value) if inplace else value

    rule.__name__ = name + ("_" if inplace else "")
    rule.__doc__ = (f"{name}: piecewise constant (derivative 0). At a jump, its one-sided limit along the direction "
                    "(unchanged where the direction does not move x); a jump of f itself is an error.")
    return rule


for _name, _extra in [("sign", [torch.sgn, Tensor.sgn]), ("floor", []), ("ceil", []), ("round", []),
                      ("trunc", [torch.fix, Tensor.fix])]:
    kink_rule(getattr(aten, _name), getattr(torch, _name), getattr(Tensor, _name), *_extra)(_step(_name))
    _ROUTES[getattr(Tensor, f"{_name}_")] = _step(_name, inplace=True)


@kink_rule(aten.frac, torch.frac, Tensor.frac)
def frac(run, func, x):
    """x - trunc(x): slope 1, jumps at nonzero integers (the trunc rule: its one-sided limit, a jump of f is an
    error)."""
    return x - _step("trunc")(run, torch.trunc, x)


# --- selections: max / min reductions, max-pool --------------------------------------------------------------


def _select_last(run, op: str, x: Tensor, xw: Tensor, tw_fn: Callable, vw_fn: Callable, idx: Tensor,
                 descending: bool) -> Tensor:
    """Lock indices for a reduction over the last dim of window view ``xw`` of x's primal.

    ``idx`` holds PyTorch's choice (first extreme element); rows with ties get the lexicographic winner.
    ``tw_fn(rows)``/``vw_fn(rows)`` give the tangents/values of the tied rows' candidates.
    """
    best = xw.amax(-1, keepdim=True) if descending else xw.amin(-1, keepdim=True)
    gap = (best - xw).abs()
    eq = gap <= run.tie_tol
    if run.near_tol is not None:
        run.note_near(op, gap)
    tie = eq.sum(-1) > 1
    if not mask_any(tie):
        return idx
    flat = run.flat_source(x) if run.tie_tol == 0 else None
    if flat is not None and flat[1] is None:  # ties among relu-dead elements only: locally constant, no kink
        tie &= best.squeeze(-1) != flat[0]
        if not mask_any(tie):
            return idx
    rows = _tied_rows(tie)
    cand = eq.reshape(-1, eq.shape[-1])[rows]
    choice, _ = run.resolve(op, "select", cand, tw_fn(rows), lambda: vw_fn(rows), descending)
    idx = idx.clone()
    idx.view(-1)[rows] = choice.to(idx.dtype)
    run.kinks[-1].write = lambda c: idx.data.view(-1).index_put_((rows,), c.to(idx.dtype))
    return idx


def _rows_of(t: Tensor | None, like: Tensor, rows: Tensor) -> Tensor:
    if t is None:
        return torch.zeros(len(rows), like.shape[-1], dtype=like.dtype, device=like.device)
    return t.reshape(-1, t.shape[-1])[rows]


def _reduce_select(run, op: str, x: Tensor, dims: tuple[int, ...] | None, keepdim: bool, descending: bool):
    """max/min over ``dims`` (all if None): locked values and their flat indices within the reduced dims."""
    xp = _split(x)[0]
    nd = xp.dim()
    dims = tuple(range(nd)) if dims is None or dims == () else tuple(d % max(nd, 1) for d in dims)
    keep = [d for d in range(nd) if d not in dims]
    perm = keep + list(dims)
    xm = x.permute(perm).reshape(*[xp.shape[d] for d in keep], -1) if nd else x.reshape(1)
    xw = _split(xm)[0]
    idx = (xw.argmax(-1) if descending else xw.argmin(-1))
    tm = _split(xm)[1]
    idx = _select_last(run, op, x, xw, lambda r: _rows_of(tm, xw, r), lambda r: xm.reshape(-1, xw.shape[-1])[r],
                       idx, descending)
    values = xm.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    if keepdim:
        shape = [1 if d in dims else xp.shape[d] for d in range(nd)]
        values, idx = values.reshape(shape), idx.reshape(shape)
    return values, idx


def _max_min(op: str, descending: bool, pair_rule: Callable):
    def rule(run, func, x, dim=None, keepdim=False, *, out=None):
        if isinstance(dim, Tensor):  # torch.max(a, b) is elementwise
            return pair_rule(run, torch.maximum if descending else torch.minimum, x, dim)
        if dim is None:
            return _reduce_select(run, op, x, None, False, descending)[0]
        values, idx = _reduce_select(run, op, x, (dim,), keepdim, descending)
        rt = torch.return_types.max if descending else torch.return_types.min
        return rt((values, idx))

    rule.__name__ = op.split(".")[1]
    word = "largest" if descending else "smallest"
    rule.__doc__ = (f"{op} (full or over a dim). Over tied {word} elements: the one that is {word} along "
                    f"the direction (then further directions), so f'(x; d) is the {word} tangent of the tied set.")
    return rule


kink_rule(aten.max, torch.max, Tensor.max)(_max_min("aten.max", True, maximum))
kink_rule(aten.min, torch.min, Tensor.min)(_max_min("aten.min", False, minimum))


def _amax_amin(op: str, descending: bool):
    def rule(run, func, x, dim=(), keepdim=False):
        dims = (dim,) if isinstance(dim, int) else tuple(dim)
        return _reduce_select(run, op, x, dims, keepdim, descending)[0]

    rule.__name__ = op.split(".")[1]
    rule.__doc__ = f"{op}: like {op.replace('a', '', 1)}; PyTorch splits ties evenly, gradwise picks the winner."
    return rule


kink_rule(aten.amax, torch.amax, Tensor.amax)(_amax_amin("aten.amax", True))
kink_rule(aten.amin, torch.amin, Tensor.amin)(_amax_amin("aten.amin", False))


def _window_index(spatial, nd: int, k, s, p, dil, out_sp, device) -> Tensor:
    """(outputs, K) flat input index of every window element (-1 for padding)."""
    pads = []
    for i in reversed(range(nd)):
        need = (out_sp[i] - 1) * s[i] + (k[i] - 1) * dil[i] + 1
        pads += [p[i], max(0, need - spatial[i] - p[i])]
    grid = F.pad(torch.arange(math.prod(spatial), device=device).reshape(1, *spatial), pads, value=-1)
    for i in range(nd):
        grid = grid.unfold(1 + i, (k[i] - 1) * dil[i] + 1, s[i])
    grid = grid[(0, *(slice(0, o) for o in out_sp), *(slice(None, None, d) for d in dil))]
    return grid.reshape(math.prod(out_sp), -1)


def _window_views(t: Tensor, nd: int, k, s, p, dil, out_sp, fill) -> list[Tensor]:
    """The prod(k) strided views of t shaped like the pool's output, view j holding the j-th element of every
    window (t padded with ``fill`` where windows overhang it; no copy otherwise)."""
    pads = []
    for i in reversed(range(nd)):
        need = (out_sp[i] - 1) * s[i] + (k[i] - 1) * dil[i] + 1
        pads += [p[i], max(0, need - t.shape[t.dim() - nd + i] - p[i])]
    if any(pads):
        t = F.pad(t, pads, value=fill)
    spans = list(zip(dil, out_sp, s, strict=True))
    return [t[(..., *(slice(o * d, o * d + (n - 1) * st + 1, st) for o, (d, n, st) in zip(offs, spans, strict=True)))]
            for offs in itertools.product(*map(range, k))]


def _pool_ties(run: _Run, op: str, x: Tensor, out: Tensor, nd: int, k, s, p, dil) -> Tensor | None:
    """Windows whose maximum ``out`` is attained more than once, relu-dead windows excepted (None: no such window).

    One comparison per window element over strided views of x, no re-pooling. A window whose tied elements are
    all relu-dead (the output of a switch that is locally constant there, see `_Run.mark_flat`) is no kink: the
    maximum is locally constant, and every choice gives the same (zero) gradient.
    """
    xp = _split(x)[0].detach()
    views = _window_views(xp, nd, k, s, p, dil, out.shape[out.dim() - nd:], -math.inf)
    if run.near_tol is not None or run.tie_tol:
        gap = torch.stack([out - v for v in views], -1)
        run.note_near(op, gap[gap > 0])
        tie = (gap <= run.tie_tol).sum(-1) > 1
    else:
        e = torch.empty(out.shape, dtype=torch.bool, device=out.device)
        count = torch.zeros(out.shape, dtype=torch.uint8 if len(views) < 256 else torch.int32, device=out.device)
        for v in views:
            count.add_(torch.eq(v, out, out=e))
        tie = count > 1
    if not mask_any(tie):
        return None
    flat = run.flat_source(x) if run.tie_tol == 0 else None
    if flat is not None:
        c, live = flat
        live_window = out != c
        if live is not None:  # a tied element on the switch's own kink makes the window live
            for v, lv in zip(views, _window_views(live.to(torch.uint8), nd, k, s, p, dil, out.shape[-nd:], 0),
                             strict=True):
                live_window |= (v == out) & lv.bool()
        tie &= live_window
        if not mask_any(tie):
            return None
    return tie


def _pool_known(run: _Run, op: str, x: Tensor, rec: Kink, return_indices: bool):
    """Ranked pass: the probe found ``rec``'s tied windows; rank them by tangent, gather at its lock indices."""
    lock, fpos, pad, batch, shape = rec.site
    xt = _split(x)[1]
    key = None if xt is None else xt.reshape(-1).take(fpos)
    key = key if pad is None or key is None else key.masked_fill(pad, 0.0)
    choice, _ = run.resolve(op, "select", rec.cand, key, None)
    rec.write(choice)
    values = x.reshape(batch, -1).gather(1, lock.reshape(batch, -1)).reshape(shape)
    return (values, lock) if return_indices else values


def _pool_lock(run: _Run, op: str, x: Tensor, out: Tensor, idx: Tensor, tie: Tensor | None, windows: Tensor,
               batch: int, return_indices: bool):
    """Finish a max-pool-like op whose native ``out``/``idx`` came from x's primal: rank the ``tie`` windows
    (``windows``: (outputs, K) flat input index of each window element, -1 for padding) and lock their indices.

    The choices are written into the indices that PyTorch's backward reads (without a version bump), so the graph
    stays PyTorch's own node; in a tangent-free pass the first maximum stands until the ranked pass writes. With
    tangents, the output's tangent is the input's tangent at the locked indices.
    """
    xp, xt = _split(x)
    xp, op_ = xp.detach(), out.detach()

    def finish(lock):
        o = out if xt is None else fwAD.make_dual(out, xt.reshape(batch, -1).gather(
            1, lock.reshape(batch, -1)).reshape(out.shape))
        return (o, lock) if return_indices else o

    if tie is None:
        return finish(idx)
    n_out = windows.shape[0]
    rows = _tied_rows(tie)
    cidx = windows.index_select(0, rows % n_out)
    padded = bool(mask_any(windows < 0))
    fpos = (rows // n_out).unsqueeze(1) * (xp.numel() // max(batch, 1)) + (cidx.clamp(min=0) if padded else cidx)
    pad = cidx < 0 if padded else None
    pick = lambda t, fill: t.reshape(-1).take(fpos) if pad is None else t.reshape(-1).take(fpos).masked_fill(
        pad, fill)
    best = op_.reshape(-1)[rows].unsqueeze(1)
    cand = pick(xp, -math.inf) == best if run.tie_tol == 0 else best - pick(xp, -math.inf) <= run.tie_tol
    if padded and not bool((keep := cand.sum(1) > 1).all()):  # windows tied only with padding (-inf input)
        rows, cidx, fpos, pad, cand = rows[keep], cidx[keep], fpos[keep], pad[keep], cand[keep]
        if len(rows) == 0:
            return finish(idx)
    key = pick(xt, 0.0) if xt is not None else None
    choice, _ = run.resolve(op, "select", cand, key, lambda: pick(x, -math.inf), lazy=True)
    locked = lambda c: cidx.gather(1, c.unsqueeze(1)).squeeze(1)
    rec = run.kinks[-1]
    lock = idx if idx.is_contiguous() else idx.clone(memory_format=torch.contiguous_format)
    rec.write = lambda c: lock.data.view(-1).index_put_((rows,), locked(c))
    rec.site = (lock, fpos, pad, batch, op_.shape)
    if choice is not None:
        rec.write(choice)
    if lock is idx:
        return finish(idx)
    values = x.reshape(batch, -1).gather(1, lock.reshape(batch, -1)).reshape(op_.shape)
    return (values, lock) if return_indices else values


def _max_pool(nd: int):
    native = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nd]
    op = f"aten.max_pool{nd}d"

    def rule(run, func, x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
             return_indices=False):
        tup = lambda v: (tuple(v) * nd)[:nd] if isinstance(v, (list, tuple)) else (v,) * nd
        k, p, dil = tup(kernel_size), tup(padding), tup(dilation)
        s = k if stride is None or stride == [] or stride == () else tup(stride)
        if known := run.known_here():
            return _pool_known(run, op, x, known[0], return_indices)
        xp = _split(x)[0]
        out, idx = native(xp, k, s, p, dil, ceil_mode, return_indices=True)  # PyTorch's own, in the graph
        tie = _pool_ties(run, op, x, out.detach(), nd, k, s, p, dil)
        spatial, out_sp = xp.shape[xp.dim() - nd:], out.shape[out.dim() - nd:]
        windows = None if tie is None else _window_index(spatial, nd, k, s, p, dil, out_sp, xp.device)
        return _pool_lock(run, op, x, out, idx, tie, windows, math.prod(xp.shape[: xp.dim() - nd]), return_indices)

    rule.__name__ = f"max_pool{nd}d"
    rule.__doc__ = (f"{op}: in a window with tied maxima, the element largest along the direction (PyTorch "
                    "takes the first), so f'(x; d) is the largest tangent over the tied window; the indices are "
                    "locked. Windows whose tied elements are all relu-dead are no kink.")
    return rule


kink_rule(aten.max_pool1d, F.max_pool1d, torch.max_pool1d, F.max_pool1d_with_indices)(_max_pool(1))
kink_rule(aten.max_pool2d_with_indices, F.max_pool2d, torch.max_pool2d, F.max_pool2d_with_indices)(_max_pool(2))
kink_rule(aten.max_pool3d_with_indices, F.max_pool3d, torch.max_pool3d, F.max_pool3d_with_indices)(_max_pool(3))


# --- orderings: sort, topk, kthvalue, median ----------------------------------------------------------------


def _ordered(run, op: str, x: Tensor, dim: int, descending: bool, positions: slice):
    """Locked permutation sorting x along dim; ties that reach ``positions`` ranked lexicographically."""
    xp = _split(x)[0]
    dim = dim % max(xp.dim(), 1)
    xm = x.movedim(dim, -1) if xp.dim() else x.reshape(1)
    pm, tm = _split(xm)
    vals, perm = torch.sort(pm, dim=-1, descending=descending, stable=True)
    m = pm.shape[-1]
    lo, hi = max(positions.start - 1, 0), min(positions.stop, m - 1)
    gap = (vals[..., 1:] - vals[..., :-1]).abs()[..., lo:hi]
    tie_pairs = gap <= run.tie_tol
    run.note_near(op, gap)
    tie = tie_pairs.any(-1)
    if tie.any():
        rows = _tied_rows(tie)
        prim = pm.reshape(-1, m)[rows]
        sv = vals.reshape(-1, m)[rows]
        # candidates: the tie groups (runs of equal sorted values) holding a tie pair that reaches the positions,
        # found in sorted order by a group id per position (linear in m), then scattered back through perm
        link = (sv[:, 1:] - sv[:, :-1]).abs() <= run.tie_tol
        gid = torch.cat([torch.zeros_like(sv[:, :1], dtype=torch.int64), (~link).cumsum(-1)], -1)
        reach = torch.zeros_like(link)
        reach[:, lo:hi] = link[:, lo:hi]
        touched = torch.zeros(sv.shape, dtype=torch.int64, device=sv.device).scatter_add_(
            1, gid[:, :-1], reach.to(torch.int64))
        cand = torch.zeros_like(link[:, :1]).expand(-1, m).clone().scatter_(
            1, perm.reshape(-1, m)[rows], touched.gather(1, gid) > 0)
        key = tm.reshape(-1, m)[rows] if tm is not None else None
        # lazy: without any ranking key the stable sort above is the provisional order (the ranked pass writes)
        order, _ = run.resolve(op, "order", cand, key, lambda: xm.reshape(-1, m)[rows], descending, primal=prim,
                               lazy=True)
        perm = perm.clone()
        if order is not None:
            perm.view(-1, m)[rows] = order
        run.kinks[-1].write = lambda c: perm.data.view(-1, m).index_put_((rows,), c)
    return xm.gather(-1, perm), perm, dim


@kink_rule(aten.sort, torch.sort, Tensor.sort)
def sort(run, func, x, dim=-1, descending=False, stable=False):
    """Sorted values. Within tied values, tangents sorted the same way (then further directions)."""
    if isinstance(dim, bool):  # sort(x, descending) positional form is not used by torch; keep dim an int
        dim, descending = -1, dim
    v, perm, d = _ordered(run, "aten.sort", x, dim, descending, slice(0, x.shape[dim] if x.dim() else 1))
    return torch.return_types.sort((v.movedim(-1, d), perm.movedim(-1, d)))


@kink_rule(aten.topk, torch.topk, Tensor.topk)
def topk(run, func, x, k, dim=-1, largest=True, sorted=True):
    """Top k. Ties at or across the k-th place: the elements largest along the direction win."""
    v, perm, d = _ordered(run, "aten.topk", x, dim, largest, slice(0, k))
    return torch.return_types.topk((v[..., :k].movedim(-1, d), perm[..., :k].movedim(-1, d)))


@kink_rule(aten.kthvalue, torch.kthvalue, Tensor.kthvalue)
def kthvalue(run, func, x, k, dim=-1, keepdim=False):
    """k-th smallest. At a tie: the tied element k-th smallest along the direction."""
    v, perm, d = _ordered(run, "aten.kthvalue", x, dim, False, slice(k - 1, k))
    v, i = v[..., k - 1 : k], perm[..., k - 1 : k]
    v, i = (v.movedim(-1, d), i.movedim(-1, d)) if keepdim else (v.squeeze(-1), i.squeeze(-1))
    return torch.return_types.kthvalue((v, i))


@kink_rule(aten.median, torch.median, Tensor.median)
def median(run, func, x, dim=None, keepdim=False):
    """Lower median. At a tie: the tied element in the middle along the direction."""
    if _split(x)[0].isnan().any():  # PyTorch's median propagates NaN; no tie to rank
        return func(x) if dim is None else func(x, dim, keepdim)
    if dim is None:
        return kthvalue(run, func, x.reshape(-1), (x.numel() + 1) // 2).values
    return torch.return_types.median(tuple(kthvalue(run, func, x, (x.shape[dim] + 1) // 2, dim, keepdim)))


@kink_rule(aten.nanmedian, torch.nanmedian, Tensor.nanmedian)
def nanmedian(run, func, x, dim=None, keepdim=False):
    """Lower median of the non-NaN values (NaN sorts last, so it is the ((c - 1) // 2)-th of the sorted slice with
    c values). At a tie: the tied element in the middle along the direction, as for median."""
    xp = _split(x)[0]
    if xp.dim() == 0 or xp.numel() == 0:
        return func(x) if dim is None else func(x, dim, keepdim)
    xm, d = (x.reshape(-1), 0) if dim is None else (x, dim % xp.dim())
    pm = _split(xm)[0].detach().movedim(d, -1)
    k = torch.div((~pm.isnan()).sum(-1, keepdim=True) - 1, 2, rounding_mode="floor").clamp(min=0)  # all-NaN: 0
    lo, hi = int(k.min()), int(k.max())
    v, perm, d = _ordered(run, "aten.nanmedian", xm, d, False, slice(lo, hi + 1))
    v, i = v.gather(-1, k), perm.gather(-1, k)
    if dim is None:
        return v.reshape(())
    v, i = (v.movedim(-1, d), i.movedim(-1, d)) if keepdim else (v.squeeze(-1), i.squeeze(-1))
    return torch.return_types.nanmedian((v, i))


@kink_rule(aten.mode, torch.mode, Tensor.mode)
def mode(run, func, x, dim=-1, keepdim=False):
    """Most frequent value (the smallest of equally frequent ones). Nearby, values are distinct and mode is their
    minimum; so mode is continuous at x only where at most one value repeats and it is the slice's minimum (else:
    an error, mode jumps). There, along d the repeated minimum splits into groups of equal tangent: mode follows
    the largest group, then the smallest tangent, so with distinct tangents it is the min rule."""
    xp = _split(x)[0]
    if xp.dim() == 0 or xp.numel() == 0:
        return func(x, dim, keepdim)
    d = dim % xp.dim()
    srt = torch.sort(xp.detach().movedim(d, -1), -1).values
    same = srt[..., 1:] == srt[..., :-1]
    if not mask_any(same):
        return func(x, dim, keepdim)  # all values distinct: mode is the minimum, attained once
    first = torch.cat([torch.ones_like(same[..., :1]), ~same[..., :-1]], -1)
    groups = (same & first).sum(-1)  # repeated values per slice
    if not bool(((groups == 0) | ((groups == 1) & same[..., 0])).all()):
        raise NonsmoothError(f"aten.mode at {_user_line()}: a value that is not the minimum repeats (or two values "
                             "do), where mode is discontinuous: an arbitrarily small perturbation makes the values "
                             "distinct and mode jumps to the minimum. No one-sided derivative or Clarke gradient.")
    xm = x.movedim(d, -1)
    pm, tm = _split(xm)
    pm, m = pm.detach(), pm.shape[-1]
    out = func(xm, -1)
    rows = _tied_rows(same[..., 0])
    prim = pm.reshape(-1, m)[rows]
    cand = prim == srt.reshape(-1, m)[rows, :1]
    key = tm.reshape(-1, m)[rows] if tm is not None else None
    if key is not None:  # elements of equal tangent stay equal along d: keep the largest such groups
        mult = ((key.unsqueeze(2) == key.unsqueeze(1)) & cand.unsqueeze(1)).sum(-1).masked_fill(~cand, 0)
        cand = cand & (mult == mult.amax(-1, keepdim=True))
    choice, _ = run.resolve("aten.mode", "select", cand, key, lambda: xm.reshape(-1, m)[rows], False, lazy=True)
    lock = out.indices.unsqueeze(-1).contiguous().clone()
    run.kinks[-1].write = lambda c: lock.data.view(-1).index_put_((rows,), c)
    if choice is not None:
        run.kinks[-1].write(choice)
    values, idx = xm.gather(-1, lock), lock
    if keepdim:
        return torch.return_types.mode((values.movedim(-1, d), idx.movedim(-1, d)))
    return torch.return_types.mode((values.squeeze(-1), idx.squeeze(-1)))


def _cumulative(op: str, descending: bool):
    rt = torch.return_types.cummax if descending else torch.return_types.cummin

    def rule(run, func, x, dim):
        xp = _split(x)[0]
        if xp.dim() == 0 or xp.numel() == 0:
            return func(x, dim)
        d = dim % xp.dim()
        xm = x.movedim(d, -1)
        pm, tm = _split(xm)
        pm = pm.detach()
        out = func(xm, -1)
        v, idx = out.values.detach(), out.indices
        n = pm.shape[-1]
        # j <= i ties with the running extreme v[i] iff x[j] == v[i]; such j lie in v's plateau through i, so
        # count the elements attaining v within each plateau (a cumulative sum restarted at plateau starts)
        hit = (pm == v).to(torch.int64)
        step = torch.ones_like(hit, dtype=torch.bool)
        step[..., 1:] = v[..., 1:] != v[..., :-1]
        ar = torch.arange(n, device=pm.device).expand_as(hit)
        start = torch.where(step, ar, 0).cummax(-1).values
        cs = hit.cumsum(-1)
        tie = (cs - cs.gather(-1, start) + hit.gather(-1, start)) > 1
        flat = run.flat_source(x) if run.tie_tol == 0 else None
        if flat is not None and flat[1] is None:  # a plateau of relu-dead elements is no kink
            tie &= v != flat[0]
        if not mask_any(tie):
            return rt((out.values.movedim(-1, d), idx.movedim(-1, d)))
        rows = _tied_rows(tie)
        i, st = rows % n, start.reshape(-1)[rows]
        width = int((i - st).max()) + 1
        pos = st.unsqueeze(1) + torch.arange(width, device=pm.device)  # the plateau window of each tied output
        ok = pos <= i.unsqueeze(1)
        fpos = (rows // n).unsqueeze(1) * n + pos.clamp(max=n - 1)
        pick = lambda t, fill: t.reshape(-1).take(fpos).masked_fill(~ok, fill)
        cand = ok & (pick(pm, math.nan) == v.reshape(-1)[rows].unsqueeze(1))
        key = pick(tm, 0.0) if tm is not None else None
        choice, _ = run.resolve(op, "select", cand, key, lambda: pick(xm, 0.0), descending, lazy=True)
        lock = idx.contiguous().clone()
        locked = lambda c: pos.gather(1, c.unsqueeze(1)).squeeze(1)
        run.kinks[-1].write = lambda c: lock.data.view(-1).index_put_((rows,), locked(c))
        if choice is not None:
            run.kinks[-1].write(choice)
        return rt((xm.gather(-1, lock).movedim(-1, d), lock.movedim(-1, d)))

    word = "largest" if descending else "smallest"
    rule.__name__ = op.split(".")[1]
    rule.__doc__ = (f"{op}: the running {word} value. Where it is attained by several elements so far, the one "
                    f"{word} along the direction (PyTorch takes the last), so f'(x; d)_i is the {word} tangent over "
                    "them; the indices are locked. Plateaus of relu-dead elements are no kink.")
    return rule


kink_rule(aten.cummax, torch.cummax, Tensor.cummax)(_cumulative("aten.cummax", True))
kink_rule(aten.cummin, torch.cummin, Tensor.cummin)(_cumulative("aten.cummin", False))


def _adaptive_windows(spatial, out_sp, device) -> Tensor:
    """(outputs, K) flat input index of every adaptive-pooling window element (-1 past a shorter window)."""
    nd, index, bad = len(spatial), 0, None
    for dim, (n, o) in enumerate(zip(spatial, out_sp, strict=True)):
        ar = torch.arange(o, device=device)
        lo, hi = (ar * n) // o, ((ar + 1) * n + o - 1) // o
        j = lo.unsqueeze(1) + torch.arange(int((hi - lo).max()), device=device)
        shape = [1] * (2 * nd)
        shape[dim], shape[nd + dim] = o, j.shape[1]
        index = index + j.reshape(shape) * math.prod(spatial[dim + 1:])
        miss = (j >= hi.unsqueeze(1)).reshape(shape)
        bad = miss if bad is None else bad | miss
    index = index.masked_fill(bad, -1)
    return index.reshape(math.prod(out_sp), -1)


def _adaptive_max_pool(nd: int):
    native = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}[nd]
    op = f"aten.adaptive_max_pool{nd}d"

    def rule(run, func, x, output_size, return_indices=False):
        if known := run.known_here():
            return _pool_known(run, op, x, known[0], return_indices)
        xp = _split(x)[0]
        out, idx = native(xp, output_size, return_indices=True)
        spatial, out_sp = xp.shape[xp.dim() - nd:], out.shape[out.dim() - nd:]
        batch = math.prod(xp.shape[: xp.dim() - nd])
        windows = _adaptive_windows(spatial, out_sp, xp.device)
        op_ = out.detach()
        vals = xp.detach().reshape(batch, -1)[:, windows.clamp(min=0)].masked_fill(windows < 0, -math.inf)
        gap = op_.reshape(batch, -1, 1) - vals
        run.note_near(op, gap[gap > 0])
        tie = ((gap <= run.tie_tol).sum(-1) > 1).reshape(op_.shape)
        flat = run.flat_source(x) if run.tie_tol == 0 else None
        if flat is not None and flat[1] is None:  # relu-dead windows are no kink
            tie &= op_ != flat[0]
        return _pool_lock(run, op, x, out, idx, tie if mask_any(tie) else None, windows, batch, return_indices)

    rule.__name__ = f"adaptive_max_pool{nd}d"
    rule.__doc__ = (f"{op}: like max_pool (windows [floor(i L / O), ceil((i + 1) L / O))): in a window with tied "
                    "maxima the element largest along the direction; the indices are locked.")
    return rule


kink_rule(aten.adaptive_max_pool1d, F.adaptive_max_pool1d, torch.adaptive_max_pool1d,
          F.adaptive_max_pool1d_with_indices)(_adaptive_max_pool(1))
kink_rule(aten.adaptive_max_pool2d, F.adaptive_max_pool2d, F.adaptive_max_pool2d_with_indices)(_adaptive_max_pool(2))
kink_rule(aten.adaptive_max_pool3d, F.adaptive_max_pool3d, F.adaptive_max_pool3d_with_indices)(_adaptive_max_pool(3))


# --- singular points and norms ------------------------------------------------------------------------------


def _singular(op: str, x: Tensor, why: str):
    xp = _split(x)[0]
    at0 = xp == 0
    if at0.any():
        raise NonsmoothError(f"{op} at {_user_line()} is evaluated at 0 for {int(at0.sum())} element(s), where "
                             f"{why}; f'(x; d) does not exist or needs second-order terms. Write norms with "
                             "torch.linalg.vector_norm (exact at 0) or keep the argument away from 0.")


@kink_rule(aten.sqrt, torch.sqrt, Tensor.sqrt)
def sqrt(run, func, x):
    """sqrt(x): singular at 0 (infinite slope): an error naming the line instead of inf/NaN."""
    _singular("aten.sqrt", x, "its derivative is infinite")
    return func(x)


@kink_rule(aten.pow, torch.pow, Tensor.pow, Tensor.__pow__)
def pow(run, func, x, exponent):
    """x ** p with 0 < p < 1 (or non-integer p < 1): singular at 0, an error there."""
    if isinstance(x, Tensor) and isinstance(exponent, (int, float)) and 0 < exponent < 1:
        _singular("aten.pow", x, f"x ** {exponent} has an infinite derivative")
    return func(x, exponent)


@kink_rule(aten.linalg_vector_norm, torch.linalg.vector_norm)
def vector_norm(run, func, x, ord=2, dim=None, keepdim=False, *, dtype=None):
    """p-norm (p >= 1). At a zero slice: f'(x; d) = ||x'||, locked to the linear piece <u, x> where u is the
    norm's gradient at x' (a unit dual vector, the gradient at x + t d). Ord 1 and inf use the abs / amax rules."""
    ord = float(ord)
    dims = tuple(range(x.dim())) if dim is None else ((dim,) if isinstance(dim, int) else tuple(dim))
    if ord == 1 or math.isinf(ord):
        a = abs(run, torch.abs, x)
        if ord == 1:
            return a.sum(dim=dims, keepdim=keepdim)
        return _reduce_select(run, "aten.linalg_vector_norm", a, dims, keepdim, ord > 0)[0]
    if 0 < ord < 1:
        _singular("aten.linalg_vector_norm", x, f"the {ord}-norm has an infinite derivative")
    out = torch.linalg.vector_norm(x, ord, dim, keepdim)
    zero = _split(out)[0] == 0
    if ord < 1 or not zero.any():
        return out
    xt = _split(x)[1]
    with torch.enable_grad():
        t = (torch.zeros_like(x) if xt is None else xt).detach().requires_grad_(True)
        (u,) = torch.autograd.grad(torch.linalg.vector_norm(t, ord, dims, True).sum(), t)
    run.kinks.append(Kink("aten.linalg_vector_norm", _user_line(), "select",
                          torch.ones(int(zero.sum()), 1, dtype=torch.bool), continuum=True))
    return torch.where(zero, (u.nan_to_num() * x).sum(dim=dims, keepdim=keepdim), out)


@kink_rule(aten.norm, torch.norm, Tensor.norm, torch.linalg.norm)
def norm(run, func, x, p=None, dim=None, keepdim=False, *args, **kwargs):
    """torch.norm / Tensor.norm / linalg.norm: vector p-norms and the Frobenius norm (the 2-norm of the entries
    over ``dim``, all by default) go to the vector_norm rule. Matrix norms (linalg.norm with a numeric or 'nuc'
    ord over two dims: singular values, maximal column sums) have no rule: an error."""
    p = kwargs.pop("ord", p)
    if p in (None, "fro"):
        return vector_norm(run, func, x, 2, dim, keepdim)
    vector = isinstance(dim, int) or x.dim() <= 1 or (dim is None and func is not torch.linalg.norm) or (
        func is not torch.linalg.norm and isinstance(p, (int, float)))
    if not vector or not isinstance(p, (int, float)):
        raise NonsmoothError(f"{getattr(func, '__name__', func)}(ord={p!r}) at {_user_line()} is a matrix norm, "
                             "for which gradwise has no kink rule (its derivative where singular values or column "
                             "sums tie would be PyTorch's convention); the Frobenius norm and vector norms have one")
    return vector_norm(run, func, x, p, dim, keepdim)


@kink_rule(aten.linalg_matrix_norm, torch.linalg.matrix_norm)
def matrix_norm(run, func, x, ord="fro", dim=(-2, -1), keepdim=False, *, dtype=None):
    """The Frobenius norm through the vector_norm rule; other matrix norms: the error of `norm`."""
    return norm(run, torch.linalg.norm, x, ord, dim, keepdim)


# --- smooth ops whose PyTorch forward-AD formula is slow ------------------------------------------------------
# Not kinks: the tangent of a bilinear op is op(x', W) + op(x, W') + b', computed here with the op's own kernel.
# PyTorch 2.13's convolution JVP costs about 4x the convolution (2x is the minimum), and the ranked pass of
# `generalized_grad` runs convolutions with tangents up to the last tie.

JVP_RULES: dict[object, Callable] = {}
_JVP_ROUTES: dict[Callable, Callable] = {}

jvp_rule = _registrar(JVP_RULES, _JVP_ROUTES)  # a forward-mode rule for a smooth aten op, used with tangents


def _bilinear_jvp(func, x, weight, bias, rest, kwargs, channel_dim: int):
    (xp, xt), (wp, wt) = _split(x), _split(weight)
    bp, bt = _split(bias) if isinstance(bias, Tensor) else (bias, None)
    out = func(xp, wp, bp, *rest, **kwargs)
    with torch.no_grad():  # tangents need no graph of their own
        xp, wp = xp.detach(), wp.detach()
        tangent = func(xp, wt, bt, *rest, **kwargs) if wt is not None else None  # W' and b' in one call
        if xt is not None:
            tangent = func(xt, wp, None, *rest, **kwargs) if tangent is None else tangent.add_(
                func(xt, wp, None, *rest, **kwargs))
        if bt is not None and wt is None:
            b = bt.reshape(-1, *[1] * (out.dim() - channel_dim - 1))
            tangent = b.expand_as(out).clone() if tangent is None else tangent.add_(b)
    return out if tangent is None else fwAD.make_dual(out, tangent)


@jvp_rule(aten.convolution, F.conv1d, F.conv2d, F.conv3d)
def convolution(func, input, weight, bias=None, *rest, **kwargs):
    """conv(x, W, b)' = conv(x', W) + conv(x, W') + b' (two convolutions, the least forward mode can do)."""
    return _bilinear_jvp(func, input, weight, bias, rest, kwargs, input.dim() - weight.dim() + 1)


@jvp_rule(aten.linear, F.linear)
def linear(func, input, weight, bias=None):
    """linear(x, W, b)' = linear(x', W) + linear(x, W') + b'."""
    return _bilinear_jvp(func, input, weight, bias, (), {}, input.dim() - 1)


def _coincident_norms(run, op: str, out: Tensor, diffs: Callable, p: float, same: Tensor) -> Tensor:
    """``out`` with the entries at coincident points (``same``) recomputed by the norm rule on their differences."""
    if not mask_any(same):
        return out
    where = same.nonzero(as_tuple=True)
    values = vector_norm(run, torch.linalg.vector_norm, diffs(where), p, -1)
    return out.index_put(where, values)


@kink_rule(aten.cdist, torch.cdist)
def cdist(run, func, x1, x2, p=2.0, compute_mode="use_mm_for_euclid_dist_if_necessary"):
    """p-norm distance of every row pair: the vector_norm rule on x1_i - x2_j. At coincident points (found exactly:
    ``cdist(p=0)``) f'(x; d) = ||d1_i - d2_j||_p, locked to a linear piece (a unit dual vector); p = 1 and inf
    also have kinks where coordinates tie (the abs / amax rules); 0 < p < 1 is singular at coincident points and
    p = 0 (a count) jumps where coordinates are equal: errors."""
    if p == 0:  # counts differing coordinates: constant, but it jumps where some coordinate of a pair is equal
        a, b = _split(x1)[0].detach(), _split(x2)[0].detach()
        if mask_any(a.unsqueeze(-2) - b.unsqueeze(-3) == 0):
            raise NonsmoothError(f"aten.cdist at {_user_line()} with p=0 counts differing coordinates: where two "
                                 "are equal it jumps, no one-sided derivative")
        return func(a, b, p, compute_mode)
    if _is_dual(x1) or _is_dual(x2) or not 1 < p < math.inf:
        # PyTorch has no forward-mode cdist; p = 1 / inf have kinks at equal coordinates, not only at coincident
        # points: every pair through the norm rule
        return vector_norm(run, torch.linalg.vector_norm, x1.unsqueeze(-2) - x2.unsqueeze(-3), p, -1)
    out = func(x1, x2, p, compute_mode)
    with torch.no_grad():
        same = torch.cdist(_split(x1)[0].detach(), _split(x2)[0].detach(), 0.0) == 0
    if not mask_any(same):
        return out
    shape = torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2])
    a = x1.expand(*shape, *x1.shape[-2:]).reshape(-1, *x1.shape[-2:])
    b = x2.expand(*shape, *x2.shape[-2:]).reshape(-1, *x2.shape[-2:])
    flat = _coincident_norms(run, "aten.cdist", out.reshape(-1, *out.shape[-2:]),
                             lambda w: a[w[0], w[1]] - b[w[0], w[2]], p, same.reshape(-1, *same.shape[-2:]))
    return flat.reshape(out.shape)


@kink_rule(aten._pdist_forward, F.pdist, torch.pdist)
def pdist(run, func, x, p=2.0):
    """p-norm distance of every row pair i < j, the cdist rule at coincident rows."""
    i, j = torch.triu_indices(x.shape[0], x.shape[0], 1, device=x.device)
    if p == 0:  # counts differing coordinates: it jumps where some coordinate of a pair is equal
        xp = _split(x)[0].detach()
        if mask_any(xp[i] - xp[j] == 0):
            raise NonsmoothError(f"aten.pdist at {_user_line()} with p=0 counts differing coordinates: where two are "
                                 "equal it jumps, no one-sided derivative")
        return func(xp, p)
    if _is_dual(x) or not 1 < p < math.inf:  # as cdist
        return vector_norm(run, torch.linalg.vector_norm, x[i] - x[j], p, -1)
    out = func(x, p)
    with torch.no_grad():
        same = F.pdist(_split(x)[0].detach(), 0.0) == 0
    return _coincident_norms(run, "aten.pdist", out, lambda w: x[i[w[0]]] - x[j[w[0]]], p, same)


@kink_rule(aten.argmax, torch.argmax, Tensor.argmax)
def argmax(run, func, x, dim=None, keepdim=False):
    """The index the max rule locks: among tied largest elements, the one largest along the direction."""
    return _reduce_select(run, "aten.argmax", x, None if dim is None else (dim,), keepdim and dim is not None,
                          True)[1]


@kink_rule(aten.argmin, torch.argmin, Tensor.argmin)
def argmin(run, func, x, dim=None, keepdim=False):
    """The index the min rule locks: among tied smallest elements, the one smallest along the direction."""
    return _reduce_select(run, "aten.argmin", x, None if dim is None else (dim,), keepdim and dim is not None,
                          False)[1]


@kink_rule(aten.argsort, torch.argsort, Tensor.argsort)
def argsort(run, func, x, dim=-1, descending=False, stable=False):
    """The permutation of the sort rule: tied values ordered by their tangents (then further directions)."""
    return sort(run, torch.sort, x, dim, descending).indices


@kink_rule(aten.aminmax, torch.aminmax, Tensor.aminmax)
def aminmax(run, func, x, *, dim=None, keepdim=False):
    """(min, max) by the amin and amax rules."""
    dims = () if dim is None else (dim,)
    lo = _reduce_select(run, "aten.aminmax", x, dims, keepdim, False)[0]
    hi = _reduce_select(run, "aten.aminmax", x, dims, keepdim, True)[0]
    return torch.return_types.aminmax((lo, hi))


def _norm_where_zero(run, out: Tensor, x: Tensor, p, dim, keepdim: bool, scale: float = 1.0) -> Tensor:
    """PyTorch's ``out`` where no norm is 0; else the vector_norm rule on ``x`` (divided by ``scale``)."""
    if not mask_any(_split(out)[0] == 0):
        return out
    return vector_norm(run, torch.linalg.vector_norm, x, p, dim, keepdim) / scale


@kink_rule(aten.dist, torch.dist, Tensor.dist)
def dist(run, func, a, b, p=2):
    """||a - b||_p: the vector_norm rule where a == b (f'(x; d) = ||a' - b'||_p); p = 1 and inf have kinks at
    single equal coordinates too (abs, amax): always the vector_norm rule."""
    if not 1 < float(p) < math.inf:
        return vector_norm(run, torch.linalg.vector_norm, a - b, p)
    return _norm_where_zero(run, func(a, b, p), a - b, p, None, False)


@kink_rule(aten.pairwise_distance, F.pairwise_distance, torch.pairwise_distance)
def pairwise_distance(run, func, x1, x2, p=2.0, eps=1e-6, keepdim=False):
    """||x1 - x2 + eps||_p over the last dim (PyTorch's definition): the vector_norm rule where it is 0, and
    always for p = 1 and inf (kinks at single coordinates)."""
    if not 1 < float(p) < math.inf:
        return vector_norm(run, torch.linalg.vector_norm, x1 - x2 + eps, p, -1, keepdim)
    return _norm_where_zero(run, func(x1, x2, p, eps, keepdim), x1 - x2 + eps, p, -1, keepdim)


@kink_rule(aten.msort, torch.msort, Tensor.msort)
def msort(run, func, x):
    """sort along dim 0: the sort rule."""
    return sort(run, torch.sort, x, 0).values


@kink_rule(aten.hypot, torch.hypot, Tensor.hypot)
def hypot(run, func, a, b):
    """sqrt(a^2 + b^2) elementwise: the 2-norm of the pair, by the vector_norm rule where both are 0."""
    return _norm_where_zero(run, func(a, b), torch.stack(torch.broadcast_tensors(a, b), -1), 2, -1, False)


@kink_rule(aten.std, torch.std, Tensor.std)
def std(run, func, x, dim=None, unbiased=None, keepdim=False, *, correction=None):
    """sqrt(sum((x - mean)^2) / (N - correction)): a norm of the centred x, singular where x is constant along
    ``dim``; there the vector_norm rule gives f'(x; d) = std(d)."""
    if isinstance(dim, bool):  # std(x, unbiased)
        dim, unbiased = None, dim
    out = func(x, dim, correction=correction, keepdim=keepdim) if unbiased is None else \
        func(x, dim, unbiased, keepdim)
    dims = tuple(range(x.dim())) if dim is None else ((dim,) if isinstance(dim, int) else tuple(dim))
    c = correction if correction is not None else (0 if unbiased is False else 1)
    n = math.prod(x.shape[d] for d in dims)
    if n - c <= 0:
        return out
    return _norm_where_zero(run, out, x - x.mean(dims, keepdim=True), 2, dims, keepdim, math.sqrt(n - c))


@kink_rule(aten.std_mean, torch.std_mean)
def std_mean(run, func, x, dim=None, unbiased=None, keepdim=False, *, correction=None):
    """(std, mean): the std rule and PyTorch's mean."""
    if isinstance(dim, bool):
        dim, unbiased = None, dim
    return std(run, torch.std, x, dim, unbiased, keepdim, correction=correction), x.mean(dim, keepdim=keepdim)


def _modulo(name: str, quotient: str):
    def rule(run, func, x, m):
        """x - m * q(x / m): continuous between multiples of m; at a multiple the quotient's rule takes its limit
        along the direction, so a jump of f is an error and a continuous sum (floor(x) + x % 1) is exact."""
        q = torch.floor if quotient == "floor" else torch.trunc
        xp, mp = _split(x)[0], _split(m)[0] if isinstance(m, Tensor) else m
        if not torch.is_floating_point(xp) or not mask_any(torch.as_tensor((xp / mp) == q(xp / mp))):
            return func(x, m)
        return x - m * KINK_RULES[getattr(aten, quotient)](run, q, x / m)

    rule.__name__ = name
    return rule


kink_rule(aten.remainder, torch.remainder, Tensor.remainder, Tensor.__mod__)(_modulo("remainder", "floor"))
kink_rule(aten.fmod, torch.fmod, Tensor.fmod)(_modulo("fmod", "trunc"))


_SELU_ALPHA, _SELU_SCALE = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946


def _elu(run, func, x, alpha: float, scale: float, native: Callable, inplace: bool):
    if alpha == 1.0:  # C1: both pieces have slope `scale` at 0
        return native()
    out = _switch(run, "aten.elu", x, scale * x, (scale * alpha) * torch.expm1(x), native)
    return _finish(func, x, out, inplace)


@kink_rule(aten.elu, F.elu, F.elu_)
def elu(run, func, x, alpha=1.0, inplace=False):
    """x for x > 0, alpha (e^x - 1) for x < 0: slopes 1 and alpha at 0, a kink unless alpha = 1."""
    inplace = inplace or func is F.elu_
    return _elu(run, func, x, alpha, 1.0, lambda: func(x, alpha, inplace) if func is F.elu else func(x, alpha),
                inplace)


@kink_rule(aten.selu, F.selu, F.selu_, torch.selu, torch.selu_)
def selu(run, func, x, inplace=False):
    """scale * elu(x, alpha) with SELU's constants: slopes scale and scale * alpha at 0."""
    inplace = inplace or func in (F.selu_, torch.selu_)
    return _elu(run, func, x, _SELU_ALPHA, _SELU_SCALE, lambda: func(x, inplace) if func is F.selu else func(x),
                inplace)


@kink_rule(aten.rrelu, F.rrelu, F.rrelu_, torch.rrelu)
def rrelu(run, func, x, lower=1.0 / 8, upper=1.0 / 3, training=False, inplace=False):
    """In eval mode leaky_relu with slope (lower + upper) / 2. In training the slopes are random: no rule."""
    if training:
        if mask_any(_split(x)[0] == 0):
            raise NonsmoothError(f"aten.rrelu at {_user_line()} in training mode draws a random slope for x < 0: "
                                 "at x = 0 it has no rule; use eval mode (its mean slope) or leaky_relu")
        return func(x, lower, upper, training, inplace)
    out = leaky_relu(run, F.leaky_relu, x, (lower + upper) / 2, False)
    return _finish(func, x, out, inplace or func is F.rrelu_)


@kink_rule(aten.smooth_l1_loss, F.smooth_l1_loss)
def smooth_l1_loss(run, func, input, target, size_average=None, reduce=None, reduction="mean", beta=1.0):
    """Quadratic within beta of the target, so C1 for beta > 0; with beta = 0 it is l1_loss, with its rule."""
    if beta == 0:
        return l1_loss(run, F.l1_loss, input, target, size_average, reduce, reduction)
    return func(input, target, size_average, reduce, reduction, beta)


# aten overloads called directly (graphs from torch.export, torch.fx, torch.ops.aten.*): the rules whose signature
# is the aten schema's. Other aten kink ops go through the watch (an error at their kink).
_ATEN_ROUTES: dict[object, Callable] = {
    **{op: KINK_RULES[op] for op in (aten.relu, aten.abs, aten.maximum, aten.minimum, aten.clamp, aten.clamp_min,
                                     aten.clamp_max, aten.hardtanh, aten.leaky_relu, aten.threshold, aten.sort,
                                     aten.topk, aten.amax, aten.amin, aten.max, aten.min, aten.kthvalue, aten.median,
                                     aten.cummax, aten.cummin, aten.argmax, aten.argmin, aten.l1_loss)},
    aten.max_pool1d: KINK_RULES[aten.max_pool1d],
    aten.max_pool2d: KINK_RULES[aten.max_pool2d_with_indices],
    aten.max_pool3d: KINK_RULES[aten.max_pool3d_with_indices],
}


def _aten_rule(func) -> Callable | None:
    """The rule for a directly called aten overload (or packet), if its schema matches the rule's signature."""
    packet = func.overloadpacket if isinstance(func, torch._ops.OpOverload) else func
    if func is aten.max_pool2d_with_indices.default or func is aten.max_pool3d_with_indices.default:
        return lambda run, f, x, *a, **k: KINK_RULES[packet](run, f, x, *a, return_indices=True, **k)
    return _ATEN_ROUTES.get(packet)


# Kinky ops without a rule: a clear error when f reaches one with a direction, never a silent convention.
for _fn, _op in [(F.fractional_max_pool2d, "aten.fractional_max_pool2d"),
                 (F.fractional_max_pool3d, "aten.fractional_max_pool3d"),
                 (F.multilabel_margin_loss, "aten.multilabel_margin_loss")]:
    UNRULED[_fn] = _op


# ------------------------------------------------------------------------------------------------ the watch
# A callable without a route (torch.quantile, torch.linalg.eigvalsh, F.lp_pool1d, torch.ops.aten.relu ...) runs as
# PyTorch runs it, so a kink inside it would get PyTorch's convention. In the pass that finds the kinks, such a
# call runs once under `_KinkWatch`, which sees the aten ops it reaches and tests each kink op whose input depends
# on f's inputs (requires grad) for sitting at its kink: there gradwise raises instead of answering. A callable
# that reaches no kink op at all is remembered as smooth and runs unwatched from then on.


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
    **dict.fromkeys([aten.floor, aten.ceil, aten.round, aten.trunc, aten.frac], _integral),
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
# Callables seen to reach no kink op: they run unwatched.
_SMOOTH_CALLS: set[object] = set()


_NO_TORCH_FUNCTION = dict.fromkeys(("has_torch_function", "has_torch_function_unary",
                                     "has_torch_function_variadic"), lambda *args, **kwargs: False)


@functools.cache
def _unguarded(func: types.FunctionType) -> types.FunctionType:
    """A copy of a Python function of torch.nn.functional whose ``has_torch_function`` guard is off. The mode
    sees such a composite (F.lp_pool1d, F.triplet_margin_with_distance_loss ...) as one call, and PyTorch runs its
    body with the mode suspended; running this copy under the mode instead sends the ops inside to their rules."""
    copy = types.FunctionType(func.__code__, {**func.__globals__, **_NO_TORCH_FUNCTION}, func.__name__,
                              func.__defaults__, func.__closure__)
    copy.__kwdefaults__ = func.__kwdefaults__
    return copy


def _composite(func) -> bool:
    return isinstance(func, types.FunctionType) and func.__module__ == "torch.nn.functional"


class _KinkWatch(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.kinky, self.hit = False, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        test = _KINKY_BY_NAME.get(name[:-1] if name.endswith("_") else name)
        if test is None:
            return func(*args, **kwargs)
        self.kinky = True
        if self.hit is not None or not any(isinstance(a, Tensor) and a.requires_grad for a in args):
            return func(*args, **kwargs)
        if name.endswith("_"):  # in place: test the arguments before the op overwrites them
            before = tuple(a.clone() if isinstance(a, Tensor) else a for a in args)
            out = func(*args, **kwargs)
            args = before
        else:
            out = func(*args, **kwargs)
        if test(args, kwargs, out):
            self.hit = str(func.overloadpacket)
        return out


def _kink_free_call(func, args: tuple, kwargs: dict) -> tuple | None:
    """(``func(*args, **kwargs)``,) if the call reaches no aten op that has kinks, else None."""
    if func in _SMOOTH_CALLS:
        return (func(*args, **kwargs),)
    watch = _KinkWatch()
    watch.hit = ""  # only record whether a kink op is reached
    with watch:
        out = func(*args, **kwargs)
    return None if watch.kinky else (out,)


def _no_forward_ad_is_an_error(func, args: tuple, kwargs: dict):
    """``func(*args, **kwargs)``; PyTorch's "forward AD not implemented" becomes a NonsmoothError naming the call."""
    try:
        return func(*args, **kwargs)
    except NotImplementedError as e:
        if "forward AD" not in str(e) and "forward mode AD" not in str(e):
            raise
        raise NonsmoothError(f"{_callable_name(func)} (called at {_user_line()}) has no forward-mode derivative in "
                             "PyTorch, which gradwise needs to follow a direction through it. PyTorch said: "
                             f"{str(e).splitlines()[0]}") from None


def _callable_name(func) -> str:
    if isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(func)
    return f"{'Tensor.' if isinstance(func, type(Tensor.add)) else ''}{getattr(func, '__name__', func)}"


def _watched(func, args: tuple, kwargs: dict, involved: Callable):
    """``func(*args, **kwargs)``, raising NonsmoothError where an aten op inside it sits at a kink. With tangents
    the call is replayed on copies of the primals that require grad where the arguments depend on f's inputs (no
    forward-mode formulas, whose guards would look like kinks)."""
    watch = _KinkWatch()
    if not any(map(_is_dual, (*args, *kwargs.values()))):
        with watch:
            out = func(*args, **kwargs)
    else:
        def copy(a):  # a non-leaf copy where it depends on the inputs: in-place calls work on it as on a
            if not _float(a):
                return a
            p = _split(a)[0].detach()
            return p.requires_grad_(True).clone() if involved(a) else p.clone()

        with torch.enable_grad():  # before the call, which may write into args
            replay = tree_map(copy, args), tree_map(copy, kwargs)
        out = _no_forward_ad_is_an_error(func, args, kwargs)
        with torch.enable_grad(), watch:
            func(*replay[0], **replay[1])
    if watch.hit is not None:
        raise NonsmoothError(f"{_callable_name(func)} (called at {_user_line()}) reaches {watch.hit} at its kink, "
                             "and gradwise has no kink rule for it: its derivative there would be PyTorch's "
                             "convention. Write it with ops that have rules (abs, clamp, maximum, max, sort, max_pool, "
                             "linalg.vector_norm ...); docs/nonsmooth.md lists them")
    if not watch.kinky:
        _SMOOTH_CALLS.add(func)
    return out


# ------------------------------------------------------------------------------------------------ the mode


def _is_dual(a) -> bool:
    return isinstance(a, Tensor) and fwAD.unpack_dual(a).tangent is not None


def _needs_grad(a) -> bool:
    return isinstance(a, Tensor) and a.requires_grad and torch.is_grad_enabled()


# Ops that only move elements: a relu-dead mark (`_Run.mark_flat`) follows them to their output.
_RESHAPES = {Tensor.reshape, Tensor.view, torch.reshape, Tensor.flatten, torch.flatten, Tensor.unsqueeze,
             torch.unsqueeze, Tensor.squeeze, torch.squeeze, Tensor.permute, torch.permute, Tensor.transpose,
             torch.transpose, Tensor.contiguous, Tensor.view_as, Tensor.reshape_as, Tensor.unflatten, Tensor.movedim,
             torch.movedim, Tensor.flip, torch.flip, Tensor.roll, torch.roll, Tensor.fliplr, Tensor.flipud}


def _keep_flat(run: _Run, func, args, kwargs, out) -> None:
    src = run.flat_source(args[0])
    if src is None or not isinstance(out, Tensor) or out.dtype != args[0].dtype:
        return
    c, live = src
    if live is not None:
        live = func(live, *args[1:], **kwargs)
    run.mark_flat(out, c, live)


class _Stop(Exception):
    """Raised by the mode once the pass has gone past the last kink it needs."""


class _Diverged(Exception):
    """Raised by the mode when a pass leaves the path of the pass it must follow (f branches on grad mode)."""


def _flat_tensors(values) -> list[Tensor]:
    out = []
    for v in values:
        if isinstance(v, Tensor):
            out.append(v)
        elif type(v) in (list, tuple):
            out.extend(_flat_tensors(v))
    return out


class _KinkMode(TorchFunctionMode):
    """Routes kink ops that depend on the inputs to their rules; swaps closure-captured inputs for ours.

    ``involved`` says whether an argument depends on the inputs (it has a tangent, or in the tangent-free
    detection pass, requires grad). After ``strip_after`` calls, tangents are dropped: no kink lies beyond.
    ``used`` collects the positions of the inputs that calls have used so far, ``last_tie`` the call count at
    the last kink that had ties (detection pass).
    """

    def __init__(self, run: _Run, subs: dict[int, Tensor], positions: dict[int, int], involved: Callable,
                 strip_after: int | None = None, stop_after: int | None = None, dual: bool = True):
        super().__init__()
        self.dual = dual  # some input carries a tangent
        self.run, self.subs, self.positions, self.involved = run, subs, positions, involved
        self.strip_after, self.stop_after = strip_after, stop_after
        self.count, self.used, self.last_tie, self.used_at_tie = 0, set(), -1, set()
        # trail: the callables of this pass in order; expect: an earlier pass's trail that this one must follow
        # (the ranked pass locks the probe's kinks by call count: a pass taking another path diverges)
        self.depth, self.trail, self.expect, self.watch = 0, [], None, None

    def _sub(self, a):
        if isinstance(a, Tensor):
            if id(a) in self.positions:
                self.used.add(self.positions[id(a)])
            a = self.subs.get(id(a), a)
            if self.strip_after is not None and self.count > self.strip_after and _is_dual(a):
                a = fwAD.unpack_dual(a).primal
            return a
        if type(a) in (list, tuple):
            return type(a)(self._sub(v) for v in a)
        return a

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.count += 1
        if self.stop_after is not None and self.count > self.stop_after:
            raise _Stop
        if self.expect is not None and (self.count > len(self.expect) or self.expect[self.count - 1] is not func):
            raise _Diverged
        self.trail.append(func)
        args = tuple(self._sub(a) for a in args)
        if kwargs:
            kwargs = {k: self._sub(v) for k, v in kwargs.items()}
        self.depth += 1
        # inside a call the mode sees, the dispatch-level watch for unseen ops is off (it costs per aten op)
        watch = self.watch if self.depth == 1 and _current_dispatch_mode() is self.watch else None
        if watch is not None:
            _pop_dispatch_mode()
        try:
            return self._dispatch(func, args, kwargs)
        finally:
            self.depth -= 1
            if watch is not None:
                _push_dispatch_mode(watch)

    def _dispatch(self, func, args, kwargs):
        everything = (*args, *kwargs.values())
        if _ctx.transforms_active() and any(map(self.involved, map(_ctx.unwrapped, _flat_tensors(everything)))):
            out = None if func in _ROUTES or func in UNRULED else _kink_free_call(func, args, kwargs)
            if out is None:
                raise NonsmoothError(f"{_callable_name(func)} (called at {_user_line()}) runs inside a torch.func "
                                     "transform (grad, vmap, jacrev ...) within f: gradwise cannot follow tangents "
                                     "or lock kinks through its wrapped tensors. Call the function without the "
                                     "transform")
            return out[0]
        if func in _ctx.REVERSE_CALLS and self.run.kinks:
            raise NonsmoothError(f"f runs a reverse pass ({_callable_name(func)} at {_user_line()}; "
                                 "torch.autograd.functional.jacobian/hessian do too) after hitting a kink "
                                 f"({self.run.kinks[0].describe()}): that derivative is PyTorch's convention at "
                                 "the kink, so f's value is. Differentiate with gradwise instead (gw.generalized_grad "
                                 "inside f, or gw.directional_derivative)")
        if _ctx.is_custom_op(func) and any(map(self.involved, everything)):
            out = func(*args, **kwargs)
            _ctx.check_custom_op(func, _callable_name(func), _user_line(), args, kwargs, out, self.dual)
            return out
        rule = _ROUTES.get(func)
        if rule is None and isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            rule = _aten_rule(func)
        if rule is None and func not in UNRULED:
            jvp = _JVP_ROUTES.get(func) if self.dual else None
            if jvp is not None and any(map(_is_dual, (*args, *kwargs.values()))):
                return jvp(func, *args, **kwargs)
            if _composite(func) and any(map(self.involved, (*args, *kwargs.values()))):
                with self:
                    return _unguarded(func)(*args, **kwargs)
            if self.run.known is None and func not in _SMOOTH_CALLS and any(
                    map(self.involved, (*args, *kwargs.values()))):
                out = _watched(func, args, kwargs, self.involved)
            else:
                out = _no_forward_ad_is_an_error(func, args, kwargs)
            if self.run.flat and func in _RESHAPES and args and isinstance(args[0], Tensor):
                _keep_flat(self.run, func, args, kwargs, out)
            return out
        if not any(map(self.involved, (*args, *kwargs.values()))):
            return func(*args, **kwargs)
        if self.run.known is not None and self.count not in self.run.known:
            return func(*args, **kwargs)  # ranked pass: the probe saw no tie here, PyTorch's own JVP is exact
        if rule is None:
            raise NonsmoothError(f"gradwise has no kink rule for {UNRULED[func]} (called at {_user_line()}); "
                                 "its derivative at ties/zeros would be PyTorch's convention. Rewrite it with "
                                 "ops that have rules (abs, clamp, maximum, max, sort, max_pool ...).")
        before, self.run.call = len(self.run.kinks), self.count
        out = rule(self.run, func, *args, **kwargs)
        if len(self.run.kinks) > before:
            self.last_tie, self.used_at_tie = self.count, set(self.used)
            if any(map(_is_dual, (*args, *kwargs.values()))):
                for k in self.run.kinks[before:]:
                    k.tangent = True
        return out


# ------------------------------------------------------------------------------------------------ driver


def _as_inputs(inputs, what: str = "inputs") -> tuple[tuple[Tensor, ...], bool]:
    single = isinstance(inputs, Tensor)
    xs = (inputs,) if single else inputs
    if not isinstance(xs, (tuple, list)) or not xs:
        raise TypeError(f"{what} must be a tensor or a tuple of tensors, got {type(inputs).__name__}")
    for i, x in enumerate(xs):
        if not isinstance(x, Tensor):
            raise TypeError(f"{what}[{i}] is a {type(x).__name__}, not a torch.Tensor; pass tensors "
                            "(e.g. torch.tensor(...))")
        if not (x.is_floating_point() or x.is_complex()):
            raise TypeError(f"{what}[{i}] has dtype {x.dtype}; derivatives need a real floating dtype: "
                            f"convert it with .double() or .float()")
    _ctx.check_input_values(xs, what)
    return tuple(xs), single


def _call(f, duals: tuple[Tensor, ...], single: bool):
    return f(duals[0]) if single else f(*duals)


def _outputs(out) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (tuple, list)) and all(isinstance(o, Tensor) for o in out):
        return list(out)
    raise TypeError(f"f must return a tensor or a tuple of tensors, got {type(out).__name__}")


def _run(f, xs, single, directions, run: _Run, requires_grad: bool, strip_after: int | None = None,
         stop_after: int | None = None, detect: bool = False, expect: list | None = None):
    """One pass of f at xs with tangents ``directions`` (None: a tangent-free detection pass, or no tangent
    for that input). ``detect``: rules also see arguments that only require grad (tangents stripped after
    ``strip_after``). ``expect``: the trail of calls this pass must follow (else `_Diverged`). Returns (output,
    [(primal, tangent)] per output, leaves, mode)."""
    leaves = tuple(x.detach().requires_grad_(requires_grad) for x in xs)
    dual = directions is not None
    with _ctx.pass_context(), fwAD.dual_level(), torch.enable_grad() if requires_grad else torch.no_grad():
        args = tuple(x if not dual or d is None else fwAD.make_dual(x, d.to(x.dtype))
                     for x, d in zip(leaves, directions or [None] * len(xs), strict=True))
        positions = {id(t): i for ts in (xs, leaves, args) for i, t in enumerate(ts)}
        subs = {id(x): a for x, a in zip(xs, args, strict=True)}
        involved = (lambda a: _needs_grad(a) or _is_dual(a)) if detect else _is_dual if dual else _needs_grad
        mode = _KinkMode(run, subs, positions, involved, strip_after, stop_after, dual)
        mode.expect = expect
        watch = mode.watch = _ctx.opaque_watch(mode, _UNSEEN_KINKY, _user_line)
        try:
            with mode, watch:
                out = _call(f, args, single)
        except _Stop:
            watch.check()
            return None, [], leaves, mode
        except NotImplementedError as e:
            watch.check()
            if "custom autograd.Function" not in str(e):
                raise
            raise NonsmoothError(f"f (called at {_user_line()}) applies a custom autograd.Function that defines no "
                                 "jvp: gradwise cannot follow a direction through it nor see a kink inside its "
                                 "forward. Define its forward-mode derivative (a jvp staticmethod), or write it with "
                                 "torch ops") from None
        except Exception as e:
            watch.check()
            if "_fw_primal" in str(e):  # forward AD's Python decompositions called from TorchScript reach the mode
                raise NonsmoothError(f"f (called at {_user_line()}) runs code that gradwise cannot follow with "
                                     "tangents (TorchScript from torch.jit.script/trace, whose forward-mode "
                                     "formulas call back into Python). Call the Python function (the module before "
                                     "scripting/tracing) instead") from None
            raise
        watch.check()
        primals = [fwAD.unpack_dual(o) for o in _outputs(out)]
    return out, primals, leaves, mode


def _extra_directions(xs, gen: torch.Generator, n: int):
    return [tuple(torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.device, x.dtype) for x in xs)
            for _ in range(n)]


MAX_EXTRA_PASSES = 3


def _lex_passes(f, xs, single, first, gen, requires_grad, run_kw=None, strip_after=None):
    """Run f along ``first``; while comparison ties stay unresolved, add random directions and rerun.

    Returns the final run (its branches ranked by all directions) and its `_run` result.
    """
    run_kw = run_kw or {}
    run = _Run(**run_kw)
    result = _run(f, xs, single, first, run, requires_grad, strip_after)
    history = run.kinks
    for extra in _extra_directions(xs, gen, MAX_EXTRA_PASSES) if _unresolved(run) else []:
        nxt = _Run(history=history, **run_kw)
        _run(f, xs, single, extra, nxt, False)
        history = nxt.kinks
        if not _unresolved(nxt):
            break
    if history is not run.kinks:  # rerun along the first direction with every ranking column known
        run = _Run(history=history, **run_kw)
        result = _run(f, xs, single, first, run, requires_grad, strip_after)
    return run, result


def _unresolved(run: _Run) -> bool:
    return any(k.unresolved and k.comparison for k in run.kinks)


def _as_direction(d, x: Tensor):
    """A nested sequence of numbers shaped like x becomes a tensor of x's dtype; anything else is left as is."""
    if isinstance(d, Tensor) or not isinstance(d, (tuple, list, int, float)):
        return d
    try:
        t = torch.as_tensor(d, dtype=x.dtype, device=x.device)
    except (TypeError, ValueError, RuntimeError):
        return d
    return t if t.shape == x.shape else d


def _check_directions(xs, directions, single):
    if single and not isinstance(directions, Tensor):
        whole = _as_direction(directions, xs[0])
        directions = whole if isinstance(whole, Tensor) else directions
    ds = (directions,) if isinstance(directions, Tensor) and single else directions
    if isinstance(ds, Tensor):
        ds = (ds,)
    if not isinstance(ds, (tuple, list)) or len(ds) != len(xs):
        raise TypeError(f"directions must match inputs: {len(xs)} tensor(s) shaped like the inputs")
    ds = tuple(_as_direction(d, x) for d, x in zip(ds, xs, strict=True))
    for i, (x, d) in enumerate(zip(xs, ds, strict=True)):
        if not isinstance(d, Tensor) or d.shape != x.shape:
            raise TypeError(f"directions[{i}] must be a tensor of shape {tuple(x.shape)}, got "
                            f"{getattr(d, 'shape', type(d).__name__)}")
        if not d.is_floating_point():
            raise TypeError(f"directions[{i}] has dtype {d.dtype}; use a floating dtype")
    _ctx.check_input_values(ds, "directions")
    return tuple(ds)


def directional_derivative(f: Callable, inputs: Tensor | tuple[Tensor, ...],
                           directions: Tensor | tuple[Tensor, ...]) -> Tensor | tuple[Tensor, ...]:
    """The exact one-sided directional derivative f'(x; d) = lim_{t->0+} (f(x + t d) - f(x)) / t.

    ``f`` is called as ``f(*inputs)`` (or ``f(inputs)`` for one tensor); ``directions`` is shaped like
    ``inputs``; the result is shaped like f's output. Kink ops use their one-sided rules (see
    ``docs/nonsmooth.md``); where tangents tie too, further directions decide (lexicographic derivatives).

    >>> import torch, gradwise as gw
    >>> x = torch.tensor(0.0)
    >>> gw.directional_derivative(lambda x: torch.relu(x) - torch.relu(-x), x, torch.tensor(-2.0))
    tensor(-2.)
    >>> gw.directional_derivative(torch.abs, x, torch.tensor(-1.0))
    tensor(1.)
    """
    xs, single = _as_inputs(inputs)
    ds = _check_directions(xs, directions, single)
    gen = torch.Generator().manual_seed(0)
    run, (out, primals, _, _) = _lex_passes(f, xs, single, ds, gen, False)
    _check_no_jump(f, xs, single, run, [p for p, _ in primals], exact=True)
    tangents = [torch.zeros_like(p) if t is None else t for p, t in primals]
    return tangents[0] if isinstance(out, Tensor) else tuple(tangents)


def _check_no_jump(f, xs, single, run: _Run, values: list[Tensor], exact: bool = False) -> None:
    """Comparisons and piecewise-constant ops at a jump take the branch (limit) of the direction: if f's value
    then differs from f(x), f jumps at x along it and has no one-sided derivative (nor a Clarke gradient)."""
    jumps = [k for k in run.kinks if k.comparison]
    if not jumps:
        return
    with torch.no_grad():
        plain = _outputs(_call(f, tuple(x.detach() for x in xs), single))
    for p, q in zip(values, plain, strict=True):
        p, q = p.detach().nan_to_num(), q.nan_to_num()
        tol = 0.0 if exact else 100 * torch.finfo(q.dtype).eps if q.is_floating_point() else 0.0
        if not torch.allclose(p, q, rtol=tol, atol=tol):
            raise NonsmoothError(f"f jumps at x along this direction ({jumps[0].op} at {jumps[0].location} takes "
                                 "another branch and f's value changes): there is no one-sided derivative, and no "
                                 "Clarke generalized gradient")


def _random_direction(xs, seed: int | None, only: set[int] | None = None):
    """A Gaussian direction (None for inputs outside ``only``) and the generator, for further directions.
    Every input's part is drawn, so ``only`` does not change the others'."""
    gen = torch.Generator()
    gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ())))
    dtype = lambda x: x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    d = tuple(torch.randn(x.shape, generator=gen, dtype=dtype(x)).to(x.device) for x in xs)
    return tuple(v if only is None or i in only else None for i, v in enumerate(d)), gen


def _scalar(primal: Tensor) -> Tensor:
    if primal.numel() != 1:
        raise ValueError(f"f must return a scalar for a generalized gradient, got shape {tuple(primal.shape)}; "
                         "reduce it (e.g. .sum() or .mean()) or use gw.directional_derivative")
    return primal.reshape(())


def _grads(y: Tensor, leaves, xs) -> tuple[Tensor, ...]:
    grads = torch.autograd.grad(y, leaves, allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for x, g in zip(xs, grads, strict=True))


# f's code object -> the mode call of its last tie at the previous call (-1: none, or none a saved index can lock).
# A training loop calls generalized_grad on the same code again and again: when it tied last time, the first pass
# carries tangents up to that call and ranks the ties itself, saving the second pass.
_LAST_TIE: OrderedDict[object, int] = OrderedDict()
_LAST_TIE_SIZE = 256


def _locked_grad(f, xs, single, seed, run_kw=None):
    """A generalized gradient. A tangent-free pass finds the kinks, building the graph with provisional
    branches; without ties that graph is the answer. With ties, f runs again along a random direction, stopping
    after the last tie; the branches it ranks are written into the first pass's lock tensors (saved indices and
    masks), then one reverse pass. If f's previous call tied, the first pass carries the direction's tangents up
    to where its last tie was, ranking those ties itself. Comparisons and norms at 0 (whose branch changes more
    than a saved index) take a full pass along the direction instead. The direction is drawn from ``seed`` over
    every input, so the result does not depend on which pass ranks.
    """
    run_kw = run_kw or {}
    memo = getattr(f, "__code__", None)
    carry = _LAST_TIE.get(memo, -1) if memo is not None else -1
    d, gen = _random_direction(xs, seed) if carry >= 0 else (None, None)  # drawn only when needed
    probe = _Run(**run_kw)
    _, primals, leaves, mode = _run(f, xs, single, d, probe, True, strip_after=carry if d else None, detect=True)
    y = _scalar(primals[0][0])
    lockable = all(k.write is not None for k in probe.kinks)
    if memo is not None:
        _LAST_TIE[memo] = mode.last_tie if probe.kinks and lockable else -1
        _LAST_TIE.move_to_end(memo)
        if len(_LAST_TIE) > _LAST_TIE_SIZE:
            _LAST_TIE.popitem(last=False)
    if probe.kinks and d is None:
        d, gen = _random_direction(xs, seed)
    if probe.kinks and not lockable:
        return _full_pass_grad(f, xs, single, d, gen, run_kw, mode.used_at_tie, mode.last_tie)
    if not all(k.tangent for k in probe.kinks):
        ranked = _Run(**run_kw)
        ranked.known = {}
        for k in probe.kinks:
            ranked.known.setdefault(k.call[0], []).append(k)
        dr = tuple(v if i in mode.used_at_tie else None for i, v in enumerate(d))
        try:
            _run(f, xs, single, dr, ranked, False, stop_after=mode.last_tie, expect=mode.trail)
        except _Diverged:  # f took another path without gradients (hooks, checkpoints ...): one full pass
            return _full_pass_grad(f, xs, single, d, gen, run_kw, mode.used_at_tie, None)
        choices = {k.call: k for k in ranked.kinks}
        if any(k.call not in choices or choices[k.call].op != k.op or not torch.equal(choices[k.call].cand, k.cand)
               for k in probe.kinks):
            return _full_pass_grad(f, xs, single, d, gen, run_kw, mode.used_at_tie, None)
        for k in probe.kinks:
            k.write(choices[k.call].choice)
            k.choice = choices[k.call].choice
    _ctx.check_functions(y, _user_line())
    return _grads(y, leaves, xs), probe, y.detach()


def _full_pass_grad(f, xs, single, d, gen, run_kw, used: set[int], strip_after: int | None):
    """A generalized gradient from one pass along ``d`` (restricted to the ``used`` inputs) that ranks every tie as
    it goes and keeps its own graph: for kinks whose lock is more than a saved index (comparisons, norms at 0), and
    for f whose passes take different paths with and without gradients."""
    d = tuple(v if i in used else None for i, v in enumerate(d))
    probe, (_, primals, leaves, _) = _lex_passes(f, xs, single, d, gen, True, run_kw, strip_after=strip_after)
    y = _scalar(primals[0][0])
    _check_no_jump(f, xs, single, probe, [y])
    if any(k.comparison for k in probe.kinks):  # and along -d: one jumping side is enough to leave no gradient
        back = _Run(**run_kw)
        _, opposite, _, _ = _run(f, xs, single, tuple(None if v is None else -v for v in d), back, False)
        _check_no_jump(f, xs, single, back, [p for p, _ in opposite])
    _ctx.check_functions(y, _user_line())
    return _grads(y, leaves, xs), probe, y.detach()


def generalized_grad(f: Callable, inputs: Tensor | tuple[Tensor, ...], *,
                     seed: int | None = None) -> tuple[Tensor, ...]:
    """An element of the Clarke subdifferential of scalar ``f`` at ``inputs`` (a tuple, like autograd.grad).

    Every kink is locked to the branch active along a random direction (``seed`` makes it reproducible),
    then one reverse pass runs through the locked branches: the result is the gradient of a smooth piece of f
    active at x. Where no kink is hit it equals ``torch.autograd.grad``. ``inputs`` may be tensors that f
    closes over (e.g. a module's parameters): they are swapped in wherever f uses them.

    >>> import torch, gradwise as gw
    >>> x = torch.tensor(0.0, requires_grad=True)
    >>> gw.generalized_grad(lambda x: torch.relu(x) - torch.relu(-x), x)
    (tensor(1.),)
    """
    _ctx.check_int("seed", seed, low=0, high=2**63 - 1, allow_none=True)
    xs, single = _as_inputs(inputs)
    return _locked_grad(f, xs, single, seed)[0]


def generalized_backward(f: Callable, inputs, *, seed: int | None = None) -> Tensor:
    """Like ``f(...).backward()`` with generalized gradients: accumulates into each input's ``.grad``.

    ``inputs`` are the tensors to differentiate (e.g. ``list(model.parameters())``); f is called as in
    `generalized_grad` (``f(*inputs)``) and may ignore its arguments and use a module directly. Returns f's
    value.

    >>> import torch, gradwise as gw
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.ReLU())
    >>> loss = gw.generalized_backward(lambda *p: model(torch.ones(1, 2)).sum(), list(model.parameters()))
    >>> model[0].weight.grad.shape
    torch.Size([1, 2])
    """
    _ctx.check_int("seed", seed, low=0, high=2**63 - 1, allow_none=True)
    xs, single = _as_inputs(tuple(inputs) if not isinstance(inputs, Tensor) else inputs)
    grads, _, value = _locked_grad(f, xs, single, seed)
    for x, g in zip(xs, grads, strict=True):
        x.grad = g.detach().clone() if x.grad is None else x.grad + g
    return value


def kinks_hit(f: Callable, inputs, *, seed: int | None = 0, tie_tol: float = 0.0,
              near_tol: float | None = None, tangents: bool = True) -> tuple[list[Kink], list[NearKink]]:
    """The kinks f hits at ``inputs`` and the near-ties within near_tol. With ``tangents`` (one run along a
    random direction) only kinks that depend on the inputs count; without, any tie on a tensor that requires
    grad does (for f with custom autograd Functions lacking a ``jvp``)."""
    _ctx.check_int("seed", seed, low=0, high=2**63 - 1, allow_none=True)
    _ctx.check_real("tie_tol", tie_tol, low=0.0)
    _ctx.check_real("near_tol", near_tol, low=0.0, allow_none=True)
    xs, single = _as_inputs(inputs)
    run = _Run(tie_tol=tie_tol, near_tol=near_tol)
    _run(f, xs, single, _random_direction(xs, seed)[0] if tangents else None, run, not tangents)
    return run.kinks, run.near


# rules in their own modules (they register themselves into KINK_RULES on import)
from gradwise import _nonsmooth_scatter  # noqa: E402, F401
