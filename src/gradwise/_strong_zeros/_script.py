"""TorchScript under strong zeros: a scripted function or module that takes a gradient itself.

Inside TorchScript, ``torch.autograd.grad`` and ``backward`` are the JIT's builtin operators ``aten::grad`` and
``aten::backward``: they call the C++ engine directly, never ``torch.autograd._engine_run_backward``, and they are
JIT operators, not dispatcher ops, so no Python kernel or mode can take their place. Such a backward cannot get
strong zeros. What gradwise can see is the call of the scripted code from Python: from the first strong-zeros
block on, ``ScriptFunction.__call__`` and ``ScriptMethod.__call__`` (``ScriptModule``'s forward and methods,
``torch.jit.load``'s modules) are wrapped, and a call in a thread with strong zeros on looks once per function
for those operators in its graph (callees inlined, fork bodies included) and gives a PlainBackwardWarning once
per process. Before any block nothing is wrapped; outside a block a scripted call pays one thread-local read;
inside, one lookup by name (about 1 us on a call of 15 us or more), and nothing at all once the warning is given.
The wrappers stay, as the engine hook does (``_engine._hook_in``): swapping them per block cost more than they do.

May import: torch, _contract.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable
from typing import Any

import torch

from gradwise._strong_zeros import _contract

_GRAD_OPS = re.compile(r"\baten::(grad|backward)\(")
_CLASSES = (torch._C.ScriptFunction, torch._C.ScriptMethod)
_ORIGINAL = {cls: cls.__call__ for cls in _CLASSES}
# scripted function or method -> whether its graph takes a gradient. Keyed by the object, not its qualified name:
# two compilation units (two torch.jit.load'ed files, two CompilationUnits) may each hold a `__torch__.Model.forward`
_scanned: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_active: Callable[[], bool] = bool


def install(active: Callable[[], bool]) -> None:
    """Wrap the calls of scripted code (the process's first block opens; ``active``: strong zeros on in this
    thread). Called under the engine's install lock."""
    global _active
    _active = active
    if "torchscript" not in _contract._warned:
        torch._C.ScriptFunction.__call__ = _function_call
        torch._C.ScriptMethod.__call__ = _method_call


def _function_call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    if _active() and "torchscript" not in _contract._warned:
        _check(lambda: fn.qualified_name, fn)
    return _ORIGINAL[torch._C.ScriptFunction](fn, *args, **kwargs)


def _method_call(method: Any, *args: Any, **kwargs: Any) -> Any:
    if _active() and "torchscript" not in _contract._warned:
        _check(lambda: f"{method.owner._type().qualified_name()}.{method.name}", method)
    return _ORIGINAL[torch._C.ScriptMethod](method, *args, **kwargs)


def _check(named: Callable[[], str], scripted: Any) -> None:
    try:
        takes = _scanned.get(scripted)
        if takes is None:
            takes = _scanned[scripted] = _takes_gradient(scripted)
        name = named() if takes else ""
    except Exception:  # (a scripted object without the names read here: never an error in the user's call)
        return
    if takes:
        _contract.warn_plain("torchscript", name.removeprefix("__torch__."))


def _takes_gradient(scripted: Any) -> bool:
    """Whether a ScriptFunction or ScriptMethod calls TorchScript's ``torch.autograd.grad``/``backward``."""
    try:
        graph = scripted.inlined_graph  # (held: the node list of a temporary graph is invalidated with it)
        return bool(_GRAD_OPS.search(str(graph)))  # the printed graph includes fork/closure subgraphs
    except Exception:  # a graph that cannot be inlined or printed: judged by its code
        try:
            return bool(re.search(r"\btorch\.autograd\.(grad|backward)\(|\.backward\(", scripted.code))
        except Exception:
            return False
