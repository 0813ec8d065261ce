"""``mark_unused``: a declaration, made in the forward, that the code after it never reads some elements of a
tensor. For opaque kernels whose backward cannot say so itself: an RNN-T loss (torchaudio's ``rnnt_loss``,
warp-rnnt) computes its gradients inside the forward and its backward is ``saved * dy``, where the frames past
``logit_lengths`` hold ordinary zeros; nothing in that backward knows the lengths, so no rule on it can make
those zeros structural. Declared unused, they are: the joiner's weight gradient then annihilates the NaN of
padded frames, as it does behind CTC (whose backward op takes the lengths).

May import: torch, _traced, _node_facts.
"""

from __future__ import annotations

import contextlib
import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import _disable_current_modes

from gradwise._strong_zeros._node_facts import NODE_FACTS
from gradwise._strong_zeros._traced import compiling, recording, traced_tensor

__all__ = ["NODE_NAME", "UnusedReadError", "mark_unused"]


class UnusedReadError(RuntimeError):
    """A gradient reached elements declared unused with ``gw.mark_unused``: the declaration is wrong."""


class _MarkUnused(torch.autograd.Function):
    """Identity in the forward (a view, no copy); in the backward the sensitivity of the unused elements is a
    structural zero, written by ``masked_fill(g, unused, 0)``, which the strong-zero rules read as one."""

    generate_vmap_rule = True  # torch.func.vmap (the declaration check is skipped on batched gradients)

    @staticmethod
    def forward(x: torch.Tensor, unused: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.save_for_backward(inputs[1])
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor | None) -> tuple[torch.Tensor | None, None]:
        if g is None:
            return None, None
        (unused,) = ctx.saved_tensors
        return g.masked_fill(_declared(g, unused), 0), None


NODE_NAME = "_MarkUnusedBackward"
_PACKAGE = str(Path(__file__).resolve().parents[1])
NODE_FACTS[NODE_NAME] = None  # known to the plan, no singular point; it makes structural zeros


def _declared(g: torch.Tensor, unused: torch.Tensor) -> torch.Tensor:
    """Where the declaration stands: ``unused`` elements whose sensitivity is 0 or NaN/Inf (an opaque kernel's
    own contamination, which the declaration removes). A finite nonzero sensitivity means the code after the
    declaration reads that element: in eager mode that raises; under a transform or while compiling (no value
    can be read) the element keeps its gradient, so a wrong declaration never zeroes a gradient silently.

    Along the dims ``unused`` broadcasts over (an RNN-T mask over the classes of the logits, which are the
    largest tensor of such a model) the test reads one max-norm per group, with no full-size temporary: a group
    counts as read when that norm is finite and nonzero (a group holding NaN/Inf counts as the kernel's own)."""
    traced = compiling() or recording() or traced_tensor(g)  # (make_fx's real mode: plain tensors, a graph keeping
    # what the modes-off check computed as a constant mask: a gradient the code reads zeroed where the graph runs)
    with contextlib.nullcontext() if traced else _disable_current_modes():  # bookkeeping, not the formula
        lead = g.dim() - unused.dim()
        dims = [d for d in range(g.dim()) if d < lead or (unused.shape[d - lead] == 1 and g.shape[d] != 1)]
        if dims:
            norm = torch.linalg.vector_norm(g, math.inf, dim=dims, keepdim=True)
            read = unused & norm.isfinite() & (norm != 0)
        else:
            read = unused & g.isfinite() & (g != 0)
        if not traced and bool(read.any()):
            raise UnusedReadError(
                "gw.mark_unused: the gradient reaching elements declared unused is nonzero, so the code after "
                "the declaration reads them. Declare only what it never reads (e.g. the frames past each "
                "sequence's length), or remove the declaration.")
        return unused & ~read


def mark_unused(x: torch.Tensor, unused: torch.Tensor) -> torch.Tensor:
    """``x``, with the elements where ``unused`` is True declared never read by what follows.

    For opaque kernels (C++/CUDA losses) that skip padding but return ordinary zeros as its gradient, which
    strong zeros cannot tell from a computed 0: past the declaration those elements' gradient is a structural
    zero, so a NaN/Inf they meet upstream (``0 x NaN`` in a layer's weight gradient) is annihilated under
    ``gw.strong_zeros()`` / ``gw.backward``. Values are unchanged (a view, no copy); with plain PyTorch the
    gradient there is 0 as before. ``unused`` is a bool tensor broadcastable to ``x``.

    The declaration is checked in every backward: a finite nonzero gradient reaching an unused element (tested per
    group of elements along the dims ``unused`` broadcasts over) means the code does read it, which raises
    ``UnusedReadError`` in eager mode; under torch.func transforms and
    torch.compile (where no value can be read) such an element keeps its gradient. Never a silently zeroed one.
    The check costs one reduction of the gradient and, on a GPU, one host sync per backward.

    >>> import torch, gradwise as gw
    >>> w = torch.ones(3, requires_grad=True)
    >>> x = torch.tensor([1.0, 2.0, float("nan")]) * w  # the NaN is padding
    >>> loss = gw.mark_unused(x, torch.tensor([False, False, True]))[:2].sum()
    >>> gw.grad(loss, w)[0]
    tensor([1., 2., 0.])
    """
    if not isinstance(x, torch.Tensor) or not isinstance(unused, torch.Tensor):
        raise TypeError(f"gw.mark_unused(x, unused) takes two tensors, got {type(x).__name__} and "
                        f"{type(unused).__name__}")
    if unused.dtype != torch.bool:
        raise TypeError(f"gw.mark_unused: `unused` must be a bool tensor (True = never read), got {unused.dtype}")
    try:
        shape = torch.broadcast_shapes(unused.shape, x.shape)
    except RuntimeError:
        raise ValueError(f"gw.mark_unused: `unused` of shape {tuple(unused.shape)} does not broadcast to x's shape "
                         f"{tuple(x.shape)}") from None
    if shape != x.shape:
        raise ValueError(f"gw.mark_unused: `unused` of shape {tuple(unused.shape)} would broadcast x's shape "
                         f"{tuple(x.shape)} to a larger one")
    if unused.device != x.device:
        raise ValueError(f"gw.mark_unused: `unused` is on {unused.device}, x on {x.device}: move it to x's device")
    if not x.requires_grad:
        return x
    out = _MarkUnused.apply(x, unused)
    if not torch.compiler.is_compiling():  # (a compiled graph's nodes are not this Function's)
        out.grad_fn.declared_at = _caller()  # for gw.trace(): the line a report names
    return out


def _caller() -> tuple[str, int]:
    """(file, line) of the innermost frame outside gradwise (integrations call mark_unused for the user)."""
    f = sys._getframe(2)
    while f is not None and f.f_code.co_filename.startswith(_PACKAGE):
        f = f.f_back
    return (f.f_code.co_filename, f.f_lineno) if f is not None else ("<unknown>", 0)
