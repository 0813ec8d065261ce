"""``_Tracer``, the TorchDispatchMode that sees every aten op of a forward and backward pass and hands it to
its parts (``_ForwardOps``, ``_BackwardOps``, ``_Checks``, ``_Roots``, ``_Received``, ``_Provenance``,
``_GradientBirths``, ``_LeafNames``, ``_Incidents``, ``_Met``, ``_SavedMeets``, ``_Flow``, ``_KinkChecks``,
``_Assembly``), and
``_op_info``, the per-op facts it caches.

May import: torch, gradwise._modes, gradwise._ops, gradwise._strong_zeros, every module of gradwise._trace above
_session.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass

import torch
from torch._C._autograd import _get_sequence_nr
from torch.utils.weak import WeakTensorKeyDictionary

from gradwise._modes import PASSES, LeanDispatchMode, kernels, subgraphs_under
from gradwise._ops._zeros import ops_of_kind
from gradwise._strong_zeros._traced import recording
from gradwise._trace import _common, _kinds
from gradwise._trace._assembly import _Assembly
from gradwise._trace._backward_ops import _FORMULA_FIRST, _FORMULA_READS, _BackwardOps
from gradwise._trace._checking import _Checks
from gradwise._trace._common import (
    _ByIdentity,
    _Cleanness,
    _floats,
    _KinkGroup,
    _Node,
    _nonfinite,
    _op_name,
    _recomputing,
    _tensors,
)
from gradwise._trace._common import run_op as _run
from gradwise._trace._facts import (
    _ACCUMULATES,
    _ARRIVALS,
    _COLLECTIVE_NAMESPACES,
    _COMPARISONS,
    _FINITE_PRESERVING,
    _LITERALS,
    _UNINITIALISED,
)
from gradwise._trace._flow import _Flow
from gradwise._trace._forward_ops import _ForwardOps
from gradwise._trace._gradient_births import _GradientBirths
from gradwise._trace._incidents import _Incidents
from gradwise._trace._kink_checks import _KinkChecks
from gradwise._trace._kinks import _Detector, kink_detector
from gradwise._trace._leaf_names import _LeafNames
from gradwise._trace._met import _Met
from gradwise._trace._provenance import _Provenance
from gradwise._trace._received import _Received
from gradwise._trace._roots import _Roots
from gradwise._trace._saved_meets import _SavedMeets
from gradwise._trace._shadow import _Shadow
from gradwise._trace._store import Store

# -- per-op facts, cached ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _OpInfo:
    view: bool
    mutable: bool
    detector: _Detector | None
    compare: str | None
    packet_name: str
    collective: bool = False  # a torch.distributed collective (c10d): its result holds other ranks' values
    op_name: str = ""  # "aten.<packet>", as reports name ops
    uninitialised: bool = False  # empty & co: their output is whatever the memory held (never a value to check)
    # a CompositeImplicitAutograd op without its own ADInplaceOrView kernel: see _Tracer.__torch_dispatch__
    composite: bool = False
    cast: bool = False  # _to_copy: finite-preserving unless it narrows the dtype (`widens`)
    keeps: bool = False  # a view, or an op whose output is finite whenever its inputs are (casts: `widens` says)
    mask: bool = False  # a comparison: in a backward formula, a selection mask (amax's `self == result`)
    foreach: bool = False  # torch._foreach_*: one op per list position (`_Tracer._dig_foreach`)
    accumulates: bool = False  # in _ACCUMULATES: the add_ that accumulates into a leaf's .grad in a backward
    formula_first: bool = False  # the first op of a whole backward formula (_BackwardOps: its g is kept)
    formula_read: bool = False  # an op of a whole formula that receives a saved value (``WholeFormula.reads``)

    def widens(self, args: tuple, kwargs: dict) -> bool:
        """A cast that cannot overflow: not to a dtype with a smaller range (float32 -> float16 overflows above
        65504)."""
        dtype, x = kwargs.get("dtype"), args[0] if args else None
        return dtype is None or not isinstance(x, torch.Tensor) or not x.is_floating_point() \
            or not dtype.is_floating_point or torch.finfo(dtype).max >= torch.finfo(x.dtype).max


_INFO: dict = {}
_MASKS = set(ops_of_kind("compares"))  # (the shared facts: what makes a selection mask in a backward formula)
# the attribute of an OpOverload that holds its _OpInfo: read on every op, where a dict keyed by the op costs a
# Python-level OpOverload.__hash__ (~0.3 us; a lookup or two per op, ~1% of a small model's traced step)
_INFO_ATTR = "_gradwise_trace_info"


def _op_info(func) -> _OpInfo:
    info = _INFO.get(func)
    if info is None:
        packet = func.overloadpacket
        # a literal's lift_fresh aliases fresh data: checked like a new tensor (a NaN literal is born there)
        view = bool(getattr(func, "is_view", False)) and packet not in _LITERALS
        cast = packet is torch.ops.aten._to_copy
        info = _INFO[func] = _OpInfo(
            view, func._schema.is_mutable, kink_detector(packet), _COMPARISONS.get(packet), packet.__name__,
            collective=func.namespace in _COLLECTIVE_NAMESPACES, op_name=_op_name(func),
            uninitialised=_op_name(func) in _UNINITIALISED or func in _ARRIVALS, composite=_composite(func),
            cast=cast, keeps=view or (packet in _FINITE_PRESERVING and not cast), mask=packet in _MASKS,
            foreach=packet.__name__.startswith("_foreach_"), accumulates=func in _ACCUMULATES,
            formula_first=func in _FORMULA_FIRST, formula_read=func in _FORMULA_READS)
        if type(func) is _OVERLOAD:  # (the fast path's: `_Tracer.__torch_dispatch__`)
            setattr(func, _INFO_ATTR, info)
    return info


def _composite(func) -> bool:
    keys = kernels(func.name())
    return "CompositeImplicitAutograd" in keys and "ADInplaceOrView" not in keys


_ADINPLACEORVIEW = torch._C.DispatchKey.ADInplaceOrView


def _inplace_or_view_on():
    """A dispatch mode's handler runs with every key above Python excluded, ADInplaceOrView among them: lift
    that one exclusion for the op's own call."""
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(),
                                           torch._C._dispatch_tls_local_exclude_set().remove(_ADINPLACEORVIEW))


# the `types` of an op's arguments -> all plain tensors (not a subclass). Tuples hold their classes strongly: the
# table is emptied when it outgrows _PLAIN_LIMIT, so classes made per step do not accumulate over a long run
_PLAIN: dict[tuple, bool] = {}
_PLAIN_LIMIT = 256

_INFRA_MODES = tuple(torch._C._TorchDispatchModeKey.__members__.values())


def _own_dispatch(cls: type) -> bool:
    """Whether a tensor subclass has a ``__torch_dispatch__`` of its own (UninitializedParameter, for one, has
    PyTorch's disabled default: deferring to it would leave the op with no handler)."""
    return getattr(cls, "__torch_dispatch__", torch._C._disabled_torch_dispatch_impl) is not \
        torch._C._disabled_torch_dispatch_impl


def _alone() -> bool:
    """Inside the handler: is this mode the only dispatch mode (no user mode below it, no fake/proxy/functional
    mode)? Only then may it return NotImplemented to defer to a subclass: with another mode active, that mode
    would have seen the op before the subclass (and a FakeTensor defers to its fake mode)."""
    return not torch._C._len_torch_dispatch_stack() and \
        all(torch._C._get_dispatch_mode(k) is None for k in _INFRA_MODES)


RECORDED = "recorded into a graph (make_fx, a fake mode)"
# (the wrappers replace torch.autograd.grad/backward; a name bound before the trace began, as `from torch.autograd
# import grad` at a module's top, calls PyTorch's own, which the engine hook hands to the trace: _session._UnseenReader)
UNSEEN = ("started where the trace could not see the call (TorchScript's builtin torch.autograd.grad/backward "
          "inside scripted code, or C++): take that gradient in Python")


_DETACH = torch.ops.aten.detach.default
_OVERLOAD = torch._ops.OpOverload
_FORWARD_AD = torch.autograd.forward_ad


class _Tracer(_ForwardOps, _BackwardOps, _Checks, _Roots, _Received, _Provenance, _GradientBirths, _LeafNames,
              _Incidents, _Met, _SavedMeets, _Flow, _KinkChecks, _Assembly, LeanDispatchMode):
    """The dispatch-mode recorder: sees every aten op and hands it to its parts (the bases before TorchDispatchMode)."""

    supports_higher_order_operators = True  # (torch.cond: its branches run under the trace, `subgraphs_under`)

    def __init__(self, sync_every: int):
        super().__init__()
        self.sync_every = sync_every
        self.thread = threading.get_ident()  # (an engine thread running its backward's nodes is another: in_pass)
        self.prov = _ByIdentity()  # non-finite tensor -> frozenset of _Birth / _Incident
        self.clean = _Cleanness()  # non-finite forward value -> whether its finite elements are of no NaN/Inf
        self.as_value = _ByIdentity()  # non-finite gradient used as a forward value -> its birth there
        self.backward_site = None  # (code, line) of the user's backward call (`_checking.roots`)
        self.hook: str | None = None  # the user's hook that runs the op being dug (`_Provenance._dig`)
        # id(incident) -> (incident, the birth standing for it): an incident born in the backward (no birth of its
        # own) whose gradient was used as a value, so that the root cause is that backward op
        self.backward_births: dict[int, tuple] = {}
        self.written = _ByIdentity()  # tensor an in-place op made non-finite -> (op, loc)
        # locs where an in-place op made a leaf requiring grad non-finite (an optimizer's update), and where it made
        # another finite tensor non-finite (clip_grad_norm_ scaling every gradient by a NaN total norm)
        self.param_writes: set = set()
        self.value_writes: set = set()
        self.sens = _ByIdentity()  # sensitivity-derived tensor -> seq of the node that made it
        # comparison result -> (mask of equal operands, branch picked): masks are large, so this one frees an
        # entry as soon as its tensor dies (_ByIdentity keeps dead values until its next purge)
        self.ties = WeakTensorKeyDictionary()
        # backward tensor -> (mask of its NaN/Inf still from upstream, the incident a structural zero made of the
        # rest, the upstream provenance) where strong zeros annihilated part of it (_SavedMeets._annihilated)
        self.split = WeakTensorKeyDictionary()
        # the sensitivity a selecting op's backward made (masked_fill's) -> where that op zeroes, whatever it was
        # given (``_BackwardOps._own_zeros``): which contaminated elements it discarded, and which an op before it
        self.own_zeros = WeakTensorKeyDictionary()
        # elementwise result of inputs with different provenance -> [(mask, births)]: which births are where
        # (pred - y: x's NaN row used, y's NaN padding discarded), so a finding names only the births of its elements
        self.parts = WeakTensorKeyDictionary()
        # a tensor whose births (several) are at every non-finite element alike (its parts became one: a row sum
        # of two NaN writes in a row): an incident meeting it names them all (_assembly._named)
        self.exact = WeakTensorKeyDictionary()
        self.formula_masks = WeakTensorKeyDictionary()  # comparison in a backward formula -> (op, args, kwargs)
        # node seq -> [g, the saved values its ops read (WholeFormula.reads)], from a whole formula's first op
        self.formula_g: dict[int, list] = {}
        self.names = _ByIdentity()
        self.recomputed_inputs = _ByIdentity()  # a reentrant checkpoint's detached inputs: no leaves of the user's
        self.derived = _ByIdentity()  # output of an op passed over unread -> weak references to its inputs
        self.batches = WeakTensorKeyDictionary()  # tensor -> index of the DataLoader batch it arrived in
        self.worker_cut = 0  # births made before the latest DataLoader worker processes started: the first this many
        # gw.watch()'s replay of a backward whose forward it did not trace: storage of a non-finite value the graph
        # saved -> its births, found in the forward's order (_replay.forward_origins); empty otherwise
        self.replayed: dict[int, frozenset] = {}
        self.replayed_graph = None  # that step's graph, matched to a later traced one for its lines (_replay_sites)
        self.replaying = False  # during that replay (a value of no known origin was made by the untraced forward)
        self.module_names = _ByIdentity()  # module -> {id(param): name}
        self.nodes: dict[int, _Node] = {}
        self.parents: dict = {}  # node seq -> seqs of the nodes whose sensitivities it consumed
        self.makers: set = set()  # seqs of nodes where strong zeros can start a structural zero (_Incidents)
        self.store = Store()  # births and incidents, interned per site (bounded over long runs)
        self.kinks: dict[tuple, _KinkGroup] = {}
        self.output_births: set = set()  # births that reached an output something was differentiated from
        self.pending: list = []
        self.root_outputs: list = []  # weak references to the outputs of the running backward
        self.finite_outputs: bool | None = True  # ... all finite (None: not read yet; see _Checks.outputs_finite)
        self.depth = 0
        self.backward_ended = False  # the next grad-enabled forward op starts a new step
        # between a backward and the next step: the leaves' gradients and what ops made of them alone, by id (held,
        # so that ids stay theirs), filled on demand (`_reads_gradients_only`)
        self.grad_reads: dict[int, torch.Tensor | weakref.ref] = {}
        self.passed: dict[str, list] = {}  # kind -> [ops run without reading them, the first op] (_trace_kinds)
        self.untraced: list[int] = []  # the store's serial at each backward call run without reading it
        self.unseen_task = -1  # the graph task of the last backward that no wrapped call started
        self.passed_calls = 0  # backward calls passed over running now (``passing``)
        self.provisional: list | None = None  # incidents of a plain pass gw.strong_zeros() may redo
        self.strong_ran = False
        self.reached_now: set = set()  # incidents that reached a gradient in this backward call (strong zeros)
        self.strong_reads: dict[tuple, int] = {}  # (birth, (node op, loc)) read in gw.strong_zeros()' passes
        self.strong_removed: set = set()  # births whose contamination gw.strong_zeros() annihilated
        # (node op, loc) -> how often gw.strong_zeros()' pass annihilated a NaN/Inf its backward made from finite values
        self.strong_made: dict[tuple, int] = {}
        self.n_fwd = self.n_bwd = 0
        self.last_seq = _get_sequence_nr()
        self.packed: tuple | None = None  # (number, ids of inputs) a pack hook's op saw (_ForwardOps)
        self.cloned: tuple | None = None  # (seq, id of the input) of the clone the last op made (_ForwardOps)
        self.collective_bufs: dict[int, tuple] = {}  # storage -> (weak ref, op, loc) of collectives' tensors
        self.collective_sites: dict[tuple, None] = {}  # (op, loc) of the collectives seen, in order
        self.collectives = 0  # collectives run so far (a backward that ran one may have received NaN/Inf)
        self.last_collective: tuple | None = None  # (op, loc) of the latest
        # step -> (op, loc, {leaf name: elements}, NaN seen, serial): gradients received through a collective
        self.receipts: dict[int, tuple] = {}
        self.receipts_checked: tuple | None = None  # (step, collectives) a backward's end checked for receipts
        # this step's forward met a NaN/Inf or a singular point: its backward runs a shadow strong-zero pass, whose
        # supports classify contamination and genuine (_shadow), held for one backward call (gw.strong_zeros()' own
        # pass is its own shadow: the shadow passes over its ops)
        self.dirty = False
        self.shadow: _Shadow | None = None
        self.triangles: _Shadow | None = None  # gw.strong_zeros()' own pass in an unused triangle (_BackwardOps)

    # -- dispatch --------------------------------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # (the common case in this frame: a Python call per op is ~1% of a small model's traced step)
        try:
            info = func._gradwise_trace_info  # (_INFO_ATTR)
        except AttributeError:
            if isinstance(func, torch._ops.HigherOrderOperator):
                return _higher_order(self, func, args, kwargs or {})
            info = _op_info(func)
        if not (info.composite and torch.is_inference_mode_enabled()) and not _common._profiler_on():
            return self._dispatch(func, info, types, args, kwargs or {})
        return self._handle(func, info, types, args, kwargs or {})

    def _handle(self, func, info, types, args, kwargs):
        composite = info.composite and torch.is_inference_mode_enabled()
        with contextlib.ExitStack() as stack:
            if _common._profiler_on():  # the trace's own ops stay out of the profiler's output
                stack.enter_context(_common.unprofiled())
            if composite:
                # Inference mode skips the autograd keys, so a composite op (view_as, reshape, flatten) reaches
                # this mode undecomposed, and its decomposition would run here below ADInplaceOrView: its views
                # would lose the view metadata (creation meta) and its in-place ops the version bump that plain
                # PyTorch gives them, and PyTorch's later errors ("a view was created in inference mode and is
                # being modified inplace") would not raise. Run it with ADInplaceOrView on again, as without it.
                stack.enter_context(_inplace_or_view_on())
            return self._dispatch(func, info, types, args, kwargs)

    def _dispatch(self, func, info, types, args, kwargs):
        if info.collective:
            return self._collective(func, args, kwargs)
        plain = _PLAIN.get(types)
        if plain is None:
            if len(_PLAIN) >= _PLAIN_LIMIT:
                _PLAIN.clear()
            plain = _PLAIN[types] = all(t in _kinds.PLAIN_TYPES for t in types)
        if not plain:
            return self._subclass_op(func, types, args, kwargs)
        if torch._C._len_torch_dispatch_stack() and recording():  # make_fx or a fake mode below: the trace's own
            # reads would be recorded into the user's graph (or refused: "get value out of a tracing tensor")
            self._pass_over(RECORDED, func)
            return _run(func, args, kwargs)
        # reductions of duals would build tangents. The level is one for the process: one that another thread's
        # nonsmooth passes opened makes none of this thread's tensors duals (all passed over: a trace left blind
        # while another thread differentiated, its NaN unexplained)
        if _FORWARD_AD._current_level >= 0 and (PASSES.depth or not PASSES.anywhere.is_set()):  # (forward_ad_active)
            self._pass_over("forward-AD dual", func)
            return _run(func, args, kwargs)
        if torch._C._are_functorch_transforms_active():  # vmap/grad (batched gradients): values are batched
            self._pass_over("functorch-transformed (vmap, batched gradient)", func)
            return _run(func, args, kwargs)
        node = torch._C._current_autograd_node()
        if (node is None and not self.depth) or _recomputing(node):
            return self._forward(func, info, args, kwargs)
        if not self.depth and not self.passed_calls and torch._C._current_graph_task_id() != self.unseen_task:
            # a backward no wrapped torch.autograd call started (TorchScript's builtin torch.autograd.grad): its
            # ops come through, but its gradients are never read, so nothing can be said to reach them
            self.unseen_task = torch._C._current_graph_task_id()
            self._pass_over_backward("a backward whose call the trace did not see", UNSEEN)
        if info.mutable and self.shadow is not None:  # (a NaN step's backward: see _shadow)
            self.shadow.before(func, args, kwargs)
        # a leaf's .grad that a backward adds to: read before add_ overwrites it (_Roots.stale_gradient); one the
        # trace made (or read once) is a sensitivity already: its NaN/Inf would have provenance
        if info.accumulates and node is not None and args[0] not in self.sens \
                and node._sequence_nr() == _common._ACCUMULATE_SEQ:
            self._safely(func, self.stale_gradient, node.variable, args[0])
        out = func._op(*args, **kwargs) if type(func) is _OVERLOAD and not _common._QUIET.on \
            else _run(func, args, kwargs)
        if func is _DETACH and node is not None and node.name() == "CheckpointFunctionBackward":
            # a reentrant checkpoint's detach_variable: the inputs its recomputation reads (no leaves of the
            # user's, whichever op reads them first: a nested checkpoint's forward reads them under no_grad)
            self.recomputed_inputs[out] = node
        self._backward(func, info, node, args, out, kwargs)
        return out

    def _subclass_op(self, func, types, args, kwargs):
        """An op on a tensor subclass: run, not read."""
        if any(t.__name__ == "DTensor" for t in types):
            return _run(func, args, kwargs)  # a check on a sharded DTensor would itself run collectives: not traced
        odd = [t for t in types if t not in _kinds.PLAIN_TYPES]
        # a tensor subclass (nested jagged, fake, ...): its own dispatch would see our reductions
        self._pass_over(f"tensor subclass {odd[0].__name__}", func)
        if _alone() and any(_own_dispatch(t) for t in odd):
            # no other mode would handle it first: let the subclass's __torch_dispatch__ run as without the
            # trace, with the mode stack as it is (its reentrant dispatch, enable_reentrant_dispatch, needs
            # it); the plain ops it runs inside are traced
            return NotImplemented
        return _run(func, args, kwargs)


def _higher_order(tr: _Tracer, func, args, kwargs):
    """A higher-order op (cond, map, while_loop) run with its subgraphs under the trace (`subgraphs_under`).
    Its forward outputs that no op under the trace made (map stacks its body's results outside the mode) hold
    what its subgraphs returned: their births, with its inputs'. A NaN born in map's body was told as data
    arriving non-finite (its birth not observed); every birth seen during the call named a NaN the body
    computed and discarded (review_tr34)."""
    returned: list = []
    out = subgraphs_under(tr, func, args, kwargs, returned.append)
    if tr.depth or (torch._C._len_torch_dispatch_stack() and recording()):
        return out
    made = None
    for o in _floats(out):
        if o in tr.prov or not _kinds.readable(o) or not _nonfinite(o):
            continue
        if made is None:
            made = frozenset().union(*(tr.prov.get(t, frozenset()) for r in returned
                                       for t in _tensors(r if isinstance(r, (list, tuple)) else (r,))),
                                     *(tr.prov.get(t, frozenset()) for t in _tensors(args)))
        if made:
            tr.prov[o] = made
    return out
