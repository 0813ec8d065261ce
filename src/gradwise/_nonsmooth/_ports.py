"""Python ports of PyTorch's C++ composite ops whose kinks sit inside them (``PORTS``: callable -> port):
quantile, nanquantile, renorm, cosine_embedding_loss, poisson_nll_loss, fractional_max_pool2d; and of the two whose
norm or variance PyTorch clamps in place under no_grad, a gradient straight through the clamp (cosine_similarity,
F.gaussian_nll_loss): their ports differentiate the clamp.

A C++ composite such as ``torch.quantile`` reaches gradwise's function mode as one call; its sort runs below the
mode, where only the watch sees it (an error at a tie). Its port makes the same aten calls in the same order
from Python, so under the mode the sort goes to its rule and the rest (gather, lerp) is smooth. Values are
PyTorch's bit for bit (tests/test_nonsmooth.py compares them); a port runs only where an argument depends on
f's inputs, after the native op has checked the arguments.

May import: torch.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable

import torch
import torch.nn.functional as _F
from torch.nn.modules.utils import _pair

Tensor = torch.Tensor


def _ranks_in_double() -> bool:
    """Whether PyTorch's quantile computes the ranks q * (n - 1) of a float input in double (torch 2.14: q rounded
    to the input's dtype first, the lerp's weight rounded back) or in the input's dtype (up to 2.13). Read from
    PyTorch itself, once, where the two differ: 0.7 * 3 of [-2, -1, 0, 2]. Real float32 CPU tensors whatever the
    importer's defaults and modes (a float64 default dtype read double ranks as float32's; a meta device or a fake
    mode had no values to compare)."""
    with torch.utils._python_dispatch._disable_current_modes():
        x = torch.tensor([-2.0, -1.0, 0.0, 2.0], dtype=torch.float32, device="cpu")
        q = torch.tensor(0.7, dtype=torch.float32, device="cpu")
        ranks = q.double() * 3
        return torch.equal(torch.quantile(x, q), x[2].lerp(x[3], (ranks - 2).float()))


_RANKS_IN_DOUBLE = _ranks_in_double()


def _quantile(native: Callable, ignore_nan: bool):
    def port(input: Tensor, q, dim: int | None = None, keepdim: bool = False, *,
             interpolation: str = "linear") -> Tensor:
        """``torch.quantile`` / ``nanquantile`` as ATen's ``quantile_compute``: sort (ascending, NaN last), ranks
        q * (n - 1) (quantile: the last rank in a row holding a NaN; nanquantile: over the non-NaN count; in double
        where PyTorch computes them so, `_RANKS_IN_DOUBLE`), the ranks rounded as ``interpolation`` says, then a
        lerp of the two neighbouring order statistics.

        At tied order statistics the sort's rule ranks the ties along the direction: the quantile's one-sided
        derivative is that of the order statistics it interpolates."""
        native(input.detach(), q.detach() if isinstance(q, Tensor) else q, dim, keepdim,
               interpolation=interpolation)  # PyTorch's own argument checks and messages
        scalar_q = not isinstance(q, Tensor) or q.dim() == 0
        qs = torch.as_tensor(q, dtype=input.dtype, device=input.device).reshape(-1)
        qs = qs.double() if _RANKS_IN_DOUBLE else qs
        x = input.reshape(-1) if dim is None or input.dim() == 0 else input.movedim(dim, -1)
        values = torch.sort(x, dim=-1).values
        if ignore_nan:
            ranks = qs * (values.isnan().logical_not_().sum(-1, True) - 1)
            ranks = ranks.masked_fill(ranks < 0, 0)
        else:
            last = values.shape[-1] - 1
            ranks, nan = torch.broadcast_tensors(qs * last, values.isnan().any(-1, True))
            ranks = ranks.masked_fill(nan, last)
        if interpolation == "lower":
            ranks = ranks.floor()
        elif interpolation == "higher":
            ranks = ranks.ceil()
        elif interpolation == "nearest":
            ranks = ranks.round()
        below = ranks.to(torch.int64)
        out = values.gather(-1, below)
        if interpolation in ("linear", "midpoint"):
            weights = torch.full_like(ranks, 0.5) if interpolation == "midpoint" else ranks - below
            # (clamped: with a q that moves, ceil takes its limit along the direction, past the last rank at q = 1,
            # where the lerp's weight is 0 on that side: the last order statistic, as at q = 0 moving down)
            above = ranks.ceil().to(torch.int64).clamp_max(values.shape[-1] - 1)
            out = out.lerp(values.gather(-1, above), weights.to(values.dtype))
        if keepdim:  # the reduced dims kept as size 1, before the quantiles move to the front
            out = out.reshape(*([1] * input.dim()), -1) if dim is None or input.dim() == 0 \
                else out.unsqueeze(dim % input.dim())
        return out.squeeze(-1) if scalar_q else out.movedim(-1, 0)

    port.__name__ = native.__name__.split(".")[0]
    return port


def _renorm(native: Callable):
    def port(input: Tensor, p, dim: int, maxnorm) -> Tensor:
        """``torch.renorm`` as ATen's ``renorm_out``: the p-norm of each slice along ``dim`` (in float for half
        types), the factor maxnorm / (norm + 1e-7) where norm > maxnorm, else 1, times the input.

        PyTorch's factor jumps at norm == maxnorm (by the 1e-7): the comparison's rule takes the side along the
        direction and raises where f's value then changes (no one-sided derivative there), as in f itself."""
        native(input.detach(), p, dim, maxnorm)  # PyTorch's own argument checks and messages
        dims = [d for d in range(input.dim()) if d != dim % input.dim()]
        acc = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
        norm = torch.linalg.vector_norm(input, p, dims, keepdim=True, dtype=acc if acc != input.dtype else None)
        bound = torch.tensor(maxnorm, dtype=acc, device=input.device)  # the kernel's scalar_t maxnorm and eps
        factor = torch.where(norm > bound, bound / (norm + torch.tensor(1e-7, dtype=acc, device=input.device)),
                             torch.ones((), dtype=acc, device=input.device))
        return input * factor.to(input.dtype)

    port.__name__ = "renorm"
    return port


_EPSILON = struct.unpack("f", struct.pack("f", 1e-12))[0]  # ATen's Loss.cpp: constexpr float EPSILON = 1e-12


def _cosine_embedding_loss(native: Callable):
    def port(input1: Tensor, input2: Tensor, target: Tensor, margin: float = 0.0, reduction: int = 1) -> Tensor:
        """``torch.cosine_embedding_loss`` as ATen's: cos = <a, b> / sqrt((|a|² + eps)(|b|² + eps)), then 1 - cos
        where target == 1 and clamp_min(cos - margin, 0) where target == -1, reduced.

        At cos == margin (target -1) the clamp's rule takes the side along the direction: max(cos', 0)."""
        # PyTorch's checks and messages (on detached tensors: a target in the pass would come back to this port)
        native(input1.detach(), input2.detach(), target.detach(), margin, reduction)
        d = target.dim()
        cos = (input1 * input2).sum(d) / (((input1 * input1).sum(d) + _EPSILON)
                                          * ((input2 * input2).sum(d) + _EPSILON)).sqrt()
        zeros = torch.zeros_like(cos)
        out = torch.where(target == 1, 1 - cos, zeros) + torch.where(target == -1, (cos - margin).clamp_min(0), zeros)
        return out if reduction == 0 else out.mean() if reduction == 1 else out.sum()

    port.__name__ = "cosine_embedding_loss"
    return port


def _poisson_nll_loss(native: Callable):
    def port(input: Tensor, target: Tensor, log_input: bool, full: bool, eps: float, reduction: int) -> Tensor:
        """``torch.poisson_nll_loss`` as ATen's: exp(x) - y x (``log_input``) or x - y log(x + eps), plus with
        ``full`` the Stirling term y log y - y + log(2 pi y) / 2 masked to 0 where y <= 1, reduced.

        The term jumps at y = 1 (to 0.5 log(2 pi) - 1): the comparison's rule decides along the direction, so a
        target moving above 1 is an error (PyTorch's watch does not see comparisons: it gave the masked side)."""
        native(input.detach(), target.detach(), log_input, full, eps, reduction)  # PyTorch's checks and messages
        loss = torch.exp(input) - target * input if log_input else input - target * torch.log(input + eps)
        if full:
            stirling = target * torch.log(target) - target + 0.5 * torch.log(2 * math.pi * target)
            loss = loss + stirling.masked_fill(target <= 1, 0)
        return loss if reduction == 0 else loss.mean() if reduction == 1 else loss.sum()

    port.__name__ = "poisson_nll_loss"
    return port


def _fractional_windows(dtype: torch.dtype, u: Tensor, size: int, out: int, pool: int) -> Tensor:
    """Each window's first index along one dim, per sample (``u``: (..., 1)) as ATen's ``generate_intervals``:
    int((i + u) * alpha) - int(u * alpha) for i < out - 1 with alpha = (size - pool) / (out - 1), the last at
    size - pool; every step in the input's dtype (the kernel's scalar_t), so the windows are the kernel's."""
    if out == 0:  # (an empty output PyTorch accepts)
        return torch.zeros((*u.shape[:-1], 0), dtype=torch.int64, device=u.device)
    i = torch.arange(out - 1, device=u.device).to(dtype)
    alpha = torch.tensor(size - pool, dtype=dtype, device=u.device) / torch.tensor(out - 1, dtype=dtype,
                                                                                    device=u.device)
    starts = ((i + u) * alpha).to(torch.int64) - (u * alpha).to(torch.int64)
    return torch.cat([starts, torch.full((*u.shape[:-1], 1), size - pool, device=u.device)], -1)


def _fractional_max_pool2d_core(input: Tensor, kernel_size, output_size, samples: Tensor) -> tuple[Tensor, Tensor]:
    """ATen's ``fractional_max_pool2d`` (values, plane-flat indices h * W + w) as a window gather and a max.

    Each (batch, plane) has its own windows (samples[..., 0] places the columns, [..., 1] the rows). The max over
    a window's elements in row-major order is the kernel's first maximum; at tied maxima the max's rule ranks
    them along the direction. A window holding NaN is NaN at its last NaN, as the kernel's ``val > max ||
    isnan(val)``; the values are gathered at the final indices, so the gradient goes where PyTorch's does."""
    (kh, kw), (oh, ow) = _pair(kernel_size), _pair(output_size)
    x = input if input.dim() == 4 else input.unsqueeze(0)
    n, c, h, w = x.shape
    u = samples.detach().to(x.dtype)
    rows = _fractional_windows(x.dtype, u[..., 1:], h, oh, kh)[..., None] + torch.arange(kh, device=x.device)
    cols = _fractional_windows(x.dtype, u[..., :1], w, ow, kw)[..., None] + torch.arange(kw, device=x.device)
    ni = torch.arange(n, device=x.device).view(n, 1, 1, 1, 1, 1)
    ci = torch.arange(c, device=x.device).view(1, c, 1, 1, 1, 1)
    windows = x[ni, ci, rows[:, :, :, None, :, None], cols[:, :, None, :, None, :]].reshape(n, c, oh, ow, kh * kw)
    _, k = torch.max(windows, dim=-1)  # (a tie goes to the max's rule)
    nan = windows.isnan()
    last_nan = torch.where(nan, torch.arange(kh * kw, device=x.device), -1).amax(-1)
    k = torch.where(last_nan >= 0, last_nan, k)
    values = windows.gather(-1, k.unsqueeze(-1)).squeeze(-1)
    # the plane-flat index of window element k: (row start + k // kw) * W + column start + k % kw
    index = (rows[:, :, :, None, 0] + k // kw) * w + cols[:, :, None, :, 0] + k % kw
    return (values, index) if input.dim() == 4 else (values.squeeze(0), index.squeeze(0))


def _fractional_max_pool2d(native: Callable):
    def port(input: Tensor, kernel_size, output_size=None, output_ratio=None, return_indices: bool = False,
             _random_samples: Tensor | None = None):
        """``F.fractional_max_pool2d`` (and ``_with_indices``) as its Python wrapper: output_ratio to a size,
        samples drawn as it draws them (``torch.rand(N, C, 2)`` in the input's dtype: the RNG moves the same),
        then the kernel's windows and max (``_fractional_max_pool2d_core``)."""
        if output_size is None and output_ratio is None:
            raise ValueError("fractional_max_pool2d requires specifying either an output_size or an output_ratio")
        if output_size is None:
            if len(output_ratio) > 2:
                raise ValueError("fractional_max_pool2d requires output_ratio to either be a single Int or tuple "
                                 "of Ints.")
            ratio = tuple(output_ratio)
            output_size = [int(input.size(-2) * ratio[0]), int(input.size(-1) * ratio[1])]
        if _random_samples is None:
            _random_samples = torch.rand(1 if input.dim() == 3 else input.size(0), input.size(-3), 2,
                                         dtype=input.dtype, device=input.device)
        # PyTorch's own argument checks and messages
        torch._C._nn.fractional_max_pool2d(input.detach(), kernel_size, output_size, _random_samples.detach())
        values, index = _fractional_max_pool2d_core(input, kernel_size, output_size, _random_samples)
        return (values, index) if return_indices or native is _F.fractional_max_pool2d_with_indices else values

    port.__name__ = "fractional_max_pool2d"
    return port


def _aten_fractional_max_pool2d(native: Callable):
    def port(input: Tensor, kernel_size, output_size, random_samples: Tensor) -> tuple[Tensor, Tensor]:
        """``aten.fractional_max_pool2d``: (values, indices) as ``_fractional_max_pool2d_core``."""
        native(input.detach(), kernel_size, output_size, random_samples.detach())  # PyTorch's checks, messages
        return _fractional_max_pool2d_core(input, kernel_size, output_size, random_samples)

    port.__name__ = "fractional_max_pool2d_aten"
    return port


def _over_clamped_norm(x: Tensor, dim: int, eps: float) -> Tensor:
    """x / max(||x||, eps) along ``dim``, the clamp differentiated: where ||x|| < eps the divisor is the constant eps
    (no norm is taken there, so a zero x is no kink of the norm: f is linear near it); at ||x|| = eps the clamp's
    rule; above, the norm, PyTorch's values and gradient bit for bit."""
    small = torch.linalg.vector_norm(x.detach(), 2, dim=dim, keepdim=True) < eps
    norm = torch.linalg.vector_norm(torch.where(small, torch.ones_like(x), x), 2, dim=dim, keepdim=True)
    return x / torch.where(small, torch.full_like(norm, eps), norm.clamp_min(eps))


def _cosine_similarity(native: Callable):
    def port(x1: Tensor, x2: Tensor, dim: int = 1, eps: float = 1e-8) -> Tensor:
        """``torch.cosine_similarity`` (``F.cosine_similarity``) as ATen's: x1 / max(||x1||, eps) times
        x2 / max(||x2||, eps), summed over ``dim``. ATen clamps a clone of each norm in place under no_grad, so
        its gradient goes straight through the clamp: exact where a norm is above eps or 0 (x = 0 cancels the
        norm's term), not in between (0 < ||x|| < eps, where the divisor is the constant eps: x = 3.7e-9 (0.3,
        -0.1, 0.2) against (1, -2, 0.5) gives 2.26e7 for the derivative 4.36e7 in the first coordinate). Here
        the clamp is differentiated (``_over_clamped_norm``)."""
        native(x1.detach(), x2.detach(), dim, eps)  # PyTorch's checks and messages
        dtype = torch.result_type(x1, x2)
        x1, x2 = (x if x.is_floating_point() or x.is_complex() else x.to(dtype) for x in (x1, x2))
        x1, x2 = torch.broadcast_tensors(x1, x2)
        return (_over_clamped_norm(x1, dim, eps) * _over_clamped_norm(x2, dim, eps)).sum(dim)

    port.__name__ = "cosine_similarity"
    return port


def _gaussian_nll_loss(native: Callable):
    def port(input: Tensor, target: Tensor, var, full: bool = False, eps: float = 1e-6,
             reduction: str = "mean") -> Tensor:
        """``F.gaussian_nll_loss`` as PyTorch's: 0.5 (log v + (input - target)² / v) with v = max(var, eps)
        (var of one dim less unsqueezed, a float var broadcast), plus 0.5 log(2 pi) with ``full``, reduced.
        PyTorch clamps a clone of var in place under no_grad (its docs: "the clamping of var is ignored with
        respect to autograd"), a straight-through gradient; here the clamp is differentiated: var below eps
        gets 0, at eps the clamp's rule (docs/nonsmooth.md, "Clamps PyTorch hides from autograd")."""
        native(input.detach(), target.detach(), var.detach() if isinstance(var, Tensor) else var, full=full,
               eps=eps, reduction=reduction)  # PyTorch's checks and messages
        if isinstance(var, float):
            var = var * torch.ones_like(input)
        elif var.size() != input.size() and input.size()[:-1] == var.size():
            var = torch.unsqueeze(var, -1)
        var = var.clamp_min(eps)
        loss = 0.5 * (torch.log(var) + (input - target) ** 2 / var)
        if full:
            loss = loss + 0.5 * math.log(2 * math.pi)
        return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss

    port.__name__ = "gaussian_nll_loss"
    return port


PORTS: dict[Callable, Callable] = {}
for _native, _ignore in ((torch.quantile, False), (torch.nanquantile, True)):
    _aten = getattr(torch.ops.aten, _native.__name__)
    for _call in (_native, getattr(Tensor, _native.__name__), _aten, _aten.default, _aten.scalar):
        PORTS[_call] = _quantile(_call, _ignore)  # checked by the callable called
for _call in (torch.renorm, Tensor.renorm, torch.ops.aten.renorm, torch.ops.aten.renorm.default):
    PORTS[_call] = _renorm(_call)
for _call in (torch.cosine_embedding_loss, torch.ops.aten.cosine_embedding_loss,
              torch.ops.aten.cosine_embedding_loss.default):
    PORTS[_call] = _cosine_embedding_loss(_call)
for _call in (torch.poisson_nll_loss, torch.ops.aten.poisson_nll_loss, torch.ops.aten.poisson_nll_loss.default):
    PORTS[_call] = _poisson_nll_loss(_call)
for _call in (_F.fractional_max_pool2d, _F.fractional_max_pool2d_with_indices):
    PORTS[_call] = _fractional_max_pool2d(_call)
for _call in (torch._C._nn.fractional_max_pool2d, torch.ops.aten.fractional_max_pool2d,
              torch.ops.aten.fractional_max_pool2d.default):
    PORTS[_call] = _aten_fractional_max_pool2d(_call)
for _call in (torch.cosine_similarity, torch.ops.aten.cosine_similarity, torch.ops.aten.cosine_similarity.default):
    PORTS[_call] = _cosine_similarity(_call)
PORTS[_F.gaussian_nll_loss] = _gaussian_nll_loss(_F.gaussian_nll_loss)
