"""Kink rules for elementwise switches (relu, abs, maximum/minimum, clamp, hardtanh, leaky_relu, shrinks ...),
the hinge-type losses, comparisons (``_CMP``), piecewise-constant ops (``_STEPS``: sign, floor, ceil, round,
trunc; frac; integer casts; heaviside) and logit with eps; rounded division and modulo: ``_rules_division``.

May import: torch, gradwise._masks, gradwise._ops, ``_errors``, ``_lazy``, ``_records``, ``_rules``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from gradwise._masks import mask_any
from gradwise._nonsmooth import _lazy
from gradwise._nonsmooth._errors import NonsmoothError
from gradwise._nonsmooth._records import _Run, _user_line
from gradwise._nonsmooth._rules import (
    _ROUTE_IF,
    _ROUTES,
    CASTS,
    _constant_where,
    _copies,
    _finish,
    _is_dual,
    _near_zero,
    _resolve_sign,
    _split,
    _stepped,
    _switch,
    kink_rule,
    promoted,
    result_type_of,
)
from gradwise._ops._cuts import same_axis

aten = torch.ops.aten
Tensor = torch.Tensor


@kink_rule(aten.relu, torch.relu, torch.relu_, F.relu, F.relu_, Tensor.relu, Tensor.relu_)
def relu(run, func, x, inplace=False):
    """max(x, 0). At 0: x where the direction has x' > 0, else 0, so f'(x; d) = max(x', 0)."""
    inplace = inplace or func in (torch.relu_, F.relu_, Tensor.relu_)
    out = _switch(run, "aten.relu", x, x, 0.0, lambda: F.relu(x, inplace=True) if inplace else _dual_relu(x),
                  flat=True, inplace=inplace)
    return _finish(func, x, out, inplace)


def _dual_relu(x):
    """relu(x); its tangent PyTorch's formula, x' where relu(x) > 0, computed here without autograd (see
    `_masked`)."""
    xp, xt = _split(x)
    if xt is None:
        return F.relu(x)
    out = F.relu(xp)
    if isinstance(xt, _lazy.LazyTangent):  # computed where a kink rule reads it
        return fwAD.make_dual(out, _lazy.relu_tangent(xt, out))
    with torch.no_grad():
        tangent = aten.threshold_backward(xt, out, 0.0)
    return fwAD.make_dual(out, tangent)


@kink_rule(aten.abs, torch.abs, torch.absolute, Tensor.abs, Tensor.absolute, Tensor.abs_, torch.abs_)
def abs(run, func, x):
    """|x|. At 0: x or -x, whichever grows along the direction: f'(x; d) = |x'|. A complex 0 is a cone
    (|z'| is not a max of two pieces): an error."""
    if x.is_complex():
        if mask_any(_split(x)[0] == 0):
            raise NonsmoothError(f"aten.abs at {_user_line()} of a complex 0: its one-sided derivative |z'| is a "
                                 "cone, not a choice of pieces; gradwise has no rule for it. Keep the argument "
                                 "away from 0 or write |z| as linalg.vector_norm of (real, imag)")
        return func(x)
    inplace = func in (Tensor.abs_, torch.abs_)
    out = _switch(run, "aten.abs", x, x, -x, lambda: func(x), inplace=inplace)
    return _finish(func, x, out, inplace)


def _as_tensor(v, like: Tensor):
    return v if isinstance(v, Tensor) or v is None else torch.as_tensor(v, dtype=like.dtype, device=like.device)


def _pair(run, op: str, a, b, larger: bool, native: Callable, ignores_nan: bool = False):
    """max (larger) or min of a and b elementwise; a wins ties unless the direction says otherwise. A NaN
    argument gives NaN, or with ``ignores_nan`` (fmax, fmin) the other argument."""
    like = a if isinstance(a, Tensor) else b
    a, b = _as_tensor(a, like), _as_tensor(b, like)
    # s says which side wins (its tangent too), computed once; its graph only where records collect its values
    # (stationarity differentiates them)
    with torch.set_grad_enabled(run.collect and torch.is_grad_enabled()):
        s = a - b if larger else b - a
    if run.near_tol is None and not _near_zero(_split(s)[0], run.tie_tol):
        return native()
    return _switch(run, op, s, _where_nan(a if ignores_nan else b, b, a), b, native,
                   skip=lambda tie: _both_dead(run, a, b, tie))


def _where_nan(x: Tensor, b: Tensor, a: Tensor) -> Tensor:
    """a, with b (value and tangent) where x is NaN: the side `_switch` takes where s = ±(a - b) is NaN. maximum,
    minimum and clamp propagate a NaN of either argument (x = b: a NaN b replaces a); fmax and fmin take the other
    argument (x = a: b replaces a NaN a, and is NaN where both are)."""
    nan = torch.isnan(_split(x)[0])
    return torch.where(nan, b, a) if mask_any(nan) else a


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
    """Elementwise max. At a tie: the argument that is larger along the direction: f' = max(a', b'). fmax: a NaN
    argument gives the other one (value and tangent), also while other elements tie."""
    return _pair(run, "aten.maximum", a, b, True, lambda: func(a, b), func in (torch.fmax, Tensor.fmax))


@kink_rule(aten.minimum, torch.minimum, Tensor.minimum, torch.fmin, Tensor.fmin)
def minimum(run, func, a, b):
    """Elementwise min. At a tie: the argument that is smaller along the direction: f' = min(a', b'). fmin: as
    fmax."""
    return _pair(run, "aten.minimum", a, b, False, lambda: func(a, b), func in (torch.fmin, Tensor.fmin))


def _clamp(run, x, lo, hi, native: Callable, inplace: bool = False):
    """min(max(x, lo), hi) with the pair rule at each bound that x touches. ``inplace``: the caller writes the
    result into x, which the pieces' graph must not have saved (a copy of x is clamped)."""
    # hi meets max(x, lo), not x (x < lo == hi ties there); for numbers farther apart than tie_tol, that is x itself
    numbers_apart = not isinstance(lo, Tensor) and not isinstance(hi, Tensor) and (
        lo is None or hi is None or hi - lo > run.tie_tol)
    lo, hi = _as_tensor(lo, x), _as_tensor(hi, x)
    xp = _split(x)[0]
    lop = _split(lo)[0] if lo is not None else None
    touches = lo is not None and bool(((xp - lop).abs() <= run.tie_tol).any())
    if hi is not None and not touches:
        mid = xp if numbers_apart or lop is None else torch.maximum(xp, lop)  # no lower bound: hi meets x
        touches = bool(((mid - _split(hi)[0]).abs() <= run.tie_tol).any())
    if not touches and run.near_tol is None:
        return native()
    out = x.clone() if inplace else x
    if lo is not None:
        out = _pair(run, "aten.clamp", out, lo, True, lambda: torch.clamp(out, min=lo))
    if hi is not None:
        out = _pair(run, "aten.clamp", out, hi, False, lambda: torch.clamp(out, max=hi))
    return out


@kink_rule(aten.clamp, torch.clamp, torch.clip, Tensor.clamp, Tensor.clip, Tensor.clamp_, Tensor.clip_,
           torch.clamp_, torch.clip_)
def clamp(run, func, x, min=None, max=None):
    """clamp(x, lo, hi). At a bound: x if it moves inside along the direction, else the bound."""
    inplace = func in (Tensor.clamp_, Tensor.clip_, torch.clamp_, torch.clip_)
    return _finish(func, x, _clamp(run, x, min, max, lambda: func(x, min, max), inplace), inplace)


@kink_rule(aten.clamp_min, torch.clamp_min, Tensor.clamp_min, Tensor.clamp_min_)
def clamp_min(run, func, x, min):
    """max(x, min): the clamp rule at the lower bound."""
    inplace = func is Tensor.clamp_min_
    return _finish(func, x, _clamp(run, x, min, None, lambda: func(x, min), inplace), inplace)


@kink_rule(aten.clamp_max, torch.clamp_max, Tensor.clamp_max, Tensor.clamp_max_)
def clamp_max(run, func, x, max):
    """min(x, max): the clamp rule at the upper bound."""
    inplace = func is Tensor.clamp_max_
    return _finish(func, x, _clamp(run, x, None, max, lambda: func(x, max), inplace), inplace)


@kink_rule(aten.hardtanh, F.hardtanh, F.hardtanh_)
def hardtanh(run, func, x, min_val=-1.0, max_val=1.0, inplace=False):
    """clamp(x, min_val, max_val), with the clamp rule at both bounds."""
    inplace = inplace or func is F.hardtanh_
    out = _clamp(run, x, min_val, max_val, lambda: F.hardtanh(x, min_val, max_val, inplace), inplace)
    return _finish(func, x, out, inplace)


@kink_rule(aten.relu6, F.relu6)
def relu6(run, func, x, inplace=False):
    """clamp(x, 0, 6), with the clamp rule at both bounds."""
    return _finish(func, x, _clamp(run, x, 0.0, 6.0, lambda: F.relu6(x, inplace), inplace), inplace)


@kink_rule(aten.leaky_relu, F.leaky_relu, F.leaky_relu_)
def leaky_relu(run, func, x, negative_slope=0.01, inplace=False):
    """x for x > 0, slope*x for x < 0. At 0: the piece chosen by the sign of x' along the direction."""
    inplace = inplace or func is F.leaky_relu_
    out = _switch(run, "aten.leaky_relu", x, x, negative_slope * x,
                  lambda: F.leaky_relu(x, negative_slope, inplace), inplace=inplace)
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
    xs = x.clone() if inplace else x  # the product saves its factor, and x is written below
    return _finish(func, x, xs * _clamp(run, xs + 3, 0.0, 6.0, None) / 6, inplace)


def _touches(run, x, points) -> bool:
    xp = _split(x)[0]
    return run.near_tol is not None or any(((xp - p).abs() <= run.tie_tol).any() for p in points)


@kink_rule(aten.threshold, F.threshold, torch.threshold, F.threshold_)
def threshold(run, func, x, threshold, value, inplace=False):
    """x where x > threshold, else value. A jump unless value == threshold: an error if the direction crosses it,
    or if the element's tangent there is 0 (it may cross at second order: threshold(x * x, 0, 1) at 0) unless x is
    f's input (or a view of it), whose tangent 0 is a direction that leaves the element where it is: value, exact."""
    inplace = inplace or func is F.threshold_
    numbers = isinstance(value, (int, float)) and isinstance(threshold, (int, float))
    out = _switch(run, "aten.threshold", x - threshold, x, value,
                  lambda: F.threshold(x, threshold, value, inplace), jumps=True,
                  flat=numbers and value <= threshold, unmoved=numbers and run.input_view(*_split(x)))
    return _finish(func, x, out, inplace)


@kink_rule(aten.softplus, F.softplus)
def softplus(run, func, x, beta=1.0, threshold=20.0):
    """log(1 + exp(beta x)) / beta, and x itself where beta x > threshold (PyTorch's switch for large inputs): a
    jump at beta x = threshold (the pieces differ by log1p(exp(-threshold)) / beta there), an error if the
    direction crosses it; elsewhere the smooth piece's derivative."""
    if not isinstance(beta, (int, float)) or not isinstance(threshold, (int, float)) \
            or not _touches(run, x * beta, (threshold,)):
        return func(x, beta, threshold)
    smooth = torch.log1p(torch.exp(x * beta)) / beta  # PyTorch's kernel's piece, here with its tangent
    return _switch(run, "aten.softplus", x * beta - threshold, x, smooth, None, jumps=True)


@kink_rule(aten.softshrink, F.softshrink)
def softshrink(run, func, x, lambd=0.5):
    """x - clamp(x, -lambd, lambd): the clamp rule at both breakpoints."""
    if not _touches(run, x, (-lambd, lambd)):
        return F.softshrink(x, lambd)
    return x - _clamp(run, x, -lambd, lambd, None)


@kink_rule(aten.hardshrink, F.hardshrink, torch.hardshrink, Tensor.hardshrink)
def hardshrink(run, func, x, lambd=0.5):
    """x where |x| > lambd, else 0: jumps at +-lambd, an error if the direction crosses one, or if the element's
    tangent there is 0 (it may cross at second order) unless x is f's input (or a view of it), whose tangent 0 is a
    direction that leaves the element where it is: 0, exact. lambd < 0: PyTorch's kernel zeroes [-lambd, lambd],
    which is empty, so hardshrink is the identity (no jump): PyTorch's own."""
    if (isinstance(lambd, (int, float)) and lambd < 0) or not _touches(run, x, (-lambd, lambd)):
        return func(x, lambd)  # (lambd < 0: the kernel's [-lambd, lambd] is empty, hardshrink is the identity)
    unmoved = isinstance(lambd, (int, float)) and run.input_view(*_split(x))
    inner = _switch(run, "aten.hardshrink", -lambd - x, x, 0.0, None, jumps=True, unmoved=unmoved)
    return _switch(run, "aten.hardshrink", x - lambd, x, inner, None, jumps=True, unmoved=unmoved)


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
    margin - x == 0: the hinge side chosen along the direction, f'(x; d) = max(-x', 0). A target that depends on
    f's inputs goes through the eq rule: the loss jumps where y leaves 1 or -1 (both terms then), an error."""
    hinge = _hinge(run, "aten.hinge_embedding_loss", margin - input)
    if isinstance(target, Tensor) and (_is_dual(target) or target.requires_grad):
        eq = lambda v: _comparison("eq", "aten.hinge_embedding_loss")(run, torch.eq, target, v)
    else:
        eq = lambda v: target == v
    loss = hinge.masked_fill(eq(1), 0.0) + input.masked_fill(eq(-1), 0.0)
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


@kink_rule(aten.multilabel_margin_loss, F.multilabel_margin_loss)
def multilabel_margin_loss(run, func, input, target, size_average=None, reduce=None, reduction="mean"):
    """sum over target classes j and non-target classes i of max(0, 1 - x[j] + x[i]) / C (PyTorch's formula: the
    targets are a row's entries before its first -1, a repeated one counted again; NaN terms dropped). At a
    margin: the hinge side chosen along the direction."""
    x = input if input.dim() == 2 else input.reshape(1, -1)
    y = target.reshape(x.shape)
    listed = (y >= 0).cumprod(1).bool()  # the entries before the first -1
    y = y.clamp_min(0)
    is_target = torch.zeros(x.shape, dtype=torch.long, device=x.device).scatter_add_(1, y, listed.long()) > 0
    z = 1.0 - x.gather(1, y).unsqueeze(2) + x.unsqueeze(1)  # (N, listed j, class i)
    terms = listed.unsqueeze(2) & ~is_target.unsqueeze(1)
    z = z.masked_fill(~terms | _split(z)[0].isnan(), -1.0)  # no term there: away from the margin
    loss = _hinge(run, "aten.multilabel_margin_loss", z).sum((1, 2)) / x.shape[1]
    return _reduce(loss if input.dim() == 2 else loss.reshape(()), reduction, size_average, reduce)


# --- comparisons -------------------------------------------------------------------------------------------

# name -> (outcome on the side where a > b, None for eq/ne whose outcome is the same on both sides; outcome at a tie)
_CMP = {"gt": (True, False), "ge": (True, True), "lt": (False, False), "le": (False, True), "eq": (None, True),
        "ne": (None, False)}


def _comparison(name: str, op: str | None = None):
    above, at_tie = _CMP[name]
    op = op or f"aten.{name}"

    def rule(run, func, a, b):
        ap, bp = _split(a)[0], _split(b)[0] if isinstance(b, Tensor) else b
        result = func(ap, bp)
        if result is NotImplemented:  # (`x == None` through Tensor.__eq__: Python's fallback decides)
            return result
        try:
            dtype = torch.result_type(ap, bp)
        except TypeError:  # (a NumPy array: converted as the comparison converts it)
            dtype = result_type_of(ap, bp)
        # x == x (a NaN test) ties everywhere: never a kink. An integer tensor compared with a float one ties too
        # (`torch.tensor(0) < x` took the integer's side as exact: |x| written so got slope -1 at 0)
        if not (dtype.is_floating_point or dtype.is_complex) or a is b:
            return result
        if dtype.is_complex:  # (eq, ne of a complex value: no sign to follow; off its ties, exact)
            if mask_any(ap == bp):
                raise NonsmoothError(f"aten.{name} at {_user_line()} compares a complex value with an equal one: "
                                     "gradwise follows the sign of a - b, which a complex difference does not have. "
                                     "Compare real tensors (the real and imaginary parts)")
            return result
        s = promoted(a, dtype, ap.device) - promoted(b, dtype, ap.device)  # (bools: `x > False`, which `-` refuses)
        sp = _split(s)[0]
        tie = sp.abs() <= run.tie_tol
        run.note_near(op, sp.abs())
        if not tie.any():
            return result
        constant = _constant_where(run, a) & _constant_where(run, b)
        rows, choice, still = _resolve_sign(run, op, s, tie, comparison=True, constant=constant)
        result = result.expand(sp.shape).clone(memory_format=torch.contiguous_format)  # written through .view(-1)
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
    # copysign(1, y), y's sign bit as a step of y (the copysign rule's factor; not registered on its own)
    "copysign": (lambda y: y == 0, lambda y: -torch.ones_like(y), lambda y: torch.ones_like(y)),
}


def _round_decimals(decimals: int) -> tuple[Callable, Callable, Callable]:
    """round(x, decimals=k) as ATen's kernel: nearbyint(x * 10^k) / 10^k (k < 0: nearbyint(x / 10^-k) * 10^-k), in
    x's dtype. It jumps where the scaled x is a half-integer, which floats reach (0.125 at k = 2: 12.5; 500 at
    k = -3); the limits there are the neighbouring integers, scaled back."""
    p = float(10 ** (-decimals if decimals < 0 else decimals))  # (abs: the rule of this module)
    scale, back = (lambda v: v * p, lambda v: v / p) if decimals > 0 else (lambda v: v / p, lambda v: v * p)
    at_jump = lambda x: (lambda q: (q.abs() - q.abs().trunc()) == 0.5)(scale(x))
    return at_jump, lambda x: back(scale(x) - 0.5), lambda x: back(scale(x) + 0.5)


def _step(name: str, inplace: bool = False, op: str | None = None):
    op = op or f"aten.{name}"

    def rule(run, func, x, *args, **kwargs):
        at_jump, left, right = _STEPS[name]
        xp = _split(x)[0]
        if xp.is_complex() and mask_any(xp == 0):  # sgn(z) = z / |z|: smooth but at 0, where no limit exists
            raise NonsmoothError(f"sgn of a complex 0 at {_user_line()}: z / |z| has no limit there (a jump in "
                                 "every direction). Keep it away from 0 (e.g. z / (|z| + eps))")
        decimals = 0
        if name == "round" and (args or kwargs):  # round(x, decimals=k)
            decimals, args, kwargs = int(kwargs.get("decimals", args[0] if args else 0)), (), {}
        if decimals:
            at_jump, left, right = _round_decimals(decimals)
        if args or kwargs or not xp.is_floating_point():
            return func(x, *args, **kwargs)
        jump = at_jump(xp.detach())
        if not mask_any(jump):
            return func(x, **({"decimals": decimals} if decimals else {}))
        rows, choice, still = _resolve_sign(run, op, x, jump, comparison=True, constant=_constant_where(run, x))
        own = xp.detach().reshape(-1)[rows].clone()
        # PyTorch's own (zero derivative, in the graph), the limits written in (through a flat view: contiguous)
        value = func(x, **({"decimals": decimals} if decimals else {})).clone(memory_format=torch.contiguous_format)
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


@kink_rule(aten.copysign, torch.copysign, Tensor.copysign)
def copysign(run, func, x, y):
    """|x| with the sign of y: the abs rule on x (at x = 0, x or -x, whichever grows along the direction) times
    y's sign, a step of y (at y = 0, its one-sided limit along the direction; f then jumps unless x = 0, an
    error). ``copysign(1, x) * x`` at 0 is |x|: derivative |x'|."""
    if not isinstance(x, Tensor) or not _split(x)[0].is_floating_point():
        return func(x, y)
    sign = _step("copysign")(run, _sign_bit, y) if isinstance(y, Tensor) else math.copysign(1.0, y)
    return abs(run, torch.abs, x) * sign


@kink_rule(aten.heaviside, torch.heaviside, Tensor.heaviside)
def heaviside(run, func, x, values):
    """heaviside(x, v): 0 below 0, 1 above, v at 0, piecewise constant; PyTorch has no derivative for it at all
    (generalized_grad crashed: "derivative for aten::heaviside is not implemented"). The kernel's value, constant
    in x; at x = 0 the sign rule's one-sided limit along the direction, (±1 + 1) / 2 (a jump of f is an error;
    ``heaviside(x, v) * x`` is relu), and v where x does not move, with v's derivative there (1)."""
    xp, vp = _split(x)[0], _split(values)[0]
    if not (isinstance(xp, Tensor) and xp.is_floating_point()):
        return func(x, values)
    out = func(xp.detach(), vp.detach() if isinstance(vp, Tensor) else vp)
    zero = xp.detach() == 0
    if mask_any(zero):
        s = _split(_step("sign", op="aten.heaviside")(run, torch.sign, x))[0].detach()  # at 0: ±1 along d, 0 if still
        out = torch.where(zero & (s != 0), (s + 1) / 2, out)
        zero = zero & (s == 0)
    return torch.where(zero, values, out) if isinstance(values, Tensor) else out


def _sign_bit(y: Tensor) -> Tensor:
    return torch.copysign(torch.ones_like(y), y)


@kink_rule(aten.frac, torch.frac, Tensor.frac)
def frac(run, func, x):
    """x - trunc(x): slope 1, jumps at nonzero integers (the trunc rule: its one-sided limit, a jump of f is an
    error)."""
    return x - _step("trunc")(run, torch.trunc, x)


@kink_rule(aten._to_copy, *CASTS)
def integer_cast(run, func, x, *args, **kwargs):
    """A cast of a float x to an integer dtype (trunc: jumps at the nonzero integers) or to bool (x != 0: jumps at
    0), piecewise constant. At a jump the cast takes its one-sided limit along the direction (trunc's; for bool,
    True wherever x moves), which is checked like a comparison: where f stays continuous (``x.long() + frac(x)``
    is x) the locked piece is exact, a jump of f is an error. Values that do not move are constants: a step op's
    output (``x.floor().long()``), relu-dead zeros. Any other call (float dtypes, devices, integer inputs) is
    PyTorch's own (one to a complex dtype is marked as lying on the real axis: `_kink_mode._ONTO_AXIS`)."""
    out = func(x, *args, **kwargs)
    if not isinstance(x, Tensor) or not isinstance(out, Tensor) or out.is_floating_point() or out.is_complex() \
            or _stepped(x) or not _split(x)[0].is_floating_point():
        return out
    xp = _split(x)[0].detach()
    to_bool = out.dtype == torch.bool
    if to_bool and not _near_zero(xp, 0.0):
        return out
    jump = xp == 0 if to_bool else (xp == xp.trunc()) & (xp != 0) & xp.isfinite()
    flat = run.flat_source(x) if run.tie_tol == 0 else None
    if flat is not None:  # relu-dead elements stay where they are
        jump &= xp != flat[0] if flat[1] is None else (xp != flat[0]) | flat[1]
    if not mask_any(jump):
        return out
    rows, choice, still = _resolve_sign(run, "aten._to_copy", x, jump, comparison=True)
    own = xp.reshape(-1)[rows]
    _, left, right = _STEPS["trunc"]
    limit = torch.where(still, own, torch.where(choice == 0, right(own), left(own))) if not to_bool else ~still
    out = out.clone(memory_format=torch.contiguous_format)  # written through a flat view
    out.view(-1)[rows] = limit.to(out.dtype)
    return out


# --- bucket indices ---------------------------------------------------------------------------------------------


def _bucket_index(run, op: str, seq, x, out: Tensor, right: bool) -> Tensor:
    """searchsorted / bucketize's index, the number of entries of ``seq`` below x (at or below with ``right``).
    Where x equals an entry it is recounted with the comparison rule, which takes each tie's one-sided outcome
    along the direction (x and the entries may both move); elsewhere it is the kernel's own ``out``."""
    sp, xp = _split(seq)[0], _split(x)[0]
    if not isinstance(x, Tensor):  # searchsorted's Scalar overload: a constant the entries may move onto
        x = xp = torch.full((), x, dtype=sp.dtype if sp.is_floating_point() else torch.float64, device=sp.device)
    if not (xp.is_floating_point() or sp.is_floating_point()):
        return out
    if not sp.is_floating_point():  # integer entries or an integer x: constants, compared in the other's dtype
        seq = sp = sp.to(xp.dtype)
    elif not xp.is_floating_point():
        x = xp = xp.to(sp.dtype)
    at = torch.isin(xp, sp) if seq.dim() == 1 else (xp.unsqueeze(-1) == sp.unsqueeze(-2)).any(-1)
    if not mask_any(at):
        return out
    s, v = (seq, x.unsqueeze(-1)) if seq.dim() == 1 else (seq.unsqueeze(-2), x.unsqueeze(-1))
    below = _comparison("le" if right else "lt", op)(run, torch.le if right else torch.lt, s, v)
    index = torch.where(at, below.sum(-1).to(out.dtype), out)
    return out.copy_(index) if out.shape == index.shape else index  # (an ``out=`` tensor is written too)


def _side(right: bool, side: str | None) -> bool:
    return side == "right" if side is not None else bool(right)


@kink_rule(aten.searchsorted, torch.searchsorted)
def searchsorted(run, func, sorted_sequence, input, *, out_int32=False, right=False, side=None, sorter=None,
                 out=None):
    """The index of x's bucket in a sorted sequence, piecewise constant (no derivative). It jumps where x equals an
    entry: there the index is its one-sided limit along the direction (x below or above the entry), so a
    piecewise-linear interpolation through its knots (``torch.searchsorted`` + a gather + a lerp) is continuous
    and gets the slope of the segment the direction enters; a jump of f is an error."""
    kw = {k: v for k, v in dict(side=side, sorter=sorter, out=out).items() if v is not None}
    result = func(sorted_sequence, input, out_int32=out_int32, right=right, **kw)
    seq = sorted_sequence if sorter is None else sorted_sequence.gather(-1, sorter)
    return _bucket_index(run, "aten.searchsorted", seq, input, result, _side(right, side))


@kink_rule(aten.bucketize, torch.bucketize)
def bucketize(run, func, input, boundaries, *, out_int32=False, right=False, out=None):
    """searchsorted with the arguments swapped (boundaries 1-D): at a boundary, the one-sided limit along the
    direction."""
    result = func(input, boundaries, out_int32=out_int32, right=right, **({} if out is None else {"out": out}))
    return _bucket_index(run, "aten.bucketize", boundaries, input, result, bool(right))


# --- logit with eps ---------------------------------------------------------------------------------------------


@kink_rule(aten.logit, torch.logit, Tensor.logit, torch.special.logit)
def logit(run, func, x, eps=None):
    """log(z / (1 - z)) with z = clamp(x, eps, 1 - eps) (ATen's kernel; the bounds in x's dtype, as it makes them):
    the clamp rule at eps and 1 - eps, so the one-sided slope is 0 outside and 1 / (x (1 - x)) inside. Without
    eps, or with eps < 0 or NaN (no clamp in the kernel), PyTorch's own. eps > 0.5 (lo > hi: the kernel's scalar
    and vectorized paths disagree there) at a bound: an error."""
    if eps is None or not isinstance(eps, (int, float)) or not eps >= 0 or not _split(x)[0].is_floating_point():
        return func(x) if eps is None else func(x, eps)
    bound = torch.tensor(eps, dtype=x.dtype)
    lo, hi = float(bound), float(1 - bound)
    if not _touches(run, x, (lo, hi)):
        return func(x, eps)
    if lo > hi:
        raise NonsmoothError(f"logit at {_user_line()} with eps = {eps} > 0.5 sits at its bound: ATen clamps to "
                             "[eps, 1 - eps], an empty range, where its kernels disagree. Use eps <= 0.5")
    return torch.logit(_clamp(run, x, lo, hi, None))


# --- i0e ---------------------------------------------------------------------------------------------------------


@kink_rule(aten.special_i0e, torch.special.i0e)
def i0e(run, func, x):
    """exp(-|x|) I0(x), the kernel's value. At 0 it kinks (|x|: slopes -1 and 1, f'(0; d) = -|d|) and PyTorch's
    derivative is 0 (sgn(0) = 0); there the derivative is exp(-|x|) I0(x)'s with the abs rule, added to the
    kernel's value as (g - g), a derivative alone."""
    out = func(x)
    xp = _split(x)[0]
    if not xp.is_floating_point() or not mask_any(xp == 0):
        return out
    g = torch.exp(-abs(run, torch.abs, x)) * torch.special.i0(x)
    return torch.where(xp == 0, _split(out)[0].detach() + (g - _split(g)[0].detach()), out)


# --- in-place variants: the out-of-place rule on a copy, written back -------------------------------------------


def _in_place(rule: Callable, out_of_place: Callable, name: str) -> Callable:
    """``x.op_(...)`` as ``x.copy_(op(x.clone(), ...))`` through the out-of-place rule: its one-sided derivative
    at the kink, and fmod_'s divisor slope of the real quotient (PyTorch's in-place fmod_ takes -10 at 1.0 and
    float 0.1, where it is -9). The copy keeps what the rule's graph saves from being overwritten; an integer
    or bool x runs PyTorch's own. A complex x goes through the rule too (its branch cut: ``z.sqrt_()``, ``pow_``
    ran PyTorch's formula there); where the rule's result has another dtype than x, PyTorch's own call on copies
    says whether the in-place op accepts it (``abs_`` of a complex x raises; a real x's ``pow_(0.5j)`` too)."""

    def route(run, func, x, *args, **kwargs):
        xp = _split(x)[0]
        if not (xp.is_floating_point() or xp.is_complex()):
            return func(x, *args, **kwargs)
        out = rule(run, out_of_place, same_axis(x, x.clone()), *args, **kwargs)
        if isinstance(out, Tensor) and out.dtype != xp.dtype:
            func(*_copies((x, *args)), **dict(zip(kwargs, _copies(tuple(kwargs.values())), strict=True)))
        return _finish(func, x, out, True)

    route.__name__ = name
    route.__doc__ = f"{name}: " + (_in_place.__doc__ or "")
    return route


def route_in_place_variants() -> None:
    """Give every routed Tensor method ``n`` whose in-place ``n_`` has no route of its own the ``_in_place`` form
    of ``n``'s rule (with ``n``'s route condition), so no in-place variant runs PyTorch's convention at a kink
    its out-of-place form answers (``x.gt_(0)`` in a ``where``, ``fmod_`` in its divisor). Called once every rule
    module has registered (``gradwise._nonsmooth.__init__``)."""
    pairs = [(getattr(Tensor, name + "_"), call) for call in list(_ROUTES)
             if (name := getattr(call, "__name__", None)) and getattr(Tensor, name, None) is call
             and hasattr(Tensor, name + "_")]
    pairs += [(Tensor.__imod__, Tensor.remainder), (Tensor.__ipow__, Tensor.pow)]
    for in_place, call in pairs:
        if in_place not in _ROUTES and call in _ROUTES:
            _ROUTES[in_place] = _in_place(_ROUTES[call], call, in_place.__name__)
            if call in _ROUTE_IF:
                _ROUTE_IF[in_place] = _ROUTE_IF[call]
