"""``JVP_RULES``: forward-mode rules for smooth ops whose PyTorch forward-AD formula is slow (convolution, linear;
add/sub/mul/div with one dual and one plain operand, routed by callable only).

May import: torch, ``_lazy``, ``_rules``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from gradwise._nonsmooth import _lazy
from gradwise._nonsmooth._rules import _is_dual, _registrar, _split

aten = torch.ops.aten
Tensor = torch.Tensor


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
    if xt is None and wt is None and bt is None:
        return out
    whole, wp = xp.detach(), wp.detach()

    def tangent(xp, xt):  # (of a sub-batch of x too, for a lazy tangent)
        tangent = func(xp, wt, bt, *rest, **kwargs) if wt is not None else None  # W' and b' in one call
        if xt is not None:
            tangent = func(xt, wp, None, *rest, **kwargs) if tangent is None else tangent.add_(
                func(xt, wp, None, *rest, **kwargs))
        if bt is not None and wt is None:
            b = bt.reshape(-1, *[1] * (out.dim() - channel_dim - 1))
            shape = out.shape if xp is whole else (xp.shape[0], *out.shape[1:])
            tangent = b.expand(shape).clone() if tangent is None else tangent.add_(b)
        return tangent

    if func is F.conv2d and _lazy.active():  # read only where kink rules rank ties: computed for their images
        lazy = _lazy.conv2d_tangent(out, whole, xt, tangent, (wp, wt, bt))
        if lazy is not None:
            return fwAD.make_dual(out, lazy)
    with torch.no_grad():  # tangents need no graph of their own
        t = tangent(whole, xt)
    return fwAD.make_dual(out, t)  # (outside no_grad: the dual is a view of out, in out's graph)


@jvp_rule(aten.convolution, F.conv1d, F.conv2d, F.conv3d)
def convolution(func, input, weight, bias=None, *rest, **kwargs):
    """conv(x, W, b)' = conv(x', W) + conv(x, W') + b' (two convolutions, the least forward mode can do)."""
    return _bilinear_jvp(func, input, weight, bias, rest, kwargs, input.dim() - weight.dim() + 1)


@jvp_rule(aten.linear, F.linear)
def linear(func, input, weight, bias=None):
    """linear(x, W, b)' = linear(x', W) + linear(x, W') + b'."""
    return _bilinear_jvp(func, input, weight, bias, (), {}, input.dim() - 1)


@jvp_rule(aten._weight_norm, torch._weight_norm)
def weight_norm(func, v, g, dim=0):
    """w = v g / |v| (|v| the norm over every dim but ``dim``; over all for dim = -1), weight normalisation: PyTorch
    has no forward-mode formula for it (gradwise refused weight_norm layers). The value is PyTorch's kernel's; the
    tangent w' = (v' g + v g') / |v| - v g <v, v'> / |v|^3, with <v, v'> summed like the norm."""
    (vp, vt), (gp, gt) = _split(v), _split(g)
    out = func(vp, gp, dim)
    if vt is None and gt is None:
        return out
    with torch.no_grad():
        vp, gp = vp.detach(), gp.detach()
        n = torch.norm_except_dim(vp, 2, dim)
        tangent = vp * (gt / n) if gt is not None else None
        if vt is not None:
            kept = -1 if dim == -1 else dim % vp.dim()
            dims = [d for d in range(vp.dim()) if d != kept]
            dn = (vp * vt).sum(dims, keepdim=True) / n if dims else vp * vt / n
            part = vt * (gp / n) - vp * gp * dn / (n * n)
            tangent = part if tangent is None else tangent.add_(part)
    return fwAD.make_dual(out, tangent)


# --- one dual operand, one plain -------------------------------------------------------------------------------
# PyTorch 2.13 gives an operand without a tangent an efficient zero tensor whose arithmetic runs through Python
# references: y * c with y dual and c plain costs ~0.2 ms at any size (y * y: 2 us). With one dual operand the
# tangent of these ops is one elementwise op on plain tensors; the value is the op itself on y's primal.


def _plain_operand(c, like: Tensor) -> bool:
    if isinstance(c, Tensor):
        return not _is_dual(c) and c.dtype == like.dtype and c.device == like.device
    return isinstance(c, (int, float)) and not isinstance(c, bool)


def _mixed(kind: str, reflected: bool = False):
    """The rule for one binary op (``kind``: add, sub, mul, div; ``reflected``: Tensor.__rsub__ and kin, whose
    self is the right operand). A rounding mode is NotImplemented (its calls have a kink rule, `_rules_pointwise`);
    anything else (both dual, promotions) is PyTorch's own call."""

    def rule(func, *args, **kwargs):
        if kwargs.get("rounding_mode") is not None:  # (routed to the division rule first: never here)
            return NotImplemented
        alpha = kwargs.get("alpha", 1)
        if len(args) != 2 or set(kwargs) - {"alpha"} or (kind in ("mul", "div") and kwargs):
            return func(*args, **kwargs)
        a, b = args
        d, c = (a, b) if _is_dual(a) else (b, a)
        first = (d is a) != reflected  # the dual is the left operand of the arithmetic (reflected: c - self)
        p, t = _split(d)
        if not p.is_floating_point() or not _plain_operand(c, p) or isinstance(alpha, bool) \
                or not isinstance(alpha, (int, float)):
            return func(*args, **kwargs)
        out = func(p, b, **kwargs) if d is a else func(a, p, **kwargs)
        with torch.no_grad():
            cv = c.detach() if isinstance(c, Tensor) else c
            if kind in ("add", "sub"):  # alpha scales the right operand
                tangent = t if first or alpha == 1 else t * alpha
                tangent = -tangent if kind == "sub" and not first else tangent
            elif kind == "mul":
                tangent = t * cv
            else:  # div: (y / c)' = y' / c; (c / y)' = -(y' * (c / y)) / y
                tangent = t / cv if first else -(t * out.detach()) / p.detach()
            tangent = tangent.to(out.dtype)
            if tangent.shape != out.shape:
                tangent = tangent.expand(out.shape).clone()
        return fwAD.make_dual(out, tangent)

    rule.__name__ = f"{'r' if reflected else ''}{kind}"
    return rule


for _kind, _calls, _reflected in (
        ("add", (torch.add, Tensor.add, Tensor.__add__, Tensor.__radd__), ()),
        ("sub", (torch.sub, torch.subtract, Tensor.sub, Tensor.__sub__), (Tensor.__rsub__,)),
        ("mul", (torch.mul, torch.multiply, Tensor.mul, Tensor.__mul__, Tensor.__rmul__), ()),
        ("div", (torch.div, torch.true_divide, Tensor.div, Tensor.__truediv__), (Tensor.__rtruediv__,))):
    for _call in _calls:
        _JVP_ROUTES[_call] = _mixed(_kind)
    for _call in _reflected:
        _JVP_ROUTES[_call] = _mixed(_kind, reflected=True)


@jvp_rule(aten.scaled_dot_product_attention, F.scaled_dot_product_attention)
def scaled_dot_product_attention(func, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *,
                                 scale=None, enable_gqa=False):
    """softmax(q k^T scale + mask) v, smooth in q, k, v: PyTorch's fused kernels (the CPU flash one) have no
    forward-mode formula (gradwise refused any f with attention). The value is PyTorch's kernel's; the tangent is
    forward mode through the math form of the same function. With dropout, PyTorch's own call (whose dropout
    mask the math form would not draw alike)."""
    gqa = {"enable_gqa": True} if enable_gqa else {}  # (a keyword older PyTorch does not know)
    if dropout_p:
        return func(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **gqa)
    primals = [_split(t)[0] for t in (query, key, value)]
    mask = attn_mask  # (its tangent too: an ALiBi slope, a learned bias)
    out = func(*primals, _split(mask)[0] if isinstance(mask, Tensor) else mask, 0.0, is_causal, scale=scale, **gqa)
    if isinstance(mask, Tensor) and mask.dtype == torch.bool:  # as the public op does before its kernels
        mask = torch.zeros(mask.shape, dtype=primals[0].dtype, device=mask.device).masked_fill_(~mask, -math.inf)
    with torch.no_grad():
        attn = aten._scaled_dot_product_attention_math.default(query, key, value, mask, 0.0, is_causal,
                                                               scale=scale, **gqa)[0]
    tangent = _split(attn)[1]
    return out if tangent is None else fwAD.make_dual(out, tangent)
