"""Which overloads of an aten op are the same computation: ``functional_of`` maps an ``out=`` overload
(``mm.out``, ``add.out``, ``sum.IntList_out``, ``threshold_backward.grad_input``) to the functional overload with
the same arguments less the outputs (``mm.default``, ``add.Tensor``, ``sum.dim_IntList``,
``threshold_backward.default``). A rule written for the functional form then serves the ``out=`` form: it runs on
the functional overload and its result is copied into the caller's buffer (a rule calling ``func(*args,
**kwargs)`` on the ``out=`` form for its own pieces wrote them into the caller's buffer, or called an overload
that needs ``out``).

May import: torch only.
"""

from __future__ import annotations

from functools import cache
from typing import Any

__all__ = ["functional_of", "out_names"]


def out_names(func: Any) -> tuple[str, ...]:
    """The names of ``func``'s output arguments (``out``, ``grad_input``, ``values``/``indices``); () for a
    functional or in-place overload."""
    return _out_names(func)


@cache
def _out_names(func: Any) -> tuple[str, ...]:
    return tuple(a.name for a in func._schema.arguments if a.is_out)


@cache
def functional_of(func: Any) -> Any | None:
    """The functional overload computing what ``out=`` overload ``func`` writes (same arguments, in order, with
    the same types, less the outputs; it mutates nothing and returns as many tensors as ``func`` has outputs), or
    None (not an ``out=`` overload, or no such overload: ``func`` then runs as it is)."""
    schema = func._schema
    outs = [a for a in schema.arguments if a.is_out]
    if not outs:
        return None
    want = [(a.name, str(a.type)) for a in schema.arguments if not a.is_out]
    packet = func.overloadpacket
    for name in packet.overloads():
        op = getattr(packet, name)
        s = op._schema
        if op is func or s.is_mutable or len(s.returns) != len(outs):
            continue
        if [(a.name, str(a.type)) for a in s.arguments] == want:
            return op
    return None
