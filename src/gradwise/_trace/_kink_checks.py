"""``_KinkChecks``: the part of the tracer that schedules the kink checks of forward ops and records
when a nonzero sensitivity reaches a kink.

May import: torch, gradwise._masks, gradwise._strong_zeros (its graph walk), gradwise._trace._common, _kinks,
_store.
"""

from __future__ import annotations

import torch

from gradwise import _strong_zeros
from gradwise._masks import mask_any
from gradwise._trace import _common
from gradwise._trace._common import _KinkGroup, _Node, _op_name, _positions
from gradwise._trace._kinks import _Hit
from gradwise._trace._store import count as _count
from gradwise._trace._store import first as _first


class _KinkChecks:
    """Kink checks of forward ops and the sensitivities that reach them (a part of _Tracer)."""

    def _schedule_kink(self, hit: _Hit, func, loc, nd: _Node) -> None:
        mask = hit.mask
        found = hit.found if hit.found is not None else mask_any(mask)  # cheaper than counting
        decided = isinstance(found, bool)  # on the host already
        now = decided or (found.device.type == "cpu" and not _common._DEFER_ON_CPU) or self.sync_every <= 1
        if now and not (found if decided else found.item()):
            return  # (the everyday answer, before anything else is built: a relu with no exact 0)
        key = (hit.kind, _op_name(func), loc)

        def settle(mask):
            count = _count(mask)
            if count <= 0:
                return
            g = self.kinks.get(key)
            if g is None:
                g = self.kinks[key] = _KinkGroup(hit.kind, key[1], loc, hit.convention, step=self.store.step)
                g.indices = _first(mask)
            g.count += count
            g.occurrences += 1
            if hit.kind == "singular":  # an infinite derivative: the backward may make Inf (see _shadow)
                self.dirty = True
            reads = hit.reads() if callable(hit.reads) else hit.reads
            nd.kinks.append((key, mask if hit.aligned else reads))

        if callable(mask):
            mask = mask()  # made only when it may hold a kink; deferred: now, before x can change
        if now:
            settle(mask)
        else:
            flag = torch.where(found, float("inf"), 0.0)  # non-finite flags are the ones flush settles
            self.pending.append((flag, [], lambda _bad: settle(mask)))

    def _kink_reached(self, nd: _Node, seq, sens_ins, node=None) -> None:
        for s in sens_ins:
            if self.sens.get(s) == seq:
                continue  # made inside this node: not its incoming gradient
            for key, mask in nd.kinks:
                g = self.kinks[key]
                if g.reached:
                    continue
                if mask is not None and mask.shape == s.shape:
                    # a sensitivity nonzero everywhere reaches any kink; else compare where the mask holds
                    g.reached = bool(s.abs().amin() > 0) or bool(mask_any((s != 0).logical_and_(mask)))
                else:
                    g.reached = bool(mask_any(s != 0))
                if g.reached and node is not None:
                    g.reaches = self._leaves_below(node)
            nd.kinks = []
            return

    def _born_reached(self, nd: _Node, seq, sens_ins) -> None:
        """The elements of the NaN/Inf born at ``nd``'s output that the output uses: those its incoming sensitivity
        (gw.strong_zeros()' where the shadow pass runs) is nonzero at (a NaN one included). A structural zero
        there is an element a selection downstream dropped: a padded step that pack_padded_sequence never reads,
        which a genuine finding counted when a GRU's backward mixed the rest (``Birth.sensed``)."""
        for s in sens_ins:
            if self.sens.get(s) == seq:
                continue  # made inside this node: not its incoming gradient
            for birth, mask in nd.born:
                if mask.shape != s.shape:
                    continue
                strong = self._strong_of(s)
                ref = strong if strong is not None and strong.shape == s.shape else s
                # a zero that is no structural one (NaN x a 0 mask, relu of NaN: the forward carries the NaN on)
                # leaves the element used; only the shadow's structural zeros drop it
                support = self.shadow.mode.supports.of(ref) if self.shadow is not None and ref is strong else None
                if support is None:
                    continue
                n, idx = _positions(mask & ((ref != 0) | support.broadcast_to(s.shape)))
                birth.sensed = (birth.sensed or 0) + n
                birth.sensed_indices = birth.sensed_indices or idx
            nd.born = []
            return

    def _leaves_below(self, node) -> list[str]:
        """The names of the leaves whose gradients flow through ``node`` (the kink's): where PyTorch's convention at
        the kink went (once per kink group, when a nonzero sensitivity first reaches it)."""
        names = set()
        for n in _strong_zeros._walk([node]):
            var = getattr(n, "variable", None)
            if not isinstance(var, torch.Tensor):
                continue
            outer = self.recomputed_inputs.get(var)  # a reentrant checkpoint's input: the leaves below its node
            names |= set(self._leaves_below(outer)) if outer is not None else {self.leaf_name(var)}
        return sorted(names)

    # -- the report -------------------------------------------------------------------------------------------
