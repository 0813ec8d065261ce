"""Kink rule for bilinear ``grid_sample`` (2-D): piecewise bilinear in the sample point, with kinks on the pixel
lines (and at the clipped edges with border padding). PyTorch's kernel has no forward-mode derivative, so f with
grid_sample of a grid that depends on its inputs was refused everywhere.

May import: torch, ``_rules``, ``_rules_pointwise``.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from gradwise._nonsmooth._errors import NonsmoothError
from gradwise._nonsmooth._records import _user_line
from gradwise._nonsmooth._rules import _split, kink_rule
from gradwise._nonsmooth._rules_pointwise import _clamp, _step

aten = torch.ops.aten
Tensor = torch.Tensor

_MODES = {0: "bilinear", 1: "nearest", 2: "bicubic"}
_PADDINGS = {0: "zeros", 1: "border", 2: "reflection"}


def _unnormalised(run, g: Tensor, size: int, padding: str, align: bool, moving: bool) -> Tensor:
    """The sample coordinate in pixels, as the kernel computes it; border padding clips it to [0, size - 1] (the
    clamp rule where the grid moves: at an edge, inside if the direction moves it there)."""
    x = (g + 1) / 2 * (size - 1) if align else ((g + 1) * size - 1) / 2
    if padding == "border":
        clipped = x.clamp(0.0, float(size - 1))
        x = _clamp(run, x, 0.0, float(size - 1), lambda: clipped) if moving else clipped
    return x


def _bilinear(run, image: Tensor, grid: Tensor, padding: str, align: bool, moving: bool) -> Tensor:
    """grid_sample(bilinear) written with ops that have rules: where the grid moves, floor takes its one-sided
    limit on a pixel line, so the cell the direction enters gives the weights (a fixed grid: PyTorch's cell, no
    kink); zeros padding: corners outside the image count 0."""
    n, h, w = image.shape[0], image.shape[-2], image.shape[-1]
    ix = _unnormalised(run, grid[..., 0], w, padding, align, moving)
    iy = _unnormalised(run, grid[..., 1], h, padding, align, moving)
    floor = _step("floor") if moving else (lambda run, fn, x: torch.floor(x))
    x0, y0 = floor(run, torch.floor, ix), floor(run, torch.floor, iy)
    wx, wy = ix - x0, iy - y0
    x0, y0 = _split(x0)[0].detach().long(), _split(y0)[0].detach().long()
    batch = torch.arange(n, device=image.device).view(n, *[1] * (grid.dim() - 2))
    out = None
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
        xi, yi = x0 + dx, y0 + dy
        inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        corner = image[batch, :, yi.clamp(0, h - 1), xi.clamp(0, w - 1)]  # (n, h_out, w_out, c)
        weight = (wx if dx else 1 - wx) * (wy if dy else 1 - wy) * inside
        term = corner * weight.unsqueeze(-1)
        out = term if out is None else out + term
    return out.movedim(-1, 1).contiguous()  # the kernel's layout: a sum over it then rounds as over the kernel's


@kink_rule(aten.grid_sampler_2d, F.grid_sample)
def grid_sample(run, func, input, grid, mode="bilinear", padding_mode="zeros", align_corners=None):
    """Bilinear sampling of a 4-D image at grid points: linear in the image, piecewise bilinear in the grid. Off
    the pixel lines the value and backward are PyTorch's kernel's and the tangent is forward mode through the same
    sampling written with the floor and clamp rules; on a pixel line (an identity grid, a zero displacement field)
    or a clipped border every pass runs that sampling, whose floor takes the cell the direction enters: the exact
    one-sided derivative, and each piece's gradient for the subdifferential. Nearest and bicubic modes, reflection
    padding and 5-D inputs have no rule where the grid moves (a clear error, as before)."""
    aten_form = isinstance(mode, int)
    mode_name = _MODES.get(mode, mode) if aten_form else mode
    padding = _PADDINGS.get(padding_mode, padding_mode) if aten_form else padding_mode
    align = bool(align_corners)
    primals = _split(input)[0], _split(grid)[0]
    value = func(*primals, mode, padding_mode, align_corners)
    (_, image_tangent), (_, grid_tangent) = _split(input), _split(grid)
    moving = grid_tangent is not None or primals[1].requires_grad
    kinked = _on_a_kink(*primals, padding, align)
    if not kinked:  # PyTorch's value and backward; the tangent of the same sampling
        if image_tangent is None and grid_tangent is None:
            return value
        if grid_tangent is None:  # linear in the image
            return fwAD.make_dual(value, func(image_tangent, primals[1], mode, padding_mode, align_corners))
    if mode_name != "bilinear" or padding not in ("zeros", "border") or primals[0].dim() != 4:
        if grid_tangent is None:  # PyTorch's own (and its graph); linear in the image
            return value if image_tangent is None else fwAD.make_dual(
                value, func(image_tangent, primals[1], mode, padding_mode, align_corners))
        raise NonsmoothError(f"grid_sample with mode={mode_name!r}, padding_mode={padding!r} on a "
                             f"{primals[0].dim()}-D input (called at {_user_line()}) has no kink rule and no "
                             "forward-mode derivative in PyTorch: gradwise cannot follow a direction through it. "
                             "Bilinear sampling of 4-D inputs with zeros or border padding has one")
    if kinked:
        # every pass samples the same way here (the plain one too, so f's value is one function): the cell each
        # tie's choice gives, its tangent, and its graph for a piece's gradient; a NaN/Inf sample point keeps
        # the kernel's value
        out = _bilinear(run, input, grid, padding, align, moving)
        # with the kernel's value (its bits: f's value where nothing moves, which the jump check compares with
        # exactly; the sampling rounds its four terms otherwise), the sampling's tangent and graph: x - (+0)
        # keeps a -0.0
        out = value.detach() - (_split(out)[0].detach() - out)
        finite = primals[1].isfinite().all(-1).unsqueeze(1)
        return out if bool(finite.all()) else torch.where(finite, out, value)
    with torch.no_grad():
        tangent = _split(_bilinear(run, input, grid, padding, align, moving))[1]
    return value if tangent is None else fwAD.make_dual(value, tangent.to(value.dtype))


def _on_a_kink(image: Tensor, grid: Tensor, padding: str, align: bool) -> bool:
    """Whether a sample point sits on a pixel line or a clipped edge (then the cell is a choice)."""
    if image.dim() != 4 or not grid.is_floating_point():
        return image.dim() != 4  # (other ranks: refused where they need a rule)
    with torch.no_grad():
        for i, size in enumerate((image.shape[-1], image.shape[-2])):
            g = grid[..., i]
            x = (g + 1) / 2 * (size - 1) if align else ((g + 1) * size - 1) / 2
            if bool(((x == x.floor()) & x.isfinite()).any()):
                return True
    return False
