"""``_Met``: the part of the tracer that tells, at a meeting of a sensitivity and a NaN/Inf, which elements a
nonzero sensitivity meets and which births they are (`_Incidents` and `_SavedMeets` ask): bilinear ops evaluated
on indicators, the parts of a saved operand of several births, and ops no table describes probed birth by birth
(``_probes``).

May import: torch, gradwise._masks, gradwise._trace._common, _facts, _flow, _probes, _store.
"""

from __future__ import annotations

import torch

from gradwise._masks import mask_any
from gradwise._trace._common import _aligned, _inexact
from gradwise._trace._facts import _BILINEAR
from gradwise._trace._probes import MAX_PROBES, only, probe, probes
from gradwise._trace._store import Incident as _Incident


class _Met:
    """Which elements of a backward op's result a nonzero sensitivity meets at a NaN/Inf, and whose births (a part
    of _Tracer)."""

    def _parts_met(self, func, args, t, where, zero, o, out, finite_only=False) -> frozenset | None:
        """Of a bilinear op whose saved operand ``t`` holds parts of different births (``parts``: the padding rows
        written NaN beside a used row's NaN): the births of the parts whose NaN/Inf a nonzero sensitivity
        (``zero``: a zero one) meets at the elements ``where`` of ``o``; None where that is not known."""
        got = frozenset()
        # a genuine NaN/Inf that no nonzero sensitivity meets is a computed zero's (0 x inf, tanh'(inf) = 0): the
        # parts that a finite sensitivity meets (not those a NaN one, contamination, meets), not every part's births
        for finite in (False, True) if not zero else (False,):
            for m, births in self.parts[t]:
                try:
                    met = self._indicators(func, args, [t], o, out, finite_only, part=m.broadcast_to(t.shape),
                                           zero="finite" if finite else zero)
                except Exception:  # an explanation must never break the program it explains
                    return None
                if met is None:
                    return None
                if bool(mask_any(met & where)):
                    got |= births
            if got:
                return got
        return None

    def _probed_births(self, func, args, kwargs, out, o, ins, there, where, zero, loc) -> frozenset | None:
        """Of a backward op no other rule describes (group_norm's, an LSTM layer's, cdist's) meeting the NaN/Inf
        of saved values ``there`` of several births: the births that make the elements ``where`` of ``o``
        non-finite by themselves (``_probes``): each birth's NaN/Inf kept wherever it is (its parts of every saved
        operand, a sensitivity whose NaN/Inf descends from it), every other NaN/Inf made 0. Genuine elements (not
        ``zero``): what strong zeros keep so (the shadow pass, ``_Shadow.kept_of_parts``: a zero sensitivity
        meeting a padding row annihilates it), else the op run plainly. None where not known. Every birth named
        the padding rows' NaN in the used rows' genuine finding (and the used NaN, ordered after it, was "reaching
        no gradient" where the births were not told apart)."""
        pairs = [(t, m, births) for t in there for m, births in self._parts_of(t, loc)]
        candidates = frozenset().union(*(births for _, _, births in pairs))
        if not 1 < len(candidates) <= MAX_PROBES or not probes(func, args, kwargs):
            return None
        shadowed = not zero and self.shadow is not None and self.shadow.valid
        nf = [t for t in ins if t is not o and _inexact(t) and not bool(torch.isfinite(t).all())]
        got = frozenset()
        for b in candidates:
            keep = {}
            for t, m, births in pairs:
                if b in births:
                    part = m.broadcast_to(t.shape) & ~torch.isfinite(t)
                    keep[id(t)] = keep[id(t)] | part if id(t) in keep else part
            for u in nf:  # (a sensitivity's genuine NaN/Inf: contamination is what strong zeros make 0 upstream)
                if u in self.sens and any(b in i.births for i in self.prov.get(u, ())
                                          if isinstance(i, _Incident) and i.kind != "contamination"):
                    keep[id(u)] = ~torch.isfinite(self.shadow.get(u) if shadowed else u)
            met = self.shadow.kept_of_parts(func, args, kwargs or {}, keep, o, out) if shadowed else None
            if met is None:
                none = torch.zeros((), dtype=torch.bool)
                met = probe(func, args, kwargs, out, o, {id(u): only(u, keep.get(id(u), none)) for u in nf})
            if met is None:
                return None
            if bool(mask_any(met & where)):
                got |= {b}
        return got or None

    def _nonzero_sensitivity_met(self, func, o, mask, ins, sens_ins, nf, args, out, kwargs=None) -> torch.Tensor:
        """Bool mask over `o`: where a nonzero sensitivity met a non-finite value (genuine), else contamination."""
        if _elementwise(func, ins, o):  # positions line up
            nonzero = torch.zeros(o.shape, dtype=torch.bool, device=o.device)
            for s in sens_ins:
                nonzero = nonzero | (s != 0).broadcast_to(o.shape)
            return nonzero
        if func.overloadpacket in _BILINEAR and args is not None:
            met = self._indicators(func, args, nf, o, out)
            if met is not None:
                return met
        if args is not None and out is not None:
            strong = self._strong_rerun(func, args, kwargs or {}, sens_ins, o, out)
            if strong is not None:  # what strong zeros leave non-finite is genuine, what they remove contamination
                return ~torch.isfinite(strong)
        # Unknown mixing: contamination only when every sensitivity is zero throughout.
        nonzero_anywhere = any(bool((s != 0).any()) for s in sens_ins)
        return torch.full(o.shape, nonzero_anywhere, dtype=torch.bool)

    def _indicators(self, func, args, nf, o, out=None, finite_only=False, part=None,
                    zero: bool | str = False) -> torch.Tensor | None:
        """Of a bilinear op (linear in the sensitivity and in the saved value): the op evaluated on indicators
        (nonzero sensitivity, non-finite value of ``nf``) says which outputs mix the two; None where ``o`` is
        not among its results. ``finite_only``: a NaN/Inf sensitivity counts as zero; ``part``: only the
        non-finite values there count; ``zero``: the zero sensitivities are the ones that count ("finite": the
        finite ones)."""
        def ind(a):
            if not isinstance(a, torch.Tensor) or not _inexact(a):
                return a
            if a in self.sens:
                met = torch.isfinite(a) if zero == "finite" else a == 0 if zero else _nonzero(a, finite_only)
                return met.to(a.dtype)
            if not any(a is t for t in nf):
                return torch.zeros_like(a)
            bad = ~torch.isfinite(a)
            return (bad if part is None else bad & part).to(a.dtype)

        new_args = [[ind(x) for x in a] if isinstance(a, (list, tuple)) else ind(a) for a in args]
        res = func(*new_args)
        outs = res if isinstance(res, (list, tuple)) else [res]
        olist = (out if isinstance(out, (list, tuple)) else [out]) if out is not None else [o]
        for r, oo in zip(outs, olist, strict=False):
            if oo is o and isinstance(r, torch.Tensor):
                return r != 0
        return None


def _nonzero(s: torch.Tensor, finite_only: bool) -> torch.Tensor:
    return (s != 0) & torch.isfinite(s) if finite_only else s != 0


def _elementwise(func, ins, o) -> bool:
    """Whether ``func`` pairs each output element with the inputs' elements at the same position: PyTorch tags it
    pointwise and its inputs broadcast onto ``o``. Equal shapes alone say nothing (bmm of square matrices, layer
    norm's backward): an untagged op goes to the indicators or the strong-zero rerun instead."""
    return torch.Tag.pointwise in func.tags and _aligned(ins, o.shape)
