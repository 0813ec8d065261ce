"""Recognising tensors that PyTorch is tracing rather than computing with.

AOTAutograd traces a compiled function's backward by calling ``torch.autograd.grad`` on FunctionalTensors
under a FakeTensorMode; torch.func wraps tensors (vmap's BatchedTensor, grad's GradTrackingTensor); meta
tensors have no data. None of them can be read (``data_ptr``, ``.item()``, a Python branch on a value), so
every data-dependent step of gradwise asks ``traced`` first and steps aside: a traced backward is a graph that
gradwise serves elsewhere (the compiled-graph pass of ``_compile``), not numbers to check.

May import: torch only.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch._guards import CompileContext, TracingContext

__all__ = ["compiling", "graph_recording", "recording", "traced", "traced_tensor"]


def _tracing_mode_active() -> bool:
    """A FakeTensorMode or a proxy (make_fx) mode is on this thread's dispatch stack."""
    keys = torch._C._TorchDispatchModeKey
    return torch._C._get_dispatch_mode(keys.FAKE) is not None or torch._C._get_dispatch_mode(keys.PROXY) is not None


def recording() -> bool:
    """PyTorch traces on this thread: a FakeTensorMode or a proxy (make_fx) mode is on its dispatch stack. Its
    tensors may be plain ones (make_fx's real mode) whose reads would be recorded or refused."""
    return bool(torch._C._len_torch_dispatch_stack()) and _tracing_mode_active()


def graph_recording() -> bool:
    """A proxy (make_fx) mode records the ops of this thread into a graph (a fake mode alone records nothing), or
    torch.jit.trace does (its tracer sits above autograd: a dispatch mode's own ops are not recorded, so a graph
    traced from a strong pass held PyTorch's plain backward)."""
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is not None or \
        torch._C._is_tracing()


def compiling() -> bool:
    """``torch.compiler.is_compiling()`` for this thread. PyTorch's flag is one for the process: it reads True on
    every thread while any thread runs torch.compile, and an eager backward under strong zeros (or a watch) on
    another thread stepped aside as if traced, keeping its NaN silently. A compile of this thread holds a
    (thread-local) compile or tracing context; export sets its own flag. Where dynamo traces the caller itself (a
    custom Function's backward inside a compiled function: ``_unused._declared``) the first test answers, so dynamo
    never meets the context lookups, which it refuses to trace (a graph break, an error under fullgraph)."""
    if torch.compiler.is_dynamo_compiling():
        return True
    return torch.compiler.is_compiling() and (
        CompileContext.try_get() is not None or TracingContext.try_get() is not None or torch.compiler.is_exporting())


def traced_tensor(t: object) -> bool:
    """Whether ``t`` is a tensor whose data cannot be read: fake, functional, functorch-wrapped or meta."""
    if not isinstance(t, torch.Tensor):
        return False
    if type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
        from torch._subclasses.fake_tensor import FakeTensor  # loaded with torch; imported here to stay cheap
        from torch._subclasses.functional_tensor import FunctionalTensor

        if isinstance(t, (FakeTensor, FunctionalTensor)):
            return True
    return t.is_meta or torch._is_functional_tensor(t) or torch._C._functorch.is_functorch_wrapped_tensor(t)


def traced(tensors: Iterable[object] = ()) -> bool:
    """True while PyTorch traces (torch.compile, make_fx, a fake mode) or when any of ``tensors`` (tensors or
    GradientEdges, whose node is then not inspected) cannot be read."""
    # (the stack's length counts FakeTensorMode and ProxyTorchDispatchMode too: one cheap call when it is empty)
    if compiling() or (torch._C._len_torch_dispatch_stack() and _tracing_mode_active()):
        return True
    return any(traced_tensor(t) for t in tensors)
