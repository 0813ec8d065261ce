"""The strong-zero engine: the hook on ``torch.autograd._engine_run_backward`` (``_engine_run``), the strong
pass (``_run_strong``, ``_nested``, ``grad_in_pass``), and the public ``strong_zeros()``, ``grad`` and
``backward``. The rebound globals ``_installed``, ``_original_engine_run`` and ``_process_wide`` live here only:
read them as ``_engine.<name>``.

May import: torch, gradwise._checks, gradwise._masks, gradwise._modes, _contract, _script, _carry, _compile,
_supports, _mode, _autograd_graph, _planning, _flat_rows, _traced;
and lazily (inside ``_under_traces``) gradwise._trace._tracer's ``_Tracer``, to keep a trace's recorders
above the strong-zero mode.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch._C._dynamo.eval_frame import set_eval_frame
from torch._C._functorch import (
    is_functorch_wrapped_tensor,
    is_legacy_batchedtensor,
    peek_interpreter_stack,
)
from torch._dynamo.eval_frame import skip_code
from torch.autograd.graph import GradientEdge
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from gradwise._checks import as_tensors, check_differentiable, check_scalar_or_seeded
from gradwise._masks import mask_all
from gradwise._modes import dynamo_off
from gradwise._strong_zeros import _carry, _contract, _hooks, _script, _transforms
from gradwise._strong_zeros._autograd_graph import _leaves, _root_nodes
from gradwise._strong_zeros._carry import carry
from gradwise._strong_zeros._compile import (
    _holds_nonfinite,
    compiled_run,
    compiled_step,
    hybrid_run,
    without_compiled_autograd,
)
from gradwise._strong_zeros._flat_rows import flat_rows_reach
from gradwise._strong_zeros._mode import _StrongZeroMode, carried_state, running_mode, watch_functions
from gradwise._strong_zeros._planning import _plan
from gradwise._strong_zeros._supports import (
    _STATE,
    NAMED_IF_NONFINITE,
    NOT_HANDING,
    SEEDED,
    UNSEEDED,
    _Layered,
    _Supports,
)
from gradwise._strong_zeros._traced import graph_recording, recording

# ---------------------------------------------------------------------------------------------------------
# The mode that applies the rules, and the two-phase backward.
# ---------------------------------------------------------------------------------------------------------


_INSTALL_LOCK = threading.Lock()
_installed = 0
_original_engine_run: Callable[..., Any] | None = None
_process_wide = False  # `gradwise run --strong-zeros`: every thread's backward, see strong_zeros_process_wide
# see _observe: the call sites where torch.compile traced a gradient into a graph, and those not warned about yet
_known_sites: set[str] = set()
_pending_sites: list[str] = []
_candidates: list[tuple[str, Any]] = []  # (call site, fx node) dynamo ran a gradient for: settled at its compile's end
unseen_reader: Any = None  # gw.trace()'s reader of backwards no wrapped call started, while installed (_observe)


# Never traced by dynamo: a backward called inside a torch.compile'd function (a whole training step) graph-breaks,
# and dynamo then compiles the frames the eager call enters, where torch.compiler.is_compiling() reads True and the
# plan took the real backward of real tensors for a traced one (plain: the padding's NaN stayed). dynamo_off: what
# torch.compiler.disable does, with one C call each way (it wraps every backward of a strong_zeros() block)
@dynamo_off
def _engine_run(t_outputs, grad_tensors, retain_graph, create_graph, inputs=(), allow_unreachable=True,
                accumulate_grad=True):
    """Replacement for ``torch.autograd._engine_run_backward`` while strong zeros are on (thread-local). Every
    path calls the engine exactly once with the caller's retain_graph/create_graph, so what the engine frees,
    what a backward sees (``_get_current_graph_task_keep_graph``) and what hooks run are PyTorch's."""
    assert _original_engine_run is not None
    if _pending_sites and not _STATE.in_mode:  # a traced gradient's warning raised as an error at a compile's end
        _warn_traced_gradients()
    if unseen_reader is not None and (tracer := unseen_reader.unseen()) is not None:  # (see _observe)
        return unseen_reader.read(tracer, _engine_run, t_outputs, grad_tensors, retain_graph, create_graph, inputs,
                                  allow_unreachable, accumulate_grad)

    def run(retain):
        return _original_engine_run(t_outputs, grad_tensors, retain, create_graph, inputs,
                                    allow_unreachable=allow_unreachable, accumulate_grad=accumulate_grad)

    if _STATE.depth == 0 and not _process_wide:
        # an engine thread running nodes of another thread's pass (a custom backward calling torch.autograd.grad on
        # CUDA's device thread): as on that thread
        if (state := carried_state()) is None or not state.depth:
            return run(retain_graph)  # strong zeros off in this thread
        mine = _STATE.adopt(state)
        try:
            return _engine_run(t_outputs, grad_tensors, retain_graph, create_graph, inputs, allow_unreachable,
                               accumulate_grad)
        finally:
            _STATE.adopt(mine)
    if _STATE.in_mode:  # a backward started inside the strong-zero pass (a checkpoint's recomputation calling
        # autograd.grad, a custom backward): its own backward, planned as if it ran outside, as in the forward...
        if _seeded_with_zeros(grad_tensors):  # ...unless its seeds are sensitivities of the pass holding
            # structural zeros (a reentrant checkpoint's backward): it is part of the pass, under the same supports
            return run(retain_graph)
        return _nested(_engine_run, t_outputs, grad_tensors, retain_graph, create_graph, inputs, allow_unreachable,
                       accumulate_grad)
    planned, _STATE.planned = _STATE.planned, None  # chosen already by gw.grad/gw.backward, or not
    if planned is None:
        step = _compiled_step(t_outputs, inputs or (), grad_tensors or ())
        if step is not None:  # a whole step compiled: the plan is 'compiled', found in one walk
            with without_compiled_autograd():
                return hybrid_run(step, run, t_outputs, inputs, accumulate_grad, retain_graph,
                                  _entering(create_graph, t_outputs))
        watched: list | None = []
        plan = _choose(t_outputs, inputs or (), grad_tensors or (), watched)
    else:
        plan, watched = planned
    if plan == "transform" and create_graph and _transforms.records_formulas():
        _contract.warn_plain("transform")  # a grad level records the formulas, not what the pass made of them
        return run(retain_graph)
    if plan == "plain":
        return run(retain_graph)
    with without_compiled_autograd():  # its one traced graph of the whole backward is out of gradwise's reach
        if plan == "transform":  # under torch.func transforms: one pass under the mode, nothing hooked (_transforms)
            return _run_strong(run, retain_graph, create_graph, t_outputs, transform=True, seeds=grad_tensors or ())
        return _run_plan(plan, run, t_outputs, retain_graph, create_graph, inputs, accumulate_grad, watched)


def _run_plan(plan: str, run: Callable[[bool | None], Any], t_outputs: Sequence[Any], retain_graph: bool | None,
              create_graph: bool, inputs: Sequence[Any], accumulate_grad: bool, watched: list | None) -> Any:
    """The engine's one run of a backward whose plan is not 'plain', under the strong-zero mode (``watched``: the
    custom Functions and compiled nodes the plan's walk found, or None where it did not walk)."""
    # 'strong', 'check' or 'compiled' (nodes gradwise knows nothing about): one pass under the mode. A plain pass first
    # with a re-run on NaN would force retain_graph, run hooks and custom backwards twice, and hold what the
    # engine frees (custom Functions' saved tensors) until the graph dies.
    run = compiled_run(run, t_outputs, inputs, accumulate_grad, watched)  # torch.compile'd nodes: _compile
    if plan == "compiled" and hasattr(run, "hybrid"):
        # the NaN/Inf a structural zero can reach is inside compiled graphs only: each runs compiled with the
        # pass (compiled speed, PyTorch's bits on finite data) and op by op only where that made NaN
        if run.compiled_only:
            return run.hybrid(retain_graph, _entering(create_graph, t_outputs))
        return _run_strong(run.hybrid, retain_graph, create_graph, t_outputs, nonfinite=False)
    return _run_strong(run, retain_graph, create_graph, t_outputs, functions=True, inputs=inputs, watched=watched,
                       nonfinite=plan == "strong")


def _compiled_step(t_outputs: Sequence[Any], inputs: Sequence[Any], seeds: Sequence[Any]) -> list | None:
    """The compiled nodes of a backward whose graph holds only torch.compile'd backwards and leaves, where the
    general path (``_choose``, ``_plan``, ``compiled_run``) would run it compiled-only: no dispatch mode, no
    carried zeros, nothing to run plain or traced (``_compile.compiled_step``). None otherwise: the general
    path then decides, warnings included. The walk goes first: it reads no tensor, and on any other graph it
    stops at its first node (an eager backward pays one type test)."""
    step = compiled_step(_root_nodes(t_outputs))
    if step is None or torch._C._len_torch_dispatch_stack() or _carry.CARRIED or _carry.CARRIED_VALUES:
        return None
    return step if _everyday(t_outputs, seeds, inputs) else None


_PLAIN_CLASSES = (torch.Tensor, torch.nn.Parameter)
_compiler = torch.compiler


def _everyday(*groups: Sequence[Any]) -> bool:
    """Whether each tensor of ``groups`` is a dense tensor of a plain class, not meta, nested, functional or wrapped by
    a torch.func transform, with no transform or compile under way: a stricter test than ``_contract.plain_reason``
    and ``traced`` together (which then find nothing), at a third of their cost. Anything else is theirs to
    decide, on the general path. Its callers run with dynamo off (never traced), where is_dynamo_compiling() is
    False: the process-wide compiling flag alone is read (stricter than ``compiling()``, in one read)."""
    if _compiler._is_compiling_flag or peek_interpreter_stack() is not None:
        return False
    for tensors in groups:
        for t in tensors:
            if isinstance(t, torch.Tensor) and (
                    t.__class__ not in _PLAIN_CLASSES or t.layout != torch.strided or t.is_nested or t.is_meta
                    or is_functorch_wrapped_tensor(t) or is_legacy_batchedtensor(t) or torch._is_functional_tensor(t)):
                return False
    return True


def _entering(create_graph: bool, t_outputs: Sequence[Any]) -> Callable[[Callable[[], Any]], Any]:
    """How a compiled node of a compiled-only backward that falls back enters the mode: one by one, sharing one
    support table (made on the first fall-back), so that what one graph's op-by-op run made structurally zero is
    known to the next (a graph break between)."""
    shared: list[_Supports] = []

    def enter(thunk: Callable[[], Any]) -> Any:
        if not shared:
            shared.append(_Supports())
        return _run_strong(lambda _: thunk(), None, create_graph, t_outputs, shared[0])

    return enter


def grad_in_pass(outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], seeds: Sequence[torch.Tensor],
                 supports: _Supports) -> tuple[torch.Tensor | None, ...]:
    """``torch.autograd.grad(outputs, inputs, seeds, allow_unused=True)`` as part of the strong-zero pass that is
    running (a rule that differentiates a decomposition of its op): under a mode that shares ``supports``, so the
    seeds' structural zeros stay structural. A plain ``torch.autograd.grad`` there would be a nested backward,
    planned afresh outside the pass (``_nested``), with seeds it knows nothing about."""
    engine_run = _original_engine_run or torch.autograd.graph._engine_run_backward  # a trace's re-run: not installed
    outer = _STATE.in_mode
    _STATE.in_mode = True
    mode = _StrongZeroMode()  # (after the state it carries: _supports.Carried)
    mode.supports = supports
    try:
        with mode:
            return engine_run(tuple(outputs), tuple(seeds), False, False, tuple(inputs),
                              allow_unreachable=True, accumulate_grad=False)
    finally:
        _STATE.in_mode = outer


def _seeded_with_zeros(seeds: Sequence[Any] | None) -> bool:
    """Whether some of ``seeds`` (a nested backward's) carry the running strong-zero pass's structural zeros. A
    torch.func transform's seeds (torch.func.grad called in a custom backward) are wrappers: no storage, none of the
    pass's (reading one raised 'Cannot access storage of TensorWrapper' from inside gradwise), nor are the legacy
    batched seeds of ``torch.autograd.functional.jacobian(vectorize=True)`` ('... of BatchedTensorImpl')."""
    mode = running_mode()
    return mode is not None and bool(seeds) and any(
        mode.supports.zeroed(t) for t in seeds if not (isinstance(t, torch.Tensor) and (
            is_functorch_wrapped_tensor(t) or is_legacy_batchedtensor(t))))


def _nested(engine_run: Callable[..., Any], *args: Any) -> Any:
    """Run a backward started inside the strong-zero pass outside of that pass's mode. Its results go on into
    the pass (a reentrant checkpoint returns its inputs' gradients, whose rows of NaN padding are structural zeros
    when the slice that drops them is inside the checkpointed block), so where the pass met NaN/Inf
    (``hands_down``) it runs strong and hands the pass the structural zeros of its results (``_STATE.export``,
    read by ``_run_strong``). Where the pass's graph was finite where its zeros reach ('check'), a custom backward
    can still make NaN/Inf after it (``g / x`` at a zero padding row): there it does so where its plan finds the
    zeros of dropped or masked padding reaching its results, and runs plain elsewhere (``_handing``). A backward
    of a torch.func transform (``torch.func.grad``/``vjp`` under ``vmap`` in a custom backward) runs strong anyway
    (path 'transform'): it shares the pass's supports, whatever the pass met (``_run_strong``)."""
    outer, handing, unnamed = _STATE.carried(), _STATE.handing, _STATE.unnamed
    _STATE.unnamed = {}
    mode = running_mode()
    _STATE.in_mode, _STATE.transform, _STATE.outputs_batched = False, False, False
    _STATE.export = None if mode is None else mode.supports
    # in a 'check' pass (finite where its zeros reach), only where padding's zeros reach its results (_handing):
    # forcing every such backward strong would run each reentrant checkpoint's block op by op. And only where it
    # is seeded with the custom backward's sensitivity (a reentrant checkpoint's, grad(f(x), x, g)): else it may
    # differentiate a function unrelated to the pass (g * grad(h)(c)), whose zeros are values there (3: it exports
    # nothing, named if the pass ends NaN/Inf)
    # In a strong pass (hands_down) likewise: inside a custom backward (its sensitivity known) a backward neither
    # seeded with that sensitivity or the pass's zeros nor differentiating at a tensor of the custom node
    # (``_tied``) exports nothing (3)
    transform, basis = peek_interpreter_stack() is not None, _STATE.basis_hands_up
    related = mode is None or mode.sensitivity is None or _seeded_by_sensitivity(mode, args[1]) or \
        _tied(args[4] if len(args) > 4 else ()) or (not transform and _seeded_with_zeros(args[1]))
    _STATE.basis_hands_up, rows = related, _STATE.rows_matter
    _STATE.rows_matter = mode is None or mode.makes_nonfinite
    _STATE.handing = NOT_HANDING if mode is None or transform or (mode.hands_down and related) else \
        SEEDED if _seeded_by_sensitivity(mode, args[1]) else UNSEEDED
    if _STATE.handing == UNSEEDED:
        _STATE.export = None
    if _STATE.checkpoint_forward:  # a checkpoint's recomputation of the user's forward: planned as in that
        # forward (where no pass ran), or it saves other tensors than the forward did ('a different number of
        # tensors was saved'): nothing handed down, its outputs' finiteness its own
        _STATE.export, _STATE.outputs_finite, _STATE.handing = None, True, NOT_HANDING
    try:
        with _outside_the_pass():
            result = engine_run(*args)
        if mode is not None:
            mode.lost.update(_STATE.unnamed)
        if _STATE.handing == NAMED_IF_NONFINITE and mode is not None:  # named if the pass's gradients end NaN/Inf
            node = torch._C._current_autograd_node()
            mode.lost[f"the results of a backward nested in {type(node).__name__ if node else 'a backward'} (a "
                      "torch.autograd.grad in it, a reentrant checkpoint's block), whose results' structural zeros "
                      "were not handed on (a relu's, clamp's, max's or pool's, or any where it was not seeded with "
                      "that backward's sensitivity)"] = (
                "compute that gradient with the backward's own torch ops (no nested torch.autograd.grad), or use "
                "torch.utils.checkpoint(..., use_reentrant=False)")
        return result
    finally:
        _STATE.adopt(outer)
        _STATE.handing, _STATE.unnamed, _STATE.basis_hands_up, _STATE.rows_matter = handing, unnamed, basis, rows


def _tied(inputs: Sequence[Any]) -> bool:
    """Whether a backward nested in a custom backward differentiates with respect to a tensor over the memory of one
    its node holds (saved, or an attribute of its ctx; under functorch's wrappers): at the custom Function's input,
    as its backward's contract is (a reentrant checkpoint's detached inputs, ``jacrev(f)(x)`` of a saved x), rather
    than at a constant made in the backward (``torch.func.grad(h)(torch.tensor(c))``: a function unrelated to the
    pass, whose structural zeros are values to it)."""
    node = torch._C._current_autograd_node()
    if node is None or getattr(node, "_forward_cls", None) is None:
        return True  # (no custom backward: nothing to tell)
    # only tensors differentiable in the forward (a checkpoint's inputs, a saved x that requires grad): a constant
    # the node holds (a mask, a buffer; saved or on ctx) is no input of the pass, a function of it unrelated to it
    held = set()
    with contextlib.suppress(RuntimeError):  # (freed, or unpacked through a hook that raised: nothing to read)
        held.update(t.untyped_storage()._cdata for t in node.saved_tensors
                    if isinstance(t, torch.Tensor) and t.requires_grad)
    for v in vars(node).values():
        for t in v if isinstance(v, (tuple, list)) else (v,):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided and t.requires_grad:
                held.add(_transforms._plain(t).untyped_storage()._cdata)
    return any(isinstance(t, torch.Tensor) and t.layout == torch.strided
               and _transforms._plain(t).untyped_storage()._cdata in held for t in inputs)


def _seeded_by_sensitivity(mode: Any, seeds: Any) -> bool:
    """Whether ``seeds`` (a nested backward's) hold a sensitivity of the custom backward it runs in
    (``_mode.watch_functions``), as PyTorch passes it on: a reentrant checkpoint's, ``grad(f(x), x, g)``."""
    given = mode.sensitivity
    return bool(given) and bool(seeds) and any(s is g for s in seeds if s is not None for g in given)


def _handing(plan: str, results: list, outputs: Sequence[Any] = (), inputs: Sequence[Any] = (),
             seeds: Sequence[Any] = ()) -> str:
    """The path of a backward nested in a 'check' pass (``_nested``): strong, its results' structural zeros
    exported to the pass, where the zeros of dropped or masked padding reach them (a slice in the block that drops
    padding rows: ``_planning._results_reach``) or where it runs strong anyway; else plain, exporting nothing, and
    where a relu's, clamp's, max's zeros could reach them (a checkpointed Linear+ReLU block: run strong, every such
    block would run op by op) named in the pass's OpaqueBackwardWarning if its gradients end NaN/Inf."""
    reach = results[1] if len(results) > 1 else 0
    if _STATE.handing == UNSEEDED:  # nothing exported (_nested), named where zeros reach its results (a plan not
        _STATE.handing = NAMED_IF_NONFINITE if reach else NOT_HANDING  # 'plain' ran as in the base)
        return plan
    if plan != "plain":
        return plan
    if reach == 2 or (reach == 1 and _STATE.rows_matter and not _seeded_with_zeros(seeds)
                      and flat_rows_reach(outputs, inputs)):
        return "strong"  # (relu's whole structural rows reach its results too: _flat_rows)
    _STATE.export = None
    _STATE.handing = NAMED_IF_NONFINITE if reach else NOT_HANDING  # (one nested in it is planned as any other)
    return plan


@contextlib.contextmanager
def _outside_the_pass() -> Iterator[None]:
    """The running pass's mode off the dispatch stack, the modes above it kept on top in their order (a trace's
    recorders, which ``_under_traces`` puts there; a user's mode entered inside a custom backward): a nested
    pass's mode left below them would run the outer pass's rules on every op of the nested pass's rules, one
    more layer per level of nesting (cost doubling per level). An infra mode (fake tensors) stays where it is."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode, _pop_mode, _push_mode

    above = []
    while (top := _get_current_dispatch_mode()) is not None and not isinstance(top, _StrongZeroMode) \
            and not top.is_infra_mode() and getattr(top, "_dispatch_key", None) is None:
        above.append(_pop_mode())
    pass_mode = _pop_mode() if isinstance(_get_current_dispatch_mode(), _StrongZeroMode) else None
    for tracer in reversed(above):
        _push_mode(tracer)
    try:
        yield
    finally:
        for _ in above:
            _pop_mode()
        if pass_mode is not None:
            _push_mode(pass_mode)
        for tracer in reversed(above):
            _push_mode(tracer)


def _run_strong(run: Callable[[bool | None], Any], retain_graph: bool | None, create_graph: bool,
                outputs: Sequence[Any] = (), supports: _Supports | None = None, functions: bool = False,
                inputs: Sequence[Any] = (), watched: list | None = None, transform: bool = False,
                seeds: Sequence[Any] = (), nonfinite: bool = True) -> Any:
    """One backward under the strong-zero mode. ``functions``: watch the graph's custom autograd.Functions for
    results made outside torch ops (`watch_functions`; among ``watched`` when the plan listed them); where
    structural zeros were lost there or in an op without a rule and the gradients hold NaN/Inf, an
    OpaqueBackwardWarning names them (``inputs``: those of backward(inputs=...), whose .grad it reads).
    ``transform``: under torch.func transforms (``_transforms``): outputs and results are read under their
    wrappers, and structural zeros are carried only where PyTorch's autograd below the transforms recorded the
    pass (the transform's own create_graph records on its wrappers, which no later pass sees); ``seeds``: its
    sensitivities, batched where each of its rows is a gradient of its own (jacrev, is_grads_batched).
    ``nonfinite``: False where the plan found the graph finite where structural zeros reach ('check', 'compiled'):
    a backward nested in the pass then needs to hand none back (``_nested``)."""
    outer = _STATE.create_graph, _STATE.outputs_finite, _STATE.transform, _STATE.outputs_batched, _STATE.export
    _STATE.create_graph, _STATE.in_mode, _STATE.transform = create_graph, True, transform
    export, _STATE.export = _STATE.export, None  # for this pass only, not for backwards nested in it
    _STATE.outputs_batched = False
    # a backward nested in a pass (_nested: a reentrant checkpoint's, a custom backward's torch.autograd.grad)
    # differentiates a part of that pass's program: its outputs count as finite only where the pass's do (its
    # block's exp(-inf) = 0 output is finite while the loss, that 0 times inf, is NaN: the zero is no structural
    # one there, and a genuine NaN gradient was hidden). Outside any pass this reads the default, True.
    within = _STATE.outputs_finite
    if transform:
        own = _transforms.all_finite(outputs)
        # read for the whole batch: the samples' outputs (vmap(grad)), or all outputs for each row (batched seeds)
        _STATE.outputs_batched = not own and _transforms.batched((*outputs, *seeds))
        _STATE.outputs_finite = own and within
    else:
        _STATE.outputs_finite = within and all(bool(t.isfinite().all()) for t in outputs
                                               if isinstance(t, torch.Tensor) and t.is_floating_point())
    mode = _StrongZeroMode(carry=create_graph)
    mode.makes_nonfinite = _STATE.rows_matter or watched is None or any(
        type(n).__name__ != "CheckpointFunctionBackward" for n in watched)  # (or an enclosing pass's graph)
    # (a nested pass: its own pass needs the zeros; in a 'check' pass, only those of padding reaching its results)
    mode.hands_down = nonfinite or (export is not None and _STATE.handing != SEEDED)
    if supports is not None:
        mode.supports = supports
    elif transform and export is not None:
        # a torch.func backward nested in a pass (torch.func.grad in a custom backward): the plain tensors under its
        # wrappers may be the pass's (the custom backward's sensitivity, captured or a seed), structural zeros and
        # all; with a fresh table they were values to it, and the padding's 0 x inf stayed NaN. Its own zeros go to
        # the pass only where it met the pass's (_Layered: an unrelated function's are no zeros of the pass)
        mode.supports = _Layered(export)
    if transform:  # PyTorch's standard basis (a Jacobian's rows): the outputs a row does not select are unused there
        for seed, support in _transforms.selecting_seeds(seeds):
            mode.supports.record(seed, support)  # (the basis may be in the outer table too: met there or not)
            if isinstance(mode.supports, _Layered):  # a Jacobian in a custom backward at its input: its zeros
                mode.supports.met_outer = _STATE.basis_hands_up  # handed up, as its basis's were by the outer's
                # entries with jacrev; at a constant of the backward, none (_nested)
    if _carry.CARRIED_VALUES:  # a create_graph pass's values with structural zeros, saved by this graph
        _carry.seed(mode.supports)
    handles = watch_functions([r for r in _root_nodes(outputs) if r is not None], mode, watched) if functions else []
    samples = transform and within and _STATE.outputs_batched and _transforms.per_sample_lost(outputs)
    if transform:
        mode.lost.update(_transforms.unhooked(outputs))
    dual = torch.autograd.forward_ad._current_level >= 0  # (a tangent through the formulas: not followed)
    try:
        with _under_traces(mode), _hooks.opened():  # (the users' tensor hooks wrapped for the pass: _hooks)
            result = run(retain_graph)
    finally:
        (_STATE.create_graph, _STATE.outputs_finite, _STATE.transform, _STATE.outputs_batched, _STATE.export), \
            _STATE.in_mode = outer, False
        for h in handles:
            h.remove()
    if isinstance(mode.supports, _Layered):
        mode.supports.hand_up()
    if export is not None and not transform:
        _export(export, mode.supports, result, outputs, inputs)
    if dual and mode.supports.holds_masks() and not _transforms.tangents_finite(result or ()):
        _contract.warn_opaque(*_transforms.DUAL_TANGENTS)
    if mode.lost and (not _transforms.all_finite(result or ()) if transform
                      else _holds_nonfinite(result, _leaves(outputs, inputs))):
        for what, fix in mode.lost.items():
            _contract.warn_opaque(what, fix)
    elif mode.lost and _STATE.unnamed is not None:  # nested in a pass (_nested): named there if it ends NaN/Inf
        _STATE.unnamed.update(mode.lost)
    if samples:
        _transforms.name_per_sample(samples, outputs, result or ())
    if mode.made and (not transform or _transforms.recorded(mode.made)):
        # the new graph (create_graph) differentiates through the zeros: they stay structural there
        carry(mode.made, mode.supports)
    return result


def _export(to: _Supports, supports: _Supports, result: Any, outputs: Sequence[Any], inputs: Sequence[Any]) -> None:
    """Give the structural zeros of a nested backward's results (those of torch.autograd.grad, else the .grad of
    the leaves it accumulated into) to the pass it runs inside (``to``): a structural zero of the nested backward
    is one of the pass too, which differentiates through it."""
    made = result if result else [leaf.grad for leaf in _leaves(outputs, inputs)]
    for t in made:
        if isinstance(t, torch.Tensor) and (support := supports.of(t)) is not None and not mask_all(support):
            to.record(t, support.clone(), fresh=True)


@contextlib.contextmanager
def _under_traces(mode: TorchDispatchMode) -> Iterator[None]:
    """Enter ``mode`` below the gw.trace() recorders on top of the mode stack, so that a trace sees the backward
    ops PyTorch issues and their strong-zero results, not the strong-zero rules' own ops (which it would read
    as NaN made from finite values). Other modes (fake tensors, proxies) stay below ``mode`` as before."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode, _pop_mode, _push_mode

    from gradwise._trace._tracer import _Tracer  # lazily: the trace package imports this module

    above = []
    while isinstance(_get_current_dispatch_mode(), _Tracer):
        above.append(_pop_mode())
    try:
        with mode:
            for tracer in reversed(above):
                _push_mode(tracer)
            try:
                yield
            finally:
                for _ in above:
                    _pop_mode()
    finally:
        for tracer in reversed(above):
            _push_mode(tracer)


def _choose(outputs: Sequence[Any], inputs: Sequence[Any], seeds: Sequence[Any], watched: list | None = None) -> str:
    """The path of one backward: what ``_plan`` says, or 'plain' (with a PlainBackwardWarning, once) where
    gradwise cannot read or follow the graph (_contract). ``watched``: see ``_plan``."""
    if recording() or torch._C._is_tracing():  # PyTorch traces (make_fx, a fake mode, AOTAutograd, export,
        # torch.jit.trace): plain ops, no read of its tensors (which may be real ones: the plan read them with the modes
        # off and chose the strong pass, whose reads then met the proxy mode: "get value out of a tracing tensor"; a
        # jit.trace graph recorded PyTorch's plain ops). Said once where the user's own code asked for it
        if graph_recording() and _contract.users_backward():
            _contract.warn_plain("recorded")
        return "plain"
    # the everyday case (plain dense tensors, no transform or compile) in one cheap test, stricter than plain_reason
    # and traced together: both would find nothing, so neither runs (~20 us of a 2 ms backward)
    everyday = _everyday(outputs, seeds, inputs)
    why = None if everyday else _contract.plain_reason(outputs, inputs, seeds)
    if why in ("transform", "batched"):
        why = _transforms.plain_reason(outputs, inputs, seeds)
        if why is None:
            return "transform"  # no plan (its reads would meet wrappers): one pass under the mode (_transforms)
    if why is None:
        try:
            results = [inputs] if _STATE.handing in (SEEDED, UNSEEDED) else None
            if torch._C._len_torch_dispatch_stack():
                with _disable_current_modes():  # modes around backward (a trace) don't see our checks
                    plan = _plan(outputs, seeds, watched, everyday, results)
            else:
                plan = _plan(outputs, seeds, watched, everyday, results)
            if results is not None:  # nested in a 'check' pass
                return _handing(plan, results, outputs, inputs, seeds)
            # a backward nested in a strong pass hands its structural zeros on (_nested): even on finite data,
            # where the pass's own NaN/Inf lie beyond it
            return "strong" if plan == "plain" and _STATE.export is not None else plan
        except _contract.Unreadable as e:
            why = e.reason
    _contract.warn_plain(why)
    return "plain"


# gw.grad / gw.backward plan here, also inside a compiled function (see _engine_run); _engine_run, which dynamo never
# traces already, calls _choose itself (the wrapper costs ~4 us a backward)
_choose_untraced = dynamo_off(_choose)


def _run_planned(run: Callable[[bool | None], Any], outputs: Sequence[Any], seeds: Any,
                 retain_graph: bool | None, inputs: Sequence[Any] = ()) -> Any:
    """gw.grad/gw.backward: choose the path before calling into torch.autograd (``run``). The everyday one,
    plain, then runs without the engine hook; any other goes through the hook with the path already chosen (so
    the graph is walked once). Inside ``strong_zeros()`` or under a dispatch mode the hook chooses."""
    planned = None
    if not (_STATE.depth or _process_wide) and not torch._C._len_torch_dispatch_stack():
        seeds = (seeds,) if isinstance(seeds, torch.Tensor) else seeds or ()
        watched: list = []
        plan = _choose_untraced(outputs, inputs, seeds, watched)
        if plan == "plain":
            return run(retain_graph)
        planned = (plan, watched)
    _STATE.planned = planned
    try:
        with strong_zeros():
            return run(retain_graph)
    finally:
        _STATE.planned = None  # not consumed when torch.autograd raised before reaching the engine


def strong_zeros() -> contextlib.AbstractContextManager[None]:
    """Within this block every ``.backward()``, ``torch.autograd.backward`` and ``torch.autograd.grad`` of
    this thread uses strong zeros: values the output never uses cannot turn a gradient into NaN.

    Nesting is allowed. On finite data the gradients are bitwise PyTorch's.

    >>> import torch, gradwise as gw
    >>> lin = torch.nn.Linear(3, 1)
    >>> x = torch.cat([torch.ones(2, 3), torch.full((2, 3), float("nan"))])
    >>> with gw.strong_zeros():
    ...     lin(x)[:2].sum().backward()
    >>> bool(lin.weight.grad.isfinite().all())
    True
    """
    return _StrongZeros()


class _StrongZeros(contextlib.ContextDecorator):
    """``strong_zeros()``: the engine hook installed while any thread is inside one, this thread's depth counted.
    A class rather than a generator: it is entered around every backward of a training step."""

    __slots__ = ()

    def __enter__(self) -> None:
        global _installed
        if _pending_sites:
            _warn_traced_gradients()
        with _INSTALL_LOCK:
            if _original_engine_run is None:
                _hook_in()
            _installed += 1
        _STATE.depth += 1

    def __exit__(self, *exc: object) -> None:
        global _installed
        _STATE.depth -= 1
        with _INSTALL_LOCK:
            _installed -= 1
        if _pending_sites and exc[0] is None:  # (an error at a compile's end: see _settle_traced_gradients)
            _warn_traced_gradients()


def _engine_entry(t_outputs, grad_tensors, retain_graph, create_graph, inputs=(), allow_unreachable=True,
                  accumulate_grad=True):
    """``torch.autograd._engine_run_backward`` from the first block on: ``_engine_run`` while a block is open in some
    thread, else PyTorch's (``_observe``) at the cost of one global read (no dynamo_off: run, never traced, as
    ``_observe``). ``_engine_run``'s body is called with dynamo's callback off here, as its wrapper would: one
    Python frame less per backward (a reentrant checkpoint nests one backward per level)."""
    if _installed:
        prior = set_eval_frame(None)
        try:
            return _engine_run_body(t_outputs, grad_tensors, retain_graph, create_graph, inputs, allow_unreachable,
                                    accumulate_grad)
        finally:
            set_eval_frame(prior)
    return _original_engine_run(t_outputs, grad_tensors, retain_graph, create_graph, inputs,
                                allow_unreachable=allow_unreachable, accumulate_grad=accumulate_grad)


def _hook_in() -> None:
    """Put the engine hook (``_engine_entry``) and TorchScript's call wrappers (``_script``) in place, on the first
    block's entry, for the rest of the process: with no block open in any thread (``_installed`` 0) each passes
    straight to PyTorch's (one global read). Swapping them in and out per block cost ~45 us of a block entered
    around each backward (type attributes set, caches cold after a forward). Called under _INSTALL_LOCK."""
    global _original_engine_run
    _original_engine_run = torch.autograd._engine_run_backward
    torch.autograd._engine_run_backward = _engine_entry
    _script.install(_strong_here)  # scripted code that takes a gradient: said (_script)
    _transforms.record_bases()  # (kept, as the hooks: swapping the constructors back would recompile dynamo's guards)


def _strong_here() -> bool:
    """Whether strong zeros are on in this thread."""
    return bool(_STATE.depth or _process_wide)


# A gradient that torch.compile traces into a graph (torch.compile(torch.func.grad(f)), or of torch.func.vjp) is
# computed by that graph's kernels: no backward runs when it is called, so strong zeros never see it. The one
# moment gradwise can see it is the trace: dynamo runs the gradient node on fake tensors, calling the engine from its
# run_node (AOTAutograd's own joint trace of an ordinary compiled forward does not). A hook that is always there
# records the user's call site then and warns: at once inside a strong-zeros block (of any thread), else on entering
# the next one.
# It reads no values and changes no compiled graph.
#
# While gw.trace() is installed, ``unseen_reader`` (gradwise._trace._session's) reads a backward that no wrapped
# torch.autograd.grad/backward started: a name bound before the trace (`from torch.autograd import grad` at a
# module's top) calls PyTorch's own, which looks this hook up at call time. Here (or in _engine_run, the outer hook
# while strong zeros are installed: before the plan, as for a wrapped call) the trace sees its seeds and results.
def _observe(t_outputs, *args: Any, **kwargs: Any) -> Any:
    """``torch.autograd._engine_run_backward`` from gradwise's import on: PyTorch's, plus the record above."""
    if unseen_reader is not None and (tracer := unseen_reader.unseen()) is not None:
        return unseen_reader.read(tracer, _observe, t_outputs, *args, **kwargs)
    if torch.compiler.is_compiling() and (node := _dynamo_node()) is not None:
        _record_traced_gradient(node)
    return _torch_engine_run(t_outputs, *args, **kwargs)


skip_code(_observe.__code__)  # run, never traced (see _engine_run); torch.compiler.disable's wrapper costs ~1 us
skip_code(_engine_entry.__code__)
_engine_run_body = _engine_run.__wrapped__
_torch_engine_run = torch.autograd._engine_run_backward
torch.autograd._engine_run_backward = _observe
_hooks.install()  # tensor hooks that compute outside torch ops (_hooks): wrapped from the import on, as _observe
_DYNAMO_RUN_NODE = torch._dynamo.utils.run_node.__code__


def _dynamo_node() -> Any:
    """The fx node dynamo's run_node is running now (True where it has none by that name), or None outside it."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code is not _DYNAMO_RUN_NODE:
        frame = frame.f_back
    return None if frame is None else frame.f_locals.get("node", True)


def _record_traced_gradient(node: Any) -> None:
    site = _contract.user_site()  # (dynamo runs the node from the user's call of the compiled function)
    handler = torch._dynamo.callback_handler
    if isinstance(node, torch.fx.Node):  # settled when the compile ends: in a compiled graph, or speculated only
        with _INSTALL_LOCK:
            _candidates.append((site, node))
            if _settle_traced_gradients not in handler.end_callbacks:  # (torch._dynamo.reset() clears them)
                handler.register_end_callback(_settle_traced_gradients)
        return
    _note_traced_site(site)


def _settle_traced_gradients(_args: Any = None) -> None:
    """At the end of a dynamo compile: a gradient it ran on fake tensors is computed by a compiled graph only if its
    node is part of one (its graph became a GraphModule and kept it). A speculation dynamo dropped (a graph break
    inside a torch.func transform after the gradient: the transform then runs eagerly, with strong zeros) is no
    such gradient, and warning of it called strong gradients PyTorch's. Dynamo runs its end callbacks in a
    ``finally``, before it counts the compile done: nothing may raise here (a warning filtered into an error left
    that count at 1, so no callback ran for any later compile and ``torch._dynamo.reset()`` raised), so such a
    warning is raised where it is safe (the block's exit, the next backward, the next block's entry)."""
    with _INSTALL_LOCK:
        done = _candidates[:]
        _candidates.clear()
    for site, node in done:
        if node.graph.owning_module is not None and not getattr(node, "_erased", False):
            _note_traced_site(site, raise_later=True)


def _note_traced_site(site: str, raise_later: bool = False) -> None:
    with _INSTALL_LOCK:
        if site not in _known_sites:
            _known_sites.add(site)
            _pending_sites.append(site)
    if _STATE.depth or _process_wide or _installed:  # _installed: a block open on another thread, entered before
        _warn_traced_gradients(raise_later)  # this compile, may call the function now with no entry left to warn at


def _warn_traced_gradients(raise_later: bool = False) -> None:
    with _INSTALL_LOCK:
        sites = _pending_sites[:]
        _pending_sites.clear()
    for i, site in enumerate(sites):
        try:
            _contract.warn_traced_gradient(site)
        except Exception:
            if not raise_later:
                raise
            with _INSTALL_LOCK:  # (a warning filtered into an error: pending again, raised where that is safe)
                _pending_sites[:0] = sites[i:]
            return


@contextlib.contextmanager
def strong_zeros_process_wide() -> Iterator[None]:
    """Strong zeros for every backward of every thread while the block runs (threads started inside it
    included); ``strong_zeros()`` covers only the calling thread. Used by ``gradwise run --strong-zeros``."""
    global _process_wide
    outer = _process_wide
    with strong_zeros():
        _process_wide = True
        try:
            yield
        finally:
            _process_wide = outer


def grad(
    outputs: torch.Tensor | Iterable[torch.Tensor] | GradientEdge | Iterable[GradientEdge],
    inputs: torch.Tensor | Iterable[torch.Tensor] | GradientEdge | Iterable[GradientEdge] | dict[str, torch.Tensor],
    grad_outputs: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
    retain_graph: bool | None = None,
    create_graph: bool = False,
    only_inputs: bool = True,
    allow_unused: bool | None = None,
    is_grads_batched: bool = False,
    materialize_grads: bool = False,
) -> tuple[torch.Tensor | None, ...] | dict[str, torch.Tensor | None]:
    """Drop-in for ``torch.autograd.grad`` with strong zeros: the gradient equals that of the same program
    with the values the output never uses deleted. A NaN/Inf the output really depends on stays.

    Takes every argument of ``torch.autograd.grad``, in its order and with its meaning (GradientEdge outputs and
    inputs, any iterable or a dict of inputs). With ``is_grads_batched=True`` the backward runs under vmap, in one
    strong pass without a plan, as under torch.func transforms (docs/strong-zeros-design.md).

    >>> import torch, gradwise as gw
    >>> x = torch.tensor([-1.0, 4.0], requires_grad=True)
    >>> y = torch.where(x > 0, x.sqrt(), 0.0).sum()
    >>> torch.autograd.grad(y, x, retain_graph=True)[0]
    tensor([   nan, 0.2500])
    >>> gw.grad(y, x)[0]
    tensor([0.0000, 0.2500])
    """
    outs = as_tensors(_contract.as_outputs(outputs), "outputs", "gw.grad")
    ins = as_tensors(_contract.as_inputs(inputs, "gw.grad"), "inputs", "gw.grad")
    check_differentiable(outs, "outputs", "gw.grad")
    check_differentiable(ins, "inputs", "gw.grad")
    if not is_grads_batched:  # batched seeds carry a leading batch dimension: torch.autograd checks them
        check_scalar_or_seeded(outs, grad_outputs, "gw.grad")

    def run(retain):
        return torch.autograd.grad(outs, inputs if type(inputs) is dict else ins, grad_outputs, retain, create_graph,
                                   only_inputs, allow_unused, is_grads_batched, materialize_grads)

    if is_grads_batched:  # planned where its seeds are batched: inside vmap, by the engine hook (_transforms)
        with strong_zeros():
            return run(retain_graph)
    return _run_planned(run, outs, grad_outputs, retain_graph, ins)


def backward(
    tensors: torch.Tensor | Iterable[torch.Tensor] | GradientEdge | Iterable[GradientEdge],
    grad_tensors: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
    retain_graph: bool | None = None,
    create_graph: bool = False,
    grad_variables: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
    inputs: torch.Tensor | Iterable[torch.Tensor] | GradientEdge | Iterable[GradientEdge] | dict[str, torch.Tensor]
    | None = None,
) -> None:
    """Drop-in for ``torch.autograd.backward`` with strong zeros: accumulates into ``.grad``. Takes every
    argument of ``torch.autograd.backward``, in its order and with its meaning.

    >>> import torch, gradwise as gw
    >>> x = torch.tensor([0.0, 100.0], requires_grad=True)
    >>> gw.backward(torch.where(x < 50, x.exp(), 0.0).sum())
    >>> x.grad
    tensor([1., 0.])
    """
    ins: tuple = ()
    if tensors.__class__ is torch.Tensor and grad_tensors is None and grad_variables is None and inputs is None \
            and tensors.requires_grad and tensors.is_floating_point() and tensors.numel() == 1:
        outs, seeds = (tensors,), None  # gw.backward(loss): what the checks below find, in a third of their time
    else:
        outs = as_tensors(_contract.as_outputs(tensors), "tensors", "gw.backward")
        check_differentiable(outs, "tensors", "gw.backward")
        seeds = grad_tensors if grad_tensors is not None else grad_variables
        check_scalar_or_seeded(outs, seeds, "gw.backward")
        if inputs is not None:
            ins = as_tensors(_contract.as_inputs(inputs, "gw.backward"), "inputs", "gw.backward")
            check_differentiable(ins, "inputs", "gw.backward")

    def run(retain):
        torch.autograd.backward(outs, grad_tensors, retain, create_graph, grad_variables,
                                None if inputs is None else inputs if type(inputs) is dict else ins)

    _run_planned(run, outs, seeds, retain_graph, ins)
