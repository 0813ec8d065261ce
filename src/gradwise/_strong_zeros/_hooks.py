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
(hooks registered before that are not seen; gradwise's and torch's own are left unwrapped); the wrapper passes
straight through outside a strong-zero pass (one read of the dispatch stack's length). A hook on a non-leaf tensor
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
            or result.shape != given.shape or result.untyped_storage()._cdata == given.untyped_storage()._cdata:
        return result  # (given back, or a view of it: the storage's mask holds)
    sup = mode.supports
    s_in = sup.of(given)
    if s_in is None:
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


class _Followed:
    """A tensor hook, followed by the pass where it returns a tensor made outside torch ops. ``key``: its tensor's
    node (as ``_carry._key``), for a hook on a non-leaf tensor."""

    __slots__ = ("__weakref__", "hook", "key")

    def __init__(self, hook: Callable[..., Any], key: tuple[str, int] | None) -> None:
        self.hook, self.key = hook, key

    def __call__(self, grad: torch.Tensor) -> Any:
        if not torch._C._len_torch_dispatch_stack():
            return self.hook(grad)
        from gradwise._strong_zeros._mode import running_mode

        mode = running_mode()
        if mode is None or not isinstance(grad, torch.Tensor) or torch._C._functorch.is_functorch_wrapped_tensor(grad):
            return self.hook(grad)
        with _disable_current_modes():
            zeroed = mode.supports.zeroed(grad)
        if not zeroed:
            return self.hook(grad)
        prior, mode.produced = mode.produced, {}
        try:
            result = self.hook(grad)
        finally:
            produced, mode.produced = mode.produced, prior
        if prior is not None:
            prior.update(produced)
        with _disable_current_modes():
            return hook_result(mode, grad, result, produced, f"the tensor hook {_name(self.hook)}, which computes "
                               "outside torch ops and returned nonzero values where its gradient held structural zeros")

    def __repr__(self) -> str:
        return f"_Followed({self.hook!r})"


def _name(hook: Any) -> str:
    return getattr(hook, "__qualname__", None) or type(hook).__qualname__


_ORIGINAL = torch.Tensor.register_hook

# the user's hooks on non-leaf tensors, alive (a hook lives as long as its tensor's node holds it): a computation
# between two nodes that the plan cannot see, which may make NaN/Inf from the zeros it is given (g / g.norm() at a
# padding row: 0/0). A backward whose graph holds one takes the 'check' path (``reaches``, read by _planning).
USERS: weakref.WeakSet[_Followed] = weakref.WeakSet()


@functools.wraps(_ORIGINAL)
def register_hook(self: torch.Tensor, hook: Callable[..., Any]) -> Any:
    if not callable(hook) or isinstance(hook, _Followed) or \
            str(getattr(hook, "__module__", None) or "").startswith(("gradwise.", "torch.")):
        return _ORIGINAL(self, hook)  # (gradwise's own hooks, and torch's: FSDP's, register_multi_grad_hook's)
    node = self.grad_fn
    followed = _Followed(hook, None if node is None else (type(node).__name__, node._sequence_nr()))
    handle = _ORIGINAL(self, followed)
    if followed.key is not None:
        USERS.add(followed)
    return handle


def reaches(nodes: Iterable[Any]) -> bool:
    """Whether a graph (its nodes) holds the node of a tensor with a hook of the user's (``USERS``)."""
    keys = {f.key for f in list(USERS)}
    return bool(keys) and any((type(n).__name__, n._sequence_nr()) in keys for n in nodes)


def install() -> None:
    """Wrap ``Tensor.register_hook`` (once, at gradwise's import)."""
    if torch.Tensor.register_hook is _ORIGINAL:
        torch.Tensor.register_hook = register_hook
