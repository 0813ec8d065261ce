"""The plan before backward: ``_plan`` chooses plain, check or strong from the graph (which nodes can make a
structural zero, ``_zero_reach``) and the finiteness of what those nodes saved (``_all_finite``).

May import: torch, gradwise._masks, _contract, _traced, _autograd_graph, _node_facts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gradwise._masks import all_finite as _all_finite
from gradwise._strong_zeros import _contract
from gradwise._strong_zeros._autograd_graph import _root_nodes
from gradwise._strong_zeros._node_facts import _NODE_TYPES, _node_type, _readable
from gradwise._strong_zeros._traced import traced


def _graph(roots: Sequence[Any]) -> tuple[dict[Any, tuple], dict[Any, int]]:
    """Every node of the graph once: node -> (its type's facts, whether it makes structural zeros, its edges);
    and how many edges lead to each node."""
    graph: dict[Any, tuple] = {}
    consumers: dict[Any, int] = {}
    types = _NODE_TYPES
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node in graph:
            continue
        info = types.get(type(node)) or _node_type(node)
        makes = info[4]
        if makes.__class__ is not bool:
            makes = makes(node)
        edges = node.next_functions
        # (whether it makes zeros, whether they reach its outputs)
        graph[node] = (info, makes, edges, makes and (info[6] is None or not info[6](node)))
        for n, _ in edges:
            if n is not None:
                consumers[n] = consumers.get(n, 0) + 1
                stack.append(n)
    return graph, consumers


def _zero_reach(roots: Sequence[Any], graph: dict[Any, tuple], consumers: dict[Any, int]) -> dict[Any, bool]:
    """Which nodes a structural zero can reach: a node's own zeros (it makes them), or zeros arriving from above.
    The engine adds the contributions of all consumers of a node's output, and a sum is a structural zero only
    where every term is one, so zeros arrive at an output only when *every* consumer of it sends them (a
    transformer's residual connection sends none: below it nothing is reached). Consumers come first
    (topological order); a root's sensitivity is its seed, a value. ``consumers`` is used up."""
    if not any(makes for _, makes, _, _ in graph.values()):
        return dict.fromkeys(graph, False)
    sent: dict[Any, bool] = {}  # node (its output 0) or (node, slot) -> every consumer of it so far sends zeros
    other_slots: dict[Any, set[int]] = {}  # nodes with consumers on outputs other than 0 (split, unbind, ...)
    reach: dict[Any, bool] = {}
    is_root = set(roots)
    stack = [r for r in is_root if r not in consumers]
    while stack:
        node = stack.pop()
        _, makes, edges, sends = graph[node]
        reached = node not in is_root and (sent.get(node, False) or
                                           any(sent[(node, k)] for k in other_slots.get(node, ())))
        reach[node] = reached or makes
        reached = reached or sends
        for n, slot in edges:
            if n is None:
                continue
            if slot:
                key: Any = (n, slot)
                other_slots.setdefault(n, set()).add(slot)
            else:
                key = n
            if not reached:
                sent[key] = False
            elif key not in sent:
                sent[key] = True
            left = consumers[n] - 1
            consumers[n] = left
            if not left:
                stack.append(n)
    return reach  # (a node left out, on a cycle, counts as reached: _plan's default)


def _plan(t_outputs: Sequence[Any], seeds: Sequence[Any]) -> str:
    """'plain' (PyTorch is already right), 'strong' (a NaN/Inf or a singular point is in the graph where a
    structural zero can reach it), 'check' (the graph has nodes gradwise knows nothing about: one pass under
    the mode, as 'strong'), or 'compiled' (as 'check', where the only such nodes are torch.compile'd backwards:
    each then runs compiled, and op by op only where that made NaN; ``_compile._hybrid``). Raises
    _contract.Unreadable on a saved tensor it cannot read (the backward runs plain).

    This runs before every backward under strong zeros, so it is written for speed: one walk over the graph and a
    topological pass over what it found (_zero_reach), reading only what a structural zero could reach (see
    MAKES_NO_ZEROS; a node reached through some consumers but not all receives none), each saved tensor once (a layer's
    output saved by two nodes, q/k/v views of one projection: identified by what they read), and one
    reduction per saved tensor (small ones together). Singular tests of nodes no zero reaches from above run
    only when a softmax/exp node below holds exact zeros in its output (_ZERO_OUTPUT_TESTS)."""
    if traced((*t_outputs, *seeds)):  # a traced backward (torch.compile, make_fx): a graph, no data to read;
        return "plain"  # compiled graphs get strong zeros from gradwise._strong_zeros._compile instead
    known_all = True
    only_compiled = True  # every node gradwise knows nothing about is a torch.compile'd backward
    saved: list[torch.Tensor] = []
    deferred: list = []  # singular-point tests of nodes no structural zero reaches from above
    zero_outputs: list = []  # nodes whose backward multiplies by their own output (softmax, exp)
    seen_tensors: set[tuple] = set()
    roots = [r for r in _root_nodes(t_outputs) if r is not None]
    graph, consumers = _graph(roots)
    reach = _zero_reach(roots, graph, consumers)
    for node, ((_, read, known, singular, _, zero_output, _), _, _, _) in graph.items():
        reached = reach.get(node, True)
        known_all &= known
        if not known and only_compiled:
            only_compiled = type(node).__name__ == "CompiledFunctionBackward"
        if zero_output is not None:
            zero_outputs.append((node, zero_output))
        if not reached:
            if singular is not None:
                deferred.append((node, singular))
            continue
        readable = True
        for name in read:
            try:
                value = getattr(node, name, None)
            except RuntimeError:  # freed by an earlier backward: nothing to read (the engine raises if it needs it)
                continue
            for raw in value if isinstance(value, (tuple, list)) else (value,):
                if raw is None:
                    continue
                if raw.unpack_hook is not None:  # a checkpoint's hook would recompute the forward
                    readable = False
                    continue
                t = raw.data
                if not isinstance(t, torch.Tensor) or not t.is_floating_point() or not t.numel():
                    continue
                if t.layout != torch.strided or t.is_meta or t.is_nested or t.__class__ is not torch.Tensor:
                    _contract.check_saved(t)  # raises Unreadable for a kind it cannot read (the backward runs plain)
                if t.layout != torch.strided:
                    key: tuple = (id(t),)
                else:
                    ptr = t.data_ptr()
                    if ptr == t.storage_offset() * t.element_size():  # storage freed until a hook refills it
                        # (FSDP's resharded parameters): a freed storage's pointer is 0, plus the view's offset
                        readable = False
                        continue
                    key = (ptr, t.dtype, t.shape, t.stride())
                if key not in seen_tensors:
                    seen_tensors.add(key)
                    saved.append(t)
        known_all &= readable
        only_compiled &= readable
        if singular is not None and readable and singular(node):
            return "strong"
    # a softmax/exp output of exactly 0 is a structural zero of its own: an infinite derivative (sqrt of a masked
    # softmax, its entropy) meets it inside that node's backward. The singular tests (on small tensors, usually)
    # go first; the outputs are read only when one of them holds.
    if deferred and zero_outputs and any(_readable(n) and test(n) for n, test in deferred) and \
            any(_readable(n) and test(n) for n, test in zero_outputs):
        return "strong"
    if saved:  # a seed's NaN/Inf matters only where a structural zero can meet it
        saved.extend(t for t in seeds if isinstance(t, torch.Tensor) and t.is_floating_point())
    if not _all_finite(saved):
        return "strong"
    return "plain" if known_all else "compiled" if only_compiled else "check"
