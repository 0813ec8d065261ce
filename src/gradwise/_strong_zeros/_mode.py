"""The TorchDispatchMode that applies the rule table during a backward (``_StrongZeroMode``), and the fused
backwards that run as their decomposition when a structural zero reaches them (``DECOMPOSED``).

May import: torch, gradwise._modes, gradwise._ops, _contract, _supports, _rules, _hooks, _triangles, _autograd_graph.
"""

from __future__ import annotations

import types
import warnings
import weakref
from collections.abc import Callable
from threading import get_ident
from typing import Any

import torch
from torch._prims_common import is_non_overlapping_and_dense_or_false
from torch.utils._pytree import tree_flatten

from gradwise._modes import LeanDispatchMode, kernels
from gradwise._ops._overloads import functional_of, out_names
from gradwise._strong_zeros import _contract
from gradwise._strong_zeros._hooks import hook_result
from gradwise._strong_zeros._rules import _UNRULED, _is_float, lookup
from gradwise._strong_zeros._supports import _STATE, Carried, _Supports
from gradwise._strong_zeros._triangles import TRIANGLE_READERS, triangle_hooks

aten = torch.ops.aten


# Fused backwards without a rule of their own that, when a structural zero reaches them, run as PyTorch's own
# decomposition (torch._decomp) under the mode, so that each primitive op of it goes through its rule: a
# normalisation's rows (or channels) that only structural zeros read no longer turn its weight gradient into
# NaN. Only then: with no structural zero in their inputs they run fused, as in plain PyTorch, and with one the
# fused result is kept wherever it is finite (see _StrongZeroMode._decomposed).
DECOMPOSED = frozenset((aten.native_layer_norm_backward, aten.native_group_norm_backward,
                        aten.native_batch_norm_backward, aten._fused_rms_norm_backward, aten.linalg_cross,
                        aten._prelu_kernel_backward))


def _decomposition(func: Any) -> Callable[..., Any] | None:
    if func.overloadpacket not in DECOMPOSED:
        return None
    from torch._decomp import decomposition_table  # imported on first use: torch._decomp loads slowly

    return decomposition_table.get(func)


_IMPLICIT = torch._C.DispatchKey.CompositeImplicitAutograd


def _composite(func: Any) -> bool:
    """Whether ``func`` is CompositeImplicitAutograd: autograd's keys decompose such an op before it reaches a
    dispatch mode, except where they are skipped (a backward run under ``torch.inference_mode()``). Undecomposed
    and without a rule of its own, its structural zeros were lost (``where.ScalarOther``: the NaN stayed). Not an
    op with a kernel of its own for a backend (silu_backward): a plain call runs that one."""
    keys = kernels(func.name())
    return "CompositeImplicitAutograd" in keys and not keys & {"ADInplaceOrView", "CPU", "CUDA"}


# ops that wrap data made outside torch ops (torch.from_numpy, torch.tensor) as a tensor
_LIFTS = frozenset((aten.lift_fresh, aten.lift_fresh_copy, aten.lift))


class _StrongZeroMode(LeanDispatchMode):
    supports_higher_order_operators = True  # (_higher_order)

    def __init__(self, carry: bool = False, of_pass: bool = True) -> None:
        super().__init__()
        self.supports = _Supports()
        # create_graph: the outputs of ruled ops, for _carry at the end of the pass: held where they have structural
        # zeros (the new graph may not keep them: mm saves only the operand its other gradient needs), weakly else
        self.made: list[Any] | None = [] if carry else None
        # while a custom Function's backward that structural zeros reached runs: what ops under this mode made
        # (id -> tensor), to tell its results from ones made outside torch ops (NumPy: `watch_functions`)
        self.produced: dict[int, torch.Tensor] | None = None
        # (what, fix) of the backwards structural zeros reached and could not be followed through: named by an
        # OpaqueBackwardWarning if the gradients hold NaN/Inf at the end of the pass
        self.lost: dict[str, str] = {}
        # whether a backward nested in this pass (a reentrant checkpoint's) runs strong and hands its results'
        # structural zeros to it: where the pass's plan met NaN/Inf (_engine._nested)
        self.hands_down = True
        # whether the pass's graph holds a node that can make NaN/Inf from finite values where a 'check' plan cannot
        # see (a custom backward other than a reentrant checkpoint's, a compiled one): only then do relu's whole
        # structural rows in a nested backward's results matter to it (_engine._handing, _flat_rows)
        self.makes_nonfinite = True
        # while a watched custom Function's backward runs: the sensitivities it was given, which a backward nested in
        # it must be seeded with to hand its zeros to a 'check' pass (_engine._nested: else it may differentiate a
        # function unrelated to the pass, whose zeros are values there)
        self.sensitivity: tuple | None = None
        # the pass's state as its thread set it before making the mode, for the engine threads that run its nodes
        # (_supports.Carried). Not at __enter__: PyTorch enters a mode again on whichever thread runs an op under it.
        # None for a mode that runs beside a backward (a trace's shadow, ``of_pass=False``): entered on the thread
        # that runs each op, with the state that thread set for it (outputs_finite), which a snapshot of the
        # thread that made it would overwrite
        self.thread, self.state = get_ident(), _STATE.carried() if of_pass else None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # on an engine thread other than the pass's (CUDA's device threads): the pass's state around the op
        mine = _STATE.adopt(self.state) if self.thread != get_ident() and self.state is not None else None
        stale = _overwritten(func, args, kwargs or {}, self.supports.selections)
        try:
            out = self._dispatch(func, args, kwargs or {})
        finally:
            if mine is not None:
                _STATE.adopt(mine)
        if stale:
            _forget(func, stale, self.supports.selections)
        # (a lift brings data from outside; a higher-order op has no overloadpacket)
        if self.produced is not None and getattr(func, "overloadpacket", None) not in _LIFTS:
            for o in tree_flatten(out)[0]:
                if isinstance(o, torch.Tensor):
                    self.produced[id(o)] = o
        return out

    def _dispatch(self, func, args, kwargs):
        if isinstance(func, torch._ops.HigherOrderOperator):
            return self._higher_order(func, args, kwargs)
        if _contract.unfollowed(args):  # sparse/nested/mkldnn sensitivities: PyTorch's op, nothing recorded
            return func(*args, **kwargs)
        if func.is_view:
            out = func(*args, **kwargs)  # a view reads its storage's mask: nothing to record...
            src = args[0] if args else None
            if isinstance(out, torch.Tensor) and isinstance(src, torch.Tensor) \
                    and out.untyped_storage()._cdata != src.untyped_storage()._cdata and self.supports.tracked(src):
                # ...unless it copied (to(dtype), reshape, contiguous met inside a decomposition)
                s = self.supports.of(src)
                self.supports.record(out, s.reshape(out.shape) if s.numel() == out.numel() else None)
            if isinstance(out, torch.Tensor) and out.dtype == torch.bool and isinstance(src, torch.Tensor) \
                    and src in self.supports.selections:
                _select_view(self.supports.selections, src, out)
            return out
        rule = lookup(func)
        functional = functional_of(func)  # (cached per overload: None for all but out= overloads)
        out = _NO_RULE
        if functional is not None and all(n in kwargs for n in out_names(func)):
            # the functional overload's rule (abs.out, where.self_out, linalg_solve_triangular.out have none of
            # their own: their rules are registered for one overload), else the packet's
            out = _into_out(lookup(functional) or rule, rule, func, functional, args, kwargs, self.supports)
        elif rule is not None:
            out = rule(func, args, kwargs, self.supports)
        if out is not _NO_RULE:
            if self.supports.unfollowed:
                for what in self.supports.unfollowed:  # a rule function's undeclared output, or (what, fix)
                    what, fix = what if isinstance(what, tuple) else \
                        (what, "declare each output's support in the rule (supports.set(out, support))")
                    self.lost[what] = fix
                self.supports.unfollowed.clear()
            if self.made is not None:
                self.made.extend(self._held(o) for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor))
            return out
        flat, _ = tree_flatten((args, kwargs))
        tracked = any(self.supports.tracked(a) for a in flat)
        if tracked and (decomposed := _decomposition(func)) is not None:
            return self._decomposed(func, decomposed, args, kwargs)
        if _composite(func):  # where.ScalarOther in a backward under torch.inference_mode(): a zero's source too
            # its C++ decomposition, the one autograd's keys run (not func.decompose, which prefers a Python
            # one where torch._decomp has it: matmul's folds a 1-D @ 3-D product differently, changing the last
            # bit of a finite gradient); its ops come back through this mode, each through its rule
            with self:
                return func._op_dk(_IMPLICIT, *args, **kwargs)
        out = func(*args, **kwargs)
        if tracked:
            kept = _zero_preserved(func, args, kwargs, out, self.supports)
            if kept is not None:
                self.supports.record(out, kept)
                return out
            _UNRULED.add(str(func))
            if any(map(self.supports.zeroed, flat)):
                self.lost[f"{func}, which has no strong-zero rule"] = "register one (gw.register_rule)"
            for o in tree_flatten(out)[0]:
                if isinstance(o, torch.Tensor):
                    self.supports.record(o, None)
        return out


    def _higher_order(self, func, args, kwargs):
        """A higher-order op (``torch.cond``, ``map``, ``while_loop``: their backwards are higher-order ops too)
        has no aten kernel and no rule; it ran into PyTorch's NotImplementedError for modes without HOP support.
        It runs as PyTorch's own kernel, outside this mode (its dense kernel requires none), with each subgraph
        it calls (a branch, a body) run under this mode: the subgraph's ops meet their rules, as in eager code.
        ``cond`` hands its operands to the branch as they are, so their supports follow. Where structural zeros
        went in and an output comes back that no op under the mode made (``map`` slices and stacks outside it),
        they were lost there: named if the gradients hold NaN/Inf (silent NaN weight gradients otherwise)."""
        def under_mode(fn: Callable[..., Any]) -> Callable[..., Any]:
            def run(*a: Any, **k: Any) -> Any:
                with self:
                    return fn(*a, **k)
            return run

        zeros_in = any(map(self.supports.zeroed, tree_flatten((args, kwargs))[0]))
        # subgraphs (GraphModules, Python functions), not ops passed as arguments (with_effects' OpOverload)
        args = tuple(under_mode(a) if isinstance(a, (torch.nn.Module, types.FunctionType)) else a for a in args)
        out = func(*args, **kwargs)
        if zeros_in and not all(self.supports.tracked(o) for o in tree_flatten(out)[0]
                                if isinstance(o, torch.Tensor) and _is_float(o)):
            self.lost[f"the higher-order op {func.name()}"] = "run its body without the higher-order op (eager code)"
        return out

    def _held(self, t: torch.Tensor) -> Callable[[], torch.Tensor | None]:
        """A reference to a ruled op's output for _carry: strong where it holds a structural zero now."""
        return (lambda: t) if self.supports.zeroed(t) else weakref.ref(t)

    def _decomposed(self, func, decomposed, args, kwargs):
        """Run ``func`` as its decomposition under this mode (each primitive op through its rule), and also
        fused: where the fused result is finite no structural zero met a NaN/Inf there, and it is taken as it
        is (PyTorch's bits); elsewhere the decomposition's."""
        with self:  # the decomposition's ops come back through this mode
            strong = decomposed(*args, **kwargs)
        fused = func(*args, **kwargs)
        single = isinstance(fused, torch.Tensor)
        out = []
        for f, d in zip((fused,) if single else fused, (strong,) if single else strong, strict=True):
            if isinstance(f, torch.Tensor) and isinstance(d, torch.Tensor) and _is_float(f):
                merged = torch.where(torch.isfinite(f), f, d)
                self.supports.record(merged, self.supports.of(d))
                out.append(merged)
            else:
                out.append(f)
        if single:
            return out[0]
        return tuple(out) if isinstance(fused, tuple) else out


_NO_RULE = object()  # (_into_out: neither overload has a rule, or only the functional one and the dtype differs)


def _written(func: Any) -> tuple:
    """The positions (index or name) of the arguments an in-place or out= overload writes."""
    got = _WRITTEN.get(func)
    if got is None:
        schema = getattr(func, "_schema", None)
        got = () if schema is None else tuple(
            i if not a.kwarg_only else a.name for i, a in enumerate(schema.arguments)
            if a.alias_info is not None and a.alias_info.is_write)
        _WRITTEN[func] = got
    return got


_WRITTEN: dict[Any, tuple] = {}


def _overwritten(func: Any, args: tuple, kwargs: dict, selections: Any) -> tuple:
    """(the tensors ``func`` writes in place, the selections sharing their storage): an op writing into a
    selection mask's storage changes the values its views read, so they are selections no more after it, the
    written mask itself only where the op's rule records it again (``m &= n``: ``_select``). Of any dtype: a
    write through a view of another dtype (``m.view(torch.uint8).copy_(user)``, ``m.untyped_storage().copy_``)
    changes the mask as much, and kept its entry (the user's False then hid a NaN the gradient has). Decided by
    storage alone, never by the values written: the same storage, or another over the same memory (a tensor of
    ``torch.from_numpy(m.numpy())``, DLPack, ``torch.frombuffer``: a storage object of its own, which kept the
    entry). A ``Tensor[]`` argument (``torch._foreach_copy_([m], [u])``) writes each of its tensors."""
    if not len(selections) or not (where := _written(func)):
        return ()
    written = []
    for w in (args[p] if isinstance(p, int) and p < len(args) else kwargs.get(p) for p in where):
        if isinstance(w, torch.Tensor):
            written.append(w)
        elif isinstance(w, (list, tuple)):
            written.extend(t for t in w if isinstance(t, torch.Tensor))
    if not written:
        return ()
    storages = {w.untyped_storage()._cdata for w in written}
    spans = [span for w in written if (span := _memory(w)) is not None]
    sharing = [k for k in list(selections.keys()) if k.untyped_storage()._cdata in storages or
               (spans and _overlaps(_memory(k), spans))]
    return (written, sharing) if sharing else ()


def _memory(t: torch.Tensor) -> tuple | None:
    """(device, first byte, end) of the memory under ``t``'s storage, or None where it has none to read (meta, an
    empty storage, a tensor subclass such as a fake tensor, whose data pointer must not be asked for)."""
    if (t.__class__ is not torch.Tensor and t.__class__ is not torch.nn.Parameter) or t.is_meta:
        return None
    storage = t.untyped_storage()
    start = storage.data_ptr()
    return (t.device, start, start + storage.nbytes()) if start else None


def _overlaps(span: tuple | None, spans: list) -> bool:
    return span is not None and any(s[0] == span[0] and s[1] < span[2] and span[1] < s[2] for s in spans)


def _forget(func: Any, stale: tuple, selections: Any) -> None:
    written, sharing = stale
    remade = getattr(lookup(func), "makes_selections", False)  # (its rule decided the written mask itself)
    for k in sharing:
        if not (remade and any(k is w for w in written)):
            selections.pop(k, None)


def _select_view(selections: Any, src: torch.Tensor, out: torch.Tensor) -> None:
    """A view of a backward formula's selection mask (``_rules_pointwise._comparison``) is that selection too, where
    the mask's is meaningful: is_grads_batched's legacy vmap hands ``mul`` amax's ``self == result`` as a view with a
    batch dim of 1 (its key the mask tensor itself, the view was no selection: a NaN sensitivity at an unselected
    position stayed). The meaningful places are mapped through the storage (any view)."""
    valid = selections[src]
    storage = src.untyped_storage()
    if out.untyped_storage()._cdata != storage._cdata or out.element_size() != src.element_size():
        return
    n = storage.nbytes() // src.element_size()
    if valid is None and src.numel() == n and src.is_contiguous() and not src.storage_offset():
        selections[out] = None  # (the mask fills its storage: every view reads places of it)
        return
    # (a place of the storage outside ``src`` is not meaningful: no selection there). Counted, not written through
    # src's strides: an expanded mask reads one place at several positions (copy_ refuses such a destination), and
    # the place is meaningful only where every one of them is
    places = torch.arange(n, device=src.device).as_strided(src.shape, src.stride(), src.storage_offset()).reshape(-1)
    counts = torch.zeros(n, dtype=torch.int64, device=src.device)
    whole = counts.index_add(0, places, torch.ones_like(places)) > 0
    if valid is not None:
        unmeant = (~valid).expand(src.shape).reshape(-1).to(torch.int64)
        whole &= counts.index_add(0, places, unmeant) == 0
    selections[out] = whole.as_strided(out.shape, out.stride(), out.storage_offset())


def _into_out(rule, own, func, functional, args: tuple, kwargs: dict, sup: _Supports) -> Any:
    """An ``out=`` overload of an op with a rule (``mm.out`` in nn.LinearCrossEntropyLoss's chunked backward,
    ``torch.mul(g, v, out=buf)`` in a custom Function's backward): the rule runs on the functional overload
    and each result is copied into its buffer, which takes the result's support. Rules are written for the
    functional form: on the ``out=`` form, one that runs the op again for its pieces or counts wrote those into
    the caller's buffer (``_trilinear``'s count of met NaN/Inf replaced its result: a zero gradient) or called
    an overload that needs ``out``. The buffer is resized as PyTorch resizes it (``resize_output``: silently when
    empty, with PyTorch's warning when it held elements of another shape), and a resized buffer takes the
    result's strides, as a structured kernel's output does. A buffer of another dtype than the result runs the
    ``out=`` overload's own rule (``own``) on the ``out=`` form as it is, where PyTorch's kernel decides (cast or
    refuse); without one of its own, ``_NO_RULE``: the op runs unruled. ``rule``: the functional overload's."""
    if rule is None:
        return _NO_RULE
    names = out_names(func)
    dests = [kwargs[n] for n in names]
    listed = len(dests) == 1 and isinstance(dests[0], (list, tuple))  # one Tensor[] out (_foreach_mul.List_out)
    if listed:
        dests = list(dests[0])
    rest = {k: v for k, v in kwargs.items() if k not in names}
    # a result's dtype is the inputs' (type promotion) or a dtype argument's: known before the rule runs only by
    # running it, so the functional form runs first and a mismatch then reruns the out= form (PyTorch's errors)
    # (the functional overload's own rule where one overload is refined: exp.default's, sub.Tensor's)
    res = rule(functional, args, rest, sup)
    results = list(res) if isinstance(res, (tuple, list)) else [res]
    if len(results) != len(dests):  # a list of buffers of another length: PyTorch's error, as the op raises it
        return _NO_RULE
    if any(isinstance(r, torch.Tensor) and r.dtype != d.dtype for r, d in zip(results, dests, strict=True)):
        return _NO_RULE if own is None else own(func, args, kwargs, sup)
    aliased = _aliased(dests, (args, rest))
    if aliased:  # PyTorch's kernel on the caller's buffers: its overlap errors, its values where they alias
        func(*args, **kwargs)
    for r, d in zip(results, dests, strict=True):
        if not isinstance(r, torch.Tensor):  # an output the op did not compute (convolution_backward's mask)
            continue
        s = sup.of(r)
        if aliased:  # the rule's zeros where its support says structural (a 0 x NaN of the kernel's there)
            if s is not None:
                d.copy_(torch.where(s, d, r))
        else:
            if d.shape != r.shape:
                _resize_output(d, r)
            d.copy_(r)
        if s is not None or sup.tracked(d):
            sup.record(d, s)
        _selects_as(sup.selections, r, d)
    if listed:  # (such an overload returns nothing)
        return None
    return dests[0] if len(dests) == 1 else tuple(dests)


def _selects_as(selections: Any, result: torch.Tensor, dest: torch.Tensor) -> None:
    """The buffer of an ``out=`` comparison (``torch.gt(x, t, out=m)``) is the selection its functional result is,
    meaningful where that comparison decided, or none (a value: a float buffer's, or a comparison outside a formula).
    An entry it held before (``m = x == x.amax()`` written over) is stale: kept, it called a NaN x's ``gt`` decided and
    hid the NaN a used x's gradient has (``_mode._forget`` keeps the written mask's entry for rules that make
    selections, expecting them to have recorded it again)."""
    if result.dtype != torch.bool or dest.dtype != torch.bool:
        return
    if result in selections:
        valid = selections[result]
        selections[dest] = None if valid is None else valid.expand(dest.shape)
    else:
        selections.pop(dest, None)


def _aliased(dests: list, inputs: object) -> bool:
    """Whether a buffer shares memory with an input or another buffer (``torch.add(b[:-1], 1, out=b[1:])``,
    ``torch.mm(b, w, out=b)``): PyTorch refuses some (partial overlap), computes others as its kernel reads what
    it has written (mm's are all zeros); a copy of the functional result would do neither."""
    tensors = [a for a in tree_flatten(inputs)[0] if isinstance(a, torch.Tensor)]
    return any(torch._C._overlaps(d, a) for i, d in enumerate(dests) if isinstance(d, torch.Tensor)
               for a in (*tensors, *dests[i + 1:]) if isinstance(a, torch.Tensor))


def _resize_output(d: torch.Tensor, r: torch.Tensor) -> None:
    """ATen's ``resize_output`` for buffer ``d`` of result ``r`` (its warning, word for word), then ``r``'s strides
    where ``r`` is dense (a TensorIterator kernel's resized output follows its inputs' layout)."""
    if d.numel():
        warnings.warn(f"An output with one or more elements was resized since it had shape {list(d.shape)}, which "
                      f"does not match the required output shape {list(r.shape)}. This behavior is deprecated, and "
                      "in a future PyTorch release outputs will not be resized unless they have zero elements. You "
                      "can explicitly reuse an out tensor t by resizing it, inplace, to zero elements with "
                      "t.resize_(0).", UserWarning, stacklevel=2)
    d.resize_(r.shape)
    if d.stride() != r.stride() and is_non_overlapping_and_dense_or_false(r):  # a permutation of a contiguous layout
        d.as_strided_(r.shape, r.stride())


def _zero_preserved(func, args: tuple, kwargs: dict, out: object, sup: _Supports) -> torch.Tensor | None:
    """The support of an elementwise op without a rule (``torch.Tag.pointwise``) whose one tensor argument is a
    sensitivity and whose other arguments are numbers: a structural zero x = +-0 stays one where f(+0) and f(-0)
    are both 0 (clamp to bounds around 0, nan_to_num, tanh, sign ... in a gradient hook), and becomes a value
    elsewhere (f(0) != 0, or NaN). None where this does not apply (the op then counts as unruled)."""
    if torch.Tag.pointwise not in func.tags or not isinstance(out, torch.Tensor) or not _is_float(out) \
            or any(isinstance(v, torch.Tensor) for v in kwargs.values()):
        return None
    # the other arguments numbers: a tensor one could add a value (addcmul(g, a, b) is a value where a * b is 0)
    slots = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    if len(slots) != 1 or not _is_float(args[slots[0]]):
        return None
    i = slots[0]
    x = args[i]
    support = sup.of(x)
    if support is None:
        return None
    inplace = func._schema.name.endswith("_")  # an in-place op writes its probe: give it a full-size one
    zero = torch.zeros(x.shape if inplace else (), dtype=x.dtype, device=x.device)
    kept = None
    for z in (zero, zero.neg()):
        probe = func(*args[:i], z, *args[i + 1 :], **kwargs)
        stays = probe == 0  # NaN: False
        kept = stays if kept is None else kept & stays
    return (support | ~kept).expand(out.shape)


def carried_state() -> Carried | None:
    """The state of a pass another thread opened whose mode the engine carried to this thread (CUDA's device
    threads run its nodes with the dispatch mode stack but not ``_STATE``); None elsewhere."""
    if not torch._C._len_torch_dispatch_stack():
        return None
    mode = running_mode()
    return mode.state if mode is not None and mode.thread != get_ident() else None


def in_pass() -> bool:
    """Whether a strong-zero pass is running here: opened on this thread, or carried to this engine thread."""
    return _STATE.in_mode or bool((state := carried_state()) is not None and state.in_mode)


def outputs_finite() -> bool:
    """``_STATE.outputs_finite`` of the running pass, for code that reads it between ops rather than in the mode's
    handler (a compiled graph run op by op calls Python there): the pass's own on any engine thread."""
    state = carried_state()
    return _STATE.outputs_finite if state is None else state.outputs_finite


def running_mode() -> _StrongZeroMode | None:
    """The innermost strong-zero mode on this thread's dispatch stack (a pass is running), or None."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    for m in reversed(_get_current_dispatch_mode_stack()):  # (a loop: a generator left unfinished raises
        if isinstance(m, _StrongZeroMode):  # GeneratorExit when collected, on every checkpoint recomputation)
            return m
    return None


def module_hook_watch(node: Any, mode: _StrongZeroMode) -> list:
    """Hooks on a ``BackwardHookFunctionBackward`` node (an ``nn.Module``'s full backward hooks run in its post
    hook, which returns their ``grad_input``; this one, registered after it, sees what they returned): where one
    computed outside torch ops, ``_hooks.hook_result`` records the support of its result."""
    from torch.utils._python_dispatch import _disable_current_modes

    given: list = []

    def before(grad_outputs):
        with _disable_current_modes():
            reached = any(map(mode.supports.zeroed, grad_outputs))
        if reached:
            given[:] = [grad_outputs, mode.produced]
            mode.produced = {}

    def after(grad_inputs, grad_outputs):
        if not given:
            return
        (sensitivities, prior), given[:] = given, []
        produced, mode.produced = mode.produced, prior
        if prior is not None:
            prior.update(produced)
        with _disable_current_modes():
            results = tuple(r if not isinstance(g, torch.Tensor) else hook_result(
                mode, g, r, produced, "a module's full backward hook that computes outside torch ops and returned "
                "nonzero values where its grad_input held structural zeros")
                for g, r in zip(sensitivities, grad_inputs, strict=True))
        if any(a is not b for a, b in zip(results, grad_inputs, strict=True)):
            return results

    return [node.register_prehook(before), node.register_hook(after)]


def watch_functions(roots: list, mode: _StrongZeroMode, nodes: list | None = None) -> list:
    """Hooks on the custom ``autograd.Function`` nodes of a graph for one strong pass (their handles, to remove):
    where structural zeros reach one and its backward returns a tensor no op under ``mode`` made (NumPy, a C++
    kernel called directly), the zeros are lost there (``mode.lost``: named if the gradients end up holding
    NaN/Inf); a backward written with torch ops is followed by the rules. The nodes of ``TRIANGLE_READERS`` get
    theirs (``_triangles.triangle_hooks``). ``nodes``: those to look at, where the plan listed them
    (_planning._Graph.watched), else every node of the graph."""
    from torch.utils._python_dispatch import _disable_current_modes

    from gradwise._strong_zeros._autograd_graph import _walk

    handles = []
    for node in _walk(roots) if nodes is None else nodes:
        if type(node).__name__ in TRIANGLE_READERS:  # a formula that reads a triangle its forward does not
            handles += triangle_hooks(node)
            continue
        cls = getattr(node, "_forward_cls", None)
        if cls is None:
            continue
        if cls.__name__ == "BackwardHookFunction":  # a module's backward hooks run in its post hook
            handles += module_hook_watch(node, mode)
            continue

        def before(grad_outputs, cls=cls):
            mode.sensitivity = grad_outputs
            with _disable_current_modes():
                reached = any(map(mode.supports.zeroed, grad_outputs))
            if reached:
                mode.produced = {id(g): g for g in grad_outputs if isinstance(g, torch.Tensor)}

        def after(grad_inputs, grad_outputs, cls=cls):
            produced, mode.produced, mode.sensitivity = mode.produced, None, None
            if produced is None:
                return
            if any(isinstance(g, torch.Tensor) and _is_float(g) and id(g) not in produced for g in grad_inputs):
                mode.lost[f"the backward of {cls.__qualname__}, a custom autograd.Function whose backward computes "
                          "outside torch ops"] = ("write its backward with torch ops (gradwise follows those), or "
                                                  "make it a torch.library custom op with a strong-zero rule "
                                                  "(gw.register_rule)")

        handles += [node.register_prehook(before), node.register_hook(after)]
    return handles

