"""Backward formulas that read the triangle of a Cholesky factor their forward never reads (``TRIANGLE_READERS``),
and the hooks that recompute them with that triangle as 0 during a strong pass (``triangle_hooks``).

``cholesky_solve(B, L)`` and ``cholesky_inverse(L)`` read only the lower triangle of ``L`` (the upper one with
``upper=True``): whatever the other triangle holds (``torch.empty``'s garbage, a NaN), the forward is the same.
PyTorch's formulas multiply the whole matrix (``-(common @ L)``), so a NaN/Inf there turns the gradient of every
entry into NaN although no output depends on it. No structural zero is involved: the unused entries are values
the formula should not have read. Where the unused triangle of a reached node's factor holds NaN/Inf, the strong
pass replaces the node's gradient of the factor with the same formula evaluated on the factor with that triangle
as 0: the gradient of the same program whose unused entries are 0 (``tests/test_hunt_sz2.py``). A finite unused
triangle is left as PyTorch computes it (bitwise, as every finite path). The nodes are not in ``NODE_FACTS``, so a
backward through one always runs under the mode ('check'), where ``_mode.watch_functions`` installs the hooks.

May import: torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import _disable_current_modes


def _used(factor: torch.Tensor, upper: bool) -> torch.Tensor:
    """The factor with the triangle its forward reads, and 0 in the other (strictly off the diagonal)."""
    return factor.triu() if upper else factor.tril()


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


# autograd node name -> (saved factor attribute, its slot among the node's outputs, formula for its gradient)
TRIANGLE_READERS: dict[str, tuple[str, int, Callable[..., torch.Tensor]]] = {
    "CholeskySolveBackward0": ("_saved_input2", 1, _cholesky_solve_factor),
    "CholeskyInverseBackward0": ("_saved_self", 0, _cholesky_inverse_factor),
}


def _unused_nonfinite(factor: torch.Tensor, upper: bool) -> bool:
    off = factor.tril(-1) if upper else factor.triu(1)
    return not bool(off.isfinite().all())


def triangle_hooks(node: Any) -> list:
    """A pre- and a post-hook on ``node`` (of TRIANGLE_READERS) for one strong pass: the pre-hook reads the saved
    factor before the node frees it; where its unused triangle holds NaN/Inf, the post-hook returns the factor's
    gradient computed with that triangle as 0 (summed to the factor's shape where it was broadcast)."""
    attr, slot, formula = TRIANGLE_READERS[type(node).__name__]
    held: list = []

    def before(grad_outputs):
        held.clear()
        try:
            factor, result, upper = getattr(node, attr), node._saved_result, node._saved_upper
        except RuntimeError:  # freed by an earlier backward: the engine raises itself
            return
        with _disable_current_modes():  # a value of the program, not a support the strong-zero mode tracks
            if grad_outputs[0] is not None and _unused_nonfinite(factor, upper):
                held.append((factor, _used(factor, upper), result, upper, grad_outputs[0]))

    def after(grad_inputs, grad_outputs):
        if not held or grad_inputs[slot] is None:
            return None
        factor, used, result, upper, g = held.pop()
        fixed = formula(g, used, result, upper).sum_to_size(factor.shape)
        return tuple(fixed if i == slot else gi for i, gi in enumerate(grad_inputs))

    return [node.register_prehook(before), node.register_hook(after)]
