"""``_RowParts``: the births at each element of a tensor with parts (``_Tracer.parts``: tensor -> [(mask,
births)]) carried through the ops that move or combine elements along dims: selections, reductions, scans, row-wise
ops and their backwards, so a finding names only the births of the elements it reads. The base of ``_Parts``
(``_parts``: the elementwise, in-place, join and bilinear ops), a part of ``_Provenance``.

May import: torch, gradwise._masks, gradwise._trace._common.
"""

from __future__ import annotations

import torch

from gradwise._masks import mask_any
from gradwise._trace._common import _aligned, pointwise
from gradwise._trace._facts import _NAN_OF_FULL_ROWS, _ROWWISE

_MAX_PARTS = 8  # provenance parts kept per tensor (more: the smallest are told together, ``_merged``)
# the report's note where a tensor held more parts than that (``_Assembly._finish`` words it)
MERGED = "births told together"


def _united(pairs, shape) -> dict[frozenset, torch.Tensor]:
    """(mask, births) pairs with one mask per births (each mask broadcast to ``shape``)."""
    parts: dict[frozenset, torch.Tensor] = {}
    for m, births in pairs:
        m = m.broadcast_to(shape)
        parts[births] = parts[births] | m if births in parts else m
    return parts


class _RowParts:
    """Provenance per element through selections, reductions, scans and row-wise ops (the base of _Parts)."""

    def _keep(self, t: torch.Tensor, parts: dict[frozenset, torch.Tensor]) -> None:
        """``t``'s parts, where there are several (past ``_MAX_PARTS``, the smallest told together: ``_merged``)."""
        if len(parts) > _MAX_PARTS:
            parts = self._merged(parts)
        if len(parts) > 1:
            self.parts[t] = [(m, births) for births, m in parts.items()]
        else:
            self.parts.pop(t, None)
        if len(parts) == 1:  # (every non-finite element has all its births: _Tracer.exact)
            self.exact[t] = True
        else:
            self.exact.pop(t, None)

    def _merged(self, parts: dict[frozenset, torch.Tensor]) -> dict[frozenset, torch.Tensor]:
        """``parts`` cut to ``_MAX_PARTS``: the smallest (fewest elements) made one part of all their births, and
        the report says so (``MERGED``). Where that part's elements go, each of its births is named: a finding may
        name a birth the output does not use (never one less). Dropped altogether, every birth was named at every
        element: the padding rows' NaN beside nine used writes was a genuine finding reaching w."""
        by_size = sorted(parts.items(), key=lambda p: int(p[1].sum()))
        cut = len(parts) - _MAX_PARTS + 1
        small, kept = by_size[:cut], dict(by_size[cut:])
        births = frozenset().union(*(b for b, _ in small))
        mask = small[0][1]
        for _, m in small[1:]:
            mask = mask | m
        kept[births] = kept[births] | mask if births in kept else mask
        self._pass_over(MERGED, "a tensor")
        return kept

    def _selected_parts(self, func, o: torch.Tensor, t: torch.Tensor, args) -> frozenset | None:
        """The births of the elements a selection (``loss[mask]``) kept of an elementwise result with parts: the
        padding's births, selected away, are no provenance of the loss (they were told as a genuine NaN that
        reached the output)."""
        kept = []
        for m, births in self.parts[t]:
            m = _laid_out_like(m, t)
            try:
                sel = func(m, *args[1:])
            except RuntimeError:  # an explanation must never break the program it explains
                return None
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
            if o.numel() == 1:  # (of every element: each part's births at its one element, _Tracer.exact)
                self.exact[o] = True
            return None
        keep = _keepdim(func, args)
        return self._spread_parts(o, t, lambda m: mask_any(m, dims, keepdim=keep) if dims else m)

    def _scanned_parts(self, o: torch.Tensor, t: torch.Tensor, func, args) -> frozenset | None:
        """The births of a scan's output (``h.cumsum(1)``, cumprod, logcumsumexp, cummax) over ``t``, whose parts
        hold different births: each part's elements carried forward along the op's dim, where ``o`` is
        non-finite. The scan took every part's births: a padding row's NaN was named at the used rows (prod's
        backward scans its input: the padding rows' births in a used row's genuine finding). None where the dim
        is not known."""
        dim = _schema_arg(func, args, "dim", None)
        if not isinstance(dim, int) or not t.dim():
            return None
        return self._spread_parts(o, t, lambda m: m.to(torch.int32).cumsum(dim) > 0)

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

        def rows(m: torch.Tensor) -> torch.Tensor:
            r = _windows(func, m, args)
            if r is None:
                r = mask_any(m, dims, keepdim=True)
                try:
                    r = r.broadcast_to(o.shape)
                except RuntimeError:  # (the op dropped the dims: median(1))
                    r = mask_any(m, dims)
            return r

        return self._spread_parts(o, t, rows)

    def _spread_parts(self, o: torch.Tensor, t: torch.Tensor, spread) -> frozenset | None:
        """The births of ``o`` made from ``t``'s parts: each part's mask (broadcast to ``t``) spread as the op
        spreads it (``spread``: reduced, scanned, row-wise), kept where ``o`` is non-finite; None where a spread
        mask does not have ``o``'s shape."""
        bad = ~torch.isfinite(o)
        kept = []
        for m, births in self.parts[t]:
            r = spread(m.broadcast_to(t.shape))
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

    def _row_births(self, ts: list, loc, where: torch.Tensor, dims: tuple,
                    none: frozenset | None = None) -> frozenset | None:
        """The births of the NaN/Inf of ``ts`` (the saved values of a row-wise op or a scan, whose rows span
        ``dims``) in the rows of the elements ``where`` of its backward's output: a row's gradient reads that row
        alone. Every part's births named the used row's NaN after the padding rows' too (softmax, log_softmax,
        layer norm under a loss linear in them): a "genuine" padding finding, and the used NaN "reaching no
        gradient". None where a shape does not line up."""
        got = []
        for t in ts:
            if t.dim() != where.dim() or max(dims) >= t.dim():
                return None
            for m, births in self._parts_of(t, loc):
                try:
                    r = mask_any(m.broadcast_to(t.shape), dims, keepdim=True).broadcast_to(where.shape)
                except RuntimeError:
                    return None
                if bool(mask_any(r & where)):
                    got.append(births)
        return frozenset().union(*got) if got else none

    def _births_apart(self, ts: list, loc, where: torch.Tensor, births: frozenset) -> list:
        """The elements ``where`` of an elementwise op's output grouped by the births of the NaN/Inf of ``ts``
        there (their parts, or each tensor's whole provenance): [(mask, births)], one group per births."""
        pairs = [(m.broadcast_to(where.shape), b) for t in ts for m, b in self._parts_of(t, loc)]
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

    def _made_of(self, func, o: torch.Tensor, born: torch.Tensor, nf: list, args, loc) -> tuple[frozenset, bool]:
        """The births of the infinities a NaN born at ``func`` was made of (``_infinities_at``), and whether a NaN
        element was made of none (own)."""
        at, own = _infinities_at(func, o, born, nf, args)
        if at is None:
            return frozenset(), True
        # (each input's own infinities there: one finite there fell back to every birth it holds, _origin_at's)
        got = [(t, at & ~torch.isfinite(t).broadcast_to(at.shape)) for t in nf]
        made = frozenset().union(*(self._origin_at(t, loc, w) for t, w in got if bool(w.any())))
        return made, own or not made

    @staticmethod
    def _made(b, made: frozenset, own: bool = True) -> None:
        """Record at the NaN birth ``b`` (interned per op and line) what this occurrence was made of: its
        infinities, and ``own`` where an element was made of none (a later step's 0/0 at a site whose first NaN
        was inf / inf was told as those infinities, the div's own NaN gone; a 0/0 beside an inf / inf in one
        output named the inf / inf's infinities nowhere)."""
        b.made_of = b.made_of | made
        if own or not made:
            b.own = True

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


_POOLS = {torch.ops.aten.max_pool2d_with_indices, torch.ops.aten.max_pool3d_with_indices, torch.ops.aten.avg_pool2d,
          torch.ops.aten.avg_pool3d}


def _windows(func, m: torch.Tensor, args) -> torch.Tensor | None:
    """Of a pooling: the output elements whose window holds an element of the mask ``m`` (the pooling run on it:
    a max or mean of 0/1 is nonzero exactly there); None for other ops. Its plane as the row named the padding
    rows' NaN at the used windows: a genuine padding finding."""
    if func.overloadpacket not in _POOLS:
        return None
    try:
        with torch.no_grad():
            got = func(m.to(torch.float32), *args[1:])
    except RuntimeError:  # an explanation must never break the program it explains
        return None
    return (got[0] if isinstance(got, (list, tuple)) else got) != 0


def _laid_out_like(m: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A part's mask ``m`` of ``t`` (broadcast to its shape) laid out as ``t`` is, so that a view op runs on it
    as on ``t``: ``view`` of a contiguous mask of a transposed ``t`` (multi-head attention's q.view(...) after a
    transpose) raised, the view lost its parts (every birth named at every row: the padding rows' NaN a genuine
    finding) and the report said "not explained". ``m`` as it is where ``t`` overlaps itself (expanded)."""
    m = m.broadcast_to(t.shape)
    if m.stride() == t.stride() or torch._debug_has_internal_overlap(t) != 0:
        return m
    out = torch.empty_strided(t.shape, t.stride(), dtype=torch.bool, device=t.device)
    return out.copy_(m)


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


def _infinities_at(func, o: torch.Tensor, born: torch.Tensor, nf: list, args) -> tuple:
    """(where the infinities lie that a NaN born at ``func`` (its elements ``born``) was made of, whether a NaN
    element there was made of none: its own root). Elementwise, the inputs' non-finite elements at each NaN
    element, in ``o``'s shape (its inputs broadcast), a 0/0 beside them own: one 0/0 made the whole output its
    own root, and an inf / inf beside it named neither infinity. Else in the rows it read (a reduction's, a
    row-wise op's: in the input's shape; +inf for a softmax, whose -inf are a mask's); None where a NaN element
    had none (a fully masked row) or the op's element map is not known: the NaN is its own root. A birth's
    parents are every birth of its inputs: a 0/0 beside an unused written Inf, a fully masked row beside a row
    holding +inf, were renamed after that Inf (review_tr34)."""
    x = nf[0] if nf else None
    if pointwise(func) and _aligned(nf, o.shape):
        at = torch.zeros(o.shape, dtype=torch.bool, device=o.device)
        for t in nf:
            at |= ~torch.isfinite(t).broadcast_to(o.shape)
        return born & at, bool((born & ~at).any())
    if len(nf) != 1 or not args or args[0] is not x or not x.dim():
        return None, True
    if func.overloadpacket in _ROWWISE and o.shape == x.shape:
        dims = _row_dims(func, args, x.dim(), _ROWWISE[func.overloadpacket])
        if dims is None:
            return None, True
        inf = x == float("inf") if func.overloadpacket in _NAN_OF_FULL_ROWS else ~torch.isfinite(x)
        rows = mask_any(born, dims, keepdim=True)
        return (None, True) if bool((rows & ~mask_any(inf, dims, keepdim=True)).any()) else (rows & inf, False)
    if torch.Tag.reduction not in func.tags:
        return None, True
    dims = _reduced_dims(func, args, x.dim())
    if dims is None:
        return (~torch.isfinite(x), False) if o.numel() == 1 else (None, True)
    keep = _keepdim(func, args)
    at = mask_any(~torch.isfinite(x), dims, keepdim=keep)
    if at.shape != born.shape or bool((born & ~at).any()):
        return None, True
    rows = born if keep else born.reshape([1 if d in dims else n for d, n in enumerate(x.shape)])
    return rows & ~torch.isfinite(x), False
