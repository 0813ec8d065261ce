"""Kink rules for rounded division and modulo: div with a rounding mode, floor_divide, ``//``, remainder, fmod
and ``%`` (their reflected and in-place forms): the floor / trunc step rules (``_rules_pointwise._STEPS``) on the
real quotient x / y, and fmod's divisor slope. Moved out of ``_rules_pointwise`` (over 800 lines).

May import: torch, gradwise._masks, gradwise._ops, ``_records``, ``_rules``, ``_rules_pointwise``.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD

from gradwise._masks import mask_any
from gradwise._nonsmooth._records import _Run
from gradwise._nonsmooth._rules import _ROUTE_IF, _ROUTES, _finish, _resolve_sign, _split, kink_rule
from gradwise._nonsmooth._rules_pointwise import _STEPS
from gradwise._ops._discrete import trunc_rounds_off

aten = torch.ops.aten
Tensor = torch.Tensor


def _rounds(args: tuple, kwargs: dict) -> bool:
    return kwargs.get("rounding_mode") is not None


def _quotient_sign(x, y, n: Tensor) -> Tensor | None:
    """At x = n y exactly: the sign of the quotient's tangent (x' - n y') / y (None without tangents), from x' - n y'
    in float64 (for float32 and narrower inputs the product n y' is exact there, so the sign is) times sign(y)."""
    xt, yt = (_split(v)[1] if isinstance(v, Tensor) else None for v in (x, y))
    if xt is None and yt is None:
        return None
    with torch.no_grad():
        wide = n.to(torch.float64)
        key = xt.to(torch.float64).expand(n.shape) if xt is not None else torch.zeros_like(wide)
        if yt is not None:
            key = key - wide * yt.to(torch.float64)
        return torch.sign(key * torch.sign(torch.as_tensor(_split(y)[0], dtype=torch.float64)))


def _real_trunc(x: Tensor, y: Tensor, kernel: Tensor) -> Tensor:
    """trunc of the real quotient x / y (``_discrete.trunc_rounds_off``): ``kernel`` itself (same object) where
    they agree everywhere, else the real one."""
    with torch.no_grad():
        real, off = trunc_rounds_off(x, y, kernel)
        return torch.where(off, real, kernel) if mask_any(off) else kernel


def _rounded_quotient(run: _Run, x, y, mode: str, op: str) -> Tensor:
    """floor (trunc) of the real quotient x / y, as ``torch.div(x, y, rounding_mode=mode)`` computes it (derivative 0).
    It jumps where x is an exact multiple n y of y (fmod(x, y) == 0, exact in floating point; trunc not at n = 0):
    there the floor / trunc rule on the quotient takes its one-sided limit (n, or the next integer toward the side
    the quotient moves to, the sign of (x' - n y') / y; then further directions), checked like a comparison, so a
    jump of f is an error and a sum whose jumps cancel is exact. x / y rounding to an integer elsewhere (1 / 0.1)
    is no jump: the kernel floors the exact quotient (trunc rounds it first: `_real_trunc` gives the real one).
    y = 0 (or x, y not finite, or NaN): no jump, as floor of an infinite quotient; at y = +-inf, 0 / y is one
    (-1 // inf is -1)."""
    value = torch.div(x, y, rounding_mode=mode)
    n = _split(value)[0].detach()
    if not n.is_floating_point():
        return value
    xp, yp = (torch.as_tensor(_split(v)[0], dtype=n.dtype, device=n.device).detach() for v in (x, y))
    if mode == "trunc":
        exact = _real_trunc(xp, yp, n)
        if exact is not n:
            value, n = torch.where(exact != n, exact, value), exact
    with torch.no_grad():
        jump = torch.fmod(xp, yp) == 0
        jump = torch.broadcast_to(jump & (n != 0) if mode == "trunc" else jump & (n == n), n.shape)
    if not mask_any(jump):
        return value
    sign = _quotient_sign(x, y, n)
    q = _split(x)[0] / _split(y)[0]  # the real quotient's gradient (subdifferential enumeration reads it)
    s = q if sign is None else fwAD.make_dual(q, sign.to(q.dtype))
    rows, choice, still = _resolve_sign(run, op, s, jump, comparison=True)
    _, left, right = _STEPS[mode]
    own = n.reshape(-1)[rows]
    value = value.clone(memory_format=torch.contiguous_format)  # PyTorch's (derivative 0), limits written in
    value.view(-1)[rows] = torch.where(still, own, torch.where(choice == 0, right(own), left(own)))
    return value


def _division(mode: str | None, reflected: bool = False, inplace: bool = False):
    def rule(run, func, a, b, *, rounding_mode=None):
        how = mode or rounding_mode
        if how not in ("floor", "trunc") or (inplace and not _split(a)[0].is_floating_point()):
            return func(a, b, rounding_mode=rounding_mode) if rounding_mode is not None else func(a, b)
        x, y = (b, a) if reflected else (a.clone() if inplace else a, b)  # (the quotient's graph saves x)
        out = _rounded_quotient(run, x, y, how, "aten.floor_divide" if mode else "aten.div")
        return _finish(func, a, out, inplace)

    rule.__name__ = ("r" if reflected else "") + ("floor_divide" if mode else "div") + ("_" if inplace else "")
    rule.__doc__ = (f"{'floor_divide' if mode else 'div with a rounding mode'}: piecewise constant (derivative 0; "
                    "PyTorch 2.13 has no derivative for floor_divide in either mode). At a jump (x an exact multiple "
                    "of y) the floor / trunc rule on the real quotient x / y (`_rounded_quotient`); true division "
                    "is PyTorch's own.")
    return rule


kink_rule(aten.div, torch.div, torch.divide, Tensor.div, Tensor.divide)(_division(None))
kink_rule(aten.floor_divide, torch.floor_divide, Tensor.floor_divide, Tensor.__floordiv__)(_division("floor"))
_ROUTES[Tensor.__rfloordiv__] = _division("floor", reflected=True)
for _call in (Tensor.div_, Tensor.divide_):
    _ROUTES[_call] = _division(None, inplace=True)
for _call in (Tensor.floor_divide_, Tensor.__ifloordiv__):
    _ROUTES[_call] = _division("floor", inplace=True)
for _call in (torch.div, torch.divide, Tensor.div, Tensor.divide, Tensor.div_, Tensor.divide_):
    _ROUTE_IF[_call] = _rounds


def _fmod_divisor_slope(out: Tensor, xp: Tensor, mp: Tensor, m: Tensor) -> Tensor:
    """fmod(x, m) with the derivative -trunc(x / m) to m of the real quotient. PyTorch's backward (and forward
    mode) takes trunc of the rounded quotient: at 1.0 and float 0.1 it gives -10 where the slope is -9. Where they
    differ, (m - m) times the difference moves the derivative alone (the value stays the kernel's)."""
    with torch.no_grad():
        kernel = torch.div(xp, mp, rounding_mode="trunc")
        real = _real_trunc(xp, mp, kernel)
    if real is kernel:
        return out
    off = (real != kernel).broadcast_to(out.shape)
    return torch.where(off, out + (m - _split(m)[0].detach()) * (kernel - real), out)


def _modulo(name: str, mode: str, reflected: bool = False):
    def rule(run, func, x, m):
        if reflected:  # Tensor.__rmod__(m, x) is x % m (x a number: as a tensor, remainder(Scalar, Tensor) has no
            # forward-mode formula)
            x, m, func = m, x, torch.remainder
            if not isinstance(x, Tensor):
                x = torch.tensor(x, dtype=torch.result_type(x, _split(m)[0]), device=m.device)
        out = func(x, m)
        if not isinstance(out, Tensor) or not out.is_floating_point():
            return out
        xp, mp = (torch.as_tensor(_split(v)[0], dtype=out.dtype, device=out.device).detach() for v in (x, m))
        if mode == "trunc" and isinstance(m, Tensor) and (m.requires_grad or _split(m)[1] is not None):
            out = _fmod_divisor_slope(out, xp, mp, m)
        with torch.no_grad():
            at = torch.fmod(xp, mp) == 0
        if not mask_any(at if mode == "floor" else at & (xp != 0)):
            return out
        n = torch.div(xp, mp, rounding_mode=mode)
        q = _rounded_quotient(run, x, m, mode, f"aten.{name}")
        step = (n - _split(q)[0].detach()).broadcast_to(out.shape)  # -1, 0 or 1: where the quotient left n
        moved = step != 0
        if not mask_any(moved):
            return out
        # PyTorch's value at a multiple is 0 (its derivative: 1 to x, -n to m); the other side's limit is step * m
        # (derivative -(n - step) to m), added where the quotient moved only
        return torch.where(moved, out + step * m, out)

    rule.__name__ = ("r" if reflected else "") + name
    rule.__doc__ = (f"x - m {mode}(x / m), PyTorch's value and derivative (1 to x, -{mode}(x / m) to m) away from "
                    "its jumps. They sit where x is an exact multiple n m of m (fmod(x, m) == 0, exact in floating "
                    "point: 1.0 is no multiple of float 0.1, though 1.0 / 0.1 rounds to 10; "
                    f"{'every n' if mode == 'floor' else 'n != 0'}). There the quotient's rule "
                    "(`_rounded_quotient`) takes its one-sided limit along the direction; where it leaves n, the "
                    "value is that side's limit, +-m, so a jump of f is an error and a sum whose jumps cancel "
                    "(floor(x) + x % 1) is exact.")
    return rule


kink_rule(aten.remainder, torch.remainder, Tensor.remainder, Tensor.__mod__)(_modulo("remainder", "floor"))
_ROUTES[Tensor.__rmod__] = _modulo("remainder", "floor", reflected=True)  # (watched, it was refused or missed)
kink_rule(aten.fmod, torch.fmod, Tensor.fmod)(_modulo("fmod", "trunc"))
