"""Reductions of bool masks, read as bytes; the finiteness test by sums (``all_finite``).

PyTorch's bool ``any``/``all`` are generic, unvectorised reductions on CPU, about 20x slower than a uint8
max/min; strong zeros reduce supports on every backward op, trace reduces every kink flag, and the nonsmooth
pass every tie mask. Broadcast (expanded) dims repeat one slice, so only that slice is read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def one_slice(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` with each broadcast (stride-0) dim of size 1: the one slice it repeats (a view)."""
    stride = mask.stride()
    if 0 in stride:  # the view mask[..., 0:1, ...] along each broadcast dim, made directly (indexing costs ~3x more)
        shape = [min(n, 1) if st == 0 else n for n, st in zip(mask.shape, stride, strict=True)]
        return mask.as_strided(shape, stride, mask.storage_offset())
    return mask


def inexact(t: torch.Tensor) -> bool:
    """Floating-point or complex: a tensor that can hold NaN/Inf."""
    return t.is_floating_point() or t.is_complex()


def mask_any(mask: torch.Tensor, dim: int | Sequence[int] | None = None, keepdim: bool = False) -> torch.Tensor:
    """``mask.any()`` / ``mask.any(dim, keepdim)`` as a bool tensor."""
    if mask.numel() == 0:
        return mask.any() if dim is None else mask.any(dim, keepdim=keepdim)
    if dim is None:
        return one_slice(mask).view(torch.uint8).amax().bool()
    return mask.view(torch.uint8).amax(dim, keepdim=keepdim).bool()


def mask_all(mask: torch.Tensor) -> bool:
    """``bool(mask.all())``."""
    return mask.numel() == 0 or bool(one_slice(mask).view(torch.uint8).amin())


_SMALL = 1 << 12  # elements: below this a tensor's copy costs less than a reduction of its own
_FEW = 4  # up to this many small tensors are reduced one by one: their copy into one would cost more


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every entry of every tensor is finite, by sums: a sum is finite iff no NaN/Inf went in (or, rarely,
    it overflowed: then False, and the caller's exact test decides). On CPU each sum is read at once (stacking
    them costs more than it saves); elsewhere one host sync for all. Many small tensors (biases, norm
    statistics) go through one reduction per dtype/device. Strong zeros check saved tensors with it before every
    backward; the nonsmooth entry points their inputs, the trace and watch the gradients."""
    if not tensors:
        return True
    grad_mode = torch.is_grad_enabled()
    torch._C._set_grad_enabled(False)  # as torch.no_grad(), without its Python context manager (runs per backward)
    try:
        # (up to _FEW tensors are summed one by one; _sums reads a complex one, or a group of them, as real)
        small = [t for t in tensors if t.numel() <= _SMALL and t.layout == torch.strided] if len(tensors) > _FEW \
            else ()
        if len(small) > _FEW:
            # the large ones first: on CPU a NaN there (a batch's padding) answers before the small ones are copied
            sums = _sums([t for t in tensors if t.numel() > _SMALL or t.layout != torch.strided])
            if sums is None:
                return False
            groups: dict[tuple, list[torch.Tensor]] = {}
            for t in small:
                groups.setdefault((t.dtype, t.device), []).append(t.reshape(-1))
            more = _sums([ts[0] if len(ts) == 1 else torch.cat(ts) for ts in groups.values()])
            if more is None:
                return False
            sums += more
        else:
            sums = _sums(tensors)
            if sums is None:
                return False
        return not sums or bool(torch.stack(sums).isfinite().all())
    finally:
        torch._C._set_grad_enabled(grad_mode)


def _real(t: torch.Tensor) -> torch.Tensor:
    """A complex tensor as its real and imaginary parts (finite iff both are); a lazily conjugated one is resolved
    first (view_as_real refuses it)."""
    return torch.view_as_real(t.resolve_conj())


def _sums(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
    """``all_finite``'s sums: None as soon as a CPU one is not finite; else the sums off the CPU, to test at once."""
    sums = []
    for t in tensors:
        if t.is_complex():
            t = _real(t)
        elif t.numel() == 1 and t.is_cpu and t.layout == torch.strided:
            # a one-element tensor (a loss's seed, a saved scalar) is its value: read as it is, exactly (a sum in
            # float32 takes a float64 above 3.4e38 for Inf), without a reduction's dispatch (~2 us of a block's
            # backward, where the engine's seed is checked)
            if not math.isfinite(t.item()):
                return None
            continue
        total = t.sum(dtype=torch.float32) if t.dtype != torch.float32 else t.sum()
        if total.is_cpu:
            if not math.isfinite(total.item()):
                return None
        else:
            sums.append(total)
    return sums


class EagerMasks:
    """The mask algebra the shared op facts are written in (``gradwise._ops._zeros``' ``passes``,
    ``gradwise._ops._contractions``' support formulas), on tensors; ``_compile_rules._GraphMasks`` is the same
    algebra on graph nodes. The first operand of not_/and_/or_ is always a fresh mask, so they work in place (one
    allocation per predicate); ``both`` is the out-of-place and."""

    le, ge, gt, lt, abs, isnan = (staticmethod(f) for f in (torch.le, torch.ge, torch.gt, torch.lt, torch.abs,
                                                           torch.isnan))

    @staticmethod
    def not_(m: torch.Tensor) -> torch.Tensor:
        return m.logical_not_()

    @staticmethod
    def and_(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a.logical_and_(b)

    @staticmethod
    def or_(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a.logical_or_(b)

    @staticmethod
    def both(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a & b

    @staticmethod
    def any(m: torch.Tensor, dims: Sequence[int], keepdim: bool) -> torch.Tensor:
        return mask_any(m, tuple(dims), keepdim=keepdim)

    @staticmethod
    def swap_last(m: torch.Tensor) -> torch.Tensor:
        return m.transpose(-1, -2)

    @staticmethod
    def unsqueeze(m: torch.Tensor, dim: int) -> torch.Tensor:
        return m.unsqueeze(dim)

    @staticmethod
    def shape(t: torch.Tensor) -> tuple[int, ...]:
        return tuple(t.shape)

    @staticmethod
    def ones(like: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        return like.new_ones(tuple(shape))

    @staticmethod
    def cast(m: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return m.to(like.dtype)

    @staticmethod
    def narrow(t: torch.Tensor, dim: int, start: int, length: int) -> torch.Tensor:
        return t.narrow(dim, start, length)

    @staticmethod
    def call(op, *args):
        return op(*args)

    @staticmethod
    def pick(result, i: int):
        return result[i]
