"""``_Roots``: the part of the tracer that makes the gradients a backward starts from (``roots``: the seeds, checked
for NaN/Inf), and the finding of a gradient whose NaN/Inf no recorded op explains.

May import: torch, gradwise._masks, gradwise._strong_zeros, gradwise._trace._common, _facts, _kinds, _store, _shadow,
_replay_sites.
"""

from __future__ import annotations

import weakref

import torch

from gradwise import _strong_zeros
from gradwise._trace import _common, _replay_sites
from gradwise._trace._common import _inexact, _loc, _nonfinite, _user_frame
from gradwise._trace._facts import STALE, WRITTEN_MASK
from gradwise._trace._shadow import _Shadow
from gradwise._trace._store import Birth as _Birth


class _Roots:
    """The gradients a backward starts from (a part of _Tracer)."""

    def roots(self, outputs, grads):
        """Check the outputs being differentiated and make their gradients, marked as sensitivities."""
        self.flush()
        if self.depth == 0:  # the user's line that called backward: ops under a node from any other user line
            frame = _user_frame()  # are the user's own code in the backward (a hook), see `_dig`
            self.backward_site = None if frame is None else (frame.f_code, frame.f_lineno)
            if self.replayed_graph is not None and self.replayed_graph.sites is None and not self.replaying:
                # a traced step after gw.watch()'s replayed one: the same graph tells that step's lines
                outs = (outputs,) if isinstance(outputs, (torch.Tensor, torch.autograd.graph.GradientEdge)) \
                    else tuple(outputs)
                self._safely("the replayed step's lines", _replay_sites.match, self, _strong_zeros._root_nodes(outs),
                             outs)
        single = isinstance(outputs, (torch.Tensor, torch.autograd.graph.GradientEdge))
        outputs = (outputs,) if single else tuple(outputs)
        if grads is None or isinstance(grads, torch.Tensor):
            grads = [grads] * len(outputs) if grads is None else [grads]
        grads = list(grads)
        # a backward inside a backward (checkpoint(use_reentrant=True)) differentiates recomputed activations
        # with the outer sensitivities: they are not outputs the user's result depends on as such
        reentrant = self.depth > 0
        if not reentrant:  # read on demand, inside the mode's handler (an op here would be traced as the user's)
            self.root_outputs = [weakref.ref(o) for o in outputs if isinstance(o, torch.Tensor) and _inexact(o)]
            self.finite_outputs = None
            self.formula_g.clear()  # a formula whose last op met no NaN left its g: held one backward at most
            self.shadow = _Shadow() if self.dirty else None
        for i, (o, g) in enumerate(zip(outputs, grads, strict=False)):
            made = self.prov.get(o)
            replayed = made is None and self.replayed and isinstance(o, torch.Tensor) and o.layout is torch.strided
            if replayed:
                made = self.replayed.get(o.untyped_storage().data_ptr())  # (gw.watch()'s replay: a NaN loss)
            births = [] if reentrant else [b for b in made or () if isinstance(b, _Birth)]
            if replayed and len(births) > 1 and any(b.nan for b in births) and not _holds_nan(o):
                # the replay carries every birth of a node's inputs on (no slice is followed): a NaN, which stays
                # NaN, explains no output that holds none (NaN padding sliced away beside a used Inf: it was a
                # genuine NaN finding "reaching no gradient")
                births = [b for b in births if not b.nan] or births
            if len(births) > 1 and any(b.nan for b in births) and not _holds_inf(o):
                # an infinity written on purpose (an attention mask's -inf) in an output that holds none, only
                # the NaN another birth made of it: no use of its own (_store.earliest)
                births = [b for b in births if b.nan or b.parents or b.what != WRITTEN_MASK] or births
            # a parameter made NaN by an earlier backward makes the whole output NaN: it explains the others
            inherited = [b for b in births if b.op == "gradient"]
            for b in inherited or births:
                b.used = True
                self.output_births.add(b)
            # the implicit gradient PyTorch makes, only where it makes one: a complex or integer scalar is
            # PyTorch's error to raise ("grad can be implicitly created only for real scalar outputs")
            given = g is not None
            if g is None and isinstance(o, torch.Tensor) and o.numel() == 1 and o.requires_grad \
                    and o.is_floating_point():
                grads[i] = g = torch.ones_like(o, memory_format=torch.preserve_format)
            # a reentrant backward's seeds are the outer backward's sensitivities: they keep where they came from
            if isinstance(g, torch.Tensor) and not (reentrant and g in self.sens):
                self.sens[g] = None
                if given and not reentrant:  # (a seed made in the block has the birth of what made it)
                    self._seed_finding(g, [b for b in self.prov.get(g, ()) if isinstance(b, _Birth)])
        return outputs, grads

    def _seed_finding(self, g: torch.Tensor, made: list | None = None) -> None:
        """A seed the caller passed (grad_tensors / grad_outputs) that holds NaN/Inf: a genuine finding born at the
        backward call (or where the block made it: ``made``, its births), carried by every gradient it reaches
        (without it they were NaN with nothing reported)."""
        from torch.utils._python_dispatch import _disable_current_modes

        ft = torch._C._functorch
        if torch._C._are_functorch_transforms_active() or ft.is_functorch_wrapped_tensor(g) or \
                ft.is_legacy_batchedtensor(g):
            return  # batched seeds (is_grads_batched, gradcheck's batched check): values the trace does not read
        with _disable_current_modes():  # outside a handler: these reads are the trace's own, not the user's ops
            if not _nonfinite(g):
                return
            mask, nan = _common._nonfinite_mask(g), _common._has_nan(g)
            count, idx = _common._positions(mask)
        loc = _loc(_user_frame())
        births = made or [self._birth("seed", loc, nan, None, mask, lambda first: _Birth(
            "seed", loc, "the seed of the backward holds NaN/Inf", 0, first, nan))]
        for birth in births:
            birth.used = True
        inc = self.store.incident("nan" if nan else "inf", "seed", "backward", loc, count, idx, births,
                                  "the seed passed to the backward call holds NaN/Inf: every gradient it reaches "
                                  "uses it", None, False)
        self.prov[g] = frozenset([inc])

    def stale_gradient(self, leaf: torch.Tensor, g: torch.Tensor, loc=None, step: int | None = None) -> None:
        """``leaf``'s ``.grad`` ``g``, which a backward accumulates into: NaN/Inf that it held before (an earlier
        backward outside the block, gradients not zeroed) arrived with it, a genuine finding of its own that
        reaches ``leaf``, and ``g``'s provenance (what the accumulation makes of it carries it). Without it the
        accumulation looked like a backward that made NaN/Inf from finite values."""
        if g is not leaf.grad or g in self.prov or not _inexact(g) or g.layout is not torch.strided \
                or not _nonfinite(g):
            return
        loc = loc or _loc(_user_frame())
        mask, nan = _common._nonfinite_mask(g), _common._has_nan(g)
        count, idx = _common._positions(mask)
        name = f"{self.leaf_name(leaf)}.grad"
        birth = self._birth("input", loc, nan, name, mask, lambda first: _Birth(
            "input", loc, STALE, 0, first, nan, name=name))
        birth.used = True
        when = "before this backward" if step is None else f"before the backward at step {step}"
        inc = self.store.incident("nan" if nan else "inf", "gradient", "AccumulateGrad", loc, count, idx, [birth],
                                  f"{name} held NaN/Inf {when} accumulated into it (gradients not zeroed "
                                  "since an earlier backward outside the block)", None, False)
        inc.reaches.add(self.leaf_name(leaf))
        self.reached_now.add(id(inc))
        self.prov[g] = frozenset([inc])

    def unexplained_gradient(self, g: torch.Tensor, leaf: torch.Tensor, loc, step: int,
                             why: str = "a compiled backward with donated buffers keeps no graph",
                             mask: torch.Tensor | None = None, what: str | None = None) -> None:
        """A NaN/Inf gradient ``g`` of ``leaf`` that gw.watch() could not explain (its step's backward could not
        be replayed, for the reason ``why``): a finding born at the backward call ``loc``, neither contamination
        nor genuine, and ``g``'s provenance, so that what uses it (an optimizer step) descends from it. ``mask``:
        where ``g``'s NaN/Inf lie in ``leaf``'s coordinates, when ``g`` is a shard of its gradient; ``what``: the
        birth in words, where it is not a replay that failed (a gradient the program wrote between backwards)."""
        mask, nan = _common._nonfinite_mask(g) if mask is None else mask, _common._has_nan(g)
        count, idx = _common._positions(mask)
        what = what or f"the gradients of the backward at step {step}, which gw.watch() could not replay ({why})"
        birth = self._birth("backward", loc, nan, None, mask,
                            lambda first: _Birth("backward", loc, what, 0, first, nan))
        birth.used = True
        inc = self.store.incident("nan" if nan else "inf", "backward", "backward", loc, count, idx, [birth],
                                  birth.what, None, False)
        inc.reaches.add(self.leaf_name(leaf))
        self.prov[g] = frozenset([inc])


def _holds_nan(o: torch.Tensor) -> bool:
    """Whether the output ``o`` holds a NaN (read outside the trace's mode)."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        return bool(torch.isnan(o).any())


def _holds_inf(o: torch.Tensor) -> bool:
    """Whether the output ``o`` holds an infinity (read outside the trace's mode: no op of the user's)."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        return bool(torch.isinf(o).any())
