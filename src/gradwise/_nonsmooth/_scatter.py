"""Kink rules for the scatter-style max/min reductions: ``scatter_reduce`` and ``index_reduce`` with amax/amin.

Each destination element is the max (min) over its candidates: its own value (``include_self``) and the source
elements scattered into it. Where one candidate attains it, the rule is PyTorch's op. Where several tie, the output
is rebuilt as ``where(from_self, dest, src.take(position))`` with the winner of each tied destination ranked like
`max`: by tangent along the direction, then further directions (PyTorch splits the gradient evenly among the tied
elements instead). ``index_reduce`` and ``embedding_bag``, which have no forward-mode formula in PyTorch, take
this route whenever a tangent is present, so their directional derivatives exist everywhere.

May import: torch, gradwise._masks, ``_records``, ``_rules``.
"""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from gradwise._masks import mask_any
from gradwise._nonsmooth._records import _Run
from gradwise._nonsmooth._rules import _is_dual, _split, kink_rule

aten = torch.ops.aten


def _select_reduce(run: _Run, op: str, dest: Tensor, dim: int, index: Tensor, src: Tensor, descending: bool,
                   include_self: bool, native):
    dp, dt = _split(dest)
    sp, st = _split(src)
    dim = dim % max(dp.dim(), 1)
    region = tuple(slice(0, n) for n in index.shape)
    src_r, sp_r = src[region], sp[region].detach()
    st_r = None if st is None else st[region]
    with torch.no_grad():
        out = native(dp.detach(), sp.detach())
        flat_out = out.reshape(-1)
        dest_pos = torch.arange(dp.numel(), device=dp.device).reshape(dp.shape).gather(dim, index).reshape(-1)
        o_at = flat_out[dest_pos]
        sv = sp_r.reshape(-1)
        src_c = (sv == o_at) | (sv.isnan() & o_at.isnan())
        dv = dp.detach().reshape(-1)
        self_c = ((dv == flat_out) | (dv.isnan() & flat_out.isnan())) if include_self else torch.zeros_like(src_c[:0])
        count = torch.zeros(dp.numel(), dtype=torch.int64, device=dp.device).index_add_(0, dest_pos, src_c.long())
        if include_self:
            count += self_c.long()
    tie = count > 1
    # without include_self, PyTorch's backward still counts a destination's own value among the candidates where it
    # equals the result (x = [3], src = [1, 3]: src[1] gets 1/2 for a slope of 1): rebuilt there, with no tie
    unused_self = not include_self and mask_any((count > 0) & (dp.detach().reshape(-1) == flat_out))
    if not mask_any(tie) and not unused_self and not (
            op != "aten.scatter_reduce" and (_is_dual(dest) or _is_dual(src))):
        return None  # no tie: PyTorch's own op is exact
    n_src = sv.numel()
    big = torch.full((dp.numel(),), n_src, dtype=torch.int64, device=dp.device)
    positions = torch.arange(n_src, device=dp.device)
    first = big.scatter_reduce(0, dest_pos, torch.where(src_c, positions, n_src), "amin")
    from_self = (self_c if include_self else torch.zeros(dp.numel(), dtype=torch.bool, device=dp.device)) | (
        first == n_src)
    srcpos = first.clamp(max=max(n_src - 1, 0))
    if mask_any(tie):
        rows = tie.nonzero().squeeze(1)
        rowmap = torch.full((dp.numel(),), -1, dtype=torch.int64, device=dp.device)
        rowmap[rows] = torch.arange(len(rows), device=dp.device)
        sel = src_c & tie[dest_pos]
        ps = sel.nonzero().squeeze(1)
        pd = dest_pos[ps]
        order = torch.sort(pd, stable=True).indices
        ps, pd = ps[order], pd[order]
        starts = torch.searchsorted(pd, pd, right=False)
        rank = torch.arange(len(pd), device=dp.device) - starts
        m = 1 + (int(rank.max()) + 1 if len(rank) else 0)
        g = rowmap[pd]
        cand = torch.zeros(len(rows), m, dtype=torch.bool, device=dp.device)
        candpos = torch.zeros(len(rows), m, dtype=torch.int64, device=dp.device)
        cand[g, 1 + rank] = True
        candpos[g, 1 + rank] = ps
        if include_self:
            cand[:, 0] = self_c[rows]
        src_flat, dest_flat = src_r.reshape(-1), dest.reshape(-1)

        def pick(t_src, t_dest, fill):
            v = torch.full((len(rows), m), fill, dtype=dp.dtype, device=dp.device) if t_src is None else \
                t_src.reshape(-1)[candpos].masked_fill(~cand, fill)
            if t_dest is not None:
                v = torch.cat([t_dest.reshape(-1)[rows].unsqueeze(1), v[:, 1:]], 1)
            return v

        key = None if st_r is None and dt is None else pick(
            st_r if st_r is not None else torch.zeros_like(sp_r), dt if dt is not None else torch.zeros_like(dp), 0.0)
        values = lambda: torch.cat([dest_flat[rows].unsqueeze(1), src_flat[candpos[:, 1:]]], 1)
        choice, _ = run.resolve(op, "select", cand, key, values, descending, lazy=True)

        def write(c):
            from_self.data.index_put_((rows,), c == 0)
            srcpos.data.index_put_((rows,), candpos.gather(1, c.unsqueeze(1)).squeeze(1))

        run.kinks[-1].write = write
        if choice is not None:
            write(choice)
    taken = src_r.reshape(-1).gather(0, srcpos) if n_src else torch.zeros_like(dest.reshape(-1))
    return torch.where(from_self, dest.reshape(-1), taken).reshape(dp.shape)


def _by_reverse(native, input: Tensor, src: Tensor, spread):
    """``native(input, src)`` with its tangent from PyTorch's reverse pass, for smooth ops whose forward-mode
    formula is missing (index_reduce) or wrong (scatter_reduce 'prod' in PyTorch 2.13 gives a zero tangent). Each
    element of input and src feeds one output element (its own position; the one its index names), so the
    gradient for a cotangent of ones holds each one's partial derivative, and the tangent is
    input' g_input + spread(src' g_src) (spread: the index's scatter-add). First order only: PyTorch has no double
    backward for a product with two zeros in one destination. None when neither carries a tangent."""
    (ip, it), (sp, st) = _split(input), _split(src)
    if it is None and st is None:
        return None
    out = native(ip, sp)  # (in the primals' graph)
    with torch.enable_grad():
        a, b = ip.detach().requires_grad_(it is not None), sp.detach().requires_grad_(st is not None)
        ref = native(a, b)
        wrt = [v for v in (a, b) if v.requires_grad]
        grads = iter(torch.autograd.grad(ref, wrt, torch.ones_like(ref), allow_unused=True))
    ga = next(grads) if it is not None else None
    gb = next(grads) if st is not None else None
    tangent = torch.zeros_like(out)
    if ga is not None:
        tangent = tangent + it * ga
    if gb is not None:
        tangent = tangent + spread(st * gb)
    return fwAD.make_dual(out, tangent)


def _reduce_rule(name: str, index_1d: bool):
    op = f"aten.{name}"

    def rule(run, func, input, dim, index, src, reduce, *, include_self=True):
        if reduce not in ("amax", "amin"):
            if name == "index_reduce" or reduce == "prod":  # no forward-mode formula; scatter_reduce's is wrong
                native = torch.index_reduce if name == "index_reduce" else torch.scatter_reduce  # (out of place)
                if name == "scatter_reduce" and src.dim() == index.dim():
                    # only src's corner of index's shape is read; PyTorch's prod backward fails on a larger src
                    src = src[tuple(slice(0, n) for n in index.shape)]
                spread = (lambda v: torch.zeros_like(_split(input)[0]).index_add(dim, index, v)) \
                    if name == "index_reduce" else (lambda v: torch.zeros_like(_split(input)[0]).scatter_add(
                        dim, index, v))
                out = _by_reverse(lambda a, b: native(a, dim, index, b, reduce, include_self=include_self),
                                  input, src, spread)
                if out is not None:
                    return input.copy_(out) if func in (Tensor.scatter_reduce_, Tensor.index_reduce_) else out
            return func(input, dim, index, src, reduce, include_self=include_self)
        inplace = func in (Tensor.scatter_reduce_, Tensor.index_reduce_)
        target = input
        if inplace:  # computed out of place, then written in: the op's backward must not read the overwritten input
            input = input.clone()
        d = dim % max(input.dim(), 1)
        idx = index
        if index_1d and src.dim() == 0:  # one element each (index of one entry)
            idx = index.reshape(())
        elif index_1d:
            shape = [1] * src.dim()
            shape[d] = -1
            idx = index.view(shape).expand(src.shape)
        native = lambda a, b: getattr(torch, name)(a, d, index, b, reduce, include_self=include_self)
        out = _select_reduce(run, op, input, d, idx, src, reduce == "amax", include_self, native)
        if out is None:
            out = getattr(torch, name)(input, dim, index, src, reduce, include_self=include_self)
        return target.copy_(out) if inplace else out

    rule.__name__ = name
    rule.__doc__ = (f"{op} with amax/amin: among tied candidates of a destination (its own value with include_self, "
                    "and the source elements scattered into it), the one largest (smallest) along the direction; "
                    "PyTorch splits the gradient evenly. Other reductions are PyTorch's.")
    return rule


_scatter_reduce = kink_rule(aten.scatter_reduce, torch.scatter_reduce, Tensor.scatter_reduce,
                            Tensor.scatter_reduce_)(_reduce_rule("scatter_reduce", False))
_index_reduce = kink_rule(aten.index_reduce, torch.index_reduce, Tensor.index_reduce, Tensor.index_reduce_)(
    _reduce_rule("index_reduce", True))


@kink_rule(aten._embedding_bag, torch.nn.functional.embedding_bag)
def embedding_bag(run, func, input, weight, offsets=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False,
                  mode="mean", sparse=False, per_sample_weights=None, include_last_offset=False, padding_idx=None):
    """embedding_bag(mode='max'): per bag, the elementwise max of its rows of ``weight``: the scatter_reduce amax
    rule (tied rows in a column: the one largest along the direction; PyTorch gives all to one), entries equal to
    ``padding_idx`` left out as PyTorch leaves them out (a bag of padding only is 0). Other modes and options are
    PyTorch's."""
    if mode != "max" or max_norm is not None or per_sample_weights is not None:
        call = lambda w, p: func(input, w, offsets, max_norm, norm_type, scale_grad_by_freq, mode, sparse, p,
                                 include_last_offset, padding_idx)
        (wp, wt), (pp, pt) = _split(weight), _split(per_sample_weights)
        # (mode 'max' with padding_idx: not bilinear; PyTorch's, which has no forward-mode formula: an error)
        if max_norm is not None or mode == "max" or (wt is None and pt is None):
            # (max_norm renormalises weight in place under no_grad: PyTorch's, with no forward-mode formula)
            return call(weight, per_sample_weights)
        # sum / mean of rows (times per_sample_weights): bilinear, its tangent two calls of the op itself (PyTorch
        # has no forward-mode formula, nor a double backward)
        out = call(wp, pp)
        with torch.no_grad():
            tangent = call(wt, None if pp is None else pp.detach()) if wt is not None else None
            if pt is not None:
                other = call(wp.detach(), pt)
                tangent = other if tangent is None else tangent + other
        return fwAD.make_dual(out, tangent)
    wp = _split(weight)[0]
    if input.dim() == 2:
        bags, flat = input.shape[0], input.reshape(-1)
        bag = torch.arange(bags, device=input.device).repeat_interleave(input.shape[1])
    else:
        flat = input
        bags = len(offsets) - 1 if include_last_offset else len(offsets)
        bag = torch.searchsorted(offsets, torch.arange(len(flat), device=input.device), right=True) - 1
        bag = bag.clamp(max=bags - 1)
    if padding_idx is not None:  # (PyTorch has no forward-mode embedding_bag: the rule, not PyTorch's, with a tangent)
        kept = flat != (padding_idx + wp.shape[0] if padding_idx < 0 else padding_idx)
        flat, bag = flat[kept], bag[kept]
    rows = weight[flat]
    index = bag.unsqueeze(1).expand(-1, wp.shape[1])
    dest = torch.zeros(bags, wp.shape[1], dtype=wp.dtype, device=wp.device)
    native = lambda a, b: a.scatter_reduce(0, index, b, "amax", include_self=False)
    out = _select_reduce(run, "aten.embedding_bag", dest, 0, index, rows, True, False, native)
    if out is None:  # no tie: PyTorch's own op (its NaN handling included)
        return func(input, weight, offsets, max_norm, norm_type, scale_grad_by_freq, mode, sparse, per_sample_weights,
                    include_last_offset, padding_idx)
    return out


# a ranked pass runs these rules even where the probe saw no tie (not PyTorch's own op on dual tensors): PyTorch
# has no forward-mode index_reduce or embedding_bag (NotImplementedError), and scatter_reduce 'prod''s is wrong
_scatter_reduce.no_pytorch_jvp = _index_reduce.no_pytorch_jvp = embedding_bag.no_pytorch_jvp = True
