"""Where f runs: the contexts around a pass of f, and the places where gradwise cannot see f's ops.

gradwise sees f's ops through a ``TorchFunctionMode`` (`_kink_mode._KinkMode`). That is exact only where every op
that f's value depends on goes through the mode with its tangent, and every pass of f takes the same path. This
module makes the usual wrappers exact and detects the rest:

* ``torch.compile`` (any backend): every pass runs under dynamo's ``force_eager`` stance, in its own thread only
  (`_StanceSwitch`), so the compiled function's Python runs under the mode (Dynamo would otherwise trace the mode
  itself).
* Checkpointing (``torch.utils.checkpoint``, reentrant or not): during a pass the checkpointed function runs
  plainly (no recomputation in backward, which would run outside the mode with PyTorch's conventions). Same
  values, more memory.
* Module full backward hooks wrap tensors in an identity ``autograd.Function``; during a pass it has its (identity)
  forward-mode derivative, so tangents go through.
* Ops the mode never sees (TorchScript, code in C++ extensions that calls aten ops): `_OpaqueWatch`, a dispatch
  mode under the function mode, sees every aten op; one that runs outside any call the function mode saw and sits
  at its kink raises `NonsmoothError` if f's output depends on it (a forward-mode formula's compare does not).
* Custom ops (``torch.ops.<namespace>.*`` outside aten, ``torch.library`` ops) that drop the tangent (no
  forward-mode formula): `NonsmoothError` naming the op, in every pass (a trial call with a tangent decides, once
  per op).
* Custom ``autograd.Function`` s without ``jvp``: `NonsmoothError` naming the Function (`check_functions`).
* ``torch.func`` transforms inside f, and reverse passes inside f (``torch.autograd.grad``, ``.backward()``,
  ``torch.autograd.functional.jacobian`` ...) after a kink was hit: `NonsmoothError`; gradwise inside a
  ``torch.func`` transform: `NonsmoothError`.

May import: torch, gradwise._graph, gradwise._masks, gradwise._modes, ``_errors`` (lazily, for the error it raises).
"""
from __future__ import annotations

import contextlib
import functools
import math
import numbers
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch._dynamo.eval_frame as _eval_frame
import torch.autograd.forward_ad as fwAD
import torch.utils.checkpoint as _checkpoint
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor
from torch.nn.modules._functions import BackwardHookFunction
from torch.utils._pytree import tree_leaves

from gradwise import _graph
from gradwise._masks import all_finite
from gradwise._modes import PASSES, LeanDispatchMode, dynamo_off

_functorch = torch._C._functorch


class _Plain:
    """Stands in for ``CheckpointFunction`` during a pass: the function runs once, plainly."""

    @staticmethod
    def apply(function, preserve_rng_state, *args):
        return function(*args)


def _identity_jvp(ctx, *tangents):
    # the forward returns its inputs as they are: forward AD wants views of their tangents back. Unseen by
    # gradwise's mode: a call only the passes with tangents make would shift their call counts against the
    # tangent-free pass's (tangents stripped before its last tie: a full backward hook gave PyTorch's convention)
    with torch._C.DisableTorchFunction():
        out = tuple(None if t is None else t.view_as(t) for t in tangents)
    return out[0] if len(out) == 1 else out


_IN_PASS = PASSES  # passes of f open in this thread (only the thread holding _SERIAL has any)
_SERIAL = threading.RLock()  # PyTorch's forward-mode AD has one dual level per process: one pass at a time
_ORIGINAL: dict[str, object] = {}


class _CheckpointSwitch:
    """Installed as ``CheckpointFunction`` while a pass is open: plain in the thread inside it, PyTorch's
    checkpoint in every other thread."""

    @staticmethod
    def apply(function, preserve_rng_state, *args):
        target = _Plain if _IN_PASS.depth else _ORIGINAL["CheckpointFunction"]
        return target.apply(function, preserve_rng_state, *args)  # type: ignore[attr-defined]


# The non-reentrant checkpoint's generator, by the names checkpoint() calls it: the first up to torch 2.13; 2.14's
# _checkpoint_impl calls the second (fn, args, kwargs: another signature) and keeps the first as a shim over it.
# With the first alone switched, 2.14 recomputed the function in backward outside the mode (topk's int64 indices
# where the pass had saved floats: CheckpointError).
_GENERATORS = tuple(name for name in ("_checkpoint_without_reentrant_generator",
                                      "_checkpoint_without_reentrant_generator_impl") if hasattr(_checkpoint, name))


def _generator_switch(name: str) -> Callable[..., Iterator[None]]:
    def switch(*args, **kwargs) -> Iterator[None]:
        if _IN_PASS.depth:
            yield
        else:
            yield from _ORIGINAL[name](*args, **kwargs)  # type: ignore[operator]

    return switch


_GENERATOR_SWITCHES = {name: _generator_switch(name) for name in _GENERATORS}


def _jvp_switch(ctx, *tangents):
    if _IN_PASS.depth:
        return _identity_jvp(ctx, *tangents)
    jvp = _ORIGINAL["jvp"] or torch.autograd.Function.jvp  # the default raises PyTorch's "implement jvp" error
    return jvp(ctx, *tangents)  # type: ignore[operator]


class _StanceSwitch:
    """Dynamo's stance while a pass is open: ``force_eager`` in the thread inside the pass (compiled code that f
    calls runs eagerly, under the mode), the stance it replaced in every other thread. ``set_stance`` alone is one
    for the process: other threads' compiled code ran eagerly while any thread differentiated (eager speed, another
    kernel's rounding). Dynamo reads the stance's fields (stance, backend, skip_guard_eval_unsafe) at each call.
    A switch left installed after its pass (another thread's ``set_stance`` context, entered during the pass and
    exited after it, restores it) acts as the stance it replaced: the next pass unwraps it (`_install`)."""

    def __init__(self, prior: Any) -> None:
        while isinstance(prior, _StanceSwitch):  # (a left-over switch wrapped again: its eager part made of a str)
            prior = prior._prior
        self._prior = prior
        self._eager = _eval_frame.DynamoStance("force_eager")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._eager if _IN_PASS.depth else self._prior, name)


def _install() -> None:
    _ORIGINAL.update(CheckpointFunction=_checkpoint.CheckpointFunction,
                     jvp=BackwardHookFunction.__dict__.get("jvp"))
    _checkpoint.CheckpointFunction = _CheckpointSwitch
    for name, switch in _GENERATOR_SWITCHES.items():
        _ORIGINAL[name] = getattr(_checkpoint, name)
        setattr(_checkpoint, name, switch)
    BackwardHookFunction.jvp = staticmethod(_jvp_switch)
    _ORIGINAL["stance"] = _eval_frame._set_stance(_StanceSwitch(_eval_frame._stance))


def _uninstall() -> None:
    _checkpoint.CheckpointFunction = _ORIGINAL["CheckpointFunction"]
    for name in _GENERATOR_SWITCHES:
        setattr(_checkpoint, name, _ORIGINAL[name])
    if _ORIGINAL["jvp"] is None:
        del BackwardHookFunction.jvp
    else:
        BackwardHookFunction.jvp = _ORIGINAL["jvp"]
    prior = _ORIGINAL.pop("stance")
    if isinstance(_eval_frame._stance, _StanceSwitch):  # else a stance set during the pass (another thread's, or
        _eval_frame._set_stance(prior)  # f's own set_stance call) stays, as it would without gradwise


@contextlib.contextmanager
def pass_context() -> Iterator[None]:
    """Around every pass of f: compiled code runs eagerly, checkpoints plainly, backward-hook wrappers carry
    tangents. Reentrant (gradwise calls nest: stationarity runs many passes) and per thread: the checkpoint and
    hook switches act only in a thread inside a pass. Passes in different threads take turns (forward-mode AD's
    dual level is one per process: a second would raise "Nested forward mode AD is not supported"). Compiled
    code runs eagerly in the thread inside a pass only (`_StanceSwitch`)."""
    with _SERIAL:  # the switches are installed while the one thread that holds it is inside a pass
        if _IN_PASS.depth == 0:
            _install()
        _IN_PASS.depth += 1
        try:
            yield
        finally:
            _IN_PASS.depth -= 1
            if _IN_PASS.depth == 0:
                _uninstall()


@contextlib.contextmanager
def dual_level() -> Iterator[None]:
    """``fwAD.dual_level()`` for a pass (inside `pass_context`), marked as gradwise's (``PASSES.anywhere``) while
    it is open: gw.trace in another thread then traces its ops (the level makes none of its tensors duals). Where
    the level cannot open (the user's own is open, in any thread: "Nested forward mode AD") nothing is marked, and
    a trace in the user's thread passes over its duals as it does alone."""
    with fwAD.dual_level():
        PASSES.anywhere.set()
        try:
            yield
        finally:
            PASSES.anywhere.clear()


# ------------------------------------------------------------------------------------------------ one run's state
# gradwise runs f several times in one call (a probe, a ranked pass, a check for jumps, sampled pieces). A
# dropout mask drawn anew in each would rank the ties of one function and differentiate another, and a train-mode
# BatchNorm would update its running statistics once per pass. So every pass of one call starts from the random
# state the call began with (the default generators, CPU and CUDA), and the buffers of the modules whose forward
# runs (seen by a module forward pre-hook from the second pass on, in the calling thread only) are put back as the
# first pass left them: after the call the state is the one a single run of f leaves.

_STATE = threading.local()


class _CallState:
    def __init__(self) -> None:
        self.thread = threading.get_ident()
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        self.rng = (torch.random.get_rng_state(), cuda)
        self.before: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (buffer, its value after one run)
        self.hook: Any = None
        self.passes = 0

    def saw(self, module, args) -> None:
        if module._buffers and threading.get_ident() == self.thread:
            for b in module._buffers.values():
                if isinstance(b, torch.Tensor) and id(b) not in self.before:
                    self.before[id(b)] = (b, b.detach().clone())

    def restore(self) -> None:
        """Before a pass: the random state the call began with, and from the third pass on the buffers as the
        first left them. The buffers are watched (a module forward pre-hook, whose slow path costs every module
        call) only once a second pass runs: a call with one pass (no tie) pays nothing."""
        self.passes += 1
        torch.random.set_rng_state(self.rng[0])
        if self.rng[1] is not None:
            torch.cuda.set_rng_state_all(self.rng[1])
        if self.passes == 2:
            self.hook = torch.nn.modules.module.register_module_forward_pre_hook(self.saw)
        elif self.passes > 2:
            self._put_back()

    def _put_back(self) -> None:
        with torch.no_grad():
            for b, v in self.before.values():
                if not torch.equal(b, v):  # (a write bumps the version a kept graph's saved buffer checks)
                    b.copy_(v)

    def finish(self) -> None:
        if self.hook is not None:
            self.hook.remove()
            self._put_back()


def same_state(fn: Callable) -> Callable:
    """Decorate a public entry point: every pass of f it runs (`restore_state` first) starts from the random state
    the call began with, and the buffers of the modules f runs end as one run of f leaves them. An outer
    ``torch.no_grad()`` or ``inference_mode`` is ignored, as ``torch.func.grad`` does (f's own are kept): the
    passes build graphs and tangents. Never traced by dynamo: inside a compiled function the call graph-breaks and
    runs eagerly (its passes read values and switch compiled code to eager, which dynamo refuses to trace)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if getattr(_STATE, "call", None) is not None:  # nested (stationarity runs subdifferential)
            return fn(*args, **kwargs)
        call = _STATE.call = _CallState()
        try:
            with torch.inference_mode(False), torch.enable_grad():
                return fn(*args, **kwargs)
        finally:
            _STATE.call = None
            call.finish()
    return dynamo_off(wrapper)


def restore_state() -> None:
    """Before a pass of f: the state its call began with."""
    call = getattr(_STATE, "call", None)
    if call is not None:
        call.restore()


# ------------------------------------------------------------------------------------------------ functorch


def unwrapped(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor inside ``torch.func`` wrappers (GradTrackingTensor, BatchedTensor)."""
    while _functorch.is_functorch_wrapped_tensor(t):
        t = _functorch.get_unwrapped(t)
    return t


def is_wrapped(t: torch.Tensor) -> bool:
    """A ``torch.func`` wrapper (GradTrackingTensor, BatchedTensor)."""
    return bool(_functorch.is_functorch_wrapped_tensor(t))


def transforms_active() -> bool:
    return bool(_functorch._are_functorch_transforms_active()) if hasattr(
        _functorch, "_are_functorch_transforms_active") else _functorch.maybe_current_level() is not None


def check_entry(name: str, xs) -> None:
    """gradwise's own passes cannot run inside a ``torch.func`` transform (their dual level and mode sit outside
    it), nor where PyTorch traces (a fake or make_fx mode: no values, or real ones whose reads a graph would keep as
    constants); checked when a public function is called."""
    keys = torch._C._TorchDispatchModeKey
    if torch._C._get_dispatch_mode(keys.FAKE) is not None or torch._C._get_dispatch_mode(keys.PROXY) is not None:
        raise_nonsmooth(f"gradwise ({name}) was called while PyTorch traces (FakeTensorMode, make_fx, torch.export, "
                        "aot_function): kinks depend on values, which a traced program does not have. Call it "
                        "outside the traced code (inside a torch.compile'd function it runs eagerly by itself).")
    if transforms_active() or any(_functorch.is_functorch_wrapped_tensor(x) for x in xs):
        raise_nonsmooth(f"gradwise ({name}) was called inside a torch.func transform (grad, vmap, jacrev ...), "
                        "where its passes of f cannot follow tangents or lock branches. Call it outside the "
                        "transform (loop over the batch instead of vmap).")


def raise_nonsmooth(message: str):
    from gradwise._nonsmooth._errors import NonsmoothError

    raise NonsmoothError(message)


# ------------------------------------------------------------------------------------------------ reverse passes in f

REVERSE_CALLS = {torch.autograd.grad, torch.autograd.backward, torch.Tensor.backward}


# ------------------------------------------------------------------------------------------------ custom ops

# op -> whether it carries a tangent (decided by one trial call with a tangent)
_FORWARD_AD: dict[object, bool] = {}


def is_custom_op(func) -> bool:
    """A ``torch.ops`` overload outside aten/prims: an opaque kernel for gradwise."""
    if not isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return False
    return str(func).split(".")[0] not in ("aten", "prims", "prim", "_c10d_functional", "c10d_functional")


def _float_tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree] if tree.is_floating_point() or tree.is_complex() else []
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in _float_tensors(v)]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _float_tensors(v)]
    return []


def _has_tangent(t) -> bool:
    return isinstance(t, torch.Tensor) and fwAD.unpack_dual(t).tangent is not None


def carries_tangent(func, args: tuple, kwargs: dict) -> bool:
    """Whether custom op ``func`` gives its float outputs a tangent when an input has one (one trial call on
    copies, cached per op)."""
    key = func
    if key in _FORWARD_AD:
        return _FORWARD_AD[key]

    def dual(a):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            p = fwAD.unpack_dual(a).primal.detach()
            return fwAD.make_dual(p.clone(), torch.ones_like(p))
        return a

    try:
        # inside a pass the pass's dual level serves (a nested one raises "Nested forward mode AD")
        level = contextlib.nullcontext() if fwAD._current_level >= 0 else fwAD.dual_level()
        with level, torch.no_grad():
            trial = func(*[dual(a) for a in args], **{k: dual(v) for k, v in kwargs.items()})
        outs = _float_tensors(trial)
        ok = all(_has_tangent(o) for o in outs)
    except NotImplementedError:
        ok = False
    except RuntimeError as e:
        ok = "forward" not in str(e).lower()
    _FORWARD_AD[key] = ok
    return ok


def check_custom_op(func, name: str, where: str, args: tuple, kwargs: dict, out, dual: bool) -> None:
    """Refuse a custom op on f's inputs that has no forward-mode derivative: gradwise cannot follow a direction
    through it or see a kink inside it."""
    dropped = dual and any(_has_tangent(a) for a in (*args, *kwargs.values())) and not all(
        _has_tangent(o) for o in _float_tensors(out))
    if dropped or not carries_tangent(func, args, kwargs):
        raise_nonsmooth(f"{name} (called at {where}) is a custom op without a forward-mode derivative: gradwise "
                        "cannot follow a direction through it nor see a kink inside it (its tangent would be "
                        "dropped: every directional derivative 0). Register one (torch.library.register_autograd "
                        "with an autograd.Function that defines jvp, or implement the op in Python with torch ops)")


# ------------------------------------------------------------------------------------------------ custom Functions


def custom_functions(ys) -> list[type]:
    """The custom ``autograd.Function`` classes in the graph of the tensors ``ys`` (a module's backward hook and
    gradwise's own checkpoint stand-in excepted): code whose derivatives are the class's, not gradwise's."""
    found = (getattr(node, "_forward_cls", None) for node in _graph.nodes(y.grad_fn for y in ys))
    return [cls for cls in found if cls is not None and cls is not BackwardHookFunction and cls is not _Plain]


def check_functions(y: torch.Tensor, where: str) -> None:
    """Walk y's graph; a custom ``autograd.Function`` node without ``jvp`` is a part of f whose kinks gradwise
    cannot see (its forward runs without gradients) nor follow with a tangent: NonsmoothError naming it."""
    for cls in custom_functions((y,)):
        if getattr(cls, "jvp", torch.autograd.Function.jvp) is torch.autograd.Function.jvp:
            raise_nonsmooth(f"f (called at {where}) applies the custom autograd.Function {cls.__qualname__}, which "
                            "defines no jvp: gradwise cannot see a kink inside its forward nor follow a direction "
                            "through it. Define its forward-mode derivative (a jvp staticmethod), or write it with "
                            "torch ops")


# ------------------------------------------------------------------------------------------------ opaque ops


class _OpaqueWatch(LeanDispatchMode):
    """Sees every aten op of a pass. One that runs outside every call the function mode saw (``seen()`` is
    False: TorchScript, a C++ extension) and sits at its kink: NonsmoothError (raised by `check` after f returns)
    if f's output depends on it. Away from kinks PyTorch's own derivatives of such ops are exact.

    "Depends on it" is followed forward: the hit's outputs are tainted, and so is every output of an op (seen or
    not: the function mode keeps this watch on once something is tainted) that reads a tainted tensor, or a view
    of one (taints stick to storages). Forward-mode formulas of unseen ops run here too (``x.max()``'s compares x
    with its max, at a tie by construction); what they compute only feeds tangents, never f's output, so a formula
    op at "its kink" is no hit: the op it differentiates was tested itself."""

    def __init__(self, seen: Callable[[], bool], kinky: dict, where: Callable[[], str]):
        super().__init__()
        self.seen, self.kinky, self.where = seen, kinky, where
        self.hit: str | None = None
        self._taint: dict[tuple, str] = {}  # `_key` -> the first hit it depends on
        self._alive: list[torch.Tensor] = []  # keeps the tainted tensors (and so their ids) alive for the pass
        self.escaped: str | None = None
        # the pass ran code whose derivatives are not gradwise's: an op outside every call the function mode saw
        # (TorchScript, an extension), or a custom op (set by the mode)
        self.opaque = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.seen():
            out = func(*args, **kwargs)
        else:
            with torch._C.DisableTorchFunction():  # nothing here may re-enter the function mode
                out = self._unseen(func, args, kwargs)
        if self._taint:
            with torch._C.DisableTorchFunction():
                self._spread(func, (args, kwargs), out)
        return out

    def _unseen(self, func, args, kwargs):
        self.opaque = True
        out = func(*_tensor_args(func, args), **kwargs)
        name = func.overloadpacket.__name__
        test = self.kinky.get(name[:-1] if name.endswith("_") else name)
        # Whether an argument depends on f's inputs cannot be told here: tangents are not readable at this level,
        # and TorchScript's differentiable graphs run on detached inputs. Every kink op in unseen code counts.
        if test is not None and test(args, kwargs, out):
            hit = (f"{func.overloadpacket} runs at its kink (or where PyTorch's derivative formula is off) in "
                   "code that gradwise cannot see (TorchScript from torch.jit.script/trace, or a C++ extension), "
                   f"called from {self.where()}: its derivative there would be PyTorch's. Call the Python "
                   "function (the module before scripting/tracing) instead")
            self.hit = self.hit or hit
            self._mark(out, hit)
        return out

    @property
    def tainting(self) -> bool:
        return bool(self._taint)

    def _mark(self, out, hit: str) -> None:
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and (k := _key(t)) not in self._taint:
                self._taint[k] = hit
                self._alive.append(t)

    def _spread(self, func, inputs, out) -> None:
        hit = next((self._taint[k] for t in tree_leaves(inputs) if isinstance(t, torch.Tensor)
                    and (k := _key(t)) in self._taint), None)
        if hit is not None:
            self._mark(out, hit)
            if func in _TO_PYTHON:  # read into Python (an `if` on it): followed no further, so it counts
                self.escaped = self.escaped or hit

    def check(self, outputs: list[torch.Tensor] | None = None) -> None:
        """Raise for a hit f's ``outputs`` depend on (None: f did not return them; any hit counts)."""
        if outputs is None or self.escaped is not None:
            if self.hit is not None:
                raise_nonsmooth(self.escaped or self.hit)
            return
        with torch._C.DisableTorchFunction():
            hit = next((self._taint[k] for o in outputs if (k := _key(o)) in self._taint), None)
        if hit is not None:
            raise_nonsmooth(hit)


# ops that hand a tensor's value to Python (``if t:``, ``t.item()``, ``torch.equal``)
_TO_PYTHON = frozenset((torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
                        torch.ops.aten.equal.default))


def _key(t: torch.Tensor) -> tuple:
    """What a taint sticks to: a strided tensor's storage (its views, and an in-place write into any of them,
    share it), else the tensor itself. Passes of f run eagerly on real tensors, so the address is readable."""
    if t.layout is torch.strided and not t.is_meta:
        try:
            if ptr := t.untyped_storage().data_ptr():
                return ("storage", ptr)
        except RuntimeError:  # a storage without data (forward AD's Python decompositions pass such tensors)
            pass
    return ("tensor", id(t))


def _tensor_args(func, args: tuple) -> tuple:
    """TorchScript's wrapped numbers (0-dim tensors made from Python scalars) reach a dispatch mode as Python
    numbers; an op whose schema wants a Tensor there gets the tensor back."""
    if all(isinstance(a, torch.Tensor) or not isinstance(a, numbers.Number) for a in args):
        return args
    schema = func._schema.arguments
    return tuple(torch.tensor(a) if isinstance(a, numbers.Number) and i < len(schema) and
                 isinstance(schema[i].type, torch._C.TensorType) else a for i, a in enumerate(args))


def opaque_watch(mode, kinky: dict, where: Callable[[], str]) -> _OpaqueWatch:
    return _OpaqueWatch(lambda: mode.depth > 0, kinky, where)


# ------------------------------------------------------------------------------------------------ option checks


def check_real(name: str, value, *, low: float | None = None, high: float | None = None, low_open: bool = False,
               allow_none: bool = False) -> None:
    """Refuse an option that is not a finite real in [low, high] (``low_open``: (low, high])."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name}={value!r}: must be a finite real number;" + _range(low, high, low_open))
    v = float(value)
    if (low is not None and (v < low or (low_open and v == low))) or (high is not None and v > high):
        raise ValueError(f"{name}={value!r} is out of range:" + _range(low, high, low_open))


def _range(low, high, low_open) -> str:
    lo = "-inf" if low is None else low
    hi = "inf" if high is None else high
    return f" valid range is {'(' if low_open else '['}{lo}, {hi}{']' if high is not None else ')'}"


def check_int(name: str, value, *, low: int, high: int | None = None, allow_none: bool = False) -> None:
    """Refuse an option that is not an int in [low, high]."""
    if value is None and allow_none:
        return
    valid = f"valid range is [{low}, {high}]" if high is not None else f"valid range is [{low}, inf)"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}={value!r}: must be an integer; {valid}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name}={value!r} is out of range: {valid}")


_TRACED = (FakeTensor, FunctionalTensor)  # torch.compile's and export's tensors, read outside their mode too


def check_input_values(xs, what: str = "inputs") -> None:
    """Refuse sparse, meta, complex and non-finite inputs with a message naming the fix."""
    check_entry(what, xs)
    for i, x in enumerate(xs):
        if x.layout != torch.strided:
            raise TypeError(f"{what}[{i}] has layout {x.layout}; gradwise needs dense (strided) tensors: pass "
                            f"x.to_dense()")
        if x.is_meta or isinstance(x, _TRACED):
            raise TypeError(f"{what}[{i}] is a {'meta' if x.is_meta else 'traced'} tensor (no values): kinks depend "
                            "on values; pass a tensor with data")
        if x.is_inference() and what != "directions":  # (directions are copied: `_engine._check_directions`)
            raise TypeError(f"{what}[{i}] was made in inference mode (an inference tensor cannot be differentiated): "
                            "pass x.clone() made outside torch.inference_mode()")
        if x.is_complex():
            raise TypeError(f"{what}[{i}] is complex ({x.dtype}); derivatives need a real floating dtype: pass "
                            "torch.view_as_real(x) and rebuild the complex value inside f")
    if all_finite(xs):
        return
    for i, x in enumerate(xs):
        if not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).sum())
            if what == "directions":
                raise ValueError(f"directions[{i}] holds {bad} NaN/Inf value(s): a direction must be finite")
            raise ValueError(f"{what}[{i}] holds {bad} NaN/Inf value(s): there is no derivative at a non-finite "
                             "point, and gradwise does not invent one. Find where they come from (gw.trace) or mask "
                             "them before calling")
