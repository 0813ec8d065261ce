"""Argument checks shared by the public functions: each error names the problem and the fix.

The exception types are the ones PyTorch raises for the same mistake (TypeError for a non-tensor,
RuntimeError for a tensor autograd cannot use), so code that catches PyTorch's errors keeps working.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def as_tensors(value: Any, what: str, where: str) -> tuple[torch.Tensor, ...]:
    """``value`` as a tuple of tensors; TypeError naming the offending element otherwise."""
    items = (value,) if isinstance(value, torch.Tensor) else value
    if not isinstance(items, Sequence) or isinstance(items, (str, bytes)):
        kind = type(value).__name__
        raise TypeError(f"{where}: {what} must be a tensor or a sequence of tensors, got {kind}.")
    for i, t in enumerate(items):
        if not isinstance(t, torch.Tensor) and not isinstance(t, torch.autograd.graph.GradientEdge):
            raise TypeError(
                f"{where}: {what}[{i}] is a {type(t).__name__}, not a tensor. Pass the tensors produced by "
                "your computation (e.g. the loss tensor, not loss.item())."
            )
    return tuple(items)


def check_differentiable(tensors: Sequence[torch.Tensor], what: str, where: str) -> None:
    """Floating-point or complex, requiring grad: what autograd can differentiate (complex and sparse tensors
    run as plain PyTorch with a warning: see _strong_zeros/_contract.py)."""
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            continue
        if not (t.is_floating_point() or t.is_complex()):
            raise RuntimeError(
                f"{where}: {what}[{i}] has dtype {t.dtype}; only floating-point tensors have gradients. "
                "Convert it first, e.g. t.float()."
            )
        if not t.requires_grad:
            fix = (
                "it does not depend on any tensor that requires grad: call .requires_grad_() on the inputs "
                "before computing it"
                if what in ("outputs", "tensors")
                else "call .requires_grad_() on it before the computation, or drop it from the list"
            )
            raise RuntimeError(f"{where}: {what}[{i}] (shape {tuple(t.shape)}) does not require grad; {fix}.")


def check_scalar_or_seeded(outputs: Sequence[torch.Tensor], seeds: Any, where: str) -> None:
    """A non-scalar output needs an explicit seed (grad_outputs), as in PyTorch."""
    given = (seeds,) if isinstance(seeds, torch.Tensor) or seeds is None else tuple(seeds)
    if seeds is None:
        given = (None,) * len(outputs)
    for i, t in enumerate(outputs):
        seed = given[i] if i < len(given) else None
        if isinstance(t, torch.Tensor) and seed is None and t.numel() != 1:
            raise RuntimeError(
                f"{where}: grad can be implicitly created only for scalar outputs, but output {i} has shape "
                f"{tuple(t.shape)}. Reduce it to a scalar (e.g. .sum()) or pass grad_outputs with its shape."
            )
