"""``_Flow``: the part of the tracer that follows the backward's flow for `_Incidents`: upstream, which node made
a sensitivity's zero (a discarding op, a product with a value, none); downstream, where a provenance part of whose
NaN/Inf a structural zero annihilated goes through a view or a mixing op (``_through_view``, ``_mixed``); a
backward op run again under the strong-zero rules where the trace cannot tell contamination from genuine
otherwise (``_strong_rerun``); and the leaves a finding reaches (``_accumulate``).

May import: torch, gradwise._strong_zeros, gradwise._masks, gradwise._trace._common, _facts, _store.
"""

from __future__ import annotations

import torch

from gradwise import _strong_zeros
from gradwise._masks import mask_any
from gradwise._trace._common import _aligned, _nonfinite
from gradwise._trace._facts import _DISCARDS, _PRODUCTS, _SELECTING_DISCARDS, _discard_key
from gradwise._trace._store import Incident as _Incident

# copies of their first argument (no product): a mask follows them like a view
_COPIES = {torch.ops.aten.clone, torch.ops.aten._unsafe_view, torch.ops.aten.contiguous}
_RESHAPES = {torch.ops.aten.view, torch.ops.aten._unsafe_view, torch.ops.aten.reshape}


class _Flow:
    """The backward's flow around an op where a sensitivity meets a NaN/Inf (a part of _Tracer)."""

    def _from_a_product(self, sens_ins) -> bool:
        """Did the zero sensitivity come straight from the backward of a product with a value (0 * x, a
        matmul with a zero weight)? Those zeros are values of the program, not structure. Not where a node that
        can make structural zeros lies above the product (y * c after an overwrite y[0] = 0 passes its zero on)."""
        for s in sens_ins:
            seq = self.sens.get(s)
            nd = self.nodes.get(seq)
            if nd is not None and nd.op in _PRODUCTS and not self._maker_above(seqs=self.parents.get(seq, ())):
                return True
        return False

    def _upstream(self, sens_ins=(), seqs=()):
        """The seqs of the nodes upstream in the sensitivity flow of ``sens_ins`` (or from ``seqs``), nearest
        first, each once (negative: the engine's zeros for an unused output)."""
        frontier = [self.sens.get(s) for s in sens_ins] + list(seqs)
        seen: set = set()
        while frontier:
            nxt = []
            for seq in frontier:
                if seq is None or seq in seen:
                    continue
                seen.add(seq)
                yield seq
                nxt.extend(self.parents.get(seq, ()))
            frontier = nxt

    def _maker_above(self, sens_ins=(), seqs=()) -> bool:
        """Is there a node upstream in the sensitivity flow where strong zeros can start a structural zero (their
        own fact, ``may_make_structural_zeros``; the engine's zeros for an unused output count)? Where there is
        none, a zero sensitivity is one the program computed (1 - 6/6 when centring), as gw.grad takes it."""
        return any(seq < 0 or seq in self.makers for seq in self._upstream(sens_ins, seqs))

    def _discarders(self, sens_ins, at: torch.Tensor, nearest: tuple | None, skip: int | None = None) -> list:
        """The contaminated elements ``at`` by the discarding op that made their zero sensitivity: [(mask, (op,
        loc))]. Where the nearest one (``nearest``, ``_discarded_by``'s) made a sensitivity met here and where it
        zeroes is known (``own_zeros``), the elements it does not zero are the next one's upstream: a slice's
        padding rows were "unused since" the masked_fill of one column after it in the backward."""
        for s in sens_ins:
            seq, own = self.sens.get(s), self.own_zeros.get(s)
            nd = self.nodes.get(seq) if seq is not None else None
            if own is None or nd is None or (nd.op, nd.loc) != nearest or own.shape != at.shape:
                continue
            rest = at & ~own
            above = self._discarded_by((), skip, self.parents.get(seq, ())) if bool(mask_any(rest)) else None
            if above is None:
                break
            mine = at & own
            return [(mine, nearest), (rest, above)] if bool(mask_any(mine)) else [(at, above)]
        return [(at, nearest)]

    def _discarded_by(self, sens_ins, skip: int | None = None, seqs=()) -> tuple | None:
        """The discarding op upstream in the sensitivity flow (slice, where, ...) whose backward made the zero
        sensitivity: the nearest one that selects (slice, index, where, masks, ignored targets, overwrites) if
        any, else the nearest elementwise one (relu, clamp, max: their zeros are spread through the tensor and
        rarely line up with discarded rows). One whose backward makes no structural zero (an index that reads
        every row, a full slice: strong zeros' fact) discards nothing. ``skip``: the node running now, where its
        own zeros come after the meeting (amax's mask multiplies g / count). ``seqs``: from these nodes instead."""
        fallback = None
        for seq in self._upstream(sens_ins, seqs):
            if seq not in self.makers or seq == skip:
                continue
            nd = self.nodes.get(seq)
            op = _discard_key(nd.op) if nd is not None else None
            if op in _SELECTING_DISCARDS:
                return nd.op, nd.loc
            if op in _DISCARDS:
                fallback = fallback or (nd.op, nd.loc)
        return fallback

    def _strong_rerun(self, func, args, kwargs, sens_ins, o, out) -> torch.Tensor | None:
        """``func`` run again under the strong-zero rules, every zero of its sensitivities taken as structural: the
        counterpart of ``o`` (what strong zeros leave non-finite), or None where no rule nor decomposition covers
        the op (or it writes in place). As in gw.strong_zeros()' pass: a bool mask the formula compared
        (amax's ``self == result``) is made again under the rules, which then know where it selects, and an
        exactly-0 softmax or exp output is structural only when the outputs are finite."""
        if not _reruns(func):
            return None
        outs = out if isinstance(out, (list, tuple)) else [out]
        at = next((i for i, t in enumerate(outs) if t is o), None)
        if at is None:
            return None
        mode = _strong_zeros._StrongZeroMode(of_pass=False)
        for s in sens_ins:
            mode.supports.record(s, s != 0)
        state = _strong_zeros._STATE
        finite, state.outputs_finite = state.outputs_finite, self.outputs_finite()
        try:
            with torch.no_grad(), mode:
                args = [self._formula_mask(a) for a in args]
                res = func(*args, **kwargs)
        except Exception:  # an explanation must never break the program it explains
            return None
        finally:
            state.outputs_finite = finite
        r = (res if isinstance(res, (list, tuple)) else [res])[at]
        return r if isinstance(r, torch.Tensor) and r.shape == o.shape else None

    def _formula_mask(self, a):
        """A comparison's mask made in the backward formula, made again (inside the rerun's mode)."""
        made = self.formula_masks.get(a) if isinstance(a, torch.Tensor) and a.dtype == torch.bool else None
        if made is None or made[3] != a._version:  # (written in place since: max's `mask.logical_or_(both NaN)`)
            return a
        func, args, kwargs, _ = made
        return func(*args, **(kwargs or {}))

    # -- leaves and their names ------------------------------------------------------------------------------

    def _accumulate(self, node, sens_ins) -> None:
        var = node.variable
        if var in self.recomputed_inputs:  # a reentrant checkpoint's own input: what it holds flows on, no leaf
            return
        for s in sens_ins:
            incs = self.prov.get(s, ())
            if not incs or not _nonfinite(s):  # (provenance left on values made finite in place: maximum's backward)
                continue
            self._reach([i for i in incs if isinstance(i, _Incident)], s, var)

    def _covered(self, g: torch.Tensor, incs) -> bool | None:
        """Is the contamination among ``incs`` covered in the gradient ``g`` by a genuine NaN/Inf beside it: does
        gw.strong_zeros()' pass (the shadow) hold NaN/Inf wherever ``g`` does? Then the contamination reached no
        element that strong zeros would make finite, and it is no finding for this leaf (a GRU's backward mixes
        a discarded time step's NaN with a used one's through every step: no split follows it there). None where
        both reach ``g`` and no shadow says (create_graph, grad enabled in a hook): not known, and said so."""
        kinds = {i.kind == "contamination" for i in incs if isinstance(i, _Incident)}
        if kinds != {True, False}:
            return False
        strong = self._strong_of(g)
        if strong is None or strong.shape != g.shape:
            return None
        return not bool(mask_any(~torch.isfinite(g) & torch.isfinite(strong)))

    def _through_view(self, func, upstream, args, kwargs, o, mask, carried, sens_ins=(), out=None) -> frozenset:
        """The provenance of a view (or copy) of a tensor part of whose NaN/Inf a structural zero annihilated
        (``split``): the same view of its mask of kept elements says whether the upstream incidents still reach
        these elements (the top-right block of matrix_exp's block exponential, sliced out, holds only annihilated
        ones). Other ops: see ``_mixed``."""
        t = upstream[0]
        got = self.split.get(t) if len(upstream) == 1 else None
        if got is None:
            return _mixed(self, func, upstream, args, kwargs, o, mask, carried, sens_ins, out) \
                if any(u in self.split for u in upstream) else carried
        kept, apart, rest = got
        if _pairs(func, [t], o) and t.shape == kept.shape:  # elementwise (where's backward): the kept elements' own
            view = kept.broadcast_to(o.shape)
        elif not (args and args[0] is t and (getattr(func, "is_view", False) or func.overloadpacket in _COPIES)):
            return _mixed(self, func, upstream, args, kwargs, o, mask, carried, sens_ins, out)
        else:
            if func.overloadpacket in _RESHAPES:  # by logical order: a mask laid out otherwise may not view
                kept = kept.contiguous()
            try:
                view = func(kept, *args[1:], **(kwargs or {}))
            except Exception:  # an explanation must never break the program it explains
                return carried
        if not isinstance(view, torch.Tensor) or view.shape != o.shape:
            return carried
        view = view & mask
        if not bool(mask_any(view)):
            return apart
        if not bool(mask_any(mask & ~view)):  # none of the incident's elements left (a where dropped them)
            return rest
        self.split[o] = (view, apart, rest)
        return carried


def _mixed(tr: _Flow, func, upstream, args, kwargs, o, mask, carried, sens_ins, out) -> frozenset:
    """An op that mixes sensitivities part of whose NaN/Inf is contamination (``split``: a log_softmax
    backward's ignored rows beside rows the loss uses), such as the matmul to a weight's gradient or the sum
    of two branches: run again under the strong-zero rules with those elements zeros, it says where the rest
    (genuine) reaches the output. Where it reaches every non-finite element, strong zeros leave each of them
    non-finite and the contamination is no finding there (it reached every gradient beside the genuine NaN,
    against gw.grad), nor a value that no gradient used (``covered``: it stops here); elsewhere the split
    follows the output. One set of incidents apart at a time (contamination born at several ops: an ignored
    row's and a scatter's zeros); ops without a strong-zero rule carry the whole provenance."""
    if args is None or out is None:
        return carried
    splits = [tr.split.get(t) for t in upstream]
    aparts = {got[1] for got in splits if got is not None}
    if len(aparts) != 1:
        return carried
    apart = aparts.pop()
    strong_of, rest = {}, frozenset()
    for t, got in zip(upstream, splits, strict=True):
        if got is not None and got[0].shape == t.shape:
            strong_of[id(t)] = t.masked_fill(~got[0] & ~torch.isfinite(t), 0)
            rest |= got[2]
        elif got is None and tr.prov.get(t) and tr.prov.get(t) <= apart:  # contamination throughout
            strong_of[id(t)] = t.masked_fill(~torch.isfinite(t), 0)
        elif got is None and not apart & tr.prov.get(t, frozenset()):
            rest |= tr.prov.get(t, frozenset())
        else:
            return carried

    def swap(a):
        if isinstance(a, (list, tuple)):
            return type(a)(swap(x) for x in a)
        return strong_of.get(id(a), a) if isinstance(a, torch.Tensor) else a

    strong = tr._strong_of(o)
    if strong is None:
        strong = tr._strong_rerun(func, swap(list(args)), kwargs or {}, [swap(s) for s in sens_ins], o, out)
    if strong is None:
        return carried
    reached = mask & ~torch.isfinite(strong)
    if not bool(mask_any(mask & ~reached)):
        for inc in apart:  # (used there, under the genuine NaN/Inf: no finding, nor a value nothing used)
            inc.covered = True
        return rest
    if not bool(mask_any(reached)):
        return apart
    tr.split[o] = (reached, apart, rest)
    return carried


def _reruns(func) -> bool:
    """Whether `_strong_rerun` can run ``func`` under the strong-zero rules (a rule or a decomposition, and no
    in-place write)."""
    return not func._schema.is_mutable and (
        _strong_zeros.lookup(func) is not None or _strong_zeros._decomposition(func) is not None)


# ops that pair each element with the inputs' at the same position, though PyTorch tags them no pointwise
_PAIRING = {torch.ops.aten.mse_loss_backward, torch.ops.aten.smooth_l1_loss_backward,
            torch.ops.aten.huber_loss_backward, torch.ops.aten.binary_cross_entropy_backward, torch.ops.aten.where}


def _pairs(func, ins, o) -> bool:
    """Whether output elements pair with the inputs' at their positions (`_elementwise`, or a `_PAIRING` op)."""
    return (torch.Tag.pointwise in func.tags or func.overloadpacket in _PAIRING) and _aligned(ins, o.shape)
