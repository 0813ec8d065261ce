"""Strong zeros for backwards compiled by torch.compile (AOTAutograd's ``CompiledFunctionBackward`` nodes).

Where the pass hooks in, and why
--------------------------------
A compiled function's backward is one autograd node whose work happens in a generated kernel, out of
reach of the eager dispatch mode. gradwise serves it at *backward* time, from the engine hook that already runs
before every backward under strong zeros (``_engine._engine_run``):

1. Each ``CompiledFunctionBackward`` in the graph gets a second compiled backward, built once from AOTAutograd's
   backward FX graph with ``_compile_pass.rewrite_backward`` added to ``torch._inductor.config.
   post_grad_custom_pre_pass`` (a ``CustomGraphPass`` whose uuid enters inductor's cache key) for that compile
   only. For the length of one backward under strong zeros the node runs that variant; before and after, and
   on other threads' plain backwards, it runs PyTorch's own. So users call ``torch.compile`` as they always do,
   and a function compiled outside ``gw.strong_zeros()`` gets strong zeros inside it with no recompilation of
   the forward, no dynamo guard and no global switch left on (a guard on a gradwise flag would need dynamo to
   read that flag while tracing user code, and would recompile the forward, which the pass does not change).
   The variant is compiled without donated buffers, so it may run with the graph retained.
2. The backward runs once, under the eager strong-zero mode (the plan's 'compiled' path), with each compiled
   node as ``_hybrid``: its strong variant first, outside the mode; if what it returns holds NaN/Inf (a
   structural zero made *outside* the graph, by eager code after a compiled model or in another graph after a
   graph break; an op the pass has no rule for), that node alone runs again, its backward FX graph op by op
   (AOTAutograd keeps it for lazy compilation) under the mode, from the same arguments, where the supports that
   arrive from outside meet its NaN. The engine itself runs once, so hooks on intermediate tensors,
   ``retain_grad`` and DDP's reducer see one backward (running the whole backward twice ran them twice: a hook on
   NaN, a retained gradient doubled). A zero made in an *upper* compiled graph reaches a lower one as a plain
   value; when the lower one falls back, the upper graphs' taken results get the supports their own op-by-op run
   finds (``_Hybrid.recover``); a NaN/Inf that stays after that is kept with a ``CompiledBackwardWarning``, as
   is one left by any node's op-by-op run (some structural zeros are saved values there: it may be genuine).
   A graph of compiled nodes and leaves only (a whole training step compiled) has nothing outside the
   compiled graphs that could make a zero: it runs outside the mode, and a node that falls back enters it, all
   of them with one support table (so supports cross any number of graph breaks); unless the engine sums two
   graphs' results for a third, a sum that must run under the mode to unite their supports.
3. A backward loaded from AOTAutograd's on-disk cache keeps its FX graph but not the metadata to compile it
   again: it runs op by op under the mode (right zeros, eager speed, finite values equal to the kernel's within
   rounding). PyTorch's kernel is not tried first: without the pass, inductor's graph can turn a NaN made
   inside it into a wrong finite number (the slow sweep found four such programs). A compiled node whose graph
   is gone entirely can only run as compiled (its finite results unchecked, as in plain PyTorch): if the
   gradients then hold NaN/Inf, gradwise warns (``CompiledBackwardWarning``), naming the node and the fix.

One table, two consumers: which ops make, move, add, multiply or select structural zeros is written once, in
``gradwise._ops._zeros``; the eager rules (on tensors, ``_rules_pointwise``) and the pass (on graph nodes,
``_compile_rules``) each implement every kind they can, and keep rules of their own only for ops whose rule
needs more than a kind (attention, CTC, the bilinear ops' contractions). The op-by-op run reads the graph
through ``_graph_forms.for_eager``, which puts back what a compiled graph hides
from the eager rules (a formula's zeros, a decomposed fused op, which formula an op belongs to), so that one
rule table serves it.

Traced backwards (AOTAutograd tracing the joint graph on fake tensors) are never inspected: ``_plan`` steps
aside for them (``_traced``).

May import: torch, gradwise._masks, _contract, _autograd_graph, and (inside functions, at call time)
_compile_pass, _compile_rules, _pass_windows, _graph_forms, _supports, _rules, _planning.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from gradwise._masks import inexact
from gradwise._strong_zeros._autograd_graph import _ACCUMULATE_GRAD, _leaves, _root_nodes, _walk
from gradwise._strong_zeros._contract import GradwiseWarning

__all__ = ["CompiledBackwardWarning", "compile_stats", "compiled_run", "strong_zero_pass", "without_compiled_autograd"]


class CompiledBackwardWarning(GradwiseWarning):
    """Under strong zeros, a compiled backward left NaN/Inf that may be contamination: gradwise could not see
    into it, a graph break separated a zero from the NaN, or its graph ran op by op and the NaN stayed (inside a
    compiled graph some structural zeros are saved values, so gradwise cannot tell it from a genuine one). Also
    given, once per process, when a backward under strong zeros bypasses compiled autograd
    (``without_compiled_autograd``)."""


def _pass_base() -> type:
    from torch._inductor.custom_graph_pass import CustomGraphPass

    return CustomGraphPass


_PASS: Any = None


def strong_zero_pass() -> Any:
    """The inductor ``CustomGraphPass`` that applies strong zeros to backward graphs (forward graphs untouched).

    It is installed by gradwise for the compiles it makes; it can also be installed by hand, e.g.
    ``torch._inductor.config.post_grad_custom_pre_pass = gw._strong_zeros._compile.strong_zero_pass()``, to make
    every inductor backward use strong zeros (inside or outside ``gw.strong_zeros()``)."""
    global _PASS
    if _PASS is None:
        from gradwise._ops import _zeros
        from gradwise._strong_zeros import _compile_pass, _compile_rules, _pass_windows

        # inductor's cache key: the pass (its rules and windows) and the shared facts it builds its rules from
        digest = hashlib.sha256(b"".join(Path(m.__file__).read_bytes()
                                         for m in (_compile_pass, _compile_rules, _pass_windows, _zeros))).hexdigest()

        class StrongZeroPass(_pass_base()):  # type: ignore[misc]
            """Strong zeros over AOTAutograd's backward graph (see gradwise._strong_zeros._compile_pass)."""

            def __call__(self, graph: torch.fx.Graph) -> None:
                _compile_pass.rewrite_backward(graph)

            def uuid(self) -> str:
                return "gradwise-strong-zeros-" + digest

        class CheckedStrongZeroPass(StrongZeroPass):
            """The same, plus one more output: whether every gradient is finite (``_compile_pass.
            append_finite_flag``). Only for the variants gradwise calls itself (``_hybrid`` strips the flag)."""

            def __call__(self, graph: torch.fx.Graph) -> None:  # (only the variant's backward compiles under it)
                _compile_pass.rewrite_backward(graph)
                _compile_pass.append_finite_flag(graph)

            def uuid(self) -> str:
                return "gradwise-strong-zeros-checked-" + digest

        _PASS = StrongZeroPass(), CheckedStrongZeroPass()
    return _PASS[0]



@contextlib.contextmanager
def _with_pass(checked: bool = False) -> Iterator[None]:
    """The pass added to inductor's post-grad passes for one compile; ``checked``: the variant that also returns
    the finite flag (not where the user installed the pass by hand: their backward must keep its outputs).
    ``config.patch`` is thread-local in torch 2.13 (ContextVar overrides), so a plain compile on another thread
    meanwhile does not get the pass (tests/test_compile.py guards it)."""
    from torch._inductor import config
    from torch._inductor.custom_graph_pass import get_custom_graph_passes

    current = list(get_custom_graph_passes(config.post_grad_custom_pre_pass))
    ours = strong_zero_pass()
    if ours in current:
        yield
        return
    with config.patch(post_grad_custom_pre_pass=[*current, _PASS[1] if checked else ours]):
        yield


# ---------------------------------------------------------------------------------------------------------
# Reaching a CompiledFunctionBackward's backward compiler (AOTAutograd keeps it in a closure cell)
# ---------------------------------------------------------------------------------------------------------


def _is_compiled(node: Any) -> bool:
    return type(node).__name__ == "CompiledFunctionBackward"


def compiled_nodes(roots: Sequence[Any]) -> list[Any]:
    """The CompiledFunctionBackward nodes reachable from ``roots``."""
    return [n for n in _walk(roots) if _is_compiled(n)]


def _backward_compiler(node: Any) -> Any:
    """AOTAutograd's ``_AutogradBackwardCompiler`` of a compiled node, or None where it cannot be reached."""
    cls = getattr(node, "_forward_cls", None)
    if cls is None:
        return None
    cached = cls.__dict__.get("_gw_backward_compiler", False)
    if cached is not False:
        return cached
    bc = _find_backward_compiler(cls)
    with contextlib.suppress(AttributeError, TypeError):
        cls._gw_backward_compiler = bc  # looked up once per compiled function
    return bc


def _find_backward_compiler(cls: Any) -> Any:
    impl = cls.__dict__.get("_backward_impl")
    fn = getattr(impl, "__func__", impl)
    code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
    if code is None or not cells:
        return None
    for name, cell in zip(code.co_freevars, cells, strict=True):
        if name == "backward_compiler":
            bc = cell.cell_contents
            return bc if hasattr(bc, "compiled_bw") and hasattr(bc, "get_or_compile") else None
    return None


def _graph_module(bc: Any) -> Any:
    """The backward FX graph AOTAutograd keeps for lazy compilation, or None."""
    info = getattr(bc, "lazy_backward_info", None)
    module = getattr(info, "bw_module", None)
    if module is None and callable(getattr(info, "bw_module_fn", None)):
        with contextlib.suppress(Exception):
            module = info.bw_module_fn()
    return module


def _donated(bc: Any) -> list[tuple[Any, Any]]:
    metas = [bc.fw_metadata]
    ctx = getattr(getattr(bc, "lazy_backward_info", None), "saved_context", None)
    if getattr(ctx, "fw_metadata", None) is not None:
        metas.append(ctx.fw_metadata)
    return [(m, m.bw_donated_idxs) for m in metas if hasattr(m, "bw_donated_idxs")]


def _strong_variant(bc: Any) -> _Flagged | None:
    """The backward compiled with the strong-zero pass (once per compiled function), or None."""
    strong = getattr(bc, "_gw_strong", None)
    if strong is not None or getattr(bc, "_gw_strong_failed", False):
        return strong
    with _SWAP_LOCK:  # (the compile clears bc.compiled_bw for a moment; another thread may have compiled it)
        if getattr(bc, "_gw_strong", None) is None and not getattr(bc, "_gw_strong_failed", False):
            return _compile_strong_variant(bc)
        return getattr(bc, "_gw_strong", None)


def _compile_strong_variant(bc: Any) -> _Flagged | None:
    from torch._functorch._aot_autograd.runtime_wrappers import AutogradLazyBackwardCompileInfo

    if not isinstance(bc.lazy_backward_info, AutogradLazyBackwardCompileInfo) or bc.bw_compiler is None:
        return None
    old = bc.compiled_bw, bc.try_save_cache_entry, _donated(bc)
    outputs = _output_count(bc)  # before the compile: its passes may rewrite the graph in place
    bc.compiled_bw, bc.try_save_cache_entry = None, None  # compile afresh; never into AOTAutograd's cache entry
    try:
        with _with_pass(checked=True), _own_bucket(bc):
            # saved_tensors_use_once=False: no donated buffers, so the variant may run with the graph retained
            try:
                strong = bc.get_or_compile(saved_tensors_use_once=False)
            except Exception as exc:
                if "C++ compile error" not in str(exc):
                    raise
                strong = _unvectorized(bc)
        strong = _Flagged(strong, outputs)
    except Exception as exc:
        warnings.warn(f"gw.strong_zeros: the strong-zero pass could not compile this backward ({type(exc).__name__}:"
                      f" {str(exc).splitlines()[0][:200] if str(exc) else ''}); under strong zeros its backward "
                      f"graph runs op by op instead (correct, at eager speed). Please report this graph.",
                      CompiledBackwardWarning, stacklevel=6)
        bc._gw_strong_failed = True  # the op-by-op variant serves it from now on (it reuses no saved buffer)
        return None
    finally:
        bc.compiled_bw, bc.try_save_cache_entry = old[0], old[1]
        for meta, idxs in old[2]:
            meta.bw_donated_idxs = idxs
    bc._gw_strong = strong
    return strong


def _output_count(bc: Any) -> int | None:
    module = _graph_module(bc)
    if module is None:
        return None
    return len(next(n for n in reversed(module.graph.nodes) if n.op == "output").args[0])


class _Flagged:
    """A strong variant that may return the finite flag as one output more (inductor ran the checked pass, or
    served its result from the cache; another backend compiles without it; ``outputs`` None: not known)."""

    def __init__(self, fn: Callable[..., Any], outputs: int | None) -> None:
        self.fn, self.outputs = fn, outputs

    def run(self, args: list) -> tuple[list, bool]:
        """The gradients, and whether they are all finite (read from them where the variant has no flag)."""
        out = list(_call(self.fn, args))
        if self.outputs is not None and len(out) == self.outputs + 1:
            return out, bool(out.pop())
        from gradwise._strong_zeros._planning import _all_finite

        return out, _all_finite([t for t in out if isinstance(t, torch.Tensor) and inexact(t)])


def _unvectorized(bc: Any) -> Callable[..., Any]:
    """Inductor's CPU vectorizer can emit code that g++ refuses for the pass's bool masks (a ?: of VecMask<int>
    and VecMask<float>, seen on a Llama layer's rotary backward): the strong variant is then compiled without
    vectorization. Its finite gradients round like PyTorch's scalar kernels, not bit for bit like its vectorized
    ones (the backward compiled without the pass is not taken instead: inductor's rewrites can turn a NaN made
    inside it into a finite number)."""
    with torch._inductor.config.patch({"cpp.simdlen": 1}):
        return bc.get_or_compile(saved_tensors_use_once=False)


@contextlib.contextmanager
def _own_bucket(bc: Any) -> Iterator[None]:
    """Under DDP's graph splitting (DDPOptimizer) one dynamo graph holds N AOT graphs, and a lazy backward compile
    takes its forward metadata from a shared counter that PyTorch's own backward compiles count down, last bucket
    first. An extra compile (the strong variant) would take another bucket's metadata, or find the counter spent
    (an AssertionError): point the counter at this graph's own metadata for the compile, and put it back after."""
    ctx = getattr(bc.lazy_backward_info, "saved_context", None)
    ddp = getattr(ctx, "ddp_optimizer_ctx", None)
    if ddp is None:
        yield
        return
    own = next((i for i, meta in enumerate(ddp.metadata_per_bucket) if meta is bc.fw_metadata), None)
    if own is None:
        raise RuntimeError("the DDP bucket of this compiled backward is not among DDPOptimizer's")
    saved = ddp.curr_bucket, ctx.fw_metadata
    ddp.curr_bucket = own
    try:
        yield
    finally:
        ddp.curr_bucket, ctx.fw_metadata = saved


def _eager_variant(bc: Any) -> Callable[..., Any] | None:
    """The backward FX graph run op by op (through the eager strong-zero mode), or None."""
    eager = getattr(bc, "_gw_eager", None)
    if eager is None:
        from gradwise._strong_zeros._graph_forms import for_eager, register_graph_ops

        register_graph_ops()
        module = _graph_module(bc)
        if module is None:
            return None
        module = for_eager(module)

        def eager(args: list) -> Any:
            flat = list(args)
            args.clear()
            return module(*flat)

        eager._boxed_call = True  # type: ignore[attr-defined]
        bc._gw_eager = eager
    return eager


# ---------------------------------------------------------------------------------------------------------
# One backward under strong zeros
# ---------------------------------------------------------------------------------------------------------


# How often a backward under strong zeros ran its compiled nodes as the pass's variant ("compiled"), as their
# FX graphs op by op under the eager mode ("eager"), and with a node gradwise could not see into ("opaque").
STATS = {"compiled": 0, "eager": 0, "opaque": 0}


def compile_stats() -> dict[str, int]:
    """How backwards with torch.compile'd parts ran under strong zeros since the process started.

    ``compiled``: backwards whose compiled nodes ran the versions built with gradwise's strong-zero pass (the
    fast path); ``eager``: backwards in which a compiled node ran its graph op by op under the eager strong-zero
    rules (after its compiled version returned NaN/Inf the pass could not annihilate: a structural zero from
    outside the compiled graph, an op the pass has no rule for; or directly, for a backward that reuses saved
    buffers); ``opaque``: backwards with a compiled node gradwise could not see into (a CompiledBackwardWarning
    is raised when one of them yields NaN/Inf).

    >>> import gradwise as gw
    >>> sorted(gw.compile_stats())
    ['compiled', 'eager', 'opaque']
    """
    return dict(STATS)


class _Hybrid:
    """One backward's record of its compiled nodes run as ``_hybrid``: the results of compiled variants taken
    (with the arguments that made them, where the graph has more than one compiled node), whether a node fell
    back to op by op, and whether NaN/Inf may have been kept at a graph boundary."""

    def __init__(self, keep: bool) -> None:
        self.keep = keep  # whether a later node may need the supports of a taken result (graph breaks)
        # per compiled result taken: its graph op by op, its arguments, weak references to what it returned
        self.taken: list[tuple[Callable[..., Any], list, list]] = []
        self.took = False  # whether some compiled variant's result was taken
        self.fell_back = False
        self.suspect = False
        # where the backward runs outside the mode (a graph of compiled nodes and leaves only: nothing outside the
        # compiled graphs can make a zero), how a falling-back node enters it: a thunk runner from the engine
        self.local: Callable[[Callable[[], Any]], Any] | None = None

    def recover(self) -> None:
        """Give the results of the compiled variants taken so far the supports that running their graphs op by
        op finds (the zeros made inside them), so that a node falling back now sees which elements of a
        sensitivity another compiled graph made structurally zero (a graph break between a zero and a NaN).
        Only results passed on as they are (a direct edge between two compiled graphs, as DDP's optimizer splits
        them) carry it; a sum of them with eager terms already ran with full supports."""
        from gradwise._strong_zeros._mode import running_mode

        self.suspect |= self.took  # recovered or not: a NaN that stays may be from across a boundary
        mode = running_mode()
        if mode is None or not self.keep:
            return
        for eager, args, refs in self.taken:
            again = _call(eager, list(args))
            for ref, e in zip(refs, again, strict=False):
                o = ref() if ref is not None else None
                if isinstance(o, torch.Tensor) and isinstance(e, torch.Tensor) and o.shape == e.shape:
                    mode.supports.record(o, mode.supports.of(e))
        self.taken.clear()


def _call(fn: Callable[..., Any], args: list) -> Any:
    return fn(args) if getattr(fn, "_boxed_call", False) else fn(*args)


def _hybrid(strong: _Flagged | None, eager: Callable[..., Any], record: _Hybrid) -> Callable[..., Any]:
    """A compiled node's backward inside the one strong-zero pass (under the mode): its compiled strong variant
    first, outside the mode (compiled speed; the pass annihilates the zeros made inside the graph); where that
    yields NaN/Inf, the node's backward graph op by op under the mode, from the same arguments, so that the
    zeros arriving from outside the graph (whose supports the mode knows) meet its NaN too. Like a fused op run
    as its decomposition (``_mode.DECOMPOSED``), at the granularity of a node: the engine runs once, so hooks,
    DDP's reducer and retained gradients see one backward. Without a strong variant (a backward loaded from
    AOTAutograd's cache): op by op at once, entering the mode where the backward runs outside it."""
    def run(args: list) -> Any:
        flat = list(args)
        args.clear()  # a boxed call: the arguments are ours to free
        finite = False
        if strong is not None:
            if torch._C._len_torch_dispatch_stack():  # (a compiled-only backward runs with no mode to leave)
                with _without_strong_mode():
                    out, finite = strong.run(list(flat))
            else:
                out, finite = strong.run(list(flat))
        if finite:
            record.took = True
            if record.keep:  # weakly: a gradient held here would make AccumulateGrad copy it instead of taking it
                record.taken.append((eager, flat, [weakref.ref(t) if isinstance(t, torch.Tensor) else None
                                                   for t in out]))
            return out
        record.fell_back = True

        def again() -> Any:
            record.recover()
            return _call(eager, flat)

        return record.local(again) if record.local is not None else again()

    run._boxed_call = True  # type: ignore[attr-defined]
    return run


@contextlib.contextmanager
def _without_strong_mode() -> Iterator[None]:
    """Leave the strong-zero mode for the length of the block, keeping every other mode (a trace, a FLOP
    counter) where it was."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode, _pop_mode, _push_mode

    from gradwise._strong_zeros._mode import _StrongZeroMode

    above = []
    while (mode := _get_current_dispatch_mode()) is not None and not isinstance(mode, _StrongZeroMode):
        above.append(_pop_mode())
    ours = _pop_mode() if mode is not None else None
    for m in reversed(above):
        _push_mode(m)
    try:
        yield
    finally:
        if ours is not None:
            for _ in above:
                _pop_mode()
            _push_mode(ours)
            for m in reversed(above):
                _push_mode(m)


def _variants(nodes: Sequence[Any], how: str, record: _Hybrid | None = None) -> tuple[list, list]:
    """Each compiled node's strong-zero variant, to run as its backward (``_run_swapped``): its FX graph op
    by op (``how="eager"``), or compiled with the pass and op by op where that made NaN (``"hybrid"``); both
    under the mode. Returns (backward compiler, variant) pairs, one per compiled function, and the nodes that
    have no variant (opaque)."""
    swaps, opaque, seen = [], [], set()
    for node in nodes:
        bc = _backward_compiler(node)
        if bc is None:
            opaque.append(node)
            continue
        if id(bc) in seen:
            continue
        seen.add(id(bc))
        if how == "eager":
            variant = _eager_variant(bc)
        else:
            # compiled with the pass; where it cannot be (a backward loaded from AOTAutograd's cache keeps only
            # its FX graph, without the metadata to compile it again) op by op: PyTorch's compiled backward
            # without the pass can turn a NaN made inside it into a wrong finite number (inductor's rewrites),
            # so its finite results are not taken
            eager = _eager_variant(bc)
            variant = _hybrid(_strong_variant(bc), eager, record or _Hybrid(False)) if eager is not None else None
        if variant is None:
            opaque.append(node)
            continue
        swaps.append((bc, variant))
    return swaps, opaque


def _run_swapped(swaps: list, run: Callable[[bool | None], Any], retain: bool | None) -> Any:
    """``run(retain)`` with each variant of ``swaps`` (``_variants``) installed as its backward on this thread
    (``_PerThread``) for the call (a plain try/finally: it runs around every backward of a compiled step)."""
    entered = []
    try:
        for bc, variant in swaps:
            entered.append((bc, _PerThread.enter(bc, variant)))
        return run(retain)
    finally:
        for bc, prior in entered:
            _PerThread.leave(bc, prior)


_SWAP_LOCK = threading.RLock()


class _PerThread:
    """A compiled node's backward (``bc.compiled_bw``) while strong-zero backwards that use it run: on each such
    thread its own variant, on every other thread PyTorch's compiled backward, so a plain backward running beside
    a strong one stays plain (swapping the shared attribute gave it the strong variant's results, and two strong
    threads' swaps could leave a variant installed for good). Installed by the first thread that enters and
    removed by the last that leaves; while installed no saved buffer is donated (both variants may run with the
    graph retained; for PyTorch's own, not donating only costs memory)."""

    _boxed_call = True

    def __init__(self, bc: Any) -> None:
        self.bc, self.original, self.donated = bc, bc.compiled_bw, _donated(bc)
        self.local = threading.local()
        self.users = 0

    @staticmethod
    def enter(bc: Any, variant: Callable[..., Any]) -> Any:
        """Run ``variant`` as ``bc``'s backward on this thread; returns what ``leave`` restores."""
        with _SWAP_LOCK:
            switch = bc.compiled_bw
            if switch.__class__ is not _PerThread:
                # one switch per compiled function, made once (its thread-local is costly to make per backward);
                # what it stands in for is read again at each install (PyTorch may have compiled its own since)
                switch = getattr(bc, "_gw_switch", None)
                if switch is None:
                    switch = bc._gw_switch = _PerThread(bc)
                else:
                    switch.original, switch.donated = bc.compiled_bw, _donated(bc)
                for meta, _ in switch.donated:
                    meta.bw_donated_idxs = []
                bc.compiled_bw = switch
            switch.users += 1
        prior = getattr(switch.local, "variant", None)  # a strong backward nested in one on this thread
        switch.local.variant = variant
        return prior

    @staticmethod
    def leave(bc: Any, prior: Any) -> None:
        with _SWAP_LOCK:
            switch = bc.compiled_bw
            switch.local.variant = prior
            switch.users -= 1
            if switch.users == 0:
                bc.compiled_bw = switch.original
                for meta, idxs in switch.donated:
                    meta.bw_donated_idxs = idxs

    def __call__(self, args: list) -> Any:
        variant = getattr(self.local, "variant", None)
        if variant is not None:
            return _call(variant, args)
        if any(idxs for _, idxs in self.donated) and _keeps_graph():  # PyTorch's check, on indices cleared here
            raise RuntimeError("This backward function was compiled with non-empty donated buffers which requires "
                               "create_graph=False and retain_graph=False (or torch._functorch.config.donated_buffer"
                               "=False); a strong-zero backward of it on another thread does not lift that")
        if self.original is None:  # PyTorch's backward was not compiled yet: as AOTAutograd's lazy compile would
            with _SWAP_LOCK:
                if self.original is None:
                    self.bc.compiled_bw = None
                    try:
                        self.original = self.bc.get_or_compile(saved_tensors_use_once=False)
                    finally:
                        self.bc.compiled_bw = self
        return _call(self.original, args)


def _keeps_graph() -> bool:
    return torch._functorch.config.donated_buffer and torch._C._autograd._get_current_graph_task_keep_graph()


def _holds_nonfinite(result: Any, leaves: Sequence[torch.Tensor]) -> bool:
    from gradwise._strong_zeros._planning import _all_finite

    if result is not None:
        tensors = [r for r in result if isinstance(r, torch.Tensor) and inexact(r)]
    else:
        tensors = [leaf.grad for leaf in leaves if leaf.grad is not None and inexact(leaf.grad)]
    return not _all_finite(tensors)


def _warn_opaque(nodes: Sequence[Any]) -> None:
    names = ", ".join(sorted({f"{type(n).__name__} (aot id {getattr(n._forward_cls, '_aot_id', '?')})"
                              if hasattr(n, "_forward_cls") else type(n).__name__ for n in nodes}))
    warnings.warn(
        f"gw.strong_zeros: the gradients hold NaN/Inf and gradwise could not see inside the compiled backward "
        f"{names}: its FX graph is not available (compiled ahead of the first backward, or loaded from "
        f"AOTAutograd's cache), so structural zeros inside it were not applied and the NaN/Inf may come from "
        f"values the output never uses. Fix: run the compiled function's first backward inside "
        f"gw.strong_zeros() in a fresh process, or set torch._functorch.config.enable_autograd_cache = False, "
        f"or compile with backend='aot_eager'.",
        CompiledBackwardWarning,
        stacklevel=4,
    )


def _runs_once(bc: Any) -> bool:
    """Whether a compiled node can only run as PyTorch compiled it (no graph to run or to compile again)."""
    if bc is None:
        return True
    once = getattr(bc, "_gw_runs_once", None)
    if once is None:
        once = bc._gw_runs_once = _strong_variant(bc) is None and (
            _graph_module(bc) is None or bool(getattr(bc.fw_metadata, "bw_donated_idxs", None)))
    return once


def compiled_run(run: Callable[[bool | None], Any], t_outputs: Sequence[Any], inputs: Sequence[Any],
                 accumulate_grad: bool, watched: list | None = None) -> Callable[[bool | None], Any]:
    """Wrap the engine call of one backward under strong zeros (not the plain path) so that compiled nodes in
    its graph run their strong-zero variants: op by op under the mode, or (``wrapped.hybrid``, for a backward
    whose other nodes hold no NaN a zero can reach: the plan's 'check') compiled first and op by op only where
    that made NaN. ``run`` itself when the graph has no compiled node (``watched``: the graph's custom Function and
    compiled nodes, where the plan listed them, tell without a walk)."""
    if watched is not None and not any(map(_is_compiled, watched)):
        return run
    graph = list(_walk(_root_nodes(t_outputs)))
    nodes = [n for n in graph if _is_compiled(n)]
    if not nodes:
        return run

    def leaves() -> Sequence[torch.Tensor]:
        return _leaves(t_outputs, inputs) if accumulate_grad else ()

    def wrapped(retain: bool | None) -> Any:  # under the mode: every compiled node op by op
        swaps, opaque = _variants(nodes, "eager")
        STATS["eager"] += 1
        STATS["opaque"] += bool(opaque)
        result = _run_swapped(swaps, run, retain)
        if _holds_nonfinite(result, leaves()):
            if opaque:
                _warn_opaque(opaque)
            else:
                _warn_kept()
        return result

    # a node gradwise cannot swap runs as PyTorch compiled it, possibly reusing its saved buffers: it must run
    # exactly once, op by op being the only variant (the engine then takes the plain one-pass path)
    if not any(_runs_once(_backward_compiler(n)) for n in nodes):
        wrapped.hybrid = lambda retain, local=None: hybrid_run(  # type: ignore[attr-defined]
            nodes, run, t_outputs, inputs, accumulate_grad, retain, local)
        # nothing but compiled graphs and leaves, each compiled graph's sensitivities coming from one edge: no
        # zero can arrive from outside a compiled graph, so the engine runs outside the mode (AccumulateGrad's
        # ops not dispatched through it) and only a node that falls back enters it. Where the engine sums two
        # graphs' results for a third (an output two later graphs read), that sum runs under the mode, which
        # gives it the union of their supports
        wrapped.compiled_only = all(_is_compiled(n) or type(n).__name__ == "AccumulateGrad"  # type: ignore
                                    for n in graph) and not _sums_for_a_graph(graph)
    return wrapped


def hybrid_run(nodes: Sequence[Any], run: Callable[[bool | None], Any], t_outputs: Sequence[Any],
               inputs: Sequence[Any], accumulate_grad: bool, retain: bool | None,
               local: Callable[[Callable[[], Any]], Any] | None = None) -> Any:
    """``run(retain)``, the engine call of one backward, with each compiled node of ``nodes`` (none ``_runs_once``)
    as ``_hybrid``: under the mode, or (``local``: compiled nodes and leaves only) outside it, a node that falls
    back entering it through ``local``."""
    record = _Hybrid(keep=len(nodes) > 1)
    record.local = local
    swaps, opaque = _variants(nodes, "hybrid", record)
    result = _run_swapped(swaps, run, retain)
    record.taken.clear()
    STATS["compiled"] += 1
    STATS["eager"] += record.fell_back
    STATS["opaque"] += bool(opaque)
    if opaque or record.suspect or record.fell_back:
        if _holds_nonfinite(result, _leaves(t_outputs, inputs) if accumulate_grad else ()):
            if opaque:
                _warn_opaque(opaque)
            elif record.suspect:
                _warn_boundary()
            else:
                _warn_kept()
    return result


def compiled_step(roots: Sequence[Any]) -> list[Any] | None:
    """The compiled nodes of a graph (``roots``: its root nodes) of torch.compile'd backwards and leaves only, none
    fed by two edges, each with its variants (a whole training step compiled): what ``_plan`` ('compiled') and
    ``compiled_run`` (``hybrid``, ``compiled_only``) find, in one walk that stops at the first other node. None
    for every other graph (the general path). It runs before every backward of such a step under strong zeros."""
    stack = [r for r in roots if r is not None and type(r) is not _ACCUMULATE_GRAD]
    if not all(map(_is_compiled, stack)):  # an eager node on top (the everyday graph): before anything is built
        return None
    seen: set[Any] = set()
    fed: set[tuple[Any, int]] = set()  # (compiled node, slot) that an edge leads to
    nodes: list[Any] = []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if not _is_compiled(node):
            return None
        bc = _backward_compiler(node)
        # only those met before: the general path compiles their variants and decides _runs_once
        if bc is None or getattr(bc, "_gw_runs_once", True) or getattr(bc, "_gw_eager", None) is None:
            return None
        nodes.append(node)
        for edge in node.next_functions:
            n = edge[0]
            if n is not None and type(n) is not _ACCUMULATE_GRAD:  # (a leaf: nothing below it)
                if edge in fed:  # the engine sums two results for it: the general path (_sums_for_a_graph)
                    return None
                fed.add(edge)
                stack.append(n)
    return nodes or None


def _sums_for_a_graph(graph: Sequence[Any]) -> bool:
    """Whether some compiled node's sensitivity input is fed by more than one edge (the engine adds them)."""
    fed: set[tuple[Any, int]] = set()
    for node in graph:
        for n, slot in node.next_functions:
            if n is not None and _is_compiled(n):
                if (n, slot) in fed:
                    return True
                fed.add((n, slot))
    return False


def _warn_boundary() -> None:
    warnings.warn(
        "gw.strong_zeros: the gradients hold NaN/Inf after a compiled backward met a sensitivity that another "
        "compiled graph computed (a graph break between a zero and a NaN): the zeros made there are values to "
        "the rules on this side, so the NaN/Inf may be contamination, or genuine. Fix: compile without the graph "
        "break, or run the model without torch.compile to decide.",
        CompiledBackwardWarning, stacklevel=5)


def _warn_kept() -> None:
    from gradwise._strong_zeros._rules import _UNRULED

    # ops without a rule are named in full once (an OpaqueBackwardWarning); later backwards that keep a NaN/Inf
    # name them here too, since one of them may be why
    unruled = f" Ops met so far without a strong-zero rule (gw.unruled_ops()): {', '.join(sorted(_UNRULED))}." \
        if _UNRULED else ""
    warnings.warn(
        "gw.strong_zeros: the gradients hold NaN/Inf after a compiled backward ran op by op. Inside a compiled "
        "graph some structural zeros arrive as saved forward values (an exp output of 0 at a -inf entry, read by "
        "exp's own backward), which the rules cannot tell from computed zeros, so the NaN/Inf may be "
        f"contamination, or genuine.{unruled} To decide, run the step without torch.compile under "
        "gw.strong_zeros() (or gw.trace(), which explains it).",
        CompiledBackwardWarning, stacklevel=5)


_CA_WARNED = False  # the bypass of compiled autograd is said once per process


def without_compiled_autograd() -> contextlib.AbstractContextManager[None]:
    """Compiled autograd (``torch._dynamo.compiled_autograd._enable``, ``torch._dynamo.config.compiled_autograd``)
    off for one backward under strong zeros that is not plain, with a CompiledBackwardWarning once per process.
    Compiled autograd traces the whole backward into one graph of its own: neither the strong-zero mode nor the
    compiled nodes' strong variants (``compiled_run``) reach it, so a NaN the output never uses stayed in the
    gradients, silently. Without it the eager engine runs the graph node by node, each compiled forward's node
    with its strong variant. Backwards outside strong zeros, and plain ones inside, keep compiled autograd."""
    ca = sys.modules.get("torch._dynamo.compiled_autograd")  # not imported: compiled autograd cannot be on
    if ca is None or not ca.compiled_autograd_enabled:
        return contextlib.nullcontext()
    _warn_compiled_autograd()  # here, not inside the context manager: the stack ends at the user's backward call
    return _ca_disabled(ca)


@contextlib.contextmanager
def _ca_disabled(ca: Any) -> Iterator[None]:
    outer = ca.active_disable_ctx  # _disable() resets it to False on exit, even inside another _disable()
    try:
        with ca._disable():
            yield
    finally:
        ca.active_disable_ctx = outer


def _warn_compiled_autograd() -> None:
    global _CA_WARNED
    if _CA_WARNED:
        return
    _CA_WARNED = True
    from gradwise._strong_zeros._contract import _user_stacklevel

    warnings.warn(
        "gw.strong_zeros: compiled autograd is bypassed for backwards under strong zeros: it traces the whole "
        "backward into one graph that gradwise cannot see into, so structural zeros would be lost and a NaN/Inf "
        "the output never uses would reach the gradients. Such a backward runs on the eager autograd engine "
        "(torch.compile'd forwards keep their compiled strong backwards); backwards outside gw.strong_zeros() "
        "still use compiled autograd. Given once per process.",
        CompiledBackwardWarning, stacklevel=_user_stacklevel())
