"""Where max-pooling ops tie (their windows' maxima are not unique) and PyTorch's convention there: max-pool,
adaptive and fractional max-pool, embedding_bag(mode='max'), added to ``_kinks.KINKS`` apart from the other
selections because each reads a window geometry of its own.

May import: torch, math, ``_kinks``.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch
import torch.nn.functional as F

from gradwise._ops._kinks import OpCall, Site, _float, _kink

aten = torch.ops.aten
Tensor = torch.Tensor


@_kink(aten.max_pool2d_with_indices, aten.max_pool3d_with_indices, needs_out=True,
       convention="all to the returned (first) index")
def _max_pool_window_tie(c):
    """max-pool windows whose maximum is not unique: all of the gradient goes to the returned (first) index.
    Counted exactly: for each position in the kernel, the strided view of the input the windows read there is
    compared with the maxima (one pass over the input in all when windows tile it; on CPU by subtraction, and 2x2
    windows that tile it by their second largest element)."""
    x, values = c.args[0].detach(), c.out[0]
    if not _float(x) or not values.numel():
        return None
    spatial, geometry = _pool_geometry(c)
    k = geometry[0]
    tiles = geometry[1] == k and not any(geometry[2]) and all(d == 1 for d in geometry[3])
    n = math.prod(k)
    # On CPU float arithmetic vectorises and a compare into bool does not (~5x slower)
    gap = _second_below_max_2x2(x, values) if x.device.type == "cpu" and tiles and k == [2, 2] else None
    top = math.nan if gap is None else gap.amax().item()
    if top == top:  # second largest - max is 0 exactly at a tie, < 0 elsewhere; NaN: the compares below
        return Site(functools.cache(lambda: gap.sign_().add_(1)), found=top == 0)
    if gap is None and x.device.type == "cpu" and math.isfinite(values.sum().item()):
        # Maxima that are all finite keep NaN out (max - x is finite or +inf, padding is -inf). x <= max, so
        # sign(max - x) is 0 where x ties the maximum and 1 elsewhere: fewer than n - 1 ones is a tie
        ones = None
        for at in _window_views(x, values.shape[-spatial:], *geometry, fill=-math.inf):
            d = torch.sub(values, at).sign_()
            ones = d if ones is None else ones.add_(d)
        found = ones.amin() < n - 1.5
        # the mask as 0./1. in place (a compare into bool costs ~5x): 1 where at most n - 2 are below max
        return Site(functools.cache(lambda: ones.neg_().add_(n - 1).clamp_(0, 1)), found=found)
    count = None
    wide = n > 255  # a byte count would wrap
    for at in _window_views(x, values.shape[-spatial:], *geometry, fill=math.nan):  # NaN padding equals nothing
        equal = at == values
        count = equal.to(torch.int32 if wide else torch.uint8) if count is None else count.add_(equal)
    if wide:
        return Site(count > 1)
    # count > 1 as two in-place byte ops (a compare makes a new tensor, 3x slower); a NaN window counts 0
    return Site(count.clamp_(1, 2).sub_(1).view(torch.bool))


def _pool_geometry(c: OpCall) -> tuple[int, list]:
    """max_pool{2,3}d_with_indices: the number of pooled dims and [kernel, stride, padding, dilation], per dim."""
    spatial = 3 if c.packet.startswith("max_pool3d") else 2
    geometry = [_per_dim(c.arg(i, name, default), spatial) for i, name, default in
                ((1, "kernel_size", None), (2, "stride", []), (3, "padding", [0]), (4, "dilation", [1]))]
    if not geometry[1]:
        geometry[1] = geometry[0]  # stride defaults to the kernel
    return spatial, geometry


def max_pool_windows(c: OpCall, t: Tensor, fill: float) -> list[Tensor]:
    """For each position in the kernel of the max-pool call ``c``, the view (shaped like its output) of ``t``
    (shaped like its input) that the windows read there, ``fill`` past the input."""
    spatial, geometry = _pool_geometry(c)
    return _window_views(t, c.out[0].shape[-spatial:], *geometry, fill=fill)


def _per_dim(v, spatial: int) -> list:
    v = [v] if isinstance(v, int) else list(v)
    return v * spatial if len(v) == 1 else v


def _window_views(x: Tensor, out_sizes, kernel, stride, padding, dilation, fill: float) -> list[Tensor]:
    """For each position in the kernel, the strided view (shaped like the pooled output) of the input the windows
    read there; the input is padded with ``fill`` where windows reach past it (padding, ceil_mode)."""
    spatial = len(out_sizes)
    pads = []
    for n, o, k, s, p, d in zip(x.shape[-spatial:], out_sizes, kernel, stride, padding, dilation, strict=True):
        pads.append((p, max(0, (o - 1) * s + (k - 1) * d + 1 - n - p)))
    if any(a or b for a, b in pads):
        x = F.pad(x, [v for pair in reversed(pads) for v in pair], value=fill)
    return [x[(..., *(slice(i * d, i * d + (o - 1) * s + 1, s)
                      for i, o, s, d in zip(offset, out_sizes, stride, dilation, strict=True)))]
            for offset in itertools.product(*(range(k) for k in kernel))]


def _second_below_max_2x2(x: Tensor, values: Tensor) -> Tensor | None:
    """For 2x2 windows that tile x (maxima ``values``): each window's second largest element minus its maximum (0
    exactly where the maximum is tied, < 0 or -inf elsewhere; NaN in a window holding NaN, two +inf or only -inf,
    where the caller counts by compares), or None for a dtype it does not take or ceil_mode's partial windows
    (any layout is taken). A window is two columns of a (top, bottom) pair: the row pairs' elementwise max and
    min read x in contiguous runs (where rows are contiguous), and only the half-size results are read two
    columns apart (a strided read does not vectorise). The second largest is
    the smaller column maximum or the larger column minimum, whichever is larger (the losing column's minimum
    lies below its maximum, so taking both minima changes nothing). Against counting the four positions by
    subtraction from the maxima duplicated pairwise: 1.5 ms instead of 1.9 per step of bench_trace.py's max-pool
    CNN (its two pools, inside the trace; memory-bound, so the whole step barely moves)."""
    rows, cols = 2 * values.shape[-2], 2 * values.shape[-1]
    if x.dtype not in (torch.float32, torch.float64) or x.shape[-2] < rows or x.shape[-1] < cols:
        return None  # (ceil_mode's partial windows: the general route pads them)
    top, bottom = x[..., 0:rows:2, :cols], x[..., 1:rows:2, :cols]
    high, low = torch.maximum(top, bottom), torch.minimum(top, bottom)
    second = torch.minimum(high[..., 0::2], high[..., 1::2])
    torch.maximum(second, torch.maximum(low[..., 0::2], low[..., 1::2]), out=second)
    return second.sub_(values)


@_kink(aten.adaptive_max_pool2d, aten.adaptive_max_pool3d, needs_out=True,
       convention="all to the returned (first) index")
def _adaptive_window_tie(c):
    """adaptive max-pool windows (along each spatial dim [floor(i L / O), ceil((i + 1) L / O)), as ATen's kernel
    takes them) whose maximum is not unique: all of the gradient goes to the returned (first) index. Exact: the
    windows are gathered dim by dim (a global max-pool, output size 1, is one window of the whole plane)."""
    x, values = c.args[0].detach(), c.out[0]
    spatial = 3 if c.packet.startswith("adaptive_max_pool3d") else 2
    if not _float(x) or not values.numel() or x.shape[-spatial:].numel() < 2:
        return None
    index, valid, at = [], None, [slice(None)] * (values.dim() - spatial)
    for d in range(spatial):  # broadcast to (O_0, K_0, O_1, K_1, ...): window o of dim d, padded to K_d
        idx, ok = _adaptive_windows(x.shape[d - spatial], values.shape[d - spatial], x.device)
        shape = [1] * (2 * spatial)
        shape[2 * d: 2 * d + 2] = idx.shape
        index.append(idx.view(shape))
        valid = ok.view(shape) if valid is None else valid & ok.view(shape)
        at += [slice(None), None]
    windows = x[(..., *index)]  # (..., O_0, K_0, O_1, K_1, ...)
    ties = ((windows == values[tuple(at)]) & valid).sum(tuple(range(-1, -2 * spatial, -2)))
    return Site(ties > 1)


def _adaptive_windows(n: int, o: int, device) -> tuple[Tensor, Tensor]:
    """Adaptive pooling's windows of a dim of length n into o: (o, k) start-relative indices clamped into range,
    and which of them are in the window."""
    start = torch.arange(o, device=device) * n // o
    end = -(-(torch.arange(o, device=device) + 1) * n // o)
    k = int((end - start).max())
    idx = start[:, None] + torch.arange(k, device=device)
    return idx.clamp_max(n - 1), idx < end[:, None]


@_kink(aten.fractional_max_pool2d, aten.fractional_max_pool3d, coarse=True,
       convention="all to the returned (first) index")
def _pool_plane_ties(c):
    """fractional max-pool (random windows): coarsely, two equal values anywhere in one plane (a superset of the
    windows whose maximum is tied)."""
    x = c.args[0]
    spatial = 3 if c.packet.endswith("3d") else 2
    if not _float(x) or x.dim() < spatial or x.shape[-spatial:].numel() < 2:
        return None
    return Site(x.flatten(-spatial).sort(-1).values.diff(dim=-1) == 0, aligned=False)


@_kink(aten._embedding_bag, aten._embedding_bag_forward_only, coarse=True,
       convention="all to the first of the tied rows")
def _bag_max_ties(c):
    """embedding_bag(mode='max'): coarsely, two selected rows with an equal value in a column."""
    weight, indices, mode = c.args[0], c.args[1], c.arg(4, "mode", 0)
    if mode != 2 or indices.numel() < 2 or not _float(weight):
        return None
    return Site(weight[indices.reshape(-1)].sort(0).values.diff(dim=0) == 0, aligned=False)
