"""``LeanDispatchMode``: a ``TorchDispatchMode`` whose handler keeps dynamo out without PyTorch's wrapper, and
runs the few ops whose kernels go wrong under any mode as without one; ``dynamo_off``, the same for a function
(``torch.compiler.disable`` without its wrapper); ``kernels``, which of an op's dispatch keys have a kernel;
``PASSES``, the nonsmooth passes open in this thread.

PyTorch wraps every mode's ``__torch_dispatch__`` in ``torch._disable_dynamo`` (so that torch.compile never
traces into a handler). That wrapper costs ~5 us per call, most of the per-op cost of gradwise's modes on small
models. A subclass of ``LeanDispatchMode`` gets the same effect, dynamo's frame callback switched off for the
length of the handler and everything it calls, with one C call each way.

Some ATen kernels return wrong values on complex tensors whenever any Python dispatch mode is active
(pytorch#198118: the kernel's own lazy conjugate view ``.mH()`` is consumed unconjugated when the Python key is in
the thread-local include set). Every gradwise mode runs those ops, on plain complex tensors, on a helper thread
whose thread-local state holds no mode, and returns PyTorch's plain result; the handler does not see them (their
outputs carry no structural zero and no recorded birth).

May import: torch.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch._C._dynamo.eval_frame import _FrameAction, _FrameExecStrategy, set_code_exec_strategy, set_eval_frame
from torch.utils._python_dispatch import TorchDispatchMode


def _lean(handler: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(handler)
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if id(func) in _WRONG_IDS and _plain_complex(types, args):  # ids: OpOverload hashes in Python
            return _without_modes(func, args, kwargs or {})
        prior = set_eval_frame(None)  # what torch._disable_dynamo does around the call, and restores after
        try:
            return handler(self, func, types, args, kwargs)
        finally:
            set_eval_frame(prior)

    __torch_dispatch__._gw_lean = True  # type: ignore[attr-defined]
    return __torch_dispatch__


def _overloads(*packets: Any) -> frozenset:
    return frozenset(getattr(p, name) for p in packets for name in p.overloads())


_aten = torch.ops.aten
# Measured on torch 2.13 with op_db's complex128 samples, each run plain and under a pass-through mode: pinv's
# values (linalg.pinv, pinverse; lstsq's backward calls it) and lstsq's residuals differ; nothing else does.
WRONG_UNDER_A_MODE = _overloads(_aten.linalg_pinv, _aten.linalg_lstsq)
_WRONG_IDS = frozenset(map(id, WRONG_UNDER_A_MODE))  # OpOverloads live as long as the process
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def _plain_complex(types: Any, args: tuple) -> bool:
    """Plain complex tensors outside any torch.func transform: what a helper thread can compute (not fake,
    functional or meta tensors, whose modes and transforms live in this thread's state)."""
    return all(t in _PLAIN_TYPES for t in types) and not torch._C._are_functorch_transforms_active() and \
        any(isinstance(a, torch.Tensor) and a.is_complex() and not a.is_meta for a in args)


_helper: tuple[int, ThreadPoolExecutor] | None = None  # (the pid that made it, the executor)
_helper_lock = threading.Lock()


def _without_modes(func: Any, args: tuple, kwargs: dict) -> Any:
    """``func(*args, **kwargs)`` on a helper thread (no dispatch mode in its thread-local state), under no_grad
    (autograd is this thread's to record), on the caller's CUDA stream."""
    global _helper
    with _helper_lock:
        if _helper is None or _helper[0] != os.getpid():  # a forked child inherits no running thread
            _helper = (os.getpid(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="gradwise-plain-op"))
    devices = {a.device for a in args if isinstance(a, torch.Tensor) and a.is_cuda}
    stream = torch.cuda.current_stream(next(iter(devices))) if devices else None

    def run() -> Any:
        with torch.no_grad():
            if stream is None:
                return func(*args, **kwargs)
            with torch.cuda.stream(stream):
                return func(*args, **kwargs)

    return _helper[1].submit(run).result()


# Dynamo's frame callback may still be on when the dispatcher calls a handler (a compiled function that dynamo
# runs eagerly because a mode is active: the dispatcher pops the mode while its handler runs, so dynamo would
# then see no mode and compile the handler's frame). PyTorch's wrapper lives in a file dynamo skips; this one's
# code object is marked to be skipped (its callees then run with the callback off, from its first line).
set_code_exec_strategy(_lean(lambda *a: None).__code__, _FrameExecStrategy(_FrameAction.SKIP, _FrameAction.DEFAULT))


def dynamo_off(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` as ``torch.compiler.disable(fn)`` makes it: dynamo never traces into it (a call to it inside a compiled
    function graph-breaks: the marks below are the ones dynamo reads) and its frame callback is off for the call and
    everything it calls; with one C call each way instead of PyTorch's Python wrapper (~5 us a call with caches cold
    after a backward: the wrapped ``torch.autograd.backward`` is most of a small finite step's fixed cost under
    ``gw.watch()``)."""

    @functools.wraps(fn)
    def off(*args: Any, **kwargs: Any) -> Any:
        prior = set_eval_frame(None)
        try:
            return fn(*args, **kwargs)
        finally:
            set_eval_frame(prior)

    off._torchdynamo_disable = True  # type: ignore[attr-defined]
    off._torchdynamo_disable_msg = None  # type: ignore[attr-defined]
    off._torchdynamo_disable_recursive = True  # type: ignore[attr-defined]
    off._torchdynamo_orig_callable = fn  # type: ignore[attr-defined]
    off._torchdynamo_wrapper_id = id(off)  # type: ignore[attr-defined]
    return off


# (the same skip as the handler's above: a graph-broken call runs ``off`` with the callback still on)
set_code_exec_strategy(dynamo_off(lambda: None).__code__, _FrameExecStrategy(_FrameAction.SKIP, _FrameAction.DEFAULT))


class _Passes(threading.local):
    """gradwise's nonsmooth passes of f open in this thread (``_nonsmooth._contexts.pass_context``; one thread at a
    time has any; ``anywhere`` is set while the dual level open is one of theirs, `_contexts.dual_level`). Forward-mode
    AD's dual level is one for the process: in the pass's thread it is the pass's, and gw.trace passes over its ops;
    in every other thread it makes no tensor a dual. A level not marked (the user's own) is treated as alone."""

    depth = 0
    anywhere = threading.Event()  # (a class attribute: one for the process)


PASSES = _Passes()


class LeanDispatchMode(TorchDispatchMode):
    """A dispatch mode whose subclasses' ``__torch_dispatch__`` run with dynamo off, as PyTorch's modes do."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # no torch._disable_dynamo wrapper: __init_subclass__ puts the lean one in its place

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        raw = cls.__dict__.get("__torch_dispatch__")
        if raw is not None and not isinstance(raw, classmethod):
            cls.__torch_dispatch__ = _lean(raw)


def subgraphs_under(mode: TorchDispatchMode, func: Any, args: tuple, kwargs: dict,
                    returned: Callable[[Any], Any] | None = None) -> Any:
    """A higher-order op (``torch.cond``, ``map``, ``while_loop``; their backwards are higher-order ops too) that
    reached ``mode``'s handler: it has no aten kernel, and PyTorch raises NotImplementedError for a mode without
    higher-order support. It runs as PyTorch's own kernel (the mode is off in the handler), each subgraph it calls
    (a branch, a body: a GraphModule or a Python function) run under ``mode``, so that their ops are seen as in
    eager code. ``returned`` is called with what each subgraph call returns (map stacks its body's results
    outside the mode: the trace takes their births from there)."""
    import types

    def under_mode(fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*a: Any, **k: Any) -> Any:
            with mode:
                got = fn(*a, **k)
            if returned is not None:
                returned(got)
            return got
        return run

    # (subgraphs, not ops passed as arguments: with_effects' OpOverload; map's body is a functools.partial, run
    # outside the mode before: a NaN born in it was data arriving non-finite)
    wrapped = tuple(under_mode(a) if isinstance(a, (torch.nn.Module, types.FunctionType, functools.partial)) else a
                    for a in args)
    out = func(*wrapped, **kwargs)
    if func is torch.ops.higher_order.cond and not isinstance(out, (tuple, list)) and _in_cond_forward():
        # eager torch.cond compiles its call, and dynamo skips the frame under a non-infra dispatch mode: the branch
        # runs as the user's function, and the backward PyTorch built from it fails ("object of type 'bool' has no
        # len()") when it returns a bare tensor (any dispatch mode, gradwise's or not)
        raise RuntimeError("gradwise: torch.cond under a gradwise mode (gw.trace()) with a branch that returns a "
                           "bare tensor: PyTorch's backward of torch.cond fails under any dispatch mode then. "
                           "Return a tuple from each branch and index the result (torch.cond(p, lambda x: "
                           "(x.sin(),), lambda x: (x.cos(),), (x,))[0]), or run torch.cond outside the mode")
    return out


def _in_cond_forward() -> bool:
    """Whether this call runs inside torch.cond's autograd Function forward: a backward will be built from the
    branches."""
    from torch._higher_order_ops.cond import CondAutogradOp

    code, frame = CondAutogradOp.forward.__code__, sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


_KEYS = ("CompositeImplicitAutograd", "ADInplaceOrView", "CPU", "CUDA")


@functools.cache
def kernels(name: str) -> frozenset[str]:
    """Which of ``_KEYS`` the op named ``name`` (``func.name()``) has a kernel for: a CompositeImplicitAutograd op
    without an ADInplaceOrView one reaches a dispatch mode undecomposed where autograd's keys are skipped
    (inference mode), and one with a backend kernel of its own runs that kernel when called plainly."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    try:
        return frozenset(k for k in _KEYS if has(name, k))
    except RuntimeError:  # an op the dispatcher has no entry for (sym_size.default, which NJT calls)
        return frozenset()
