"""``_ForwardOps``: the part of the tracer that records a forward op (a new step, the node it made, its leaves'
names, a kink on its inputs, the NaN/Inf it made and their births), with node records bounded over long runs.

May import: torch, gradwise._trace._common, _kinds, _kinks, _parts.
"""

from __future__ import annotations

import functools
import sys
import weakref

import torch
from torch._C._autograd import _get_sequence_nr

from gradwise._trace import _common, _kinds
from gradwise._trace._common import (
    _floats,
    _grad,
    _loc,
    _Node,
    _recomputing,
    _tensors,
    _user_frame,
    nonfinite_number,
)
from gradwise._trace._common import run_op as _run
from gradwise._trace._kinks import _Call
from gradwise._trace._parts import held_before

_CLONE = torch.ops.aten.clone.default
_OVERLOAD = torch._ops.OpOverload


class _ForwardOps:
    """Forward ops as the trace records them (a part of _Tracer)."""

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
        claimed = False
        if self.packed is not None and seq == self.packed[0] == self.last_seq and torch.is_grad_enabled():
            if any(id(t) in self.packed[1] for t in _tensors(args)):
                creates_node = claimed = True  # (the op whose pack hook ran ops: below)
        elif seq == self.last_seq and self.packed is not None and seq == self.packed[0]:
            self.packed[1].update(id(t) for t in _tensors(args))  # (save_on_cpu: empty, then copy_ of the tensor)
        elif seq != self.last_seq and not creates_node and _in_pack_hook():
            # a saved_tensors_hooks pack hook (save_on_cpu's copy, an offload's clone) runs its ops under no_grad
            # after autograd numbered the op's node and before the op, which saves the tensor they read, reaches
            # here: that op made the node. Taken as a custom Function's number, logcumsumexp's node had no record,
            # and its padding rows beside a used NaN were a genuine finding of 8 elements
            self.packed = (seq, {id(t) for t in _tensors(args)})
        self.last_seq = seq
        cloned, self.cloned = self.cloned, None
        if cloned is not None and not torch.is_grad_enabled() and _in_pack_hook():
            # a pack hook's copy of the clone autograd saves for an in-place op (abs_, clamp_), which follows: it
            # then found no clone, had no record, and its kink went unreported
            self.cloned = cloned
        if not creates_node and info.uninitialised:
            return _run(func, args, kwargs)  # empty & co: no values, nothing to record
        # (a finite-preserving op given a NaN/Inf number, clamp(x, max=nan), makes NaN/Inf: checked)
        keeps = (info.keeps and nonfinite_number(args) is None) or (info.cast and info.widens(args, kwargs))
        ins = _tensors(args)
        if not creates_node and keeps and not info.mutable and not self.pending \
                and not ((self.prov or self.replayed) and self._known(ins)):
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
        # an in-place op whose derivative reads the original input (clamp_, abs_, hardtanh_, nan_to_num_): autograd
        # numbers its node, then clones the input with grad on, so the clone seems to make the node: the in-place
        # op that follows a clone of its own input at the same number made node seq - 2
        inplace = not creates_node and info.mutable and torch.is_grad_enabled() and any(t.requires_grad for t in ins)
        if creates_node or inplace:
            new = [t for t in ins if t.is_leaf and t.requires_grad and t not in self.names]
            node = torch._C._current_autograd_node() if new and self.depth else None
            if _recomputing(node):
                self._recomputed_inputs(node, new)
            if new:
                self._name_leaves(new, frame, loc)
            if det is not None and not det.needs_out:
                hit = self._safely(func, det.fn, _Call(args, kwargs, None, info.packet_name, self.ties))
        # (what an in-place elementwise op's input held, where it is non-finite: an input of its NaN/Inf)
        old = held_before(self, func, args) if info.mutable and self.prov else None
        # (run_op inlined, and OpOverload.__call__ skipped: two Python calls less on every recorded op)
        out = func._op(*args, **kwargs) if type(func) is _OVERLOAD and not _common._QUIET.on \
            else _run(func, args, kwargs)
        if claimed:  # (one with no float output, argmax, x > 0, made no node)
            creates_node = bool(_floats(out, empty=True))
            self.packed = None if creates_node else self.packed
        if inplace and cloned == (seq, id(args[0])) and seq - 2 not in self.nodes:
            creates_node, seq = True, seq - 1  # (its node is seq - 2; the clone's, seq - 1)
        elif creates_node and func is _CLONE and ins:
            self.cloned = (seq, id(ins[0]))
        if creates_node:
            nd = self.nodes[seq - 1] = _Node(info.op_name, loc)
            if len(self.nodes) > _common._MAX_NODES:
                self._forget_oldest_nodes()
            if det is not None and det.needs_out:
                hit = self._safely(func, det.fn, _Call(args, kwargs, out, info.packet_name, self.ties))
            if hit is not None and hit.found is not False:  # (False: decided on the host, no kink here)
                self._safely(func, self._schedule_kink, hit, func, loc, nd)
        elif info.compare and len(ins) and any(t.requires_grad for t in ins):
            a, b = args[0], args[1]
            self.ties[out] = (a == b, info.compare)
        outs = _floats(out)
        if info.mutable and not outs:
            outs = _floats(args[0])
        if not outs or info.uninitialised or (keeps and not self.pending
                                              and not ((self.prov or self.replayed) and self._known(ins))):
            if outs and ins and not info.uninitialised and any(map(self._from_data, ins)):
                self._derive(outs, ins, loc)
            return out  # finite in, finite out: nothing to check (provenance is up to date when nothing is pending)
        if info.foreach:
            self._check(outs, lambda bad: self._dig_foreach(func, loc, args, out, bad, info))
        else:
            made = nd if creates_node else None
            self._check(outs, lambda bad: self._dig(func, loc, ins, bad, None, info, args=args, made=made,
                                                         kwargs=kwargs, out=out, old=old))
        return out

    def _recomputed_inputs(self, node, new) -> None:
        """Of the leaves a reentrant checkpoint's recomputed forward reads first, its own detached inputs (they
        share the storage of what its node saved; the parameters it reads are the user's): their .grad is its
        inner backward's, which its node hands on, so they are no leaves of the user's."""
        try:
            saved = {t.data_ptr() for t in node.saved_tensors if isinstance(t, torch.Tensor)}
        except RuntimeError:  # (freed: nothing to tell apart)
            return
        for t in new:
            if t.data_ptr() in saved:
                self.recomputed_inputs[t] = node

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


def _in_pack_hook() -> bool:
    """Whether an op runs inside the pack hook of the saved_tensors_hooks active now (its code on the stack; a
    custom Function's forward, whose ops also see a new node number under no_grad, runs outside it)."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    pack = hooks[0] if hooks is not None else None
    while isinstance(pack, functools.partial):  # (its frame is the function's: partial itself has none)
        pack = pack.func
    code = getattr(pack, "__code__", None)
    if code is None and callable(pack) and not isinstance(pack, type):  # (an object with a Python __call__)
        code = getattr(type(pack).__call__, "__code__", None)
    frame = sys._getframe(1) if code is not None else None
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False
