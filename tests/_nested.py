"""Nested derivatives through non-reentrant checkpoints, for the tests of PyTorch's contract under gradwise."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

Fn = Callable[[torch.Tensor], torch.Tensor]


def grad_of(fn: Fn) -> Fn:
    """x -> d fn / dx, with a graph (so it can be differentiated again)."""
    def wrapper(x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            return torch.autograd.grad(fn(x), x, create_graph=True)[0]
    return wrapper


def checkpointed(fn: Fn) -> Fn:
    return lambda x: checkpoint(fn, x, use_reentrant=False)


def sin_exp_sin(x: torch.Tensor) -> torch.Tensor:
    return x.sin().exp().sin()
