"""Whether relu's structural zeros reach a nested backward's results as whole rows (``flat_rows_reach``).

A backward nested in a 'check' pass (a reentrant checkpoint's, a custom backward's ``torch.autograd.grad``) whose
results only relu's (clamp's, a max's) zeros reach runs plain: run strong, every checkpointed Linear+ReLU block would
run op by op. But those zeros reach its results through a Linear only as whole rows: a row of the input's gradient
is a structural zero where the relu after it is flat in the whole row (a zero padding row of a bias-free block,
``relu(0 @ w)``), and a custom backward after it may meet them with 0/0 (``g / (2 sqrt(x))`` at that zero row). This
module answers, before the backward runs and from the relus' saved results alone, whether any such row reaches the
results: one max over each row of each relu on the way, nothing on the other nodes. Where one does, the backward
runs strong and hands its results' zeros to the pass (exact, as for padding's zeros); where none does, plain
(PyTorch's bits; nothing was lost). Only a few node types are followed (Linear's, relu's, views); a row met by
another node, and relu's zeros that reach the results elementwise (a block that starts with a relu), are not
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


def _rows_of_first(node: Any, rows: torch.Tensor | None, slot: int) -> torch.Tensor | None:
    """mm's and addmm's first operand gets ``g @ other^T``: its row i is structural where g's is (the other
    operands' gradients mix rows: not followed)."""
    return rows if slot == 0 else _NONE


def _view(node: Any, rows: torch.Tensor | None) -> torch.Tensor | None:
    """A view back to the input's shape that keeps the last dim: the rows reshape with the leading dims."""
    if rows is None:
        return None
    size = tuple(node._saved_self_sym_sizes)
    if not size or rows.numel() * size[-1] != torch.Size(size).numel():
        return None
    return rows.reshape(size[:-1])


# node type -> (how its output's structural rows give those of its edge at position i)
_FOLLOWED = {
    "ReluBackward0": lambda n, r, i: _relu(n, r),
    "MmBackward0": _rows_of_first,
    "AddmmBackward0": lambda n, r, i: _rows_of_first(n, r, i - 1),  # (edges: self, mat1, mat2)
    "ViewBackward0": lambda n, r, i: _view(n, r),
    "UnsafeViewBackward0": lambda n, r, i: _view(n, r),
    "CloneBackward0": lambda n, r, i: r,
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
