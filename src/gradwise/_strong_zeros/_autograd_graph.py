"""Walking an autograd graph: its nodes (``_walk``), root nodes, leaves, and freeing a retained graph's saved
tensors (``_release``, of the nodes a backward toward some inputs ran: ``_saved_toward``).

May import: torch, _node_facts.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from gradwise._strong_zeros._node_facts import _raw_saved

_ACCUMULATE_GRAD = torch._C._functions.AccumulateGrad


def _walk(roots: Sequence[Any]) -> Iterator[Any]:
    seen: set[Any] = set()
    stack = [r for r in roots if r is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(n for n, _ in node.next_functions if n is not None)


def _root_nodes(t_outputs: Sequence[Any]) -> list[Any]:
    nodes = []
    for t in t_outputs:
        if isinstance(t, torch.Tensor):
            nodes.append(t.grad_fn if t.grad_fn is not None else _grad_accumulator(t))
        else:  # GradientEdge
            nodes.append(t.node)
    return nodes


def _grad_accumulator(t: torch.Tensor) -> Any:
    return torch.autograd.graph.get_gradient_edge(t).node if t.requires_grad else None


def _freed(_: object) -> torch.Tensor:
    raise RuntimeError(
        "Trying to backward through the graph a second time (or directly access saved tensors after they "
        "have already been freed). Saved intermediate values of the graph are freed when you call "
        ".backward() or autograd.grad(). Specify retain_graph=True if you need to backward through the graph "
        "a second time or if you need to access saved tensors after calling backward."
    )


def _saved_toward(roots: Sequence[Any], inputs: Sequence[torch.Tensor]) -> list[Any]:
    """The ``SavedTensor`` objects of the nodes a backward restricted to ``inputs`` runs (``backward(inputs=)``,
    ``autograd.grad``): those on a path from the roots to an input's node. The engine runs no other node, and
    their saved tensors stay for a later backward through them (an input's own node runs only if another input
    lies below it)."""
    targets = {torch.autograd.graph.get_gradient_edge(t).node for t in inputs
               if isinstance(t, torch.Tensor) and t.requires_grad}
    reaches: dict[Any, bool] = {}
    stack = [(r, False) for r in roots if r is not None]
    while stack:  # iterative post-order: a node is finished after all its children (a DAG)
        node, children_done = stack.pop()
        if children_done:
            reaches[node] = any(c in targets or reaches.get(c, False) for c, _ in node.next_functions if c is not None)
        elif node not in reaches:
            reaches[node] = False  # (seen; set for real when its children are done)
            stack.append((node, True))
            stack.extend((c, False) for c, _ in node.next_functions if c is not None and c not in reaches)
    return [raw for node, ran in reaches.items() if ran and type(node) is not _ACCUMULATE_GRAD
            for raw in _raw_saved(node)]


def _graph_parts(roots: Sequence[Any]) -> tuple[list[torch.Tensor], list[Any]]:
    """One walk of a graph: its leaves (AccumulateGrad's variables) and the ``SavedTensor`` objects its nodes
    hold (for ``_release``). It runs after every watched backward: a leaf is told by its node's type (a failed
    ``getattr(node, "variable")`` raises and catches per node)."""
    seen: set[Any] = set()
    stack = [r for r in roots if r is not None]
    leaves: list[torch.Tensor] = []
    saved: list[Any] = []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if type(node) is _ACCUMULATE_GRAD:
            leaves.append(node.variable)
            continue
        saved.extend(_raw_saved(node))
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return leaves, saved


def _release(saved: Sequence[Any]) -> None:
    for raw in saved:  # runs after every watched backward: a plain loop, no context manager per tensor
        try:
            raw.register_hooks(_none, _freed)
        except RuntimeError:  # already hooked (checkpoint) or already freed
            pass


def _none(_: object) -> None:
    return None


def _leaves(t_outputs, inputs) -> list[torch.Tensor]:
    if inputs:
        return [t for t in inputs if isinstance(t, torch.Tensor)]
    leaves = []
    for node in _walk(_root_nodes(t_outputs)):
        var = getattr(node, "variable", None)
        if isinstance(var, torch.Tensor):
            leaves.append(var)
    return leaves
