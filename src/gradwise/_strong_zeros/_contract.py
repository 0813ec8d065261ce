"""PyTorch's autograd contract under strong zeros: what a backward under gradwise accepts and where it steps aside.

Strong zeros read values (the check before backward sums saved tensors) and follow real dense tensors (the
supports of ``_StrongZeroMode``). Under ``torch.func`` transforms and with batched seeds the plan cannot read (every
tensor is a functorch wrapper: ``aten::item`` has no batching rule), so such a backward runs the strong pass
without a plan where ``_transforms.plain_reason`` says the pass can follow it (grad, vjp, vmap, jacrev,
``is_grads_batched``). Some backwards give strong zeros neither:

- a ``torch.func`` transform that differentiates the backward itself (jvp, jacfwd, hessian, nested grad), or
  functionalize, or one met while torch.compile traces (reason "transform" or "batched");
- sparse, mkldnn and nested tensors, and tensor subclasses with their own ``__torch_dispatch__``;
- TorchScript's own ``torch.autograd.grad``/``backward`` inside scripted code (said when the code is called, by
  ``_script``).

Such a backward runs as plain PyTorch, exactly as without gradwise, and says so once per process and reason
with a :class:`PlainBackwardWarning` (a :class:`GradwiseWarning`, so ``-W error`` setups can filter it
deliberately). Meta tensors hold no values, so no NaN can meet a zero there: their backward runs plain silently.
This module also normalises ``gw.grad``/``gw.backward`` arguments the way ``torch.autograd`` does (generators,
dicts, GradientEdge).

May import: torch only.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch._C._functorch import is_functorch_wrapped_tensor, is_legacy_batchedtensor, peek_interpreter_stack
from torch.autograd.graph import GradientEdge

__all__ = ["GradwiseWarning", "OpaqueBackwardWarning", "PlainBackwardWarning"]


class GradwiseWarning(UserWarning):
    """Base class of the warnings gradwise gives (filter it with ``-W ignore::gradwise.GradwiseWarning``)."""


class PlainBackwardWarning(GradwiseWarning):
    """A backward under strong zeros ran as plain PyTorch because gradwise cannot read or follow its tensors
    (a ``torch.func`` transform that differentiates a backward: hessian, jacfwd, jvp, nested grad;
    sparse/mkldnn/nested tensors, a tensor subclass with
    its own ``__torch_dispatch__``, TorchScript's builtin ``torch.autograd.grad`` inside scripted code). The
    gradients are PyTorch's; a NaN from contamination is not removed there."""


class OpaqueBackwardWarning(GradwiseWarning):
    """Under strong zeros, the gradients hold NaN/Inf and structural zeros reached a backward gradwise cannot follow
    them through: a custom ``autograd.Function`` whose backward computes outside torch ops (NumPy, a C++ kernel
    called directly), or an op without a strong-zero rule. It may be contamination: write that backward with torch
    ops, or give the op a rule (``gw.register_rule``)."""


def warn_opaque(what: str, fix: str) -> None:
    """One OpaqueBackwardWarning per process and backward (``what`` names it, ``fix`` says what to do)."""
    with _warned_lock:
        if ("opaque", what) in _warned:
            return
        _warned.add(("opaque", what))
    warnings.warn(
        f"gw.strong_zeros: the gradients hold NaN/Inf, and structural zeros reached {what}, where gradwise cannot "
        f"follow them: the NaN/Inf may be contamination (a NaN the output never used). Fix: {fix}. Given once per "
        "process for it.",
        OpaqueBackwardWarning,
        stacklevel=_user_stacklevel(),
    )


class Unreadable(Exception):
    """Raised by the check before backward on a saved tensor it cannot read; the backward then runs plain."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_WHY = {
    "transform": "the torch.func transforms around it are ones strong zeros cannot follow: a jvp/jacfwd/hessian "
    "or forward-AD level, a grad of a grad or of a vjp (they differentiate the backward's formulas, while the strong "
    "pass acts below them), functionalize, or torch.compile tracing it. Strong zeros hold under grad, vjp, vmap "
    "of either, jacrev and is_grads_batched",
    "batched": "its batched tensors (vmap's wrappers) come from a transform strong zeros cannot follow here "
    "(jvp, jacfwd, hessian, nested grad, functionalize, torch.compile)",
    "sparse": "a sparse tensor takes part: strong zeros follow dense (strided) tensors only",
    "mkldnn": "an mkldnn tensor takes part: strong zeros follow dense (strided) tensors only",
    "nested": "a nested tensor takes part: strong zeros follow dense (strided) tensors only",
    "subclass": "a tensor subclass with its own __torch_dispatch__ takes part: its values cannot be read safely",
    "torchscript": "the TorchScript code {} calls torch.autograd.grad or backward, TorchScript's builtin, which "
    "runs PyTorch's C++ engine directly where gradwise cannot take part. Take that gradient in Python around the "
    "scripted code",
    "recorded": "it is being recorded into a graph (make_fx, aot_function, torch.export, torch.jit.trace) outside "
    "torch.compile: "
    "the graph holds PyTorch's plain backward ops, so strong zeros do not apply when it runs. Take the gradient "
    "outside the recorded function, or compile it with torch.compile (whose graphs get strong zeros)",
}
SILENT = frozenset(("meta",))  # no values at all: plain PyTorch is exactly right, nothing to say

_DISABLED_DISPATCH = torch._C._disabled_torch_dispatch_impl
_warned: set[str] = set()
_warned_lock = threading.Lock()


def kind(t: torch.Tensor, batched: bool = True) -> str | None:
    """Why strong zeros cannot read or follow ``t`` (a key of _WHY or SILENT), or None for a plain dense tensor.
    ``batched=False`` skips the vmap tests (outside a torch.func transform only seeds can be batched)."""
    if batched and (is_legacy_batchedtensor(t) or is_functorch_wrapped_tensor(t)):
        return "batched"
    if t.layout != torch.strided:
        return "mkldnn" if t.layout == torch._mkldnn else "nested" if t.is_nested else "sparse"  # type: ignore[attr-defined]
    if t.is_nested:
        return "nested"
    if t.is_meta:
        return "meta"
    cls = t.__class__
    if cls is not torch.Tensor and cls is not torch.nn.Parameter and \
            getattr(cls, "__torch_dispatch__", _DISABLED_DISPATCH) is not _DISABLED_DISPATCH:
        return _compiler_tensor(cls)
    return None


def _compiler_tensor(cls: type) -> str | None:
    # FakeTensor / FunctionalTensor come from torch.compile's tracing, which the strong-zero plan handles itself
    name = cls.__name__
    return None if name in ("FakeTensor", "FunctionalTensor") else "subclass"


def plain_reason(outputs: Iterable[Any], inputs: Iterable[Any] = (), seeds: Iterable[Any] = ()) -> str | None:
    """Why a backward of these outputs, inputs and seeds must run as plain PyTorch, or None. Runs before every
    backward under strong zeros: a few attribute reads per tensor. Outputs and seeds are also tested for vmap
    wrappers (a torch.func vjp function called after its transform returned, batched seeds); inputs (often
    many parameters) only for their kind."""
    if peek_interpreter_stack() is not None:
        return "transform"
    for group, batched in ((outputs, True), (seeds, True), (inputs, False)):
        for t in group:
            if isinstance(t, torch.Tensor) and (why := kind(t, batched)) is not None:
                return why
    return None


def unfollowed(args: tuple) -> bool:
    """Whether an op's positional arguments hold a tensor the strong-zero mode cannot follow (not strided)."""
    for a in args:  # (a loop, not any() over a generator: this runs for every op of a strong pass)
        if a.__class__ is not bool and isinstance(a, torch.Tensor) and a.layout != torch.strided:
            return True
    return False


def check_saved(t: torch.Tensor) -> None:
    """Raise Unreadable for a saved tensor the check before backward cannot read (called only for tensors that
    are not plain strided ones, so the everyday path pays nothing)."""
    why = kind(t)
    if why is not None:
        raise Unreadable(why)


def in_process_group() -> bool:
    """Whether this process is one rank of several (torch.distributed initialized, world size > 1): collectives
    may run inside its backwards (DDP's hooks), so a backward there must run exactly once."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def warn_plain(reason: str, name: str = "") -> None:
    """One PlainBackwardWarning per process and reason (meta tensors: none); ``name``: what the reason's text
    names (the scripted function of 'torchscript')."""
    if reason in SILENT or reason in _warned:
        return
    with _warned_lock:
        if reason in _warned:
            return
        _warned.add(reason)
    warnings.warn(
        f"gradwise: this backward ran as plain PyTorch without strong zeros because {_WHY[reason].format(name)}. "
        "Its gradients "
        "are PyTorch's (a NaN from contamination is not removed there). This warning is given once per process "
        "for this reason; filter gradwise.PlainBackwardWarning to silence it.",
        PlainBackwardWarning,
        stacklevel=_user_stacklevel(),
    )


# torch's files and all of gradwise's (gw.watch()'s wrappers of torch.autograd.grad/backward are in gradwise/_trace)
_INTERNAL = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(os.path.dirname(__file__)) + os.sep)
_LIBRARY = (*_INTERNAL, os.path.dirname(os.__file__))  # the standard library too: contextlib/functools wrappers


def user_site() -> str:
    """``file:line`` of the innermost frame outside torch, gradwise and the standard library (while torch.compile
    traces: the user's call of the compiled function)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARY):
        frame = frame.f_back
    return "an unknown caller" if frame is None else f"{frame.f_code.co_filename}:{frame.f_lineno}"


_AOT = os.path.join(os.path.dirname(torch.__file__), "_functorch", "_aot_autograd") + os.sep


def users_backward() -> bool:
    """Whether the backward being recorded into a graph was asked for by code outside torch and gradwise (make_fx
    of a function that calls backward or gw.grad), not by AOTAutograd tracing a compiled function's joint graph
    (torch.compile's graphs get strong zeros from gradwise's compiled pass: nothing to say there)."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(_AOT):
            return False
        if not name.startswith(_LIBRARY):
            return True
        frame = frame.f_back
    return False


def warn_traced_gradient(site: str) -> None:
    """The PlainBackwardWarning for a gradient torch.compile traced into a graph (once per call site: the caller
    keeps the sites)."""
    warnings.warn(
        f"gradwise: the torch.compile'd call at {site} computes a gradient inside its compiled graph (a torch.func "
        "transform: grad, vjp, jacrev, hessian). No backward of it runs when it is called, so strong zeros do not "
        "apply to it, inside gw.strong_zeros() too: its gradients are PyTorch's (a NaN from contamination is not "
        "removed there). To get strong zeros, take the gradient outside the compiled graph: compile the loss and "
        "call gw.grad(loss, params) or loss.backward() on its result.",
        PlainBackwardWarning,
        stacklevel=_user_stacklevel(),
    )


def _user_stacklevel() -> int:
    """The stacklevel of the first frame outside torch and gradwise (the user's backward call)."""
    frame, level = sys._getframe(2), 2  # warnings.warn's caller's caller
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level


def as_outputs(value: Any) -> tuple[Any, ...]:
    """``outputs``/``tensors`` as torch.autograd reads them: one tensor or GradientEdge, or any iterable."""
    if isinstance(value, (torch.Tensor, GradientEdge)):
        return (value,)
    return tuple(value) if _iterable(value) else value  # anything else: as_tensors names the problem


def _iterable(value: Any) -> bool:
    return isinstance(value, Iterable) and not isinstance(value, (str, bytes))


def as_inputs(value: Any, where: str) -> tuple[Any, ...]:
    """``inputs`` as torch.autograd reads them: one tensor or GradientEdge, a dict (its values), any iterable."""
    if isinstance(value, (torch.Tensor, GradientEdge)):
        return (value,)
    if type(value) is dict:
        return tuple(value.values())
    if isinstance(value, Mapping):
        raise TypeError(f"{where}: inputs must be a dict, not {type(value).__name__}. Other Mapping types are not "
                        "supported (as in torch.autograd.grad); pass dict(...) or a list of tensors.")
    return tuple(value) if _iterable(value) else value
