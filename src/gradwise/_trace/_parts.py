"""``_Parts``: which births are at which elements of a tensor whose NaN/Inf came from several (``_Tracer.parts``:
tensor -> [(mask, births)]), so that a selection or a backward op names only the births of the elements it reads
(a padding row's NaN beside a used one). A part of ``_Provenance``.

May import: torch, gradwise._masks, gradwise._trace._common, _advice, _incidents, _store.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import _disable_current_modes

from gradwise._masks import mask_any
from gradwise._trace._advice import _explain
from gradwise._trace._common import _aligned, _inexact, _nonfinite_mask, _op_name, pointwise
from gradwise._trace._facts import _SELECTED_WRITES
from gradwise._trace._incidents import _in_base
from gradwise._trace._store import Birth as _Birth

_MAX_PARTS = 8  # provenance parts kept per tensor (more: the tensor's whole provenance is told everywhere)


def _united(pairs, shape) -> dict[frozenset, torch.Tensor]:
    """(mask, births) pairs with one mask per births (each mask broadcast to ``shape``)."""
    parts: dict[frozenset, torch.Tensor] = {}
    for m, births in pairs:
        m = m.broadcast_to(shape)
        parts[births] = parts[births] | m if births in parts else m
    return parts


class _Parts:
    """Provenance per element where it differs (a part of _Provenance, of _Tracer)."""

    def _keep(self, t: torch.Tensor, parts: dict[frozenset, torch.Tensor]) -> None:
        """``t``'s parts, where there are several and not too many (else its whole provenance is told)."""
        if 1 < len(parts) <= _MAX_PARTS:
            self.parts[t] = [(m, births) for births, m in parts.items()]
        else:
            self.parts.pop(t, None)

    def _written_parts(self, view: torch.Tensor, base: torch.Tensor) -> None:
        """A forward write into ``view`` of ``base`` (``p[:, 3:] = nan`` after ``p[0, 0] = inf``): the written
        elements take the view's births, the others keep theirs, as parts (``parts``) where they differ. Whole-
        tensor provenance named only the last write (the NaN of the first was told as born at the second), or,
        adding up, a padding row's NaN as used beside a used one."""
        written = _in_base(torch.ones(view.shape, dtype=torch.bool, device=view.device), view, base)
        if written.shape != base.shape:  # (a view whose layout does not map onto its base's: as before)
            self.prov[base] = self.prov[view]
            return
        old = self.parts.get(base)
        if old is None and self.prov.get(base):
            old = [(~torch.isfinite(base) & ~written, self.prov[base])]
        kept = [(m & ~written, births) for m, births in old or () if bool(mask_any(m & ~written))]
        parts = _united([*kept, (_in_base(_nonfinite_mask(view), view, base), self.prov[view])], base.shape)
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
            old = [*old, *(self.parts.get(t) or [(~torch.isfinite(t), self._origin(t, loc))])]
        bad = ~torch.isfinite(o)
        parts = {births: m & bad for births, m in _united(old, o.shape).items() if bool(mask_any(m & bad))}
        if not parts or bool(mask_any(bad & ~mask_any(torch.stack(list(parts.values())), 0))):
            return None
        self._keep(o, parts)
        return frozenset().union(*parts)

    def _fresh_parts(self, o: torch.Tensor, fresh: torch.Tensor, b: _Birth, nf: list, loc) -> frozenset:
        """``o``'s births where an elementwise op made the NaN/Inf ``fresh`` (birth ``b``) beside its inputs'
        NaN/Inf: the made elements are ``b``'s part, the others keep their inputs' births."""
        pairs = [(fresh, frozenset([b])),
                 *(p for t in nf for p in self.parts.get(t) or [(~torch.isfinite(t), self._origin(t, loc))])]
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
            pairs = [p for t in nf for p in self.parts.get(t) or [(~torch.isfinite(t), self._origin(t, loc))]]
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
            for m, births in self.parts.get(t) or [(~torch.isfinite(t), self._origin(t, loc))]:
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
                    pairs = self.parts.get(t) or [(~torch.isfinite(t), self._origin(t, loc))]
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

    def _selected_parts(self, func, o: torch.Tensor, t: torch.Tensor, args) -> frozenset | None:
        """The births of the elements a selection (``loss[mask]``) kept of an elementwise result with parts: the
        padding's births, selected away, are no provenance of the loss (they were told as a genuine NaN that
        reached the output)."""
        kept = []
        for m, births in self.parts[t]:
            sel = func(m, *args[1:])
            if isinstance(sel, (list, tuple)):  # split, unbind, chunk: the piece that is ``o``
                sel = _piece(sel, o, t, m)
            if isinstance(sel, torch.Tensor) and sel.shape == o.shape and bool(mask_any(sel)):
                kept.append((sel, births))
        if len(kept) > 1:
            self.parts[o] = kept
        return frozenset().union(*(births for _, births in kept)) if kept else None

    def _reduced_parts(self, o: torch.Tensor, t: torch.Tensor, func, args) -> frozenset | None:
        """The births of a reduction's output (``h.sum(1)``, amax, logsumexp, var...) over ``t``, whose parts hold
        different births: each part's elements reduced with any() along the op's dims, where ``o`` is non-finite,
        so a row sum keeps the row's births. The reduced tensor took every part's births: a padding row's NaN
        named the used row's NaN after the padding (the earliest birth). None where the dims are not known."""
        dims = _reduced_dims(func, args, t.dim())
        if dims is None:
            return None
        keep = _keepdim(func, args)
        bad = ~torch.isfinite(o)
        kept = []
        for m, births in self.parts[t]:
            r = mask_any(m.broadcast_to(t.shape), dims, keepdim=keep) if dims else m.broadcast_to(t.shape)
            if r.shape != o.shape:
                return None
            if bool(mask_any(r & bad)):
                kept.append((r & bad, births))
        self._keep(o, _united(kept, o.shape))
        return frozenset().union(*(births for _, births in kept)) if kept else None

    def _scanned_parts(self, o: torch.Tensor, t: torch.Tensor, func, args) -> frozenset | None:
        """The births of a scan's output (``h.cumsum(1)``, cumprod, logcumsumexp, cummax) over ``t``, whose parts
        hold different births: each part's elements carried forward along the op's dim, where ``o`` is
        non-finite. The scan took every part's births: a padding row's NaN was named at the used rows (prod's
        backward scans its input: the padding rows' births in a used row's genuine finding). None where the dim
        is not known."""
        dim = _schema_arg(func, args, "dim", None)
        if not isinstance(dim, int) or not t.dim():
            return None
        bad = ~torch.isfinite(o)
        kept = []
        for m, births in self.parts[t]:
            r = m.broadcast_to(t.shape).to(torch.int32).cumsum(dim) > 0
            if r.shape != o.shape:
                return None
            if bool(mask_any(r & bad)):
                kept.append((r & bad, births))
        self._keep(o, _united(kept, o.shape))
        return frozenset().union(*(births for _, births in kept)) if kept else None

    def _rowwise_parts(self, o: torch.Tensor, t: torch.Tensor, func, args, how) -> frozenset | None:
        """The births of a row-wise op's output (``_ROWWISE``: sort, topk, median(dim), softmax, layer norm,
        pooling; ``how`` says which dims a row spans) over ``t``, whose parts hold different births: each part's
        rows, where ``o`` is non-finite. The op took every part's births: the padding rows' NaN was named at the
        used rows (a "genuine" finding for padding the loss never reads). None where the rows are not known."""
        if func.overloadpacket is torch.ops.aten.nll_loss_forward and not o.dim():
            return self._loss_rows_parts(t, func, args)
        dims = _row_dims(func, args, t.dim(), how)
        if dims is None:
            return None
        bad = ~torch.isfinite(o)
        kept = []
        for m, births in self.parts[t]:
            m = m.broadcast_to(t.shape)
            r = mask_any(m, dims, keepdim=True)
            try:
                r = r.broadcast_to(o.shape)
            except RuntimeError:  # (the op dropped the dims: median(1))
                r = mask_any(m, dims)
            if r.shape != o.shape:
                return None
            if bool(mask_any(r & bad)):
                kept.append((r & bad, births))
        self._keep(o, _united(kept, o.shape))
        return frozenset().union(*(births for _, births in kept)) if kept else None

    def _loss_rows_parts(self, t: torch.Tensor, func, args) -> frozenset | None:
        """The births of nll_loss's mean or sum over ``t``'s rows: the parts in rows whose target is not
        ``ignore_index`` (the loss skips those rows, and its backward sends them zeros). Every part's births named
        the padding rows' NaN (ignored targets, their rows NaN) a genuine finding of the NaN loss a used row made.
        None where the rows are not known."""
        target = _schema_arg(func, args, "target", None)
        if t.dim() != 2 or not isinstance(target, torch.Tensor) or tuple(target.shape) != tuple(t.shape[:1]):
            return None
        used = target != _schema_arg(func, args, "ignore_index", -100)
        got = [births for m, births in self.parts[t] if bool(mask_any(mask_any(m.broadcast_to(t.shape), 1) & used))]
        return frozenset().union(*got) if got else None

    def _row_births(self, ts: list, loc, where: torch.Tensor, dims: tuple) -> frozenset | None:
        """The births of the NaN/Inf of ``ts`` (the saved values of a row-wise op or a scan, whose rows span
        ``dims``) in the rows of the elements ``where`` of its backward's output: a row's gradient reads that row
        alone. Every part's births named the used row's NaN after the padding rows' too (softmax, log_softmax,
        layer norm under a loss linear in them): a "genuine" padding finding, and the used NaN "reaching no
        gradient". None where a shape does not line up."""
        got = []
        for t in ts:
            if t.dim() != where.dim() or max(dims) >= t.dim():
                return None
            for m, births in self.parts.get(t) or [(~torch.isfinite(t), self._origin(t, loc))]:
                try:
                    r = mask_any(m.broadcast_to(t.shape), dims, keepdim=True).broadcast_to(where.shape)
                except RuntimeError:
                    return None
                if bool(mask_any(r & where)):
                    got.append(births)
        return frozenset().union(*got) if got else None

    def _births_apart(self, ts: list, loc, where: torch.Tensor, births: frozenset) -> list:
        """The elements ``where`` of an elementwise op's output grouped by the births of the NaN/Inf of ``ts``
        there (their parts, or each tensor's whole provenance): [(mask, births)], one group per births."""
        pairs = [(m.broadcast_to(where.shape), b) for t in ts
                 for m, b in self.parts.get(t) or [(~torch.isfinite(t), self._origin(t, loc))]]
        if not 1 < len(pairs) < 63:
            return [(where, births)]
        code = torch.zeros(where.shape, dtype=torch.int64, device=where.device)
        for i, (m, _) in enumerate(pairs):
            code |= (m & where).to(torch.int64) << i
        groups: dict[frozenset, torch.Tensor] = {}
        for c in torch.unique(code[where]).tolist():
            got = frozenset().union(*(b for i, (_, b) in enumerate(pairs) if c >> i & 1)) or births
            at = where & (code == c)
            groups[got] = groups[got] | at if got in groups else at
        return [(at, got) for got, at in groups.items()]

    def _origin_at(self, t: torch.Tensor, loc, where: torch.Tensor) -> frozenset:
        """The births of ``t``'s NaN/Inf at the elements ``where`` (``t`` broadcast to its shape): those of the
        parts there where an elementwise op recorded them, else all of ``t``'s."""
        parts = self.parts.get(t)
        if parts is None or not _aligned([t], where.shape):
            return self._origin(t, loc)
        got = frozenset().union(*(births for m, births in parts if bool(mask_any(m.broadcast_to(where.shape) & where))))
        return got or self._origin(t, loc)


def _piece(pieces, o: torch.Tensor, t: torch.Tensor, m: torch.Tensor) -> torch.Tensor | None:
    """Of a multi-output view op run on the mask ``m`` of ``t``: the piece at ``o``'s place (the same shape and
    offset in the mask as ``o`` has in ``t``, laid out alike); None where that is not known. Without it a piece of
    ``h.split(4)`` took every part's births: the padding rows split away were a genuine finding of their own."""
    if m.stride() != t.stride():
        return None
    at = o.storage_offset() - t.storage_offset()
    got = [p for p in pieces if isinstance(p, torch.Tensor) and p.shape == o.shape and
           p.storage_offset() - m.storage_offset() == at]
    return got[0] if len(got) == 1 else None


def _schema_arg(func, args, name: str, default):
    """The value of the argument ``name`` of ``func``'s schema (positional, else its default, else ``default``)."""
    for i, a in enumerate(func._schema.arguments):
        if a.name == name:
            if i < len(args):
                return args[i]
            return a.default_value if a.has_default_value() else default
    return default


def _reduced_dims(func, args, ndim: int) -> tuple | None:
    """The dims a reduction reduces (all where its ``dim`` is None or empty); None where its output is one
    element, or it names no dims (``sum.default``: one element too)."""
    if not any(a.name == "dim" for a in func._schema.arguments) or not ndim:
        return None
    dim = _schema_arg(func, args, "dim", None)
    if dim is None or (isinstance(dim, (list, tuple)) and not dim):
        return None  # every dim: one element, whose births are all of them
    dims = tuple(d % ndim for d in (dim if isinstance(dim, (list, tuple)) else (dim,)))
    return dims if len(dims) < ndim else None


def _row_dims(func, args, ndim: int, how) -> tuple | None:
    """The dims a row of a ``_ROWWISE`` op spans (``how``: an argument's name, or the last ``how`` dims)."""
    if not ndim:
        return None
    if isinstance(how, int):
        return tuple(range(max(ndim - how, 0), ndim))
    if not any(a.name == how for a in func._schema.arguments):
        return None  # (median() of everything: one element)
    got = _schema_arg(func, args, how, -1 if how == "dim" else None)
    if how == "normalized_shape":
        return tuple(range(ndim - len(got), ndim)) if isinstance(got, (list, tuple)) and got else None
    return (got % ndim,) if isinstance(got, int) else None


def _keepdim(func, args) -> bool:
    return bool(_schema_arg(func, args, "keepdim", False))


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
