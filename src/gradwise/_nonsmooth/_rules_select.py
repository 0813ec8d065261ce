"""Kink rules for selections and orderings: max/min/amax/amin reductions, max-pool (plain and adaptive), sort,
topk, kthvalue, median, nanmedian, mode, cummax/cummin.

May import: torch, gradwise._masks, ``_errors``, ``_lazy``, ``_records``, ``_rules``, ``_rules_pointwise``.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from gradwise._masks import mask_all, mask_any
from gradwise._nonsmooth import _lazy
from gradwise._nonsmooth._errors import NonsmoothError
from gradwise._nonsmooth._records import Kink, _lex_key, _Run, _user_line
from gradwise._nonsmooth._rules import _LazyRows, _split, _tied_rows, kink_rule
from gradwise._nonsmooth._rules_pointwise import maximum, minimum

aten = torch.ops.aten
Tensor = torch.Tensor


# --- selections: max / min reductions, max-pool --------------------------------------------------------------


def _select_last(run, op: str, x: Tensor, xw: Tensor, tw_fn: Callable, vw_fn: Callable, idx: Tensor,
                 descending: bool) -> Tensor:
    """Lock indices for a reduction over the last dim of window view ``xw`` of x's primal.

    ``idx`` holds PyTorch's choice (first extreme element); rows with ties get the lexicographic winner.
    ``tw_fn(rows)``/``vw_fn(rows)`` give the tangents/values of the tied rows' candidates.
    """
    best = xw.amax(-1, keepdim=True) if descending else xw.amin(-1, keepdim=True)
    gap = (best - xw).abs()
    eq = gap <= run.tie_tol
    if run.near_tol is not None:
        run.note_near(op, gap)
    tie = eq.sum(-1) > 1
    if not mask_any(tie):
        return idx
    flat = run.flat_source(x) if run.tie_tol == 0 else None
    if flat is not None and flat[1] is None:  # ties among relu-dead elements only: locally constant, no kink
        tie &= best.squeeze(-1) != flat[0]
        if not mask_any(tie):
            return idx
    rows = _tied_rows(tie)
    cand = eq.reshape(-1, eq.shape[-1])[rows]
    choice, _ = run.resolve(op, "select", cand, tw_fn(rows), lambda: vw_fn(rows), descending)
    idx = idx.clone()
    idx.view(-1)[rows] = choice.to(idx.dtype)
    run.kinks[-1].write = lambda c: idx.data.view(-1).index_put_((rows,), c.to(idx.dtype))
    return idx


def _rows_of(t: Tensor | None, like: Tensor, rows: Tensor) -> Tensor:
    if t is None:
        return torch.zeros(len(rows), like.shape[-1], dtype=like.dtype, device=like.device)
    return t.reshape(-1, t.shape[-1])[rows]


def _reduce_select(run, op: str, x: Tensor, dims: tuple[int, ...] | None, keepdim: bool, descending: bool):
    """max/min over ``dims`` (all if None): locked values and their flat indices within the reduced dims."""
    xp = _split(x)[0]
    nd = xp.dim()
    dims = tuple(range(nd)) if dims is None or dims == () else tuple(d % max(nd, 1) for d in dims)
    keep = [d for d in range(nd) if d not in dims]
    perm = keep + list(dims)
    xm = x.permute(perm).reshape(*[xp.shape[d] for d in keep], -1) if nd else x.reshape(1)
    xw = _split(xm)[0]
    idx = (xw.argmax(-1) if descending else xw.argmin(-1))
    tm = _split(xm)[1]
    idx = _select_last(run, op, x, xw, lambda r: _rows_of(tm, xw, r), lambda r: xm.reshape(-1, xw.shape[-1])[r],
                       idx, descending)
    values = xm.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    if keepdim:
        shape = [1 if d in dims else xp.shape[d] for d in range(nd)]
        values, idx = values.reshape(shape), idx.reshape(shape)
    return values, idx


def _max_min(op: str, descending: bool, pair_rule: Callable):
    def rule(run, func, x, dim=None, keepdim=False, *, out=None):
        if isinstance(dim, Tensor):  # torch.max(a, b) is elementwise
            return pair_rule(run, torch.maximum if descending else torch.minimum, x, dim)
        if dim is None:
            return _reduce_select(run, op, x, None, False, descending)[0]
        values, idx = _reduce_select(run, op, x, (dim,), keepdim, descending)
        rt = torch.return_types.max if descending else torch.return_types.min
        return rt((values, idx))

    rule.__name__ = op.split(".")[1]
    word = "largest" if descending else "smallest"
    rule.__doc__ = (f"{op} (full or over a dim). Over tied {word} elements: the one that is {word} along "
                    f"the direction (then further directions), so f'(x; d) is the {word} tangent of the tied set.")
    return rule


kink_rule(aten.max, torch.max, Tensor.max)(_max_min("aten.max", True, maximum))
kink_rule(aten.min, torch.min, Tensor.min)(_max_min("aten.min", False, minimum))


def _amax_amin(op: str, descending: bool):
    def rule(run, func, x, dim=(), keepdim=False):
        dims = (dim,) if isinstance(dim, int) else tuple(dim)
        return _reduce_select(run, op, x, dims, keepdim, descending)[0]

    rule.__name__ = op.split(".")[1]
    rule.__doc__ = f"{op}: like {op.replace('a', '', 1)}; PyTorch splits ties evenly, gradwise picks the winner."
    return rule


kink_rule(aten.amax, torch.amax, Tensor.amax)(_amax_amin("aten.amax", True))
kink_rule(aten.amin, torch.amin, Tensor.amin)(_amax_amin("aten.amin", False))


@functools.lru_cache(maxsize=64)
def _window_index(spatial, nd: int, k, s, p, dil, out_sp, device) -> Tensor:
    """(outputs, K) flat input index of every window element (-1 for padding). Cached per shape (a training loop
    pools the same shapes every step): callers only read it."""
    pads = []
    for i in reversed(range(nd)):
        need = (out_sp[i] - 1) * s[i] + (k[i] - 1) * dil[i] + 1
        pads += [p[i], max(0, need - spatial[i] - p[i])]
    grid = F.pad(torch.arange(math.prod(spatial), device=device).reshape(1, *spatial), pads, value=-1)
    for i in range(nd):
        grid = grid.unfold(1 + i, (k[i] - 1) * dil[i] + 1, s[i])
    grid = grid[(0, *(slice(0, o) for o in out_sp), *(slice(None, None, d) for d in dil))]
    return grid.reshape(math.prod(out_sp), -1)


def _window_views(t: Tensor, nd: int, k, s, p, dil, out_sp, fill) -> list[Tensor]:
    """The prod(k) strided views of t shaped like the pool's output, view j holding the j-th element of every
    window (t padded with ``fill`` where windows overhang it; no copy otherwise)."""
    pads = []
    for i in reversed(range(nd)):
        need = (out_sp[i] - 1) * s[i] + (k[i] - 1) * dil[i] + 1
        pads += [p[i], max(0, need - t.shape[t.dim() - nd + i] - p[i])]
    if any(pads):
        t = F.pad(t, pads, value=fill)
    spans = list(zip(dil, out_sp, s, strict=True))
    return [t[(..., *(slice(o * d, o * d + (n - 1) * st + 1, st) for o, (d, n, st) in zip(offs, spans, strict=True)))]
            for offs in itertools.product(*map(range, k))]


def _pool_ties(run: _Run, op: str, x: Tensor, out: Tensor, nd: int, k, s, p, dil) -> tuple[Tensor | None,
                                                                                           Tensor | None]:
    """Windows whose maximum ``out`` is attained more than once, relu-dead windows excepted (None: no such window),
    and, for exact ties in windows of at most 31 elements, which elements attain it (an integer per window, bit j
    for the window's element j, `_window_index`'s order; else None).

    One comparison per window element over strided views of x, no re-pooling. A window whose tied elements are
    all relu-dead (the output of a switch that is locally constant there, see `_Run.mark_flat`) is no kink: the
    maximum is locally constant, and every choice gives the same (zero) gradient.
    """
    xp = _split(x)[0].detach()
    views = _window_views(xp, nd, k, s, p, dil, out.shape[out.dim() - nd:], -math.inf)
    hits = None
    if run.near_tol is not None or run.tie_tol:
        gap = torch.stack([out - v for v in views], -1)
        run.note_near(op, gap[gap > 0])
        tie = (gap <= run.tie_tol).sum(-1) > 1
    elif len(views) <= 31:
        e = torch.empty(out.shape, dtype=torch.bool, device=out.device)
        bits = torch.uint8 if len(views) <= 8 else torch.int16 if len(views) <= 15 else torch.int32
        first = torch.eq(views[0], out)
        hits = first.view(torch.uint8) if bits is torch.uint8 else first.to(bits)
        for j, v in enumerate(views[1:], 1):
            hits.add_(torch.eq(v, out, out=e), alpha=1 << j)
        tie = hits.bitwise_and(hits - 1).bool()  # two bits or more (a comparison kernel is ~10x a conversion)
    else:
        e = torch.empty(out.shape, dtype=torch.bool, device=out.device)
        count = torch.zeros(out.shape, dtype=torch.uint8 if len(views) < 256 else torch.int32, device=out.device)
        for v in views:
            count.add_(torch.eq(v, out, out=e))
        tie = count > 1
    if not mask_any(tie):
        return None, None
    flat = run.flat_source(x) if run.tie_tol == 0 else None
    if flat is not None:
        c, live = flat
        live_window = out.bool() if c == 0 else out != c  # (bool(): nonzero or NaN, as != 0, ~10x faster)
        if live is not None:  # a tied element on the switch's own kink makes the window live
            for v, lv in zip(views, _window_views(live.to(torch.uint8), nd, k, s, p, dil, out.shape[-nd:], 0),
                             strict=True):
                live_window |= (v == out) & lv.bool()
        tie &= live_window
        if not mask_any(tie):
            return None, None
    return tie, hits


def _pool_known(run: _Run, op: str, x: Tensor, rec: Kink, return_indices: bool):
    """Ranked pass: the probe found ``rec``'s tied windows; rank them by tangent, gather at its lock indices."""
    lock, fpos, pad, batch, shape = rec.site
    xt = _split(x)[1]
    key = None if xt is None else _lazy.take(xt, fpos)
    key = key if pad is None or key is None else key.masked_fill(pad, 0.0)
    choice, _ = run.resolve(op, "select", rec.cand, key, None)
    rec.write(choice)
    if isinstance(xt, _lazy.LazyTangent) or (xt is not None and not run.tangent_read()):
        values = _split(x)[0].reshape(batch, -1).gather(1, lock.reshape(batch, -1)).reshape(shape)
        if run.tangent_read():  # (else the pass's last tie: no tangent) computed where a later kink rule reads it
            tangent, keep = _lazy.gathered_tangent(xt, lock.view(shape), values.detach(), batch)
            keep()  # (the probe's lock: written after this pass)
            values = fwAD.make_dual(values, tangent)
    else:
        values = x.reshape(batch, -1).gather(1, lock.reshape(batch, -1)).reshape(shape)
    return (values, lock) if return_indices else values


def _pool_lock(run: _Run, op: str, x: Tensor, out: Tensor, idx: Tensor, tie: Tensor | None, windows: Tensor,
               batch: int, return_indices: bool, hits: Tensor | None = None):
    """Finish a max-pool-like op whose native ``out``/``idx`` came from x's primal: rank the ``tie`` windows
    (``windows``: (outputs, K) flat input index of each window element, -1 for padding) and lock their indices.

    The choices are written into the indices that the backward reads (without a version bump), so the graph stays
    PyTorch's own (its max-pool node, or the gather of `_native_pool`'s channels-last route); in a tangent-free
    pass the first maximum stands until the ranked pass writes. With
    tangents, the output's tangent is the input's tangent at the locked indices. ``hits`` (`_pool_ties`): which
    elements of each window attain its maximum, read instead of comparing the gathered values again.

    The G tied windows' elements are gathered as (K, G), window element first: CPU kernels over a (G, K) tensor,
    whose inner dim is a window's few elements, run 5-10x slower. Records see the (G, K) transposes.
    """
    xp, xt = _split(x)
    xp, op_ = xp.detach(), out.detach()

    def finish(lock, rec=None):
        if xt is not None and not run.tangent_read():  # (the last tie of a pass that drops tangents after it)
            o = out
        elif isinstance(xt, _lazy.LazyTangent):  # computed where a later kink rule reads it
            tangent, keep = _lazy.gathered_tangent(xt, lock, out.detach(), batch)
            if rec is not None:  # a later write of the lock (the ranked pass's) keeps this pass's indices first
                write = rec.write
                rec.write = lambda c: (keep(), write(c))[1]
            o = fwAD.make_dual(out, tangent)
        else:
            o = out if xt is None else fwAD.make_dual(out, xt.reshape(batch, -1).gather(
                1, lock.reshape(batch, -1)).reshape(out.shape))
        return (o, lock) if return_indices else o

    if tie is None:
        return finish(idx)
    n_out = windows.shape[0]
    plane, within = tie.reshape(batch, n_out).nonzero().unbind(1)  # (no int64 division of flat rows)
    rows, plane = plane * n_out + within, plane * (xp.numel() // max(batch, 1))
    padded = bool(mask_any(windows < 0))
    offsets = windows[0] - windows[0, 0]
    if not padded and bool((windows - windows[:, :1] == offsets).all()):  # every window a shift of the first
        start = windows[:, 0].contiguous().take(within)
        fpos = offsets.unsqueeze(1) + (start + plane)  # (K, G), contiguous
        locked = lambda c: offsets.take(c).add_(start)
    else:
        cidx = F.embedding(within, windows).t()  # (K, G) view: index_select's kernel is several times slower
        fpos = (cidx.clamp(min=0) if padded else cidx) + plane
        locked = lambda c: cidx.gather(0, c.unsqueeze(0)).squeeze(0)
    pad = cidx < 0 if padded else None
    # (index_select of the flat (K, G) positions: ~0.8x take's time, same elements)
    gathered = lambda t: _lazy.take(t, fpos)  # (a lazy tangent: those elements only)
    pick = lambda t, fill: gathered(t) if pad is None else gathered(t).masked_fill(pad, fill)
    source = xt  # a relu's output whose candidates (exact ties: each at its window's maximum) are all > 0: the
    # relu's tangent there is its input's, read without the mask
    if isinstance(xt, _lazy.LazyTangent) and xt.where_positive is not None and not xt.computed() \
            and run.tie_tol == 0 and mask_all(op_.reshape(-1).take(rows) > 0):
        source = xt.where_positive
    key = pick(source, 0.0) if xt is not None else None
    choice = None
    if hits is not None and not padded and run.ranks_alone(xt):  # (padding is never a candidate here)
        bits = hits.reshape(-1).take(rows) >> torch.arange(fpos.shape[0], dtype=hits.dtype,
                                                           device=rows.device).unsqueeze(1)
        cand = bits.bitwise_and_(1)  # (K, G), 0/1
        choice = _first_best(cand, key)
    if choice is not None:  # ranked by this pass's tangent alone: the record's tensors are built if read
        rec = run.lazy_record(op, "select", lambda: cand.t().bool(), lambda: [key.t()], choice)
    else:
        best = op_.reshape(-1).take(rows)
        vals = pick(xp, -math.inf)
        cand = vals == best if run.tie_tol == 0 else best - vals <= run.tie_tol
        if padded and not bool((keep := cand.sum(0) > 1).all()):  # windows tied only with padding (-inf input)
            rows, fpos, pad, cand = rows[keep], fpos[:, keep], pad[:, keep], cand[:, keep]
            cidx = cidx[:, keep]
            key = key[:, keep] if key is not None else None
            if len(rows) == 0:
                return finish(idx)
        choice, _ = run.resolve(op, "select", cand.t(), key.t() if key is not None else None,
                                lambda: pick(x, -math.inf).t(), lazy=True)
        rec = run.kinks[-1]
    lock = idx if idx.is_contiguous() else idx.clone(memory_format=torch.contiguous_format)
    rec.write = lambda c: lock.data.view(-1).scatter_(0, rows, locked(c))  # (rows distinct: index_put_'s result)
    rec.site = (lock, fpos.t(), None if pad is None else pad.t(), batch, op_.shape)
    if choice is not None:
        rec.write(choice)
    if lock is idx:
        return finish(idx, rec)
    values = x.reshape(batch, -1).gather(1, lock.reshape(batch, -1)).reshape(op_.shape)
    return (values, lock) if return_indices else values


def _first_best(cand: Tensor, key: Tensor) -> Tensor | None:
    """Per column of (K, G) ``cand`` (0/1, each column with a candidate): the first candidate whose ``key`` is
    largest, ``_lex_argmax``'s choice for one key; None where a key that decides is not finite (``_lex_argmax``
    then).

    Without a boolean select (where, masked_fill: ~5x a float op on CPU): candidates keep their key (0 + key),
    the others get -finfo.max (-max + 0 key), below every finite candidate key (a candidate at -max: None). Then
    each column's first maximum by one max-pool over it: the (K, G) tensor read as a channels-last image
    (1, G, K, 1), whose kernel runs vectorised across columns and keeps the first of equal maxima (a later one
    must be larger; a NaN would win, but a NaN anywhere gives None); ~0.2x the time of the float compare, byte sum
    and table lookup it replaces."""
    if key.dtype not in (torch.float32, torch.float64) or not 2 <= key.shape[0] <= 31:
        return None
    lowest, key = torch.finfo(key.dtype).max, key.detach()
    c = cand.to(key.dtype)
    masked = torch.addcmul(c.mul(lowest).sub_(lowest), key, c).contiguous()
    k, g = masked.shape
    top, first = F.max_pool2d(masked.as_strided((1, g, k, 1), (k * g, 1, g, g)), (k, 1), return_indices=True)
    least, most = torch.aminmax(top)
    if not (float(least) > -lowest and float(most) < math.inf):  # (a NaN fails both)
        return None
    return first.reshape(g)


def _native_pool(native: Callable, xp: Tensor, k, s, p, dil, ceil_mode: bool, return_indices: bool):
    """PyTorch's max-pool of x's primal: its values (in x's graph) and indices.

    For 2-D windows that do not overlap, over a contiguous float batch of 8 channels or more (the values only:
    f sees no indices), the indices come from PyTorch's channels-last kernel, run on a channels-last copy without
    a graph, and the values are a gather of x at them: the NCHW kernel is not vectorised (~2.3 ms for a batch of
    64 16-channel 32 x 32 images, ~0.55 ms channels-last). Both kernels scan a window in the same order with the
    same test (larger, or NaN), so they pick the same element (tests/test_pool_layout.py checks ties, -0.0, NaN,
    +-inf, windows of -inf, padding, ceil_mode) and values and indices are PyTorch's;
    the gather's backward adds each gradient to 0 at its index as max-pool's does, and with disjoint windows no
    element gets two, so the gradient is PyTorch's too, bit for bit. The gather reads the indices at backward time,
    as max-pool's node does, so the ranking is written into them the same way."""
    if xp.dim() == 4 and len(k) == 2 and not return_indices and xp.dtype in (torch.float32, torch.float64) \
            and xp.device.type == "cpu" and xp.shape[1] >= 8 and xp.is_contiguous() \
            and all(a >= b for a, b in zip(s, k, strict=True)) and tuple(dil) == (1, 1):
        with torch.no_grad():
            _, idx = native(xp.detach().contiguous(memory_format=torch.channels_last), k, s, p, dil, ceil_mode,
                            return_indices=True)
        idx = idx.contiguous()
        return xp.flatten(2).gather(2, idx.flatten(2)).view(idx.shape), idx
    return native(xp, k, s, p, dil, ceil_mode, return_indices=True)  # PyTorch's own node, in the graph


def _max_pool(nd: int):
    native = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nd]
    op = f"aten.max_pool{nd}d"

    def rule(run, func, x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
             return_indices=False):
        tup = lambda v: (tuple(v) * nd)[:nd] if isinstance(v, (list, tuple)) else (v,) * nd
        k, p, dil = tup(kernel_size), tup(padding), tup(dilation)
        s = k if stride is None or stride == [] or stride == () else tup(stride)
        if known := run.known_here():
            return _pool_known(run, op, x, known[0], return_indices)
        xp = _split(x)[0]
        out, idx = _native_pool(native, xp, k, s, p, dil, ceil_mode, return_indices)
        tie, hits = _pool_ties(run, op, x, out.detach(), nd, k, s, p, dil)
        spatial, out_sp = xp.shape[xp.dim() - nd:], out.shape[out.dim() - nd:]
        ints = lambda v: tuple(map(int, v))  # (the cache's key)
        windows = None if tie is None else _window_index(ints(spatial), nd, ints(k), ints(s), ints(p), ints(dil),
                                                         ints(out_sp), xp.device)
        return _pool_lock(run, op, x, out, idx, tie, windows, math.prod(xp.shape[: xp.dim() - nd]), return_indices,
                          hits)

    rule.__name__ = f"max_pool{nd}d"
    rule.__doc__ = (f"{op}: in a window with tied maxima, the element largest along the direction (PyTorch "
                    "takes the first), so f'(x; d) is the largest tangent over the tied window; the indices are "
                    "locked. Windows whose tied elements are all relu-dead are no kink.")
    return rule


kink_rule(aten.max_pool1d, F.max_pool1d, torch.max_pool1d, F.max_pool1d_with_indices)(_max_pool(1))
kink_rule(aten.max_pool2d_with_indices, F.max_pool2d, torch.max_pool2d, F.max_pool2d_with_indices)(_max_pool(2))
kink_rule(aten.max_pool3d_with_indices, F.max_pool3d, torch.max_pool3d, F.max_pool3d_with_indices)(_max_pool(3))


# --- orderings: sort, topk, kthvalue, median ----------------------------------------------------------------


def _reaching(links: Tensor, lo: int, hi: int) -> Tensor:
    """(G, m) bool in sorted order: the elements of tie groups (maximal runs of tied neighbours; ``links``
    (G, m - 1) says which neighbours j, j + 1 tie) that hold a tie pair j, j + 1 with lo <= j < hi.

    A group spanning positions a < b holds one iff a < hi and b > lo: every element in [lo + 1, hi - 1] of a
    group qualifies, one at j >= hi iff its group runs unbroken from hi - 1 to j, one at j <= lo iff from j to
    lo + 1."""
    grouped = torch.zeros(links.shape[0], links.shape[1] + 1, dtype=torch.bool, device=links.device)
    grouped[:, 1:] = links
    grouped[:, :-1] |= links
    if hi < links.shape[1]:  # j >= hi: links hi - 1 ... j - 1 all tie
        grouped[:, hi:] &= (~links[:, hi - 1:]).cumsum(-1) == 0
    if lo > 0:  # j <= lo: links j ... lo all tie
        grouped[:, : lo + 1] &= (~links[:, : lo + 1]).flip(-1).cumsum(-1).flip(-1) == 0
    return grouped


def _shared_lex_key(run, x: Tensor, dim: int, pm: Tensor, tm: Tensor) -> Tensor | None:
    """`_lex_key` of x's (primal, tangent) with ``dim`` last (``pm``, ``tm``), computed once per pass for each x
    and dim: the order ops of one pass on the same tensor (a topk and a sort of one score tensor) share it."""
    entry = run.lex_keys.get(x)
    if entry is not None and entry[0] == (dim, x._version):
        return entry[1]
    key = _lex_key(pm, tm)
    run.lex_keys[x] = ((dim, x._version), key)
    return key


def _ordered(run, op: str, x: Tensor, dim: int, descending: bool, positions: slice):
    """Locked permutation sorting x along dim; ties that reach ``positions`` ranked lexicographically."""
    xp = _split(x)[0]
    dim = dim % max(xp.dim(), 1)
    xm = x.movedim(dim, -1) if xp.dim() else x.reshape(1)
    pm, tm = _split(xm)
    # with this pass's tangent as the only ranking key, one stable sort of a (value, tangent) key gives both the
    # sorted values and the lexicographic order of every row (``_lex_order``'s, which takes two more sorts)
    lex = _shared_lex_key(run, x, dim, pm, tm) if tm is not None and run.own_key_only() else None
    lazy = lex is not None and run.ranks_alone(tm)  # the sort's order is the choice: the record is built if read
    out = None
    # (perm contiguous: the lock writes ranked rows through perm.view(-1, m), and a sort along a moved dim returns
    # the input's strides)
    if lex is None:
        vals, perm = torch.sort(pm, dim=-1, descending=descending, stable=True)
        perm = perm.contiguous()
    else:  # this order is final (the key ranks every tie): the sorted values are the output's
        lex, perm = torch.sort(lex, dim=-1, descending=descending, stable=True)
        perm = perm.contiguous()
        out = xm.gather(-1, perm)
        vals = _split(out)[0]
    m = pm.shape[-1]
    lo, hi = max(positions.start - 1, 0), min(positions.stop, m - 1)
    diff = vals[..., 1:] - vals[..., :-1]
    if run.tie_tol == 0 and run.near_tol is None:
        links = diff == 0  # |diff| <= 0 in one pass (NaN and inf - inf: no tie)
    else:
        gap = diff.abs()
        links = gap <= run.tie_tol  # sorted neighbours j, j + 1 tie
        run.note_near(op, gap[..., lo:hi])
    if lazy:
        return _lazy_order(run, op, tm, out, perm, links, lo, hi, descending), perm, dim
    tie = mask_any(links[..., lo:hi], -1)
    if mask_any(tie):
        rows = _tied_rows(tie)
        take = _rows_of_ties(lambda: rows)
        pr = take(perm)
        key = take(tm) if tm is not None else None
        ranked = None
        if lex is not None:  # the rows' lexicographic order is the sort above; ties left: equal keys adjacent
            lexr, ranked = take(lex), pr
            still = lambda: mask_any((lexr[:, 1:] == lexr[:, :-1]) & reach[:, 1:], -1)
        # candidates: the tie groups (runs of tied sorted neighbours) holding a tie pair that reaches the
        # positions, found in sorted order, then scattered back through perm
        reach = _reaching(take(links), lo, hi)
        cand = torch.zeros(pr.shape, dtype=torch.bool, device=pr.device).scatter_(1, pr, reach)
        # lazy: without any ranking key the stable sort above is the provisional order (the ranked pass
        # writes it)
        order, _ = run.resolve(op, "order", cand, key, lambda: take(xm), descending, primal=take(pm),
                               lazy=True, order=None if ranked is None else lambda: (ranked, still()))
        if order is not ranked:  # the sort's perm is already this pass's order otherwise (or order is None)
            perm, out = perm.clone(), None
            if order is not None:
                perm.view(-1, m)[rows] = order
        # a choice may cover the leading positions only (topk's ranked pass, `_top_ranked`): they are all read
        run.kinks[-1].write = lambda c: perm.data.view(-1, m)[:, : c.shape[-1]].index_put_((rows,), c)
    return xm.gather(-1, perm) if out is None else out, perm, dim


def _rows_of_ties(rows: _LazyRows) -> Callable[[Tensor], Tensor]:
    """t -> the tied rows of t as (G, t's last dim), ``rows`` built on first use (every row ties: t's rows)."""

    def take(t: Tensor) -> Tensor:
        r, flat = rows(), t.reshape(-1, t.shape[-1])
        return flat if r.numel() == flat.shape[0] else flat.index_select(0, r)

    return take


def _lazy_order(run, op: str, tm: Tensor, out: Tensor, perm: Tensor, links: Tensor, lo: int, hi: int,
                descending: bool) -> Tensor:
    """`_ordered`'s ties, ranked by the sort of the key: with any, a `_LazyKink` whose rows, candidates and keys
    are gathered if read. Returns the sorted output."""
    reaching = links[..., lo:hi]
    if not mask_any(reaching):
        return out
    m = perm.shape[-1]
    rows = _LazyRows(lambda: mask_any(reaching, -1))
    take = _rows_of_ties(rows)
    cand = lambda: torch.zeros(len(rows()), m, dtype=torch.bool, device=perm.device).scatter_(
        1, take(perm), _reaching(take(links), lo, hi))
    run.lazy_record(op, "order", cand, lambda: [take(tm)], lambda: take(perm), descending)
    # a choice may cover the leading positions only (topk's ranked pass, `_top_ranked`): they are all read
    run.kinks[-1].write = lambda c: perm.data.view(-1, m)[:, : c.shape[-1]].index_put_((rows(),), c)
    return out


def _top_ranked(run, op: str, x: Tensor, k: int, dim: int, largest: bool):
    """topk's first k positions as `_ordered` ranks them, from a top-(k + 1) of the (value, tangent) key instead
    of a full sort; None where that does not apply (then `_ordered`).

    Applies in a pass with this pass's tangent as the only key, exact ties (``tie_tol`` 0, no near ties), records
    kept internal (``run.top_only``: the choice covers the k positions, ``unresolved`` the ties among the k + 1),
    and no key tie across the k-th place (which of equal keys the stable order takes there needs every index).
    Candidates as `_ordered` finds them: tie groups within the k + 1 (`_reaching`), and past them the elements
    equal to the k-th value when it ties with the next (exact ties: a group is a run of equal values)."""
    xp, _ = _split(x)
    if not run.top_only or run.tie_tol != 0 or run.near_tol is not None or xp.dim() == 0 or k < 1:
        return None
    dim = dim % xp.dim()
    xm = x.movedim(dim, -1)
    pm, tm = _split(xm)
    m = pm.shape[-1]
    if tm is None or k + 1 >= m or not run.own_key_only() \
            or (lex := _shared_lex_key(run, x, dim, pm, tm)) is None:
        return None
    top_lex, top = torch.topk(lex, k + 1, dim=-1, largest=largest, sorted=True)
    equal = top_lex[..., 1:] == top_lex[..., :-1]
    if mask_any(equal):  # equal keys come in no set order: stable is by index
        top, by_index = top.sort(-1)
        top_lex = top_lex.gather(-1, by_index)
        top_lex, order = torch.sort(top_lex, dim=-1, descending=largest, stable=True)
        top = top.gather(-1, order)
        kth = top_lex[..., k - 1 : k]
        # past the k + 1, keys are at most the (k + 1)-th: only where that equals the k-th can one left out equal
        # it
        if mask_any(equal[..., k - 1]) and bool(((lex == kth).sum(-1) != (top_lex[..., :k] == kth).sum(-1)).any()):
            return None  # an element left out has the k-th key
    vals = pm.gather(-1, top)
    links = (vals[..., 1:] - vals[..., :-1]) == 0  # exact ties (NaN and inf - inf: none)
    perm = top[..., :k].contiguous()
    if mask_any(links):
        rows = _LazyRows(lambda: mask_any(links, -1))
        take = _rows_of_ties(rows)

        def candidates():
            tr, lr = take(top), take(links)
            reach = _reaching(lr, 0, k)
            cand = torch.zeros(tr.shape[0], m, dtype=torch.bool, device=tr.device).scatter_(1, tr, reach)
            cand |= lr[:, k - 1 : k] & (take(pm) == take(vals)[:, k - 1 : k])  # the k-th value's group past k + 1
            return cand, reach

        if run.ranks_alone(tm):  # the key's order is the choice: the record is built if read
            run.lazy_record(op, "order", lambda: candidates()[0], lambda: [take(tm)], lambda: take(top)[:, :k],
                            largest)
        else:
            cand, reach = candidates()
            lexr, tr = take(top_lex), take(top)
            still = lambda: mask_any((lexr[:, 1:] == lexr[:, :-1]) & reach[:, 1:], -1)
            run.resolve(op, "order", cand, take(tm), lambda: take(xm), largest, primal=take(pm), lazy=True,
                        order=lambda: (tr[:, :k], still()))
        run.kinks[-1].write = lambda c: perm.data.view(-1, k).index_put_((rows(),), c[:, :k])
    return xm.gather(-1, perm), perm, dim


@kink_rule(aten.sort, torch.sort, Tensor.sort)
def sort(run, func, x, dim=-1, descending=False, stable=False):
    """Sorted values. Within tied values, tangents sorted the same way (then further directions)."""
    if isinstance(dim, bool):  # sort(x, descending) positional form is not used by torch; keep dim an int
        dim, descending = -1, dim
    v, perm, d = _ordered(run, "aten.sort", x, dim, descending, slice(0, x.shape[dim] if x.dim() else 1))
    return torch.return_types.sort((v.movedim(-1, d), perm.movedim(-1, d)))


@kink_rule(aten.topk, torch.topk, Tensor.topk)
def topk(run, func, x, k, dim=-1, largest=True, sorted=True):
    """Top k. Ties at or across the k-th place: the elements largest along the direction win. ``sorted=False``:
    in PyTorch's order (unspecified, but what f reads): away from ties PyTorch's output exactly; at a tie the
    order of tied elements may change along a direction in ways only PyTorch's kernel knows: an error there."""
    before = len(run.kinks)
    v, perm, d = _top_ranked(run, "aten.topk", x, k, dim, largest) or _ordered(run, "aten.topk", x, dim, largest,
                                                                              slice(0, k))
    v, perm = v[..., :k], perm[..., :k]
    if not sorted and k > 1:
        if len(run.kinks) > before:
            raise NonsmoothError(f"topk(sorted=False) at {_user_line()} has tied values: the order of its output "
                                 "is unspecified and may change along a direction, so f's derivative there is "
                                 "not known. Use sorted=True (the same elements, in a known order)")
        theirs = torch.topk(_split(x)[0], k, dim, largest, sorted=False).indices.movedim(d, -1)
        slots = _slots(perm, theirs)
        v, perm = v.gather(-1, slots), perm.gather(-1, slots)
    return torch.return_types.topk((v.movedim(-1, d), perm.movedim(-1, d)))


def _slots(ours: Tensor, theirs: Tensor) -> Tensor:
    """For each of PyTorch's output slots (``theirs``: the index each holds), the position in ``ours`` (the
    chosen indices: the same set, away from ties) of the same index."""
    match = theirs.unsqueeze(-1) == ours.unsqueeze(-2)  # (..., slot, ours)
    if not bool(match.any(-1).all()):
        raise NonsmoothError(f"topk(sorted=False) at {_user_line()}: gradwise's choice of the top k differs from "
                             "PyTorch's without a tie; use sorted=True")
    return match.to(torch.int8).argmax(-1)


@kink_rule(aten.kthvalue, torch.kthvalue, Tensor.kthvalue)
def kthvalue(run, func, x, k, dim=-1, keepdim=False):
    """k-th smallest. At a tie: the tied element k-th smallest along the direction."""
    if _split(x)[0].dim() == 0:  # one element: nothing ties
        return func(x, k, dim, keepdim)
    v, perm, d = _ordered(run, "aten.kthvalue", x, dim, False, slice(k - 1, k))
    v, i = v[..., k - 1 : k], perm[..., k - 1 : k]
    v, i = (v.movedim(-1, d), i.movedim(-1, d)) if keepdim else (v.squeeze(-1), i.squeeze(-1))
    return torch.return_types.kthvalue((v, i))


@kink_rule(aten.median, torch.median, Tensor.median)
def median(run, func, x, dim=None, keepdim=False):
    """Lower median. At a tie: the tied element in the middle along the direction."""
    if _split(x)[0].isnan().any() or x.dim() == 0:  # PyTorch's median propagates NaN; no tie to rank
        return func(x) if dim is None else func(x, dim, keepdim)
    if dim is None:
        return kthvalue(run, func, x.reshape(-1), (x.numel() + 1) // 2).values
    return torch.return_types.median(tuple(kthvalue(run, func, x, (x.shape[dim] + 1) // 2, dim, keepdim)))


@kink_rule(aten.nanmedian, torch.nanmedian, Tensor.nanmedian)
def nanmedian(run, func, x, dim=None, keepdim=False):
    """Lower median of the non-NaN values (NaN sorts last, so it is the ((c - 1) // 2)-th of the sorted slice with
    c values). At a tie: the tied element in the middle along the direction, as for median."""
    xp = _split(x)[0]
    if xp.dim() == 0 or xp.numel() == 0:
        return func(x) if dim is None else func(x, dim, keepdim)
    xm, d = (x.reshape(-1), 0) if dim is None else (x, dim % xp.dim())
    pm = _split(xm)[0].detach().movedim(d, -1)
    k = torch.div((~pm.isnan()).sum(-1, keepdim=True) - 1, 2, rounding_mode="floor").clamp(min=0)  # all-NaN: 0
    lo, hi = int(k.min()), int(k.max())
    v, perm, d = _ordered(run, "aten.nanmedian", xm, d, False, slice(lo, hi + 1))
    v, i = v.gather(-1, k), perm.gather(-1, k)
    if dim is None:
        return v.reshape(())
    v, i = (v.movedim(-1, d), i.movedim(-1, d)) if keepdim else (v.squeeze(-1), i.squeeze(-1))
    return torch.return_types.nanmedian((v, i))


@kink_rule(aten.mode, torch.mode, Tensor.mode)
def mode(run, func, x, dim=-1, keepdim=False):
    """Most frequent value (the smallest of equally frequent ones). Nearby, values are distinct and mode is their
    minimum; so mode is continuous at x only where at most one value repeats and it is the slice's minimum (else:
    an error, mode jumps). There, along d the repeated minimum splits into groups of equal tangent: mode follows
    the largest group, then the smallest tangent, so with distinct tangents it is the min rule."""
    xp = _split(x)[0]
    if xp.dim() == 0 or xp.numel() == 0:
        return func(x, dim, keepdim)
    d = dim % xp.dim()
    srt = torch.sort(xp.detach().movedim(d, -1), -1).values
    same = srt[..., 1:] == srt[..., :-1]
    if not mask_any(same):
        return func(x, dim, keepdim)  # all values distinct: mode is the minimum, attained once
    first = torch.cat([torch.ones_like(same[..., :1]), ~same[..., :-1]], -1)
    groups = (same & first).sum(-1)  # repeated values per slice
    if not bool(((groups == 0) | ((groups == 1) & same[..., 0])).all()):
        raise NonsmoothError(f"aten.mode at {_user_line()}: a value that is not the minimum repeats (or two values "
                             "do), where mode is discontinuous: an arbitrarily small perturbation makes the values "
                             "distinct and mode jumps to the minimum. No one-sided derivative or Clarke gradient.")
    xm = x.movedim(d, -1)
    pm, tm = _split(xm)
    pm, m = pm.detach(), pm.shape[-1]
    out = func(xm, -1)
    rows = _tied_rows(same[..., 0])
    prim = pm.reshape(-1, m)[rows]
    cand = prim == srt.reshape(-1, m)[rows, :1]
    key = tm.reshape(-1, m)[rows] if tm is not None else None
    if key is not None:  # elements of equal tangent stay equal along d: keep the largest such groups
        mult = ((key.unsqueeze(2) == key.unsqueeze(1)) & cand.unsqueeze(1)).sum(-1).masked_fill(~cand, 0)
        cand = cand & (mult == mult.amax(-1, keepdim=True))
    choice, _ = run.resolve("aten.mode", "select", cand, key, lambda: xm.reshape(-1, m)[rows], False, lazy=True)
    lock = out.indices.unsqueeze(-1).contiguous().clone()
    run.kinks[-1].write = lambda c: lock.data.view(-1).index_put_((rows,), c)
    if choice is not None:
        run.kinks[-1].write(choice)
    values, idx = xm.gather(-1, lock), lock
    if keepdim:
        return torch.return_types.mode((values.movedim(-1, d), idx.movedim(-1, d)))
    return torch.return_types.mode((values.squeeze(-1), idx.squeeze(-1)))


def _cumulative(op: str, descending: bool):
    rt = torch.return_types.cummax if descending else torch.return_types.cummin

    def rule(run, func, x, dim):
        xp = _split(x)[0]
        if xp.dim() == 0 or xp.numel() == 0:
            return rt(func(x, dim))
        d = dim % xp.dim()
        xm = x.movedim(d, -1)
        pm, tm = _split(xm)
        pm = pm.detach()
        out = rt(func(xm, -1))  # (an aten overload returns a plain tuple)
        v, idx = out.values.detach(), out.indices
        n = pm.shape[-1]
        # j <= i ties with the running extreme v[i] iff x[j] == v[i]; such j lie in v's plateau through i, so
        # count the elements attaining v within each plateau (a cumulative sum restarted at plateau starts)
        hit = (pm == v).to(torch.int64)
        step = torch.ones_like(hit, dtype=torch.bool)
        step[..., 1:] = v[..., 1:] != v[..., :-1]
        ar = torch.arange(n, device=pm.device).expand_as(hit)
        start = torch.where(step, ar, 0).cummax(-1).values
        cs = hit.cumsum(-1)
        tie = (cs - cs.gather(-1, start) + hit.gather(-1, start)) > 1
        flat = run.flat_source(x) if run.tie_tol == 0 else None
        if flat is not None and flat[1] is None:  # a plateau of relu-dead elements is no kink
            tie &= v != flat[0]
        if not mask_any(tie):
            return rt((out.values.movedim(-1, d), idx.movedim(-1, d)))
        rows = _tied_rows(tie)
        i, st = rows % n, start.reshape(-1)[rows]
        width = int((i - st).max()) + 1
        pos = st.unsqueeze(1) + torch.arange(width, device=pm.device)  # the plateau window of each tied output
        ok = pos <= i.unsqueeze(1)
        fpos = (rows // n).unsqueeze(1) * n + pos.clamp(max=n - 1)
        pick = lambda t, fill: t.reshape(-1).take(fpos).masked_fill(~ok, fill)
        cand = ok & (pick(pm, math.nan) == v.reshape(-1)[rows].unsqueeze(1))
        key = pick(tm, 0.0) if tm is not None else None
        choice, _ = run.resolve(op, "select", cand, key, lambda: pick(xm, 0.0), descending, lazy=True)
        lock = idx.contiguous().clone()
        locked = lambda c: pos.gather(1, c.unsqueeze(1)).squeeze(1)
        run.kinks[-1].write = lambda c: lock.data.view(-1).index_put_((rows,), locked(c))
        if choice is not None:
            run.kinks[-1].write(choice)
        return rt((xm.gather(-1, lock).movedim(-1, d), lock.movedim(-1, d)))

    word = "largest" if descending else "smallest"
    rule.__name__ = op.split(".")[1]
    rule.__doc__ = (f"{op}: the running {word} value. Where it is attained by several elements so far, the one "
                    f"{word} along the direction (PyTorch takes the last), so f'(x; d)_i is the {word} tangent over "
                    "them; the indices are locked. Plateaus of relu-dead elements are no kink.")
    return rule


kink_rule(aten.cummax, torch.cummax, Tensor.cummax)(_cumulative("aten.cummax", True))
kink_rule(aten.cummin, torch.cummin, Tensor.cummin)(_cumulative("aten.cummin", False))


def _adaptive_windows(spatial, out_sp, device) -> Tensor:
    """(outputs, K) flat input index of every adaptive-pooling window element (-1 past a shorter window)."""
    nd, index, bad = len(spatial), 0, None
    for dim, (n, o) in enumerate(zip(spatial, out_sp, strict=True)):
        ar = torch.arange(o, device=device)
        lo, hi = (ar * n) // o, ((ar + 1) * n + o - 1) // o
        j = lo.unsqueeze(1) + torch.arange(int((hi - lo).max()), device=device)
        shape = [1] * (2 * nd)
        shape[dim], shape[nd + dim] = o, j.shape[1]
        index = index + j.reshape(shape) * math.prod(spatial[dim + 1:])
        miss = (j >= hi.unsqueeze(1)).reshape(shape)
        bad = miss if bad is None else bad | miss
    index = index.masked_fill(bad, -1)
    return index.reshape(math.prod(out_sp), -1)


def _adaptive_max_pool(nd: int):
    native = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}[nd]
    op = f"aten.adaptive_max_pool{nd}d"

    def rule(run, func, x, output_size, return_indices=False):
        if known := run.known_here():
            return _pool_known(run, op, x, known[0], return_indices)
        xp = _split(x)[0]
        out, idx = native(xp, output_size, return_indices=True)
        spatial, out_sp = xp.shape[xp.dim() - nd:], out.shape[out.dim() - nd:]
        batch = math.prod(xp.shape[: xp.dim() - nd])
        windows = _adaptive_windows(spatial, out_sp, xp.device)
        op_ = out.detach()
        vals = xp.detach().reshape(batch, -1)[:, windows.clamp(min=0)].masked_fill(windows < 0, -math.inf)
        gap = op_.reshape(batch, -1, 1) - vals
        run.note_near(op, gap[gap > 0])
        tie = ((gap <= run.tie_tol).sum(-1) > 1).reshape(op_.shape)
        flat = run.flat_source(x) if run.tie_tol == 0 else None
        if flat is not None and flat[1] is None:  # relu-dead windows are no kink
            tie &= op_ != flat[0]
        return _pool_lock(run, op, x, out, idx, tie if mask_any(tie) else None, windows, batch, return_indices)

    rule.__name__ = f"adaptive_max_pool{nd}d"
    rule.__doc__ = (f"{op}: like max_pool (windows [floor(i L / O), ceil((i + 1) L / O))): in a window with tied "
                    "maxima the element largest along the direction; the indices are locked.")
    return rule


kink_rule(aten.adaptive_max_pool1d, F.adaptive_max_pool1d, torch.adaptive_max_pool1d,
          F.adaptive_max_pool1d_with_indices)(_adaptive_max_pool(1))
kink_rule(aten.adaptive_max_pool2d, F.adaptive_max_pool2d, F.adaptive_max_pool2d_with_indices)(_adaptive_max_pool(2))
kink_rule(aten.adaptive_max_pool3d, F.adaptive_max_pool3d, F.adaptive_max_pool3d_with_indices)(_adaptive_max_pool(3))
