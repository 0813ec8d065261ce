"""Jumps of the ops that read a float tensor into integers or bools (bucketize, searchsorted, histc, counts,
nonzero, signbit, heaviside, angle, unique, integer and bool casts, copies into integer tensors) and of rounded division
(div with a rounding mode, floor_divide, remainder, fmod): added to ``_kinks.KINKS`` (kind ``"jump"``), apart from
the kinks of continuous ops. Their outputs carry no derivative, so a rule-less
call at such a point would give f a derivative of 0 across a jump: nonsmooth calculus refuses there
(``_nonsmooth/_kink_watch.py``).

May import: torch, ``_kinks``, ``_cuts``.
"""

from __future__ import annotations

import dataclasses

import torch

from gradwise._ops._cuts import on_branch_cut
from gradwise._ops._kinks import KINKS, OpCall, Site, _float, _integral, _kink, _where_zero

aten = torch.ops.aten
Tensor = torch.Tensor


def _inexact(x) -> bool:
    return isinstance(x, Tensor) and (x.is_floating_point() or x.is_complex())


def _on_boundaries(x, boundaries) -> Site | None:
    """Where x equals one of ``boundaries`` (a bucket changes there)."""
    if not (_float(x) or _float(boundaries)):
        return None
    if not isinstance(x, Tensor):
        x = torch.tensor(x, dtype=boundaries.dtype, device=boundaries.device)
    return Site(torch.isin(x, boundaries))


@_kink(aten.bucketize, kind="jump", convention="none (an integer output)")
def _bucketize_on_a_boundary(c: OpCall):
    """bucketize(x, boundaries) jumps where x equals a boundary."""
    return _on_boundaries(c.args[0], c.arg(1, "boundaries"))


@_kink(aten.searchsorted, kind="jump", convention="none (an integer output)")
def _searchsorted_on_an_entry(c: OpCall):
    """searchsorted(sequence, x) jumps where x equals an entry of the sequence."""
    return _on_boundaries(c.arg(1, "self"), c.args[0])


@_kink(aten.histc, kind="jump", convention="0 (counts)", coarse=True)
def _histc_on_an_edge(c: OpCall):
    """histc jumps where an element lies on a bin edge. With min == max the range is the data's own (its extreme
    elements move the edges): every call, coarse."""
    x = c.args[0]
    if not _float(x):
        return None
    bins, lo, hi = c.arg(1, "bins", 100), c.arg(2, "min", 0), c.arg(3, "max", 0)
    if lo == hi:
        return Site(torch.ones(x.shape, dtype=torch.bool, device=x.device), aligned=False)
    edges = torch.linspace(float(lo), float(hi), int(bins) + 1, dtype=x.dtype, device=x.device)
    return Site(torch.isin(x, edges), aligned=False)


@_kink(aten.count_nonzero, aten.nonzero, aten.nonzero_static, aten.argwhere, aten.signbit, kind="jump",
       convention="none (an integer or bool output)")
def _reads_zero(c: OpCall):
    """count_nonzero / nonzero / argwhere / signbit jump where an element is 0 (signbit: -0.0 and 0.0 differ)."""
    return _where_zero(c) if _inexact(c.args[0]) else None


@_kink(aten.heaviside, kind="jump", convention="none (PyTorch has no derivative for heaviside)")
def _heaviside_at_zero(c: OpCall):
    """heaviside(x, v) jumps at x = 0 (0 below, v at 0, 1 above)."""
    return _where_zero(c) if _float(c.args[0]) else None


@_kink(aten.angle, kind="jump", convention="0")
def _angle_at_its_cut(c: OpCall):
    """angle jumps at 0 for a real x (0 for x >= 0, pi below); for a complex z at 0 (undefined) and across the
    negative real axis (pi to -pi), where it also jumps."""
    x = c.args[0]
    if (cut := on_branch_cut("angle", x)) is not None:
        return Site(cut)
    return _where_zero(c) if _float(x) else None


def _complex_input(c: OpCall) -> bool:
    """A complex first argument (a dtype, no data read): real log / sqrt have no cut."""
    return isinstance(c.args[0], Tensor) and c.args[0].is_complex()


@_kink(aten.log, aten.log2, aten.log10, aten.log1p, kind="jump", possible=_complex_input,
       convention="PyTorch's formula (1 / z) on the cut")
def _complex_log_on_its_cut(c: OpCall):
    """A complex log jumps across the negative real axis (its imaginary part, the angle, from pi to -pi) and is
    singular at 0; log1p at and below -1. A real log has neither (log(0) = -inf is no kink)."""
    return _on_its_cut(c)


@_kink(aten.atanh, aten.acosh, aten.asinh, aten.atan, kind="jump", possible=_complex_input,
       convention="PyTorch's formula on the cut")
def _complex_inverse_on_its_cut(c: OpCall):
    """Complex atanh jumps across the real axis beyond ±1, acosh below 1, asinh and atan across the imaginary
    axis beyond ±i. Real ones have no cut."""
    return _on_its_cut(c)


def _on_its_cut(c: OpCall):
    """Where c's complex first argument sits on its op's cut (`_cuts.CUTS`, keyed by the packet's name)."""
    at = on_branch_cut(c.packet, c.args[0])
    return None if at is None else Site(at)


@_kink(aten.atan2, kind="jump", convention="PyTorch's formula (0 at the origin)")
def _atan2_on_its_cut(c: OpCall):
    """atan2(y, x) jumps across y = 0 for x < 0 (pi to -pi) and is undefined at the origin."""
    y, x = c.args[0], c.args[1]
    if not (_float(y) or _float(x)):
        return None
    return Site(torch.broadcast_to((y == 0) & (x <= 0), torch.broadcast_shapes(y.shape, x.shape)))


@_kink(aten._unique2, aten.unique_consecutive, aten.unique_dim, aten._unique, kind="jump", coarse=True,
       convention="none (its values are the input's)")
def _unique_with_duplicates(c: OpCall):
    """unique's output (its length, the inverse indices, the counts) jumps where two elements are equal."""
    x = c.args[0]
    if not _float(x):
        return None
    return Site(lambda: _duplicated(x), aligned=False, found=torch.unique(x).numel() < x.numel())


def _duplicated(x: Tensor) -> Tensor:
    """Elements equal to another element (where unique's output changes as they separate)."""
    _, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    return counts[inverse] > 1


def _casts_to_integers(c: OpCall) -> bool:
    """Whether a _to_copy casts to an integer or bool dtype (no data read: float casts are never looked at)."""
    dtype = c.kwargs.get("dtype")
    return dtype is not None and not (dtype.is_floating_point or dtype.is_complex)


@_kink(aten._to_copy, kind="jump", convention="none (an integer or bool output)", possible=_casts_to_integers)
def _cast_at_a_step(c: OpCall):
    """A cast to an integer dtype truncates: a jump at the nonzero integers (at 0 trunc is 0 on both sides); to
    bool, x != 0: a jump at 0. A value that does not move (a floor's output) is no call here: `_kink_watch`
    passes such arguments as constants."""
    x = c.args[0]
    if not _float(x) or not _casts_to_integers(c):
        return None
    return _where_zero(c) if c.kwargs["dtype"] is torch.bool else Site(_integral(x) & (x != 0))


def _copies_into_integers(c: OpCall) -> bool:
    """Whether copy_ writes a float source into an integer or bool destination (dtypes only, no data read)."""
    dst, src = c.args[0], c.arg(1, "src")
    return isinstance(dst, Tensor) and not (dst.is_floating_point() or dst.is_complex()) and _float(src)


@_kink(aten.copy, kind="jump", convention="none (an integer or bool destination)", possible=_copies_into_integers)
def _copy_cast_at_a_step(c: OpCall):
    """copy_(dst, src) (``b[:] = x``, ``b.copy_(x)``) into an integer or bool dst casts src as ``_to_copy`` does:
    trunc jumps at the nonzero integers, bool (x != 0) at 0."""
    if not _copies_into_integers(c):
        return None
    dst, src = c.args[0], c.arg(1, "src")
    at = src == 0 if dst.dtype is torch.bool else _integral(src) & (src != 0)
    return Site(torch.broadcast_to(at, dst.shape))


def _rounds(c: OpCall) -> bool:
    """div with a rounding mode, floor_divide (no data read: true division never jumps)."""
    return c.kwargs.get("rounding_mode") is not None or c.packet.startswith("floor_divide")


@_kink(aten.div, aten.floor_divide, kind="jump", convention="0 to x and y, as on both sides", possible=_rounds)
def _rounded_quotient_at_a_multiple(c):
    """div(x, y, rounding_mode="floor") (floor_divide, ``//``) and "trunc" are floor / trunc of the real x / y (the
    kernel's, from fmod): they jump where x is an exact multiple of y, fmod(x, y) == 0 (exact in floating point;
    x / y may round to an integer elsewhere: 1 / 0.1), trunc not at 0 (0 on both sides there); the backward is 0.
    True division is smooth."""
    mode = "floor" if c.packet.startswith("floor_divide") else c.kwargs.get("rounding_mode")
    x, y = c.args[0], c.args[1]
    if mode is None or not (_float(x) or _float(y)):
        return None
    return _at_multiples(x, y, mode)


def _at_multiples(x, y, mode: str) -> Site:
    """Where x is an exact multiple of y (fmod(x, y) == 0: exact in floating point), broadcast; trunc's quotient
    does not jump at 0."""
    like = x if isinstance(x, Tensor) else y
    x, y = (torch.as_tensor(v, dtype=torch.result_type(x, y), device=like.device) for v in (x, y))
    at = torch.fmod(x, y) == 0
    shape = torch.broadcast_shapes(x.shape, y.shape)
    return Site(torch.broadcast_to(at & (x != 0) if mode == "trunc" else at, shape))


@_kink(aten.remainder, aten.fmod, kind="jump", convention="1 to x, -floor(x / y) (fmod: -trunc) to y")
def _remainder_at_a_multiple(c):
    """remainder (fmod) is x - y floor(x / y) (trunc), the kernel's from fmod: it jumps where its quotient does,
    where x is an exact multiple of y (fmod(x, y) == 0; x / y may round to an integer elsewhere: 1 % 0.1 is
    0.0999... with no jump near), fmod not at 0; the backward is that of one side."""
    x, y = c.args[0], c.args[1]
    if not (_float(x) or _float(y)):
        return None
    return _at_multiples(x, y, "trunc" if c.packet.startswith("fmod") else "floor")


def trunc_rounds_off(x: Tensor, y: Tensor, kernel: Tensor) -> tuple[Tensor, Tensor]:
    """(trunc of the real quotient x / y, where it differs from ``kernel``, ATen's trunc division) for float
    tensors, no grad. ATen's trunc division is trunc of the *rounded* x / y (its floor division floors the real
    one, from fmod): 1.0 / 0.1 rounds to 10.0, but float 0.1 is above 0.1 and the real quotient is 9.99...: 9.
    Floor's, plus 1 where the quotient is negative and no integer; a NaN quotient is never off."""
    real = torch.div(x, y, rounding_mode="floor")
    real = torch.where((torch.fmod(x, y) != 0) & ((x < 0) != (y < 0)), real + 1, real)
    return real, (real != kernel) & (real == real)


def _fmod_slope_off(c: OpCall) -> bool:
    """PyTorch's derivative of fmod(x, y) in y, -trunc(x / y) of the rounded quotient, is off where that differs
    from trunc of the real quotient (1.0 and float 0.1: -10, the slope is -9). Not a kink."""
    x, y = c.args[0], c.args[1]
    if not isinstance(y, Tensor) or not y.is_floating_point():
        return False
    x = torch.as_tensor(x, dtype=y.dtype, device=y.device) if not isinstance(x, Tensor) else x
    return bool(trunc_rounds_off(x, y, torch.div(x, y, rounding_mode="trunc"))[1].any())


KINKS[aten.fmod] = dataclasses.replace(KINKS[aten.fmod], formula_off=_fmod_slope_off)
