"""Python ports of PyTorch's C++ composite ops whose kinks sit inside them (``PORTS``: callable -> port):
quantile, nanquantile, renorm, cosine_embedding_loss.

A C++ composite such as ``torch.quantile`` reaches gradwise's function mode as one call; its sort runs below the
mode, where only the watch sees it (an error at a tie). Its port makes the same aten calls in the same order
from Python, so under the mode the sort goes to its rule and the rest (gather, lerp) is smooth. Values are
PyTorch's bit for bit (tests/test_nonsmooth.py compares them); a port runs only where an argument depends on
f's inputs, after the native op has checked the arguments.

May import: torch.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import torch

Tensor = torch.Tensor


def _quantile(native: Callable, ignore_nan: bool):
    def port(input: Tensor, q, dim: int | None = None, keepdim: bool = False, *,
             interpolation: str = "linear") -> Tensor:
        """``torch.quantile`` / ``nanquantile`` as ATen's ``quantile_compute``: sort (ascending, NaN last), ranks
        q * (n - 1) (quantile: the last rank in a row holding a NaN; nanquantile: over the non-NaN count), the
        ranks rounded as ``interpolation`` says, then a lerp of the two neighbouring order statistics.

        At tied order statistics the sort's rule ranks the ties along the direction: the quantile's one-sided
        derivative is that of the order statistics it interpolates."""
        native(input.detach(), q.detach() if isinstance(q, Tensor) else q, dim, keepdim,
               interpolation=interpolation)  # PyTorch's own argument checks and messages
        scalar_q = not isinstance(q, Tensor) or q.dim() == 0
        qs = torch.as_tensor(q, dtype=input.dtype, device=input.device).reshape(-1)
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
            out = out.lerp(values.gather(-1, ranks.ceil().to(torch.int64)), weights.to(values.dtype))
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
        native(input1.detach(), input2.detach(), target, margin, reduction)  # PyTorch's checks and messages
        d = target.dim()
        cos = (input1 * input2).sum(d) / (((input1 * input1).sum(d) + _EPSILON)
                                          * ((input2 * input2).sum(d) + _EPSILON)).sqrt()
        zeros = torch.zeros_like(cos)
        out = torch.where(target == 1, 1 - cos, zeros) + torch.where(target == -1, (cos - margin).clamp_min(0), zeros)
        return out if reduction == 0 else out.mean() if reduction == 1 else out.sum()

    port.__name__ = "cosine_embedding_loss"
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
