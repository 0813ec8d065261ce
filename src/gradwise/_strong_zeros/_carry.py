"""Structural zeros that outlive a ``create_graph=True`` pass, for the backward of the gradient (double backward).

A strong pass annihilates inside the dispatch mode, below autograd: the graph it builds for the gradient records
the formula's op (``a / x``), not the annihilation. Differentiating that gradient again (a gradient penalty,
Hessian-vector products) would go through ``a / x`` at the positions the first pass set to 0, where the formula's
derivative is NaN (``-a / x**2`` at ``a = x = 0``). In the program without the unused values those positions do
not exist: the tensor is constantly 0 there, so nothing flows back through them.

So at the end of a ``create_graph`` pass, every tensor the pass made with structural zeros that is part of the new
graph gets a gradient hook: the sensitivity arriving at it is 0 at those positions, and a structural zero to
the strong pass running then. The plan of a later backward takes the strong path when its graph holds such a
tensor's node. On finite data the hook changes nothing but the sign of a zero: a structurally zero output of
the first pass is a product with a structural 0, whose derivative there is 0 too.

May import: torch, _supports.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch

from gradwise._strong_zeros._supports import _Supports

# First-pass tensors with structural zeros, as values the new graph may have saved (mm saves one operand for the
# other's gradient; a slice's backward of a constant seed needs no gradient of its own): storage -> (weak
# reference, support). A later pass multiplying by them meets zeros that are structural in the program without
# the unused values (those positions do not exist there), so it takes them as such (`seed`), and its plan takes
# the strong path while its graph saves one (`values_reached`).
# Each entry also keeps the tensor's layout and version: a write after the pass (``gx.add_(1)`` under no_grad,
# ``gx.t_()``) makes its recorded zeros stale, and the entry is dropped rather than trusted (`_live`).
CARRIED_VALUES: dict[int, tuple[weakref.ref, torch.Tensor, tuple]] = {}

# the hooks put on first-pass tensors: each lives as long as its tensor's autograd node (which holds it), and
# is known by (node type, sequence number): node wrappers come and go, those stay (a match in another thread's
# graph only makes that backward take the strong path, which is exact anyway)
CARRIED: weakref.WeakSet[Any] = weakref.WeakSet()


def carry(made: Iterable[Callable[[], torch.Tensor | None]], supports: _Supports) -> None:
    """Hook each tensor the pass made (``made``: references, in order) that requires grad now and holds
    structural zeros (its final support, after any in-place write)."""
    seen: set[int] = set()
    for ref in made:
        t = ref()
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        if not supports.zeroed(t):
            continue
        s = supports.of(t)
        if t.is_floating_point() and t.layout == torch.strided:  # as a value the new graph may have saved
            key = t.untyped_storage()._cdata
            CARRIED_VALUES[key] = (weakref.ref(t, lambda _, key=key: CARRIED_VALUES.pop(key, None)),
                                   s.expand(t.shape).clone(), _state(t))
        if not t.requires_grad or t.grad_fn is None:
            continue
        hook = _masking(s.expand(t.shape).clone())
        hook.key = _key(t.grad_fn)
        t.register_hook(hook)
        CARRIED.add(hook)


def _state(t: torch.Tensor) -> tuple:
    return t._version, t.shape, t.stride(), t.storage_offset(), t.untyped_storage()._cdata  # (set_, .data =)


def _live(key: int) -> torch.Tensor | None:
    """The carried tensor under storage ``key`` if its values are still those the pass made, else None (and the
    entry is dropped: its zeros may have been overwritten, or it is another shape now)."""
    entry = CARRIED_VALUES.get(key)
    if entry is None:
        return None
    t = entry[0]()
    if t is None or _state(t) != entry[2]:
        CARRIED_VALUES.pop(key, None)
        return None
    return t


def _key(node: Any) -> tuple[str, int]:
    return type(node).__name__, node._sequence_nr()


def _masking(support: torch.Tensor) -> Any:
    def hook(grad: torch.Tensor | None) -> torch.Tensor | None:
        if grad is None:  # an undefined gradient (an output nothing differentiated)
            return None
        # under the strong pass the zeros are structural: new_zeros in a backward makes structural zeros, and
        # where's rule carries them into its output
        return torch.where(support, grad, grad.new_zeros(()))

    return hook


def reaches(nodes: Iterable[Any]) -> bool:
    """Whether a graph (its nodes) holds the node of a carried tensor: its backward must take the strong path."""
    keys = {hook.key for hook in list(CARRIED)}
    return bool(keys) and any(_key(n) in keys for n in nodes)


def values_reached(nodes: Iterable[Any]) -> bool:
    """Whether a graph's nodes save a carried first-pass value (then its backward takes the strong path)."""
    from gradwise._strong_zeros._node_facts import _raw_saved

    for node in nodes:
        for raw in _raw_saved(node):
            t = raw.data
            if isinstance(t, torch.Tensor) and t.layout == torch.strided and \
                    _live(t.untyped_storage()._cdata) is not None:
                return True
    return False


def seed(supports: _Supports) -> None:
    """Record the carried first-pass values' structural zeros in a new pass's supports."""
    for key in list(CARRIED_VALUES):
        t = _live(key)
        if t is not None:
            supports.record(t, CARRIED_VALUES[key][1])

