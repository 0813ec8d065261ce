"""``_SavedMeets``: the part of the tracer that, in the backward, handles a NaN/Inf sensitivity from upstream
meeting a saved forward value: a non-finite saved value a nonzero sensitivity meets (``_saved_met``: its
births join the provenance), and a structural zero that annihilates NaN/Inf from upstream where
gw.strong_zeros()' rule would (``_annihilated``, through a whole-formula rule where the op has one).

May import: torch, gradwise._strong_zeros, gradwise._masks, gradwise._trace._common, _facts, _incidents, _store.
"""

from __future__ import annotations

import torch

from gradwise import _strong_zeros
from gradwise._masks import mask_any
from gradwise._trace._common import _aligned, _fmt, _nan_in, _op_name, _positions, _tensors
from gradwise._trace._facts import _BILINEAR
from gradwise._trace._met import _elementwise, _nonzero
from gradwise._trace._store import Incident as _Incident
from gradwise._trace._store import descended


class _SavedMeets:
    """A NaN/Inf sensitivity meeting a saved value or annihilated by a structural zero (a part of _Tracer)."""
    def _saved_met(self, func, loc, o, mask, ins, saved, carried, nd, args, kwargs=None, out=None,
                   upstream=()) -> None:
        """A NaN/Inf sensitivity from upstream meets a saved forward value that is non-finite too (the backward of
        e / e.sum() reads the Inf sum of an overflowed exp, with the -inf sensitivity of a log(0)): where a
        nonzero sensitivity meets it, that value is used as well, and its births join the provenance as a
        genuine incident. Not where the upstream NaN/Inf already descends from the same births, nor from a
        gradient used as a value (a NaN parameter explains the whole step), nor where the op's mixing is not
        known (only elementwise and bilinear ops are read). With a shadow strong pass: where strong zeros keep a
        NaN/Inf here that the upstream one does not explain (a zero the program computed, 1/inf, meeting an
        Inf the contamination upstream hides), also from the births of that contamination."""
        births = frozenset().union(*(self._origin(t, loc) for t in saved))
        # (and the infinities they were made of: inf + -inf's NaN meeting one of those Infs again was a second
        # finding; not every parent: log's NaN of x * w beside x's used +inf hid that +inf, review_tr34)
        before = descended(frozenset().union(*(i.births if isinstance(i, _Incident) else (i,) for i in carried)),
                           "made_of")
        # a NaN/Inf sensitivity counts as nonzero only when it is genuine: contamination is what strong zeros
        # make a zero upstream, and a zero annihilates the saved NaN/Inf
        finite_only = all(isinstance(i, _Incident) and i.kind == "contamination" for i in carried)
        shadowed = self.shadow is not None and self.shadow.valid and args is not None and out is not None
        if len(saved) == 1 and saved[0] in self.parts and args is not None and func.overloadpacket in _BILINEAR:
            if shadowed and self._parts_kept(func, loc, o, mask, saved[0], carried, nd, args, kwargs, out):
                return
            # (a saved input whose parts hold different births: those a nonzero sensitivity meets)
            births = self._parts_met(func, args, saved[0], mask, False, o, out, finite_only) or births
        if not (births - before or (shadowed and finite_only)) or any(b.op == "gradient" for b in before | births):
            return
        met = kept = groups = None
        if not births - before:
            pass  # (the same births: only what the shadow says is made here)
        elif _elementwise(func, ins, o):
            met = torch.zeros(o.shape, dtype=torch.bool, device=o.device)
            for t in saved:
                met = met | (~torch.isfinite(t)).broadcast_to(o.shape)
            nonzero = torch.zeros(o.shape, dtype=torch.bool, device=o.device)
            for t in ins:
                if t in self.sens:
                    nonzero = nonzero | (_nonzero(t, finite_only)).broadcast_to(o.shape)
            met = met & nonzero
            if any(t in self.parts for t in saved):
                # the births of the parts met (not a padding row's beside the used row's NaN a zero sensitivity
                # leaves alone: its fill_ was a genuine finding of its own)
                births = frozenset().union(*(self._origin_at(t, loc, met & mask) for t in saved))
                if not births - before:
                    if not (shadowed and finite_only):
                        return
                    met = None
                elif len(saved) == 1 and _aligned(saved, o.shape):
                    groups = self.parts.get(saved[0])
        elif func.overloadpacket in _BILINEAR and args is not None:
            met = self._indicators(func, args, saved, o, out, finite_only=finite_only)
        if shadowed:
            kept = self.shadow.kept_here(func, args, kwargs or {}, upstream, o, out)
            if kept is not None:
                met = kept if met is None else met | kept
        if met is None:
            return
        met = met & mask
        if groups is not None and self._met_apart(func, loc, o, met, groups, before, kept, nd):
            return
        count, idx = _positions(met)
        if not count:
            return
        if len(births) > 1 and args is not None and out is not None and not _elementwise(func, ins, o) and \
                func.overloadpacket not in _BILINEAR:  # (an LSTM layer's weights: the births met there, by probes)
            births = self._probed_births(func, args, kwargs, out, o, ins, saved, met, False, loc) or births
        # (births of a saved value whose parts an op lost, every one at every element: one is named, as before)
        vague = any(self._vague(t) for t in saved)
        self._met_incident(func, loc, o, met, count, idx, births, nd, vague)

    def _met_apart(self, func, loc, o, met, groups, before, kept, nd) -> bool:
        """``_saved_met`` of an elementwise op whose one saved input holds parts of different births: an incident
        per part met (with its elements), the parts whose births the upstream NaN/Inf already carries left to it
        (unless the shadow keeps a NaN/Inf there). One incident for all parts was named after the earliest NaN
        birth: an Inf met by a NaN sensitivity beside that NaN (x[0, 0] = inf, x[0, 1] = nan in one row of
        tanh(x * w).sum(1)) was named nowhere, though w's gradient there is NaN with the Inf alone (0 x inf).
        False where the parts do not cover ``met`` (then one incident, as before)."""
        pieces = [(met & m.broadcast_to(o.shape), births) for m, births in groups]
        covered = torch.zeros_like(met)
        for m, _ in pieces:
            covered = covered | m
        if bool(mask_any(met & ~covered)):
            return False
        for m, births in pieces:
            count, idx = _positions(m)
            if count and (births - before or (kept is not None and bool(mask_any(kept & m)))):
                self._met_incident(func, loc, o, m, count, idx, births, nd)
        return True

    def _met_incident(self, func, loc, o, met, count, idx, births, nd, vague: bool = False) -> None:
        """The incident of ``births``' NaN/Inf met by a nonzero sensitivity at ``met`` (``count`` elements, first
        ``idx``) in ``func``'s output ``o``: its births used, provisional under gw.strong_zeros(), carried by ``o``."""
        op, node_op = _op_name(func), nd.op if nd is not None else "?"
        for b in births:
            b.used = True
        inc = self.store.incident("nan" if _nan_in(o, met) else "inf", op, node_op, loc, count, idx, births,
                                  f"a nonzero sensitivity met NaN/Inf in {op} (the backward of {node_op})", None,
                                  False)
        inc.vague = inc.vague or vague
        if self.provisional is not None:
            self.provisional.append((inc, count, nd, _strong_zeros.in_pass()))
        self.prov[o] = self.prov[o] | {inc}

    def _parts_kept(self, func, loc, o, mask, t, carried, nd, args, kwargs, out) -> bool:
        """``_saved_met`` of a bilinear op whose saved ``t`` holds parts of different births, by the shadow strong
        pass: an incident per part that strong zeros keep non-finite here by itself (``_Shadow.kept_of_part``),
        with the elements it makes so, unless a genuine NaN/Inf from upstream already descends from its births
        (contamination upstream does not: a padding row's Inf discarded there is used here in a kept row). One
        incident for all parts, named after the earliest birth, lost an Inf met by a zero the program computed
        (0 x inf through tanh'(inf)) beside a used NaN: "reaches: no gradient", or "no gradient used". False
        where the shadow cannot tell (then decided as before)."""
        kept = [(self.shadow.kept_of_part(func, args, kwargs or {}, t, m, o, out), births)
                for m, births in self.parts[t]]
        if any(k is None for k, _ in kept):
            return False
        before = descended(frozenset().union(*(i.births if isinstance(i, _Incident) else (i,) for i in carried
                                               if not (isinstance(i, _Incident) and i.kind == "contamination"))),
                           "made_of")
        for met, births in kept:
            met = met & mask
            count, idx = _positions(met)
            if not count or not births - before or any(b.op == "gradient" for b in births):
                continue
            self._met_incident(func, loc, o, met, count, idx, births, nd)
        return True

    def _annihilated(self, func, loc, o, mask, sens_ins, carried, nd, args, out, kwargs) -> bool:
        """A NaN/Inf sensitivity from upstream meets this backward op: where the strong-zero rules, rerun on it,
        leave a finite value (a structural zero of a saved forward value: softmax's or exp's output at a -inf
        logit), strong zeros annihilate it here. Those elements are contamination born where the carried NaN/Inf
        was, and the upstream incidents stop there (the same fate as under gw.strong_zeros()). At the last op of
        a formula whose rule is the whole formula (logcumsumexp's), that rule's result decides. False where
        nothing is annihilated (the provenance is then carried as it is)."""
        strong, formula = _whole_formula(self, func, o, sens_ins, nd)
        if strong is None:
            if args is None or out is None or _strong_zeros.in_pass():
                return False  # (in gw.strong_zeros()' pass the result is the rule's already: what is left stays)
            if self.shadow is not None and self.shadow.valid:  # structural zeros known: what this op annihilates
                gone = self.shadow.annihilated(func, args, kwargs or {}, sens_ins, o, out)
                strong = None if gone is None else torch.where(gone, 0.0, float("nan"))
            elif not self.outputs_finite() and not any(a in self.formula_masks for a in _tensors(args)):
                # a non-finite output keeps the NaN softmax's and exp's zeros meet (not structural), and the trace
                # cannot tell other zeros the program computed from structural ones; a mask the formula compared
                # (amax's `x == amax`) selects whatever the outputs are
                return False
            else:
                strong = self._strong_rerun(func, args, kwargs or {}, sens_ins, o, out)
        if strong is None:
            return False
        gone = mask & torch.isfinite(strong)
        count, idx = _positions(gone)
        if not count:
            return False
        births = frozenset().union(*(i.births if isinstance(i, _Incident) else (i,) for i in carried))
        for i in carried:  # reported only where they reach a gradient some other way
            if isinstance(i, _Incident):
                i.annihilated = True
        op, node_op = _op_name(func), nd.op if nd is not None else "?"
        what = (f"a structural zero met NaN/Inf from upstream in {op} (the backward of {node_op}), where "
                "gw.strong_zeros()' rule annihilates it")
        made = min((i for i in carried if isinstance(i, _Incident)), key=lambda i: i.order, default=None)
        if made is not None and not made.births:  # an infinite derivative: say which backward made it
            what += f"; it came from the backward of {made.node_op} at {_fmt(made.loc)}"
        inc = self.store.incident("contamination", op, node_op, loc, count, idx, births, what,
                                  (nd.op, nd.loc) if nd is not None else None, False)
        if self.provisional is not None:
            self.provisional.append((inc, count, nd, _strong_zeros.in_pass()))
        kept = mask & ~gone
        if bool(mask_any(kept)):
            if formula is not None:
                carried = _formula_kept(self, carried, formula, kept, nd, loc)
            self.prov[o] = frozenset([inc]) | carried
            self.split[o] = (kept, frozenset([inc]), carried)
        else:
            self.prov[o] = frozenset([inc])
        return True


def _forward_made(prov) -> bool:
    """Whether ``prov`` is a saved value's provenance the forward recorded (births, no backward incident): its
    rows' births are read without making one (``_formula_kept``)."""
    return bool(prov) and not any(isinstance(i, _Incident) for i in prov)


def _whole_formula(tr: _SavedMeets, func, o, sens_ins, nd) -> tuple[torch.Tensor | None, list | None]:
    """(the strong-zero result of a whole backward formula (``_strong_zeros.WHOLE_FORMULAS``) at its last op,
    from the sensitivity kept at its first op, its zeros taken as structural; [that g, the saved values its ops
    read] (``formula_g``)), else (None, None)."""
    whole = _strong_zeros.WHOLE_FORMULAS.get(nd.op) if nd is not None else None
    node = torch._C._current_autograd_node()
    kept = tr.formula_g.get(node._sequence_nr()) if whole is not None and node is not None else None
    if kept is None or func is not whole.last or len(sens_ins) < 2 or kept[0].shape != o.shape:
        return None, None
    g, saved = kept
    if any(t is None for t in saved):
        return None, None
    del tr.formula_g[node._sequence_nr()]
    try:
        out = whole.exact(g, g != 0, node, saved)
    except Exception:  # an explanation must never break the program it explains
        return None, None
    return (out, kept) if out.shape == o.shape else (None, None)


def _formula_kept(tr: _SavedMeets, carried: frozenset, formula: list, kept: torch.Tensor, nd, loc) -> frozenset:
    """What the elements ``kept`` (left non-finite by a whole formula's rule, ``_whole_formula``) carry of
    ``carried``: what came with its sensitivity ``g``, and the incidents its own ops made (the formula's
    intermediates meet the saved NaN/Inf with log|g|, no zero) only where their births lie in the kept
    elements' rows (``nd.rows``: a scan's backward reads a row's saved values alone; of the saved values with
    parts or a provenance the forward recorded: reading another's would make a birth, data arrived). All of
    them there, or where those rows hold no saved NaN/Inf (an Inf seed's row beside NaN padding):
    logcumsumexp's padding rows' NaN, met by log|0| in its first sub and annihilated at its last, reached w
    through the used row's elements, a genuine finding of 8 elements. ``carried`` where the rows are not
    known. The saved values are those the formula's ops received (``formula``: [g, them]): read from the node
    again, a user's unpack hook ran once more, and a checkpoint's raised (the padding then told genuine)."""
    g, read = formula
    if not nd.rows:
        return carried
    saved = [t for t in read if t.shape == kept.shape and (t in tr.parts or _forward_made(tr.prov.get(t)))]
    # (rows holding no saved NaN/Inf: the kept elements' came with g alone, the Inf of an infinite seed)
    rows = tr._row_births(saved, loc, kept, nd.rows, frozenset()) if saved else None
    if rows is None:
        return carried
    upstream = tr.prov.get(g, frozenset())
    return frozenset(i for i in carried if i in upstream or not isinstance(i, _Incident) or not i.births
                     or i.births & rows)
