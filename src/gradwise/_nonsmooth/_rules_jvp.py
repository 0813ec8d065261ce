"""``JVP_RULES``: forward-mode rules for smooth ops whose PyTorch forward-AD formula is slow (convolution, linear).

May import: torch, ``_rules``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from gradwise._nonsmooth._rules import _registrar, _split

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
