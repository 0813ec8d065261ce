"""Gradient hooks whose result no op under the strong-zero mode made (``hook_result``): a tensor hook
(``Tensor.register_hook``) or a module's full backward hook that computes through NumPy or Python lists
(``torch.from_numpy(g.numpy() * 2)``, ``torch.tensor(g.tolist())``).

A hook written with torch ops is followed by the rules, op by op. One that leaves torch returns a tensor with no
support: it counted as fully supported, so the zeros of the padding it was given became values, met a NaN of the
padding further down (``0 x NaN`` in the mm of a weight gradient) and the gradient was NaN, silently. The rule: the
hook's values are taken as they are, and an element of its result is a structural zero where the hook was given a
structural zero there and returned exactly 0 (a hook that scales, clips or copies its gradient), whatever it
computed with (NumPy, then a torch op on NumPy's copy): in the program with the unused values deleted that element
does not exist, so nothing below may use it. Where the hook returned a nonzero
value at such an element (``g + 1``), the hook made that value itself: it is a value, as a torch op's ``g + 1`` is,
and the pass names the hook in its ``OpaqueBackwardWarning`` if the gradients end up NaN/Inf.

Tensor hooks are not listed by autograd's nodes, so ``Tensor.register_hook`` is wrapped from gradwise's import on
(hooks registered before that are not seen; gradwise's and torch's own, and hooks on leaves, are left alone): a
user's hook on a non-leaf tensor is registered as it is, between two hooks of gradwise's (``_Before``, ``_After``:
the engine runs a tensor's hooks in order, each on the last one's result), which outside a strong-zero pass return
at once (one read of the dispatch stack's length, one of an empty list). A hook on a non-leaf tensor
may also make NaN/Inf from the zeros it is given (``g / g.norm(dim=-1, keepdim=True)`` at a padding row: 0/0),
which no plan can see: a backward whose graph holds one runs under the mode (the 'check' path, ``USERS`` and
``reaches``), where its torch ops meet their rules (the division of a structural zero is one). Module hooks run
inside the ``BackwardHookFunctionBackward`` node, which ``_mode.watch_functions`` hooks for the pass
(``_mode.module_hook_watch``), and which the plan sends to the 'check' path already (a custom Function's node).

May import: torch, _rules (and _mode, at call time).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import _disable_current_modes

from gradwise._strong_zeros._rules import _is_float

_FIX = ("compute it with torch ops (gradwise follows those), or return exact zeros where it was given them "
        "(the padding's)")


def hook_result(mode: Any, given: torch.Tensor, result: Any, produced: dict, what: str) -> Any:
    """``result`` of a hook that was ``given`` structural zeros, with its support recorded: structural where the
    hook was given a structural zero and returned exactly 0, whatever it computed with (a result the rules followed
    keeps their support where that is narrower). A result no op under the mode made (not in ``produced``: NumPy's,
    or a tensor the hook holds) is copied first (its storage may be the caller's); where it holds nonzero values
    there, ``what`` is named in ``mode.lost``. Called with the modes off."""
    if not isinstance(result, torch.Tensor) or not _is_float(result) or result.layout != torch.strided \
            or result.shape != given.shape:
        return result
    sup = mode.supports
    s_in = sup.of(given)
    if s_in is None:
        return result
    if result.untyped_storage()._cdata == given.untyped_storage()._cdata:
        # given back, or a view of it: the storage's mask holds, unless the hook wrote there past the mode (NumPy in
        # place, g.numpy()[pad] = 5): those values are the hook's, as they are when it returns NumPy's copy
        if result.stride() != given.stride() or result.storage_offset() != given.storage_offset():
            return result  # (another layout of the same storage: its positions are not given's)
        written = ~s_in & (result != 0)
        if bool(written.any()):
            mode.lost[what] = _FIX
            sup.record(result, s_in | written)
        return result
    used = result != 0  # (NaN: used)
    keep = s_in | used
    made = id(result) in produced
    current = sup.of(result) if made else None
    if current is not None and bool((current <= keep).all()):
        return result  # (the rules' support is already as narrow)
    if not made:
        if bool((used & ~s_in).any()):
            mode.lost[what] = _FIX
        if bool(keep.all()):
            return result
        result = result.clone()
    sup.record(result, keep if current is None else current & keep)
    return result


class _Before:
    """Registered right before a user's tensor hook: where the pass gives it structural zeros, notes what it was
    given and starts noting what ops under the mode make (``mode.produced``). Returns None (the gradient as is).
    The user's hook itself stays in the tensor's hooks as the user registered it, called by the engine (a trace
    knows a hook by that: ``gradwise._trace._common.engine_hook``)."""

    __slots__ = ("__weakref__", "shared")

    def __init__(self, shared: list) -> None:
        self.shared = shared

    def __call__(self, grad: torch.Tensor) -> None:
        if not torch._C._len_torch_dispatch_stack() or not isinstance(grad, torch.Tensor):
            return
        from gradwise._strong_zeros._mode import running_mode

        mode = running_mode()
        if mode is None or torch._C._functorch.is_functorch_wrapped_tensor(grad) or \
                torch._C._functorch.is_legacy_batchedtensor(grad):  # (a batched seed's: gradcheck's batched
            return  # check, is_grads_batched; no storage to read, no support of its own)
        with _disable_current_modes():
            zeroed = mode.supports.zeroed(grad)
        if zeroed:
            self.shared[:] = [mode, grad, mode.produced]
            mode.produced = {}


class _After:
    """Registered right after a user's tensor hook: records the support of what it returned (``hook_result``).
    ``key``: its tensor's node (as ``_carry._key``), for ``reaches``."""

    __slots__ = ("__weakref__", "key", "name", "shared")

    def __init__(self, shared: list, key: tuple[str, int], name: str) -> None:
        self.shared, self.key, self.name = shared, key, name

    def __call__(self, grad: Any) -> Any:
        if not self.shared:
            return None
        (mode, given, prior), self.shared[:] = self.shared, []
        produced, mode.produced = mode.produced, prior
        if prior is not None:
            prior.update(produced)
        with _disable_current_modes():
            out = hook_result(mode, given, grad, produced, f"the tensor hook {self.name}, which computes outside "
                              "torch ops and returned nonzero values where its gradient held structural zeros")
        return None if out is grad else out


def _name(hook: Any) -> str:
    return getattr(hook, "__qualname__", None) or type(hook).__qualname__


_ORIGINAL = torch.Tensor.register_hook

# the user's hooks on non-leaf tensors, alive (their _After, which lives as long as its tensor's node holds it): a
# computation between two nodes that the plan cannot see, which may make NaN/Inf from the zeros it is given
# (g / g.norm() at a padding row: 0/0). A backward whose graph holds one takes the 'check' path (``reaches``, read
# by _planning).
USERS: weakref.WeakSet[_After] = weakref.WeakSet()


@functools.wraps(_ORIGINAL)
def register_hook(self: torch.Tensor, hook: Callable[..., Any]) -> Any:
    if torch._C._has_torch_function_unary(self):
        # (a tensor subclass's or a TorchFunctionMode's __torch_function__ gets this call once, with the user's hook,
        # as without gradwise; where it registers the hook it calls this function again, with torch functions off,
        # which registers the pair around it. Wrapping here first registered each of the three through it, and the
        # hook a second time wrapped: five hooks and three calls seen.)
        return _ORIGINAL(self, hook)
    node = self.grad_fn
    if node is None or not callable(hook) or isinstance(hook, (_Before, _After)) or \
            str(getattr(hook, "__module__", None) or "").startswith(("gradwise.", "torch.")):
        # (a leaf's hook feeds its .grad alone; gradwise's own hooks, and torch's: FSDP's, register_multi_grad_hook's)
        return _ORIGINAL(self, hook)
    shared: list = []
    after = _After(shared, (type(node).__name__, node._sequence_nr()), _name(hook))
    before = _ORIGINAL(self, _Before(shared))
    handle = _ORIGINAL(self, hook)
    behind = _ORIGINAL(self, after)
    USERS.add(after)
    remove = handle.remove

    def remove_all() -> None:  # (the hook's handle removes the pair around it too)
        before.remove()
        remove()
        behind.remove()

    handle.remove = remove_all
    return handle


def reaches(nodes: Iterable[Any]) -> bool:
    """Whether a graph (its nodes) holds the node of a tensor with a hook of the user's (``USERS``)."""
    keys = {a.key for a in list(USERS)}
    return bool(keys) and any((type(n).__name__, n._sequence_nr()) in keys for n in nodes)


def install() -> None:
    """Wrap ``Tensor.register_hook`` (once, at gradwise's import)."""
    if torch.Tensor.register_hook is _ORIGINAL:
        torch.Tensor.register_hook = register_hook
