"""The trace's common ground: its settings (``_MAX_NODES``, ``_DEFER_ON_CPU``: tests patch them here, so
every module reads them as ``_common.<name>``), where user code called an op (frames, locations, source lines),
small tensor helpers, ``_ByIdentity`` (tensor -> value by identity, held weakly), the process rank, and the
records the trace keeps per autograd node (``_Node``) and per kink site (``_KinkGroup``).

May import: torch, gradwise._masks, _kinds, _store.
"""

from __future__ import annotations

import contextlib
import functools
import linecache
import math
import os
import sys
import threading
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from gradwise._masks import inexact as _inexact
from gradwise._masks import mask_any
from gradwise._trace import _kinds
from gradwise._trace._store import count as _count
from gradwise._trace._store import first as _first
from gradwise._trace._store import held as _held

aten = torch.ops.aten
_ACCUMULATE_SEQ = 2**64 - 1  # the sequence number every AccumulateGrad node reports
_MAX_NODES = 100_000  # node records kept for long runs (~250 B each): the oldest half is dropped past this
_DEFER_ON_CPU = False  # batch the checks on CPU too, as on accelerators (tests use it to cover that path)

# -- out of a running profiler's sight ---------------------------------------------------------------------

# The trace's own ops (finiteness reductions, masks, re-runs) are no ops of the program: while a profiler runs,
# the dispatch mode handles each op with record functions off, and turns them on again only around the user's op
# itself (run_op), so profiler output lists what it lists without the trace (plus PyTorch's own nesting of an op
# under "PythonDispatchMode", which every dispatch mode has).
_record = torch._C._autograd._enable_record_function
_profiler_on = torch.autograd._profiler_enabled


class _Quiet(threading.local):
    on = False


_QUIET = _Quiet()


@contextlib.contextmanager
def unprofiled():
    """Record functions off in the block while a profiler runs (and back on after, unless already off)."""
    if not _profiler_on():
        yield
        return
    before = _QUIET.on
    _QUIET.on = True
    _record(False)
    try:
        yield
    finally:
        _QUIET.on = before
        _record(not before)


def run_op(func, args, kwargs):
    """The user's op itself, seen by a running profiler as without the trace."""
    if not _QUIET.on:
        return func(*args, **kwargs)
    _QUIET.on = False
    _record(True)
    try:
        return func(*args, **kwargs)
    finally:
        _QUIET.on = True
        _record(False)


# -- where user code called an op -------------------------------------------------------------------------

# torch's files and all of gradwise's (this file is in gradwise/_trace/: the package directory is two levels up)
_INTERNAL_DIRS = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(os.path.dirname(__file__)) + os.sep)
_INTERNAL_FILES = {"contextlib.py", "functools.py", "runpy.py"}
# installed libraries (Lightning, accelerate, transformers call backward and the model on the user's behalf): the
# user's line is the one that called them
_LIBRARY_DIRS = (f"{os.sep}site-packages{os.sep}", f"{os.sep}dist-packages{os.sep}")
_internal_file: dict[str, bool] = {}  # keyed by file name: a str caches its hash, a code object rehashes its fields
# file names kept by each of the two caches: every torch.fx GraphModule has a file name of its own
# ("<eval_with_key>.N"), so a program that builds one per step (symbolic_trace, export's module()) grew them by one
# entry a step for as long as it ran. Emptied when full (in place: the watch's replay holds _core_file itself)
_FILES_KEPT = 4096


def _is_internal(code) -> bool:
    name = code.co_filename
    r = _internal_file.get(name)
    if r is None:
        # (torch.fx's generated code, "<eval_with_key>.N", is no file a user can open: a compiled backward run op by
        # op, a symbolic_trace'd module; the line that called it is named)
        r = _core(code) or (any(d in name for d in _LIBRARY_DIRS) and not _main(name)) or \
            name.startswith("<eval_with_key>")
        if len(_internal_file) >= _FILES_KEPT:
            _internal_file.clear()
        _internal_file[name] = r
    return r


def _main(name: str) -> bool:
    """Whether ``name`` is the running script (which may itself live in site-packages)."""
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    return main is not None and os.path.abspath(main) == os.path.abspath(name)


def _user_frame():
    """The innermost frame outside torch and gradwise (the user's line that called the op)."""
    f = sys._getframe(2)
    internal = _internal_file
    while f is not None:
        r = internal.get(f.f_code.co_filename)  # runs for every op: the cache lookup inlined
        if r is None:
            r = _is_internal(f.f_code)
        if not r:
            return f
        f = f.f_back
    return f


# TorchScript runs its ops in its interpreter: no Python frame of the scripted code, so the line is its caller's
TORCHSCRIPT = "a TorchScript graph"
SCRIPTED = " (inside TorchScript code that this line calls: the op's own line is not known)"


def in_torchscript() -> bool:
    """Whether the op being dispatched runs inside a scripted module's forward (``torch.jit.script(module)``):
    Module._call_impl called a ScriptMethod below the user's line. Read where a birth is described (rare), never
    per op. A scripted function called directly leaves no such frame: not known."""
    f = sys._getframe(1)
    while f is not None:
        if f.f_code.co_name == "_call_impl" and isinstance(f.f_locals.get("forward_call"), torch._C.ScriptMethod):
            return True
        if not _is_internal(f.f_code):  # the user's frame: the op was called from Python code
            return False
        f = f.f_back
    return False


def torchscript_node(node) -> bool:
    """Whether the autograd node ``node`` is a TorchScript graph's backward (its forward's ops ran in the
    interpreter, whose detached outputs the trace saw make the node)."""
    return node is not None and "DifferentiableGraphBackward" in node.name()


# the torch files through which the engine runs a hook of the user's: module backward hooks (utils/hooks.py), the
# deprecated Module.register_backward_hook (_WrappedHook, nn/modules/module.py), register_multi_grad_hook
# (autograd/graph.py), and gradwise's wrapper of a tensor hook during a strong-zero pass (_strong_zeros/_hooks.py).
# Any other torch file between the user's code and the engine runs it as the backward does: a custom Function's
# backward (autograd/function.py), a checkpoint's recomputation (utils/checkpoint.py).
_HOOK_RUNNERS = (*(os.path.join("torch", *p) for p in (("utils", "hooks.py"), ("nn", "modules", "module.py"),
                                                        ("autograd", "graph.py"))),
                 os.path.join("gradwise", "_strong_zeros", "_hooks.py"))
_core_file: dict[str, bool] = {}


def _core(code) -> bool:
    """Torch's, gradwise's or the few stdlib files the trace passes through; an installed library's code is not
    (a hook of a library, a gradient logger's, is one the program runs as its own)."""
    name = code.co_filename
    r = _core_file.get(name)
    if r is None:
        if len(_core_file) >= _FILES_KEPT:
            _core_file.clear()
        r = _core_file[name] = name.startswith(_INTERNAL_DIRS) or name.startswith("<frozen") or \
            os.path.basename(name) in _INTERNAL_FILES
    return r


def engine_hook(frame, inner=None) -> str | None:
    """The name of the function (the user's or a library's) that the autograd engine runs as a hook where
    ``frame`` is, inside a backward: a tensor's, a node's, a post-accumulate-grad one, a module's (through
    ``_HOOK_RUNNERS``), on this thread or a device thread (whose stack starts in the hook). None where torch code
    runs it otherwise (a custom Function's backward, a checkpoint's recomputation) and where ``frame`` is outside
    the engine, which ``inner`` (the frame running now) then lies in: a library's custom Function, whose
    ``_user_frame`` is the user's backward call (it was named 'hook <module>')."""
    f = inner
    while f is not None and f is not frame:
        if f.f_code.co_name == "_engine_run_backward":
            return None
        f = f.f_back
    top, runners_only, f = None, True, frame
    while f is not None and f.f_code.co_name != "_engine_run_backward":
        if not _core(f.f_code):
            top, runners_only = f, True  # a helper the hook called: the hook is the outermost such frame
        elif not f.f_code.co_filename.endswith(_HOOK_RUNNERS):
            runners_only = False
        f = f.f_back
    if top is None or not runners_only:
        return None
    return getattr(top.f_code, "co_qualname", top.f_code.co_name)


def _loc(frame) -> tuple:
    """(file, line) of a frame, for reports."""
    return (frame.f_code.co_filename, frame.f_lineno) if frame is not None else ("<unknown>", 0)


def _fmt(loc: tuple) -> str:
    return f"{_shown_path(loc[0], os.getcwd())}:{loc[1]}"


@functools.lru_cache(maxsize=1024)
def _shown_path(path: str, cwd: str) -> str:
    """``path`` relative to the working directory when it lies below it (os.path.relpath is slow: cached)."""
    with contextlib.suppress(ValueError):
        rel = os.path.relpath(path, cwd)
        if not rel.startswith(".."):
            return rel
    return path


def _source(loc: tuple) -> str:
    return linecache.getline(loc[0], loc[1]).strip()


def _op_name(func) -> str:
    """``namespace.op`` as reports name it ("aten.mm"; a library's custom op keeps its own namespace, "mylib.fused":
    named "aten.fused" it read as a PyTorch op the user could not find)."""
    return f"{func.namespace}.{func.overloadpacket.__name__}"


# -- small tensor helpers ------------------------------------------------------------------------------------


def _tensors(args) -> list[torch.Tensor]:
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)) and a and not isinstance(a[0], int):  # sizes/strides hold no tensor
            out.extend(t for t in a if isinstance(t, torch.Tensor))
    return out


def nonfinite_number(args) -> float | None:
    """A NaN/Inf Python number among an op's arguments (x * float("nan"), clamp(x, max=math.inf)), or None."""
    for a in args:
        if isinstance(a, float) and not math.isfinite(a):
            return a
    return None


def _floats(out, empty: bool = False) -> list[torch.Tensor]:
    """The floating (or complex) tensors of an op's output; the empty ones only where ``empty`` (they hold no
    NaN/Inf to check, but an empty sensitivity still carries the flow: a sum over an empty selection)."""
    if isinstance(out, torch.Tensor):
        return [out] if _inexact(out) and (empty or out.numel()) else []
    if isinstance(out, (list, tuple)):
        return [t for t in out if isinstance(t, torch.Tensor) and _inexact(t) and (empty or t.numel())]
    return []


def _grad(t: object) -> torch.Tensor | None:
    """``t.grad`` of a named tensor, None for a non-leaf (named when torch.autograd.grad took its gradient) that
    does not retain one: reading a non-leaf's .grad makes PyTorch warn, an error under -W error."""
    return t.grad if isinstance(t, torch.Tensor) and (t.is_leaf or t.retains_grad) else None


def _nonfinite(t: torch.Tensor) -> bool:
    return _inexact(t) and t.numel() > 0 and _kinds.readable(t) and not bool(
        torch.isfinite(_held(t)).all())


def _nonfinite_mask(t: torch.Tensor) -> torch.Tensor:
    """Where ``t`` is NaN/Inf, as a bool tensor of its shape (of an expanded view: a view of the stored part's)."""
    return (~torch.isfinite(_held(t))).expand(t.shape)


def _nan_mask(t: torch.Tensor) -> torch.Tensor:
    return torch.isnan(_held(t)).expand(t.shape)


def _has_nan(t: torch.Tensor) -> bool:
    return bool(torch.isnan(_held(t)).any())


def _nan_in(t: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether ``t`` is NaN somewhere ``mask`` is True (no masked copy of t; over the stored part of both where
    they are expanded alike)."""
    ht, hm = _held(t), _held(mask)
    if ht.shape == hm.shape:
        return bool(mask_any(torch.isnan(ht).logical_and_(hm)))
    return bool(mask_any(torch.isnan(t).logical_and_(mask)))


def _positions(mask: torch.Tensor) -> tuple[int, list[list[int]]]:
    return _count(mask), _first(mask)


def _aligned(ts: list[torch.Tensor], shape) -> bool:
    """Do these tensors broadcast elementwise onto `shape` (so positions line up)?"""
    try:
        return all(torch.broadcast_shapes(t.shape, shape) == shape for t in ts)
    except RuntimeError:
        return False


@functools.cache
def pointwise(func) -> bool:
    """Whether ``func`` is elementwise: PyTorch tags it pointwise, or it is the in-place form of an op it tags so
    (``masked_fill_``, ``mul_``: PyTorch tags those ``inplace`` only)."""
    if torch.Tag.pointwise in func.tags:
        return True
    name = func.overloadpacket.__name__
    if torch.Tag.inplace not in func.tags or not name.endswith("_"):
        return False
    functional = getattr(getattr(torch.ops.aten, name[:-1], None), func._overloadname, None)
    return functional is not None and torch.Tag.pointwise in functional.tags


# -- why a NaN/Inf was born: one explainer per op family (keyed by aten overload packet) ----------------------
def _recomputing(node) -> bool:
    """Is this op a forward that a reentrant ``torch.utils.checkpoint`` runs again inside its backward (its node
    current, grad on)? Its ops are forward ops of the user's lines: recorded as such, so that the nodes they make
    (which the checkpoint's inner backward then runs) and the NaN/Inf they make have their lines, not the
    backward call's."""
    return node is not None and torch.is_grad_enabled() and node.name() == "CheckpointFunctionBackward"


class _ByIdentity:
    """Tensor (or module) -> value by identity, held weakly: WeakTensorKeyDictionary's semantics for a
    fraction of its cost (it builds a Python-level WeakIdRef per lookup; here a lookup is one dict get and one
    weakref call, on every op the tracer sees). Dead entries are dropped whenever the table has doubled, so a
    dead key's value lives until then: for small values (sequence numbers, provenance sets, names)."""

    __slots__ = ("_d", "_limit")

    def __init__(self) -> None:
        self._d: dict[int, tuple] = {}
        self._limit = 1024

    def get(self, t, default=None):
        e = self._d.get(id(t))
        return e[1] if e is not None and e[0]() is t else default

    def __contains__(self, t) -> bool:
        e = self._d.get(id(t))
        return e is not None and e[0]() is t

    def __bool__(self) -> bool:
        """Whether any entry may be live (dead ones count until the next purge): an empty table answers every
        lookup of an op's inputs at once (the trace's provenance table holds nothing until a NaN/Inf appears)."""
        return bool(self._d)

    def found(self, ts) -> list[tuple]:
        """(t, value) for each of ``ts`` in the table (one call for an op's inputs: it runs on every op)."""
        d = self._d
        return [(t, e[1]) for t in ts if (e := d.get(id(t))) is not None and e[0]() is t]

    def __getitem__(self, t):
        e = self._d.get(id(t))
        if e is None or e[0]() is not t:
            raise KeyError(t)
        return e[1]

    def __setitem__(self, t, value) -> None:
        self._d[id(t)] = (weakref.ref(t), value)
        if len(self._d) > self._limit:
            self._d = {k: e for k, e in self._d.items() if e[0]() is not None}
            self._limit = max(1024, 2 * len(self._d))

    def items(self) -> list[tuple]:
        return [(t, e[1]) for e in list(self._d.values()) if (t := e[0]()) is not None]


class _Cleanness:
    """Non-finite forward value -> whether it is clean (``_provenance._clean``), kept with where it was NaN/Inf
    then: an element NaN/Inf then and finite now was written since by an op that told no cleanness of this tensor
    (``x.reciprocal_()`` after ``v = x[:2]``, ``x.data``'s ops), so it may descend from that NaN/Inf: no longer
    clean (log(v) was told as a log(0) of its own beside the Inf that made the 0). Its masks go with their tensor
    (a WeakTensorKeyDictionary: ``_ByIdentity`` keeps a dead key's value until its next purge, up to 1024 masks
    the size of activations); it is read on the non-finite path only."""

    __slots__ = ("_d",)

    def __init__(self) -> None:
        self._d = WeakTensorKeyDictionary()

    def __setitem__(self, t, clean: bool) -> None:
        self._d[t] = _nonfinite_mask(t) if clean else None

    def get(self, t, default=False) -> bool:
        if t not in self._d:
            return default
        was = self._d[t]
        return was is not None and was.shape == t.shape and not bool((was & torch.isfinite(_held(t))).any())


def _dist_rank() -> int | None:
    """This process's rank in the default process group, None when torch.distributed is not in use."""
    dist = getattr(torch, "distributed", None)
    return dist.get_rank() if dist is not None and dist.is_available() and dist.is_initialized() else None


# -- what the trace records ----------------------------------------------------------------------------------


@dataclass(slots=True)  # one per autograd node: up to _MAX_NODES of them
class _Node:
    op: str
    loc: tuple
    kinks: list = field(default_factory=list)  # (key, mask or None) to check the sensitivity against
    born: list = field(default_factory=list)  # (birth, mask) made at its output: the sensitivity says which are used
    read: tuple = ()  # (mask, births) of the NaN/Inf its backward formula read in its saved values (_TIES_COUNTED)
    rows: tuple = ()  # the dims a row spans, of a row-wise op or a scan: its backward reads a row's saved values


@dataclass
class _KinkGroup:
    kind: str
    op: str
    loc: tuple
    convention: str
    count: int = 0
    occurrences: int = 0
    indices: list = field(default_factory=list)
    reached: bool = False
    reaches: list = field(default_factory=list)  # the leaves below it, when a nonzero sensitivity first reached it
    step: int | None = None  # the step of its first occurrence
