"""Whether flat regions' structural zeros reach a nested backward's results as whole rows (``flat_rows_reach``).

A backward nested in a 'check' pass (a reentrant checkpoint's, a custom backward's ``torch.autograd.grad``) whose
results only relu's (clamp's, a max's) zeros reach runs plain: run strong, every checkpointed Linear+ReLU block would
run op by op. But those zeros reach its results through a Linear only as whole rows: a row of the input's gradient
is a structural zero where the relu after it is flat in the whole row (a zero padding row of a bias-free block,
``relu(0 @ w)``), and a custom backward after it may meet them with 0/0 (``g / (2 sqrt(x))`` at that zero row). This
module answers, before the backward runs and from the relus' saved results alone, whether any such row reaches the
results: one max over each row of each relu on the way, nothing on the other nodes. Where one does, the backward
runs strong and hands its results' zeros to the pass (exact, as for padding's zeros); where none does, plain
(PyTorch's bits; nothing was lost). Only a few node types are followed: Linear's, views, the flat regions of relu,
clamp, hardtanh (ReLU6) and threshold (a row whose every saved input falls in the region), and max pooling's and a
max's (amax, max(dim)) other entries, which pass the rows of their output to the rows they were reduced from (a
plane of a pooled sample and channel; no row of their own: a window's maximum always gets its sensitivity). A row
met by another node, and flat zeros that reach the results elementwise (a block that starts with a relu), are not
followed: that backward runs plain as before and is named if the pass ends NaN/Inf (``_engine._handing``).

May import: torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge

_NONE = None  # a contribution with no structural row (absorbs: a sum is structural only where every term is)


def _relu(node: Any, rows: torch.Tensor | None) -> torch.Tensor | None:
    """relu's input gradient is 0 where its result is (flat), whatever the sensitivity: a row is structural where
    it was from above or the result's whole row is 0 (its max; a NaN result is no flat one)."""
    if node._raw_saved_result.unpack_hook is not None:  # (packed by a hook: a non-reentrant checkpoint's would
        return rows  # run its forward again to unpack it; not followed)
    result = node._saved_result
    if result.dim() == 0 or result.is_complex():
        return rows
    flat = result.amax(-1) <= 0
    return flat if rows is None else rows | flat


def _flat(node: Any, rows: torch.Tensor | None, saved: str, flat_rows: Any) -> torch.Tensor | None:
    """A flat region's input gradient is 0 where its saved input (result) falls in it, whatever the sensitivity: a
    row is structural where it was from above or ``flat_rows`` of the saved tensor says the whole row falls there
    (row-wise reductions; a NaN falls in none)."""
    if getattr(node, "_raw" + saved).unpack_hook is not None:  # (packed by a hook: not followed, as relu's)
        return rows
    x = getattr(node, saved)
    if x.dim() == 0 or x.is_complex():
        return rows
    flat = flat_rows(node, x)
    if flat is None or flat.shape != x.shape[:-1]:
        return rows
    if rows is not None and rows.shape != flat.shape:  # (bounds that broadcast the input: not followed)
        return _NONE
    return flat if rows is None else rows | flat


def _outside(node: Any, x: torch.Tensor, low: str, high: str, closed: bool) -> torch.Tensor | None:
    """Whole rows of ``x`` outside [low, high] (clamp: its gradient passes at the bounds) or, ``closed``, outside
    (low, high) (hardtanh's passes strictly inside). A bound of None is no bound; tensor bounds broadcast."""
    lo, hi = getattr(node, low, None), getattr(node, high, None)
    out = None
    if lo is not None:
        out = x <= lo if closed else x < lo
    if hi is not None:
        above = x >= hi if closed else x > hi
        out = above if out is None else out | above
    return None if out is None or out.shape != x.shape else out.all(-1)


def _rows_of_first(node: Any, rows: torch.Tensor | None, slot: int) -> torch.Tensor | None:
    """mm's and addmm's first operand gets ``g @ other^T``: its row i is structural where g's is (the other
    operands' gradients mix rows: not followed)."""
    return rows if slot == 0 else _NONE


def _view(node: Any, rows: torch.Tensor | None) -> torch.Tensor | None:
    """A view back to the input's shape (the elements' order kept): an input row is structural where every output
    row it is made of is (a view that splits the last dim: maxout's ``view(n, k, 2)``), or where the output row it
    is part of is (one that merges it)."""
    if rows is None:
        return None
    size = tuple(node._saved_self_sym_sizes)
    if not size or size[-1] == 0 or rows.numel() == 0:
        return None
    total = torch.Size(size).numel()
    if total % rows.numel():
        return None
    last = total // rows.numel()  # (the output's last dim)
    if last == size[-1]:
        return rows.reshape(size[:-1])
    if size[-1] % last == 0:
        return rows.reshape(-1, size[-1] // last).all(-1).reshape(size[:-1])
    if last % size[-1] == 0:
        return rows.reshape(-1, 1).expand(-1, last // size[-1]).reshape(size[:-1])
    return None


def _signed(d: int) -> int:
    """A saved dim as given: nodes hand a negative one back as its unsigned 64-bit value (-1: 2**64 - 1)."""
    return d - (1 << 64) if d >= (1 << 63) else d


def _unsqueezed(node: Any, rows: torch.Tensor | None) -> torch.Tensor | None:
    """unsqueeze(d)'s input: the rows without d, or (d the last dim) each row of the input is an output row."""
    if rows is None:
        return None
    d = _signed(node._saved_dim) % (rows.dim() + 1)
    return rows.squeeze(d) if d < rows.dim() else rows.all(-1)


def _pooled(node: Any, rows: torch.Tensor | None) -> torch.Tensor | None:
    """max pooling's input gets each output element's sensitivity at one of its window's positions: a plane (the
    pooled dims of one sample and channel) is structural where the output's plane is."""
    if rows is None or node._raw_saved_self.unpack_hook is not None:
        return None
    size = node._saved_self.shape
    spatial = 3 if "3D" in node.name() else 2
    lead = len(size) - spatial
    if lead < 1 or rows.dim() != len(size) - 1:
        return None
    plane = rows.flatten(lead).all(-1)
    return plane.reshape(*plane.shape, *(1,) * (spatial - 1)).expand(size[:-1])


def _reduced(node: Any, rows: torch.Tensor | None) -> torch.Tensor | None:
    """amax/max along dims: each input element's gradient comes from the output element it was reduced into (0 or a
    share of it): an input row is structural where every output element it went into is."""
    if rows is None:
        return None
    if hasattr(node, "_saved_self_sym_sizes"):
        size = tuple(node._saved_self_sym_sizes)
    elif node._raw_saved_self.unpack_hook is None:
        size = tuple(node._saved_self.shape)
    else:
        return None
    dims = node._saved_dim
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    if not size or not dims:
        return None
    dims = sorted(_signed(d) % len(size) for d in dims)
    full = rows.unsqueeze(-1)  # (an output element is structural where its row is)
    if not node._saved_keepdim:
        for d in dims:
            full = full.unsqueeze(d)
    if full.dim() != len(size):
        return None
    return full.expand(size).all(-1)


# node type -> (how its output's structural rows give those of its edge at position i)
_FOLLOWED = {
    "ReluBackward0": lambda n, r, i: _relu(n, r),
    "MmBackward0": _rows_of_first,
    "AddmmBackward0": lambda n, r, i: _rows_of_first(n, r, i - 1),  # (edges: self, mat1, mat2)
    "ViewBackward0": lambda n, r, i: _view(n, r),
    "UnsafeViewBackward0": lambda n, r, i: _view(n, r),
    "CloneBackward0": lambda n, r, i: r,
    "SqueezeBackward0": lambda n, r, i: _view(n, r),
    "SqueezeBackward1": lambda n, r, i: _view(n, r),
    "SqueezeBackward2": lambda n, r, i: _view(n, r),
    "UnsqueezeBackward0": lambda n, r, i: _unsqueezed(n, r),
    # (x[:, 0] of a dim of size 1 is a view; a select of a longer dim makes zeros of its own, handled by _handed)
    "SelectBackward0": lambda n, r, i: _view(n, r) if n._saved_self_sym_sizes[_signed(n._saved_dim)] == 1 else _NONE,
    # clamp's and hardtanh's (ReLU6's) flat regions, as relu's (an edge of a tensor bound gets no rows: _NONE)
    "ClampMinBackward0": lambda n, r, i: _flat(n, r, "_saved_self", lambda n, x: x.amax(-1) < n._saved_min),
    "ClampMaxBackward0": lambda n, r, i: _flat(n, r, "_saved_self", lambda n, x: x.amin(-1) > n._saved_max),
    "ClampBackward1": lambda n, r, i: _flat(n, r, "_saved_self",
                                            lambda n, x: _outside(n, x, "_saved_min", "_saved_max", False)),
    "ClampBackward0": lambda n, r, i: _NONE if i else _flat(
        n, r, "_saved_self", lambda n, x: _outside(n, x, "_saved_min", "_saved_max", False)),
    "HardtanhBackward0": lambda n, r, i: _flat(n, r, "_saved_self",
                                               lambda n, x: _outside(n, x, "_saved_min_val", "_saved_max_val", True)),
    "ThresholdBackward0": lambda n, r, i: _flat(n, r, "_saved_self", lambda n, x: x.amax(-1) <= n._saved_threshold),
    # a max's and max pooling's other entries: rows of the output pass to the rows they were reduced from
    "MaxPool2DWithIndicesBackward0": lambda n, r, i: _pooled(n, r),
    "MaxPool3DWithIndicesBackward0": lambda n, r, i: _pooled(n, r),
    "AmaxBackward0": lambda n, r, i: _reduced(n, r),
    "AminBackward0": lambda n, r, i: _reduced(n, r),
    "MaxBackward0": lambda n, r, i: _reduced(n, r),
    "MinBackward0": lambda n, r, i: _reduced(n, r),
}


def flat_rows_reach(outputs: Sequence[Any], inputs: Sequence[Any]) -> bool:
    """Whether a whole structural row from a relu reaches a result of the backward of ``outputs`` (the gradients of
    ``inputs``, else of the leaves that are no parameter), through the nodes of ``_FOLLOWED`` only, with seeds that
    carry no structural zero. Nodes are visited once all their consumers have given their rows (a sum is
    structural only where every term is)."""
    roots = [(o.grad_fn, o.output_nr) for o in outputs if isinstance(o, torch.Tensor) and o.grad_fn is not None]
    if not roots:
        return False
    consumers: dict[Any, int] = {}
    stack, seen = [n for n, _ in roots], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is not None:
                consumers[nxt] = consumers.get(nxt, 0) + 1
                stack.append(nxt)
    ends: set | None = None
    if inputs:
        ends = {(e.node, e.output_nr) for e in (t if isinstance(t, GradientEdge) else get_gradient_edge(t)
                                                for t in inputs)}
    given: dict[tuple, Any] = {}  # (node, slot) -> rows, or _NONE, as summed so far
    for node, slot in roots:
        given[node, slot] = _NONE
    ready = [n for n, _ in roots if consumers.get(n, 0) == 0]
    done = set()
    while ready:
        node = ready.pop()
        if node in done:
            continue
        done.add(node)
        name = type(node).__name__
        rows_out = given.get((node, 0), _NONE)
        if name == "AccumulateGrad" and ends is None and rows_out is not None and bool(rows_out.any()) \
                and not isinstance(node.variable, torch.nn.Parameter):
            return True
        rule = _FOLLOWED.get(name)
        for i, (nxt, slot) in enumerate(node.next_functions):
            if nxt is None:
                continue
            rows = rule(node, rows_out, i) if rule is not None else _NONE
            key = (nxt, slot)
            if key in given:
                prior = given[key]
                rows = None if prior is None or rows is None else prior & rows
            given[key] = rows
            consumers[nxt] -= 1
            if consumers[nxt] == 0:
                ready.append(nxt)
    return ends is not None and any(given.get(e) is not None and bool(given[e].any()) for e in ends)
