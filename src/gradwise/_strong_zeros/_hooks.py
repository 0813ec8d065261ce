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

Tensor hooks are not listed by autograd's nodes (a node holds its tensors' hooks dicts in C++, out of Python's
reach), so ``Tensor.register_hook`` is wrapped from gradwise's import on (hooks registered before that are not seen;
gradwise's and torch's own, and hooks on leaves, are left alone). The wrapper registers the user's hook as PyTorch
does and notes the tensor's hooks dict (``Tensor._backward_hooks``, the very dict the engine reads through the
node) with its node's sequence number (``HOOKED``: a weak reference, about 0.5 us a call against PyTorch's 1.8 us);
nothing else, so that a process that imports gradwise and never opens a block runs its hooks as PyTorch does
(benchmarks/bench_hooks.py). For the length of a strong-zero pass (``opened``, around the engine's run in
``_engine._run_strong``; from the first pass open in any thread to the last one closed) each user's hook in those
dicts is replaced, under its own key, by a ``_Wrapped`` one that notes what it was given and records the support
of what it returned; the pass's end puts the hook back. A key's value replaced keeps the dict's order and size (an
engine thread may be walking it), and the user's handle removes it with the hook: ``handle.remove()`` leaves
nothing of gradwise's at any time. A hook registered while a pass is open (a reentrant checkpoint's recomputation)
is wrapped as it is registered. So a model hooked at construction and trained inside ``strong_zeros()`` is seen.

Why not the others (sz33 registered two hooks of gradwise's around each user's hook at registration: ~10 us a call,
+18% on a step hooking every activation with gradwise merely imported): a wrapper installed only while a block is
open would miss the hooks registered before it (a model hooked at construction), and the node does not show them;
one hook registered in front instead of two would still cost a registration per call outside any block.

A hook on a non-leaf tensor may also make NaN/Inf from the zeros it is given (``g / g.norm(dim=-1,
keepdim=True)`` at a padding row: 0/0), or make structural zeros of its own (``torch.where(keep, g, 0)``), which no
plan can see: a backward whose graph holds a user's hook runs under the mode (the 'check' path, ``hooked``), where
its torch ops meet their rules (the division of a structural zero is one; the where's 0 branch is structural), as
gw.strong_zeros() follows any op of the program. hooks34 planned a hooked graph as without its hook where no
structural zero reached the hook (the hook given values only): the same hook's where then kept PyTorch's NaN or
removed it depending on zeros elsewhere in the graph (a column slice of the loss), which the review of hooks34 found
(test_review_hooks34): every hooked graph takes 'check', as before hooks34. What hooks34 keeps: registering costs
~0.5 us more than PyTorch's (the sz33 wrapper ~7 us: +17% on a step hooking every activation with gradwise merely
imported), and a graph without a user's hook pays one test of the noted hooks' nodes. The whole backward of a hooked
graph runs under the mode (bench_hooks' block columns: ~2.5-2.9x on a small MLP hooking every activation, ~1.4x on
the encoder); a pass with only the hooked region under the mode would cost less, but no eager pass switches the mode
per node and carries supports across that border: not done. Module hooks run inside the
``BackwardHookFunctionBackward`` node, which ``_mode.watch_functions`` hooks for the pass
(``_mode.module_hook_watch``), and which the plan sends to the 'check' path already (a custom Function's node).

May import: torch, _rules (and _mode, at call time).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
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


class _Wrapped:
    """A user's tensor hook for the length of a strong-zero pass (``opened``), in the hooks dict under the user's own
    key: where the pass gives it structural zeros, notes what it was given, starts noting what ops under the mode
    make (``mode.produced``), calls the hook and records the support of what it returned (``hook_result``). Any
    other call is the hook's own. ``__name__`` is the hook's (the engine names it in its errors)."""

    __slots__ = ("hook",)

    def __init__(self, hook: Callable[..., Any]) -> None:
        self.hook = hook

    @property
    def __name__(self) -> str:  # (AttributeError where the hook has none, as the engine expects then)
        return self.hook.__name__

    def __call__(self, grad: Any) -> Any:
        hook = self.hook
        if not torch._C._len_torch_dispatch_stack() or not isinstance(grad, torch.Tensor):
            return hook(grad)
        from gradwise._strong_zeros._mode import running_mode

        mode = running_mode()
        if mode is None or torch._C._functorch.is_functorch_wrapped_tensor(grad) or \
                torch._C._functorch.is_legacy_batchedtensor(grad):  # (a batched seed's: gradcheck's batched
            return hook(grad)  # check, is_grads_batched; no storage to read, no support of its own)
        with _disable_current_modes():
            zeroed = mode.supports.zeroed(grad)
        if not zeroed:
            return hook(grad)
        prior, mode.produced = mode.produced, {}
        try:
            result = hook(grad)
        finally:
            produced, mode.produced = mode.produced, prior
            if prior is not None:
                prior.update(produced)
        value = grad if result is None else result  # (None: the gradient as the hook left it, written in place too)
        with _disable_current_modes():
            out = hook_result(mode, grad, value, produced, f"the tensor hook {_name(hook)}, which computes outside "
                              "torch ops and returned nonzero values where its gradient held structural zeros")
        return result if out is value else out


def _name(hook: Any) -> str:
    return getattr(hook, "__qualname__", None) or type(hook).__qualname__


# torch's closures that run a user's hook (not torch's own): dynamo's RegisterHookOp calls the hook's traced body
# (a torch.compile'd function that registers a hook on an intermediate, with a backend that leaves it eager)
_CARRIERS = frozenset({"RegisterHookOp.__call__.<locals>.hook"})


def _users(hook: Any) -> bool:
    """Whether a hook in a tensor's dict is the user's (gradwise's and torch's own are left alone: FSDP's,
    register_multi_grad_hook's; a torch closure of _CARRIERS runs a user's)."""
    return callable(hook) and not isinstance(hook, _Wrapped) and \
        (not str(getattr(hook, "__module__", None) or "").startswith(("gradwise.", "torch."))
         or getattr(hook, "__qualname__", None) in _CARRIERS)


_ORIGINAL = torch.Tensor.register_hook
_has_torch_function = torch._C._has_torch_function_unary

# the hooks dicts of non-leaf tensors that a hook was registered on (``Tensor._backward_hooks``: the engine holds it
# through the tensor's node and calls its values in order), by id: (a weak reference to it, its node's sequence
# number: equal numbers of other threads' nodes only send a plan to the 'check' path). Entries of dicts gone are
# dropped as the table grows (``_prune``) and as a plan reads it.
HOOKED: dict[int, tuple[weakref.ref, int]] = {}
_limit = 256  # the size at which HOOKED is pruned next
_ref = weakref.ref
_open = 0  # strong-zero passes running, in all threads: while any is, every user's hook in HOOKED is wrapped
_LOCK = threading.RLock()


@functools.wraps(_ORIGINAL)
def register_hook(self: torch.Tensor, hook: Callable[..., Any]) -> Any:
    if _has_torch_function(self):
        # (a tensor subclass's or a TorchFunctionMode's __torch_function__ gets this call once, with the user's hook,
        # as without gradwise; where it registers the hook it calls this function again, with torch functions off)
        return _ORIGINAL(self, hook)
    handle = _ORIGINAL(self, hook)
    # (the dict the hook went into: a view whose base was modified in place keeps its old dict, which holds the hook,
    # until its grad_fn is read, which regenerates the node and resets the tensor's dict to None)
    hooks = handle.hooks_dict_ref()
    entry = HOOKED.get(id(hooks))
    if entry is None or entry[0]() is not hooks:  # (a new dict, or one at a dead one's address)
        node = self.grad_fn
        if node is None:  # (a leaf's hook feeds its .grad alone)
            return handle
        HOOKED[id(hooks)] = (_ref(hooks), node._sequence_nr())
        if len(HOOKED) > _limit:
            _prune()
    if _open:  # registered while a pass runs (a checkpoint's recomputation): wrapped now
        with _LOCK:
            if _open:
                _wrap(hooks)
    return handle


def _prune() -> None:
    global _limit
    for k, entry in list(HOOKED.items()):
        if entry[0]() is None:
            _drop(k, entry)
    _limit = max(256, 2 * len(HOOKED))


def _drop(k: int, entry: tuple) -> None:
    """Drop a dead dict's entry, unless another thread has just noted a new dict at its address (then put back)."""
    now = HOOKED.pop(k, None)
    if now is not None and now is not entry:
        HOOKED[k] = now


def _live() -> list[tuple[dict, int]]:
    """The hooks dicts in HOOKED that hold a user's hook, with their nodes' sequence numbers (dead entries
    dropped)."""
    out = []
    for k, entry in list(HOOKED.items()):
        ref, key = entry
        hooks = ref()
        if hooks is None:
            _drop(k, entry)
        elif _holds_users(hooks):
            out.append((hooks, key))
    return out


def _holds_users(hooks: dict) -> bool:
    """Whether a hooks dict holds a hook of the user's (a loop, not ``any`` over a generator: one left unfinished
    is closed with a GeneratorExit, an exception raised inside gradwise on every backward, test_watch)."""
    for h in list(hooks.values()):
        if _users(h) or isinstance(h, _Wrapped):
            return True
    return False


def _wrap(hooks: dict) -> None:
    for k, h in list(hooks.items()):  # (a value replaced under its key: neither the order nor the size changes, and
        if _users(h):  # the user's handle removes it)
            hooks[k] = _Wrapped(h)


def _unwrap(hooks: dict) -> None:
    for k, h in list(hooks.items()):
        if isinstance(h, _Wrapped) and hooks.get(k) is h:
            hooks[k] = h.hook


@contextlib.contextmanager
def opened() -> Iterator[None]:
    """The length of one strong-zero pass: the users' hooks wrapped (``_Wrapped``) from the first pass open to the
    last one closed, in any thread (each wrapper passes straight to its hook outside a pass of its own thread)."""
    global _open
    with _LOCK:
        _open += 1
        if _open == 1 and HOOKED:  # (while one is open, register_hook wraps what it adds)
            for hooks, _ in _live():
                _wrap(hooks)
    try:
        yield
    finally:
        with _LOCK:
            _open -= 1
            if not _open:
                for hooks, _ in _live():
                    _unwrap(hooks)


def hooked(nodes: Iterable[Any]) -> bool:
    """Whether one of ``nodes`` is the node of a tensor that holds a hook of the user's (``HOOKED``)."""
    keys = {key for _, key in _live()}
    if keys:
        for n in nodes:  # (a loop, as in _holds_users)
            if n._sequence_nr() in keys:
                return True
    return False


def install() -> None:
    """Wrap ``Tensor.register_hook`` (once, at gradwise's import)."""
    if torch.Tensor.register_hook is _ORIGINAL:
        torch.Tensor.register_hook = register_hook
