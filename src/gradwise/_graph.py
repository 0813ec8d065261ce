"""Walking an autograd graph, for every concern: ``nodes``, each node reachable from some roots, once.

May import: nothing of gradwise (strong zeros, the trace and the nonsmooth passes all read it).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any


def nodes(roots: Iterable[Any]) -> Iterator[Any]:
    """Each autograd node reachable from ``roots`` (nodes; None entries are passed over) once, depth first. A
    generator: a caller looking for one node stops the walk there."""
    seen: set[Any] = set()
    stack = [r for r in roots if r is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(n for n, _ in node.next_functions if n is not None)
