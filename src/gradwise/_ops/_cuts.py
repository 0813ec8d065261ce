"""Where complex functions meet their branch cuts, read by the kink facts (``_kinks``, ``_discrete``) and by
nonsmooth calculus's rules (sqrt, pow): written once here, below both (``_discrete`` imports ``_kinks``).

``CUTS`` (aten op name -> its cut and branch points) and its one lookup ``on_branch_cut``; ``power_cut`` for
z ** p (every overload of pow, float_power's decomposition, in place too: the name is read without its ``_``).

A complex tensor made from a real one by a cast lies on the real axis for every value of its input (its imaginary
part is +0 by construction): it never crosses a cut that runs along the real axis, only its branch points. Such
tensors are marked (``mark_real_axis``, while their version counter is unchanged: a write into them may move them
off the axis); a marked z is refused only at its branch points. Copies made to look at a call carry the mark over
(``same_axis``).

May import: torch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.weak import WeakIdKeyDictionary

Tensor = torch.Tensor

# complex tensors on the real axis by construction -> their version when marked
_REAL_AXIS = WeakIdKeyDictionary()


def mark_real_axis(t) -> None:
    """Mark a complex tensor whose imaginary part is +0 whatever its real input's values (a cast of a real x)."""
    if isinstance(t, Tensor) and t.is_complex() and (v := _version(t)) is not None:
        _REAL_AXIS[t] = v


def on_real_axis(t) -> bool:
    """Whether t is marked (`mark_real_axis`) and not written into since."""
    v = _REAL_AXIS.get(t) if isinstance(t, Tensor) else None
    return v is not None and v == _version(t)


def _version(t: Tensor) -> int | None:
    """t's version counter; None where it has none (an inference tensor: never marked, its writes unseen)."""
    try:
        return t._version
    except RuntimeError:
        return None


def onto_axis(src, out) -> None:
    """Mark ``out``, a cast, copy or view of ``src``, where it is complex and ``src`` real or marked."""
    if isinstance(out, Tensor) and out.is_complex() and isinstance(src, Tensor) and (
            src.is_floating_point() or on_real_axis(src)):
        mark_real_axis(out)


def same_axis(src, copy):
    """``copy`` (a copy of ``src``), marked as ``src`` is."""
    if on_real_axis(src):
        mark_real_axis(copy)
    return copy


def _real_axis_below(at: float) -> tuple[Callable, Callable]:
    return (lambda z: (z.imag == 0) & (z.real <= at)), (lambda z: (z.imag == 0) & (z.real == at))


_BELOW_0 = _real_axis_below(0.0)
_BEYOND_1 = (lambda z: (z.imag == 0) & (z.real.abs() >= 1)), (lambda z: (z.imag == 0) & (z.real.abs() == 1))
# asin / acos of x + 0j, x > 1: the value is the upper side's, PyTorch's derivative the lower side's (the sign of
# 1 - z ** 2's zero imaginary part): its whole cut stays refused
# asinh / atan: their cut, the imaginary axis beyond ±i, has no point on the real axis, so a marked z is never on
# it, unless a write the version counter misses (``z.data``, NumPy) moved it there: refused as any z is
_IMAGINARY_BEYOND_I = ((lambda z: (z.real == 0) & (z.imag.abs() >= 1)),) * 2

# aten op name -> (where z sits on the op's branch cut, where a marked z (`on_real_axis`) is refused: the branch
# points on the real axis).
# log / sqrt / z ** p: the real axis at and below 0 (their imaginary part jumps by 2 pi / changes sign across it);
# log1p: below -1; asin, acos, atanh: beyond ±1; acosh: below 1 (its branch points ±1); asinh, atan: the
# imaginary axis beyond ±i; angle: the negative real axis and 0 (it jumps there, from pi to -pi).
CUTS: dict[str, tuple[Callable, Callable]] = {
    **dict.fromkeys(("log", "log2", "log10", "sqrt", "rsqrt", "pow", "float_power"), _BELOW_0),
    "log1p": _real_axis_below(-1.0),
    **dict.fromkeys(("asin", "acos"), (_BEYOND_1[0], _BEYOND_1[0])),
    "atanh": _BEYOND_1,
    "acosh": (_real_axis_below(1.0)[0], _BEYOND_1[1]),
    **dict.fromkeys(("asinh", "atan"), _IMAGINARY_BEYOND_I),
    "angle": ((lambda z: (z == 0) | ((z.imag == 0) & (z.real < 0))), (lambda z: z == 0)),
}


def on_branch_cut(op: str, z, real_axis: bool | None = None) -> Tensor | None:
    """Where a complex z given to aten op ``op`` (its name; ``sqrt_`` reads ``sqrt``'s) sits on the op's branch
    cut, where its result jumps or is singular; only its branch points where z lies on the real axis by
    construction (``real_axis``; None: `on_real_axis` of z). None for a real z or an op without a cut."""
    if not (isinstance(z, Tensor) and z.is_complex()):
        return None
    cut, points = CUTS.get(op[:-1] if op.endswith("_") else op, (None, None))
    if cut is None:
        return None
    if on_real_axis(z) if real_axis is None else real_axis:
        return points(z)
    return cut(z)


def _complex(v) -> bool:
    return isinstance(v, complex) or (isinstance(v, Tensor) and v.is_complex())


def entire_power(p, moves: bool | None = None) -> bool | None:
    """Whether z ** p is entire in z (and in p): p an integer that does not move (an int, an integral float, a
    complex with imaginary part 0 and an integral real part, an integral tensor that does not require grad;
    ``moves`` overrides that: a dual); an infinite or NaN p is not (``float.is_integer``: ``int(p)`` would raise).
    A moving p is not: d/dp z ** p = z ** p log z jumps across the cut. None for a tensor p whose values decide
    (read only where ``possible`` may not read data: see `power_cut`)."""
    if isinstance(p, Tensor):
        if moves if moves is not None else p.requires_grad:
            return False
        return None
    if isinstance(p, complex):
        return p.imag == 0 and p.real.is_integer()
    return isinstance(p, int) or (isinstance(p, float) and p.is_integer())


def power_cut(x, p, moves: bool | None = None, real_axis: bool | None = None) -> Tensor | None:
    """Where x ** p (the principal branch, exp(p log x)) sits on its cut: a complex x on the negative real axis
    or at 0 for a p that is not an integer (`entire_power`); a complex x on the real axis by construction, or a
    real x with a complex p (a complex result, x + 0j), or an x that does not move (c ** p = exp(p log c) is
    entire in p, log c a constant), only at 0, the branch point. None where x ** p has no cut (a real x with a
    real p: `_kinks` locates its singular 0; a number x: as a constant x). Broadcast to the result's shape. Reads a
    tensor p's values. ``moves``: as `entire_power` takes it; ``real_axis``: whether x lies on the real axis by
    construction or does not move (None: `on_real_axis` of x, or x does not require grad; a rule reading a dual's
    primal passes both)."""
    if not isinstance(x, Tensor) or not (x.is_complex() or _complex(p)):
        return None
    entire = entire_power(p, moves)
    if entire is None:  # a constant tensor p: integral and real-valued everywhere?
        q = p.detach()
        entire = bool(((q.imag == 0) & (q.real == q.real.round())).all()) if q.is_complex() else bool(
            (q == q.round()).all()) if q.is_floating_point() else True
    if entire:
        return None
    if real_axis is None:
        real_axis = on_real_axis(x) or not x.requires_grad
    at = x == 0 if real_axis or not x.is_complex() else on_branch_cut("pow", x, False)
    return torch.broadcast_to(at, torch.broadcast_shapes(x.shape, p.shape)) if isinstance(p, Tensor) else at


def maybe_power_cut(x, p) -> bool:
    """From dtypes and numbers alone (no data read): whether x ** p may sit on a cut (`power_cut`)."""
    return isinstance(x, Tensor) and (x.is_complex() or _complex(p)) and entire_power(p) is not True
