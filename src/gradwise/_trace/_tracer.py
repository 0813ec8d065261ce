"""``_Tracer``, the TorchDispatchMode that sees every aten op of a forward and backward pass and hands it to
its parts (``_Checks``, ``_Received``, ``_Provenance``, ``_LeafNames``, ``_Incidents``, ``_SavedMeets``, ``_Flow``,
``_KinkChecks``, ``_Assembly``), and ``_op_info``, the per-op facts it caches.

May import: torch, gradwise._modes, gradwise._ops, gradwise._strong_zeros, every module of gradwise._trace above
_session.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch
from torch._C._autograd import _get_sequence_nr
from torch.utils.weak import WeakTensorKeyDictionary

from gradwise import _strong_zeros
from gradwise._modes import LeanDispatchMode
from gradwise._ops._zeros import ops_of_kind
from gradwise._strong_zeros import _unused
from gradwise._strong_zeros._traced import recording
from gradwise._trace import _common, _kinds
from gradwise._trace._assembly import _Assembly
from gradwise._trace._checking import _Checks
from gradwise._trace._common import (
    _ACCUMULATE_SEQ,
    _ByIdentity,
    _floats,
    _grad,
    _KinkGroup,
    _loc,
    _Node,
    _op_name,
    _tensors,
    _user_frame,
)
from gradwise._trace._common import run_op as _run
from gradwise._trace._facts import (
    _ARRIVALS,
    _COLLECTIVE_NAMESPACES,
    _COMPARISONS,
    _FINITE_PRESERVING,
    _LITERALS,
    _UNINITIALISED,
    DECLARED,
)
from gradwise._trace._flow import _Flow
from gradwise._trace._incidents import _Incidents
from gradwise._trace._kink_checks import _KinkChecks
from gradwise._trace._kinks import _Call, _Detector, kink_detector
from gradwise._trace._leaf_names import _LeafNames
from gradwise._trace._provenance import _Provenance
from gradwise._trace._received import _Received
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

    def widens(self, args: tuple, kwargs: dict) -> bool:
        """A cast that cannot overflow: not to a dtype with a smaller range (float32 -> float16 overflows above
        65504)."""
        dtype, x = kwargs.get("dtype"), args[0] if args else None
        return dtype is None or not isinstance(x, torch.Tensor) or not x.is_floating_point() \
            or not dtype.is_floating_point or torch.finfo(dtype).max >= torch.finfo(x.dtype).max


_INFO: dict = {}
_FORMULA_FIRST = {w.first for w in _strong_zeros.WHOLE_FORMULAS.values()}
# zeros the engine makes outside any node (for an unused output's gradient): structural, as strong zeros take them
_ZEROS = {torch.ops.aten.zeros, torch.ops.aten.zeros_like, torch.ops.aten.new_zeros}
_ENGINE_ZEROS = -1
_MASKS = set(ops_of_kind("compares"))  # (the shared facts: what makes a selection mask in a backward formula)


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
            foreach=packet.__name__.startswith("_foreach_"))
    return info


def _composite(func) -> bool:
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    try:
        return has(func.name(), "CompositeImplicitAutograd") and not has(func.name(), "ADInplaceOrView")
    except RuntimeError:  # an op the dispatcher has no entry for (sym_size.default, which NJT calls)
        return False


_ADINPLACEORVIEW = torch._C.DispatchKey.ADInplaceOrView


def _inplace_or_view_on():
    """A dispatch mode's handler runs with every key above Python excluded, ADInplaceOrView among them: lift
    that one exclusion for the op's own call."""
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(),
                                           torch._C._dispatch_tls_local_exclude_set().remove(_ADINPLACEORVIEW))


_PLAIN: dict[tuple, bool] = {}  # the `types` of an op's arguments -> all plain tensors (not a subclass)

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


def _declared_node(node, at: tuple) -> _Node | None:
    """The record of gw.mark_unused's backward node: the op that discarded the declared elements (``DECLARED``,
    a ``_DISCARDS`` entry), at the line that declared them (``at`` where it is not known); None for others."""
    if node.name() != _unused.NODE_NAME:
        return None
    return _Node(DECLARED, getattr(node, "declared_at", at))


RECORDED = "recorded into a graph (make_fx, a fake mode)"
UNSEEN = "started by TorchScript or C++ (not through torch.autograd's Python API)"


class _Tracer(_Checks, _Received, _Provenance, _LeafNames, _Incidents, _SavedMeets, _Flow, _KinkChecks, _Assembly,
              LeanDispatchMode):
    """The dispatch-mode recorder: sees every aten op and hands it to its parts (the bases before TorchDispatchMode)."""

    def __init__(self, sync_every: int):
        super().__init__()
        self.sync_every = sync_every
        self.prov = _ByIdentity()  # non-finite tensor -> frozenset of _Birth / _Incident
        self.as_value = _ByIdentity()  # non-finite gradient used as a forward value -> its birth there
        self.backward_site = None  # (code, line) of the user's backward call (`_checking.roots`)
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
        # elementwise result of inputs with different provenance -> [(mask, births)]: which births are where
        # (pred - y: x's NaN row used, y's NaN padding discarded), so a finding names only the births of its elements
        self.parts = WeakTensorKeyDictionary()
        self.formula_masks = WeakTensorKeyDictionary()  # comparison in a backward formula -> (op, args, kwargs)
        self.formula_g: dict[int, torch.Tensor] = {}  # node seq -> g, at a whole formula's first op
        self.names = _ByIdentity()
        self.derived = _ByIdentity()  # output of an op passed over unread -> weak references to its inputs
        self.batches = WeakTensorKeyDictionary()  # tensor -> index of the DataLoader batch it arrived in
        # gw.watch()'s replay of a backward whose forward it did not trace: storage of a non-finite value the graph
        # saved -> its births, found in the forward's order (_replay.forward_origins); empty otherwise
        self.replayed: dict[int, frozenset] = {}
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
        self.collective_bufs: dict[int, tuple] = {}  # storage -> (weak ref, op, loc) of collectives' tensors
        self.collective_sites: dict[tuple, None] = {}  # (op, loc) of the collectives seen, in order
        self.collectives = 0  # collectives run so far (a backward that ran one may have received NaN/Inf)
        self.last_collective: tuple | None = None  # (op, loc) of the latest
        # step -> (op, loc, {leaf name: elements}, NaN seen, serial): gradients received through a collective
        self.receipts: dict[int, tuple] = {}
        # this step's forward met a NaN/Inf or a singular point: its backward runs a shadow strong-zero pass, whose
        # supports classify contamination and genuine (_shadow), held for one backward call (gw.strong_zeros()' own
        # pass is its own shadow: the shadow passes over its ops)
        self.dirty = False
        self.shadow: _Shadow | None = None

    # -- dispatch --------------------------------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self._handle(func, types, args, kwargs or {})

    def _handle(self, func, types, args, kwargs):
        info = _INFO.get(func) or _op_info(func)
        composite = info.composite and torch.is_inference_mode_enabled()
        if not composite and not _common._profiler_on():
            return self._dispatch(func, info, types, args, kwargs)
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
            plain = _PLAIN[types] = all(t in _kinds.PLAIN_TYPES for t in types)
        if not plain:
            return self._subclass_op(func, types, args, kwargs)
        if torch._C._len_torch_dispatch_stack() and recording():  # make_fx or a fake mode below: the trace's own
            # reads would be recorded into the user's graph (or refused: "get value out of a tracing tensor")
            self._pass_over(RECORDED, func)
            return _run(func, args, kwargs)
        if _kinds.forward_ad_active():  # reductions of duals would build tangents
            self._pass_over("forward-AD dual", func)
            return _run(func, args, kwargs)
        if torch._C._are_functorch_transforms_active():  # vmap/grad (batched gradients): values are batched
            self._pass_over("functorch-transformed (vmap, batched gradient)", func)
            return _run(func, args, kwargs)
        node = torch._C._current_autograd_node()
        if node is None and not self.depth:
            return self._forward(func, info, args, kwargs)
        if not self.depth and not self.passed_calls and torch._C._current_graph_task_id() != self.unseen_task:
            # a backward no wrapped torch.autograd call started (TorchScript's builtin torch.autograd.grad): its
            # ops come through, but its gradients are never read, so nothing can be said to reach them
            self.unseen_task = torch._C._current_graph_task_id()
            self._pass_over_backward("a backward started outside Python", UNSEEN)
        if info.mutable and self.shadow is not None:  # (a NaN step's backward: see _shadow)
            self.shadow.before(func, args, kwargs)
        out = _run(func, args, kwargs)
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

    def _forward(self, func, info, args, kwargs):
        self.n_fwd += 1
        # a new step: the first aten op with grad enabled after a backward (optimizers run theirs under no_grad),
        # unless it only reads the gradients (their norm, to log it: run as is, its outputs read the same way)
        if self.backward_ended and func.namespace == "aten" and torch.is_grad_enabled():
            if not info.mutable and self._reads_gradients_only(args, kwargs):
                out = _run(func, args, kwargs)
                self.grad_reads.update((id(t), t) for t in _tensors((out,)))
                return out
            self.backward_ended = False
            self.grad_reads.clear()
            self.store.step += 1
            self.dirty = False
        seq = _get_sequence_nr()
        # this op made autograd node seq - 1: it is differentiated. A custom Function takes its number before its
        # forward runs (under no_grad): the first op inside it did not make that node
        creates_node = seq != self.last_seq and torch.is_grad_enabled()
        self.last_seq = seq
        if not creates_node and info.uninitialised:
            return _run(func, args, kwargs)  # empty & co: no values, nothing to record
        keeps = info.keeps or (info.cast and info.widens(args, kwargs))
        ins = _tensors(args)
        if not creates_node and keeps and not info.mutable and not self.pending \
                and not any(t in self.prov for t in ins):
            out = _run(func, args, kwargs)  # undifferentiated, finite in and out (detach, ones_like): no record
            if ins and any(map(self._from_data, ins)):
                self._derive(out, ins, _loc(_user_frame()))
            return out
        frame = _user_frame()
        loc = _loc(frame)
        det = info.detector
        if det is not None and not all(_kinds.readable(t) for t in ins):
            det = None  # a ZeroTensor/meta/sparse input: no values to test for a kink
        hit = None
        if creates_node:
            new = [t for t in ins if t.is_leaf and t.requires_grad and t not in self.names]
            if new:
                self._name_leaves(new, frame, loc)
            if det is not None and not det.needs_out:
                hit = self._safely(func, det.fn, _Call(args, kwargs, None, info.packet_name, self.ties))
        out = _run(func, args, kwargs)
        if creates_node:
            nd = self.nodes[seq - 1] = _Node(info.op_name, loc)
            if len(self.nodes) > _common._MAX_NODES:
                self._forget_oldest_nodes()
            if det is not None and det.needs_out:
                hit = self._safely(func, det.fn, _Call(args, kwargs, out, info.packet_name, self.ties))
            if hit is not None:
                self._safely(func, self._schedule_kink, hit, func, loc, nd)
        elif info.compare and len(ins) and any(t.requires_grad for t in ins):
            a, b = args[0], args[1]
            self.ties[out] = (a == b, info.compare)
        outs = _floats(out)
        if info.mutable and not outs:
            outs = _floats(args[0])
        if not outs or info.uninitialised or (keeps and not self.pending and not any(t in self.prov for t in ins)):
            if outs and ins and not info.uninitialised and any(map(self._from_data, ins)):
                self._derive(outs, ins, loc)
            return out  # finite in, finite out: nothing to check (provenance is up to date when nothing is pending)
        if info.foreach:
            self._check(outs, lambda bad: self._dig_foreach(func, loc, args, out, bad, info))
        else:
            self._check(outs, lambda bad: self._dig(func, loc, ins, bad, None, info, args=args))
        return out

    def _dig_foreach(self, func, loc, args, out, bad, info) -> None:
        """A foreach op is one op per list position: output i reads position i of each list argument and the
        tensors all share (clip_grad_norm_'s scale). With the whole lists as inputs, a finite gradient scaled by
        a NaN took its provenance from its neighbours, one of them not yet dug: 'tensor[2] arrived non-finite'."""
        full = out if isinstance(out, (list, tuple)) else args[0]  # (an in-place foreach op returns None)
        shared = [a for a in args if isinstance(a, torch.Tensor)]
        for o in bad:
            i = next((i for i, t in enumerate(full) if t is o), None)
            ins = list(shared)
            if i is not None:
                ins += [a[i] for a in args if isinstance(a, (list, tuple)) and len(a) == len(full)
                        and isinstance(a[i], torch.Tensor)]
            self._dig(func, loc, ins if i is not None else _tensors(args), [o], None, info)

    def _reads_gradients_only(self, args, kwargs) -> bool:
        """Whether the op is bookkeeping on what the backward left: every tensor argument is a leaf's gradient (or a
        view of one), an output the backward differentiated (Lightning detaches the loss after its backward, in
        grad mode, before the optimizer steps), or made from those alone since the backward ended; or at least one
        is, and none requires grad (a running loss: Hugging Face's ``tr_loss + loss.detach()`` adds it to a
        tensor of earlier steps; the next step's forward reads parameters, which require grad)."""
        ts = _tensors(args) + _tensors(list(kwargs.values()))
        if not ts:
            return False
        if not self.grad_reads:
            self.grad_reads.update((id(g), g) for leaf, _ in self.names.items()
                                   if isinstance(g := _grad(leaf), torch.Tensor))
            # (weakly: the outputs hold their graph, which must die with them, as it does without the trace)
            self.grad_reads.update((id(o), weakref.ref(o)) for r in self.root_outputs if (o := r()) is not None)
        reads = [self._read_of(t) or (t._base is not None and self._read_of(t._base)) for t in ts]
        return all(reads) or (any(reads) and not any(t.requires_grad for t in ts))

    def _read_of(self, t: torch.Tensor) -> bool:
        held = self.grad_reads.get(id(t))
        return held is t or (isinstance(held, weakref.ref) and held() is t)

    def _forget_oldest_nodes(self) -> None:
        """Keep the newest half of the node records (and their sensitivity links): memory stays bounded over
        long runs; a backward reaches nodes of its own step, which are the newest."""
        keep = list(self.nodes)[_common._MAX_NODES // 2 :]
        self.nodes = {k: self.nodes[k] for k in keep}
        oldest = keep[0] if keep else 0
        self.parents = {k: v for k, v in self.parents.items() if k is None or k >= oldest}
        self.makers = {k for k in self.makers if k >= oldest}

    def _backward(self, func, info, node, args, out, kwargs=None):
        self.n_bwd += 1
        if info.mask and node is not None:  # for a rerun under the strong-zero rules (_Flow._strong_rerun)
            self.formula_masks[out] = (func, args, kwargs, out._version)
        seq = node._sequence_nr() if node is not None else None
        ins = _tensors(args)
        found = self.sens.found(ins)  # (input, seq of the node that made it) for the sensitivities among ins
        outs = _floats(out)
        if info.mutable and not outs:
            outs = _floats(args[0])
        if node is None or found:  # outside any node (root grads, accumulation) every tensor is a sensitivity
            made = _ENGINE_ZEROS if node is None and func.overloadpacket in _ZEROS else seq
            for o in outs:
                self.sens[o] = made
            if func in _FORMULA_FIRST and seq is not None:  # a whole formula's g, for its last op (_Incidents)
                whole = _strong_zeros.WHOLE_FORMULAS.get(getattr(self.nodes.get(seq), "op", None))
                if whole is not None and func is whole.first and args[0].is_floating_point():
                    self.formula_g[seq] = args[0]
            if seq is not None:
                ps = self.parents.get(seq)
                if ps is None:
                    ps = self.parents[seq] = set()
                    if _strong_zeros.may_make_structural_zeros(node):  # (node types: one lookup each)
                        self.makers.add(seq)
                for _, p in found:
                    if p is not None and p != seq:
                        ps.add(p)
                if seq == _ACCUMULATE_SEQ:
                    self._accumulate(node, [t for t, _ in found])
                elif seq not in self.nodes and (declared := _declared_node(node, ("<unknown>", 0))) is not None:
                    self.nodes[seq] = declared
                elif seq not in self.nodes and seq - 1 in self.nodes and type(node).__name__ == "CopySlices":
                    # an in-place op on a view: autograd wraps the op's node (seq - 1, the one the forward saw)
                    # in CopySlices after the op returned, with the next number
                    self.nodes[seq] = self.nodes[seq - 1]
                else:
                    nd = self.nodes.get(seq)
                    if nd is not None and nd.kinks:
                        self._kink_reached(nd, seq, [t for t, _ in found])
            sens = True
        else:
            sens = False
        if self.shadow is not None and self.shadow.valid:  # the strong-zero pass beside this one (_shadow): only
            self.shadow.run(func, args, kwargs, out, self._safely(func, self.outputs_finite))  # where a NaN may come
        # gw.strong_zeros()' pass: a rule that reads a non-finite value handles it
        if _strong_zeros._STATE.in_mode:
            self.strong_ran = True
            if seq is not None and _strong_zeros.lookup(func) is not None:
                self._strong_read(seq, ins, func, args, kwargs, out)
        if not outs or info.uninitialised or ((info.keeps or (info.cast and info.widens(args, kwargs)))
                                               and not self.pending and not any(t in self.prov for t in ins)):
            return
        self._check(outs, lambda bad: self._dig(func, None, ins, bad, seq if sens else (seq, "value"), info,
                                                args=args, out=out, kwargs=kwargs))

    def _kept_by_strong_zeros(self, inc, n) -> None:
        """Contamination gw.strong_zeros()' pass met and that still reached a gradient: strong zeros kept it, so
        the zero there was one the program computed (sigmoid(-inf) beside a slice's zeros: the trace keeps no
        supports and took it for the slice's). Genuine, as gw.grad's gradient says."""
        nan = any(b.nan for b in inc.births) if inc.births else True
        what = (f"{inc.what}; gw.strong_zeros() kept it: the zero sensitivity there is one the program computed "
                "(no op that discards values made it), 0 x NaN = NaN")
        new = self.store.incident("nan" if nan else "inf", inc.op, inc.node_op, inc.loc, n, inc.indices,
                                  inc.births, what, None, inc.undecided)
        new.reaches |= inc.reaches
        for b in inc.births:
            b.used = True
        inc.count -= n
        inc.occurrences -= 1
        if inc.occurrences <= 0:
            self.store.incidents = {k: v for k, v in self.store.incidents.items() if v is not inc}

    def drop_provisional(self) -> None:
        """Under gw.strong_zeros(), take back what strong zeros undid: the incidents of a plain pass that the
        engine hook then redid with strong zeros (the strong pass records what remains), and contamination
        the strong pass itself met but annihilated in place (a rule's masked_fill_), which reached no gradient.
        Their births are listed as removed, unless another incident names them."""
        for inc, n, nd, strong in self.provisional:
            if strong and inc.kind == "contamination" and id(inc) in self.reached_now:
                self._kept_by_strong_zeros(inc, n)
                continue
            if strong and inc.kind != "contamination":
                continue
            if not strong and not self.strong_ran:
                continue
            inc.count -= n
            inc.occurrences -= 1
            if inc.occurrences <= 0:
                self.store.incidents = {k: v for k, v in self.store.incidents.items() if v is not inc}
            site = (nd.op, nd.loc) if nd is not None else (inc.node_op, inc.loc)
            for b in inc.births:
                self.strong_reads[(b, site)] = self.strong_reads.get((b, site), 0) + 1
                if inc.kind == "contamination":  # removed, even where a genuine finding names the birth too
                    self.strong_removed.add(b)
        self.provisional = None
