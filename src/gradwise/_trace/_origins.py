"""``_Origins``: where a NaN/Inf the tracer meets came from when no op it recorded made it: data that arrived
non-finite (an "input" birth, with its DataLoader batch and its NaN and Inf parts apart), a value moved by ops
passed over unread (``_derive``: the user's ``x``, not GRU's transpose of it), a gradient used as a value, a value
received from another rank, or (in gw.watch()'s replay) the untraced forward's.

May import: torch, gradwise._masks, gradwise._trace._common, _replay, _store.
"""

from __future__ import annotations

import weakref

import torch

from gradwise._masks import mask_any
from gradwise._trace._common import _has_nan, _inexact, _nonfinite, _nonfinite_mask, _user_frame
from gradwise._trace._replay import made_by, untraced
from gradwise._trace._store import KEEP as _KEEP
from gradwise._trace._store import Birth as _Birth
from gradwise._trace._store import Incident as _Incident


class _Origins:
    """Births of NaN/Inf no recorded op made: data, values moved unread, received (a part of ``_Provenance``)."""

    def _parts_of(self, t: torch.Tensor, loc) -> list:
        """``t``'s NaN/Inf as [(mask, births)]: its parts where recorded, else all of them with its provenance."""
        return self.parts.get(t) or [(~torch.isfinite(t), self._origin(t, loc))]

    def _origin(self, t: torch.Tensor, loc) -> frozenset:
        """The provenance of a non-finite tensor; data that arrived non-finite becomes an "input" birth."""
        got = self.prov.get(t)
        if got and any(isinstance(p, _Incident) for p in got):
            return self._gradient_as_value(t, got, loc)
        if got is None and self.replayed and t.layout is torch.strided:  # gw.watch()'s replay: the forward's order
            got = self.replayed.get(t.untyped_storage().data_ptr())
            if got is not None:
                self.prov[t] = got
                self._arrived_parts(t, got, replayed=True)
        if got is None and t._base is not None and _nonfinite(t._base):
            got = self.prov[t] = self._origin(t._base, loc)
            self.clean[t] = self.clean.get(t._base, False)
        if got is None and (via := self._received_through(t)) is not None:
            mask, nan = _nonfinite_mask(t), _has_nan(t)
            b = self._birth(via[0], via[1], nan, None, mask, lambda idx: _Birth(
                via[0], via[1], "received from another rank", 0, idx, nan, received=True), received=True)
            got = self.prov[t] = frozenset([b])
        if got is None:  # the data it was moved from by ops nobody read (GRU's transpose), and where first used
            src, loc = self._root(t, loc)
            if src is not t and (got := self.prov.get(src)) is not None:
                self.prov[t] = got
                self._arrived_parts(t, got)
        if got is None and self.replaying and (node := src.grad_fn or (
                src._base.grad_fn if src._base is not None else None)) is not None:
            # gw.watch()'s replay: a value a node made (inside a TorchScript graph) that no node saved is made by
            # the forward it did not trace, never data that arrived
            got = self.prov[src] = self.prov[t] = untraced(self, src, made_by(node), loc)
        if got is None:
            name = self.names.get(src) or self._search_name(src, _user_frame())
            batch = self.batches.get(src if src._base is None else src._base)
            got = self.prov[src] = self.prov[t] = self._input_births(src, loc, name, batch)
            self.clean[src] = self.clean[t] = True  # (data: its finite elements descend from no NaN/Inf here)
            self._arrived_parts(src, got)
            if t is not src:
                self._arrived_parts(t, got)
        return got

    def _input_births(self, src: torch.Tensor, loc, name: str | None, batch: int | None) -> frozenset:
        """The births of data ``src`` that arrived non-finite: one, or where it holds NaN and Inf both, a NaN and
        an Inf birth (told apart as parts by ``_arrived_parts``). One birth "x arrived with 9 NaN value(s)" told
        NaN padding beside a used Inf as one genuine finding, its elements the padding's too."""
        if not _has_nan(src) or not bool(mask_any(torch.isinf(src))):
            return frozenset([self._input_birth(src, loc, name, batch)])
        return frozenset(self._input_birth(src, loc, name, batch, part) for part in (True, False))

    def _arrived_parts(self, t: torch.Tensor, births: frozenset, replayed: bool = False) -> None:
        """Parts (``_Parts``) of data ``t`` read as it arrived (or moved by ops nobody read) whose NaN and Inf are
        births of their own (``_input_births``): its NaN elements the NaN birth's, its Inf ones the Inf birth's.
        ``replayed``: a value gw.watch()'s replay read, whose two births of one site (`_replay.untraced`) are
        parts as well (one NaN-kind incident of both was the Inf's too: "reaches: no gradient" for a used Inf)."""
        if len(births) != 2 or len({b.nan for b in births}) != 2 or (
                any(b.op != "input" for b in births) if not replayed else len({(b.op, b.loc) for b in births}) != 1):
            return
        self._keep(t, {frozenset([b]): torch.isnan(t) if b.nan else torch.isinf(t) for b in births})

    def _input_birth(self, src: torch.Tensor, loc, name: str | None, batch: int | None,
                     part: bool | None = None) -> _Birth:
        """The birth of data ``src`` that arrived non-finite (named ``name``; from DataLoader batch ``batch``);
        of its NaN (``part`` True) or Inf (False) elements alone where given."""
        mask, nan = _nonfinite_mask(src), _has_nan(src)
        if part is not None:
            mask, nan = (torch.isnan(src) if part else torch.isinf(src)), part
        b = self._birth("input", loc, nan, name, mask,
                        lambda idx: _Birth("input", loc, "arrived non-finite", 0, idx, nan, name=name, batch=batch),
                        batch=batch)
        if batch is not None and batch not in b.batches and len(b.batches) < _KEEP:
            b.batches.append(batch)
        return b

    def _derive(self, out, ins: list, loc) -> None:
        """An op passed over unread (a view, a copy, a finite-preserving op on tensors without provenance) at
        ``loc``: its outputs remember their sources, weakly, so that NaN/Inf found in them later is the data it
        came from (named and counted as the user's ``x``, first used where it first was: not GRU's internal
        transpose of it, nor the relu(x) a later line reads)."""
        entry = (tuple(weakref.ref(t) for t in ins), loc)
        for o in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(o, torch.Tensor) and _inexact(o):
                self.derived[o] = entry

    def _from_data(self, t: torch.Tensor) -> bool:
        """Whether ``t`` may be data the user passed in (a leaf that is no parameter, or what `_derive` linked to
        one; views of either): only ops on those leave links (a parameter's transpose in every linear does not)."""
        base = t._base if t._base is not None else t
        return (base.grad_fn is None and not isinstance(base, torch.nn.Parameter)) or t in self.derived \
            or base in self.derived

    def _root(self, t: torch.Tensor, loc) -> tuple[torch.Tensor, tuple]:
        """The earliest non-finite source ``t`` was derived from by ops passed over (``_derive``) and where it
        was first used, else (``t``, ``loc``)."""
        for _ in range(64):  # (a chain of views and copies; bounded)
            entry = self.derived.get(t)
            if entry is None:
                break
            sources = [s for r in entry[0] if (s := r()) is not None and _inexact(s) and _nonfinite(s)]
            if not sources:
                break
            t, loc = sources[0], entry[1]
        return t, loc
