"""Backward formulas that read a triangle of a matrix their forward never reads (``TRIANGLE_READERS``), and the
hooks that recompute them without it during a strong pass (``triangle_hooks``).

``cholesky_solve(B, L)`` and ``cholesky_inverse(L)`` read only the lower triangle of ``L`` (the upper one with
``upper=True``): whatever the other triangle holds (``torch.empty``'s garbage, a NaN), the forward is the same.
PyTorch's formulas multiply the whole matrix (``-(common @ L)``), so a NaN/Inf there turns the gradient of every
entry into NaN although no output depends on it. No structural zero is involved: the unused entries are values
the formula should not have read. Where the unused triangle of a reached node's factor holds NaN/Inf, the strong
pass replaces the node's gradient of the factor with the same formula evaluated on the factor with that triangle
as 0: the gradient of the same program whose unused entries are 0 (``tests/test_hunt_sz2.py``). A finite unused
triangle is left as PyTorch computes it (bitwise, as every finite path). ``linalg.pinv(A, hermitian=True)`` reads the
lower triangle of ``A`` (its eigh) and its formula all of ``A``: there the unused triangle is the lower one mirrored
(the Hermitian matrix the forward read). The nodes are not in ``NODE_FACTS``, so a
backward through one always runs under the mode ('check'), where ``_mode.watch_functions`` installs the hooks.

May import: torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import _disable_current_modes


def _cholesky_solve_factor(g: torch.Tensor, factor: torch.Tensor, result: torch.Tensor, upper: bool) -> torch.Tensor:
    """PyTorch's ``cholesky_solve_backward`` for the factor (FunctionsManual.cpp), on the cleaned factor."""
    grad_self = g.cholesky_solve(factor, upper=upper)
    common = torch.matmul(grad_self, result.mH)
    common = common + common.mH
    return -torch.matmul(factor, common) if upper else -torch.matmul(common, factor)


def _cholesky_inverse_factor(g: torch.Tensor, factor: torch.Tensor, result: torch.Tensor,
                             upper: bool) -> torch.Tensor:
    """PyTorch's ``cholesky_inverse_backward`` (FunctionsManual.cpp), on the cleaned factor."""
    common = g + g.mH
    common = torch.matmul(result, torch.matmul(common, result))
    return -torch.matmul(factor, common) if upper else -torch.matmul(common, factor)


def _pinv_input(g: torch.Tensor, a: torch.Tensor, pinv: torch.Tensor, upper: bool) -> torch.Tensor:
    """PyTorch's ``pinv_backward`` (FunctionsManual.cpp), on the cleaned input."""
    pinvh, gh = pinv.mH, g.mH
    if a.shape[-2] <= a.shape[-1]:
        k = gh.matmul(pinv)
        k_pinvh = k.matmul(pinvh)
        return -(pinv.matmul(k)).mH + k_pinvh - (a.matmul(pinv)).matmul(k_pinvh) + \
            (pinvh.matmul(pinv)).matmul(gh - k.matmul(a))
    k = pinv.matmul(gh)
    pinvh_k = pinvh.matmul(k)
    return -(k.matmul(pinv)).mH + pinvh_k - pinvh_k.matmul(pinv).matmul(a) + \
        (gh - a.matmul(k)).matmul(pinv).matmul(pinvh)


class _Cleaned(torch.autograd.Function):
    """``factor`` holding ``clean``'s values, its gradient passed to every entry unchanged (create_graph=True): the
    factor of the program whose unused entries are 0 (or mirrored) is a tensor of its own, whose every entry the
    formula's derivative reaches. ``factor.tril()`` passes none to the unused triangle, and ``a.tril() +
    a.tril(-1).mH`` moves it onto the lower one: a wrong second-order gradient there."""

    @staticmethod
    def forward(ctx: Any, factor: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        return clean.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return g, None


def _matrices(mask: torch.Tensor) -> torch.Tensor:
    """Per matrix of a batch, whether ``mask`` holds a True element in it (``[..., 1, 1]``)."""
    return mask.flatten(-2).any(-1)[..., None, None]


def _triangular(node: Any, factor: torch.Tensor) -> tuple[torch.Tensor, bool, torch.Tensor] | None:
    """A Cholesky factor with NaN/Inf in the triangle its forward does not read: it with 0 there, and which
    matrices of the batch hold such NaN/Inf (the others keep PyTorch's gradient, finite garbage there included)."""
    upper = node._saved_upper
    bad = _matrices(~(factor.tril(-1) if upper else factor.triu(1)).isfinite())
    if not bad.any():
        return None
    return (factor.triu() if upper else factor.tril()), upper, bad


def _hermitian(node: Any, a: torch.Tensor) -> tuple[torch.Tensor, bool, torch.Tensor] | None:
    """pinv's input with NaN/Inf while its result is finite: ``hermitian=True`` (not saved), whose eigh read the
    lower triangle only (and of the diagonal, its real part). The Hermitian matrix it read, the lower triangle
    mirrored, and the matrices of the batch that are such (a finite matrix keeps PyTorch's gradient, of its upper
    triangle as it is, even unsymmetric)."""
    bad = _matrices(~a.isfinite()) & ~_matrices(~node._saved_result.isfinite()) & ~_matrices(~a.tril().isfinite())
    if not bad.any():
        return None
    if a.is_complex():  # eigh reads the diagonal's real part only: a Hermitian matrix's diagonal is real
        lower = a.tril(-1)
        return lower + lower.mH + torch.diag_embed(a.diagonal(dim1=-2, dim2=-1).real.to(a.dtype)), False, bad
    return a.tril() + a.tril(-1).mH, False, bad


# autograd node name -> (saved input attribute, its slot among the node's outputs, the input the forward read with
# the matrices that differ (or None where nothing unused is NaN/Inf), the formula for the input's gradient)
TRIANGLE_READERS: dict[str, tuple[str, int, Callable[..., Any], Callable[..., torch.Tensor]]] = {
    "CholeskySolveBackward0": ("_saved_input2", 1, _triangular, _cholesky_solve_factor),
    "CholeskyInverseBackward0": ("_saved_self", 0, _triangular, _cholesky_inverse_factor),
    "LinalgPinvBackward0": ("_saved_self", 0, _hermitian, _pinv_input),
}


def _hooked(node: Any, attr: str) -> bool:
    """Whether the saved factor or result unpacks through a hook (``_node_facts._hooked``'s test, for two slots)."""
    try:
        return any(getattr(node, f"_raw{name}").unpack_hook is not None for name in (attr, "_saved_result"))
    except RuntimeError:  # freed by an earlier backward: the engine raises itself
        return True


def triangle_hooks(node: Any) -> list:
    """A pre- and a post-hook on ``node`` (of TRIANGLE_READERS) for one strong pass: the pre-hook reads the saved
    factor before the node frees it; where its unused triangle holds NaN/Inf, the post-hook returns the factor's
    gradient computed with that triangle as 0 (summed to the factor's shape where it was broadcast), in the matrices
    of a batch that hold them. A factor or result saved through an unpack hook (a non-reentrant checkpoint,
    ``saved_tensors_hooks``) is not read: a checkpoint unpacks each once, for the node itself ("Unpack is being
    triggered for a tensor that was already unpacked once"); there the gradient is PyTorch's."""
    attr, slot, read, formula = TRIANGLE_READERS[type(node).__name__]
    held: list = []

    def before(grad_outputs):
        held.clear()
        if grad_outputs[0] is None or _hooked(node, attr):
            return
        try:
            factor, result = getattr(node, attr), node._saved_result
        except RuntimeError:  # freed by an earlier backward: the engine raises itself
            return
        with _disable_current_modes():  # a value of the program, not a support the strong-zero mode tracks
            used = read(node, factor)
            if used is not None and torch.is_grad_enabled() and factor.requires_grad:  # (create_graph=True)
                used = (_Cleaned.apply(factor, used[0].detach()), *used[1:])
        if used is not None:
            held.append((factor, *used, result, grad_outputs[0]))

    def after(grad_inputs, grad_outputs):
        if not held or grad_inputs[slot] is None:
            return None
        factor, used, upper, bad, result, g = held.pop()
        fixed = torch.where(bad, formula(g, used, result, upper).sum_to_size(factor.shape), grad_inputs[slot])
        return tuple(fixed if i == slot else gi for i, gi in enumerate(grad_inputs))

    return [node.register_prehook(before), node.register_hook(after)]
