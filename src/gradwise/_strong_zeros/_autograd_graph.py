"""Walking an autograd graph: its nodes (``_walk``), root nodes, leaves, and freeing a retained graph's saved
tensors (``_release``, of the nodes a backward toward some inputs ran: ``_saved_toward``).

May import: torch, gradwise._graph, _node_facts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gradwise._graph import nodes as _walk
from gradwise._strong_zeros._node_facts import _NODE_TYPES, _node_type, _raw_saved

_ACCUMULATE_GRAD = torch._C._functions.AccumulateGrad


def _root_nodes(t_outputs: Sequence[Any]) -> list[Any]:
    nodes = []
    for t in t_outputs:
        if isinstance(t, torch.Tensor):
            fn = t.grad_fn  # (read once: each read looks the node's Python object up, or makes it)
            nodes.append(fn if fn is not None else _grad_accumulator(t))
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


def _saved_toward(roots: Sequence[Any], inputs: Sequence[Any], inputs_run: bool = False) -> list[Any]:
    """The ``SavedTensor`` objects of the nodes a backward restricted to ``inputs`` runs (``backward(inputs=)``,
    ``autograd.grad``): those on a path from the roots to an input's node. The engine runs no other node, and
    their saved tensors stay for a later backward through them (an input's own node runs only if another input
    lies below it, or always, ``inputs_run``, under ``backward(inputs=)``: the engine runs a non-leaf input's node
    there, its gradient kept by ``retain_grad``)."""
    edges = torch.autograd.graph.GradientEdge  # (an input given as one: its node is the target)
    targets = {t.node if isinstance(t, edges) else torch.autograd.graph.get_gradient_edge(t).node for t in inputs
               if isinstance(t, edges) or (isinstance(t, torch.Tensor) and t.requires_grad)}
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
    return [raw for node, ran in reaches.items() if (ran or (inputs_run and node in targets))
            and type(node) is not _ACCUMULATE_GRAD
            for raw in _raw_saved(node)]


def _graph_parts(roots: Sequence[Any], compiled: list[Any] | None = None) -> tuple[list[torch.Tensor], list[Any]]:
    """One walk of a graph: its leaves (AccumulateGrad's variables) and the ``SavedTensor`` objects its nodes
    hold (for ``_release``); the compiled backward nodes (CompiledFunctionBackward) are appended to
    ``compiled`` when it is a list. It runs for every watched backward, so it is written for speed: a leaf is
    told by its node's type (a failed ``getattr(node, "variable")`` raises and catches per node), the saved
    attributes come from the per-type table, and a node already seen is not pushed again."""
    seen: set[Any] = set()
    stack = [r for r in roots if r is not None]
    leaves: list[torch.Tensor] = []
    saved: list[Any] = []
    types, pop, push, see = _NODE_TYPES, stack.pop, stack.append, seen.add
    while stack:
        node = pop()
        if node in seen:
            continue
        see(node)
        cls = type(node)
        if cls is _ACCUMULATE_GRAD:
            leaves.append(node.variable)
            continue
        if compiled is not None and cls.__name__ == "CompiledFunctionBackward":
            compiled.append(node)
        for name in (types.get(cls) or _node_type(node))[0]:
            try:
                raw = getattr(node, name)
            except RuntimeError:  # freed by an earlier backward
                continue
            if raw.__class__ is tuple or raw.__class__ is list:
                saved.extend(r for r in raw if r is not None)
            elif raw is not None:
                saved.append(raw)
        for child, _ in node.next_functions:
            if child is not None and child not in seen:
                push(child)
    return leaves, saved


def _release(saved: Sequence[Any]) -> None:
    """Free what the ``SavedTensor`` objects hold, as the engine frees a graph it does not keep: the pack hook
    drops the tensor (``id``, a builtin: no Python frame per tensor, and the int it keeps holds nothing), and a
    later unpack raises PyTorch's own error. Passed over: a slot saved as None (addmm's ``mat2`` when ``mat1``
    needs no gradient) or already freed (``.data`` is None; it runs no unpack hook), and a slot already hooked
    (checkpoint's, save_on_cpu's: what they packed stays theirs), which ``register_hooks`` refuses with a C++
    error whose backtrace costs ~30 us: the cheap reads tell them first. No op of the program: a dispatch mode on
    (a trace the watch has just started) does not see it (register_hooks detaches a saved Python scalar, ``x * 0``'s,
    which a mode would meet as an int and refuse)."""
    if torch._C._len_torch_dispatch_stack():
        with torch.utils._python_dispatch._disable_current_modes():
            return _release(saved)
    for raw in saved:  # runs after every watched backward: a plain loop, no context manager per tensor
        if raw.unpack_hook is None and raw.data is not None:
            try:
                raw.register_hooks(id, _freed)
            except RuntimeError:  # (none known: the checks above tell the refused slots)
                pass


def _leaves(t_outputs, inputs) -> list[torch.Tensor]:
    if inputs:
        return [t for t in inputs if isinstance(t, torch.Tensor)]
    leaves = []
    for node in _walk(_root_nodes(t_outputs)):
        var = getattr(node, "variable", None)
        if isinstance(var, torch.Tensor):
            leaves.append(var)
    return leaves
