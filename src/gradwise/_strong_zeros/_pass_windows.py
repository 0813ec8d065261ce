"""The positions a slice_scatter/select_scatter writes, as index comparisons (for the compiled-graph pass).

The pass (``_compile_rules._placed``) builds a placement's support as ``where(window, src, base)`` rather than a
bool ``slice_scatter``: inductor's CPU vectorizer does not vectorize a kernel that reads a bool ``slice_scatter``
(torch 2.13), and the scalar kernel's transcendental functions (``tanh``, ``exp``) round otherwise than the
vectorized ones PyTorch's own compile runs, so finite gradients would differ from compiled PyTorch's by an ulp.
An ``iota`` compared with the bounds fuses and vectorizes like any index expression.

May import: torch (torch.fx).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

aten = torch.ops.aten
prims = torch.ops.prims

__all__ = ["slice_window"]

_NO_END = 2 ** 62  # an end at or past any size (slice's default end is 2**63 - 1)


def _val(x: object) -> Any:
    return x.meta.get("val") if isinstance(x, fx.Node) else x


def slice_window(rw: Any, node: fx.Node) -> fx.Node | None:
    """The positions a slice_scatter (step 1) or select_scatter writes, as a bool ``iota`` comparison along its
    dim, broadcastable to the output; None where a bound is not a plain int, or is negative beside a symbolic
    size."""
    if node.kwargs:  # (bounds by keyword: not seen in post-grad graphs; the scatter on masks serves them)
        return None
    nd = _val(node).dim()
    if node.target is aten.select_scatter.default:
        dim, start = node.args[2], node.args[3]
        end = start + 1 if isinstance(start, int) else None
    else:
        args = [*node.args[2:], None, None, None, None]
        dim, start, end, step = (args[0] or 0), (args[1] or 0), args[2], (args[3] or 1)
        end = _NO_END if end is None else end
        if step != 1:
            return None
    if not isinstance(dim, int) or not all(isinstance(v, int) or _known_nonnegative(v) for v in (start, end)):
        return None
    dim %= nd
    size = rw.shape_of(node)[dim]
    if not isinstance(start, int) or not isinstance(end, int):  # symbolic bounds, known >= 0
        idx = _iota(rw, node, size)
        window = rw.call(aten.ge.Scalar, idx, start)
        if not (isinstance(end, int) and end >= _NO_END):
            window = rw.call(aten.logical_and.default, window, rw.call(aten.lt.Scalar, idx, end))
        return _unsqueezed(rw, window, nd - dim - 1)
    if start < 0 or end < 0:
        if not isinstance(size, int):
            return None
        end = end + size if end <= 0 and node.target is aten.select_scatter.default else end
        start, end = max(start + size, 0) if start < 0 else start, (end + size if end < 0 else end)
    idx = _iota(rw, node, size)
    window = rw.call(aten.ge.Scalar, idx, start)
    if end < _NO_END and not (isinstance(size, int) and end >= size):
        window = rw.call(aten.logical_and.default, window, rw.call(aten.lt.Scalar, idx, end))
    return _unsqueezed(rw, window, nd - dim - 1)


def _known_nonnegative(v: object) -> bool:
    """A symbolic int (a graph node) the shape environment knows to be >= 0."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    val = _val(v) if isinstance(v, fx.Node) else None
    return isinstance(val, torch.SymInt) and statically_known_true(val >= 0)


def _iota(rw: Any, like: fx.Node, size: Any) -> fx.Node:
    """Positions along a dim of ``like``; a window made of them marks zeros a formula placed (`_Rewriter.flat`)."""
    idx = rw.call(prims.iota.default, size, start=0, step=1, dtype=torch.int64, device=_val(like).device,
                  requires_grad=False)
    rw._flat[idx] = False
    return idx


def _unsqueezed(rw: Any, mask: fx.Node, trailing: int) -> fx.Node:
    for _ in range(trailing):
        mask = rw.call(aten.unsqueeze.default, mask, -1)
    return mask
