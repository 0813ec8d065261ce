"""``_KinkMode``, the TorchFunctionMode that sends every kink op f calls to its rule (``_Stop``, ``_Diverged``,
``_keep_flat``, ``_RESHAPES``).

May import: torch, gradwise._masks, ``_contexts``, ``_errors``, ``_records``, ``_rules``, ``_rules_jvp``,
``_rules_aten``, ``_kink_watch``, ``_kink_reads``, ``gradwise._ops``.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import _get_current_dispatch_mode as _current_dispatch_mode
from torch.utils._python_dispatch import _pop_mode as _pop_dispatch_mode
from torch.utils._python_dispatch import _push_mode as _push_dispatch_mode

from gradwise._nonsmooth import _contexts as _ctx
from gradwise._nonsmooth._errors import NonsmoothError
from gradwise._nonsmooth._kink_reads import _flat_tensors, _KinkReads
from gradwise._nonsmooth._kink_watch import (
    _SMOOTH_CALLS,
    DeferredJump,
    _callable_name,
    _composite,
    _kink_free_call,
    _known_smooth,
    _no_forward_ad_is_an_error,
    _unguarded,
    _watched,
)
from gradwise._nonsmooth._ports import PORTS
from gradwise._nonsmooth._records import _Run, _user_line
from gradwise._nonsmooth._rules import CASTS, UNRULED, _is_dual, _unpack, call_rule, route
from gradwise._nonsmooth._rules_aten import _aten_rule
from gradwise._nonsmooth._rules_jvp import _JVP_ROUTES
from gradwise._ops._cuts import onto_axis

Tensor = torch.Tensor


# ------------------------------------------------------------------------------------------------ the mode


# Ops that only move elements: a relu-dead mark (`_Run.mark_flat`) follows them to their output.
_RESHAPES = {Tensor.reshape, Tensor.view, torch.reshape, Tensor.flatten, torch.flatten, Tensor.unsqueeze,
             torch.unsqueeze, Tensor.squeeze, torch.squeeze, Tensor.permute, torch.permute, Tensor.transpose,
             torch.transpose, Tensor.contiguous, Tensor.view_as, Tensor.reshape_as, Tensor.unflatten, Tensor.movedim,
             torch.movedim, Tensor.flip, torch.flip, Tensor.roll, torch.roll, Tensor.fliplr, Tensor.flipud}


# Casts, copies and views: their complex output lies on the real axis for every input value where their input is
# real or does (`_cuts.onto_axis`; x.to(torch.complex128) never crosses the cut of log / sqrt ...). Not conj or
# arithmetic: they may flip the sign of the zero imaginary part, the side of the cut PyTorch's formulas take.
_ONTO_AXIS = frozenset((*CASTS, *_RESHAPES, Tensor.cfloat, Tensor.cdouble, Tensor.chalf, Tensor.clone, torch.clone,
                        Tensor.__getitem__, Tensor.expand, Tensor.expand_as))


def _keep_flat(run: _Run, func, args, kwargs, out) -> None:
    src = run.flat_source(args[0], build=False)
    if src is None or not isinstance(out, Tensor) or out.dtype != args[0].dtype:
        return
    c, live = src
    if callable(live):  # still unbuilt: moved when built
        live = functools.partial(_moved_live, func, live, args[1:], kwargs)
    elif live is not None:
        live = func(live, *args[1:], **kwargs)
    run.mark_flat(out, c, live)


def _moved_live(func, live: Callable, args, kwargs) -> Tensor:
    return func(live(), *args, **kwargs)


# reads of a tensor's values into Python (`_KinkMode._python_read`)
_PYTHON_READS = {Tensor.item, Tensor.tolist, Tensor.__bool__, Tensor.__float__, Tensor.__int__, Tensor.__index__,
                 Tensor.__complex__}


# Calls on the tensor object itself rather than on its values: its autograd node (``grad_fn``, whose identity
# PyTorch's module full backward hooks and ``register_multi_grad_hook`` hook into), its hooks and flags. They see
# the tensor f holds, never a stripped tangent's primal: that is a new view with a node of its own, which the
# backward through the tensor never reaches (a hook on it was silently dropped, a full backward hook's set-up
# crashed). Attribute reads and writes arrive as descriptor ``__get__``/``__set__`` calls.
# writes of a value into a tensor: PyTorch's forward AD asserts (internally) on a 0-d float dual value written into
# an integer or bool tensor (``b[:] = x[0]``, ``b.fill_(x)``: its formula gives the integer result a tangent)
_FILLS = {Tensor.__setitem__, Tensor.fill_, torch.fill, Tensor.masked_fill_, Tensor.masked_fill, torch.masked_fill,
          Tensor.index_fill_, Tensor.index_fill, torch.index_fill}
_OBJECT_CALLS = {Tensor.register_hook, Tensor.register_post_accumulate_grad_hook, Tensor.retain_grad,
                 Tensor.requires_grad_, Tensor.detach_, Tensor._is_view}
# attributes that compute a view of the values (their tangent follows, or is stripped, as an op's)
_VALUE_ATTRIBUTES = {"T", "H", "mT", "mH", "real", "imag"}


def _on_object(func) -> bool:
    """Whether ``func`` acts on its tensor arguments' identity (`_OBJECT_CALLS`, attribute access)."""
    if func in _OBJECT_CALLS:
        return True
    owner = getattr(func, "__self__", None)
    return (isinstance(owner, types.GetSetDescriptorType) and func.__name__ in ("__get__", "__set__", "__delete__")
            and owner.__name__ not in _VALUE_ATTRIBUTES)


def _pop_saved_tensor_hooks() -> list[tuple]:
    """Take off the saved-tensor hooks f runs under (``torch.autograd.graph.saved_tensors_hooks``, ``save_on_cpu``),
    innermost first, for the caller to push back. A rule's ops must save their own tensors: a lock (the index or
    mask the backward reads) is written after the ranking, and a copy a pack hook made would keep the provisional
    branch (relu(x) - relu(-x) gave 2 at 0). Values are the same; those tensors are just not offloaded."""
    hooks = []
    while (top := torch._C._autograd._top_saved_tensors_default_hooks(False)) is not None:
        hooks.append(top)
        torch._C._autograd._pop_saved_tensors_default_hooks()
    return hooks


class _Stop(Exception):
    """Raised by the mode once the pass has gone past the last kink it needs."""


class _Diverged(Exception):
    """Raised by the mode when a pass leaves the path of the pass it must follow (f branches on grad mode)."""


class _KinkMode(_KinkReads, TorchFunctionMode):
    """Routes kink ops that depend on the inputs to their rules; swaps closure-captured inputs for ours.

    ``involved`` says whether an argument depends on the inputs (it has a tangent, or in the tangent-free
    detection pass, requires grad). After ``strip_after`` calls, tangents are dropped: no kink lies beyond.
    ``used`` collects the positions of the inputs that calls have used so far, ``last_tie`` the call count at
    the last kink that had ties (detection pass).
    """

    def __init__(self, run: _Run, subs: dict[int, Tensor], positions: dict[int, int], involved: Callable,
                 strip_after: int | None = None, stop_after: int | None = None, dual: bool = True,
                 graph: bool = True):
        super().__init__()
        self.dual = dual  # some input carries a tangent
        self.graph = graph  # the pass builds autograd's graph (else grad mode is off around each call only)
        self.run, self.subs, self.positions, self.involved = run, subs, positions, involved
        self.strip_after, self.stop_after = strip_after, stop_after
        self.count, self.used, self.last_tie, self.used_at_tie = 0, set(), -1, set()
        # trail: the callables of this pass in order; expect: an earlier pass's trail that this one must follow
        # (the ranked pass locks the probe's kinks by call count: a pass taking another path diverges)
        self.depth, self.trail, self.expect, self.watch = 0, [], None, None
        # id -> (index tensor, kinks): indices a rule returned for tied elements. f reading them makes its value
        # depend on the choice (a jump, unless it reads them continuously), and, where the choice is still
        # provisional (its lock is written after this pass), its forward too
        self.exposed: dict[int, tuple[Tensor, list]] = {}
        self.read_values: dict[int, tuple] = {}  # id -> (tensor, [(value, tangent)] f read into Python)
        # f ran a reverse pass (torch.autograd.grad, .backward ...): a pass of f that builds no graph cannot
        self.reverses = False

    def _sub(self, a, stop: bool = False, keep: bool = False):
        """``a`` as the call sees it: the dual for a closure-captured input, its primal where tangents are
        stripped (past ``strip_after``, or ``stop``) unless ``keep`` (a call on the object: `_on_object`)."""
        if isinstance(a, Tensor):
            if id(a) in self.positions:
                self.used.add(self.positions[id(a)])
            a = self.subs.get(id(a), a)
            if not keep and (stop or (self.strip_after is not None and self.count > self.strip_after)):
                primal, tangent = _unpack(a)
                if tangent is not None:  # (a plain tensor's "primal" is a new alias: keep the tensor itself)
                    a = primal
            return a
        if type(a) in (list, tuple):
            return type(a)(self._sub(v, stop, keep) for v in a)
        return a

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch._C._set_grad_enabled:  # f's no_grad/enable_grad: f's grad mode, read by the calls below
            return func(*args, **kwargs)
        self.count += 1
        if self.stop_after is not None and self.count > self.stop_after:
            raise _Stop
        if self.expect is not None and (self.count > len(self.expect) or self.expect[self.count - 1] is not func):
            raise _Diverged
        self.trail.append(func)
        self.depth += 1
        # inside a call the mode sees (its arguments' substitution included), the dispatch-level watch for unseen
        # ops is off (it costs per aten op) unless it follows what an unseen kink fed
        watch = self.watch if self.depth == 1 and _current_dispatch_mode() is self.watch \
            and not self.watch.tainting else None
        if watch is not None:
            _pop_dispatch_mode()
        # f's own grad mode: gradwise runs f with grad enabled, so a call under f's torch.no_grad() (or PyTorch's:
        # F.embedding's max_norm renorm, spectral_norm's power iteration) is a constant, as autograd makes it,
        # in every pass alike (stop-gradient: its tangents are dropped, its kinks are no kinks of the derivative)
        stop = not torch.is_grad_enabled()
        graph_off = not (stop or self.graph)  # a pass without a graph turns grad off around the call only
        if graph_off:
            torch._C._set_grad_enabled(False)
        try:
            # (a reverse pass inside f differentiates the tensors f holds: a stripped primal is in no graph)
            keep = _on_object(func) or (not stop and func in _ctx.REVERSE_CALLS)
            args = tuple(self._sub(a, stop, keep) for a in args)
            if kwargs:
                kwargs = {k: self._sub(v, stop, keep) for k, v in kwargs.items()}
            if self.exposed:
                self._read_indices(args, kwargs)
            try:
                out = self._dispatch(func, args, kwargs)
            except RuntimeError as e:
                error = _leaf_write_error(self, func, args, e)
                if error is None:
                    raise  # (f's own leaf, a parameter: PyTorch's error stands, gradwise's advice would not apply)
                raise error from None
            if func in _ONTO_AXIS and args:
                onto_axis(args[0], out)
            return out
        finally:
            if graph_off:
                torch._C._set_grad_enabled(True)
            self.depth -= 1
            if watch is not None:
                _push_dispatch_mode(watch)

    def _dispatch(self, func, args, kwargs):
        if func in _FILLS and args and isinstance(args[0], Tensor) and not (
                args[0].is_floating_point() or args[0].is_complex()):
            args, kwargs = _cast_fill_value(self, args, kwargs)
        if func in _PYTHON_READS and args and isinstance(args[0], Tensor):
            if self.involved(args[0]):
                self._python_read(args[0], func)
            # a Python value: nothing inside to route or watch (read from a detached alias: gradwise's own leaves
            # require grad, where PyTorch would warn about the conversion)
            return func(args[0].detach(), *args[1:], **kwargs)
        everything = (*args, *kwargs.values())
        # inside a torch.func transform a wrapped tensor's tangent is not visible (its level sits inside the
        # transform): any wrapped argument counts as depending on the inputs (a refusal, never a convention)
        if _ctx.transforms_active() and any(_ctx.is_wrapped(t) or self.involved(t) for t in _flat_tensors(everything)):
            # (a cast is watched there: to a float dtype it is smooth, to an integer one it reaches its jump)
            routed = (route(func, args, kwargs) is not None and func not in CASTS) or func in UNRULED
            out = None if routed else _kink_free_call(func, args, kwargs)
            if out is None:
                raise NonsmoothError(f"{_callable_name(func)} (called at {_user_line()}) runs inside a torch.func "
                                     "transform (grad, vmap, jacrev ...) within f: gradwise cannot follow tangents "
                                     "or lock kinks through its wrapped tensors. Call the function without the "
                                     "transform")
            return out[0]
        if func in _ctx.REVERSE_CALLS:
            out = _reverse_call(self, func, args, kwargs)
            if out is not _UNHANDLED:
                return out
        if _ctx.is_custom_op(func) and any(map(self.involved, everything)):
            if self.watch is not None:
                self.watch.opaque = True
            out = func(*args, **kwargs)
            _ctx.check_custom_op(func, _callable_name(func), _user_line(), args, kwargs, out, self.dual)
            return out
        rule = route(func, args, kwargs)
        if rule is None and isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            rule = _aten_rule(func)
        if rule is None and func not in UNRULED:
            jvp = _JVP_ROUTES.get(func) if self.dual else None
            if jvp is not None and any(map(_is_dual, (*args, *kwargs.values()))):
                out = jvp(func, *args, **kwargs)
                if out is not NotImplemented:
                    return out
            port = PORTS.get(func) if "out" not in kwargs else None
            if (port is not None or _composite(func)) and any(map(self.involved, _flat_tensors(everything))):
                with self, torch.enable_grad():  # the ops inside reach their rules (in f's grad mode)
                    return port(*args, **kwargs) if port is not None else _unguarded(func)(*args, **kwargs)
            if self.run.known is None and func not in _SMOOTH_CALLS and any(
                    map(self.involved, _flat_tensors(everything))) and not _known_smooth(func, args, kwargs):
                # (a list's tensors too: RNN weights, _foreach_)
                try:
                    out = _watched(func, args, kwargs, self.involved)
                except DeferredJump as jump:
                    out = jump.out
                    self._defer(jump.op)
            else:
                out = _no_forward_ad_is_an_error(func, args, kwargs)
            if self.run.flat and func in _RESHAPES and args and isinstance(args[0], Tensor):
                _keep_flat(self.run, func, args, kwargs, out)
            return out
        flat = _flat_tensors(everything)
        if not any(map(self.involved, flat)):
            return func(*args, **kwargs)
        no_jvp = getattr(rule, "no_pytorch_jvp", False)
        if any(t.numel() == 0 for t in flat) and kwargs.get("out") is None and not (
                no_jvp and any(map(_is_dual, flat))):
            # no element, nothing ties (an empty batch): PyTorch's own, exact (an op without forward mode: its
            # rule, which gives the tangent)
            return func(*args, **kwargs)
        if self.run.known is not None and self.count not in self.run.known and not no_jvp:
            return func(*args, **kwargs)  # ranked pass: the probe saw no tie here, PyTorch's own JVP is exact
        if rule is None:
            raise NonsmoothError(f"gradwise has no kink rule for {UNRULED[func]} (called at {_user_line()}); "
                                 "its derivative at ties/zeros would be PyTorch's convention. Rewrite it with "
                                 "ops that have rules (abs, clamp, maximum, max, sort, max_pool ...).")
        if kwargs.get("out") is not None:
            raise NonsmoothError(f"{_callable_name(func)} (called at {_user_line()}) writes into out=: gradwise's "
                                 "rules return new tensors (and PyTorch's forward-mode AD does not support out=). "
                                 "Call it without out= inside f")
        before, self.run.call = len(self.run.kinks), self.count
        hooks = _pop_saved_tensor_hooks()
        try:
            out = call_rule(rule, self.run, func, args, kwargs)
        finally:
            for pair in reversed(hooks):
                torch._C._autograd._push_saved_tensors_default_hooks(*pair)
        if len(self.run.kinks) > before:
            self.last_tie, self.used_at_tie = self.count, set(self.used)
            if any(map(_is_dual, (*args, *kwargs.values()))):
                for k in self.run.kinks[before:]:
                    k.tangent = True
            for t in _flat_tensors(out if isinstance(out, tuple) else (out,)):
                if not (t.is_floating_point() or t.is_complex()):
                    self.exposed[id(t)] = (t, self.run.kinks[before:])
        return out


# ------------------------------------------------------------------------------------------------ its rare calls
# (functions of the mode, out of its class: writes into integer tensors, errors, reverse passes inside f)


def _cast_fill_value(mode: _KinkMode, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A float value depending on the inputs, written into an integer or bool tensor: cast first, through the
    mode (the cast rule: trunc's or != 0's jump, one-sided at a tie), as the write casts it; the write then
    moves no tangent (PyTorch's forward AD asserted on a 0-d dual value there)."""
    def cast(v):
        if isinstance(v, Tensor) and (v.is_floating_point() or v.is_complex()) and mode.involved(v):
            return mode._dispatch(Tensor.to, (v, args[0].dtype), {})  # (as part of this call)
        return v
    if "value" in kwargs:
        return args, {**kwargs, "value": cast(kwargs["value"])}
    return (*args[:-1], cast(args[-1])) if len(args) > 1 else args, kwargs


def _leaf_write_error(mode: _KinkMode, func, args: tuple, e: RuntimeError) -> NonsmoothError | None:
    """gradwise's error for PyTorch's ``e`` where f wrote in place into one of the leaves gradwise gave it as its
    inputs; None where PyTorch's error stands (f's own leaf, a parameter: the advice would not apply)."""
    if mode.depth > 1 or "leaf Variable that requires grad is being used in an in-place" not in str(e) \
            or not (args and mode.positions.keys() & {id(args[0]), id(getattr(args[0], "_base", None))}):
        return None
    return NonsmoothError(f"{_callable_name(func)} (called at {_user_line()}) writes in place into a leaf "
                          "tensor that requires grad (gradwise's reverse passes give f its inputs as "
                          "such leaves), where PyTorch forbids in-place writes. "
                          "Inside f write x = x.clone() before writing into an input, or use the "
                          f"out-of-place op. PyTorch said: {str(e).splitlines()[0]}")


_UNHANDLED = object()  # (`_reverse_call`: the call goes on as any other)


def _reverse_call(mode: _KinkMode, func, args: tuple, kwargs: dict):
    """A reverse pass f runs (``func`` in ``REVERSE_CALLS``): its result, an error, or ``_UNHANDLED`` where the
    pass follows no direction (it goes on as any other call)."""
    mode.reverses = mode.run.reverses = True
    if mode.run.kinks:
        raise NonsmoothError(f"f runs a reverse pass ({_callable_name(func)} at {_user_line()}; "
                             "torch.autograd.functional.jacobian/hessian do too) after hitting a kink "
                             f"({mode.run.kinks[0].describe()}): that derivative is PyTorch's convention at "
                             "the kink, so f's value is. Differentiate with gradwise instead (gw.generalized_grad "
                             "inside f, or gw.directional_derivative)")
    if not mode.dual:
        return _UNHANDLED
    # no kink reached so far: its ops are PyTorch's derivative formulas away from their jumps, and forward
    # AD follows the direction through them (create_graph). Not replayed as other unruled calls are: a
    # replay on copies of its arguments would differentiate tensors in no graph
    try:
        return func(*args, **kwargs)
    except RuntimeError as e:
        if mode.graph or "does not require grad" not in str(e):
            raise
        raise NonsmoothError(f"f runs a reverse pass ({_callable_name(func)} at {_user_line()}) through "
                             "tensors computed from its inputs, and this pass of gradwise follows the "
                             "direction with forward-mode AD only, building no graph for it to run on "
                             "(gw.directional_derivative, subdifferential's sampled directions). Take f's "
                             "gradient with gw.generalized_grad, or compute the inner derivative with "
                             "torch.func.jvp / a formula") from None
