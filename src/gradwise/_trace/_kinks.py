"""Kink detectors: one per op family, keyed by aten overload packet (``_KINKS``, ``kink_detector``), with
the records they return (``_Detector``, ``_Hit``) and their helpers.

May import: torch, gradwise._trace._common.
"""

from __future__ import annotations

import functools
import itertools
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from gradwise._trace._common import aten

# -- kink detectors: one per op family, keyed by aten overload packet ---------------------------------------


@dataclass(frozen=True)
class _Detector:
    fn: Callable
    needs_out: bool


@dataclass
class _Hit:
    kind: str  # "kink" or "singular"
    mask: torch.Tensor | Callable[[], torch.Tensor]  # where the op is on its kink: bool or 0/1 (callable: on demand)
    convention: str
    aligned: bool = True  # mask has the output's shape (so the incoming sensitivity can be read there)
    found: torch.Tensor | bool | None = None  # may the mask hold a True? (a 0-dim flag, or decided; None: read it)


def _zeros_of(c, kind: str, convention: str) -> _Hit:
    """Where the op's input is exactly 0; the mask is made only when a 0 is there (a compare into bool over
    every element costs ~3x a reduction on CPU). In-place ops compare now, before x is overwritten."""
    x = c.args[0].detach()
    if c.packet.endswith("_") or x.numel() == 0:
        return _Hit(kind, x == 0, convention)
    if x.device.type == "cpu" and x.is_contiguous() and x.is_floating_point():
        least = _least_magnitude(x).item()
        return _Hit(kind, lambda: x == 0, convention, found=least == 0 or least != least)  # NaN can hide a 0
    return _Hit(kind, lambda: x == 0, convention, found=torch.count_nonzero(x) < x.numel())


_SCRATCH = threading.local()
_SCRATCH_SIZE = 1 << 20  # elements


def _least_magnitude(x: torch.Tensor) -> torch.Tensor:
    """min |x| (NaN if x holds one) of a contiguous CPU tensor, through a reused per-thread buffer of at most
    2**20 elements: a temporary as large as x would cost fresh pages on every call (the allocator hands large
    blocks back to the OS), and counting nonzeros instead is ~2x slower."""
    flat = x.view(-1)
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.dtype != x.dtype or buf.numel() < min(flat.numel(), _SCRATCH_SIZE):
        buf = _SCRATCH.buf = torch.empty(min(flat.numel(), _SCRATCH_SIZE), dtype=x.dtype)
    least = [torch.abs(chunk, out=buf[: chunk.numel()]).amin() for chunk in flat.split(_SCRATCH_SIZE)]
    return least[0] if len(least) == 1 else torch.stack(least).amin()


_KINKS: dict = {}


def _kink(*ops, needs_out: bool = False):
    """Register a detector. Detectors that need no output run before the op, so in-place variants work."""

    def register(fn):
        for op in ops:
            _KINKS[op] = _Detector(fn, needs_out)
        return fn

    return register


@dataclass
class _Call:
    """One forward op call as a detector sees it."""

    args: tuple
    kwargs: dict
    out: object
    ties: WeakTensorKeyDictionary
    packet: str

    def arg(self, i: int, name: str, default=None):
        return self.args[i] if len(self.args) > i else self.kwargs.get(name, default)


@_kink(aten.relu, aten.relu_)
def _relu_at_zero(c):
    """relu at 0: PyTorch's backward uses 0 there (x > 0 counts as the active side)."""
    return _zeros_of(c, "kink", "relu'(0) = 0")


@_kink(aten.abs, aten.abs_)
def _abs_at_zero(c):
    """abs at 0: the backward uses sign(0) = 0."""
    return _zeros_of(c, "kink", "abs'(0) = 0")


@_kink(aten.leaky_relu, aten.leaky_relu_, aten._prelu_kernel)
def _leaky_relu_at_zero(c):
    """leaky_relu / prelu at 0: the backward uses the negative slope (x > 0 counts as positive)."""
    return _zeros_of(c, "kink", "the negative slope at 0")


@_kink(aten.clamp, aten.clamp_, aten.clamp_min, aten.clamp_min_, aten.clamp_max, aten.clamp_max_)
def _clamp_at_bound(c):
    """clamp at a bound: in torch 2.13 the backward passes the gradient (1) at a scalar bound; this changes
    between releases (0 in 2.14), which is why it is worth knowing."""
    x = c.args[0]
    if c.packet.startswith("clamp_min"):
        bounds = [c.args[1]]
    elif c.packet.startswith("clamp_max"):
        bounds = [c.args[1]]
    else:
        bounds = [c.arg(1, "min"), c.arg(2, "max")]
    mask = torch.zeros((), dtype=torch.bool)
    for b in bounds:
        if b is not None:
            mask = mask | (x == b)
    mask = torch.broadcast_to(mask, x.shape)
    return _Hit("kink", mask, "gradient 1 at the bound (torch 2.13; 0 in 2.14)")


@_kink(aten.hardtanh, aten.hardtanh_)
def _hardtanh_at_bound(c):
    """hardtanh at min_val / max_val: the backward uses 0 there (strictly inside counts as active)."""
    x = c.args[0]
    return _Hit("kink", (x == c.arg(1, "min_val", -1.0)) | (x == c.arg(2, "max_val", 1.0)), "0 at the bounds")


@_kink(aten.threshold, aten.threshold_)
def _threshold_at_threshold(c):
    """threshold at its threshold: the backward uses 0 there (x <= threshold counts as below)."""
    return _Hit("kink", c.args[0] == c.args[1], "0 at the threshold")


@_kink(aten.hardshrink, aten.softshrink)
def _shrink_at_lambda(c):
    """hard/softshrink at ±lambda: the backward uses 0 there."""
    return _Hit("kink", c.args[0].abs() == c.arg(1, "lambd", 0.5), "0 at ±lambda")


@_kink(aten.hardsigmoid, aten.hardsigmoid_, aten.hardswish, aten.hardswish_)
def _hard_activation_at_3(c):
    """hardsigmoid / hardswish at ±3: the backward uses one side's slope (0 for hardsigmoid, x/3 + 1/2 for
    hardswish)."""
    return _Hit("kink", c.args[0].abs() == 3, "one side's slope at ±3")


@_kink(aten.maximum, aten.minimum)
def _max_min_tie(c):
    """maximum/minimum with equal arguments: the backward splits the gradient 1/2, 1/2."""
    a, b = c.args[0], c.args[1]
    return _Hit("kink", torch.broadcast_to(a == b, torch.broadcast_shapes(a.shape, b.shape)), "1/2 to each argument")


@_kink(aten.fmax, aten.fmin)
def _fmax_fmin_tie(c):
    """fmax/fmin with equal arguments: the backward gives all of the gradient to the first argument."""
    a, b = c.args[0], c.args[1]
    return _Hit("kink", torch.broadcast_to(a == b, torch.broadcast_shapes(a.shape, b.shape)),
                "all to the first argument")


def _reduction_ties(x, value, dim, keepdim):
    """Elements equal to their slice's selected value, in slices where more than one is (dim None: all)."""
    if dim is None or (not isinstance(dim, int) and not list(dim)):
        eq = x == value
        return eq & (eq.sum() > 1)
    dims = [dim] if isinstance(dim, int) else list(dim)
    if not keepdim:
        for d in sorted(d % x.dim() for d in dims):
            value = value.unsqueeze(d)
    eq = x == value
    return eq & (eq.sum(dims, keepdim=True) > 1)


@_kink(aten.max, aten.min, aten.amax, aten.amin, needs_out=True)
def _reduction_tie(c):
    """max/min/amax/amin with tied maxima: max(dim)/min(dim) give all of the gradient to the returned index;
    max()/amax and their min versions split it evenly among the tied elements."""
    x, out = c.args[0], c.out
    if isinstance(out, torch.Tensor):
        if len(c.args) > 1 and isinstance(c.args[1], torch.Tensor):
            return None  # binary max(x, y): see maximum
        return _Hit("kink", _reduction_ties(x, out, c.arg(1, "dim", None), c.arg(2, "keepdim", False)),
                    "split evenly among ties", aligned=False)
    return _Hit("kink", _reduction_ties(x, out[0], c.args[1], c.arg(2, "keepdim", False)),
                "all to the returned (first) index", aligned=False)


@_kink(aten.median, aten.nanmedian, aten.kthvalue, aten.mode, needs_out=True)
def _order_statistic_tie(c):
    """median/kthvalue/mode with ties at the selected value: all to the returned index (median() with no dim
    splits evenly)."""
    x, out = c.args[0], c.out
    if isinstance(out, torch.Tensor):
        return _Hit("kink", _reduction_ties(x, out, None, False), "split evenly among ties", aligned=False)
    i = 2 if c.packet == "kthvalue" else 1
    return _Hit("kink", _reduction_ties(x, out[0], c.arg(i, "dim", -1), c.arg(i + 1, "keepdim", False)),
                "all to the returned index", aligned=False)


@_kink(aten.sort, needs_out=True)
def _sort_tie(c):
    """sort with equal values: the gradient follows the positions sort returned (ties keep their order). The
    tied elements are reported where they sit in the input."""
    values, perm = c.out[0], c.out[1]
    dim = c.arg(1, "dim", -1)
    if isinstance(dim, bool):  # sort.stable(x, *, stable, dim)
        dim = c.kwargs.get("dim", -1)
    if values.dim() == 0 or values.shape[dim] < 2:
        return None
    n = values.shape[dim] - 1
    tie = (values.narrow(dim, 0, n) == values.narrow(dim, 1, n)).to(torch.uint8)
    return _Hit("kink", _in_input(values, dim, [(perm.narrow(dim, 0, n), tie), (perm.narrow(dim, 1, n), tie)]),
                "follows the returned positions", aligned=False)


def _in_input(like: torch.Tensor, dim: int, marks: list) -> torch.Tensor:
    """A bool mask shaped like the input: True at the input positions ``index`` where ``mark`` is set."""
    out = torch.zeros(like.shape, dtype=torch.uint8, device=like.device)
    for index, mark in marks:
        out.scatter_add_(dim, index, mark)
    return out > 0


@_kink(aten.topk, needs_out=True)
def _topk_tie(c):
    """topk with ties among, or at the edge of, the selected values: all to the returned indices. The tied
    elements are reported where they sit in the input."""
    x, values, idx = c.args[0], c.out[0], c.out[1]
    dim = c.arg(2, "dim", -1)
    if values.numel() == 0 or values.dim() == 0:
        return None
    k = values.shape[dim]
    last = values.narrow(dim, k - 1, 1)
    edge = (x == last).sum(dim, keepdim=True) > (values == last).sum(dim, keepdim=True)
    mask = (x == last) & edge  # every element equal to the last value kept, when not all of them are kept
    if k > 1:
        inner = (values.narrow(dim, 0, k - 1) == values.narrow(dim, 1, k - 1)).to(torch.uint8)
        mask = mask | _in_input(x, dim, [(idx.narrow(dim, 0, k - 1), inner), (idx.narrow(dim, 1, k - 1), inner)])
    return _Hit("kink", mask, "all to the returned indices", aligned=False)


def _tiling_kernel(x: torch.Tensor, spatial: int, kernel, stride, padding, dilation, ceil_mode) -> list | None:
    """The kernel size when max-pool windows tile ``x`` (stride == kernel, no padding, no dilation, no partial
    window), else None."""
    k = list(kernel) * spatial if len(kernel) == 1 else list(kernel)
    s = (list(stride) * spatial if len(stride) == 1 else list(stride)) if stride else k
    if s != k or any(padding) or any(d != 1 for d in dilation):
        return None
    if ceil_mode and any(n % kk for n, kk in zip(x.shape[-spatial:], k, strict=True)):
        return None
    return k


def _below_max_2x2(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor | None:
    """For 2x2 windows: how many of each window's 4 elements lie below its maximum, or None where the layout
    does not allow this route. Each row of a window is read as one (left, right) pair, so the four strided
    reads (2-element stride: not vectorised) become two contiguous subtractions, ~1.5x faster. The maxima are
    duplicated pairwise by viewing a complex tensor as real (complex arithmetic itself would mix in 0 x inf)."""
    if x.dtype not in (torch.float32, torch.float64) or not x.is_contiguous() or x.shape[-1] % 2:
        return None
    pairs = x.view(*x.shape[:-1], x.shape[-1] // 2, 2)
    both = torch.view_as_real(torch.complex(values, values))
    rows = 2 * values.shape[-2]
    e = torch.sub(both, pairs[..., 0:rows:2, :, :]).sign_()
    e.add_(torch.sub(both, pairs[..., 1:rows:2, :, :]).sign_())
    return e[..., 0] + e[..., 1]


@_kink(aten.max_pool2d_with_indices, aten.max_pool3d_with_indices, needs_out=True)
def _max_pool_window_tie(c):
    """max-pool windows whose maximum is not unique: all of the gradient goes to the returned (first) index.
    Windows that tile the input are counted exactly: for each position in the kernel, the strided view of the
    input at that position is compared with the maxima (one pass over the input in all; on CPU by subtraction).
    Overlapping windows: hide each window's returned maximum and pool again; a window that still reaches its
    value has a tie (a tie with a neighbour's maximum can hide another: a rare undercount)."""
    x, (values, indices) = c.args[0].detach(), c.out
    spatial = 3 if c.packet == "max_pool3d_with_indices" else 2
    k = _tiling_kernel(x, spatial, c.arg(1, "kernel_size"), c.arg(2, "stride", []), c.arg(3, "padding", [0]),
                       c.arg(4, "dilation", [1]), c.arg(5, "ceil_mode", False))
    if not values.numel():
        return None
    if k is not None:
        out_sizes = values.shape[-spatial:]
        views = [x[(..., *(slice(o, o + n * kk, kk) for o, n, kk in zip(offset, out_sizes, k, strict=True)))]
                 for offset in itertools.product(*(range(kk) for kk in k))]
        if x.device.type == "cpu" and math.isfinite(values.sum().item()):
            # On CPU float arithmetic vectorises and a compare into bool does not (~5x slower). x <= max, so
            # sign(max - x) is 0 where x ties the maximum and 1 elsewhere: fewer than len - 1 ones is a tie.
            # Maxima that are all finite keep NaN out (max - x is finite or +inf); else the compares below.
            ones = _below_max_2x2(x, values) if k == [2, 2] else None
            if ones is None:
                for at in views:
                    d = torch.sub(values, at).sign_()
                    ones = d if ones is None else ones.add_(d)
            found = ones.amin() < len(views) - 1.5
            # the mask as 0./1. in place (a compare into bool costs ~5x): 1 where at most len - 2 are below max
            mask = functools.cache(lambda: ones.neg_().add_(len(views) - 1).clamp_(0, 1))
            return _Hit("kink", mask, "all to the returned (first) index", found=found)
        count = None
        wide = len(views) > 255  # a byte count would wrap
        for at in views:
            equal = at == values
            count = equal.to(torch.int32 if wide else torch.uint8) if count is None else count.add_(equal)
        if wide:
            return _Hit("kink", count > 1, "all to the returned (first) index")
        # count > 1 as two in-place byte ops (a compare makes a new tensor, 3x slower); a NaN window counts 0
        return _Hit("kink", count.clamp_(1, 2).sub_(1).view(torch.bool), "all to the returned (first) index")
    hidden = x.flatten(-spatial).clone()
    hidden.scatter_(-1, indices.flatten(-spatial), float("-inf"))
    again, _ = getattr(aten, c.packet)(hidden.view_as(x), *c.args[1:], **c.kwargs)
    return _Hit("kink", again == values, "all to the returned (first) index")


@_kink(aten.where, needs_out=True)
def _where_on_tie(c):
    """where(a > b, ...) with a == b somewhere: the comparison picks one branch at the tie (False for > and <,
    so all of the gradient goes to the second branch; True for >= and <=)."""
    tie = c.ties.get(c.args[0]) if isinstance(c.args[0], torch.Tensor) else None
    if tie is None:
        return None
    mask, picks = tie
    return _Hit("kink", torch.broadcast_to(mask, c.out.shape), f"all to the {picks} branch at a tie")


@_kink(aten.sqrt, aten.rsqrt)
def _sqrt_at_zero(c):
    """sqrt at 0: an infinite derivative; the backward divides by 2 sqrt(0) (Inf, NaN under a zero sensitivity)."""
    return _zeros_of(c, "singular", "Inf (1 / (2 sqrt(0)))")


@_kink(aten.pow)
def _fractional_power_at_zero(c):
    """x ** p with 0 < p < 1 at x = 0: an infinite derivative (Inf from the backward)."""
    if not isinstance(c.args[0], torch.Tensor) or len(c.args) < 2 or isinstance(c.args[1], torch.Tensor):
        return None
    p = c.args[1]
    if not 0 < p < 1:
        return None
    return _Hit("singular", c.args[0] == 0, f"Inf (p x^(p-1) at 0, p = {p})")


@_kink(aten.linalg_vector_norm, needs_out=True)
def _norm_at_zero(c):
    """a vector norm of an all-zero slice: not differentiable there; PyTorch's backward uses 0."""
    x, zero = c.args[0], c.out == 0
    dim, keepdim = c.arg(2, "dim", None), c.arg(3, "keepdim", False)
    if dim is not None and not keepdim:
        for d in sorted(d % x.dim() for d in ([dim] if isinstance(dim, int) else dim)):
            zero = zero.unsqueeze(d)
    return _Hit("singular", torch.broadcast_to(zero, x.shape), "0 at 0", aligned=False)


@_kink(aten.asin, aten.acos)
def _arcsin_at_one(c):
    """asin/acos at ±1: an infinite derivative (Inf from the backward)."""
    return _Hit("singular", c.args[0].abs() == 1, "Inf (1 / sqrt(1 - x^2) at ±1)")


def kink_detector(func) -> _Detector | None:
    """The kink detector for an aten op (an OpOverload or its packet), or None for an op without kinks."""
    return _KINKS.get(getattr(func, "overloadpacket", func))
