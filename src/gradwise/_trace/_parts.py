"""``_Parts``: which births are at which elements of a tensor whose NaN/Inf came from several (``_Tracer.parts``:
tensor -> [(mask, births)]), so that a selection or a backward op names only the births of the elements it reads
(a padding row's NaN beside a used one). A part of ``_Provenance``; the ops that move elements along dims
(selections, reductions, scans, row-wise ops) are its base, ``_row_parts._RowParts``.

May import: torch, gradwise._masks, gradwise._trace._common, _advice, _incidents, _row_parts, _store.
"""

from __future__ import annotations

import functools

import torch
from torch.utils._python_dispatch import _disable_current_modes

from gradwise._masks import mask_any
from gradwise._trace._advice import _explain
from gradwise._trace._common import _aligned, _inexact, _nonfinite, _nonfinite_mask, _op_name, pointwise
from gradwise._trace._facts import _SELECTED_WRITES
from gradwise._trace._incidents import _in_base
from gradwise._trace._probes import MAX_PROBES, instead_of, probe
from gradwise._trace._row_parts import _RowParts, _schema_arg, _united
from gradwise._trace._store import Birth as _Birth
from gradwise._trace._store import Incident as _Incident

# in-place ops that write every element of their output: what it held before is no provenance of it
_OVERWRITES = {torch.ops.aten.fill_, torch.ops.aten.copy_}


class _Parts(_RowParts):
    """Provenance per element where it differs, through elementwise, in-place, join and bilinear ops (a part of
    _Provenance, of _Tracer; selections, reductions and row-wise ops: _RowParts)."""

    def _written_parts(self, view: torch.Tensor, base: torch.Tensor) -> None:
        """A forward write into ``view`` of ``base`` (``p[:, 3:] = nan`` after ``p[0, 0] = inf``): the written
        elements take the view's births, the others keep theirs, as parts (``parts``) where they differ. Whole-
        tensor provenance named only the last write (the NaN of the first was told as born at the second), or,
        adding up, a padding row's NaN as used beside a used one."""
        written = _in_base(torch.ones(view.shape, dtype=torch.bool, device=view.device), view, base)
        if written.shape != base.shape:  # (a view whose layout does not map onto its base's: as before)
            self.prov[base] = self.prov[view]
            self.clean[base] = False
            return
        old = self.parts.get(base)
        if old is None and self.prov.get(base):
            old = [(~torch.isfinite(base) & ~written, self.prov[base])]
        kept = [(m & ~written, births) for m, births in old or () if bool(mask_any(m & ~written))]
        # (the view's own parts where it has them: an in-place scan of h.t() named every birth at h's elements)
        new = [(_in_base(m.broadcast_to(view.shape) & _nonfinite_mask(view), view, base), births)
               for m, births in self.parts.get(view) or [(_nonfinite_mask(view), self.prov[view])]]
        parts = _united([*kept, *new], base.shape)
        self.clean[base] = self.clean.get(view, False) and (old is None or self.clean.get(base, False))
        self.prov[base] = frozenset().union(*parts)
        self._keep(base, parts)

    def _kept_parts(self, func, o: torch.Tensor, old: list, nf: list, loc) -> frozenset | None:
        """The parts ``old`` of ``o`` after an in-place op on it: an elementwise one, or a write of a finite value
        into selected elements (``s[m] = 0``, index_fill_), keeps them, joined by its other inputs' (``x.mul_(c)``),
        at the elements still non-finite, where they cover every NaN/Inf of ``o``; and the births there (None:
        ``o`` has no parts, its whole provenance is told). Kept as they were, a column of NaN multiplied in, or
        padding rows an in-place copy_ of a flip moved into the used rows, were at no part's elements: a selection
        of the used rows named the padding's births only, the NaN the output uses in no finding. Dropped by a
        selected write (not elementwise), the padding rows it zeroed were named at the used NaN."""
        if not (pointwise(func) or func.overloadpacket in _SELECTED_WRITES) or not _aligned(nf, o.shape):
            return None
        for t in nf:
            old = [*old, *self._parts_of(t, loc)]
        bad = ~torch.isfinite(o)
        parts = {births: m & bad for births, m in _united(old, o.shape).items() if bool(mask_any(m & bad))}
        if not parts or bool(mask_any(bad & ~mask_any(torch.stack(list(parts.values())), 0))):
            return None
        self._keep(o, parts)
        return frozenset().union(*parts)

    def _moved_parts(self, func, o: torch.Tensor, old: list, args) -> None:
        """The parts ``old`` of ``o`` after an in-place view op (transpose_, squeeze_, as a GRU's stacked output
        is transposed): the op run on each part's mask. Dropped, every birth was named at every element: the
        padding rows' NaN a genuine finding of a used row's NaN loss."""
        try:
            with torch.no_grad(), _disable_current_modes():
                moved = [(func(m.clone(), *args[1:]), births) for m, births in old]
        except Exception:  # an explanation must never break the program it explains
            return
        if all(isinstance(m, torch.Tensor) and m.shape == o.shape for m, _ in moved):
            self._keep(o, _united(moved, o.shape))

    def _fresh_parts(self, o: torch.Tensor, fresh: torch.Tensor, b: _Birth, nf: list, loc,
                     beside: torch.Tensor | None = None) -> frozenset:
        """``o``'s births where an elementwise op made the NaN/Inf ``fresh`` (birth ``b``) beside its inputs'
        NaN/Inf: the made elements are ``b``'s part, the others keep their inputs' births (``beside``: only there,
        the inputs' NaN/Inf at ``fresh`` being what ``b`` was made of: inf / inf)."""
        pairs = [(fresh, frozenset([b])),
                 *((m if beside is None else m.broadcast_to(o.shape) & beside, births) for t in nf
                   for m, births in self._parts_of(t, loc))]
        parts = _united(pairs, o.shape)
        self._keep(o, parts)
        return frozenset().union(*parts)

    def _overwritten_parts(self, o: torch.Tensor, fresh: torch.Tensor, written: torch.Tensor, b: _Birth,
                           old: list | None, prior: frozenset) -> frozenset:
        """``o``'s births after an in-place write of a NaN/Inf constant (birth ``b``) into its elements
        ``written`` (``s.masked_fill_(m, -inf)`` on scores holding a NaN): the NaN/Inf written (``fresh``) are
        ``b``'s part, the others keep the births they had (``old``: their parts, else ``prior``)."""
        bad = ~torch.isfinite(o) & ~written
        kept = [(m.broadcast_to(o.shape) & bad, births) for m, births in old or [(bad, prior)]]
        parts = _united([(fresh, frozenset([b])), *((m, births) for m, births in kept if bool(mask_any(m)))],
                        o.shape)
        self._keep(o, parts)
        return frozenset().union(*parts)

    def _fully_masked_rows(self, func, loc, o: torch.Tensor, x: torch.Tensor, dim: int, births) -> bool:
        """(log_)softmax(x) whose rows all -inf (fully masked: 0/0 = NaN) are NaN beside rows x's NaN made NaN (another
        birth's): the masked rows are born here, of their -inf (parents), the others keep x's births, as parts.
        A NaN already in x made the op's whole output its NaN: the masked rows' NaN was told as that other birth's
        (a genuine NaN of a fully masked row named after a NaN the loss never reads). False where no row is so."""
        fresh = torch.isnan(o) & ~torch.isnan(x).any(dim, keepdim=True)
        if fresh.shape != o.shape or not bool(mask_any(fresh)):
            return False
        op, parents = _op_name(func), self._origin_at(x, loc, fresh)
        b = self._birth(op, loc, True, None, fresh, lambda idx: _Birth(
            op, loc, _explain(func, [x], o, fresh, None), 0, idx, True), parents)
        self._made(b, *self._made_of(func, o, fresh, [x], (x, dim), loc))
        rest = ~torch.isfinite(o) & ~fresh
        # (the other rows keep their parts, _rowwise_parts': one part of every birth named the used row's NaN
        # after the padding rows' too; a NaN row's -inf explain none of its NaN, as in _without_mask_infs)
        nan_only = not bool((x == float("inf")).any())
        old = [(m.broadcast_to(o.shape) & rest, frozenset(c for c in got if not nan_only or c.nan) or got)
               for m, got in self.parts.get(o) or [(rest, births)]]
        parts = _united([(fresh, frozenset([b])), *((m, got) for m, got in old if bool(mask_any(m)))], o.shape)
        self.prov[o] = frozenset().union(*parts)
        self.parts[o] = [(m, got) for got, m in parts.items()]
        return True

    def _record_parts(self, o: torch.Tensor, nf: list, loc) -> frozenset | None:
        """An elementwise op on inputs of different provenance: which births are at which elements of ``o``, and
        the births of its NaN/Inf (None: every input's). Only where ``o`` is non-finite: torch.where(keep, h, 0)
        of rows holding padding NaN beside a used NaN took the padding's births too, and the NaN loss named the
        padding a genuine finding (the where had replaced it by 0)."""
        # the trace's own ops: a strong-zero pass below the trace (a reentrant checkpoint's recomputation) would
        # meet them, and name them in an OpaqueBackwardWarning about a genuine NaN (as _joined_parts' below)
        with torch.no_grad(), _disable_current_modes():
            pairs = [p for t in nf for p in self._parts_of(t, loc)]
            parts = _united(pairs, o.shape)
            bad = ~torch.isfinite(o)
            kept = {births: m & bad for births, m in parts.items() if bool(mask_any(m & bad))}
            held = not kept or bool(mask_any(bad & ~mask_any(torch.stack(list(kept.values())), 0)))
        if held:
            self._keep(o, parts)  # (a NaN/Inf no part holds: every input's births)
            return None
        self._keep(o, kept)
        return frozenset().union(*kept)

    def _joined_parts(self, func, o: torch.Tensor, args, loc) -> None:
        """cat/stack of tensors of different provenance (or with parts): each input's parts (its NaN/Inf with its
        births, where it has none) at the place the op puts that input, the same op run on the masks. Joined,
        a padding row's NaN beside an Inf in a used row was one provenance: the Inf's 0 x inf NaN further on was
        named after the padding's NaN birth (a NaN incident prefers a NaN birth)."""
        ts = args[0]
        pairs = []
        for i, t in enumerate(ts):
            if not isinstance(t, torch.Tensor) or not _inexact(t) or not bool(_nonfinite_mask(t).any()):
                continue
            for m, births in self._parts_of(t, loc):
                masks = [m.broadcast_to(t.shape) if j == i else torch.zeros(u.shape, dtype=torch.bool, device=u.device)
                         for j, u in enumerate(ts)]
                try:
                    placed = func(masks, *args[1:])
                except Exception:  # an explanation must never break the program it explains
                    return
                if placed.shape != o.shape:
                    return
                pairs.append((placed, births))
        self._keep(o, _united(pairs, o.shape))

    def _bilinear_parts(self, func, o: torch.Tensor, nf: list, args, loc) -> frozenset | None:
        """A bilinear op (a linear layer's addmm, attention's bmm) on non-finite operands ``nf`` of different
        births (parts, or several operands): the elements of ``o`` each part's NaN/Inf reaches (the op on the
        part's indicator, every other operand 1, less the op on none: additive terms cancel), so a padding row's
        NaN stays in its rows through a model's layers; and the births of ``o``'s NaN/Inf (None: every operand's).
        Two operands each told whole named a used query row's NaN after the padding keys' too (q @ k^T)."""
        def on(t, values):
            return [[on_one(t, x, values) for x in a] if isinstance(a, (list, tuple)) else on_one(t, a, values)
                    for a in args]

        def on_one(t, a, values):
            if a is t:
                return values
            return torch.ones_like(a) if isinstance(a, torch.Tensor) and _inexact(a) else a

        parts = []
        try:
            # the trace's own ops, not the program's: a strong-zero pass below the trace (a reentrant checkpoint
            # recomputing its forward inside the backward) took zeros_like for structural zeros, and named the op
            # in an OpaqueBackwardWarning ("structural zeros reached aten.addmm.default") about a genuine NaN
            with torch.no_grad(), _disable_current_modes():
                for t in nf:
                    none = func(*on(t, torch.zeros_like(t)))
                    pairs = self._parts_of(t, loc)
                    parts += [((func(*on(t, (~torch.isfinite(t) & m.broadcast_to(t.shape)).to(t.dtype))) - none) != 0,
                               births) for m, births in pairs]
        except Exception:  # an explanation must never break the program it explains
            return None
        if not all(isinstance(m, torch.Tensor) and m.shape == o.shape for m, _ in parts):
            return None
        self.parts[o] = parts
        with torch.no_grad(), _disable_current_modes():  # (the trace's own ops: as above)
            bad = ~torch.isfinite(o)
            met = [(m & bad, births) for m, births in parts if bool(mask_any(m & bad))]
            held = not met or bool(mask_any(bad & ~mask_any(torch.stack([m for m, _ in met]), 0)))
        if held:
            return None  # (a NaN/Inf no part reaches: every operand's births)
        return frozenset().union(*(births for _, births in met))


def _probed_parts(tr: _Parts, func, o: torch.Tensor, nf: list, args, kwargs, out, loc) -> frozenset | None:
    """An op no other rule describes (group_norm, interpolate, index_add, an RNN layer, fused attention) on
    non-finite inputs ``nf`` of several births: each part's elements of ``o``, where the op run again with that
    part's NaN/Inf alone makes NaN/Inf (``_probes``); the births of ``o``'s NaN/Inf. Elements no probe makes
    non-finite (a NaN of the parts together: inf - inf across parts) hold every birth. None where not known.
    Without it ``o`` held every birth at every element: the padding rows' NaN, sliced away, was named by the
    used rows' genuine finding, or the used NaN after the padding only."""
    pairs = [(t, m, births) for t in nf for m, births in tr._parts_of(t, loc)]
    if len(pairs) > MAX_PROBES:
        return None
    with torch.no_grad(), _disable_current_modes():  # (the trace's own ops: as in _record_parts)
        bad = ~torch.isfinite(o)
        kept = []
        for t, m, births in pairs:
            made = probe(func, args, kwargs, out, o, instead_of(nf, t, m))
            if made is None:
                return None
            if bool(mask_any(made & bad)):
                kept.append((made & bad, births))
        every = frozenset().union(*(births for _, _, births in pairs))
        if not kept:
            return None
        rest = bad & ~mask_any(torch.stack([m for m, _ in kept]), 0)
        if bool(mask_any(rest)):
            kept.append((rest, every))
    parts = _united(kept, o.shape)
    tr._keep(o, parts)
    return frozenset().union(*parts)


def _written_by(func, o: torch.Tensor, args) -> torch.Tensor | None:
    """The elements of ``o`` that an in-place selected write (``_SELECTED_WRITES``: masked_fill_, index_put_,
    index_fill_) writes: the same op writing True into a bool tensor of o's shape; None where that is not known
    (an accumulating index_put_ keeps what was there, and the op failing on bools)."""
    if _schema_arg(func, args, "accumulate", False):
        return None
    names = [a.name for a in func._schema.arguments]
    new = [a if i >= len(names) or names[i] not in ("value", "values") else
           torch.ones_like(a, dtype=torch.bool) if isinstance(a, torch.Tensor) else True for i, a in enumerate(args)]
    try:
        with torch.no_grad(), _disable_current_modes():
            new[0] = torch.zeros(o.shape, dtype=torch.bool, device=o.device)
            got = func(*new)
    except Exception:  # an explanation must never break the program it explains
        return None
    return got if isinstance(got, torch.Tensor) and got.shape == o.shape else None


@functools.cache
def _rewrites_elementwise(func) -> bool:
    """Whether ``func`` is an in-place elementwise op whose result reads what its first argument held (div_, mul_,
    clamp_; not a selected write, masked_fill_, whose elements are told by ``_written_by``)."""
    first = func._schema.arguments[0] if func._schema.arguments else None
    return pointwise(func) and first is not None and first.alias_info is not None and first.alias_info.is_write \
        and func.overloadpacket not in _SELECTED_WRITES


def held_before(tr, func, args) -> torch.Tensor | None:
    """What the first argument of an in-place elementwise op (``a.div_(b)``) held before the op, where it is known
    non-finite: a copy, an input of the op in the trace's reading (``read_inputs``). Without it a's NaN/Inf were
    the op's prior provenance at no element of their own: a 0/0 beside a's written Inf took the whole output as
    its birth, and that write was in no finding."""
    t = args[0] if args and _rewrites_elementwise(func) else None
    got = tr.prov.get(t) if isinstance(t, torch.Tensor) else None
    if not got or any(isinstance(p, _Incident) for p in got):
        return None  # (a gradient's NaN (incidents) scaled in place stays the gradient's: no births to split)
    with torch.no_grad(), _disable_current_modes():
        if not _nonfinite(t):
            return None
        held = t.detach().clone()
        tr.clean[held] = tr.clean.get(t, False)  # (before the op: after it, an Inf it made finite reads as stale)
        return held


def read_inputs(tr, func, o: torch.Tensor, prior, nf: list, ins: list, old, args) -> tuple:
    """(the provenance ``o`` held before the op that the op carries on, its non-finite inputs, its inputs): with
    ``old`` (``held_before``) for ``o`` where the op read it, ``old`` taking ``o``'s births, parts and cleanness;
    none of ``prior`` where the op wrote over every element (x[3:5] = inf over a NaN row: inf is born here)."""
    if func.overloadpacket in _OVERWRITES:
        return None, nf, ins
    if old is None or not prior or o is not args[0]:
        return prior, nf, ins
    tr.prov[old] = prior
    if (parts := tr.parts.get(o)) is not None:
        tr.parts[old] = parts
    if o in tr.exact:
        tr.exact[old] = True
    return None, [old, *nf], [old if t is o else t for t in ins]
