"""``_Incidents``: the part of the tracer that, in the backward, finds where a sensitivity meets a NaN/Inf
and classifies it: contamination (the sensitivity is a structural zero there) or genuine. Where the tracer runs a
shadow strong pass (``_shadow``: the step's forward met a NaN/Inf or a singular point) the shadow decides, by the
strong-zero rules' supports; elsewhere value heuristics do, rerunning an op under the strong-zero rules where they
cannot tell otherwise (``_Flow._strong_rerun``).

May import: torch, gradwise._strong_zeros, gradwise._masks, gradwise._trace._common, _advice, _facts, _flow,
_met, _shadow_reads, _store.
"""

from __future__ import annotations

import torch

from gradwise import _strong_zeros
from gradwise._masks import mask_any
from gradwise._trace import _shadow_reads
from gradwise._trace._advice import number_passed
from gradwise._trace._common import _nan_in, _op_name, _positions, aten, nonfinite_number
from gradwise._trace._facts import _BILINEAR, _OVERFLOWS, _TIES_COUNTED, BACKWARD_OVERFLOW
from gradwise._trace._flow import _pairs, _reruns
from gradwise._trace._met import _elementwise
from gradwise._trace._store import Incident as _Incident


class _Incidents:
    """Where a sensitivity meets a NaN/Inf in the backward, and whether it is contamination (a part of _Tracer)."""

    def _meet(self, func, loc, o, mask, ins, nf, nd, seq, args, out, kwargs=None) -> None:
        """A sensitivity op made non-finite elements: propagate them, or classify where they are born."""
        sens_ins = [t for t in ins if t in self.sens]
        upstream = [t for t in nf if t in self.sens]
        if not upstream:
            incidents, contaminated = self._classify(func, loc, o, mask, ins, sens_ins, nf, nd, args, out, kwargs)
            self.prov[o] = frozenset(incidents)
            n = _contaminations(incidents)
            if n and len(incidents) > n:  # the genuine elements' mask follows them, as an annihilation's (`split`)
                self.split[o] = (mask & ~contaminated, frozenset(incidents[:n]), frozenset(incidents[n:]))
            return
        # already non-finite upstream: carry it along, unless a structural zero annihilates it here. Elementwise,
        # the other elements are born here (a zero sensitivity from a slice meets a saved NaN beside an upstream
        # NaN): classified as any meeting
        fresh = fresh_mask = None
        if _pairs(func, ins, o):
            covered = torch.zeros(o.shape, dtype=torch.bool, device=o.device)
            for t in upstream:
                covered = covered | (~torch.isfinite(t)).broadcast_to(o.shape)
            born = _born_under_carried(self, upstream, o)
            if born is not None:
                covered = covered & ~born
            fresh_mask, mask = mask & ~covered, mask & covered
            saved = [t for t in nf if t not in self.sens]
            # (no saved NaN/Inf: made here, 0/0 where where's structural zero meets log's 1/0, beside a carried NaN)
            fresh = self._classify(func, loc, o, fresh_mask, ins, sens_ins, saved, nd, args, out, kwargs) \
                if bool(mask_any(fresh_mask)) else None
        elif self.shadow is not None and self.shadow.valid and args is not None and out is not None:
            # mixing (a matmul): the elements the upstream NaN/Inf does not reach met a saved one here (a structural
            # zero of max's backward meeting an Inf row): classified as any meeting
            saved = [t for t in nf if t not in self.sens]
            # (not a parameter an earlier backward made NaN, used as a value: it explains the whole step, the
            # elements its NaN meets a zero sensitivity at included, as in _saved_met)
            covered = None if any(b.op == "gradient" for t in saved for b in self._origin(t, loc)) else \
                _shadow_reads.carried(func, args, kwargs or {}, upstream, o, out)
            if covered is not None and bool(mask_any(mask & ~covered)):
                fresh_mask, mask = mask & ~covered, mask & covered
                fresh = self._classify(func, loc, o, fresh_mask, ins, sens_ins, saved, nd, args, out, kwargs)
        carried = frozenset().union(*(self.prov.get(t, frozenset()) for t in upstream))
        if not self._annihilated(func, loc, o, mask, sens_ins, carried, nd, args, out, kwargs):
            self.prov[o] = self._through_view(func, upstream, args, kwargs, o, mask, carried, sens_ins, out)
            saved = [t for t in nf if t not in self.sens]
            if saved:
                self._saved_met(func, loc, o, mask, ins, saved, carried, nd, args, kwargs, out, upstream)
        if fresh and fresh[0]:
            _split_fresh(self, o, mask, fresh_mask, *fresh)
        strong = self._strong_of(o)
        if strong is not None and any(isinstance(i, _Incident) and i.kind != "contamination" for i in self.prov[o]) \
                and bool(torch.isfinite(strong).all()):
            # strong zeros hold no NaN/Inf here: a genuine NaN/Inf carried along was annihilated on the way (amax's
            # unselected elements), and what this tensor holds is contamination alone
            kept = frozenset(i for i in self.prov[o] if not (isinstance(i, _Incident) and i.kind != "contamination"))
            if kept:
                self.prov[o] = kept
                self.split.pop(o, None)

    def _classify(self, func, loc, o, mask, ins, sens_ins, nf, nd, args, out, kwargs) -> tuple[list, torch.Tensor]:
        """The incidents of the elements ``mask`` of ``o``, where a sensitivity first meets the NaN/Inf of ``nf``:
        contamination where that sensitivity is a structural zero, else genuine (contamination first); and the
        mask of the contaminated elements."""
        running = torch._C._current_autograd_node() if nd is not None and nd.op in _TIES_COUNTED else None
        skip = running._sequence_nr() if running is not None else None
        discarded = self._discarded_by(sens_ins, skip)
        unread = self._unread_triangle()
        # (an op on a sparse/mkldnn operand: strong zeros run it as PyTorch does, and keep its NaN; the trace tells
        # that contamination apart, as one they cannot remove)
        strong = self._strong_of(o) if all(t.layout == torch.strided for t in ins) else None
        if strong is not None:
            # the shadow strong pass (_shadow): genuine where strong zeros leave the NaN/Inf, by their supports; a
            # zero sensitivity there is one the program computed (sqrt'(inf) = 0), which no op that discards
            # values made
            genuine = ~torch.isfinite(strong)
            computed_zero = _elementwise(func, ins, o) and bool(mask_any(
                mask & genuine & ~self._nonzero_sensitivity_met(func, o, mask, ins, sens_ins, nf, args, out, kwargs)))
        else:
            genuine = self._nonzero_sensitivity_met(func, o, mask, ins, sens_ins, nf, args, out, kwargs)
            # no shadow (a NaN/Inf made in a backward whose forward was finite): strong zeros' semantics by
            # heuristics, a zero sensitivity is structural only where an op that discards values (slice, where,
            # mask, ignored targets...) made it; a zero the program computes (0 * sqrt(w)) is an ordinary zero,
            # and 0 x NaN = NaN there is genuine, for the trace as for gw.grad
            computed_zero = discarded is None and (self._from_a_product(sens_ins)
                                                   or not self._maker_above(sens_ins)) \
                and bool(mask_any(mask & ~genuine))
            if computed_zero:
                genuine = torch.ones_like(mask)
        undecided = False
        incidents = []
        node = torch._C._current_autograd_node() if nd is None else None
        op, node_op = _op_name(func), nd.op if nd is not None else node.name() if node is not None else "?"
        # the user's hook (a tensor's, a module's) made it: born there, not in the node that runs the hook
        by = f"the hook {self.hook} (run in the backward of {node_op})" if self.hook else f"the backward of {node_op}"
        if self.hook:
            node_op = f"hook {self.hook}"
        # elementwise, each kind's elements name the births of the values non-finite there (a where's NaN and a
        # target's NaN in one mse_loss are two sources); otherwise every source
        aligned = bool(nf) and _pairs(func, nf, o)
        for kind_mask, contaminated in ((mask & ~genuine, True), (mask & genuine, False)):
            if not bool(mask_any(kind_mask)):
                continue
            there = [t for t in nf if bool(mask_any((~torch.isfinite(t)).broadcast_to(o.shape) & kind_mask))] \
                if aligned else nf
            births = frozenset().union(*(self._origin_at(t, loc, kind_mask) if aligned else self._origin(t, loc)
                                         for t in there)) if there else frozenset()
            if not aligned and nd is not None and nd.rows and any(t in self.parts for t in there):
                births = self._row_births(there, loc, kind_mask, nd.rows) or births
            # elementwise, a genuine meeting of NaN/Inf of several births (parts): an incident per births, each
            # named (one incident named its earliest birth only: a -inf written in row 5 beside an Inf in row 2,
            # both used through tanh's 0 x inf, left the row 5 write in no finding)
            groups = self._births_apart(there, loc, kind_mask, births) if aligned and not contaminated and \
                len(births) > 1 else [(kind_mask, births)]
            # contamination: an incident per discarding op that zeroed its elements' sensitivity (``_discarders``)
            split_by = [(at, births, d) for at, d in self._discarders(sens_ins, kind_mask, discarded, skip)] \
                if contaminated and unread is None and discarded is not None else \
                [(at, births, discarded) for at, births in groups]
            for at, births, discarded_at in split_by:
                count, idx = _positions(at)
                ties = not births and nd is not None and nd.op in _TIES_COUNTED and bool(nd.read)
                if ties:  # g / count of ties, 0 where amax's result is NaN: that NaN made it, no infinite derivative
                    births = _tied(nd.read, at)
                if not aligned and len(there) == 1 and there[0] in self.parts and args is not None and \
                        func.overloadpacket in _BILINEAR:
                    births = self._parts_met(func, args, there[0], at, contaminated, o, out) or births
                elif not aligned and not ties and len(births) > 1 and args is not None and out is not None:
                    births = self._probed_births(func, args, kwargs, out, o, ins, there, at, contaminated, loc) \
                        or births
                # (g / 0 is Inf where g is not 0, made NaN by the mask after it: the NaN result's, a NaN finding)
                has_nan = _nan_in(o, at) or (ties and any(getattr(b, "nan", True) for b in births))
                if contaminated and unread is not None:  # no zero involved: the formula read what its forward did not
                    kind = "contamination"
                    what = (f"{op} (the backward of {node_op}) read NaN/Inf in the triangle of a matrix that its "
                            "forward never reads")
                elif contaminated:
                    kind = "contamination"
                    what = "a zero sensitivity met " + ("NaN/Inf" if births else "0/0 or 0 x Inf") + f" in {op} ({by})"
                else:
                    kind = "nan" if has_nan else "inf"
                    number = None if births else nonfinite_number(args or ())
                    what = (f"a nonzero sensitivity met NaN/Inf in {op} ({by})" if births else
                            f"{by} made {'NaN' if has_nan else 'Inf'} in {op}: "
                            f"{number_passed(op, number)}" if number is not None else
                            f"{by} {BACKWARD_OVERFLOW} {op}: Inf from finite values, the result "
                            f"exceeds the largest {str(o.dtype).replace('torch.', '')}" if not has_nan and
                            func.overloadpacket in _OVERFLOWS and func.overloadpacket is not aten.pow else
                            f"{by} made {'NaN' if has_nan else 'Inf'} from finite values in {op} "
                            "(an infinite derivative used)")
                    if ties:
                        what += (f"; {node_op}'s backward divides by the count of elements equal to its result, 0 "
                                 "where the result is NaN")
                    if computed_zero:
                        what += ("; the sensitivity there is a zero the program computed (no op that discards "
                                 "values made it): an ordinary zero, 0 x NaN = NaN, kept by gw.strong_zeros() too")
                    undecided = bool(births) and _undecidable(func, ins, o)
                    for b in births:
                        b.used = True
                inc = self.store.incident(kind, op, node_op, loc, count, idx, births, what,
                                          (unread or discarded_at) if contaminated else None, undecided)
                inc.shape = tuple(o.shape)
                inc.vague = inc.vague or any(self._vague(t) for t in there)  # (_assembly._named)
                if contaminated and any(t.layout != torch.strided for t in ins):
                    inc.unfollowed = True
                incidents.append(inc)
                if self.provisional is not None:
                    self.provisional.append((inc, count, nd, _strong_zeros.in_pass()))
        return incidents, mask & ~genuine

    def _unread_triangle(self) -> tuple | None:
        """(op, loc) of the forward op of the node running now where its formula reads NaN/Inf in a triangle of a
        matrix the forward never read (``_Shadow.unused_triangle``, gw.strong_zeros()' fact): there the
        contamination is that triangle's, not a zero sensitivity's; None elsewhere."""
        node = torch._C._current_autograd_node()
        for shadow in (self.shadow, self.triangles):
            tri = shadow.triangle if shadow is not None else None
            if node is not None and tri is not None and tri[1] is not None and tri[0] == node._sequence_nr():
                nd = self.nodes.get(tri[0])
                return (nd.op, nd.loc) if nd is not None else None
        return None

    def _strong_of(self, o) -> torch.Tensor | None:
        """What gw.strong_zeros()' pass holds where this backward holds ``o`` (the shadow pass, ``_shadow``), or
        None where the trace runs none."""
        strong = self.shadow.strong(o) if self.shadow is not None else None
        return self.triangles.strong(o) if strong is None and self.triangles is not None else strong


def _split_fresh(tr: _Incidents, o, carried_mask, fresh_mask, incidents, contaminated) -> None:
    """Elements of ``o`` born here beside carried ones: which elements hold which incidents (``split``), so
    that a selection further on that drops some of them (where's or masked_fill's backward) keeps the
    provenance of the others alone. A split holds a set of incidents apart: the fresh contamination (or the
    one fresh incident); where ``o`` is split already with contamination apart, fresh contamination joins it
    (a scatter's zeros meeting sqrt's NaN below an ignored row's: both are what strong zeros remove) and the
    other fresh elements join the elements of the rest."""
    got = tr.split.get(o)
    if got is not None:
        kept, apart, rest = got
        fresh_contamination = frozenset(i for i in incidents if i.kind == "contamination")
        if fresh_contamination and all(i.kind == "contamination" for i in apart):
            tr.split[o] = (kept | (fresh_mask & ~contaminated), apart | fresh_contamination,
                           rest | (frozenset(incidents) - fresh_contamination))
        else:
            tr.split[o] = (kept | fresh_mask, apart, rest | frozenset(incidents))
    elif not (n := _contaminations(incidents)) or n == len(incidents):  # (of one kind, of one birth or more)
        tr.split[o] = (carried_mask, frozenset(incidents), tr.prov[o])
    else:  # contamination first, then genuine
        tr.split[o] = (carried_mask | (fresh_mask & ~contaminated), frozenset(incidents[:n]),
                       tr.prov[o] | frozenset(incidents[n:]))
    tr.prov[o] = tr.prov[o] | frozenset(incidents)


def _contaminations(incidents: list) -> int:
    """How many of ``incidents`` (contamination first, one per discarding op: ``_Flow._discarders``) are
    contamination."""
    return sum(1 for i in incidents if i.kind == "contamination")


def _tied(read: tuple, at: torch.Tensor) -> frozenset:
    """The births of amax's NaN results (``read``: its output's (mask, births)) at the elements ``at`` of its
    backward's g / count, which is the result with the reduced dims restored (the same elements, in order). All of
    them named every row's NaN after each birth: a padding row's NaN, sliced away, was a genuine finding reaching
    the gradient, and the used row's "reached no gradient". Every birth where the shapes do not line up."""
    got = [b for m, b in read if m.numel() == at.numel() and bool(mask_any(m.reshape(at.shape) & at))]
    return frozenset().union(*(got or [b for _, b in read]))


def _undecidable(func, ins, o) -> bool:
    """A backward op the trace cannot split into contamination and genuine: not elementwise, not bilinear, and
    without a strong-zero rule or decomposition to run again."""
    return not _elementwise(func, ins, o) and func.overloadpacket not in _BILINEAR and not _reruns(func)


def _in_base(mask: torch.Tensor, view: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    """``mask`` over an in-place write's target (``x[5:] = nan``) moved to the tensor it views, so the elements
    are reported where the user sees them."""
    if base is None:
        return mask
    try:
        full = torch.zeros_like(base, dtype=torch.bool)
        full.as_strided(view.shape, view.stride(), view.storage_offset() - base.storage_offset()).copy_(mask)
        return full
    except RuntimeError:  # a view whose layout does not map onto its base's (rare): its own coordinates
        return mask


def _born_under_carried(tr: _Incidents, upstream, o) -> torch.Tensor | None:
    """Bool over ``o``: where strong zeros hold a NaN/Inf made here that none of the sensitivities ``upstream``
    carries in their shadows (all finite there), though the real ones carry NaN/Inf: a contamination carried
    along (torch 2.14's fmax formula passes the NaN it ignored the whole gradient) covers a genuine birth, a
    nonzero sensitivity meeting a saved NaN (``(fmax(0, s) * s).sum()`` at s = sqrt(-1): gw.grad keeps that
    NaN). None where the shadow does not know, or holds no NaN/Inf there."""
    strong = tr._strong_of(o)
    if strong is None or bool(torch.isfinite(strong).all()):
        return None
    born = ~torch.isfinite(strong)
    for t in upstream:
        s = tr._strong_of(t)
        if s is None or not _shadow_reads._broadcasts(s.shape, o.shape):
            return None
        born = born & torch.isfinite(s).broadcast_to(o.shape)
    return born
