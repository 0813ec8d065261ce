"""``_BackwardOps``: the part of the tracer that records a backward op (which tensors are sensitivities and the
node that made them, the nodes whose zeros may be structural, accumulation into leaves, gw.strong_zeros()' pass
beside it, the NaN/Inf it made), and what gw.strong_zeros() undid of a plain pass.

May import: torch, gradwise._strong_zeros, gradwise._trace._common, _facts, _shadow, _store.
"""

from __future__ import annotations

from threading import get_ident

import torch

from gradwise import _strong_zeros
from gradwise._strong_zeros import _unused
from gradwise._strong_zeros._triangles import TRIANGLE_READERS
from gradwise._trace._common import _ACCUMULATE_SEQ, _floats, _Node, _tensors
from gradwise._trace._facts import _SELECTING_DISCARDS, DECLARED, _discard_key
from gradwise._trace._shadow import _NAN_DISCARD_NODES, _Shadow

_FORMULA_FIRST = {w.first for w in _strong_zeros.WHOLE_FORMULAS.values()}
_FORMULA_READS = {op for w in _strong_zeros.WHOLE_FORMULAS.values() for op, _ in w.reads}
# zeros the engine makes outside any node (for an unused output's gradient): structural, as strong zeros take them
_ZEROS = {torch.ops.aten.zeros, torch.ops.aten.zeros_like, torch.ops.aten.new_zeros}
_ENGINE_ZEROS = -1


def _declared_node(node, at: tuple) -> _Node | None:
    """The record of gw.mark_unused's backward node: the op that discarded the declared elements (``DECLARED``,
    a ``_DISCARDS`` entry), at the line that declared them (``at`` where it is not known); None for others."""
    if node.name() != _unused.NODE_NAME:
        return None
    return _Node(DECLARED, getattr(node, "declared_at", at))


class _BackwardOps:
    """Backward ops as the trace records them (a part of _Tracer)."""

    def _backward(self, func, info, node, args, out, kwargs=None):
        self.n_bwd += 1
        if info.mask and node is not None:  # for a rerun under the strong-zero rules (_Flow._strong_rerun)
            self.formula_masks[out] = (func, args, kwargs, out._version)
        seq = node._sequence_nr() if node is not None else None
        ins = _tensors(args)
        found = self.sens.found(ins)  # (input, seq of the node that made it) for the sensitivities among ins
        every = _floats(out, empty=True)  # (an empty one too carries the flow: the expand of a sum over no element)
        outs = every if len(every) == 1 and every[0].numel() else [o for o in every if o.numel()]
        if info.mutable and not outs:
            outs = _floats(args[0])
        if node is None or found:  # outside any node (root grads, accumulation) every tensor is a sensitivity
            made = _ENGINE_ZEROS if node is None and func.overloadpacket in _ZEROS else seq
            for o in every:
                self.sens[o] = made
                if info.mutable and o._base is not None:  # a formula writing g into a view of a buffer it made
                    self.sens[o._base] = made  # (pack_padded_sequence's backward: zeros, then copy_ per step)
            if info.formula_first and seq is not None:  # a whole formula's g, for its last op (_Incidents)
                whole = _strong_zeros.WHOLE_FORMULAS.get(getattr(self.nodes.get(seq), "op", None))
                if whole is not None and func is whole.first and args[0].is_floating_point():
                    self.formula_g[seq] = [args[0], [None] * len(whole.reads)]
            if info.formula_read and seq in self.formula_g:
                self._formula_read(func, args, seq)
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
                        self._kink_reached(nd, seq, [t for t, _ in found], node)
                    if nd is not None and nd.born:
                        self._born_reached(nd, seq, [t for t, _ in found])
            if seq is not None and self.shadow is not None and self.shadow.valid and seq in self.makers:
                self._own_zeros(func, info, seq, found, args, kwargs, every)
            sens = True
        else:
            sens = False
        if self.shadow is not None and self.shadow.valid:  # the strong-zero pass beside this one (_shadow): only
            self.shadow.run(func, args, kwargs, out, self._safely(func, self.outputs_finite))  # where a NaN may come
        elif node is not None:
            name = type(node).__name__
            if name in TRIANGLE_READERS and not torch.is_grad_enabled():
                # no shadow (a forward that met no NaN/Inf but data that arrived so) or gw.strong_zeros()' own pass:
                # the ops of a node whose formula reads an unused triangle are followed beside it
                # (_Shadow.unused_triangle)
                self._beside().run(func, args, kwargs, out, True)
            elif self.triangles is not None or name in _NAN_DISCARD_NODES:
                # no valid shadow: fmax/fmin's sensitivity to a NaN operand they ignore (_Shadow.follow_discard)
                self._beside().follow_discard(node, func, args, kwargs, out, self.outputs_finite)
        # gw.strong_zeros()' pass: a rule that reads a non-finite value handles it
        if _strong_zeros._STATE.in_mode or (self.thread != get_ident() and _strong_zeros.in_pass()):
            self.strong_ran = True
            if seq is not None and _strong_zeros.lookup(func) is not None:
                self._strong_read(seq, ins, func, args, kwargs, out)
        if not outs or info.uninitialised or (
                (info.keeps or (info.cast and info.widens(args, kwargs))) and not self.pending
                and not ((self.prov or self.replayed) and self._known(ins))):
            return
        self._check(outs, lambda bad: self._dig(func, None, ins, bad, seq if sens else (seq, "value"), info,
                                                args=args, out=out, kwargs=kwargs))
        if seq == _ACCUMULATE_SEQ and found and info.mutable:  # a post-accumulate-grad hook wrote the .grad in
            self._accumulate(node, outs)  # place after the accumulation: what it made reaches that leaf too

    def _formula_read(self, func, args, seq) -> None:
        """Keep the saved value a whole formula's op (``WholeFormula.reads``) receives, for its last op: read from
        the node again, it ran a user's unpack hook once more (a checkpoint's raised)."""
        whole = _strong_zeros.WHOLE_FORMULAS[self.nodes[seq].op]
        saved = self.formula_g[seq][1]
        for i, (op, at) in enumerate(whole.reads):
            if func is op and saved[i] is None and len(args) > at and isinstance(args[at], torch.Tensor):
                saved[i] = args[at]
                return

    def _beside(self) -> _Shadow:
        """The shadow followed beside a backward without a valid one of its own (``triangles``), made when first
        needed."""
        if self.triangles is None:
            self.triangles = _Shadow(triangles_only=True)
        return self.triangles

    def _own_zeros(self, func, info, seq, found, args, kwargs, every) -> None:
        """Where the backward op of a selecting node (``_DISCARDS``: masked_fill, where, index...; not the elementwise
        ones) zeroes its output whatever sensitivity it is given: the op run once more with ones for the incoming
        sensitivity of its output's shape (``own_zeros``). Only the nearest discarding op upstream was named: a
        slice's dropped rows were "unused since" a masked_fill after it in the backward that zeroed one column."""
        nd = self.nodes.get(seq)
        key = _discard_key(nd.op) if nd is not None else None
        if key not in _SELECTING_DISCARDS or info.mutable or len(every) != 1:
            return
        o = every[0]
        src = next((t for t, p in found if p != seq and t.shape == o.shape and t.dtype == o.dtype), None)
        if src is None or not any(a is src for a in args):
            return
        try:
            with torch.no_grad():
                ones = func(*[torch.ones_like(src) if a is src else a for a in args], **(kwargs or {}))
        except Exception:  # an explanation must never break the program it explains
            return
        if isinstance(ones, torch.Tensor) and ones.shape == o.shape:
            self.own_zeros[o] = ones == 0

    def _kept_by_strong_zeros(self, inc, n) -> None:
        """Contamination gw.strong_zeros()' pass met and that still reached a gradient: strong zeros kept it, so
        the zero there was one the program computed (sigmoid(-inf) beside a slice's zeros: the trace keeps no
        supports and took it for the slice's). Genuine, as gw.grad's gradient says."""
        # (a zero sensitivity met NaN or Inf: 0 x NaN and 0 x Inf are NaN, whichever birth it met; an Inf birth
        # of data arriving with NaN and Inf both, `_input_births`, was told "genuine Inf")
        what = (f"{inc.what}; gw.strong_zeros() kept it: the zero sensitivity there is one the program computed "
                "(no op that discards values made it), 0 x NaN = NaN")
        new = self.store.incident("nan", inc.op, inc.node_op, inc.loc, n, inc.indices,
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
